"""train/: the step, the loop, checkpoints/resume, torchrun DDP (gloo), catalog selections. Tiny, CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.records import write_photo_shards
from train.cli import main
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """2 shards x 4 records on real photos, with a catalog."""
    from catalogs.catalog import build

    d = tmp_path_factory.mktemp("shards")
    keys = write_photo_shards(d, n_shards=2, per_shard=4)
    build(d)
    return d, keys


def tiny_cfg(shards_dir: Path, out: Path, *overrides: str):
    return load_config("tiny", [f"data.shards=['{shards_dir}']", f"run.out_dir='{out}'", *overrides])


def traced_keys(out: Path, rank: int = 0) -> list[list[str]]:
    lines = (out / f"trace-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["keys"] for line in lines]


def test_data_samples_keep_subjects(shards):
    from train.data import TrainSamples, make_reader

    cfg = tiny_cfg(shards[0], Path("/unused"))
    reader = make_reader(cfg.data, None, 0, 1, 0)
    samples = list(TrainSamples(reader, cfg, 32))
    assert sorted(s["key"] for s in samples) == sorted(shards[1])
    for s in samples:
        assert s["image"].shape == (3, 64, 64) and s["subjects"].shape == (2, 3, 32, 32)
        assert s["present"].all()  # every photo has >= 2 objects
        b = s["boxes"]
        assert (b >= 0).all() and (b <= 1).all() and (b[:, 2] > b[:, 0]).all()
        # the object's mask lies in its renormalized box
        for j in range(2):
            m = s["masks"][j] > 0.5
            ys, xs = m.nonzero()
            assert m.any() and xs.min() >= b[j, 0] * 8 - 1 and xs.max() <= b[j, 2] * 8 + 1
        ids = s["input_ids"]
        assert [ids[p] for p in s["placeholder_pos"]] == [ids[s["placeholder_pos"][0]]] * 2
        assert (s["loc_pos"][:, 0] >= 1).all()
    # The same record gives the same sample (seeded by seed, epoch, key): resumable.
    again = {s["key"]: s for s in TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32)}
    for s in samples:
        assert (again[s["key"]]["subjects"] == s["subjects"]).all()


def test_only_configured_parameters_get_gradients(shards, tmp_path):
    from subjectdiff.model import build
    from train.data import BatchStream, TrainSamples, make_reader
    from train.step import encode_inputs, training_step

    for trainable in (None, ("adapters", "grounding")):
        cfg = tiny_cfg(shards[0], tmp_path, "loss.drop_text=0.0", "loss.drop_all=0.0", "loss.drop_subjects=0.0",
                       *([f"model.trainable={list(trainable)}"] if trainable else []))
        parts = build(cfg.model)
        batch = next(iter(BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 0)))
        enc = encode_inputs(parts, batch, torch.device("cpu"))
        assert all(t.grad_fn is None and not t.requires_grad for t in enc.values())  # no autograd graph
        loss, terms = training_step(parts.model, parts, batch, cfg.loss, torch.Generator().manual_seed(0),
                                    torch.device("cpu"), torch.autocast("cpu", enabled=False))
        loss.backward()
        names = set(parts.model.trainable_names())
        for n, p in parts.model.named_parameters():
            assert (p.grad is not None) == (n in names), n
        assert all(p.grad is None for p in parts.vae.parameters())
        assert all(p.grad is None for p in parts.image_encoder.parameters())
        assert terms["loc"] > 0
        if trainable:
            assert names and all(".fuser." in n or ".position_net." in n for n in names)


def test_gradient_checkpointing_gives_same_gradients(shards, tmp_path):
    from subjectdiff.model import build
    from train.data import BatchStream, TrainSamples, make_reader
    from train.step import training_step

    cfg = tiny_cfg(shards[0], tmp_path)
    batch = next(iter(BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 0)))
    grads = []
    for ckpt in (False, True):
        parts = build(cfg.model)
        parts.model.train()
        if ckpt:
            parts.model.enable_gradient_checkpointing()
        loss, _ = training_step(parts.model, parts, batch, cfg.loss, torch.Generator().manual_seed(0),
                                torch.device("cpu"), torch.autocast("cpu", enabled=False))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in parts.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_overfitting_a_few_records_lowers_the_loss(shards, tmp_path):
    from train.step import training_step
    from train.trainer import Trainer

    cfg = tiny_cfg(shards[0], tmp_path, "run.max_steps=40", "run.ckpt_every=1000", "run.log_every=10",
                   "optim.lr=3e-3", "optim.ema_decay=0.0", "loss.drop_all=0.0", "loss.drop_text=0.0",
                   "loss.drop_location=0.0", "loss.drop_subjects=0.0", "data.batch_size=4",
                   f"data.shards=['{shards[0]}/00000.tar']", "model.trainable=['unet', 'text_mlp']")
    trainer = Trainer(cfg)
    batch = next(iter(trainer.stream))
    trainer.stream.batches = 0

    def fixed_loss() -> float:
        with torch.no_grad():
            return training_step(trainer.model, trainer.parts, batch, cfg.loss, torch.Generator().manual_seed(1),
                                 trainer.d.device, trainer.autocast())[1]["mse"]

    before = fixed_loss()
    trainer.train()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


def test_resume_latest_matches_straight_run(shards, tmp_path):
    """Stop at step 3, `--resume latest` to step 6 == 6 steps straight. Crosses an epoch boundary (4 batches
    per epoch). Tolerance: exact up to 1e-6 (same CPU, same thread count; float math is deterministic here)."""
    common = ["--config", "tiny", "--shards", str(shards[0])]
    sets = ["run.ckpt_every=3", "run.log_every=3", "optim.ema_decay=0.5"]
    assert main([*common, "--out", str(tmp_path / "straight"), *sets, "run.max_steps=6"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), *sets, "run.max_steps=3"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--resume", "latest", *sets, "run.max_steps=6"]) == 0
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000006" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "step-0000006" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    sa = torch.load(tmp_path / "straight/checkpoints/step-0000006/trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "split/checkpoints/step-0000006/trainer_state.pt", weights_only=False)
    assert sa["data"] == sb["data"] and sa["step"] == sb["step"] == 6
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] and len(
        list((tmp_path / "split" / "checkpoints").iterdir())) <= 3  # keep_last


def test_selection_uses_exactly_the_selected_records(shards, tmp_path):
    from catalogs.catalog import query

    where = "source LIKE 'skimage://c%'"  # chelsea and coffee
    want = set(query(shards[0], f"SELECT key FROM samples WHERE {where}").column("key").to_pylist())
    assert 0 < len(want) < len(shards[1])
    out = tmp_path / "sel"
    assert main(["--config", "tiny", "--catalog", str(shards[0]), "--where", where, "--out", str(out),
                 "run.max_steps=4", "run.trace=true", "data.batch_size=1", "run.ckpt_every=100",
                 "run.val_every=4"]) == 0
    seen = [k for keys in traced_keys(out) for k in keys]
    assert (out / "samples" / "step-0000004.png").exists()  # the validation grid
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "loc", "lr", "samples_per_s", "grad_norm"} <= set(logged[-1])
    assert set(seen) == want
    assert sorted(seen[: len(want)]) == sorted(want)  # one epoch = each selected record once


@pytest.mark.slow
def test_torchrun_two_ranks_disjoint_and_in_sync(shards, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "train",
           "--config", "tiny", "--shards", str(shards[0]), "--out", str(out), "run.max_steps=2", "run.trace=true",
           "run.ckpt_every=2", "optim.grad_accum=2", "data.batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    k0 = [k for keys in traced_keys(out, 0) for k in keys]
    k1 = [k for keys in traced_keys(out, 1) for k in keys]
    assert len(k0) == len(k1) == 4  # 2 steps x 2 micro-batches x batch 1
    assert not set(k0) & set(k1)  # disjoint records within the epoch
    d0 = json.loads((out / "digest-rank0.json").read_text())
    d1 = json.loads((out / "digest-rank1.json").read_text())
    assert d0 == d1  # trainable parameters identical on both ranks
    assert (out / "checkpoints" / "step-0000002" / "model.safetensors").exists()


def test_square_crop_contains_the_subjects():
    import numpy as np

    from train.data import square_crop

    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(32, 400)), int(rng.integers(32, 400))
        x0, y0 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        box = np.array([[x0, y0, rng.uniform(x0 + 1, w), rng.uniform(y0 + 1, h)]])
        cx, cy, side = square_crop(w, h, box, rng)
        assert cx <= box[0, 0] and cy <= box[0, 1] and cx + side >= box[0, 2] and cy + side >= box[0, 3]
        if side <= min(w, h):
            assert 0 <= cx <= w - side and 0 <= cy <= h - side


def test_config_toml_presets_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny"\n[data]\nbatch_size = 3\nshards = ["a/"]\n[optim]\nlr = 1\n')
    cfg = load_config(str(f), ["loss.loc_weight=0.5", "model.base=/models/sd2", "run.out_dir=runs/x y"])
    assert cfg.model.arch == "tiny" and cfg.data.batch_size == 3 and cfg.data.shards == ("a/",)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.loss.loc_weight == 0.5
    assert cfg.model.base == "/models/sd2" and cfg.run.out_dir == "runs/x y"
    assert load_config("sd2-base").loss.loc_weight == 0.01 and load_config("sd2-base").model.max_subjects == 2
    with pytest.raises(ValueError, match="unknown config key data.batchsize"):
        load_config("tiny", ["data.batchsize=2"])
    with pytest.raises(ValueError, match="run.precision"):
        load_config("tiny", ["run.precision=fp8"])


def test_subjectdiff_train_subcommand(capsys):
    from subjectdiff.cli import main as subjectdiff_main

    assert subjectdiff_main(["train", "--config", "tiny", "--print-config", "--out", "runs/t", "run.max_steps=7"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["run"]["max_steps"] == 7 and cfg["run"]["out_dir"] == "runs/t" and cfg["model"]["arch"] == "tiny"
    assert subjectdiff_main(["train", "--config", "no-such-preset"]) == 2
