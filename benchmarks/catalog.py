"""Catalog benchmark: build a catalog of ~1M synthetic objects and time typical queries.

    python benchmarks/catalog.py [--objects 1000000] [--out /tmp/catalog_bench]

Synthetic shards are sidecars only (samples/objects Parquet with the writer's schemas, stats, an empty
tar): the catalog is built from sidecars, never from tars, so this measures exactly what a real build does.
Each query runs through `catalogs.catalog.query` (opening the read-only catalog each time, as the CLI
does) and, side by side, two baselines without a catalog: DuckDB straight over the Parquet sidecars, and
pandas over the same files. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from subjectdiff.catalogs import catalog, selection
from subjectdiff.catalogs.writer import OBJECT_SCHEMA, SAMPLE_SCHEMA

LABELS = [f"label{i:03d}" for i in range(400)]


def with_schema(columns: dict, schema: pa.Schema) -> pa.Table:
    """The columns as a table of the writer's schema; the columns left out (curation signals) are nulls, as in
    shards made without the curate stage."""
    rows = len(next(iter(columns.values())))
    return pa.table({f.name: columns.get(f.name, [None] * rows) for f in schema}, schema=schema)


def write_synthetic(out: Path, n_objects: int, per_shard: int, objs_per_sample: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    n_samples = n_objects // objs_per_sample
    n_shards = (n_samples + per_shard - 1) // per_shard
    label_p = 1.0 / np.arange(1, len(LABELS) + 1)
    label_p /= label_p.sum()  # Zipf-like label frequencies, as real nouns have
    for s in range(n_shards):
        name = f"{s:05d}"
        n = min(per_shard, n_samples - s * per_shard)
        keys = [f"{s:05d}{i:06d}" for i in range(n)]
        n_fail = max(1, n // 100)
        samples = with_schema(
            {
                "key": keys + [f"f{s:05d}{i:05d}" for i in range(n_fail)],
                "shard": [name] * (n + n_fail),
                "status": ["ok"] * n + ["failed"] * n_fail,
                "stage": [None] * n + ["ground"] * n_fail,
                "reason": [None] * n + ["no detection"] * n_fail,
                "source": [f"s3://bucket/{k}.jpg" for k in keys] + ["x"] * n_fail,
                "caption": ["a caption with some words"] * n + [None] * n_fail,
                "alt_text": [None] * (n + n_fail),
                "width": [512] * n + [None] * n_fail,
                "height": [384] * n + [None] * n_fail,
                "n_objects": [objs_per_sample] * n + [0] * n_fail,
                "image_ext": ["jpg"] * n + [None] * n_fail,
                "image_bytes": [50_000] * n + [None] * n_fail,
                "schema_version": [3] * (n + n_fail),
                "white_fraction": list(rng.uniform(0, 0.3, n).astype(np.float32)) + [None] * n_fail,
            },
            SAMPLE_SCHEMA,
        )
        m = n * objs_per_sample
        x0, y0 = rng.uniform(0, 0.7, m), rng.uniform(0, 0.7, m)
        x1, y1 = x0 + rng.uniform(0.05, 0.3, m), y0 + rng.uniform(0.05, 0.3, m)
        objects = with_schema(
            {
                "key": np.repeat(keys, objs_per_sample),
                "shard": [name] * m,
                "index": np.tile(np.arange(objs_per_sample), n).astype(np.int32),
                "label": rng.choice(LABELS, m, p=label_p),
                "phrase": ["phrase"] * m,
                "span_start": np.zeros(m, np.int32),
                "span_end": np.full(m, 6, np.int32),
                "tokens": [[2]] * m,
                "score": rng.uniform(0.25, 1.0, m).astype(np.float32),
                "x0": x0.astype(np.float32),
                "y0": y0.astype(np.float32),
                "x1": x1.astype(np.float32),
                "y1": y1.astype(np.float32),
                "area": ((x1 - x0) * (y1 - y0)).astype(np.float32),
                "aspect": ((x1 - x0) * 512 / ((y1 - y0) * 384)).astype(np.float32),
                "mask_area": ((x1 - x0) * (y1 - y0) * 0.7).astype(np.float32),
                "mask_fill": rng.uniform(0.3, 1.0, m).astype(np.float32),
                "containment": rng.uniform(0, 1, m).astype(np.float32),
                "mask_score": rng.uniform(0.5, 1.0, m).astype(np.float32),
            },
            OBJECT_SCHEMA,
        )
        pq.write_table(samples, out / f"{name}.samples.parquet")
        pq.write_table(objects, out / f"{name}.objects.parquet")
        (out / f"{name}.tar").write_bytes(b"")
        stats = {
            "shard": name,
            "successes": n,
            "failed": n_fail,
            "objects": m,
            "bytes": 0,
            "start_time": 0.0,
            "end_time": 1.0,
            "duration": 1.0,
        }
        (out / f"{name}_stats.json").write_text(json.dumps(stats))
    return n_shards


QUERIES = {
    "count by label": (
        "SELECT label, count(*) AS n FROM objects GROUP BY label ORDER BY n DESC LIMIT 20",
        lambda o, s: o.groupby("label").size().sort_values(ascending=False).head(20),
    ),
    "top objects by score, area and aspect filters": (
        "SELECT key, label, score, area FROM objects WHERE area BETWEEN 0.02 AND 0.5 "
        "AND aspect BETWEEN 0.5 AND 2 AND mask_fill > 0.5 ORDER BY score DESC LIMIT 100",
        lambda o, s: o[(o.area.between(0.02, 0.5)) & (o.aspect.between(0.5, 2)) & (o.mask_fill > 0.5)].nlargest(
            100, "score"
        )[["key", "label", "score", "area"]],
    ),
    "images with 2-8 good objects": (
        "SELECT key, count(*) AS n FROM objects WHERE score > 0.5 AND containment < 0.8 "
        "GROUP BY key HAVING n BETWEEN 2 AND 8",
        lambda o, s: (
            o[(o.score > 0.5) & (o.containment < 0.8)].groupby("key").size().pipe(lambda c: c[(c >= 2) & (c <= 8)])
        ),
    ),
}

SELECT_WHERE = "key IN (SELECT key FROM objects WHERE label = 'label000' AND score > 0.6 AND area > 0.05)"


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    ap.add_argument("--objects-per-sample", type=int, default=4)
    ap.add_argument("--out", default="/tmp/subjectdiff_catalog_bench")
    args = ap.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    n_shards = write_synthetic(out, args.objects, args.per_shard, args.objects_per_sample)
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    rep = catalog.build(out)
    t_build = time.perf_counter() - t0
    t_noop = timed(lambda: catalog.build(out))
    n_obj = catalog.query(out, "SELECT count(*) AS n FROM objects").column("n")[0].as_py()
    db_mb = catalog.catalog_path(out).stat().st_size / 2**20

    mem = duckdb.connect()
    mem.execute(f"CREATE VIEW objects AS SELECT * FROM read_parquet('{out}/*.objects.parquet')")
    t0 = time.perf_counter()
    pdo = pd.concat([pq.read_table(p).to_pandas() for p in sorted(out.glob("*.objects.parquet"))])
    t_pandas_load = time.perf_counter() - t0

    rows = []
    for name, (sql, pandas_fn) in QUERIES.items():
        rows.append(
            (
                name,
                timed(lambda sql=sql: catalog.query(out, sql)),
                timed(lambda sql=sql: mem.sql(sql).to_arrow_table()),
                timed(lambda pandas_fn=pandas_fn: pandas_fn(pdo, None)),
            )
        )
    sel_path = out / "selection.parquet"
    n_sel = selection.select(out, SELECT_WHERE, sel_path)
    t_sel = timed(lambda: selection.select(out, SELECT_WHERE, sel_path))

    print(
        f"# catalog benchmark: {n_obj:,} objects in {n_shards} shards "
        f"({platform.machine()}, {os.cpu_count()} cores, duckdb {duckdb.__version__}, "
        f"{time.strftime('%Y-%m-%d')})\n"
    )
    print(f"- synthetic sidecars written in {t_gen:.1f} s")
    print(f"- `catalog build` from scratch: {t_build:.2f} s ({rep.summary()}); catalog file {db_mb:.0f} MiB")
    print(f"- `catalog build` again, nothing changed: {t_noop:.3f} s")
    print(f"- pandas baseline load of all object sidecars: {t_pandas_load:.2f} s (not counted below)\n")
    print("| query | catalog (`catalog.query`, opens the DB) | DuckDB over Parquet sidecars | pandas in memory |")
    print("|---|---|---|---|")
    for name, a, b, c in rows:
        print(f"| {name} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {c * 1000:.0f} ms |")
    print(f"| selection of {n_sel:,} samples written to Parquet (`selection.select`) | {t_sel * 1000:.0f} ms | | |")
    print("\n(median of 3 runs each)")


if __name__ == "__main__":
    main()
