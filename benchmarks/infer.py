"""Generation speed: seconds per image, three-branch guidance, batch 1 and 4.

    python benchmarks/infer.py                                   # tiny preset (64 px), 50 steps, on this CPU
    python benchmarks/infer.py --preset sd2-base                 # 512 px, 50 steps, random full-size weights (GPU)
    python benchmarks/infer.py --model runs/a/export             # a trained model
    python benchmarks/infer.py --preset sd2-base --steps 2 --batches 1    # full size on a CPU: per-step cost

One subject (a real photo with a given mask: segmentation runs once per call, not per image), the reference
code's sampler settings (PNDM, guidance 7 / 1.5). Each timed call generates `batch` images in one UNet batch of
3 x batch (the three guidance branches) and decodes them; the first call per batch size is a warm-up. Appends a
section to benchmarks/results/infer.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subjectdiff.infer.pipeline import Pipeline, SamplingConfig  # noqa: E402
from subjectdiff.infer.subjects import Subject  # noqa: E402
from subjectdiff.photo_records import photo  # noqa: E402


def build_pipeline(args, device: torch.device) -> tuple[Pipeline, float]:
    from subjectdiff.model import PRESETS, build

    t0 = time.perf_counter()
    if args.model:
        pipe = Pipeline.load(args.model, device=str(device))
    else:
        cfg = PRESETS[args.preset]()
        cfg.base, cfg.image_encoder_weights = None, None  # random weights of the full architecture: no download
        pipe = Pipeline(build(cfg), {"id": f"{args.preset} (random weights)", "weights": "raw"}, device=str(device))
    return pipe, time.perf_counter() - t0


def time_batch(pipe: Pipeline, batch: int, args) -> list[float]:
    """Seconds per image of `repeats` timed calls (after one warm-up call) generating `batch` images each."""
    image = photo("chelsea")
    mask = np.zeros(image.shape[:2], bool)
    mask[30:280, 100:400] = True
    subjects = [Subject(image, "cat", box=(0.2, 0.2, 0.8, 0.9), mask=mask)]
    s = SamplingConfig(steps=args.steps, batch_size=batch, resolution=args.resolution)
    pipe.generate(
        "a cat on the beach",
        subjects,
        batch,
        seed=0,
        sampling=SamplingConfig(steps=1, batch_size=batch, resolution=args.resolution),
    )
    out = []
    for r in range(args.repeats):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe.generate("a cat on the beach", subjects, batch, seed=100 * r, sampling=s)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / batch)
    return out


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{torch.cuda.get_device_name(device)} ({gib:.0f} GiB)"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def write_section(args, argv, pipe: Pipeline, device: torch.device, build_s: float, res: int, rows: list[str]) -> None:
    """Append the run's Markdown section (command, machine, date, table) to args.out and print it."""
    cmd = "python benchmarks/infer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"## {pipe.model_info['id']}, {res} px, {args.steps} steps, {device.type} ({now})",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine(device)}; torch {torch.__version__}; dtype {pipe.dtype}; load average "
        f"{os.getloadavg()[0]:.1f}; model build {build_s:.0f} s  ",
        "Sampler: PNDMScheduler, three-branch guidance (7 / 1.5), one subject; VAE decode included.",
        "",
        "| batch | UNet batch | s/image (median) | s/image (best) | ms/step/image | peak GPU GiB |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = "" if out.exists() else "# Inference speed (benchmarks/infer.py)\n\n"
    with open(out, "a") as f:
        f.write(head + "\n".join(section) + "\n")
    print("\n".join(section))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "sd2-base"])
    p.add_argument("--model", default=None, help="an export / checkpoint folder instead of random weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's (512 for sd2-base, 64 tiny)")
    p.add_argument("--batches", default="1,4", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer.md"))
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    pipe, build_s = build_pipeline(args, device)
    res = args.resolution or pipe.native
    rows, measured = [], []
    for b in (int(x) for x in args.batches.split(",")):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs = time_batch(pipe, b, args)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"
        rows.append(
            f"| {b} | {3 * b} | {statistics.median(secs):.3f} | {min(secs):.3f} | "
            f"{statistics.median(secs) / args.steps * 1000:.1f} | {peak} |"
        )
        print(rows[-1], flush=True)
        measured.append(
            {
                "batch": b,
                "s_per_image": statistics.median(secs),
                "best_s_per_image": min(secs),
                "peak_gib": None if peak == "-" else float(peak),
            }
        )
    write_section(args, argv, pipe, device, build_s, res, rows)
    if args.json:
        import json

        info = {"model": pipe.model_info["id"], "resolution": res, "steps": args.steps, "dtype": str(pipe.dtype)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "device": machine(device), "rows": measured}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
