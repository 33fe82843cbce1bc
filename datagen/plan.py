"""The plan of a datagen run: every input unit listed once into OUT/_plan.parquet, cut into shards.

The plan is made on the first run (datagen/sources.py lists SRC; tar shards are listed by Ray tasks) and
reused by every rerun of the same command, which is what makes a resumed run write the same shards as an
uninterrupted one. OUT/_plan.json records what it was made for: the input, the shard size, the input's
column names, and a fingerprint of the stage settings that shape records (decode settings included); a rerun
with others is refused. It also keeps the counts of the files a folder input does not take (`skipped_files`),
so every run of OUT reports them.
On an object store the plan is written locally, then uploaded, `_plan.json` last (it marks the plan
complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict

import pyarrow.parquet as pq

from subjectdiff.catalogs.storage import Folder, row_group_batches
from subjectdiff.datagen import config as stage_config
from subjectdiff.datagen import sources
from subjectdiff.datagen.stages import registry

PLAN_FILE, PLAN_META = "_plan.parquet", "_plan.json"

# Stage settings that change how fast records are made, not what they hold: a resume may change them.
_OPERATIONAL = ("device", "batch_size")


def stages_fingerprint(cfg: stage_config.DatagenConfig) -> str:
    """A hash of every setting that shapes the records: decode, and the section of each active stage (registry
    order: models, thresholds, filters, dtypes). A stage that is off does not count, so a run with
    `curate.enabled=false` has the fingerprint runs had before that stage existed (and can resume them)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in sorted(x.items()) if k not in _OPERATIONAL}
        return list(x) if isinstance(x, tuple) else x

    settings = {"decode": asdict(cfg.decode), **{s.section: asdict(s.settings(cfg)) for s in registry.active(cfg)}}
    if cfg.video != stage_config.VideoConfig():  # counted when set: plans made before videos keep their fingerprint
        settings["video"] = asdict(cfg.video)
    blob = json.dumps(strip(settings), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_or_reuse(
    src: str,
    out: str | os.PathLike,
    shard_size: int,
    fingerprint: str,
    map_urls=None,
    columns: dict[str, str | None] | None = None,
) -> dict[str, int]:
    """Reuse OUT's plan when it was made for the same input, shard size, columns and stage settings; else
    make it. Returns {shard: number of units}. COLUMNS: {"image_column": ..., "caption_column": ...} naming
    a list's columns (None: the defaults)."""
    folder = Folder(out)
    columns = {k: v for k, v in (columns or {}).items() if v}
    want = {"input": src, "shard_size": shard_size, "stages": fingerprint, **columns}
    if folder.exists(PLAN_META) and folder.exists(PLAN_FILE):
        meta = json.loads(folder.read_text(PLAN_META))
        if meta.get("input") != src or meta.get("shard_size") != shard_size:
            raise sources.SourceError(
                f"{folder.url} holds a run of input {meta.get('input')!r} with shard_size {meta.get('shard_size')}; "
                "use another --out (or the same input and settings to resume)"
            )
        if meta.get("stages", fingerprint) != fingerprint:
            raise sources.SourceError(
                f"{folder.url} holds records made with other stage settings (decode, models, thresholds or filters; "
                f"fingerprint {meta['stages']}, now {fingerprint}): resuming would mix them. Use another "
                "--out, or the config of that run (its manifest.json has it)"
            )
        if any(meta.get(k) != v for k, v in columns.items()):
            raise sources.SourceError(
                f"{folder.url} holds a run with other input columns "
                f"({ {k: meta.get(k) for k in columns} }); use another --out"
            )
        return meta["shards"]
    folder.makedirs()
    skipped: Counter = Counter()
    with tempfile.TemporaryDirectory(prefix="plan-", dir=folder.path if folder.local else None) as tmp:
        local = os.path.join(tmp, PLAN_FILE)
        counts = sources.write_plan(src, local, shard_size, map_urls=map_urls, skipped=skipped, **columns)
        folder.commit(local, PLAN_FILE)
    folder.write_text(
        PLAN_META,
        json.dumps({**want, "shards": counts, "skipped_files": dict(sorted(skipped.items())), "created": time.time()}),
    )
    return counts


def skipped_files(out: str | os.PathLike) -> dict[str, int]:
    """The files the plan of OUT did not take from a folder input, by kind (sources.skip_kind): {".txt": 3};
    empty for other inputs, and for plans made before they were counted."""
    folder = Folder(out)
    if not folder.exists(PLAN_META):
        return {}
    return json.loads(folder.read_text(PLAN_META)).get("skipped_files", {})


def shard_rows(out: str | os.PathLike, todo: set[str], batch_rows: int = 10_000) -> Iterator[tuple[str, dict]]:
    """(shard, its plan rows as {column: list}) for the shards in TODO, in plan order, streamed: one shard's
    rows in memory at a time."""
    folder = Folder(out)
    with folder.open(PLAN_FILE) as f:
        pf = pq.ParquetFile(f)
        cur, rows = None, None
        for batch in row_group_batches(pf, batch_rows):
            d = batch.to_pydict()
            for j, shard in enumerate(d["shard"]):
                if shard != cur:
                    if cur in todo:
                        yield cur, rows
                    cur, rows = shard, {k: [] for k in d}
                if shard in todo:
                    for k, v in d.items():
                        rows[k].append(v[j])
        if cur in todo:
            yield cur, rows
