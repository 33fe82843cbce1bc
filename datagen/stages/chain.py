"""The stages in recipe order, run in-process: for tests, benchmarks and the offline demo.

The Ray pipeline hosts the same classes as actors; this is the single-process equivalent.
"""

from __future__ import annotations

from subjectdiff.datagen.config import DatagenConfig
from subjectdiff.datagen.stages.common import Item
from subjectdiff.datagen.stages.filters import ImageFilter, prefilter


def build_stages(cfg: DatagenConfig) -> list:
    """Captioner -> NounExtractor -> Grounder -> ImageFilter -> Segmenter -> Curator, each loading its model once;
    no Curator when `curate.enabled` is false."""
    from subjectdiff.datagen.stages.caption import Captioner
    from subjectdiff.datagen.stages.ground import Grounder
    from subjectdiff.datagen.stages.nouns import NounExtractor
    from subjectdiff.datagen.stages.segment import Segmenter

    chain = [Captioner(cfg.caption), NounExtractor(cfg.nouns), Grounder(cfg.ground), ImageFilter(cfg.filters),
             Segmenter(cfg.segment)]
    if cfg.curate.enabled:
        from subjectdiff.datagen.stages.curate import Curator

        chain.append(Curator(cfg.curate))
    return chain


def run_stages(stages: list, items: list[Item]) -> list[Item]:
    """The stages in order, after `prefilter` with the chain's ImageFilter settings, so no model runs on an
    image that the size and aspect rules reject anyway."""
    for f in (s for s in stages if isinstance(s, ImageFilter)):
        items = [prefilter(it, f.cfg) for it in items]
    for stage in stages:
        items = stage(items)
    return items
