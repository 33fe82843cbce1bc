"""`datagen run --retry-failures`: redo only the samples whose failure may pass on a second try.

Retryable failures (`retryable`):
    read      any input read error at run time (a dropped connection, a throttled bucket, a mount that was
              down); errors found while planning (a failed img2dataset download, a list row without a path,
              a broken tar header: the `error` column of the plan) are facts about the input and are not;
    decode    an undecodable image from a remote input (a transfer cut short upstream); a local file that
              does not decode will not decode next time;
    error:    any stage that raised (a GPU out of memory, a lost device): reason "error: <Type>: ...".
Everything else (no nouns, no detections, too small, a write-contract violation) is the data's, and stays.

How: the catalog (refreshed first) names the failures of complete shards; each shard holding retryable ones
is rebuilt on a committer from its own existing records, unchanged, plus the redone samples, in plan order
(ShardCommitter.open with `merge`), and published in place of the old one, its stats file removed first: a
crash midway leaves the shard incomplete, and a plain rerun redoes it whole. A redone sample that succeeds
moves from `failures` to `samples`; one that fails again keeps its (new) failure: never both, never lost.
Incomplete shards, if any, are finished as a plain rerun would. This module only says which samples to redo
(`redo`, `merges`); the run itself is datagen/run.py's one loop.
"""

from __future__ import annotations

import sys

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.schema import make_key
from subjectdiff.catalogs.storage import is_local
from subjectdiff.datagen import plan


def retryable(stage: str, reason: str, source: str) -> bool:
    """Whether a run-time failure may pass on a second try (module docstring)."""
    if reason.startswith("error:"):
        return True
    if stage == "read":
        return True
    return stage == "decode" and not is_local(source)


def retry_keys(out: str, shards: set[str], catalog_file=None) -> dict[str, set[str]]:
    """{shard: keys to redo} among the failures the catalog of OUT holds for SHARDS (planning errors are
    removed later, from the plan)."""
    catalog.build(out, catalog=catalog_file)
    rows = catalog.query(out, "SELECT shard, key, stage, reason, source, video FROM failures", catalog=catalog_file)
    found: dict[str, set[str]] = {}
    for r in rows.to_pylist():
        if r["shard"] in shards and retryable(r["stage"], r["reason"] or "", r["video"] or r["source"] or ""):
            # a frame of a video is redone with its whole video, the plan's unit (datagen/video.py)
            found.setdefault(r["shard"], set()).add(make_key(r["video"]) if r["video"] else r["key"])
    return found


def redo(out: str, done_before: set[str], n_todo: int, catalog_file=None) -> dict[str, set[str]]:
    """What a retry run redoes in the complete shards DONE_BEFORE of OUT: {shard: keys} (`retry_keys`), said
    on stderr with the N_TODO incomplete shards the run finishes besides."""
    found = retry_keys(out, done_before, catalog_file)
    print(
        f"[datagen] retrying {sum(len(v) for v in found.values())} failed sample(s) in {len(found)} shard(s)"
        + (f", and finishing {n_todo} incomplete shard(s)" if n_todo else ""),
        file=sys.stderr,
        flush=True,
    )
    return found


def merges(out: str, todo: set[str], redo: dict[str, set[str]]):
    """The distributor's shards, in plan order: whole ones for TODO, (rows to redo, merge) for REDO."""
    for name, rows in plan.shard_rows(out, todo | set(redo)):
        if name in todo:
            yield name, rows
            continue
        keep = [i for i, (k, err) in enumerate(zip(rows["key"], rows["error"])) if k in redo[name] and not err]
        if keep:
            subset = {c: [v[i] for i in keep] for c, v in rows.items()}
            yield name, subset, {"order": list(rows["key"]), "replace": [rows["key"][i] for i in keep]}
