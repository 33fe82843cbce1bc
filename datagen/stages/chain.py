"""The stages chained in one process: a fused Ray actor, tests, benchmarks and the offline demo.

The Ray pipeline hosts the same classes as actors and tasks; this is the single-process equivalent.
"""

from __future__ import annotations

from subjectdiff.datagen.config import DatagenConfig
from subjectdiff.datagen.stages import registry
from subjectdiff.datagen.stages.common import Item
from subjectdiff.datagen.stages.filters import ImageFilter, prefilter
from subjectdiff.datagen.stages.registry import Stage


def build_stages(cfg: DatagenConfig, chain: tuple[Stage, ...] | None = None) -> list:
    """The stage objects of CHAIN (default: the registry's active stages, `registry.active`: Captioner ->
    NounExtractor -> Grounder -> ImageFilter -> Segmenter -> Curator, no Curator when `curate.enabled` is
    false), in order, each loading its model once."""
    return [s.build(cfg) for s in (registry.active(cfg) if chain is None else chain)]


def run_stages(stages: list, items: list[Item]) -> list[Item]:
    """The stages in order, after `prefilter` with the chain's ImageFilter settings, so no model runs on an
    image that the size and aspect rules reject anyway."""
    for f in (s for s in stages if isinstance(s, ImageFilter)):
        items = [prefilter(it, f.cfg) for it in items]
    for stage in stages:
        items = stage(items)
    return items
