"""The training loop: plain PyTorch DDP (NCCL on GPU, gloo on CPU), launched by torchrun or as one process.

Ranks come from RANK / LOCAL_RANK / WORLD_SIZE (torchrun sets them). Each rank seeds its step generator with
seed + rank, so noise, timesteps and CFG dropout differ per rank. The frozen VAE and image encoder sit outside
DDP (and stay in eval mode); only the SubjectDiffusion module (its trainable parameters) is wrapped, in train mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from subjectdiff.model import Parts, build
from subjectdiff.model.pipeline import save_diffusers
from subjectdiff.progress import Progress, duration
from subjectdiff.train import checkpoint
from subjectdiff.train.config import TrainConfig, config_toml
from subjectdiff.train.data import BatchStream, batch_stream, shared_selection
from subjectdiff.train.step import training_step
from subjectdiff.train.validate import validation_grid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, local, world, dev)


def gather(obj: Any, d: Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


class EMA:
    """Exponential moving average of the trainable parameters (on the training device, in their dtype: fp32),
    by diffusers' EMAModel. With warm-up (optim.ema_warmup) update t uses decay min(decay, (1 + t) / (10 + t)),
    so the average forgets the initial weights within the first few thousand steps instead of keeping e^-1 of
    them after 1 / (1 - decay) steps (37 % after 10k steps at 0.9999); without, a constant decay."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True):
        self.names, self.params = list(named), list(named.values())
        self.model = EMAModel(self.params, decay=decay, min_decay=0.0 if warmup else decay)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.model.shadow_params))

    @property
    def updates(self) -> int:
        return self.model.optimization_step

    def update(self) -> None:
        self.model.step(self.params)

    def load(self, shadow: dict[str, torch.Tensor], updates: int) -> None:
        """Restore a saved average and its update count (which sets the warm-up's decay)."""
        with torch.no_grad():
            for name, s in zip(self.names, self.model.shadow_params):
                s.copy_(shadow[name])
        self.model.optimization_step = updates


# the notice's advice, after what failed
TB_MISSING = (
    "metrics go to log.jsonl only (pip install tensorboard==2.21.0; run.tensorboard=false turns TensorBoard off)"
)


def summary_writer(log_dir: Path, enabled: bool):
    """A TensorBoard SummaryWriter on LOG_DIR, or None when switched off (run.tensorboard) or not importable
    (then with TB_MISSING on stderr, once per run)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only runs that write events
    except ImportError as e:  # not installed, or broken (its error says which)
        why = " ".join(str(e).split())
        print(f"warning: tensorboard cannot be imported ({why}): {TB_MISSING}", file=sys.stderr, flush=True)
        return None
    return SummaryWriter(str(log_dir))


class Logger:
    """On rank 0: the console, out_dir/log.jsonl (one row per logged step) and, with run.tensorboard, the same
    scalars under train/ and the validation grids under val/ in out_dir/tb."""

    def __init__(self, out_dir: Path, main: bool, tensorboard: bool = True):
        self.main, self.tb = main, None
        if not main:
            return
        self.file = open(out_dir / "log.jsonl", "a")
        self.tb = summary_writer(out_dir / "tb", tensorboard)

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()

    def log(self, step: int, values: dict[str, float], note: str = "", echo=print) -> None:
        """One JSONL row and one console line (through `echo`: tqdm.write while a progress bar is shown)."""
        if not self.main:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        echo(f"step {step:>7d} " + " ".join(f"{k}={v:.4g}" for k, v in values.items()) + (f" {note}" if note else ""))
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        """An image file (a validation grid) into TensorBoard as TAG at STEP."""
        if self.main and self.tb is not None:
            self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            self.tb.flush()


def show_bar(main: bool, mode: str) -> bool:
    """Whether this rank shows the progress bar: rank 0 only, when run.progress is "on", or "auto" and stderr is
    a terminal (log lines carry the numbers either way)."""
    return main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))


def decay_groups(named: dict[str, torch.nn.Parameter]) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without). Only weight matrices and conv kernels decay: biases, norm
    weights, the adapters' tanh gates (the tensors of fewer than 2 dims) and the grounding net's null features
    (per token they are 2-d) are not pulled toward zero, which would close the gates and erase the learned null
    condition."""
    keep = [n for n, p in named.items() if p.ndim >= 2 and ".null_" not in n]
    return keep, [n for n in named if n not in set(keep)]


def make_optimizer(named: dict[str, torch.nn.Parameter], cfg: TrainConfig):
    o = cfg.optim
    decay, no_decay = decay_groups(named)
    groups = [
        {"params": [named[n] for n in decay], "weight_decay": o.weight_decay},
        {"params": [named[n] for n in no_decay], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    sched = get_scheduler(
        o.lr_scheduler,
        opt,
        num_warmup_steps=o.warmup_steps,
        num_training_steps=cfg.run.max_steps,
        num_cycles=o.lr_num_cycles,
        power=o.lr_power,
    )
    return opt, sched


def split_one_group(state: dict[str, Any], named: dict[str, torch.nn.Parameter]) -> None:
    """Checkpoints from before the no-decay group hold one AdamW group over `named` in order: re-index it, in
    place, into make_optimizer's two groups (same moments and hyperparameters), and the scheduler's lists."""
    order = {n: i for i, n in enumerate(named)}
    decay, no_decay = decay_groups(named)
    opt, group = state["optimizer"], state["optimizer"]["param_groups"][0]
    opt["state"] = {j: opt["state"][order[n]] for j, n in enumerate(decay + no_decay) if order[n] in opt["state"]}
    opt["param_groups"] = [
        {**group, "params": list(range(len(decay)))},
        {**group, "weight_decay": 0.0, "params": list(range(len(decay), len(named)))},
    ]
    for key in ("base_lrs", "_last_lr"):
        state["scheduler"][key] = state["scheduler"][key] * 2


def frozen_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.run.frozen_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.run.frozen_dtype]


def make_stream(cfg: TrainConfig, parts: Parts, d: Dist, out_dir: Path, resume: bool) -> BatchStream:
    """This rank's batches; rank 0 logs the epoch's plan (size, split, what it drops) and skipped records."""
    selection, eligible = shared_selection(cfg.data, str(out_dir), d.rank, d.world, resume)
    size = cfg.data.subject_size or parts.image_encoder.image_size
    log = (lambda text: print(text, flush=True)) if d.main else None
    return batch_stream(cfg, selection, eligible, d.rank, d.world, size, log)


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for n in model.trainable_names():
        h.update(model.get_parameter(n).detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    """Holds the run's state; `train()` is the loop (resume, step, log, save, validate)."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg, self.d = cfg, setup_distributed(cfg.run.device)
        self.out = Path(cfg.run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.run.seed + self.d.rank)
        np.random.seed(cfg.run.seed + self.d.rank)
        torch.manual_seed(cfg.run.seed + self.d.rank)
        self.gen = torch.Generator(self.d.device).manual_seed(cfg.run.seed + self.d.rank)
        self.parts = build(cfg.model).to(self.d.device, frozen_dtype(cfg, self.d.device))
        self.model = self.parts.model
        self.train_mode()
        if cfg.run.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.named = {n: self.model.get_parameter(n) for n in self.model.trainable_names()}
        self.ddp = self._wrap()
        self.opt, self.sched = make_optimizer(self.named, cfg)
        self.scaler = torch.amp.GradScaler(self.d.device.type, enabled=cfg.run.precision == "fp16")
        self.ema = EMA(self.named, cfg.optim.ema_decay, cfg.optim.ema_warmup) if cfg.optim.ema_decay > 0 else None
        self.step, self.val_batch = 0, None
        ckpt = checkpoint.resolve(self.out, resume) if resume else None
        self.stream = make_stream(cfg, self.parts, self.d, self.out, resume=ckpt is not None)
        self.logger = Logger(self.out, self.d.main, cfg.run.tensorboard)
        if self.d.main:  # each start (a resumed one too) records the config it runs with
            (self.out / "config.toml").write_text(config_toml(cfg))
        if ckpt is not None:
            self.restore(ckpt)

    def train_mode(self) -> None:
        """The trainable model in train mode: from_pretrained builds the text encoder in eval mode, and
        transformers' gradient checkpointing and dropout follow `training`. The frozen VAE and image encoder eval."""
        self.model.train()
        self.parts.vae.eval()
        self.parts.image_encoder.eval()

    def _wrap(self) -> torch.nn.Module:
        if self.d.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.d.device.index] if self.d.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids)

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.run.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.d.device.type, dtype=DTYPES[p])

    def train(self) -> dict[str, float]:
        cfg, batches, logs = self.cfg, iter(self.stream), {}
        # The run's pace since this process started training: ETA to run.max_steps, checkpoints and validation
        # included (they take wall time too).
        pace = Progress(
            cfg.run.max_steps, None, done=self.step, bar=show_bar(self.d.main, cfg.run.progress), unit="step"
        )
        while self.step < cfg.run.max_steps:
            t0 = time.perf_counter()
            logs = self.train_step(batches)
            self.step += 1
            samples = logs.pop("samples")
            pace.update(1, items=samples)
            logs.update(
                samples_per_s=samples / (time.perf_counter() - t0),
                steps_per_s=pace.rate(),
                avg_samples_per_s=pace.item_rate(),
                eta_s=pace.eta(),
            )
            if "skip" in (cfg.data.no_subject, cfg.data.on_bad_record):  # this rank's skipped records, since start
                logs["records_skipped"] = float(sum(self.stream.skipped.values()))
            if self.step % cfg.run.log_every == 0 or self.step == cfg.run.max_steps:
                self.logger.log(self.step, logs, f"eta {duration(logs['eta_s'])}", pace.echo)
            if self.step % cfg.run.ckpt_every == 0 or self.step == cfg.run.max_steps:
                self.save()
            if cfg.run.val_every and self.step % cfg.run.val_every == 0:
                self.validate()
        pace.close()
        self.finish()
        return logs

    def train_step(self, batches) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; gradients sync only on the last (no_sync)."""
        accum, totals, samples = self.cfg.optim.grad_accum, {}, 0
        for micro in range(accum):
            batch = next(batches)
            self.trace(batch)
            if self.val_batch is None:
                self.val_batch = {k: v[: self.cfg.run.val_samples] for k, v in batch.items()}
            sync = micro == accum - 1 or self.d.world == 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss, terms = training_step(
                    self.ddp, self.parts, batch, self.cfg.loss, self.gen, self.d.device, self.autocast()
                )
                self.scaler.scale(loss / accum).backward()
            samples += len(batch["key"])
            totals = {k: totals.get(k, 0.0) + v / accum for k, v in terms.items()}
        self.scaler.unscale_(self.opt)
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(list(self.named.values()), self.cfg.optim.grad_clip)
            totals["grad_norm"] = float(norm)
        scale, lr = self.scaler.get_scale(), self.opt.param_groups[0]["lr"]  # the rate this step applies
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.scaler.get_scale() >= scale:  # fp16: a lower scale means inf/nan gradients and a skipped step
            self.sched.step()
            if self.ema is not None:
                self.ema.update()
        return {**totals, "lr": lr, "samples": samples * self.d.world}

    def trace(self, batch: dict[str, Any]) -> None:
        if self.cfg.run.trace:
            with open(self.out / f"trace-rank{self.d.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "keys": list(batch["key"])}) + "\n")

    def save(self) -> None:
        data = gather(self.stream.state(), self.d)
        rngs = gather(checkpoint.rng_state(self.gen), self.d)
        if self.d.main:
            state = {
                "step": self.step,
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "data": data,
                "rng": rngs,
                "world": self.d.world,
                "config": self.cfg.to_dict(),
                "ema_updates": self.ema.updates if self.ema else 0,
            }
            path = checkpoint.save(
                self.out, self.step, self.parts, self.ema.shadow if self.ema else None, state, self.cfg.run.keep_last
            )
            print(f"saved {path}", flush=True)
        if self.d.world > 1:
            dist.barrier()

    def restore(self, path: Path) -> None:
        state, ema = checkpoint.load(path, self.model, self.d.device)
        if len(state["optimizer"]["param_groups"]) == 1:
            split_one_group(state, self.named)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        if self.ema is not None and ema is not None:  # runs saved before the warm-up: their steps were updates
            self.ema.load(ema, state.get("ema_updates", self.step))
        why = None
        if state["world"] != self.d.world:
            why = f"it was written by {state['world']} ranks, this run has {self.d.world} (RNG streams are fresh)"
        else:
            checkpoint.set_rng_state(state["rng"][self.d.rank], self.gen)
            try:
                self.stream.load_state(state["data"][self.d.rank])
            except ValueError as e:
                why = str(e)
        if why is not None:
            self.stream.load_state({"epoch": state["data"][0]["epoch"], "batches": 0})
        if self.d.main and why is not None:
            print(f"warning: {path}: {why}; the data restart at the saved epoch of rank 0", file=sys.stderr)
        elif self.d.main and "samples" not in state["data"][0]:
            print(
                f"warning: {path} predates per-worker data positions: the data continue where replaying its "
                "batches would (without decoding them), but it was written under the previous records split, so "
                "the rest of this epoch may repeat or miss some records",
                file=sys.stderr,
            )
        if self.d.main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def validate(self) -> None:
        if self.d.main:
            with self.ema_weights():
                path = validation_grid(self, self.out / "samples" / f"step-{self.step:07d}.png")
            self.train_mode()
            self.logger.image("val/grid", path, self.step)
            print(f"wrote {path}", flush=True)
        if self.d.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily swap the EMA weights in (validation and export)."""
        if self.ema is None:
            yield
            return
        saved = {k: p.detach().clone() for k, p in self.named.items()}
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(self.ema.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.named.items():
                    p.copy_(saved[k])

    def finish(self) -> None:
        if self.cfg.run.trace:
            with open(self.out / f"digest-rank{self.d.rank}.json", "w") as f:
                json.dump({"step": self.step, "digest": param_digest(self.model)}, f)
        if self.d.main:
            with self.ema_weights():
                self.parts.save_pretrained(self.out / "export")
                if self.cfg.run.export_diffusers:
                    save_diffusers(self.parts, self.out / "diffusers")
        self.logger.close()
        if self.d.world > 1:
            dist.barrier()


def run(cfg: TrainConfig, resume: str | None = None) -> dict[str, float]:
    trainer = Trainer(cfg, resume)
    try:
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
