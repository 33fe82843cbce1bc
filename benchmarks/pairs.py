"""Pairs benchmark (issues #20, #21): `find_pairs(ROOT, "retrieval", ...)` from files (identity sidecars and the
catalog in, pairs.parquet out) over synthetic identity embeddings, today's path against the one before the shuffle,
with recall against brute force on a sample; and, with --video, the video side (decode, shot detection and frame
sampling, frames per second per core: benchmarks/video_decode.py, which it runs with the arguments that follow).

    python benchmarks/pairs.py --objects 1000000 --num-cpus 2 [--path old new] [--root DIR --reuse]
    python benchmarks/pairs.py --objects 10000000 --labels 100 --num-cpus 2 --path new
    python benchmarks/pairs.py --objects 1048576 --labels 10 --reduce-tasks 1 --path old new --old-commit REV
    python benchmarks/pairs.py --method video --objects 1000000 --frames 20 --old-commit REV
    python benchmarks/pairs.py --video [--seconds 20 --size 640x360 --shots 10]

Synthetic embeddings: --labels labels of equal size; within each, identities of ~--per-identity objects (a
random unit centre each, dimension --dim, reduced from DINOv2's 768 to fit this machine), each object its
identity's centre plus Gaussian noise (--noise per dimension, relative to the centre's norm), L2-normalized and
stored float16 as the identity sidecar stores them. Every object has its own source and a random phash, and
min_sim / min_phash are off, so the pairs are exactly each object's --k nearest neighbours of its label (both
directions): what recall@k measures.

Files: synthetic shards in --root (default a temporary folder, removed; --reuse keeps a --root that has its catalog
and reuses it): samples and objects sidecars with the writer's schemas (as benchmarks/catalog.py writes them: one
object a sample, key "000000042" for object 42, --shard-objects objects a shard, empty tars), identity sidecars of
the embeddings, then `catalog build`.

--method video: `find_pairs(ROOT, "video", ...)` over the same embeddings as frames of videos (--frames objects a
video, one object a frame, a video's objects of one label), so every two frames of a video pair; no recall, the
old and new files compared instead (with --old-commit the commit before video pairs were shuffled).

Paths (--path, each run in its own process, so its peak memory is its own): `new` is catalogs.pairs as it is
(plan from footers and the catalog; map and reduce tasks; merge: the caller holds no embedding); `old` is
catalogs/pairs.py of --old-commit (default OLD_COMMIT, fa56b56, before the shuffle: the caller reads every
embedding and the whole objects table; or, say, the commit before a change to the shuffle), loaded from git
into a temporary module that Ray's workers import too. --reduce-tasks sets REDUCE_TASKS of both: with 1, a run of
2^20 objects has the reduce task of a 100M run (a bucket of 2^20 objects), so the two paths' task memory compares
in minutes. Both start Ray here with --num-cpus CPUs (more than
LOCAL_OBJECTS objects, or labels of more than --brute-force-max).

Time: find_pairs, from the files to the pairs file written (not the load into the catalog, the same for both),
Ray's start included. CPU seconds: the user + system time of that process and its children (Ray's workers,
raylet and object store) over the same span (on two idle cores the wall time is about half of it when both are
kept busy; on a machine shared with other work the wall time is longer). Peak memory: the caller's own (VmHWM,
not ru_maxrss: a process spawned by vfork + exec starts its ru_maxrss at its parent's peak, here the synthetic
data's 9 GB at 100M objects), and the largest sum of the RSS of it and its children, sampled every 0.2 s. Recall@k:
for --queries objects sampled at random, the exact k nearest (numpy, float32, over the object's label, itself left
out) against the k most similar targets the pairs give the object as reference (its own neighbours and the objects
that had it as a neighbour: the pairs file's contents), of the last --path's file; with both paths, whether their
pairs files are equal. The progress line: when the map tasks (objects read) and the reduce tasks (objects)
finished.

Prints markdown lines; --out appends them to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
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

from benchmarks.catalog import peak_rss_mib, with_schema
from subjectdiff.catalogs.identity import write_identity
from subjectdiff.catalogs.pairs import PairConfig, find_pairs
from subjectdiff.catalogs.storage import row_group_batches
from subjectdiff.catalogs.writer import OBJECT_SCHEMA, SAMPLE_SCHEMA

OLD_COMMIT = "fa56b56"  # catalogs/pairs.py before the shuffle (issue #21): the --files baseline


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
    """The largest RSS of this process plus its descendants, sampled every `every` seconds in a thread, the
    largest RSS of one descendant (`worker`: a map or reduce task's process), and the CPU seconds they used (each
    process's last sampled user + system time, this process's since the start)."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak, self.worker, self._stop = every, 0, 0, threading.Event()
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
                    rss = p.memory_info().rss
                    total += rss
                    self.worker = max(self.worker, rss) if p is not me else self.worker
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


def recall_at_k(emb, labels, qs, a, b, sim, k: int) -> float:
    """Mean over the objects QS (sorted) of |the k best pairs' targets & the exact k nearest of its label| / k.
    a, b, sim: the pairs whose reference is in QS, sorted by reference."""
    hits, by_label = 0, np.argsort(labels, kind="stable")  # each label's objects, in order
    bounds = np.searchsorted(labels[by_label], np.arange(labels.max() + 2))
    for label in np.unique(labels[qs]):
        same = by_label[bounds[label] : bounds[label + 1]]
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
    return hits / (k * len(qs))


def query_rows(path: Path, qs: np.ndarray) -> pa.Table:
    """ref_key, target_key, similarity of the pairs file's rows whose reference is one of the objects QS, a
    batch at a time (1.3 billion rows at 100M objects do not fit in memory)."""
    want, kept = pa.array([f"{q:09d}" for q in qs]), []
    for batch in row_group_batches(pq.ParquetFile(path), 1 << 20, ["ref_key", "target_key", "similarity"]):
        kept.append(batch.filter(pc.is_in(batch["ref_key"], value_set=want)))
    return pa.Table.from_batches(kept)


def same_files(x: Path, y: Path) -> bool:
    """Whether two pairs files hold the same rows in the same order, compared a batch at a time."""
    fx, fy = pq.ParquetFile(x), pq.ParquetFile(y)
    if fx.metadata.num_rows != fy.metadata.num_rows or fx.schema_arrow != fy.schema_arrow:
        return False
    return all(bx.equals(by) for bx, by in zip(row_group_batches(fx, 1 << 20), row_group_batches(fy, 1 << 20)))


def write_shards(
    root: Path, emb: np.ndarray, labels: np.ndarray, per_shard: int, seed: int = 2, frames: int = 0
) -> int:
    """Shards of synthetic sidecars in ROOT, one object a sample (key "000000042" = object 42, its own source, a
    random phash): samples, objects and identity sidecars, stats, an empty tar. FRAMES > 0: the samples are the
    frames of videos of FRAMES frames (object i: frame i % FRAMES of video i // FRAMES, one shot). Returns the
    number of shards."""
    rng, n = np.random.default_rng(seed), len(emb)
    for s, lo in enumerate(range(0, n, per_shard)):
        name, hi = f"{s:05d}", min(n, lo + per_shard)
        m, keys = hi - lo, [f"{i:09d}" for i in range(lo, hi)]
        label = [f"label{x:04d}" for x in labels[lo:hi]]
        samples = {
            "key": keys, "shard": [name] * m, "status": ["ok"] * m, "source": [f"s3://b/{k}.jpg" for k in keys],
            "caption": label, "width": [512] * m, "height": [384] * m, "n_objects": [1] * m,
            "image_ext": ["jpg"] * m, "image_bytes": [50_000] * m, "schema_version": [4] * m,
            "phash": rng.integers(-(2**63), 2**63 - 1, m, dtype=np.int64), "white_fraction": np.zeros(m, np.float32),
        }  # fmt: skip
        if frames:
            i = np.arange(lo, hi)
            samples.update(video=[f"v{v:08d}.mp4" for v in i // frames], video_shot=np.zeros(m, np.int32),
                           video_frame=i % frames, video_time=(i % frames) / 25.0)  # fmt: skip
        x0, y0 = rng.uniform(0, 0.5, (2, m)).astype(np.float32)
        x1, y1 = (x0 + rng.uniform(0.1, 0.5, m)).astype(np.float32), (y0 + rng.uniform(0.1, 0.5, m)).astype(np.float32)
        objects = {
            "key": keys, "shard": [name] * m, "index": np.zeros(m, np.int32), "label": label, "phrase": label,
            "span_start": np.zeros(m, np.int32), "span_end": np.full(m, 8, np.int32), "tokens": [[5]] * m,
            "score": np.full(m, 0.9, np.float32), "x0": x0, "y0": y0, "x1": x1, "y1": y1,
        }  # fmt: skip
        pq.write_table(with_schema(samples, SAMPLE_SCHEMA), root / f"{name}.samples.parquet")
        pq.write_table(with_schema(objects, OBJECT_SCHEMA), root / f"{name}.objects.parquet")
        write_identity(root / f"{name}.identity.parquet", keys, [0] * m, label, emb[lo:hi], {"model": "synthetic"})
        (root / f"{name}.tar").write_bytes(b"")
        stats = {"shard": name, "successes": m, "failed": 0, "objects": m, "bytes": 0}
        (root / f"{name}_stats.json").write_text(
            json.dumps({**stats, "start_time": 0.0, "end_time": 1.0, "duration": 1.0})
        )
    return s + 1


def old_find_pairs(commit: str = OLD_COMMIT):
    """find_pairs and PairConfig of catalogs/pairs.py at COMMIT, from git, as the module `old_pairs` in a
    temporary folder on PYTHONPATH (Ray's workers, started later by this process, import it from there)."""
    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:catalogs/pairs.py"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="old_pairs"))
    (folder / "old_pairs.py").write_text(src)
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), str(repo), os.environ.get("PYTHONPATH", "")])
    import old_pairs

    return old_pairs.find_pairs, old_pairs.PairConfig


def phase(args: argparse.Namespace) -> None:
    """One path's find_pairs over --root into --dest, in this process alone: prints its figures as JSON."""
    find, config = old_find_pairs(args.old_commit) if args.phase == "old" else (find_pairs, PairConfig)
    if args.reduce_tasks:  # fewer buckets: a small run's reduce tasks as large as at 100M objects
        sys.modules[find.__module__].REDUCE_TASKS = args.reduce_tasks
    cfg = config(
        min_sim=-1.0, min_phash=0, k=args.k, search_k=args.k + 1, index=args.index, nprobe=args.nprobe,
        num_cpus=args.num_cpus, brute_force_max=args.brute_force_max,
    )  # fmt: skip
    finished, t0, me = [], time.monotonic(), psutil.Process()

    def progress(done: int, total: int, unit: str) -> None:  # and the caller's RSS then (GiB)
        finished.append((time.monotonic() - t0, done, unit, me.memory_info().rss / 2**30))

    with PeakRSS() as mem:
        rows = find(args.root, args.method, args.dest, cfg, progress=progress)
    took = time.monotonic() - t0
    step = max(1, len(finished) // 12)
    split = ", ".join(f"{t:.0f}s:{d // 1000}k {u} ({r:.2f})" for t, d, u, r in finished[::step])
    own = peak_rss_mib() / 1024  # VmHWM: see the module docstring
    before_merge = max((r for *_, r in finished), default=0.0)
    print(json.dumps({"took": took, "cpu": mem.cpu_seconds(), "own": own, "peak": mem.peak / 2**30, "rows": rows,
                      "split": split, "before_merge": before_merge, "worker": mem.worker / 2**30}))  # fmt: skip


def run(args: argparse.Namespace, n: int) -> str:
    root = args.root or Path(tempfile.mkdtemp(prefix="pairs_bench"))
    t0 = time.monotonic()
    if not (args.reuse and (root / "catalog.duckdb").exists()):
        root.mkdir(parents=True, exist_ok=True)
        emb, labels = synthetic(n, args.labels, args.per_identity, args.dim, args.noise)[:2]  # not the identities
        if args.method == "video":  # a video's frames share its first object's label: each pairs with the others
            labels = labels[np.arange(n) // args.frames * args.frames]
        write_shards(root, emb, labels, args.shard_objects, frames=args.frames if args.method == "video" else 0)
        del emb, labels  # not held beside the paths (6.4 GB at 100M objects): made again, seeded, for the recall
        subprocess.run([sys.executable, "-m", "subjectdiff", "catalog", "build", str(root)], check=True)
    prepare = time.monotonic() - t0
    index = f"ivf nprobe {args.nprobe}" if args.index == "ivf" else "hnsw (32 links, efSearch 64)"
    lines, files = "", {}
    for path in args.path:
        files[path] = root / f"pairs-{path}.parquet"
        argv = [sys.executable, __file__, "--phase", path, "--root", str(root), "--dest", str(files[path])]
        for flag in ("k", "index", "nprobe", "num_cpus", "brute_force_max", "old_commit", "reduce_tasks", "method"):
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        got = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        lines += (
            f"| {n:,} | {args.dim} | {args.labels} | {index} | {args.num_cpus} | {path} | {got['took']:.1f} s "
            f"({got['cpu']:.0f} CPU s) | {got['own']:.2f} GiB | {got['peak']:.2f} GiB | {got['rows']:,} |\n"
            f"\n  {path}: progress (time since start: objects done (the caller's RSS then, GiB)) {got['split']}; "
            f"the caller's largest RSS at a progress line (before the merge) {got['before_merge']:.2f} GiB; "
            f"the largest RSS of one other process (a task's worker) {got['worker']:.2f} GiB\n\n"
        )
    same = "" if len(files) < 2 else f"old and new pairs files equal: {same_files(files['old'], files['new'])}; "
    if args.method == "video":  # every two frames of a video pair (min_sim -1): no neighbours to recall
        measured = f"video pairs, {args.frames} frames a video"
    else:
        measured = f"recall@{args.k} ({args.path[-1]}) {recall(args, n, files[args.path[-1]]):.3f}"
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return lines + (
        f"  {same}{measured}; synthetic shards and catalog {prepare:.1f} s; "
        f"{machine()}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
    )


def recall(args: argparse.Namespace, n: int, path: Path) -> float:
    """Recall@k of the pairs file PATH for --queries objects (the module docstring), against the synthetic
    embeddings, made again (seeded)."""
    qs = np.sort(np.random.default_rng(1).choice(n, args.queries, replace=False))
    got = query_rows(path, qs)
    emb, labels = synthetic(n, args.labels, args.per_identity, args.dim, args.noise)[:2]
    a, b = pc.cast(got["ref_key"], pa.int64()).to_numpy(), pc.cast(got["target_key"], pa.int64()).to_numpy()
    return recall_at_k(emb, labels, qs, a, b, got["similarity"].to_numpy(), args.k)


def main() -> None:
    if sys.argv[1:2] == ["--video"]:  # the video side is its own script (one core, its own table)
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
    p.add_argument("--path", nargs="+", default=["old", "new"], choices=["old", "new"])
    p.add_argument("--old-commit", default=OLD_COMMIT, help="the `old` path's commit (default: before the shuffle)")
    p.add_argument("--shard-objects", type=int, default=10_000)
    p.add_argument("--method", default="retrieval", choices=["retrieval", "video"])
    p.add_argument("--frames", type=int, default=20, help="--method video: frames (objects) a video")
    p.add_argument(
        "--reduce-tasks", type=int, default=0, help="catalogs.pairs.REDUCE_TASKS for both paths (default: theirs)"
    )
    p.add_argument("--root", type=Path, help="the synthetic shards' folder (default: a temporary one, removed)")
    p.add_argument("--reuse", action="store_true", help="keep --root's shards and catalog when it has them")
    p.add_argument("--out", type=Path)
    p.add_argument("--phase", choices=["old", "new"], help=argparse.SUPPRESS)  # one path, in its own process
    p.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        return phase(args)
    head = (
        "| objects | dim | labels | index | Ray CPUs | path | time (CPU seconds, all processes) "
        "| peak RSS, caller | peak RSS, all processes | pair rows |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
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
