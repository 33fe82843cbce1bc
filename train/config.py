"""TrainConfig: typed nested dataclasses, presets as functions, TOML files and `key=value` overrides.

    cfg = load_config("tiny", ["run.max_steps=20", "data.shards=['out/']"])
    cfg = load_config("my_run.toml")        # TOML tables [model] [data] [optim] [loss] [run]; `preset = "..."`
                                            # at the top starts from a preset
Override values are TOML literals (numbers, booleans, quoted strings, [lists]); anything else is a string.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subjectdiff.model.config import ModelConfig
from subjectdiff.model.config import sd2_base as model_sd2_base
from subjectdiff.model.config import tiny as model_tiny
from subjectdiff.overrides import apply, merge_dicts, parse_override

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    """Where records come from, and how a record becomes a training sample (train/data.py).

    shards: shard folders, files or brace patterns. selection: a `catalog select` Parquet. where: a SQL
        predicate over the catalog of `catalog` (a shard folder with catalog.duckdb), selected when the run
        starts into out_dir/selection.parquet, which a resumed run reuses.
    resolution: training image side (pixels). subject_size: side of the subject cut-outs (0 = the image
        encoder's input size). background: "white" or "random" behind the cut-outs.
    flip_p, rotate_deg, perspective: subject augmentation (probability, max degrees, max corner shift / side).
    loc_tokens: which tokens carry a subject's attention map: "phrase" (its words in the caption), "placeholder".
    batch_size: samples per rank and micro-step. num_workers: DataLoader workers per rank. Each epoch is cut to
        a multiple of ranks x max(num_workers, 1) x batch_size records, so that all ranks run the same batches.
    """

    shards: tuple[str, ...] = ()
    selection: str | None = None
    catalog: str | None = None
    where: str | None = None
    resolution: int = 512
    subject_size: int = 0
    background: str = "white"
    flip_p: float = 0.5
    rotate_deg: float = 10.0
    perspective: float = 0.1
    min_mask_area: float = 0.001
    loc_tokens: tuple[str, ...] = ("phrase", "placeholder")
    batch_size: int = 4
    num_workers: int = 2

    def __post_init__(self) -> None:
        self.shards = (self.shards,) if isinstance(self.shards, str) else tuple(self.shards)
        self.loc_tokens = tuple(self.loc_tokens)
        if self.background not in ("white", "random"):
            raise ValueError(f"data.background must be 'white' or 'random', got {self.background!r}")
        if self.where and not self.catalog and not self.shards:
            raise ValueError("data.where needs data.catalog (or one shard folder in data.shards) that holds "
                             "catalog.duckdb")
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8 (the VAE's stride), got {self.resolution}")
        if set(self.loc_tokens) - {"phrase", "placeholder"}:
            raise ValueError(f"data.loc_tokens: choose from 'phrase', 'placeholder'; got {self.loc_tokens}")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999  # 0 disables the EMA

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class LossConfig:
    """loc_weight: the localization loss weight (paper: 0.01). drop_*: classifier-free-guidance dropout rates,
    drawn independently per sample; drop_all drops text, location and subjects together (the CFG null input)."""

    loc_weight: float = 0.01
    loc_normalize: bool = False
    drop_text: float = 0.05
    drop_location: float = 0.05
    drop_subjects: float = 0.05
    drop_all: float = 0.05

    def __post_init__(self) -> None:
        for name in ("drop_text", "drop_location", "drop_subjects", "drop_all"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"loss.{name} must be a probability, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """out_dir: logs, checkpoints (out_dir/checkpoints/step-NNNNNNN), validation grids, final export.
    precision: autocast dtype of the trainable model ("fp32", "bf16", "fp16" with a grad scaler);
    frozen_dtype: weights of the frozen VAE and image encoder ("auto": bf16 on GPU, fp32 on CPU).
    trace: write each micro-batch's record keys and a final parameter digest per rank (tests, audits).
    """

    out_dir: str = "runs/subjectdiff"
    max_steps: int = 100_000
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"
    frozen_dtype: str = "auto"
    gradient_checkpointing: bool = False
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    val_every: int = 1000
    val_samples: int = 4
    val_steps: int = 25
    val_guidance: float = 5.0
    trace: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.keep_last < 1:
            raise ValueError(f"run.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=model_sd2_base)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tiny() -> TrainConfig:
    """Random tiny parts, 64 px images, a few steps: runs offline on a CPU in seconds."""
    return TrainConfig(
        model=model_tiny(),
        data=DataConfig(resolution=64, batch_size=2, num_workers=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, ema_decay=0.9),
        run=RunConfig(out_dir="runs/tiny", max_steps=10, precision="fp32", log_every=1, ckpt_every=5,
                      val_every=0, val_samples=2, val_steps=4),
    )


def sd2_base() -> TrainConfig:
    """The paper's setting: SD 2 base at 512 px, ViT-H-14 subjects, 2 subjects per sample, loc weight 0.01."""
    return TrainConfig(
        model=model_sd2_base(),
        data=DataConfig(resolution=512, batch_size=4, num_workers=6),
        optim=OptimConfig(lr=1e-5, warmup_steps=1000),
        run=RunConfig(out_dir="runs/sd2-base", precision="bf16", gradient_checkpointing=True),
    )


PRESETS = {"tiny": tiny, "sd2-base": sd2_base, "sd2_base": sd2_base}


def load_config(config: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A preset name ("tiny", "sd2-base") or a TOML file, then `key=value` overrides, applied in order."""
    if config in PRESETS:
        cfg, values = PRESETS[config](), {}
    elif Path(config).is_file():
        values = tomllib.loads(Path(config).read_text())
        preset = values.pop("preset", "sd2-base")
        if preset not in PRESETS:
            raise ValueError(f"{config}: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        cfg = PRESETS[preset]()
    else:
        raise ValueError(f"--config {config!r} is neither a preset ({', '.join(PRESETS)}) nor a TOML file")
    for o in overrides:
        values = merge_dicts(values, parse_override(o))
    return apply(cfg, values)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` (as stored in checkpoints)."""
    return apply(TrainConfig(), d)
