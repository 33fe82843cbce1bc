"""The stages in recipe order, run in-process: for tests, benchmarks and the offline demo.

The Ray pipeline hosts the same classes as actors; this is the single-process equivalent.
"""

from __future__ import annotations

from datagen.config import DatagenConfig
from datagen.stages.common import Item


def build_stages(cfg: DatagenConfig) -> list:
    """Captioner -> NounExtractor -> Grounder -> ImageFilter -> Segmenter, each loading its model once."""
    from datagen.stages.caption import Captioner
    from datagen.stages.filters import ImageFilter
    from datagen.stages.ground import Grounder
    from datagen.stages.nouns import NounExtractor
    from datagen.stages.segment import Segmenter

    return [Captioner(cfg.caption), NounExtractor(cfg.nouns), Grounder(cfg.ground), ImageFilter(cfg.filters),
            Segmenter(cfg.segment)]


def run_stages(stages: list, items: list[Item]) -> list[Item]:
    for stage in stages:
        items = stage(items)
    return items
