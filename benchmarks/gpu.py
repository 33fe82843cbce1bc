"""The GPU figures in one run: every GPU benchmark of issue #21, each row against its baseline of the same run.

    bash benchmarks/gpu.sh                    # on a GPU machine (the wrapper picks or sets up the Python)
    python benchmarks/gpu.py --dry-run        # the same sections at tiny sizes on a CPU (the test suite runs it)

Sections, in order, each one subprocess of an existing benchmark script (its own flags; the script writes JSON
that this one turns into rows):

  stages     benchmarks/stages.py: each datagen stage (caption BLIP-large, nouns, ground GroundingDINO SwinT +
             BERT-base, segment SAM ViT-H, curate ViT-L-14, identity once registered) at full size in bf16, batched
             against one image at a time: images/s and peak GPU memory
  sam        benchmarks/stages.py --sam-levers: SAM ViT-H with segment-anything-fast's levers turned on one after
             another (bf16, SDPA, torch.compile of the image encoder, batched prompts): images/s, masks' IoU vs fp32
  train      benchmarks/train.py: the sd2-base training step (bf16, batch 8, gradient checkpointing off and on)
             against the reference's style; the data loader's samples/s with the node's cores as workers
  infer      benchmarks/infer.py: 512 px, 50 steps, three-branch guidance: seconds per image, 4 per call vs 1
  pipeline   benchmarks/datagen.py: the Ray pipeline end to end at full size on the one GPU against the
             one-image-at-a-time loop (the reference's way)

Time: --budget-s is shared out over the sections still to run (SHARES), so time a section leaves unused goes to
the next; a section past its share is stopped (its process group killed) and reported as such. The Markdown
(gpu-results.md) and the JSON (gpu-results.json) are rewritten after every section, so a run cut short still
leaves every figure measured before; the sections' output goes to gpu.log. Full-size models are random weights
built from their configs (the `full-random` preset): the figures are the real architectures' cost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# Share of the remaining budget each section gets (of the sections still to run); "models" builds the
# full-random model files into the cache once (5.5 GB), so that no section's time counts it.
# Not yet checked on a GPU: the first GPU run's section times should set them.
SHARES = {"models": 0.12, "stages": 0.14, "sam": 0.16, "train": 0.22, "infer": 0.10, "pipeline": 0.26}
MIN_SECTION_S = 20  # a section offered less than this is not started ("no time left")


@dataclass
class Section:
    key: str
    title: str
    argv: list[str]  # the benchmark script and its flags, without --json / --out


def sections(opts) -> list[Section]:
    """The run's sections; --dry-run gives every script its tiny CPU sizes (the same code paths)."""
    dry = opts.dry_run
    dev = "cpu" if dry else "cuda"
    stages_common = ["--size", "tiny" if dry else "full", "--device", dev, "--repeats", "1" if dry else "2"]
    models = "config.tiny()" if dry else "config.full_random()"
    train = (
        ["--preset", "tiny", "--batch-size", "2", "--threads", "1", "--steps", "1", "--rounds", "1"]
        + ["--loader-batches", "2", "--workers", "1"]
        if dry
        else ["--preset", "sd2-base", "--batch-size", "8", "--precision", "bf16", "--steps", "4", "--rounds", "2"]
        + ["--loader-batches", "24", "--workers", str(opts.workers)]
    )
    infer = (
        ["--preset", "tiny", "--steps", "2", "--batches", "1,2", "--repeats", "1", "--threads", "1"]
        if dry
        else ["--preset", "sd2-base", "--steps", "50", "--batches", "1,4", "--repeats", "2"]
    )
    pipeline = (
        ["--preset", "tiny", "--images", "1", "--batch-size", "1", "--pipelines", "fuse"]  # one image: the path
        if dry
        else ["--preset", "full-random", "--images", str(opts.pipeline_images), "--batch-size", "16"]
        + ["--pipelines", "pools"]
    )
    return [
        Section(
            "models",
            "model files: " + ("the tiny preset's" if dry else "full-random (random weights in the official formats)"),
            ["-c", f"from subjectdiff.datagen import config; {models}"],
        ),
        Section(
            "stages",
            "datagen stages, batched against one image at a time" + ("" if dry else " (full size, bf16)"),
            [str(BENCH / "stages.py"), *stages_common, "--images", "1" if dry else "16"]
            + ["--stages", "caption,nouns,ground,segment,curate,identity"]
            + ([] if dry else ["--dtype", "bfloat16"]),
        ),
        Section(
            "sam",
            "SAM's speed levers (segment-anything-fast's), each turned on in turn; masks' IoU against fp32",
            [str(BENCH / "stages.py"), "--sam-levers", *stages_common, "--images", "1" if dry else "16"]
            + (["--compile-backend", "eager"] if dry else []),
        ),
        Section(
            "train",
            "training step (ours, gradient checkpointing off and on) against the reference's style; the data loader",
            [str(BENCH / "train.py"), *train, "--both-checkpointing"],
        ),
        Section("infer", "generation, three-branch guidance: seconds per image", [str(BENCH / "infer.py"), *infer]),
        Section(
            "pipeline",
            "datagen pipeline end to end against the one-image-at-a-time loop (the reference's way)",
            [str(BENCH / "datagen.py"), *pipeline],
        ),
    ]


# ------------------------------------------------------------------------------------------------- rows


def row(what, value, unit, baseline, baseline_value, goal="", notes="") -> dict:
    """One result beside its baseline; speed-up = how many times faster than the baseline (rates: value /
    baseline; times: baseline / value). value None: not measured (notes say why)."""
    speedup = None
    if value is not None and baseline_value:
        speedup = value / baseline_value if unit.endswith("/s") else baseline_value / value
    return {
        "what": what,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "speedup": speedup,
        "goal": goal,
        "notes": notes,
    }


def gib(x) -> str:
    return "-" if x is None else f"{x:.1f} GiB"


def stages_rows(raw: dict) -> list[dict]:
    out = []
    for r in raw["rows"]:
        if "skipped" in r:  # the identity stage until it is registered
            out.append(row(f"{r['stage']}", None, "img/s", "one image at a time", None, ">= 3x", r["skipped"]))
            continue
        notes = f"{r.get('dtype', '')}; peak GPU {gib(r.get('peak_gib_batched'))} batched, "
        notes += f"{gib(r.get('peak_gib_single'))} one at a time"
        out.append(
            row(
                f"{r['stage']}, batches of {raw['images']}",
                r["batched"],
                "img/s",
                "one image at a time",
                r["single"],
                ">= 3x",
                notes,
            )
        )
    return out


def sam_rows(raw: dict) -> list[dict]:
    rows, out = raw["rows"], []
    for i, r in enumerate(rows):
        base = rows[i - 1] if i else r
        notes = f"masks' mean IoU vs fp32 {r['miou_vs_fp32']:.4f}; {r['img_s'] / rows[0]['img_s']:.2f}x fp32; "
        notes += f"peak GPU {gib(r['peak_gib'])}; warm-up {r['warmup_s']:.0f} s"
        goal = ">= 20 img/s (segment-anything-fast: 20.3 on an A100)" if i == len(rows) - 1 else ""
        out.append(
            row(
                r["lever"],
                r["img_s"],
                "img/s",
                "the row before (lever off)" if i else "itself",
                base["img_s"],
                goal,
                notes,
            )
        )
    return out


def train_rows(raw: dict) -> list[dict]:
    ref, out = raw["reference"], []
    ref_name = f"reference style ({ref['precision']}, image encoder under autograd)"
    for o in raw["ours"]:
        notes = f"peak GPU {gib(o['peak_gib'])} (reference {gib(ref['peak_gib'])})"
        out.append(
            row(
                f"ours, {o['precision']}, batch {raw['batch_size']}, gradient checkpointing "
                f"{'on' if o['checkpointing'] else 'off'}",
                o["step_samples_per_s"],
                "samples/s",
                ref_name,
                ref["step_samples_per_s"],
                "",
                notes,
            )
        )
    ld = raw["loader"]
    out.append(
        row(
            f"data loader, {ld['workers']} workers",
            ld["samples_per_s"],
            "samples/s",
            "the training step (ours, checkpointing off)",
            raw["ours"][0]["step_samples_per_s"],
            ">= 2x",
            f"{ld['samples_per_s_per_worker']:.1f} samples/s per worker",
        )
    )
    return out


def infer_rows(raw: dict) -> list[dict]:
    first, out = raw["rows"][0], []
    for r in raw["rows"][1:]:
        out.append(
            row(
                f"{raw['resolution']} px, {raw['steps']} steps, {r['batch']} images per call",
                r["s_per_image"],
                "s/image",
                f"{first['batch']} image per call",
                first["s_per_image"],
                "",
                f"{raw['dtype']}; peak GPU {gib(r['peak_gib'])} (vs {gib(first['peak_gib'])})",
            )
        )
    return out


def pipeline_rows(raw: dict) -> list[dict]:
    loop, out = raw["rows"][0], []
    for r in raw["rows"][1:]:
        notes = f"{raw['images']} images; {r['seconds']:.0f} s vs {loop['seconds']:.0f} s; peak GPU (all processes) "
        notes += f"{gib(r['gpu_peak'])} vs {gib(loop['gpu_peak'])}; peak RSS {r['peak']:.1f} GiB"
        out.append(row(r["run"], r["images_per_s"], "img/s", loop["run"], loop["images_per_s"], ">= 3x", notes))
    return out


ROWS = {"stages": stages_rows, "sam": sam_rows, "train": train_rows, "infer": infer_rows, "pipeline": pipeline_rows}


# ------------------------------------------------------------------------------------------------ report


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def markdown(meta: dict, done: list[dict]) -> str:
    lines = [
        "# GPU figures (benchmarks/gpu.sh)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}; torch {meta['torch']}; Python {meta['python']}; commit {meta['commit']}",
        f"- started {meta['started']}; budget {meta['budget_s']} s; " + meta["mode"],
        "- each row beside its baseline, measured in the same run; speed-up = times faster than the baseline",
    ]
    for s in done:
        lines += ["", f"## {s['title']}", "", f"Status: {s['status']}  ", f"Command: `{s['command']}`", ""]
        if not s["rows"]:
            continue
        lines += [
            "| what | value | unit | baseline | baseline value | speed-up | goal | notes |",
            "|---|---:|---|---|---:|---:|---|---|",
        ]
        for r in s["rows"]:
            value = fmt(r["value"]) if r["value"] is not None else "not measured"
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            lines.append(
                f"| {r['what']} | {value} | {r['unit']} | {r['baseline']} | {fmt(r['baseline_value'])} | {speed} "
                f"| {r['goal']} | {r['notes']} |"
            )
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict, done: list[dict]) -> None:
    """gpu-results.md and gpu-results.json, replaced whole (a reader never sees half a file)."""
    for name, text in (
        ("gpu-results.md", markdown(meta, done)),
        ("gpu-results.json", json.dumps({"meta": meta, "sections": done}, indent=1)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


# --------------------------------------------------------------------------------------------------- run


def run_section(sec: Section, timeout: float, log, workdir: Path, dry_run: bool) -> tuple[str, dict | None, float]:
    """(status, the script's JSON or None, seconds): the script in its own process group, killed whole (Ray's
    workers too) past TIMEOUT."""
    raw_json = workdir / f"{sec.key}.json"
    argv = [sys.executable, *sec.argv]
    if sec.key != "models":
        argv += ["--json", str(raw_json)] + ([] if sec.key == "pipeline" else ["--out", str(workdir / "md")])
    if sec.key == "pipeline":
        argv += ["--out", str(workdir / "pipeline")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, also on a GPU machine
    log.write(f"\n===== {sec.key}: {' '.join(argv)} (timeout {timeout:.0f} s)\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        # the scripts that write their JSON after every row (stages.py) leave what they measured
        partial = json.loads(raw_json.read_text()) if raw_json.exists() else None
        what = "the rows measured before it are below" if partial else "not measured"
        return f"stopped at its time limit ({timeout:.0f} s): {what}", partial, time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    kill_group(proc)  # what it left running (Ray's processes) must not eat the next section's time
    if rc != 0:
        return f"failed (exit {rc}): {last_error(log.name)}", None, seconds
    if sec.key == "models":
        return f"ready in {seconds:.0f} s", {}, seconds
    if not raw_json.exists():
        return "failed: the script wrote no JSON", None, seconds
    return f"measured in {seconds:.0f} s (limit {timeout:.0f} s)", json.loads(raw_json.read_text()), seconds


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def last_error(log_path: str) -> str:
    """The last non-empty line of the log (the exception, usually), for the status line."""
    lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:300]


def machine_meta(opts, argv) -> dict:
    import torch

    machine = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    if not opts.dry_run:
        # nvidia-smi, not torch: a CUDA context here would hold GPU memory through every section
        smi = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True
            )
            if shutil.which("nvidia-smi")
            else None
        )
        machine = f"{smi.stdout.strip() if smi and smi.returncode == 0 else 'GPU unknown (no nvidia-smi)'}, {machine}"
    else:
        machine = f"no GPU used (dry run); {machine}"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "command": "bash benchmarks/gpu.sh " + " ".join(argv),
        "machine": machine,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip() or "unknown",
        "started": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "budget_s": opts.budget_s,
        "mode": "DRY RUN: tiny models on the CPU, a check that the script runs; its figures mean nothing"
        if opts.dry_run
        else "full size (random weights from the real architectures' configs)",
        "dry_run": opts.dry_run,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script end to end")
    ap.add_argument("--out", default="gpu-results", help="folder of gpu-results.md, gpu-results.json, gpu.log")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all sections (default 660; dry run 900)")
    ap.add_argument("--only", default=None, help="comma-separated section keys to run (default: all)")
    ap.add_argument("--pipeline-images", type=int, default=192, help="images of the end-to-end section")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data-loader workers (default: cores)")
    argv = sys.argv[1:] if argv is None else argv
    opts = ap.parse_args(argv)
    opts.budget_s = opts.budget_s or (900 if opts.dry_run else 660)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = sections(opts)
    if opts.only:
        keep = set(opts.only.split(","))
        todo = [s for s in todo if s.key in keep or s.key == "models"]
    meta = machine_meta(opts, argv)
    deadline = time.monotonic() + opts.budget_s
    done: list[dict] = []
    with open(out / "gpu.log", "w") as log, tempfile.TemporaryDirectory() as work:
        for i, sec in enumerate(todo):
            left = deadline - time.monotonic()
            share = SHARES[sec.key] / sum(SHARES[s.key] for s in todo[i:])
            timeout = left * share
            entry = {"key": sec.key, "title": sec.title, "command": "python " + shlex.join(sec.argv), "rows": []}
            entry["command"] = entry["command"].replace(str(ROOT) + "/", "")
            if timeout < MIN_SECTION_S:
                entry.update(status=f"not run: no time left ({left:.0f} s of the budget)", seconds=0.0, raw=None)
            else:
                done.append({**entry, "status": "running", "seconds": None, "raw": None})
                write_results(out, meta, done)
                done.pop()
                cpu0 = children_cpu_s()
                status, raw, seconds = run_section(sec, timeout, log, Path(work), opts.dry_run)
                entry.update(status=status, seconds=seconds, cpu_s=children_cpu_s() - cpu0, raw=raw)
                if raw and sec.key in ROWS:
                    try:
                        entry["rows"] = ROWS[sec.key](raw)
                    except (KeyError, IndexError, TypeError) as e:
                        entry["status"] += f"; its JSON did not read as expected ({type(e).__name__}: {e})"
            if sec.key != "models" and not entry["rows"]:
                entry["rows"] = [row(sec.title, None, "-", "-", None, "", entry["status"])]
            done.append(entry)
            write_results(out, meta, done)
            print(f"[gpu] {sec.key}: {entry['status']}", flush=True)
    print((out / "gpu-results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
