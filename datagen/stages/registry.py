"""Every datagen stage described once. The chain, the actor pools, the failure stages, `datagen weights`, the
run manifest, the plan fingerprint and `--batch-size` iterate STAGES instead of naming stages.

A stage is a class that loads its model once in `__init__(settings)` and maps a batch in `__call__(items)`
(datagen/stages/__init__.py). Adding one is its own module plus one entry: a line in STAGES for a built-in
stage, or `register(Stage(...))` from anywhere before the job starts (docs/architecture.md, "Adding a stage").

Entries travel with the job: the driver hands each Ray actor and task the entries it runs (pickled), so a
stage registered only in the driver's process runs on every worker too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from subjectdiff.catalogs.schema import is_failure_stage

# "package.module:attribute", imported on first use (the model modules import torch and their model
# packages, which the driver and the CLI rarely need), or the object itself (a stage defined in a test).
Ref = Any


def load(ref: Ref) -> Any:
    """The object REF names ("module:attribute"), or REF itself."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(import_module(module), attr)


@dataclass(frozen=True)
class Stage:
    """One stage: everything the pipeline needs to know about it.

    name: its failure stage, its key in `pipeline.pools`, and its manifest `models` key.
    section: its settings: the DatagenConfig field of that name (`filters` for the filter), else
        `DatagenConfig.extra[section]` (a dict of settings, or None for `config()`'s defaults).
    cls: the stage class, cls(settings) -> stage, stage(items) -> items.
    model: hosts a model, in a pool of actors (`pipeline.pools.NAME`); False: a CPU task per block.
    num_gpus: the GPU share of each of its actors in the full-size presets (default, paper, full-random).
    needs: the item field that is its input; in a fused chain, an error is a failure of the last stage whose
        input the item holds.
    checkpoints: checkpoints(settings, download) -> [weights.Checkpoint]: every checkpoint its settings need;
        `download=False` never fetches (the manifest), True may (`datagen weights`).
    describe: describe(settings, {checkpoint name: manifest entry}) -> its entry in the manifest's `models`.
    config: the settings class of a section that is not a DatagenConfig field.
    A stage whose settings have `enabled = False` is left out of the chain (curate).
    """

    name: str
    section: str
    cls: Ref
    model: bool = True
    num_gpus: float = 0.0
    needs: str = "image"
    checkpoints: Ref | None = None
    describe: Ref | None = None
    config: Callable[..., Any] | None = None

    def settings(self, cfg) -> Any:
        """Its section of CFG (a DatagenConfig)."""
        if hasattr(cfg, self.section):
            return getattr(cfg, self.section)
        value = cfg.extra.get(self.section)
        if value is None or isinstance(value, dict):
            if self.config is None:
                raise ValueError(
                    f"stage {self.name}: section {self.section!r} is no DatagenConfig field; "
                    "give its Stage a config class"
                )
            return self.config(**(value or {}))
        return value

    def enabled(self, cfg) -> bool:
        return getattr(self.settings(cfg), "enabled", True)

    def build(self, cfg):
        """The stage object, its model loaded (once)."""
        return load(self.cls)(self.settings(cfg))

    def checkpoint_list(self, cfg, *, download: bool = False) -> list:
        """The checkpoints (weights.Checkpoint) CFG's settings of this stage need; [] for none."""
        return list(load(self.checkpoints)(self.settings(cfg), download)) if self.checkpoints else []


_S = "subjectdiff.datagen.stages."
RESERVED = ("read", "decode", "write", "fused")  # failure stages and a pool name the pipeline itself uses

# In chain order.
STAGES: list[Stage] = [
    Stage(
        "caption",
        "caption",
        _S + "caption:Captioner",
        num_gpus=0.2,
        checkpoints=_S + "caption:checkpoints",
        describe=_S + "caption:describe",
    ),
    Stage("nouns", "nouns", _S + "nouns:NounExtractor", needs="caption", describe=_S + "nouns:describe"),
    Stage(
        "ground",
        "ground",
        _S + "ground:Grounder",
        num_gpus=0.2,
        needs="nouns",
        checkpoints=_S + "ground:checkpoints",
        describe=_S + "ground:describe",
    ),
    Stage("filter", "filters", _S + "filters:ImageFilter", model=False, needs="detections"),
    Stage(
        "segment",
        "segment",
        _S + "segment:Segmenter",
        num_gpus=0.5,
        needs="detections",
        checkpoints=_S + "segment:checkpoints",
        describe=_S + "segment:describe",
    ),
    # DINOv2-base (86 M parameters) on 224 px object crops. Before curate (neither needs the other's output), so
    # curate stays the last stage, whose actors the shard writers sit beside.
    Stage(
        "identity",
        "identity",
        _S + "identity:Identifier",
        num_gpus=0.05,
        needs="masks",
        checkpoints=_S + "identity:checkpoints",
        describe=_S + "identity:describe",
    ),
    # ViT-L-14 forwards per image and per subject cost a fraction of SAM ViT-H's at 1024 px; with identity's, the
    # shares sum to 1, so one actor of each stage fits on one GPU
    Stage(
        "curate",
        "curate",
        _S + "curate:Curator",
        num_gpus=0.05,
        needs="masks",
        checkpoints=_S + "curate:checkpoints",
        describe=_S + "curate:describe",
    ),
]


def register(stage: Stage, after: str | None = None) -> Stage:
    """Add STAGE to the chain, after the stage named AFTER (None: last). Returns it."""
    if not is_failure_stage(stage.name) or stage.name in RESERVED:
        raise ValueError(f"stage name {stage.name!r}: a lowercase identifier, none of {RESERVED}")
    if any(s.name == stage.name for s in STAGES):
        raise ValueError(f"a stage named {stage.name!r} is registered already")
    at = len(STAGES) if after is None else [s.name for s in STAGES].index(get(after).name) + 1
    STAGES.insert(at, stage)
    return stage


def unregister(name: str) -> None:
    """Remove the stage NAME (tests that register one undo it)."""
    STAGES.remove(get(name))


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages: {names()}")


def names(*, model: bool | None = None) -> tuple[str, ...]:
    """Every stage's name in chain order; model=True: only those with a model (one pool each)."""
    return tuple(s.name for s in STAGES if model is None or s.model == model)


def active(cfg) -> tuple[Stage, ...]:
    """The chain a job of CFG (a DatagenConfig) runs, in order: every stage that is not switched off."""
    return tuple(s for s in STAGES if s.enabled(cfg))
