"""The README's paths, one command after the next, as a new user runs them: `subjectdiff demo`, then training on
its records (the tiny preset's defaults, the paper preset on the tiny model, a catalog selection with the
reference's object rules), `train preview`, generation from the trained checkpoint, DreamBench evaluation, and a
run killed and resumed. Every command is a subprocess of the installed entry point.

The demo's records come from tiny random models: what they hold (captions, boxes, masks) changes whenever those
models change, so nothing here expects a particular record. Where a path depends on the records having subjects
(the reference's rules select some), the test takes the path the records allow and checks the product's answer
on it: training on the subjects, or one clear line saying why there is nothing to train on. The other journey of
the README, datagen into a bucket and torchrun training from it, is tests/test_datagen_remote.py's
`test_torchrun_on_a_bucket_selection_killed_and_resumed_is_a_straight_run`.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datagen" / "sample_images"
FAST = ["run.ckpt_every=100", "run.progress='off'", "run.log_every=1"]

pytestmark = pytest.mark.slow


def subjectdiff(*argv: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """`subjectdiff ARGV` as a user runs it (python -m subjectdiff: the console script's entry point)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "subjectdiff", *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"subjectdiff {' '.join(argv)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


def error_line(p: subprocess.CompletedProcess, command: str) -> str:
    """A failed command's error: exactly one line from the command, and no traceback."""
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith(f"subjectdiff {command}: error: ")]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`subjectdiff demo --out DIR`, what `make demo` runs."""
    out = tmp_path_factory.mktemp("journey") / "demo_out"
    p = subjectdiff("demo", "--out", str(out))
    assert "records" in p.stdout and (out / "catalog.duckdb").is_file() and (out / "report.html").is_file()
    return out


@pytest.fixture(scope="module")
def reference(demo) -> int:
    """`catalog select --object-where reference` on the demo: how many records have subjects by the reference's
    rules."""
    sel = demo.parent / "reference.parquet"
    p = subjectdiff("catalog", "select", str(demo), "--object-where", "reference", "--out", str(sel))
    n = pq.read_metadata(sel).num_rows
    assert f"selected {n} sample(s)" in p.stdout
    return n


@pytest.fixture(scope="module")
def trained(demo) -> Path:
    """The issue's command on the demo's records: the tiny preset's defaults (loader settings included)."""
    run = demo.parent / "run_tiny"
    p = subjectdiff("train", "--preset", "tiny", "--records", str(demo), "--out", str(run), "run.max_steps=8", *FAST)
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 9)) and all(r["loss"] == r["loss"] for r in logs)
    assert "data: " in p.stdout and (run / "export" / "config.json").is_file()
    return run


def test_demo_then_train_generate_and_evaluate(demo, trained, tmp_path):
    """demo -> train (tiny defaults) -> generate from the checkpoint -> eval dreambench --preset tiny."""
    gen = tmp_path / "generated"
    p = subjectdiff(
        "generate",
        "--model",
        str(trained / "export"),
        "--prompt",
        "a cat on a rug",
        "--subject",
        f"{SAMPLES / 'chelsea.jpg'}:0.1,0.2,0.7,0.9",
        "--label",
        "cat",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(gen),
    )
    images = [Path(line) for line in p.stdout.split() if line.endswith(".png")]
    assert len(images) == 2 and all(Image.open(f).size == (64, 64) for f in images)
    bench = dreambench_folder(tmp_path / "dreambench")
    ev = tmp_path / "eval"
    subjectdiff(
        "eval",
        "dreambench",
        "--model",
        str(trained / "checkpoints" / "step-0000008"),
        "--data",
        str(bench),
        "--out",
        str(ev),
        "--preset",
        "tiny",
        "--num-images",
        "1",
        "--max-prompts",
        "1",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    )
    summary = json.loads((ev / "summary.json").read_text())
    assert [c["subject"] for c in summary["per_subject"]] == ["cat", "cup"]
    assert all(-1 <= v <= 1 for v in summary["means"].values())


def test_demo_then_reference_selection_then_train(demo, reference, tmp_path):
    """demo -> catalog select --object-where reference -> train --selection: trains on the records the reference's
    rules keep, or, when they keep none of these records, the trainer says so in one line."""
    sel, run = demo.parent / "reference.parquet", tmp_path / "run"
    p = subjectdiff(
        "train",
        "--preset",
        "tiny",
        "--selection",
        str(sel),
        "--out",
        str(run),
        "run.max_steps=3",
        "run.trace=true",
        *FAST,
        check=False,
    )
    if reference:
        assert p.returncode == 0, p.stderr
        keys = {k for line in (run / "trace-rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]}
        assert keys <= set(pq.read_table(sel).column("key").to_pylist())
    else:
        assert "hold no record" in error_line(p, "train")


def test_demo_then_the_paper_recipe_on_the_tiny_model(demo, reference, tmp_path):
    """demo -> train --preset paper --arch tiny (the paper's rules skip records without a subject) and
    train preview --config paper: they run when the records have subjects, else stop with one line naming a
    record and the rule it fails."""
    run, page = tmp_path / "run", tmp_path / "preview"
    p = subjectdiff(
        "train",
        "--preset",
        "paper",
        "--arch",
        "tiny",
        "--catalog",
        str(demo / "catalog.duckdb"),
        "--out",
        str(run),
        "run.max_steps=3",
        "run.precision='fp32'",
        *FAST,
        check=False,
    )
    q = subjectdiff(
        "train",
        "preview",
        "--preset",
        "paper",
        "--records",
        str(demo),
        "--sample",
        "4",
        "--out",
        str(page),
        check=False,
    )
    if reference:
        assert p.returncode == 0 and q.returncode == 0, p.stderr + q.stderr
        assert len(json.loads((run / "log.jsonl").read_text().splitlines()[-1])) and (page / "index.html").is_file()
    else:
        for proc, command in ((p, "train"), (q, "train preview")):
            line = error_line(proc, command)
            assert "no subject" in line and "record " in line and "data." in line  # the rule, by its option


def test_demo_then_a_killed_run_resumes(demo, tmp_path):
    """demo -> train, killed once it has saved a checkpoint -> the same command with --resume latest finishes the
    run from the checkpoint."""
    run = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--records",
        str(demo),
        "--out",
        str(run),
        "run.ckpt_every=2",
        "run.progress='off'",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "subjectdiff", *argv, "run.max_steps=100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not list((run / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    p = subjectdiff(*argv, "--resume", "latest", f"run.max_steps={saved + 2}")
    assert f"resumed from {run / 'checkpoints'}" in p.stdout and f"at step {saved}" in p.stdout
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [saved + 1, saved + 2]


def dreambench_folder(root: Path) -> Path:
    """A DreamBench layout with two subjects, cut from the bundled sample photos."""
    for subject, name in (("cat", "chelsea"), ("cup", "coffee")):
        (root / subject).mkdir(parents=True)
        img = Image.open(SAMPLES / f"{name}.jpg").convert("RGB")
        w, h = img.size
        for k, (x, y) in enumerate(((0, 0), (w // 8, h // 8))):
            img.crop((x, y, x + 3 * w // 4, y + 3 * h // 4)).resize((48, 48)).save(root / subject / f"{k:02d}.jpg")
    (root / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ncat,cat\ncup,cup\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the snow'.format(unique_token, class_token),\n]\n"
    )
    return root


def test_the_readmes_video_path_to_pairs_and_training_on_them(tmp_path):
    """Issue #20's journey, the README's commands with the product's defaults: the bundled clip (three shots, the
    camera panning and zooming) -> `datagen run` (frames sampled per shot, each a record with its video fields
    and identity embeddings) -> `catalog pairs --method video` -> `train --pairs` and `train preview --pairs`.
    The tiny models are random, so whether a pair passes the trainer's object rules is the records' business:
    the test checks the accounting and that every step says what it did."""
    out, pairs = tmp_path / "videos_out", tmp_path / "pairs.parquet"
    subjectdiff(
        "datagen", "run", "--preset", "tiny", "--input", str(ROOT / "datagen" / "sample_videos"), "--out", str(out)
    )

    def query(sql: str) -> list[list[str]]:
        text = subjectdiff("catalog", "query", str(out), sql, "--format", "csv").stdout
        return list(csv.reader(text.strip().splitlines()))[1:]

    [(video, shots, status, frames, frames_ok)] = query("select video, shots, status, frames, frames_ok from videos")
    assert video.endswith("clip.mp4") and int(shots) == 3 and status == "ok"  # the clip's three shots, found
    assert int(frames) == int(frames_ok) == int(query("select count(*) from samples where video is not null")[0][0])
    assert int(query("select count(distinct video_shot) from samples")[0][0]) == 3  # frames from every shot

    p = subjectdiff("catalog", "pairs", str(out), "--method", "video", "--out", str(pairs))
    n = pq.read_metadata(pairs).num_rows
    assert f"{n} video pair rows" in p.stdout and int(query("select count(*) from pairs")[0][0]) == n
    if n == 0:  # nothing to train on: the trainer says so in one line
        p = subjectdiff(
            "train",
            "--preset",
            "tiny",
            "--records",
            str(out),
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "r"),
            check=False,
        )
        assert "none of its 0 pairs" in error_line(p, "train")
        return
    rows = pq.read_table(pairs).to_pylist()
    assert all(r["ref_key"] != r["target_key"] and r["frame_gap"] > 0 for r in rows)  # two different frames
    train = ["--preset", "tiny", "--records", str(out), "--pairs", str(pairs)]
    p = subjectdiff("train", *train, "--out", str(tmp_path / "run"), "run.max_steps=2", *FAST)
    assert f"data: {n} pairs over" in p.stdout + p.stderr  # the run says how many pairs it trains on
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors").is_file()
    preview = tmp_path / "preview"
    p = subjectdiff("train", "preview", *train, "--sample", "6", "--out", str(preview))
    shown = [r for r in map(json.loads, (preview / "samples.jsonl").read_text().splitlines()) if r["pair"]]
    assert all(r["refs"] and all(ref != r["key"] for ref, _ in r["refs"]) for r in shown)  # reference -> another
    assert shown or "pair object rules" in p.stdout  # pairs shown, or the console (and page) say why none passed
