"""Training throughput: data-loader samples/s and train-step samples/s, ours vs the reference code's way.

    python benchmarks/train.py                         # tiny preset on this machine's CPU
    python benchmarks/train.py --preset sd2-base --batch-size 8 --precision bf16   # SD 2 size, needs a GPU
    python benchmarks/train.py --loader --workers 1    # the data loader only: paper preset vs the earlier one

`--loader`: data-loader samples/s per DataLoader worker at 512 px with the `paper` preset's object selection and
subject augmentation (a background photo per subject, from a folder of BG-20k-sized photos written here), against
the loader of revision --baseline-rev (this project's loader before the reference's selection and augmentation,
imported from git: its train/config.py and train/data.py), on the same records in the same run; then the cost
of each augmentation per subject image and of the selection rules per record (single process, medians).

"ours": frozen VAE / image encoder under no_grad (bf16 weights on GPU), trainable model under autocast,
optionally gradient checkpointing. "reference": the way the paper's public code runs the same step: the image
encoder under autograd (its parameters require grad, a graph is built and kept through backward, its gradients
zeroed each step), fp16 casts of the frozen parts and fp16 autocast, no gradient checkpointing. Random weights
(no download); records are the hand-made photo shards of subjectdiff/photo_records.py, enough of them that the
data-loader measurement (the preset's DataLoader workers) stays within one epoch. On a GPU each variant is built,
timed and freed in turn, so that its peak memory is its own; on a CPU both live at once and their rounds alternate.
Appends a section to benchmarks/results/train.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from subjectdiff.photo_records import write_photo_shards  # noqa: E402
from subjectdiff.train.config import load_config  # noqa: E402
from subjectdiff.train.data import BatchStream, TrainSamples, make_reader  # noqa: E402

BASELINE_REV = "eae2950"  # train/data.py before issue #12 (random choice, box cut-outs on white, perspective 0.1)


def baseline_loader(rev: str):
    """The loader of git revision `rev` (its train/config.py and train/data.py) as a package `baseline_train`,
    importing today's catalogs/ and subjectdiff/; None when git or the revision is not available."""
    import importlib
    import subprocess

    pkg = Path(tempfile.mkdtemp()) / "baseline_train"
    pkg.mkdir()
    for name in ("config.py", "data.py"):
        r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:train/{name}"], capture_output=True, text=True)
        if r.returncode:
            return None
        # the old module's imports, renamed as the packages are now installed (subjectdiff.*)
        text = re.sub(r"^(\s*)from (train\.)", r"\1from baseline_\2", r.stdout, flags=re.M)
        text = re.sub(r"^(\s*)from (catalogs|datagen|infer|train)\b", r"\1from subjectdiff.\2", text, flags=re.M)
        (pkg / name).write_text(text)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("baseline_train.config"), importlib.import_module("baseline_train.data")


def write_backgrounds(d: Path, n: int = 8) -> Path:
    """n JPEG photos at 1600 x 1200 (about BG-20k's size) from scikit-image's photos."""
    from PIL import Image

    from subjectdiff.photo_records import PHOTOS, photo

    d.mkdir(parents=True, exist_ok=True)
    names = list(PHOTOS)
    for i in range(n):
        Image.fromarray(photo(names[i % len(names)])).resize((1600, 1200)).save(d / f"bg{i}.jpg", quality=90)
    return d


def stream_rate(stream, batches: int) -> float:
    it = iter(stream)
    next(it)  # start-up (workers, imports) is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["key"])
    rate = n / (time.perf_counter() - t0)
    if stream.epoch != 0:
        raise RuntimeError("the data-loader measurement crossed an epoch restart (DataLoader start-up timed)")
    return rate


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def augmentation_costs(records: list, backgrounds: Path, size: int, repeats: int) -> list[tuple[str, float]]:
    """(what, ms) per subject image / per record, medians over the records' chosen objects."""
    import numpy as np

    from subjectdiff.model.subject_image import SubjectAugment, background_files, background_photo, subject_image
    from subjectdiff.train.config import DataConfig
    from subjectdiff.train.data import choose_subjects, filled_mask

    files = background_files(str(backgrounds))
    cfg = DataConfig()
    pairs = [(r, i) for r in records for i in choose_subjects(r, 2, cfg, np.random.default_rng(0))]
    if not pairs:
        raise RuntimeError("no record has an object the paper preset's rules choose")
    rng = np.random.default_rng(0)

    def per_subject(fn) -> float:
        return statistics.median(median_ms(lambda r=r, i=i: fn(r, i), repeats) for r, i in pairs)

    aug = {
        "flip (p 1)": SubjectAugment(1.0, 0, 0, 0),
        "rotation (±10°)": SubjectAugment(0, 10, 0, 0),
        "perspective (0.5, p 1)": SubjectAugment(0, 0, 0.5, 1.0),
    }
    plain = per_subject(lambda r, i: subject_image(r.image, r.masks[i], size))
    rows = [("subject image: cut-out on white, no augmentation (= inference)", plain)]
    for name, a in aug.items():
        rows.append(
            (
                f"+ {name} (added to the cut-out)",
                per_subject(lambda r, i, a=a: subject_image(r.image, r.masks[i], size, augment=a, rng=rng)) - plain,
            )
        )
    load = per_subject(lambda r, i: background_photo(files[int(rng.integers(len(files)))], size, rng))
    rows.append(("background photo: load a 1600x1200 JPEG, resize, crop (per subject)", load))
    still = SubjectAugment(0, 0, 0, 0)
    bg = background_photo(files[0], size, rng)
    rows.append(
        (
            "subject pasted at half the area of a loaded background photo, no augmentation (instead of "
            "the cut-out on white)",
            per_subject(lambda r, i: subject_image(r.image, r.masks[i], size, augment=still, rng=rng, background=bg)),
        )
    )
    rows.append(("hole filling of the mask (per subject)", per_subject(lambda r, i: filled_mask(r.masks[i]))))
    rows.append(
        (
            "object selection rules (per record)",
            statistics.median(median_ms(lambda r=r: choose_subjects(r, 2, cfg, rng), repeats) for r in records),
        )
    )
    rows.append(
        (
            "no rules: random order, sanity checks only (per record)",
            statistics.median(
                median_ms(
                    lambda r=r: choose_subjects(r, 2, DataConfig(object_rules=False, pick="random"), rng), repeats
                )
                for r in records
            ),
        )
    )
    return rows


def loader_benchmark(args) -> int:
    """The --loader rows (module docstring)."""
    from subjectdiff.catalogs.reader import RecordReader
    from subjectdiff.model.builders import image_encoder_input_size

    workers, batch = max(args.workers if args.workers is not None else 1, 1), args.batch_size
    base = baseline_loader(args.baseline_rev)
    with tempfile.TemporaryDirectory() as tmp:
        records = workers * batch * (args.loader_batches + 2)
        write_photo_shards(Path(tmp) / "shards", n_shards=4, per_shard=math.ceil(records / 4), failures_per_shard=0)
        bgs = write_backgrounds(Path(tmp) / "backgrounds")
        sets = [
            f"data.shards=['{Path(tmp) / 'shards'}']",
            f"data.num_workers={args.workers or 1}",
            f"data.batch_size={batch}",
        ]
        paper = load_config("paper", [*sets, f"data.backgrounds='{bgs}'"])
        size = image_encoder_input_size(paper.model)
        reader = make_reader(paper.data, None, 0, 1, 0)
        rows = [
            (
                "paper preset: reference selection + augmentation, background photos",
                stream_rate(
                    BatchStream(TrainSamples(reader, paper, size), batch, paper.data.num_workers), args.loader_batches
                ),
            )
        ]
        white = load_config("paper", sets)
        rows.append(
            (
                "paper preset without background photos (white)",
                stream_rate(
                    BatchStream(
                        TrainSamples(make_reader(white.data, None, 0, 1, 0), white, size), batch, white.data.num_workers
                    ),
                    args.loader_batches,
                ),
            )
        )
        if base is not None:
            bcfg_mod, bdata = base
            old = bcfg_mod.load_config("sd2-base", sets)
            rows.append(
                (
                    f"earlier loader (rev {args.baseline_rev}): random choice, box cut-outs on white",
                    stream_rate(
                        bdata.BatchStream(
                            bdata.TrainSamples(bdata.make_reader(old.data, None, 0, 1, 0), old, size),
                            batch,
                            old.data.num_workers,
                        ),
                        args.loader_batches,
                    ),
                )
            )
        recs = list(RecordReader(Path(tmp) / "shards", keys=None))[:10]
        costs = augmentation_costs(recs, bgs, size, args.rounds)
    machine = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"\n## data loader at 512 px, {workers} DataLoader worker(s), batch {batch} "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
        f"Command: `python benchmarks/train.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine}; torch {torch.__version__}; load average at the end {os.getloadavg()[0]:.1f} "
        "(shared machine: CPU numbers are noisy); records: subjectdiff/photo_records.py's photos (300-1000 px), "
        f"subject images {size} px\n",
        "| loader | samples/s per worker |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {rate / workers:.1f} |" for name, rate in rows]
    if base is None:
        lines.append(f"| earlier loader (rev {args.baseline_rev}) | not measured: git or the revision is missing |")
    lines += ["", "| cost (single process, median) | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" if ms >= 0.1 else f"| {name} | < 0.1 |" for name, ms in costs]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Training throughput (benchmarks/train.py)\n")
    with open(out, "a") as f:
        f.write(text)
    return 0


def records_needed(args) -> int:
    """Records for one epoch of the loader measurement: its batches plus the warm-up one, in whole rounds over
    the workers (the balanced reader gives each worker the same number of full batches)."""
    workers = max(args.workers, 1)
    return workers * args.batch_size * math.ceil((args.loader_batches + 1) / workers)


def loader_rate(cfg, subject_size: int, batches: int) -> float:
    reader = make_reader(cfg.data, None, 0, 1, cfg.run.seed)
    stream = BatchStream(TrainSamples(reader, cfg, subject_size), cfg.data.batch_size, cfg.data.num_workers)
    return stream_rate(stream, batches)


class Variant:
    """One way of running the step (ours or the reference's), built once, timed in alternating rounds."""

    def __init__(self, args, reference: bool, shards: Path, device: torch.device, checkpointing: bool | None = None):
        """checkpointing: gradient checkpointing of 'ours' (None: --checkpointing); never in the reference."""
        from subjectdiff.model import build
        from subjectdiff.train.trainer import frozen_dtype

        checkpointing = args.checkpointing if checkpointing is None else checkpointing
        on_gpu = device.type == "cuda"
        sets = [
            f"data.shards=['{shards}']",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}",
            f"run.precision={'fp16' if reference and on_gpu else args.precision}",
            f"run.gradient_checkpointing={str(bool(checkpointing) and not reference).lower()}",
            *([] if args.weights else ["model.base=none", "model.image_encoder_weights=none"]),
        ]
        self.cfg, self.device, self.reference = load_config(args.preset, sets), device, reference
        self.parts = build(self.cfg.model)
        self.parts.to(device, torch.float16 if reference and on_gpu else frozen_dtype(self.cfg, device))
        if reference:
            self.parts.image_encoder.requires_grad_(True)  # the reference builds the encoder's graph
        if self.cfg.run.gradient_checkpointing:
            self.parts.model.enable_gradient_checkpointing()
        self.size = self.cfg.data.subject_size or self.parts.image_encoder.image_size
        reader = make_reader(self.cfg.data, None, 0, 1, 0)
        self.batch = next(iter(BatchStream(TrainSamples(reader, self.cfg, self.size), args.batch_size, 0)))
        params = [p for p in self.parts.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-6)
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.run.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.gen = torch.Generator(device).manual_seed(0)
        self.rates: list[float] = []
        self.peak: float | None = None

    def one_step(self) -> None:
        from subjectdiff.train.step import training_step

        loss, _ = training_step(
            self.parts.model,
            self.parts,
            self.batch,
            self.cfg.loss,
            self.gen,
            self.device,
            self.autocast(),
            reference=self.reference,
        )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.reference:  # the encoder's gradients are no optimizer's: without this they pile up across steps
            self.parts.image_encoder.zero_grad(set_to_none=True)

    def measure(self, steps: int) -> None:
        cuda = self.device.type == "cuda"
        self.one_step()  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.one_step()
        if cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak or 0.0, torch.cuda.max_memory_allocated() / 2**30)
        self.rates.append(steps * len(self.batch["key"]) / (time.perf_counter() - t0))

    def result(self) -> dict:
        return {
            "step_samples_per_s": statistics.median(self.rates),
            "peak_gib": self.peak,
            "precision": self.cfg.run.precision,
            "checkpointing": self.cfg.run.gradient_checkpointing,
            "cfg": self.cfg,
            "subject_size": self.size,
        }


def variant_specs(args) -> list[tuple[bool, bool]]:
    """(reference, checkpointing) of each variant measured: ours (with --checkpointing, or both ways with
    --both-checkpointing), then the reference."""
    ours = [False, True] if args.both_checkpointing else [args.checkpointing]
    return [(False, c) for c in ours] + [(True, False)]


def measure_variants(args, shards: Path, device: torch.device) -> list[dict]:
    """Results of variant_specs' variants, the reference last. On a GPU one variant at a time (built, timed,
    freed): peak memory must not count the other's weights and optimizer state. On a CPU all at once, rounds
    alternating, so that load changes on a shared machine hit them alike."""
    if device.type != "cuda":
        variants = [Variant(args, ref, shards, device, ckpt) for ref, ckpt in variant_specs(args)]
        for _ in range(args.rounds):
            for v in variants:
                v.measure(args.steps)
        return [v.result() for v in variants]
    results = []
    for reference, ckpt in variant_specs(args):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        v = Variant(args, reference, shards, device, ckpt)
        for _ in range(args.rounds):
            v.measure(args.steps)
        results.append(v.result())
        del v  # free it before the next one is built
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "sd2-base"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", default=None, help="fp32 / bf16 / fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in 'ours'")
    p.add_argument(
        "--both-checkpointing", action="store_true", help="measure 'ours' without and with gradient checkpointing"
    )
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the preset's)")
    p.add_argument(
        "--weights",
        action="store_true",
        help="load the preset's real weights (model.base, open_clip) instead of random init",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = default)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.md"))
    p.add_argument(
        "--loader",
        action="store_true",
        help="only the data loader at 512 px: the paper preset against --baseline-rev's loader, and "
        "the cost of each augmentation",
    )
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the earlier loader (--loader)")
    args = p.parse_args()
    if args.loader:
        if args.threads:
            torch.set_num_threads(args.threads)
        return loader_benchmark(args)
    device = torch.device(
        "cuda"
        if (args.device == "auto" and torch.cuda.is_available())
        else (args.device if args.device != "auto" else "cpu")
    )
    if args.preset == "sd2-base" and device.type != "cuda":
        print("sd2-base needs a GPU (a CPU step takes minutes); use --preset tiny here", file=sys.stderr)
        return 2
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.workers is None:
        args.workers = load_config(args.preset).data.num_workers
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_photo_shards(Path(tmp), n_shards=4, per_shard=math.ceil(records_needed(args) / 4))
        *ours_all, ref = measure_variants(args, Path(tmp), device)
        ours = ours_all[0]
        ours["loader_samples_per_s"] = loader_rate(ours["cfg"], ours["subject_size"], args.loader_batches)
    for extra in ours_all[1:]:
        report(args, device, extra, ref, loader=False)
    report(args, device, ours, ref)
    if args.json:
        write_json(args, device, ours_all, ref)
    return 0


def write_json(args, device, ours_all: list[dict], ref: dict) -> None:
    """The measured figures (benchmarks/gpu.py reads them): every 'ours' variant, the reference, the loader."""
    import json

    keep = ("step_samples_per_s", "peak_gib", "precision", "checkpointing")
    payload = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "ours": [{k: r[k] for k in keep} for r in ours_all],
        "reference": {k: ref[k] for k in keep},
        "loader": {
            "workers": args.workers,
            "samples_per_s": ours_all[0]["loader_samples_per_s"],
            "samples_per_s_per_worker": ours_all[0]["loader_samples_per_s"] / max(args.workers, 1),
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1))


def report(args, device, ours: dict, ref: dict, loader: bool = True) -> None:
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    )
    peak = lambda r: "" if r["peak_gib"] is None else f" | {r['peak_gib']:.1f}"
    lines = [
        f"\n## {args.preset}, batch {args.batch_size}, {device.type} "
        f"({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
        f"Command: `python benchmarks/train.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine}; torch {torch.__version__}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (shared machine: CPU numbers are noisy)\n",
        "| variant | precision | grad. checkpointing | train step samples/s (median of rounds)"
        + (" | peak GiB" if device.type == "cuda" else "")
        + " |",
        "|---|---|---|---:" + ("|---:" if device.type == "cuda" else "") + "|",
        f"| ours (frozen encoders under no_grad) | {ours['precision']} | {ours['checkpointing']} "
        f"| {ours['step_samples_per_s']:.2f}{peak(ours)} |",
        f"| reference (image encoder under autograd, fp16 casts on GPU) | {ref['precision']} | {ref['checkpointing']} "
        f"| {ref['step_samples_per_s']:.2f}{peak(ref)} |",
    ]
    if loader:
        lines += [
            "",
            f"Data loader ({args.workers} workers, resolution of the preset): "
            f"{ours['loader_samples_per_s']:.1f} samples/s vs. the step's {ours['step_samples_per_s']:.2f} samples/s.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# Training throughput (benchmarks/train.py)\n")
    with open(out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    raise SystemExit(main())
