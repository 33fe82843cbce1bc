"""Pairs benchmark (issue #20): retrieval pairing (catalogs.pairs.retrieval_parts, merge_parts, write_pairs: what
`catalog pairs --method retrieval` runs after reading the catalog) over synthetic identity
embeddings, against brute force on a sample; and, with --video, the video side (decode, shot detection and frame
sampling, frames per second per core: benchmarks/video_decode.py, which it runs with the arguments that follow).

    python benchmarks/pairs.py --objects 1000000 --num-cpus 2
    python benchmarks/pairs.py --objects 10000000 --num-cpus 2 --dim 32
    python benchmarks/pairs.py --video [--seconds 20 --size 640x360 --shots 10]

Synthetic embeddings: --labels labels of equal size; within each, identities of ~--per-identity objects (a
random unit centre each, dimension --dim, reduced from DINOv2's 768 to fit this machine), each object its
identity's centre plus Gaussian noise (--noise per dimension, relative to the centre's norm), L2-normalized and
stored float16 as the identity sidecar stores them. Every object has its own source and a random phash, and
min_sim / min_phash are off, so the pairs are exactly each object's --k nearest neighbours of its label (both
directions): what recall@k measures.

Recall@k: for --queries objects sampled at random, the exact k nearest (numpy, float32, over the object's
label, itself left out) against the k most similar targets the pairs give the object as reference (its own
neighbours and the objects that had it as a neighbour: the pairs file's contents). Time: from the float16 array
to the pairs file written (each label's task writes its part, this process merges them into pairs.parquet in a
temporary folder, keys "000000042" standing for the records'), Ray's start included (Ray started here with
--num-cpus CPUs). CPU
seconds: the user + system time of this process and its children over the same span (on two idle cores the wall time
is about half of it when both are kept busy; on a machine shared with other work the wall time is longer). Peak
memory: the largest sum of the RSS of this process and its children (Ray's workers, raylet and object
store), sampled every 0.2 s, beside this process's own peak (ru_maxrss: the driver, which holds the embeddings,
the objects table and one merge batch, never the pairs). The split: when each label's task finished.

Prints markdown lines; --out appends them to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from subjectdiff.catalogs.pairs import PairConfig, merge_parts, pair_rows, retrieval_parts, write_pairs
from subjectdiff.catalogs.storage import Folder


def machine() -> str:
    return f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), load {os.getloadavg()[0]:.1f}"


def synthetic(n: int, labels: int, per_identity: int, dim: int, noise: float, seed: int = 0):
    """(emb (n, dim) float16 L2-normalized, labels (n,) int, identity (n,) int), generated in blocks."""
    rng = np.random.default_rng(seed)
    n_ident = max(1, n // per_identity)
    centres = rng.standard_normal((n_ident, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ident = rng.integers(0, n_ident, n)
    label = ident % labels  # an identity's objects share its label
    emb = np.empty((n, dim), np.float16)
    for s in range(0, n, 1 << 20):
        block = centres[ident[s : s + (1 << 20)]]
        block = block + noise / np.sqrt(dim) * rng.standard_normal(block.shape, dtype=np.float32)
        emb[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return emb, label.astype(np.int64), ident


class PeakRSS:
    """The largest RSS of this process plus its descendants, sampled every `every` seconds in a thread, and the
    CPU seconds they used (each process's last sampled user + system time, this process's since the start)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.cpu: dict[int, float] = {}
        me = psutil.Process()
        self.start_cpu = sum(me.cpu_times()[:2])
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    self.cpu[p.pid] = sum(p.cpu_times()[:2])
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values()) - self.start_cpu

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def recall_at_k(emb, labels, a, b, sim, k: int, queries: int, seed: int = 1) -> float:
    """Mean over sampled objects of |the k best pairs' targets & the exact k nearest of its label| / k."""
    rng = np.random.default_rng(seed)
    qs = np.sort(rng.choice(len(emb), queries, replace=False))
    hits = 0
    for label in np.unique(labels[qs]):
        same = np.flatnonzero(labels == label)
        mine = qs[labels[qs] == label]
        pool = emb[same].astype(np.float32)
        tops = []
        for c in range(0, len(mine), 32):  # 32 queries at a time: (32, objects of the label) similarities
            sims = emb[mine[c : c + 32]].astype(np.float32) @ pool.T
            sims[np.arange(len(sims)), np.searchsorted(same, mine[c : c + 32])] = -np.inf  # not itself
            tops.append(same[np.argpartition(-sims, k, axis=1)[:, :k]])
        for q, exact in zip(mine, np.concatenate(tops)):
            s, e = np.searchsorted(a, q), np.searchsorted(a, q, side="right")
            got = b[s:e][np.argsort(-sim[s:e], kind="stable")[:k]]
            hits += len(set(exact.tolist()) & set(got.tolist()))
    return hits / (k * queries)


def run(args: argparse.Namespace, n: int) -> str:
    t0 = time.monotonic()
    emb, labels, _ = synthetic(n, args.labels, args.per_identity, args.dim, args.noise)
    gen = time.monotonic() - t0
    origin = np.arange(n)
    phash = np.random.default_rng(2).integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    cfg = PairConfig(
        min_sim=-1.0, min_phash=0, k=args.k, search_k=args.k + 1, index=args.index, nprobe=args.nprobe,
        num_cpus=args.num_cpus, brute_force_max=args.brute_force_max,
    )  # fmt: skip
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (n, 1))
    objects = pa.table(
        {
            "key": pa.array([f"{i:09d}" for i in range(n)], pa.string()),
            "index": pa.array(np.zeros(n, np.int32)),
            "label": pa.array(labels.astype(str)),
        }
    )
    finished = []
    with tempfile.TemporaryDirectory() as tmp:
        out, staging = Path(tmp) / "pairs.parquet", Folder(Path(tmp) / "pairs.parquet.parts")
        t0 = time.monotonic()
        with PeakRSS() as mem:
            parts = retrieval_parts(
                emb, labels, origin, phash, boxes, cfg, staging,
                progress=lambda d, t, u: finished.append((time.monotonic() - t0, d)),
            )  # fmt: skip
            rows = write_pairs((pair_rows(objects, t, "retrieval") for t in merge_parts(staging, parts, n)), out)
        took = time.monotonic() - t0
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB: the pairing's, before recall
        del objects
        got = pq.read_table(out, columns=["ref_key", "target_key", "similarity"])
    a = pc.cast(got["ref_key"], pa.int64()).to_numpy()
    b = pc.cast(got["target_key"], pa.int64()).to_numpy()
    sim = got["similarity"].to_numpy()
    del got
    recall = recall_at_k(emb, labels, a, b, sim, args.k, args.queries)
    index = f"ivf nprobe {args.nprobe}" if args.index == "ivf" else "hnsw (32 links, efSearch 64)"
    split = ", ".join(f"{t:.0f}s:{d // 1000}k" for t, d in finished)
    return (
        f"| {n:,} | {args.dim} | {args.labels} | {index} | {args.num_cpus} | {took:.1f} s "
        f"({mem.cpu_seconds():.0f} CPU s) "
        f"| {recall:.3f} | {mem.peak / 2**30:.2f} GiB (driver {own:.2f} GiB) | {rows:,} |\n"
        f"\n  labels finished (time since start: objects done): {split}; synthetic data {gen:.1f} s; {machine()}, "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
    )


def main() -> None:
    if sys.argv[1:2] == ["--video"]:  # the video side is its own script (one core, its own table)
        import subprocess

        video = Path(__file__).with_name("video_decode.py")
        raise SystemExit(subprocess.call([sys.executable, str(video), *sys.argv[2:]]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--per-identity", type=int, default=20)
    p.add_argument("--noise", type=float, default=0.6)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index", default="ivf", choices=["ivf", "hnsw"])
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--brute-force-max", type=int, default=8192)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    head = (
        "| objects | dim | labels | index | Ray CPUs | time (CPU seconds, all processes) | recall@10 "
        "| peak RSS (all processes) | pair rows |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    print(head, end="", flush=True)
    lines = head
    for n in args.objects:
        line = run(args, n)
        print(line, end="", flush=True)
        lines += line
    if args.out:
        with args.out.open("a") as f:
            f.write(lines + "\n")


if __name__ == "__main__":
    main()
