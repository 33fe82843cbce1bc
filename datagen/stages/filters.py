"""Image-level filters of the data recipe.

An image fails at stage "filter" when its shorter side is below `min_side` or its longer side below
`min_long_side`, when it is more elongated than `max_aspect`, or when it has fewer than `min_detections` / more
than `max_detections` grounded boxes after NMS. With `count_words`, a passing image's caption gets the count of
each noun detected 2-6 times ("two dogs"), after grounding and before SAM (nouns.with_count_words). Size and aspect need
only the decoded image, so `prefilter` applies them before any model runs (no GPU time on thumbnails and
banners); `ImageFilter` runs after grounding, so SAM never sees a rejected image, and checks size and aspect
again so an item that skipped the prefilter is filtered all the same. Object-level quality (area fraction,
aspect, mask fill, containment) is not filtered here: `assemble.to_record` stores it on every object so
training-time filters are queries over the catalog.
"""

from __future__ import annotations

from subjectdiff.datagen.config import FilterConfig
from subjectdiff.datagen.stages.common import Item, fail, failed, live
from subjectdiff.datagen.stages.nouns import with_count_words


def size_reject_reason(height: int, width: int, cfg: FilterConfig) -> str | None:
    """Why an image of this size fails the filters, or None when its size and aspect pass."""
    short, long = min(height, width), max(height, width)
    if short < cfg.min_side:
        return f"image is {width}x{height}, shorter side below min_side {cfg.min_side}"
    if long < cfg.min_long_side:
        return f"image is {width}x{height}, longer side below min_long_side {cfg.min_long_side}"
    if long / short > cfg.max_aspect:
        return f"image is {width}x{height}, aspect {long / short:.2f} above max_aspect {cfg.max_aspect}"
    return None


def image_reject_reason(height: int, width: int, n_detections: int, cfg: FilterConfig) -> str | None:
    """Why an image fails the filters, or None when it passes."""
    reason = size_reject_reason(height, width, cfg)
    if reason:
        return reason
    if n_detections < cfg.min_detections:
        return f"{n_detections} detections, fewer than min_detections {cfg.min_detections}"
    if n_detections > cfg.max_detections:
        return f"{n_detections} detections, more than max_detections {cfg.max_detections}"
    return None


def prefilter(item: Item, cfg: FilterConfig) -> Item:
    """Fail a decoded item at stage "filter" when its size or aspect fails; run it before the captioner."""
    if not failed(item):
        reason = size_reject_reason(*item["image"].shape[:2], cfg)
        if reason:
            fail(item, "filter", reason)
    return item


class ImageFilter:
    """No model: `__call__(items)` fails the items that do not pass (see module docstring)."""

    stage = "filter"

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def __call__(self, items: list[Item]) -> list[Item]:
        for i in live(items):
            h, w = items[i]["image"].shape[:2]
            reason = image_reject_reason(h, w, len(items[i].get("detections") or []), self.cfg)
            if reason:
                fail(items[i], "filter", reason)
            elif self.cfg.count_words:
                counts: dict[int, int] = {}
                for det in items[i]["detections"]:
                    counts[det["noun"]] = counts.get(det["noun"], 0) + 1
                items[i]["caption"], items[i]["nouns"] = with_count_words(
                    items[i]["caption"], items[i]["nouns"], counts
                )
        return items
