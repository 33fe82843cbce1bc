"""What a training run leaves to read: TensorBoard events beside log.jsonl, the resolved config as TOML that
`--config` reads back, and the learning rate as diffusers' get_scheduler schedules it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from diffusers.optimization import SchedulerType, get_scheduler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subjectdiff.overrides import apply, read_toml, tomllib  # tomli on Python 3.10
from subjectdiff.photo_records import write_photo_shards
from subjectdiff.train.cli import main
from subjectdiff.train.config import LR_SCHEDULERS, PRESETS, config_toml, load_config
from subjectdiff.train.trainer import TB_MISSING, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

# A run of 4 steps, warm-up over 3, validation at step 4 (its grid goes to TensorBoard too).
RUN_FLAGS = [
    "--preset",
    "tiny",
    "run.max_steps=4",
    "run.log_every=1",
    "run.ckpt_every=100",
    "run.val_every=4",
    "run.val_steps=2",
    "run.progress='off'",
    "optim.warmup_steps=3",
]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("records")
    write_photo_shards(d, n_shards=1, per_shard=4)
    return d


@pytest.fixture(scope="module")
def run(records, tmp_path_factory) -> tuple[Path, list[str]]:
    """(the run's folder, its command line's arguments) of one tiny run with TensorBoard on."""
    out = tmp_path_factory.mktemp("run") / "run"
    argv = [*RUN_FLAGS, "--records", str(records), "--out", str(out)]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(n)
    return out, argv


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def printed_config(argv: list[str], capsys) -> str:
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def test_tensorboard_events_hold_the_logged_scalars_and_the_validation_grid(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for name in ("loss", "loc", "lr", "samples_per_s"):
        assert f"train/{name}" in tags["scalars"], tags["scalars"]
    assert tags["images"] == ["val/grid"] and [e.step for e in events.Images("val/grid")] == [4]
    rows = log_rows(out)  # log.jsonl stays, with the same numbers
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_learning_rate_follows_diffusers_constant_with_warmup(run):
    out, _ = run
    cfg = load_config(config_file=str(out / "config.toml"))
    assert cfg.optim.lr_scheduler == "constant_with_warmup" == load_config("paper").optim.lr_scheduler
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=3)
    expected = []
    for _ in range(4):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr = cfg.optim.lr
    assert expected == pytest.approx([0, lr / 3, lr * 2 / 3, lr])  # linear from 0 over 3 steps, then constant
    assert [r["lr"] for r in log_rows(out)] == pytest.approx(expected)  # the rate each step applied


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_the_config_names_the_schedule(name):
    """Every name the config takes is a diffusers schedule, and the optimizer's rate follows it over max_steps."""
    assert name in {s.value for s in SchedulerType}
    cfg = load_config("tiny", [f"optim.lr_scheduler='{name}'", "optim.warmup_steps=2", "run.max_steps=6"])
    named = {"w": torch.nn.Parameter(torch.zeros(2, 2))}
    opt, sched = make_optimizer(named, cfg)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    ref = get_scheduler(name, ref_opt, num_warmup_steps=2, num_training_steps=6)
    for _ in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
        for o, s in ((opt, sched), (ref_opt, ref)):
            o.step()
            s.step()
    with pytest.raises(ValueError, match="optim.lr_scheduler must be one of"):
        load_config("tiny", ["optim.lr_scheduler='warmup_cosine'"])


def test_resume_continues_the_schedule(records, tmp_path):
    """Stopped inside the warm-up and resumed, the rates are those of the straight run."""
    flags = [f for f in RUN_FLAGS if not f.startswith(("run.max_steps", "run.val_every"))]
    common = [*flags, "--records", str(records), "run.ckpt_every=2", "run.tensorboard=false"]
    assert main([*common, "--out", str(tmp_path / "straight"), "run.max_steps=4"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "run.max_steps=2"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--resume", "latest", "run.max_steps=4"]) == 0
    straight, split = log_rows(tmp_path / "straight"), log_rows(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    assert [r["lr"] for r in split] == pytest.approx([r["lr"] for r in straight])
    assert not (tmp_path / "straight" / "tb").exists()  # run.tensorboard=false: log.jsonl only


def test_run_folder_config_reads_back_to_the_same_config(run, records, capsys):
    out, argv = run
    text = (out / "config.toml").read_text()
    assert tomllib.loads(text)["run"]["out_dir"] == str(out)
    overrides = [a for a in RUN_FLAGS if "=" in a] + [f"data.shards=['{records}']", f"run.out_dir='{out}'"]
    assert load_config(config_file=str(out / "config.toml")) == load_config("tiny", overrides)
    # through the command line: the run's own --print-config, and --config RUN/config.toml's, are the same text
    assert printed_config(["--config", str(out / "config.toml")], capsys) == printed_config(argv, capsys) == text


def test_print_config_is_toml_and_round_trips(capsys, tmp_path):
    text = printed_config(["--preset", "tiny", "run.max_steps=7", "data.catalog='c.duckdb'"], capsys)
    values = tomllib.loads(text)
    assert values["run"]["max_steps"] == 7 and values["model"]["arch"] == "tiny"
    assert values["model"]["base"] == "none" and values["data"]["catalog"] == "c.duckdb"  # unset -> "none"
    f = tmp_path / "printed.toml"
    f.write_text(text)
    assert printed_config(["--config", str(f)], capsys) == text
    cfg = load_config(config_file=str(f))  # over sd2-base (no `preset` in the file), still tiny's settings
    assert cfg == load_config("tiny", ["run.max_steps=7", "data.catalog='c.duckdb'"]) and cfg.model.base is None


optional_text = st.none() | st.text(max_size=20).filter(lambda s: s.strip().lower() not in ("none", "null"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    preset=st.sampled_from(list(PRESETS)),
    base=optional_text,
    where=optional_text,
    catalog=optional_text,
    lr=st.floats(min_value=1e-12, max_value=10, allow_nan=False),
    box_area=st.tuples(st.floats(0, 0.5), st.floats(0.5, 1)),
    shards=st.lists(st.text(min_size=1, max_size=10), max_size=3),
)
def test_written_config_reads_back_whatever_the_values(preset, base, where, catalog, lr, box_area, shards):
    """Unset options (None), any string, floats, tuples: config_toml -> --config gives the same config, laid over
    any preset. (A string option whose value is the word "none" reads back unset, as on the command line.)"""
    values = {
        "model": {"base": base},
        "data": {"where": where, "catalog": catalog or "c.duckdb", "box_area": box_area, "shards": shards},
        "optim": {"lr": lr},
    }
    cfg = apply(PRESETS[preset](), values)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "config.toml"
        f.write_text(config_toml(cfg))
        assert read_toml(f)["optim"]["lr"] == lr
        assert load_config(config_file=str(f)) == cfg


def test_missing_tensorboard_says_so_in_one_line(records, tmp_path):
    """tensorboard not importable (simulated with a sitecustomize that blocks it): the run trains, writes
    log.jsonl, and says once that TensorBoard is off and how to turn it on or silence it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "subjectdiff.train", "--preset", "tiny", "--records", str(records)]
    cmd += ["--out", str(out), "run.max_steps=1", "run.ckpt_every=100", "run.progress='off'"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notices = [line for line in done.stderr.splitlines() if TB_MISSING in line]
    assert len(notices) == 1 and notices[0].startswith("warning: tensorboard cannot be imported"), done.stderr
    assert len(log_rows(out)) == 1 and not (out / "tb").exists()
    check = "import torch.utils.tensorboard"
    blocked = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0  # the simulation does block it
