"""Curation benchmark (issue #13): the near-duplicate search over 64-bit hashes, and the curate stage's speed.

    python benchmarks/curation.py search --hashes 1000000 10000000     # banded search in DuckDB, two threads
    python benchmarks/curation.py search --hashes 1000000 --groups     # + duplicate_groups over a samples table
    python benchmarks/curation.py stage --size tiny --images 8          # Curator images/s, batched vs one at a time
    python benchmarks/curation.py stage --size full --images 4          # ViT-L-14 at random weights (no download)

search: N synthetic int64 hashes, uniform, of which --planted are copies of others with 1..D random bits
flipped (D = --max-distance). `catalogs.duplicates.near_pairs` runs on an in-memory DuckDB connection with
--threads threads and --memory-limit (spilling to --temp-directory beyond it). Recall is measured twice:
over the planted pairs, and against brute force (numpy xor + popcount over all N) for --queries sampled
hashes, half planted, half not. Each size runs in its own process, so "peak RSS" is that run's alone
(numpy's arrays and DuckDB's memory together).

stage: scikit-image photos with fixed captions, alt texts and three masked objects each; "batched" is one
call over every image (batch_size = --images), "single" one call per image (batch_size = 1), each the best
of --repeats alternating timed runs after a warm-up, as benchmarks/stages.py times the other stages.

Prints markdown rows; --out appends them to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subjectdiff.catalogs import duplicates, hashing


def machine() -> str:
    return f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), load {os.getloadavg()[0]:.1f}"


# ------------------------------------------------------------------------------------------------- search


def synthetic(n: int, planted: int, max_d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes (n,) int64, sources (planted,), copies (planted,)): n - planted uniform hashes, then a copy of
    `planted` of them with 1..max_d distinct random bits flipped."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64, n - planted, dtype=np.uint64, endpoint=False)
    src = base[rng.choice(n - planted, planted, replace=False)]
    d = rng.integers(1, max_d + 1, planted)
    order = rng.random((planted, 64)).argsort(axis=1)  # a random bit order per copy; its first d bits flip
    flips = np.zeros(planted, np.uint64)
    for k in range(max_d):
        flips |= np.where(d > k, np.uint64(1) << order[:, k].astype(np.uint64), np.uint64(0))
    copies = src ^ flips
    return np.concatenate([base, copies]).view(np.int64), src.view(np.int64), copies.view(np.int64)


def brute_force_recall(
    distinct: np.ndarray, found: set[tuple[int, int]], queries: list[int], max_d: int
) -> tuple[int, int]:
    """(found, expected) pairs within max_d that touch the query hashes, by comparing each with all."""
    u = distinct.view(np.uint64)
    expected = hit = 0
    for q in queries:
        near = distinct[np.bitwise_count(u ^ np.uint64(q & hashing.MASK64)) <= max_d]
        for v in near.tolist():
            if v == q:
                continue
            expected += 1
            hit += (min(q, v), max(q, v)) in found
    return hit, expected


def search_one(args) -> dict:
    """One size, in this process: the numbers of one row."""
    n, D = args.n, args.max_distance
    hashes, src, copies = synthetic(n, args.planted, D)
    con = duplicates.connect(memory_limit=args.memory_limit, temp_directory=args.temp_directory, threads=args.threads)
    distinct = np.unique(hashes)
    plan = duplicates.plan_bands(len(distinct), D, bands=args.bands)
    t = time.perf_counter()
    pairs = duplicates.near_pairs(con, hashes, max_distance=D, plan=plan)
    search_s = time.perf_counter() - t
    found = set(zip(pairs["a"].to_numpy().tolist(), pairs["b"].to_numpy().tolist()))
    planted_hit = sum((min(a, b), max(a, b)) in found for a, b in zip(src.tolist(), copies.tolist()))
    rng = np.random.default_rng(1)
    q = np.concatenate(
        [
            rng.choice(src, args.queries // 2, replace=False),
            rng.choice(distinct, args.queries - args.queries // 2, replace=False),
        ]
    )
    bf_hit, bf_expected = brute_force_recall(distinct, found, q.tolist(), D)
    row = dict(
        n=n,
        D=D,
        plan=plan.describe(),
        tables=len(plan.masks),
        search_s=search_s,
        pairs=pairs.num_rows,
        planted=args.planted,
        planted_recall=planted_hit / args.planted,
        bf_hit=bf_hit,
        bf_expected=bf_expected,
        queries=len(q),
    )
    if args.groups:
        row.update(groups_one(con, hashes, args))
    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def groups_one(con, hashes: np.ndarray, args) -> dict:
    """duplicate_groups end to end over a samples table like the catalog's: 1 % of the samples are exact
    copies (same sha256 and phash) of others, besides the planted near pairs."""
    import pyarrow as pa

    n = len(hashes)
    rng = np.random.default_rng(2)
    sha = np.arange(n, dtype=np.int64)
    dup = rng.choice(n, n // 100, replace=False)
    orig = rng.choice(n, n // 100, replace=False)
    sha[dup], hashes = sha[orig], hashes.copy()
    hashes[dup] = hashes[orig]
    # the string columns are made by DuckDB: 10M Python strings would dwarf what is measured
    con.register("hashes_arrow", pa.table({"i": np.arange(n), "sha": sha, "phash": hashes}))
    con.execute("""CREATE TABLE samples AS SELECT printf('%020x', i) AS key, printf('%05d', i // 10000) AS shard,
                   's3://bucket/images/' || i || '.jpg' AS source, printf('%064x', sha) AS sha256, phash
                   FROM hashes_arrow""")
    con.unregister("hashes_arrow")
    t = time.perf_counter()
    groups = duplicates.duplicate_groups(con, "samples", max_distance=args.max_distance, bands=args.bands)
    return dict(
        groups_s=time.perf_counter() - t, group_rows=groups.num_rows, n_groups=len(set(groups["group_id"].to_pylist()))
    )


def run_search(args) -> list[str]:
    rows = []
    for n in args.hashes:
        cmd = [sys.executable, __file__, "_search_child", "--n", str(n)] + child_args(args)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        bf = (
            f"{r['bf_hit'] / r['bf_expected']:.4f} ({r['bf_hit']}/{r['bf_expected']} pairs, {r['queries']} queries)"
            if r["bf_expected"]
            else "n/a"
        )
        extra = f" | {r['groups_s']:.1f} s ({r['n_groups']} groups, {r['group_rows']} rows)" if "groups_s" in r else ""
        rows.append(
            f"| {n:,} | {r['D']} | {r['plan']} | {r['search_s']:.1f} s | {r['pairs']:,} | "
            f"{r['planted_recall']:.4f} ({r['planted']:,} planted) | {bf} | {r['peak_rss_gb']:.2f} GB{extra} |"
        )
        print(rows[-1], flush=True)
    head = "| hashes | D | band plan | search | pairs found | recall, planted | recall vs brute force | peak RSS" + (
        " | duplicate_groups, samples table |" if args.groups else " |"
    )
    sep = "|---" * (8 + bool(args.groups)) + "|"
    cmd = " ".join(["python benchmarks/curation.py search --hashes", *map(str, args.hashes)] + child_args(args))
    return [
        f"\n## near-duplicate search, {machine()}\n",
        f"- command: `{cmd}`",
        f"- {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; DuckDB threads {args.threads}, memory_limit "
        f"{args.memory_limit}, uniform random hashes; recall is exact by construction (pigeonhole), measured here",
        "",
        head,
        sep,
        *rows,
    ]


def child_args(args) -> list[str]:
    out = [
        "--max-distance",
        str(args.max_distance),
        "--planted",
        str(args.planted),
        "--queries",
        str(args.queries),
        "--threads",
        str(args.threads),
        "--memory-limit",
        args.memory_limit,
        "--temp-directory",
        args.temp_directory,
    ]
    if args.bands:
        out += ["--bands", str(args.bands)]
    if args.groups:
        out.append("--groups")
    return out


# -------------------------------------------------------------------------------------------------- stage

CAPTIONS = (
    "an astronaut in a white suit holding a helmet",
    "a cat lying on a rug",
    "a cup of coffee on a saucer",
    "a rocket on a launchpad under the sky",
)
OBJECTS = [("person", (0.1, 0.05, 0.9, 1.0)), ("cup", (0.55, 0.6, 0.95, 0.98)), ("dog", (0.0, 0.0, 0.35, 0.45))]


def stage_items(n: int) -> list[dict]:
    from stages import PHOTOS, photo_item  # benchmarks/stages.py: the same photos as the other stages' rows

    from subjectdiff.catalogs import masks as mask_codec

    out = []
    for i in range(n):
        it = photo_item(i, alt_text=f"stock photo {PHOTOS[i % len(PHOTOS)]}")
        h, w = it["image"].shape[:2]
        it["caption"] = CAPTIONS[i % len(CAPTIONS)]
        it["nouns"] = [{"label": lb} for lb, _ in OBJECTS]
        it["detections"] = [{"box": list(b), "score": 0.9, "noun": j} for j, (_, b) in enumerate(OBJECTS)]
        masks = []
        for _, (x0, y0, x1, y1) in OBJECTS:
            m = np.zeros((h, w), bool)
            m[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = True
            masks.append(mask_codec.encode(m))
        it["masks"] = masks
        out.append(it)
    return out


def run_stage(args) -> list[str]:
    import torch

    from subjectdiff.datagen import config
    from subjectdiff.datagen.stages.curate import Curator

    t0 = time.perf_counter()
    if args.size == "tiny":
        cfg = config.tiny().curate
        cfg.device, cfg.dtype = args.device, args.dtype or cfg.dtype
        stage = Curator(cfg)
        what = "tiny open_clip (32-d ViT, 64 px) + tiny MLP aesthetic head"
    else:
        import open_clip

        cfg = config.full_random().curate
        cfg.device, cfg.dtype = args.device, args.dtype or cfg.dtype
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)  # from its config
        from subjectdiff.datagen.stages.architectures import AestheticMLP

        stage = Curator(cfg, model=model, aesthetic_head=AestheticMLP(768))
        what = "ViT-L-14 (quick_gelu) at random weights, 224 px, + MLP aesthetic head (768-d)"
    build_s = time.perf_counter() - t0
    n = args.images
    base = stage_items(n)

    def inputs():
        return [{**it, "detections": [dict(d) for d in it["detections"]]} for it in base]

    stage(inputs()[:1])  # warm-up
    best_b = best_s = float("inf")
    for _ in range(args.repeats):
        stage.cfg.batch_size = n
        items = inputs()
        t = time.perf_counter()
        stage(items)
        best_b = min(best_b, time.perf_counter() - t)
        stage.cfg.batch_size = 1
        items = inputs()
        t = time.perf_counter()
        for it in items:
            stage([it])
        best_s = min(best_s, time.perf_counter() - t)
    b, s = n / best_b, n / best_s
    dev = torch.cuda.get_device_name(stage.device) if stage.device.type == "cuda" else f"CPU, {machine()}"
    dtype = str(stage.dtype).replace("torch.", "")
    row = f"| {args.size} | {n} | {len(OBJECTS)} | {dtype} | {b:.3g} | {s:.3g} | {b / s:.2f}x |"
    print(row, flush=True)
    return [
        f"\n## curate stage, size={args.size}, {n} images, {dev}\n",
        f"- command: `python benchmarks/curation.py stage --size {args.size} --images {n} --device {args.device} "
        f"--repeats {args.repeats}{f' --dtype {args.dtype}' if args.dtype else ''}`",
        f"- {what}; torch {torch.__version__}, {torch.get_num_threads()} threads; model build {build_s:.1f} s; "
        f"one image forward + one per object crop, captions and alt texts; best of {args.repeats}",
        "",
        "| size | images | objects/image | dtype | batched img/s | one-at-a-time img/s | speed-up |",
        "|---|---|---|---|---|---|---|",
        row,
    ]


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["search", "stage", "_search_child"])
    ap.add_argument("--hashes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-distance", type=int, default=duplicates.DEFAULT_MAX_DISTANCE)
    ap.add_argument("--bands", type=int, default=None, help="force the band count (default: plan_bands picks)")
    ap.add_argument("--planted", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-limit", default="8GB")
    ap.add_argument("--temp-directory", default="/tmp/subjectdiff-dedup-spill")
    ap.add_argument("--groups", action="store_true", help="also time duplicate_groups over a samples table")
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    args = ap.parse_args(argv)
    if args.part == "_search_child":
        print(json.dumps(search_one(args)))
        return
    lines = run_search(args) if args.part == "search" else run_stage(args)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
