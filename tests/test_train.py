"""train/: the step, the loop, checkpoints/resume, torchrun DDP (gloo), catalog selections. Tiny, CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subjectdiff.overrides import tomllib  # tomli on Python 3.10
from subjectdiff.photo_records import write_photo_shards
from subjectdiff.train.cli import main
from subjectdiff.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """2 shards x 4 records on real photos, with a catalog."""
    from subjectdiff.catalogs.catalog import build

    d = tmp_path_factory.mktemp("shards")
    keys = write_photo_shards(d, n_shards=2, per_shard=4)
    build(d)
    return d, keys


def tiny_cfg(shards_dir: Path, out: Path, *overrides: str):
    return load_config("tiny", [f"data.shards=['{shards_dir}']", f"run.out_dir='{out}'", *overrides])


def traced_keys(out: Path, rank: int = 0) -> list[list[str]]:
    lines = (out / f"trace-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line)["keys"] for line in lines]


# The subjects the reference's rules choose on subjectdiff/photo_records.py's photos, in descending score: the
# astronaut, the cat and the galaxies cover more than 0.7 of their images, "galaxy" is not in "galaxies ...".
CHOSEN = {
    "astronaut": ["helmet", "flag"],
    "chelsea": ["whisker"],
    "coffee": ["cup", "saucer"],
    "rocket": ["rocket", "launchpad"],
    "hubble_deep_field": ["hippopotamus"],
}


def test_data_samples_keep_subjects(shards):
    from subjectdiff.catalogs.reader import RecordReader
    from subjectdiff.train.data import TrainSamples, make_reader

    cfg = tiny_cfg(shards[0], Path("/unused"))
    reader = make_reader(cfg.data, None, 0, 1, 0)
    samples = list(TrainSamples(reader, cfg, 32))
    assert sorted(s["key"] for s in samples) == sorted(shards[1])
    source = {r.key: r.source.split("/")[2] for r in RecordReader(shards[0], decode_image=False, decode_masks=False)}
    for s in samples:
        assert s["image"].shape == (3, 64, 64) and s["subjects"].shape == (2, 3, 32, 32)
        assert json.loads(s["labels"]) == CHOSEN[source[s["key"]]]
        n = len(CHOSEN[source[s["key"]]])
        assert s["present"].tolist() == [True] * n + [False] * (2 - n) and (s["objects"][n:] == -1).all()
        b = s["boxes"][:n]
        assert (b >= 0).all() and (b <= 1).all() and (b[:, 2] > b[:, 0]).all()
        # the object's mask lies in its renormalized box
        for j in range(n):
            m = s["masks"][j] > 0.5
            ys, xs = m.nonzero()
            assert m.any() and xs.min() >= b[j, 0] * 8 - 1 and xs.max() <= b[j, 2] * 8 + 1
        ids = s["input_ids"]
        sks = ids[s["placeholder_pos"][0]]
        assert [ids[p] for p in s["placeholder_pos"][:n]] == [sks] * n
        # each subject localizes on its own clause: its label word and its placeholder
        for j in range(n):
            assert s["loc_pos"][j, 0] >= 1 and s["placeholder_pos"][j] in s["loc_pos"][j]
    # The same record gives the same sample (seeded by seed, epoch, key): resumable.
    again = {s["key"]: s for s in TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32)}
    for s in samples:
        assert (again[s["key"]]["subjects"] == s["subjects"]).all()


def test_only_configured_parameters_get_gradients(shards, tmp_path):
    from subjectdiff.model import build
    from subjectdiff.train.data import BatchStream, TrainSamples, make_reader
    from subjectdiff.train.step import encode_inputs, training_step

    for trainable in (None, ("adapters", "grounding")):
        cfg = tiny_cfg(
            shards[0],
            tmp_path,
            "loss.drop_text=0.0",
            "loss.drop_all=0.0",
            "loss.drop_subjects=0.0",
            *([f"model.trainable={list(trainable)}"] if trainable else []),
        )
        parts = build(cfg.model)
        batch = next(iter(BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 0)))
        enc = encode_inputs(parts, batch, torch.device("cpu"))
        assert all(t.grad_fn is None and not t.requires_grad for t in enc.values())  # no autograd graph
        loss, terms = training_step(
            parts.model,
            parts,
            batch,
            cfg.loss,
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
            torch.autocast("cpu", enabled=False),
        )
        loss.backward()
        names = set(parts.model.trainable_names())
        for n, p in parts.model.named_parameters():
            assert (p.grad is not None) == (n in names), n
        assert all(p.grad is None for p in parts.vae.parameters())
        assert all(p.grad is None for p in parts.image_encoder.parameters())
        assert terms["loc"] != 0  # the reference's form, mean(A, background) - mean(A, object), can be < 0
        if trainable:
            assert names and all(".fuser." in n or ".position_net." in n for n in names)


def test_gradient_checkpointing_gives_same_gradients(shards, tmp_path):
    from subjectdiff.model import build
    from subjectdiff.train.data import BatchStream, TrainSamples, make_reader
    from subjectdiff.train.step import training_step

    cfg = tiny_cfg(shards[0], tmp_path)
    batch = next(iter(BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 0)))
    grads = []
    for ckpt in (False, True):
        parts = build(cfg.model)
        parts.model.train()
        if ckpt:
            parts.model.enable_gradient_checkpointing()
        loss, _ = training_step(
            parts.model,
            parts,
            batch,
            cfg.loss,
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
            torch.autocast("cpu", enabled=False),
        )
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in parts.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_overfitting_a_few_records_lowers_the_loss(shards, tmp_path):
    from subjectdiff.train.data import BatchStream
    from subjectdiff.train.step import training_step
    from subjectdiff.train.trainer import Trainer

    cfg = tiny_cfg(
        shards[0],
        tmp_path,
        "run.max_steps=40",
        "run.ckpt_every=1000",
        "run.log_every=10",
        "optim.lr=3e-3",
        "optim.ema_decay=0.0",
        "loss.drop_all=0.0",
        "loss.drop_text=0.0",
        "loss.drop_location=0.0",
        "loss.drop_subjects=0.0",
        "data.batch_size=4",
        f"data.shards=['{shards[0]}/00000.tar']",
        "model.trainable=['unet', 'text_mlp']",
    )
    trainer = Trainer(cfg)
    batch = next(iter(BatchStream(trainer.stream.dataset, 4, 0)))

    def fixed_loss() -> float:
        with torch.no_grad():
            return training_step(
                trainer.model,
                trainer.parts,
                batch,
                cfg.loss,
                torch.Generator().manual_seed(1),
                trainer.d.device,
                trainer.autocast(),
            )[1]["mse"]

    before = fixed_loss()
    trainer.train()
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)


def test_resume_latest_matches_straight_run(shards, tmp_path):
    """Stop at step 3, `--resume latest` to step 6 == 6 steps straight. Crosses an epoch boundary (4 batches
    per epoch). Tolerance: exact up to 1e-6 (same CPU, same thread count; float math is deterministic here)."""
    common = ["--preset", "tiny", "--records", str(shards[0])]
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
        list((tmp_path / "split" / "checkpoints").iterdir())
    ) <= 3  # keep_last

    # A checkpoint in the older format (data position = batch count only, one optimizer group) resumes too.
    import shutil

    from subjectdiff.model import build
    from subjectdiff.train.trainer import decay_groups

    old = tmp_path / "old" / "checkpoints" / "step-0000003"
    shutil.copytree(tmp_path / "split" / "checkpoints" / "step-0000003", old)
    state = torch.load(old / "trainer_state.pt", weights_only=False)
    state["data"] = [{"epoch": d["epoch"], "batches": d["batches"]} for d in state["data"]]
    model = build(load_config("tiny").model).model
    names = model.trainable_names()
    index = {n: i for i, n in enumerate(sum(decay_groups({n: model.get_parameter(n) for n in names}), []))}
    opt = state["optimizer"]
    opt["state"] = {i: opt["state"][index[n]] for i, n in enumerate(names)}
    opt["param_groups"] = [{**opt["param_groups"][0], "params": list(range(len(names)))}]
    for key in ("base_lrs", "_last_lr"):
        state["scheduler"][key] = state["scheduler"][key][:1]
    torch.save(state, old / "trainer_state.pt")
    assert main([*common, "--out", str(tmp_path / "old"), "--resume", "latest", *sets, "run.max_steps=6"]) == 0
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000006" / "model.safetensors")
    b = load_file(tmp_path / "old" / "checkpoints" / "step-0000006" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_selection_uses_exactly_the_selected_records(shards, tmp_path):
    from subjectdiff.catalogs.catalog import query

    where = "source LIKE 'skimage://c%'"  # chelsea and coffee
    want = set(query(shards[0], f"SELECT key FROM samples WHERE {where}").column("key").to_pylist())
    assert 0 < len(want) < len(shards[1])
    out = tmp_path / "sel"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--catalog",
                str(shards[0] / "catalog.duckdb"),
                "--where",
                where,
                "--out",
                str(out),
                "run.max_steps=4",
                "run.trace=true",
                "data.batch_size=1",
                "run.ckpt_every=100",
                "run.val_every=4",
            ]
        )
        == 0
    )
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
    # --where: rank 0 selects, the other rank gets the selection through torch.distributed (gloo)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "subjectdiff.train",
        "--preset",
        "tiny",
        "--catalog",
        str(shards[0] / "catalog.duckdb"),
        "--where",
        "n_objects >= 2",
        "--out",
        str(out),
        "run.max_steps=2",
        "run.trace=true",
        "run.ckpt_every=2",
        "optim.grad_accum=2",
        "data.batch_size=1",
    ]
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
    # only rank 0 logs: one TensorBoard event file, one log.jsonl row per step
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert len((out / "log.jsonl").read_text().splitlines()) == 2 and (out / "config.toml").is_file()


@pytest.mark.slow
def test_torchrun_with_a_bad_where_stops_every_rank_in_one_line(shards, tmp_path):
    """Was: rank 0 said what was wrong in one line, and rank 1 printed a traceback for it. Now every rank stops
    with one line (exit 2), rank 0's naming the column, the other's pointing at rank 0. (torchrun's launcher
    still prints its own traceback, of torch.distributed frames only, when a rank fails.)"""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += ["-m", "subjectdiff.train", "--preset", "tiny", "--catalog", str(shards[0] / "catalog.duckdb")]
    cmd += ["--where", "n_objectz >= 2", "--out", str(tmp_path / "ddp"), "run.max_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    said = r.stdout + r.stderr
    ours = [ln for ln in said.splitlines() if ln.strip().startswith('File "') and "torch/distributed" not in ln]
    assert r.returncode != 0 and not [ln for ln in ours if "<frozen" not in ln], said[-3000:]
    errors = [ln for ln in said.splitlines() if ln.startswith("subjectdiff train: error:")]
    assert len(errors) == 2 and "n_objectz" in errors[0] + errors[1], said[-3000:]
    assert any("rank 1: stopping, rank 0 could not resolve the run's selection" in e for e in errors)


def test_resume_with_where_reuses_the_run_selection(shards, tmp_path, capsys):
    """A resumed --where run reads the selection saved with the run: it does not query the catalog again (here
    gone), and a different --where is refused instead of pointing the saved data position into other records."""
    import shutil

    from subjectdiff.catalogs.catalog import query

    data = tmp_path / "shards"
    shutil.copytree(shards[0], data)
    where = "source LIKE 'skimage://c%'"
    want = set(query(data, f"SELECT key FROM samples WHERE {where}").column("key").to_pylist())
    out = tmp_path / "run"
    args = [
        "--preset",
        "tiny",
        "--catalog",
        str(data / "catalog.duckdb"),
        "--out",
        str(out),
        "run.trace=true",
        "data.batch_size=1",
        "run.ckpt_every=2",
    ]
    assert main([*args, "--where", where, "run.max_steps=2"]) == 0
    saved = (out / "selection.parquet").read_bytes()
    (data / "catalog.duckdb").unlink()
    assert main([*args, "--where", "n_objects > 2", "--resume", "latest", "run.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "keeps its selection" in err and len(err.splitlines()) == 1  # one line, no traceback
    assert main([*args, "--where", where, "--resume", "latest", "run.max_steps=4"]) == 0
    assert (out / "selection.parquet").read_bytes() == saved
    seen = [k for keys in traced_keys(out) for k in keys]
    assert len(seen) == 4 and set(seen) == want  # one epoch: each selected record once, across the resume


def test_trainer_puts_the_model_in_train_mode(shards, tmp_path, monkeypatch):
    """from_pretrained builds the text encoder in eval mode; the trainer must train it in train mode (gradient
    checkpointing in transformers, dropout), also after a validation, with the frozen encoders in eval."""
    import subjectdiff.train.trainer
    from subjectdiff.model import build

    def built_in_eval(cfg):
        parts = build(cfg)
        parts.model.eval()
        parts.vae.train()
        return parts

    monkeypatch.setattr(subjectdiff.train.trainer, "build", built_in_eval)
    trainer = subjectdiff.train.trainer.Trainer(tiny_cfg(shards[0], tmp_path, "run.val_steps=2", "run.val_samples=1"))

    def check() -> None:
        assert all(m.training for m in trainer.model.modules())
        assert not any(m.training for part in (trainer.parts.vae, trainer.parts.image_encoder) for m in part.modules())

    check()
    trainer.val_batch = {k: v[:1] for k, v in next(iter(trainer.stream)).items()}
    trainer.validate()
    check()


def test_skipped_fp16_step_moves_neither_scheduler_nor_ema(shards, tmp_path, monkeypatch):
    """When the grad scaler skips a step (inf gradients), the LR schedule and the EMA stay where they are."""
    import subjectdiff.train.trainer

    trainer = subjectdiff.train.trainer.Trainer(tiny_cfg(shards[0], tmp_path, "optim.ema_decay=0.5"))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # fp16's scaler, on the fp32 tiny model
    batches = iter(trainer.stream)
    trainer.train_step(batches)
    lr, shadow = trainer.sched.last_epoch, {k: v.clone() for k, v in trainer.ema.shadow.items()}
    params = {k: p.detach().clone() for k, p in trainer.named.items()}
    step = subjectdiff.train.trainer.training_step

    def inf_loss(*args, **kwargs):
        loss, terms = step(*args, **kwargs)
        return loss * float("inf"), terms

    monkeypatch.setattr(subjectdiff.train.trainer, "training_step", inf_loss)
    trainer.train_step(batches)
    assert trainer.scaler.get_scale() == 2.0**7  # the scaler saw inf and backed off
    assert trainer.sched.last_epoch == lr
    assert all(torch.equal(trainer.ema.shadow[k], shadow[k]) for k in shadow)
    assert all(torch.equal(p, params[k]) for k, p in trainer.named.items())


def test_weight_decay_groups_and_single_group_checkpoints(shards, tmp_path):
    """Biases, norm weights, tanh gates and null features get no weight decay; a one-group optimizer state
    (checkpoints from before the split) loads into the two groups with the same per-parameter moments."""
    from subjectdiff.model import build
    from subjectdiff.train.trainer import decay_groups, make_optimizer, split_one_group

    cfg = tiny_cfg(shards[0], tmp_path)
    model = build(cfg.model).model
    named = {n: model.get_parameter(n) for n in model.trainable_names()}
    decay, no_decay = decay_groups(named)
    assert any(".alpha_attn" in n for n in no_decay) and any("null_token_feature" in n for n in no_decay)
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)
    assert all(named[n].ndim >= 2 for n in decay) and "unet.conv_in.weight" in decay
    opt, sched = make_optimizer(named, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]

    old = torch.optim.AdamW(list(named.values()), lr=1.0, weight_decay=cfg.optim.weight_decay)
    old_sched = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 0.5)
    for p in named.values():
        p.grad = torch.randn_like(p)
    old.step()
    old_sched.step()
    state = {"optimizer": old.state_dict(), "scheduler": old_sched.state_dict()}
    split_one_group(state, named)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    assert sched.get_last_lr() == [0.5, 0.5]
    for p in named.values():
        assert torch.equal(opt.state[p]["exp_avg"], old.state[p]["exp_avg"])


def uneven_shards(d: Path, sizes: list[int]) -> list[str]:
    """Shards of the given record counts (distinct keys), for split tests that only look at keys."""
    from subjectdiff.catalogs.schema import Record, make_key
    from subjectdiff.catalogs.writer import ShardWriter
    from subjectdiff.photo_records import photo_record

    base, keys = photo_record("chelsea")[0], []
    for s, size in enumerate(sizes):
        with ShardWriter(d, f"{s:05d}") as w:
            for i in range(size):
                src = f"x://{s}/{i}"
                w.write(
                    Record(
                        **{
                            **base.__dict__,
                            "key": make_key(src),
                            "source": src,
                            "objects": [type(o)(**o.__dict__) for o in base.objects],
                        }
                    )
                )
                keys.append(make_key(src))
    return keys


def test_balanced_split_gives_ranks_equal_disjoint_batches(tmp_path):
    """Uneven shards (7, 3, 2 records) over 2 ranks x 2 workers, batch 2: whole shards would give the ranks
    different counts (one runs into its next epoch while the other is still in this one); the balanced split
    gives every rank the same full batches, disjoint, dropping the remainder (12 - 4 x 2 = 4 records)."""
    from subjectdiff.catalogs.reader import RecordReader

    keys = uneven_shards(tmp_path, [7, 3, 2])
    for epoch in range(2):
        seen = []
        for rank in range(2):
            reader = RecordReader(
                tmp_path,
                split="balanced",
                multiple=2,
                rank=rank,
                world_size=2,
                shuffle_seed=0,
                decode_image=False,
                decode_masks=False,
            )
            reader.set_epoch(epoch)
            assert (reader.epoch_size(), reader.quota(4)) == (12, 2)
            loader = torch.utils.data.DataLoader(reader, batch_size=2, num_workers=2, collate_fn=list)
            seen.append([[r.key for r in batch] for batch in loader])
        assert len(seen[0]) == len(seen[1]) == 2 and all(len(b) == 2 for b in seen[0] + seen[1])
        flat = [k for batches in seen for b in batches for k in b]
        assert len(set(flat)) == len(flat) == 8 and set(flat) <= set(keys)


def test_resume_skips_records_without_decoding_them(shards, tmp_path, monkeypatch):
    """A stream resumed at batch 3 (2 DataLoader workers, so mid round robin) yields exactly what the
    uninterrupted stream yields from there, across the epoch boundary, and decodes none of the 3 x 2 records
    it skips (decode_record logs each key it decodes, from the forked workers too)."""
    import subjectdiff.catalogs.reader
    from subjectdiff.train.data import BatchStream, TrainSamples, make_reader

    log = tmp_path / "decoded.txt"
    decode = subjectdiff.catalogs.reader.decode_record

    def logged(sample, **kw):
        with open(log, "a") as f:
            f.write(sample["__key__"] + "\n")
        return decode(sample, **kw)

    monkeypatch.setattr(subjectdiff.catalogs.reader, "decode_record", logged)
    cfg = tiny_cfg(shards[0], tmp_path, "data.num_workers=2")

    def stream(state=None) -> BatchStream:
        s = BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 2)
        if state is not None:
            s.load_state(state)
        return s

    def take(it, n: int) -> list[list[str]]:
        return [list(next(it)["key"]) for _ in range(n)]

    straight = take(iter(stream()), 8)  # 2 epochs of 4 batches
    first = stream()
    it = iter(first)
    assert take(it, 3) == straight[:3]
    state = first.state()
    assert state == {"epoch": 0, "batches": 3, "samples": [4, 2], "next_part": 1}
    it.close()  # its workers stop (they may still be prefetching the epoch's last batch)
    log.unlink(missing_ok=True)
    it = iter(stream(state))
    assert take(it, 1) == straight[3:4]
    # None of the 3 x 2 skipped records is decoded; the rest of epoch 0 (its last batch) is. A worker may
    # decode a record twice or start on the next epoch under load, so the check is on sets, not counts.
    decoded = set(log.read_text().split())
    assert not decoded & {k for batch in straight[:3] for k in batch} and set(straight[3]) <= decoded
    assert take(it, 4) == straight[4:]
    # a position without per-worker counts (older checkpoints) lands at the same place
    assert take(iter(stream({"epoch": 0, "batches": 3})), 5) == straight[3:]


def test_square_crop_stays_in_the_image_and_contains_what_fits():
    """Never padded: the crop lies inside the image; it contains the box when the box fits in the short side, and
    lies inside the box on an axis the box overflows (was: padded grey around a box larger than the short side)."""
    import numpy as np

    from subjectdiff.train.data import square_crop

    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(32, 400)), int(rng.integers(32, 400))
        x0, y0 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        box = np.array([[x0, y0, rng.uniform(x0 + 1, w), rng.uniform(y0 + 1, h)]])
        for policy in ("short-side", "zoom"):
            cx, cy, side = square_crop(w, h, box, rng, policy)
            assert 0 <= cx <= w - side and 0 <= cy <= h - side and side <= min(w, h)
            if policy == "short-side":
                assert side == min(w, h)
            for lo, hi, c in ((box[0, 0], box[0, 2], cx), (box[0, 1], box[0, 3], cy)):
                if np.ceil(hi) - np.floor(lo) <= min(w, h) and max(np.ceil(box[0, 2:]) - np.floor(box[0, :2])) <= min(
                    w, h
                ):
                    assert c <= lo and c + side >= hi
                elif np.ceil(hi) - np.floor(lo) > side:
                    assert np.floor(lo) <= c and c + side <= np.ceil(hi)


def test_config_toml_presets_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny"\n[data]\nbatch_size = 3\nshards = ["a/"]\n[optim]\nlr = 1\n')
    cfg = load_config(
        None, ["loss.loc_weight=0.5", "model.base=/models/sd2", "run.out_dir=runs/x y"], config_file=str(f)
    )
    assert cfg.model.arch == "tiny" and cfg.data.batch_size == 3 and cfg.data.shards == ("a/",)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.loss.loc_weight == 0.5
    assert cfg.model.base == "/models/sd2" and cfg.run.out_dir == "runs/x y"
    assert load_config("sd2-base").loss.loc_weight == 0.01 and load_config("sd2-base").model.max_subjects == 2
    with pytest.raises(ValueError, match="unknown setting data.batchsize"):
        load_config("tiny", ["data.batchsize=2"])
    with pytest.raises(ValueError, match="run.precision"):
        load_config("tiny", ["run.precision=fp8"])


def test_subjectdiff_train_subcommand(capsys):
    from subjectdiff.cli import main as subjectdiff_main

    assert subjectdiff_main(["train", "--preset", "tiny", "--print-config", "--out", "runs/t", "run.max_steps=7"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)  # TOML, what --config reads
    assert cfg["run"]["max_steps"] == 7 and cfg["run"]["out_dir"] == "runs/t" and cfg["model"]["arch"] == "tiny"
    assert subjectdiff_main(["train", "--config", "no-such-preset"]) == 2


def test_paper_preset_is_the_reference_setting():
    """`--preset paper`: the reference's train.sh / train.py hyperparameters and CFG scheme, its selection and
    augmentation defaults, its MLP forms and localization layers."""
    from subjectdiff.train.step import drop_events

    cfg = load_config("paper")
    o, loss, d, m = cfg.optim, cfg.loss, cfg.data, cfg.model
    assert (o.lr, o.weight_decay, o.warmup_steps, o.grad_clip, d.batch_size) == (3e-5, 0.0, 1000, 0.0, 8)
    assert (loss.drop_text, loss.drop_text_location, loss.drop_location, loss.drop_subjects, loss.drop_all) == (
        0.05,
        0.05,
        0.05,
        0,
        0,
    )
    assert (loss.loc_weight, loss.loc_masks, loss.loc_reduce, loss.vae_sample) == (0.01, "soft", "sample", True)
    assert (d.resolution, d.pick, d.object_rules, d.box_area, d.box_aspect, d.min_score) == (
        512,
        "score",
        True,
        (0.08, 0.7),
        (0.3, 3.0),
        0.3,
    )
    assert (d.min_mask_fill, d.box_segments, d.max_containment, d.max_white) == (0.6, (2, 5), 0.8, 0.1)
    assert (d.flip_p, d.rotate_deg, d.perspective, d.perspective_p, d.background_area) == (0.5, 10, 0.5, 0.5, 0.5)
    assert d.loc_tokens == ("label", "placeholder")
    assert (d.single_word_label, d.label_in_caption, d.mask_within_box, d.fill_holes) == (True, True, True, True)
    assert (d.min_crop_box_area, d.crop_aspect, d.min_mask_area, d.pick) == (200 / 512**2, (0.3, 3.0), 0.0, "score")
    assert (d.crop, d.no_subject, d.augment, d.background, d.backgrounds) == ("short-side", "skip", True, "white", None)
    assert (d.object_where, d.where, d.selection, d.shards, d.num_workers, d.subject_size) == (
        None,
        None,
        None,
        (),
        6,
        0,
    )
    assert (m.max_subjects, m.mlp, m.null_features, m.fourier_order) == (2, "reference", "per-token", "gligen")
    assert m.loc_layers == ("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.2.")
    assert (m.arch, m.base, m.image_encoder, m.image_encoder_weights, m.placeholder) == (
        "sd2-base",
        "stabilityai/stable-diffusion-2-base",
        "ViT-H-14",
        "laion2b_s32b_b79k",
        "sks",
    )
    # the reference's trainable set: cross-attention K/V, adapters, conv_in, text encoder, text MLP, grounding net
    assert set(m.trainable) == {"conv_in", "cross_kv", "adapters", "grounding", "text_mlp", "text_encoder"}
    assert (o.betas, o.eps, o.grad_accum, o.ema_decay, o.ema_warmup) == ((0.9, 0.999), 1e-8, 1, 0.9999, True)
    r = cfg.run
    assert (r.precision, r.frozen_dtype, r.gradient_checkpointing, r.max_steps, r.out_dir) == (
        "bf16",
        "auto",
        True,
        100_000,
        "runs/paper",
    )
    assert (r.val_guidance, r.val_subject_guidance, r.val_scheduler) == (7.5, 1.5, "PNDMScheduler")
    # text (with its CLS fusion) dropped 10 %, the location map 10 %, both 5 %, subjects never
    drops = drop_events(200_000, loss, torch.Generator().manual_seed(0), torch.device("cpu"))
    text, loc, subj = (drops[k].float() for k in ("text", "location", "subjects"))
    assert text.mean().item() == pytest.approx(0.10, abs=3e-3) and loc.mean().item() == pytest.approx(0.10, abs=3e-3)
    assert (text * loc).mean().item() == pytest.approx(0.05, abs=3e-3) and subj.sum() == 0
    ours = drop_events(200_000, load_config("sd2-base").loss, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ours["subjects"].float().mean().item() == pytest.approx(0.10, abs=3e-3)  # its own 5 % + all three 5 %


def test_validation_samples_with_the_users_sampler_and_train_logs_its_pace(shards, tmp_path):
    import subjectdiff.infer.pipeline
    import subjectdiff.train.validate
    from subjectdiff.model import sampling

    assert (
        subjectdiff.train.validate.sample_latents
        is subjectdiff.infer.pipeline.sample_latents
        is sampling.sample_latents
    )
    assert subjectdiff.train.validate.three_branches is sampling.three_branches
    out = tmp_path / "pace"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--records",
                str(shards[0]),
                "--out",
                str(out),
                "run.max_steps=2",
                "run.ckpt_every=100",
                "run.val_every=2",
                "run.val_steps=2",
                "run.progress='off'",
            ]
        )
        == 0
    )
    assert (out / "samples" / "step-0000002.png").is_file()
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last["steps_per_s"] > 0 and last["avg_samples_per_s"] > 0 and last["eta_s"] == 0
