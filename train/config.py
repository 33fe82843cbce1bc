"""TrainConfig: typed nested dataclasses, presets as functions, TOML files and `key=value` overrides.

    cfg = load_config("tiny", ["run.max_steps=20", "data.shards=['out/']"])
    cfg = load_config(config_file="my_run.toml")   # TOML tables [model] [data] [optim] [loss] [run];
                                                   # `preset = "..."` at the top starts from a preset
    text = config_toml(cfg)                        # the resolved config as TOML (RUN/config.toml, --print-config)
Override values are TOML literals (numbers, booleans, quoted strings, [lists]); anything else is a string.
config_toml writes every setting, an unset one (None) as "none" (subjectdiff.overrides), so
`load_config(config_file=...)` reads it back to the same config over any preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from subjectdiff.model.config import NATIVE_RESOLUTION, ModelConfig
from subjectdiff.model.config import PRESETS as MODEL_PRESETS
from subjectdiff.model.config import sd2_base as model_sd2_base
from subjectdiff.model.config import tiny as model_tiny
from subjectdiff.overrides import apply, merge_dicts, parse_override, read_toml, to_toml
from subjectdiff.presets import Presets

PRECISIONS = ("fp32", "bf16", "fp16")
CROPS = ("short-side", "zoom")
NO_SUBJECT = ("skip", "text")
ON_BAD_RECORD = ("raise", "skip")
DEFAULT_PAIR_RATIO = 0.5  # data.pair_ratio when --pairs is given and the ratio is not
# diffusers.optimization.get_scheduler's names (SchedulerType) that need no step rules
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class DataConfig:
    """Where records come from, and how a record becomes a training sample (train/data.py).

    shards: shard folders, files or brace patterns (--records). selection: a `catalog select` Parquet. catalog:
        the DuckDB catalog file that selects the records (of the folder it was built from, or of the one folder in
        `shards`; a shard folder or URL here, the deprecated form, means its own catalog): all of them, or those
        `where` (a SQL predicate over its `samples`) and `object_where` (one over its `objects`, with the sample's
        caption, width, height and white_fraction) select; the selection records each sample's eligible objects,
        and samples without one are left out. The catalog's records are selected when the run starts into
        out_dir/selection.parquet, which a resumed run reuses.
    resolution: training image side (pixels). subject_size: side of the subject images (0 = the image
        encoder's input size).
    Object selection (the reference code's rules, `custom_dataset.py`; object_rules=false turns them all off):
        pick: candidates in descending detection score ("score", the reference) or in random order ("random").
        box_area (box area / image area), box_aspect (box width / height, pixels): open intervals.
        min_score: detection score above it. single_word_label: the label is one word. label_in_caption: the
        label occurs in the caption. min_mask_fill: the mask covers at least this fraction of its box.
        mask_within_box: the mask has no more pixels than its box. box_segments: how many distinct values of
        the record's label map (objects' masks painted in order, 0 = background) lie in the box, inclusive.
        max_containment: a candidate whose box and a chosen one's overlap by more than this fraction of the
        smaller is skipped. max_white: an image with more near-white pixels (all channels > 0.9) gets no subject.
        min_crop_box_area, crop_aspect: after the crop, a subject's box must cover more than this fraction of the
        crop (200 px of 512 x 512) with height / width in the open interval.
        min_mask_area: mask pixels / image pixels at least this (this project's rule; 0 = off).
        fill_holes: fill the masks' enclosed holes, as the reference does (`fill_cavity`).
        Whatever the rules, a subject is its mask within its box: an object with no mask pixel in its box is never one.
    crop: the square crop of the training image, always inside the image (never padded): "short-side" (the
        reference's: the image's short side, at a random offset containing the chosen subjects, or as many of
        them in pick order as fit; objects it cuts stay when their clipped box passes the post-crop rule) or
        "zoom" (a random side between the contained subjects' extent and the short side).
    no_subject: a record left without a subject (no object passes the rules, a near-white image, a crop that
        cuts every subject): "skip" (the reference's: it gives no sample; skipped records are counted by reason
        in the log) or "text" (it trains text-only on its caption, a short-side crop at a random offset).
    on_bad_record: a record the reader refuses (a tar member that is a link, no JSON or no image, malformed JSON,
        fields that break the contract; catalogs.reader.BadRecordError): "raise" (stop with one line naming its
        shard and key) or "skip" (it gives no sample and is counted as "bad record" with the skipped records).
    Subject images (subjectdiff.model.subject_image): augment: flip, rotation, perspective (and the background
        photo) on; flip_p, rotate_deg, perspective (torchvision's distortion_scale), perspective_p;
        backgrounds: a folder of photos (BG-20k's train/, or any) the subject is pasted on, at background_area of
        the image; without one the subject sits on `background`: "white" or a "random" flat colour.
    loc_tokens: the tokens whose attention maps localize a subject: "label" (its clause's label word, the
        reference's), "placeholder" (its clause's placeholder, the reference's), "phrase" (its words in the
        caption: shared by two detections of the same noun).
    batch_size: samples per rank and micro-step. num_workers: DataLoader workers per rank (fewer when an epoch
        has fewer records than ranks x workers). Each epoch is cut to ranks x workers equal ranges, a multiple of
        batch_size each when there are records enough, so that all ranks run alike; a worker's last batch may
        be partial, and with fewer records than ranks x workers records repeat.
    Cross-image pairs (docs/training.md, "Training on pairs"): pairs: a pairs.parquet (catalogs.pairs.PAIR_SCHEMA;
        a path or URL, --pairs) whose pair samples take the subject image from the reference object and the
        target image, box, mask, prompt and localization tokens from the target object. pair_ratio: the fraction
        of a worker's sample slots that are pair samples, mixed deterministically (seeded) with single-image
        samples; unset: 0.5 with pairs, 0 without (without pairs it must be 0: training is exactly as before).
    """

    shards: tuple[str, ...] = ()
    selection: str | None = None
    catalog: str | None = None
    where: str | None = None
    object_where: str | None = None
    resolution: int = 512
    subject_size: int = 0
    pick: str = "score"
    object_rules: bool = True
    box_area: tuple[float, float] = (0.08, 0.7)
    box_aspect: tuple[float, float] = (0.3, 3.0)
    min_score: float = 0.3
    single_word_label: bool = True
    label_in_caption: bool = True
    min_mask_fill: float = 0.6
    mask_within_box: bool = True
    box_segments: tuple[int, int] = (2, 5)
    max_containment: float = 0.8
    max_white: float = 0.1
    min_crop_box_area: float = 200 / 512**2
    crop_aspect: tuple[float, float] = (0.3, 3.0)
    min_mask_area: float = 0.0
    fill_holes: bool = True
    augment: bool = True
    backgrounds: str | None = None
    background_area: float = 0.5
    background: str = "white"
    flip_p: float = 0.5
    rotate_deg: float = 10.0
    perspective: float = 0.5
    perspective_p: float = 0.5
    loc_tokens: tuple[str, ...] = ("label", "placeholder")
    crop: str = "short-side"
    no_subject: str = "text"
    on_bad_record: str = "raise"
    batch_size: int = 4
    num_workers: int = 2
    pairs: str | None = None
    pair_ratio: float | None = None

    def __post_init__(self) -> None:
        self.shards = (self.shards,) if isinstance(self.shards, str) else tuple(self.shards)
        self.loc_tokens = tuple(self.loc_tokens)
        for name in ("box_area", "box_aspect", "box_segments", "crop_aspect"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"data.{name} must be [low, high] with low <= high, got {list(value)}")
            setattr(self, name, value)
        if self.background not in ("white", "random"):
            raise ValueError(f"data.background must be 'white' or 'random', got {self.background!r}")
        if self.pick not in ("score", "random"):
            raise ValueError(f"data.pick must be 'score' (descending detection score) or 'random', got {self.pick!r}")
        if (self.where or self.object_where) and not self.catalog and not self.shards:
            raise ValueError(
                "--where / --object-where need --catalog FILE.duckdb, the catalog they query "
                "(data.catalog; or one folder in --records, whose catalog.duckdb they query)"
            )
        if self.crop not in CROPS:
            raise ValueError(f"data.crop must be one of {CROPS}, got {self.crop!r}")
        if self.no_subject not in NO_SUBJECT:
            raise ValueError(f"data.no_subject must be one of {NO_SUBJECT}, got {self.no_subject!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"data.on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}")
        if self.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8 (the VAE's stride), got {self.resolution}")
        if not self.loc_tokens or set(self.loc_tokens) - {"label", "placeholder", "phrase"}:
            raise ValueError(f"data.loc_tokens: choose from 'label', 'placeholder', 'phrase'; got {self.loc_tokens}")
        if not 0 < self.background_area <= 1:
            raise ValueError(f"data.background_area must be in (0, 1], got {self.background_area}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.pair_ratio is not None and not 0 <= self.pair_ratio <= 1:
            raise ValueError(f"data.pair_ratio must be in [0, 1], got {self.pair_ratio}")
        if not self.pairs and self.pair_ratio:
            raise ValueError(
                f"data.pair_ratio {self.pair_ratio} needs a pairs file: --pairs pairs.parquet (data.pairs)"
            )

    @property
    def pair_fraction(self) -> float:
        """The fraction of sample slots that are pair samples: data.pair_ratio, else 0.5 with pairs, 0 without."""
        if self.pair_ratio is not None:
            return float(self.pair_ratio)
        return DEFAULT_PAIR_RATIO if self.pairs else 0.0

    @property
    def queries_catalog(self) -> bool:
        """The records are the catalog's selection (where / object_where, or a catalog given alone)."""
        return bool(self.where or self.object_where or (self.catalog and not self.selection and not self.shards))


@dataclass
class OptimConfig:
    """AdamW (lr, weight_decay, betas, eps), with the learning rate scheduled by diffusers'
    `optimization.get_scheduler`: lr_scheduler names the schedule (LR_SCHEDULERS; "constant_with_warmup", the
    paper's: linear from 0 over warmup_steps, then lr), over run.max_steps for the decaying ones;
    lr_num_cycles: cosine_with_restarts' cycles; lr_power: polynomial's power. The scheduler's step count is
    saved in checkpoints, so a resumed run continues its schedule."""

    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 1000
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9999  # 0 disables the EMA
    ema_warmup: bool = True  # diffusers' EMAModel warm-up: decay min(ema_decay, (1 + t) / (10 + t)) at update t

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"optim.lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


DROPS = ("drop_text", "drop_text_location", "drop_location", "drop_subjects", "drop_all")


@dataclass
class LossConfig:
    """loc_weight: the localization loss weight (paper: 0.01). loc_masks: "soft" (bilinear, antialiased, the
    reference's) or "binary" masks at each layer's size; loc_reduce: "sample" (mean over a sample's subjects,
    then over the batch: the reference's) or "subject" (mean over all subjects of the batch); loc_normalize:
    rescale each map to max 1 first.
    Classifier-free-guidance dropout: one uniform draw per sample picks at most one of these disjoint events,
    with these probabilities (the reference's scheme, generalized): drop_text (the prompt, with the placeholders'
    CLS fusion, -> the empty prompt), drop_location (-> zero location map), drop_text_location (both),
    drop_subjects (-> the grounding net's learned null features), drop_all (text, location and subjects: the CFG
    null input). Reference: text 0.05, text_location 0.05, location 0.05 (text dropped 10 %, location 10 %, both
    5 %), subjects never.
    vae_sample: latents drawn from the VAE posterior (the reference's `latent_dist.sample()`), else its mean."""

    loc_weight: float = 0.01
    loc_normalize: bool = False
    loc_masks: str = "soft"
    loc_reduce: str = "sample"
    drop_text: float = 0.05
    drop_location: float = 0.05
    drop_text_location: float = 0.05
    drop_subjects: float = 0.0
    drop_all: float = 0.0
    vae_sample: bool = True

    def __post_init__(self) -> None:
        for name in DROPS:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"loss.{name} must be a probability, got {getattr(self, name)}")
        if sum(getattr(self, n) for n in DROPS) > 1 + 1e-9:
            raise ValueError(
                f"loss.drop_*: the events are disjoint, their probabilities must sum to <= 1; got "
                f"{ {n: getattr(self, n) for n in DROPS} }"
            )
        if self.loc_masks not in ("soft", "binary") or self.loc_reduce not in ("sample", "subject"):
            raise ValueError(
                f"loss.loc_masks must be 'soft' or 'binary' and loss.loc_reduce 'sample' or 'subject'; "
                f"got {self.loc_masks!r}, {self.loc_reduce!r}"
            )


@dataclass
class RunConfig:
    """out_dir: logs, checkpoints (out_dir/checkpoints/step-NNNNNNN), validation grids, final export.
    precision: autocast dtype of the trainable model ("fp32", "bf16", "fp16" with a grad scaler);
    frozen_dtype: weights of the frozen VAE and image encoder ("auto": bf16 on GPU, fp32 on CPU).
    val_*: the validation grid, sampled as users sample (infer's three-branch sampler): steps, text and subject
        guidance, scheduler. progress: a progress bar with steps/s, samples/s and the ETA on rank 0 ("auto":
        when stderr is a terminal; the log lines carry the same numbers), "on" or "off".
    tensorboard: TensorBoard event files in out_dir/tb (the log.jsonl scalars and the validation grids) beside
        log.jsonl, which is always written; when tensorboard cannot be imported the run says so in one line.
    trace: write each micro-batch's record keys and a final parameter digest per rank (tests, audits).
    export_diffusers: the final export (out_dir/export, EMA weights) also as a diffusers folder, out_dir/diffusers,
        which `SubjectDiffusionPipeline.from_pretrained` loads (every weight, frozen parts included: SD 2's size).
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
    val_guidance: float = 7.5
    val_subject_guidance: float = 1.5
    val_scheduler: str = "PNDMScheduler"
    progress: str = "auto"
    tensorboard: bool = True
    trace: bool = False
    export_diffusers: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"run.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.keep_last < 1:
            raise ValueError(f"run.keep_last must be >= 1, got {self.keep_last}")
        if self.progress not in ("auto", "on", "off"):
            raise ValueError(f"run.progress must be 'auto', 'on' or 'off', got {self.progress!r}")


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
        run=RunConfig(
            out_dir="runs/tiny",
            max_steps=10,
            precision="fp32",
            log_every=1,
            ckpt_every=5,
            val_every=0,
            val_samples=2,
            val_steps=4,
        ),
    )


def sd2_base() -> TrainConfig:
    """SD 2 base at 512 px, ViT-H-14 subjects, 2 subjects per sample, loc weight 0.01, with this project's
    optimization choices (lr 1e-5, weight decay 0.01, gradient clipping, batch 4, EMA) and CFG dropout that also
    drops subjects (to the learned null features users sample against). `paper()` is the reference's setting."""
    return TrainConfig(
        model=model_sd2_base(),
        data=DataConfig(resolution=512, batch_size=4, num_workers=6),
        optim=OptimConfig(lr=1e-5, warmup_steps=1000),
        loss=LossConfig(drop_text=0.05, drop_location=0.05, drop_text_location=0.0, drop_subjects=0.05, drop_all=0.05),
        run=RunConfig(out_dir="runs/sd2-base", precision="bf16", gradient_checkpointing=True),
    )


def paper() -> TrainConfig:
    """The reference code's training (train.py, train.sh, custom_dataset.py): SD 2 base at 512 px, AdamW lr 3e-5,
    weight decay 0, 1000 warm-up steps then constant, no gradient clipping, 8 samples per GPU; text (with the CLS
    fusion) dropped 10 %, the location map 10 %, both 5 %, subjects never; its object selection and subject
    augmentation (the DataConfig defaults; set data.backgrounds to a BG-20k folder for its background
    replacement), its short-side crop, and its skipping of records without a subject. Kept from this project
    (docs/training.md says why): bf16 autocast instead of fp16, the EMA (with warm-up)."""
    return TrainConfig(
        model=model_sd2_base(),
        data=DataConfig(resolution=512, batch_size=8, num_workers=6, crop="short-side", no_subject="skip"),
        optim=OptimConfig(lr=3e-5, weight_decay=0.0, warmup_steps=1000, grad_clip=0.0),
        loss=LossConfig(drop_text=0.05, drop_location=0.05, drop_text_location=0.05, drop_subjects=0.0, drop_all=0.0),
        run=RunConfig(out_dir="runs/paper", precision="bf16", gradient_checkpointing=True),
    )


PRESETS = Presets("training", tiny, sd2_base, paper, aliases={"sd2_base": "sd2-base"})  # the alias: until 0.3


def with_arch(cfg: TrainConfig, name: str) -> TrainConfig:
    """cfg on another model architecture preset ("tiny", "sd2-base") at that model's native resolution, everything
    else as cfg has it: `--preset paper --arch tiny` runs the paper's data, loss and schedule on a CPU in seconds."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"--arch {name!r}: unknown model preset; presets: {MODEL_PRESETS.names()}")
    cfg.model = MODEL_PRESETS[name]()
    cfg.data.resolution = NATIVE_RESOLUTION[cfg.model.arch]
    return cfg


def load_config(
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    arch: str | None = None,
    *,
    config_file: str | None = None,
) -> TrainConfig:
    """A preset ("tiny", "sd2-base", "paper"; default: config_file's top-level `preset`, else "sd2-base"), on
    another model architecture preset when `arch` is given (with_arch), then config_file's tables and `key=value`
    overrides, applied in order."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values = read_toml(config_file, hint=f" (presets are --preset NAME: {PRESETS.names()})")
    named = values.pop("preset", "sd2-base")
    cfg = PRESETS[preset or named]()
    if arch is not None:
        cfg = with_arch(cfg, arch)
    for o in overrides:
        values = merge_dicts(values, parse_override(o))
    return apply(cfg, values)


def config_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML (every setting; an unset one as "none"), which `--config` reads back to CFG."""
    header = (
        "the resolved training config: `subjectdiff train --config THIS_FILE` runs it again\n"
        'unset options are "none" (TOML has no null)'
    )
    return to_toml(cfg.to_dict(), header)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict()` (as stored in checkpoints)."""
    return apply(TrainConfig(), d)
