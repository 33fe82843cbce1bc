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
Incomplete shards, if any, are finished as a plain rerun would.
"""

from __future__ import annotations

import sys
import time

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.storage import Entry, Folder, is_local
from subjectdiff.datagen import plan
from subjectdiff.datagen.distributor import Distributor, Outcome, local_output_node
from subjectdiff.datagen.job import JobConfig
from subjectdiff.datagen.progress import RunSummary
from subjectdiff.progress import Progress


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
    rows = catalog.query(out, "SELECT shard, key, stage, reason, source FROM failures", catalog=catalog_file)
    found: dict[str, set[str]] = {}
    for r in rows.to_pylist():
        if r["shard"] in shards and retryable(r["stage"], r["reason"] or "", r["source"] or ""):
            found.setdefault(r["shard"], set()).add(r["key"])
    return found


def _merges(out: str, todo: set[str], redo: dict[str, set[str]]):
    """The distributor's shards, in plan order: whole ones for TODO, (rows to redo, merge) for REDO."""
    for name, rows in plan.shard_rows(out, todo | set(redo)):
        if name in todo:
            yield name, rows
            continue
        keep = [i for i, (k, err) in enumerate(zip(rows["key"], rows["error"])) if k in redo[name] and not err]
        if keep:
            subset = {c: [v[i] for i in keep] for c, v in rows.items()}
            yield name, subset, {"order": list(rows["key"]), "replace": [rows["key"][i] for i in keep]}


def run_retries(out: str, cfg: JobConfig, counts: dict[str, int], done_before: set[str], listing: dict[str, Entry],
                *, manifest, t0: float, progress_every: float, factory=None, catalog_file=None) -> RunSummary:
    """The retry run (module docstring); the summary counts the redone samples' outcomes. LISTING: the run's
    listing of OUT (datagen/run.py)."""
    from subjectdiff.datagen.run import _clean_partial, _complete

    folder = Folder(out)
    todo = {s for s in counts if s not in done_before}
    _clean_partial(folder, sorted(todo), listing)
    redo = retry_keys(out, done_before, catalog_file)
    n_redo = sum(len(v) for v in redo.values())
    print(f"[datagen] retrying {n_redo} failed sample(s) in {len(redo)} shard(s)"
          + (f", and finishing {len(todo)} incomplete shard(s)" if todo else ""), file=sys.stderr, flush=True)
    prog = Progress(n_redo + sum(counts[s] for s in todo), every=progress_every)
    outcome = Outcome()
    if redo or todo:
        dist = Distributor(out, cfg, local_output_node=local_output_node(out), progress=prog,
                           extra_stats={"run_start": t0}, factory=factory, catalog_file=catalog_file)
        outcome = dist.run(_merges(out, todo, redo))
    prog.update(0, 0, force=True)
    print(catalog.build(out, catalog=catalog_file).summary(), file=sys.stderr)
    complete = _complete(folder.listing())
    done = outcome.done
    ok, failed = sum(v[0] for v in done.values()), sum(v[1] for v in done.values())
    manifest.run["retried"] = n_redo
    return RunSummary(len(counts), sum(counts.values()), ok, failed, time.time() - t0,
                      len(done_before) - len(redo), [s for s in counts if s not in complete], outcome.why)
