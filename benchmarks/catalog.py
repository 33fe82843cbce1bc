"""Catalog benchmark: build a catalog of synthetic objects (1M by default, 10M and 100M for issue #21) and time the
build, a no-op refresh, typical queries, `catalog select --object-where reference`, `catalog duplicates` and
`catalog stats`, each with its peak memory.

    python benchmarks/catalog.py [--objects 1000000] [--out /tmp/catalog_bench] [--reuse]
                                 [--memory-limit 6GB] [--temp-directory DIR] [--json results.json]

Synthetic shards are sidecars only (samples/objects Parquet with the writer's schemas, stats, an empty tar): the
catalog is built from sidecars, never from tars, so this measures exactly what a real build does. Samples carry
sha256 and phash with 1 % planted exact and near duplicates, so `catalog duplicates` has work to do.

Every measured step runs in its own process (this script with --phase), so its peak resident memory (VmHWM:
Python, Arrow and DuckDB together) is that step's alone. --memory-limit / --temp-directory reach DuckDB through
SUBJECTDIFF_DUCKDB_MEMORY_LIMIT / SUBJECTDIFF_DUCKDB_TEMP_DIRECTORY (--threads: SUBJECTDIFF_DUCKDB_THREADS), as they
would for a user; --phases runs only the steps it names. Each query runs
through `catalogs.catalog.query` (opening the read-only catalog each time, as the CLI does) and, side by side,
DuckDB straight over the Parquet sidecars (no catalog); up to 2M objects also pandas over the same files loaded
in memory. Prints Markdown; --json writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from subjectdiff.catalogs import catalog, duplicates, selection
from subjectdiff.catalogs.writer import OBJECT_SCHEMA, SAMPLE_SCHEMA

LABELS = [f"label{i:03d}" for i in range(400)]
PANDAS_MAX_OBJECTS = 2_000_000  # pandas holds every object row in memory: beyond this it is not a baseline


def with_schema(columns: dict, schema: pa.Schema) -> pa.Table:
    """The columns as a table of the writer's schema; the columns left out (curation signals) are nulls, as in
    shards made without the curate stage."""
    rows = len(next(iter(columns.values())))
    return pa.table({f.name: columns.get(f.name, [None] * rows) for f in schema}, schema=schema)


def hashes(rng: np.random.Generator, s: int, n: int) -> tuple[list[str], np.ndarray]:
    """(sha256 hex, phash int64) of N samples of shard S: unique, but 1 % repeat an earlier sample of the shard
    exactly (same sha256 and phash) and 1 % are near copies (phash two bits away)."""
    sha = [f"{s:08x}{i:056x}" for i in range(n)]
    ph = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    dup = rng.choice(n, max(1, n // 100), replace=False)
    near = rng.choice(n, max(1, n // 100), replace=False)
    for i in dup:
        j = int(rng.integers(0, n))
        sha[i], ph[i] = sha[j], ph[j]
    flip = np.int64(1) << rng.integers(0, 62, (len(near), 2)).astype(np.int64)
    ph[near] = ph[rng.integers(0, n, len(near))] ^ flip[:, 0] ^ flip[:, 1]
    return sha, ph


def shard_tables(rng: np.random.Generator, s: int, n: int, per_sample: int, label_p: np.ndarray):
    """(samples, objects) sidecar tables of shard S with N ok samples (1 % more failed ones)."""
    name = f"{s:05d}"
    keys = [f"{s:05d}{i:06d}" for i in range(n)]
    n_fail = max(1, n // 100)
    m = n * per_sample
    labels = np.asarray(LABELS)[rng.choice(len(LABELS), m, p=label_p)]
    first = labels[::per_sample]
    sha, ph = hashes(rng, s, n)
    samples = with_schema(
        {
            "key": keys + [f"f{s:05d}{i:05d}" for i in range(n_fail)],
            "shard": [name] * (n + n_fail),
            "status": ["ok"] * n + ["failed"] * n_fail,
            "stage": [None] * n + ["ground"] * n_fail,
            "reason": [None] * n + ["no detection"] * n_fail,
            "source": [f"s3://bucket/{k}.jpg" for k in keys] + ["x"] * n_fail,
            "caption": [f"a photo of a {lab} on a table" for lab in first] + [None] * n_fail,
            "alt_text": [None] * (n + n_fail),
            "width": [512] * n + [None] * n_fail,
            "height": [384] * n + [None] * n_fail,
            "n_objects": [per_sample] * n + [0] * n_fail,
            "image_ext": ["jpg"] * n + [None] * n_fail,
            "image_bytes": [50_000] * n + [None] * n_fail,
            "schema_version": [4] * (n + n_fail),
            "sha256": sha + [None] * n_fail,
            "phash": list(ph) + [None] * n_fail,
            "white_fraction": list(rng.uniform(0, 0.3, n).astype(np.float32)) + [None] * n_fail,
        },
        SAMPLE_SCHEMA,
    )
    x0, y0 = rng.uniform(0, 0.7, m), rng.uniform(0, 0.7, m)
    x1, y1 = x0 + rng.uniform(0.05, 0.3, m), y0 + rng.uniform(0.05, 0.3, m)
    area = (x1 - x0) * (y1 - y0)
    objects = with_schema(
        {
            "key": np.repeat(keys, per_sample),
            "shard": [name] * m,
            "index": np.tile(np.arange(per_sample), n).astype(np.int32),
            "label": labels,
            "phrase": labels,
            "span_start": np.zeros(m, np.int32),
            "span_end": np.full(m, 8, np.int32),
            "tokens": [[5]] * m,
            "score": rng.uniform(0.25, 1.0, m).astype(np.float32),
            "x0": x0.astype(np.float32),
            "y0": y0.astype(np.float32),
            "x1": x1.astype(np.float32),
            "y1": y1.astype(np.float32),
            "area": area.astype(np.float32),
            "aspect": ((x1 - x0) * 512 / ((y1 - y0) * 384)).astype(np.float32),
            "mask_area": (area * 0.7).astype(np.float32),
            "mask_fill": rng.uniform(0.3, 1.0, m).astype(np.float32),
            "containment": rng.uniform(0, 1, m).astype(np.float32),
            "mask_score": rng.uniform(0.5, 1.0, m).astype(np.float32),
        },
        OBJECT_SCHEMA,
    )
    return samples, objects, n_fail


def write_synthetic(out: Path, n_objects: int, per_shard: int, per_sample: int, seed: int = 0) -> int:
    """Shards of synthetic sidecars in OUT holding N_OBJECTS objects; returns the number of shards."""
    rng = np.random.default_rng(seed)
    n_samples = n_objects // per_sample
    n_shards = (n_samples + per_shard - 1) // per_shard
    label_p = 1.0 / np.arange(1, len(LABELS) + 1)
    label_p /= label_p.sum()  # Zipf-like label frequencies, as real nouns have
    for s in range(n_shards):
        name = f"{s:05d}"
        n = min(per_shard, n_samples - s * per_shard)
        samples, objects, n_fail = shard_tables(rng, s, n, per_sample, label_p)
        pq.write_table(samples, out / f"{name}.samples.parquet")
        pq.write_table(objects, out / f"{name}.objects.parquet")
        (out / f"{name}.tar").write_bytes(b"")
        stats = {"shard": name, "successes": n, "failed": n_fail, "objects": n * per_sample, "bytes": 0}
        stats.update({"start_time": 0.0, "end_time": 1.0, "duration": 1.0})
        (out / f"{name}_stats.json").write_text(json.dumps(stats))
        if s % 1000 == 999:
            print(f"  wrote {s + 1:,}/{n_shards:,} shards", file=sys.stderr, flush=True)
    return n_shards


QUERIES = {
    "count by label": (
        "SELECT label, count(*) AS n FROM objects GROUP BY label ORDER BY n DESC LIMIT 20",
        lambda o: o.groupby("label").size().sort_values(ascending=False).head(20),
    ),
    "top objects by score, area and aspect filters": (
        "SELECT key, label, score, area FROM objects WHERE area BETWEEN 0.02 AND 0.5 "
        "AND aspect BETWEEN 0.5 AND 2 AND mask_fill > 0.5 ORDER BY score DESC LIMIT 100",
        lambda o: o[(o.area.between(0.02, 0.5)) & (o.aspect.between(0.5, 2)) & (o.mask_fill > 0.5)].nlargest(
            100, "score"
        )[["key", "label", "score", "area"]],
    ),
    "images with 2-8 good objects": (
        "SELECT key, count(*) AS n FROM objects WHERE score > 0.5 AND containment < 0.8 "
        "GROUP BY key HAVING n BETWEEN 2 AND 8",
        lambda o: (
            o[(o.score > 0.5) & (o.containment < 0.8)].groupby("key").size().pipe(lambda c: c[(c >= 2) & (c <= 8)])
        ),
    ),
}
# The same questions asked of the catalog's integer sample_id instead of its string keys (catalog version 6): the
# catalog's design for per-sample joins and groups. Sidecars have no sample_id: catalog only.
BY_SAMPLE_ID = {
    "images with 2-8 good objects, by sample_id": (
        "SELECT sample_id, count(*) AS n FROM objects WHERE score > 0.5 AND containment < 0.8 "
        "GROUP BY sample_id HAVING n BETWEEN 2 AND 8"
    ),
    "reference objects per sample, samples joined on (key, shard)": (
        'SELECT key, shard, list("index" ORDER BY "index") FROM (SELECT objects.*, samples.caption, '
        "samples.width, samples.height, samples.white_fraction FROM objects JOIN samples USING (key, shard)) "
        "WHERE {ref} GROUP BY key, shard"
    ),
    "reference objects per sample, samples joined on sample_id": (
        'SELECT sample_id, list("index" ORDER BY "index") FROM (SELECT objects.*, samples.caption, '
        "samples.width, samples.height, samples.white_fraction FROM objects JOIN samples USING (sample_id)) "
        "WHERE {ref} GROUP BY sample_id"
    ),
}

SELECT_WHERE = "key IN (SELECT key FROM objects WHERE label = 'label000' AND score > 0.6 AND area > 0.05)"
SELECT_WHERE_ID = SELECT_WHERE.replace("key", "sample_id")  # the same samples, found by sample_id


def timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_phase(name: str, out: Path) -> dict:
    """One measured step, in this process: {"seconds", "peak_rss_mib", ...}."""
    extra: dict = {}
    if name == "build":
        catalog.catalog_path(out).unlink(missing_ok=True)
        t0 = time.perf_counter()
        rep = catalog.build(out)
        seconds = time.perf_counter() - t0
        extra = {"summary": rep.summary(), "catalog_mib": catalog.catalog_path(out).stat().st_size / 2**20}
    elif name == "refresh":
        seconds = timed(lambda: catalog.build(out))
    elif name.startswith("query:"):
        sql = QUERIES[name[6:]][0] if name[6:] in QUERIES else BY_SAMPLE_ID[name[6:]]
        sql = sql.format(ref=selection.REFERENCE_OBJECT_WHERE)
        seconds = timed(lambda: catalog.query(out, sql))
    elif name.startswith("duckdb:"):
        sql = QUERIES[name[7:]][0]
        con = duckdb.connect()
        con.execute(f"CREATE VIEW objects AS SELECT * FROM read_parquet('{out}/*.objects.parquet')")
        seconds = timed(lambda: con.sql(sql).to_arrow_table())
    elif name.startswith("pandas:"):
        fn = QUERIES[name[7:]][1]
        frame = pd.concat([pq.read_table(p).to_pandas() for p in sorted(out.glob("*.objects.parquet"))])
        seconds = timed(lambda: fn(frame))
    elif name == "stats":
        seconds = timed(lambda: catalog.stats(out), repeat=1)
    elif name in ("select", "select by sample_id"):
        path, where = out / "selection.parquet", SELECT_WHERE if name == "select" else SELECT_WHERE_ID
        extra["samples"] = selection.select(out, where, path)
        seconds = timed(lambda: selection.select(out, where, path), repeat=1)
    elif name == "select reference":
        path = out / "selection_reference.parquet"
        t0 = time.perf_counter()
        extra["samples"] = selection.select(out, None, path, object_where=selection.REFERENCE_OBJECT_WHERE)
        seconds = time.perf_counter() - t0
    elif name == "duplicates":
        t0 = time.perf_counter()
        groups = duplicates.find_duplicates(out, out / "dups.parquet")
        seconds = time.perf_counter() - t0
        extra["rows"] = groups.num_rows
    else:
        raise SystemExit(f"unknown phase {name!r}")
    return {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), **extra}


def measure(name: str, out: Path, env: dict) -> dict:
    """run_phase NAME in a child process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--phase", name, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"phase {name} failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name}: {got['seconds']:.3f} s, peak {got['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    return got


def prepare(out: Path, args) -> tuple[int, float | None]:
    """The synthetic shards in OUT (kept with --reuse when they were made with the same sizes): (shards, s)."""
    params = {"objects": args.objects, "per_shard": args.per_shard, "per_sample": args.objects_per_sample}
    marker = out / "_synthetic.json"
    if args.reuse and marker.exists() and json.loads(marker.read_text())["params"] == params:
        return json.loads(marker.read_text())["shards"], None
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    n_shards = write_synthetic(out, args.objects, args.per_shard, args.objects_per_sample)
    marker.write_text(json.dumps({"params": params, "shards": n_shards}))
    return n_shards, time.perf_counter() - t0


def report(res: dict) -> str:
    """The Markdown of one run's figures."""
    m = res["phases"]
    mib = lambda p: f"{m[p]['peak_rss_mib']:,.0f} MiB"
    lines = [
        f"# catalog benchmark: {res['objects']:,} objects, {res['samples']:,} samples, {res['shards']:,} shards "
        f"({res['machine']}, duckdb {res['duckdb']}, {res['date']}; memory limit {res['memory_limit'] or 'default'})",
        "",
        f"- `catalog build` from scratch: {m['build']['seconds']:.1f} s, peak {mib('build')}; "
        f"catalog file {m['build']['catalog_mib']:,.0f} MiB ({m['build']['summary']})",
        f"- `catalog build` again, nothing changed: {m['refresh']['seconds']:.2f} s, peak {mib('refresh')}",
        "",
        "| step | catalog | peak memory | DuckDB over the sidecars | pandas in memory |",
        "|---|---|---|---|---|",
    ]
    ms = lambda phase: "" if phase not in m else f"{m[phase]['seconds'] * 1000:,.0f} ms"
    for q in QUERIES:
        lines.append(f"| {q} | {ms(f'query:{q}')} | {mib(f'query:{q}')} | {ms(f'duckdb:{q}')} | {ms(f'pandas:{q}')} |")
    for q in BY_SAMPLE_ID:
        lines.append(f"| {q} | {ms(f'query:{q}')} | {mib(f'query:{q}')} | | |")
    for step, label in (
        ("select", '`catalog select --where "key IN (...)"` ({} samples)'),
        ("select by sample_id", '`catalog select --where "sample_id IN (...)"` ({} samples)'),
        ("select reference", "`catalog select --object-where reference` ({} samples)"),
        ("duplicates", "`catalog duplicates` ({} rows)"),
        ("stats", "`catalog stats`{}"),
    ):
        count = m[step].get("samples", m[step].get("rows"))
        name = label.format("" if count is None else f"{count:,}")
        lines.append(f"| {name} | {m[step]['seconds'] * 1000:,.0f} ms | {mib(step)} | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    ap.add_argument("--objects-per-sample", type=int, default=4)
    ap.add_argument("--out", default="/tmp/subjectdiff_catalog_bench")
    ap.add_argument("--reuse", action="store_true", help="keep the synthetic shards of an earlier run of the same size")
    ap.add_argument("--memory-limit", help="DuckDB's memory_limit for every step (e.g. 6GB)")
    ap.add_argument("--temp-directory", help="where DuckDB spills beyond the memory limit")
    ap.add_argument("--threads", type=int, help="DuckDB's threads for every step (default: one a core)")
    ap.add_argument(
        "--phases",
        help="only these steps, separated by ';' (e.g. 'query:count by label;select'), on the "
        "catalog an earlier run built (with --reuse)",
    )
    ap.add_argument("--json", help="also write the raw figures here")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    if args.phase:
        print(json.dumps(run_phase(args.phase, out)))
        return

    n_shards, t_gen = prepare(out, args)
    env = dict(os.environ)
    for var, value in (
        ("MEMORY_LIMIT", args.memory_limit),
        ("TEMP_DIRECTORY", args.temp_directory),
        ("THREADS", args.threads),
    ):
        if value:
            env[f"SUBJECTDIFF_DUCKDB_{var}"] = str(value)
    if args.phases:  # single steps on a catalog already built: no report, a JSON line each
        for p in args.phases.split(";"):
            print(json.dumps({p: measure(p, out, env)}))
        return
    phases = ["build", "refresh", *(f"query:{q}" for q in [*QUERIES, *BY_SAMPLE_ID]), *(f"duckdb:{q}" for q in QUERIES)]
    if args.objects <= PANDAS_MAX_OBJECTS:
        phases += [f"pandas:{q}" for q in QUERIES]
    phases += ["select", "select by sample_id", "select reference", "duplicates", "stats"]
    res = {
        "objects": args.objects,
        "samples": args.objects // args.objects_per_sample,
        "shards": n_shards,
        "synthetic_seconds": t_gen,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "duckdb": duckdb.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "memory_limit": args.memory_limit,
        "phases": {p: measure(p, out, env) for p in phases},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(report(res))


if __name__ == "__main__":
    main()
