"""Atomic checkpoints that keep the last N: out_dir/checkpoints/step-NNNNNNN/

    config.json, model.safetensors (+ frozen.safetensors)   a model export (subjectdiff.model.load_pretrained)
    ema.safetensors                                          EMA of the trainable parameters
    trainer_state.pt                                         optimizer, scheduler, step, grad scaler, per-rank
                                                             RNG states and data positions, the TrainConfig
A checkpoint is written to a temporary folder and renamed into place: a crash never leaves a half checkpoint
under a step-* name, so `--resume latest` always finds a complete one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "step_gen": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    gen.set_state(state["step_gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve(out_dir: str | os.PathLike, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint of out_dir; anything else is a checkpoint folder."""
    if resume == "latest":
        found = checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {Path(out_dir) / 'checkpoints'}")
        return found[-1]
    p = Path(resume)
    if not (p / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no trainer_state.pt)")
    return p


def save(
    out_dir: str | os.PathLike,
    step: int,
    parts,
    ema: dict[str, torch.Tensor] | None,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically (rank 0 only), then delete all but the newest keep_last."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    parts.save_pretrained(tmp)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(
    path: Path, model: torch.nn.Module, device: torch.device
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Load the trainable weights into `model`; return (trainer state, EMA tensors or None)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"), device=str(device))
    names = set(model.trainable_names())
    missing = names - set(weights)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:5]}")
    model.load_state_dict({k: v for k, v in weights.items() if k in names}, strict=False)
    ema_file = path / "ema.safetensors"
    ema = load_file(str(ema_file), device=str(device)) if ema_file.exists() else None
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return state, ema
