"""End-to-end datagen throughput: the Ray pipeline against a one-image-at-a-time loop over the same stages.

    python benchmarks/datagen.py [--preset tiny] [--images 48] [--batch-size 8] [--out /tmp/dg_bench]
    python benchmarks/datagen.py --preset full-random --images 256 --batch-size 16    # on a GPU machine

`full-random` runs the default preset's architectures (BLIP-large, GroundingDINO SwinT-OGC, SAM ViT-H)
with random weights, built once into the cache: the real models' cost, without their checkpoints.

The baseline is how the reference implementation runs: one image at a time through caption, nouns,
grounding, filter and segmentation, in one process, then written. Both use the same models, configs and
input images (the bundled samples, repeated under distinct names so every input is a distinct source).
Memory: resident set size of this process and all its children (Ray workers included), sampled every
0.5 s; "flat" means the last quarter of the run peaks no higher than the second quarter plus 10 %.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# This file is named after the package it measures: keep `import datagen` pointing at the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def gpu_used_bytes() -> int | None:
    """Memory in use on every GPU, all processes (Ray's actors run outside this one), via nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return sum(int(v) for v in out.split()) * 2**20
    except (subprocess.SubprocessError, ValueError):
        return None


class MemorySampler(threading.Thread):
    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.samples, self.gpu, self.stop = every, [], [], threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            gpu = gpu_used_bytes()
            if gpu is not None:
                self.gpu.append(gpu)
            total = 0
            procs = [me, *me.children(recursive=True)]
            try:  # Ray's workers are children of its raylet, not of this process: count them too
                procs += [
                    p for p in psutil.process_iter(["name", "cmdline"]) if "ray::" in " ".join(p.info["cmdline"] or [])
                ]
            except psutil.Error:
                pass
            for p in {p.pid: p for p in procs}.values():
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append(total)
            self.stop.wait(self.every)

    def summary(self) -> dict[str, float]:
        s = self.samples or [0]
        q = max(1, len(s) // 4)
        gib = 2**30
        return {
            "peak": max(s) / gib,
            "q2_peak": max(s[q : 2 * q] or s) / gib,
            "q4_peak": max(s[-q:]) / gib,
            "gpu_peak": max(self.gpu) / gib if self.gpu else None,
        }


def make_inputs(d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    photos = sorted((REPO / "datagen" / "sample_images").glob("*.jpg"))
    out = []
    for i in range(n):
        p = d / f"{i:05d}_{photos[i % len(photos)].name}"
        p.write_bytes(photos[i % len(photos)].read_bytes())
        out.append(p)
    return out


def one_at_a_time(paths: list[Path], out: Path, cfg) -> float:
    """The reference way: each image alone through every stage, then written."""
    from subjectdiff.catalogs.schema import Failure
    from subjectdiff.catalogs.writer import ShardSink
    from subjectdiff.datagen.assemble import to_record
    from subjectdiff.datagen.stage_pool import build_stage
    from subjectdiff.datagen.stages import registry
    from subjectdiff.datagen.stages.common import decode_item

    # the chain the pipeline runs (curate too, and any registered stage), in its order
    stages = [build_stage(s.name, cfg.stages) for s in registry.active(cfg.stages)]
    t0 = time.perf_counter()
    with ShardSink(out, max_count=cfg.pipeline.shard_size) as sink:
        for p in paths:
            items = [decode_item(str(p), p.read_bytes())]
            for st in stages:
                items = st(items)
            rec = to_record(items[0])
            sink.fail(rec) if isinstance(rec, Failure) else sink.write(rec)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "default", "full-random"])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="/tmp/subjectdiff_datagen_bench")
    ap.add_argument(
        "--pipelines",
        default="pools,fuse",
        help="which pipeline runs to time against the loop: pools (one actor pool per stage), fuse, or both",
    )
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    runs = [{"pools": False, "fuse": True}[k.strip()] for k in args.pipelines.split(",") if k.strip()]

    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.run import run

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    paths = make_inputs(root / "inputs", args.images)
    cfg = preset(args.preset)
    cfg.pipeline.batch_size = args.batch_size
    cfg.pipeline.shard_size = max(8, args.images // 4)
    from subjectdiff.datagen.stages import registry

    for entry in registry.active(cfg.stages):  # every model stage's batch (caption, ground, segment, curate, ...)
        if hasattr(entry.settings(cfg.stages), "batch_size"):
            entry.settings(cfg.stages).batch_size = args.batch_size

    rows = []
    mem = MemorySampler()
    mem.start()
    t = one_at_a_time(paths, root / "loop", cfg)
    mem.stop.set()
    mem.join()
    rows.append(("one image at a time (reference way), 1 process", t, mem.summary()))

    for fuse in runs:
        cfg.pipeline.fuse = fuse
        mem = MemorySampler()
        mem.start()
        t0 = time.perf_counter()
        summary = run(str(root / "inputs"), root / f"pipeline_fuse{int(fuse)}", cfg, progress_every=30)
        t = time.perf_counter() - t0
        mem.stop.set()
        mem.join()
        kind = "all model stages in one actor (fuse)" if fuse else "one actor pool per stage"
        rows.append((f"Ray pipeline, {kind}, batch {args.batch_size} (incl. Ray start, model loads)", t, mem.summary()))
        assert summary.ok + summary.failed == args.images

    import torch

    if args.json:
        import json

        payload = {
            "preset": args.preset,
            "images": args.images,
            "batch_size": args.batch_size,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "rows": [{"run": name, "seconds": t, "images_per_s": args.images / t, **m} for name, t, m in rows],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
    print(
        f"# datagen benchmark: {args.images} images, preset {args.preset} "
        f"({platform.machine()}, {os.cpu_count()} cores, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
        f"{time.strftime('%Y-%m-%d')})\n"
    )
    print(
        "| run | seconds | images/s | speed-up | peak RSS GiB | 2nd-quarter peak | last-quarter peak "
        "| peak GPU GiB (all processes) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0][1]
    for name, t, m in rows:
        gpu = "-" if m["gpu_peak"] is None else f"{m['gpu_peak']:.1f}"
        print(
            f"| {name} | {t:.1f} | {args.images / t:.3g} | {base / t:.2f}x | {m['peak']:.2f} | "
            f"{m['q2_peak']:.2f} | {m['q4_peak']:.2f} | {gpu} |"
        )


if __name__ == "__main__":
    main()
