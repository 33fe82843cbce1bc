"""Image-level filters of the data recipe, run after grounding (so SAM never sees a rejected image).

An image fails at stage "filter" when it is smaller than `min_side`, more elongated than `max_aspect`, or
has fewer than `min_detections` / more than `max_detections` grounded boxes after NMS. Object-level
quality (area fraction, aspect, mask fill, containment) is not filtered here: `assemble.to_record` stores
it on every object so training-time filters are queries over the catalog.
"""

from __future__ import annotations

from datagen.config import FilterConfig
from datagen.stages.common import Item, fail, live


def image_reject_reason(height: int, width: int, n_detections: int, cfg: FilterConfig) -> str | None:
    """Why an image fails the filters, or None when it passes."""
    short, long = min(height, width), max(height, width)
    if short < cfg.min_side:
        return f"image is {width}x{height}, shorter side below min_side {cfg.min_side}"
    if long / short > cfg.max_aspect:
        return f"image is {width}x{height}, aspect {long / short:.2f} above max_aspect {cfg.max_aspect}"
    if n_detections < cfg.min_detections:
        return f"{n_detections} detections, fewer than min_detections {cfg.min_detections}"
    if n_detections > cfg.max_detections:
        return f"{n_detections} detections, more than max_detections {cfg.max_detections}"
    return None


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
        return items
