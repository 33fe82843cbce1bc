"""Drawing objects on an image: the one palette and the one overlay of boxes and masks.

The report's record cards and curation thumbnails, `train preview`'s target crops and `infer generate --boxes`
all draw with `overlay`, object i of an image in `object_color(i)`, so an object looks the same wherever a
person sees it. Numpy and PIL only: train and infer import it without pulling in the report's DuckDB parts.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from subjectdiff.catalogs.boxes import xyxy_norm_to_pixel_rect

# 20 distinct colors (Trubetskoy's list, black for its white), object i of a record gets PALETTE[i % 20].
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
    (0, 0, 0),
]


def object_color(i: int) -> tuple[int, int, int]:
    """The RGB color of object i of an image."""
    return PALETTE[i % len(PALETTE)]


def hex_color(c: tuple[int, int, int]) -> str:
    """(r, g, b) -> "#rrggbb" for CSS and SVG."""
    return f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}"


def ink(c: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads on background color c (relative luminance)."""
    return "#000" if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 else "#fff"


def overlay(
    image: np.ndarray,
    masks: np.ndarray | None,
    boxes: np.ndarray,
    colors: list[tuple[int, int, int]],
    *,
    alpha: float = 0.45,
    thickness: int = 2,
    labels: list[str] | None = None,
) -> np.ndarray:
    """Tint each object's mask and draw its box, each object in its own color.

    image: (H, W, 3) uint8 RGB. masks: (N, H, W), bool, or float coverage in [0, 1] (a downscaled mask's
    edge pixels then blend partially); None draws boxes only. boxes: (N, 4) xyxy normalized to [0, 1].
    colors: N RGB triples. Masks are blended in object order with opacity `alpha`; boxes are drawn on top,
    `thickness` pixels inside the box's pixel extent (catalogs.boxes.xyxy_norm_to_pixel_rect). labels: N texts
    written in each box's top-left corner in its color, or None. Returns a new (H, W, 3) uint8 array.
    """
    h, w = image.shape[:2]
    n_masks = len(boxes) if masks is None else len(masks)
    if n_masks != len(boxes) or len(colors) < len(boxes) or (labels is not None and len(labels) != len(boxes)):
        raise ValueError(
            f"overlay: {n_masks} masks, {len(boxes)} boxes, {len(colors)} colors"
            + ("" if labels is None else f", {len(labels)} labels")
        )
    out = image.copy() if masks is None else _tint(image, masks, colors, alpha)
    pixel_boxes = [xyxy_norm_to_pixel_rect([float(v) for v in box], w, h) for box in boxes]
    for (x0, y0, x1, y1), c in zip(pixel_boxes, colors):
        t = thickness
        out[y0 : min(y0 + t, y1), x0:x1] = c
        out[max(y1 - t, y0) : y1, x0:x1] = c
        out[y0:y1, x0 : min(x0 + t, x1)] = c
        out[y0:y1, max(x1 - t, x0) : x1] = c
    if labels:
        out = _write_labels(out, pixel_boxes, colors, labels)
    return out


def _tint(image: np.ndarray, masks: np.ndarray, colors: list[tuple[int, int, int]], alpha: float) -> np.ndarray:
    """image (H, W, 3) uint8 with masks (N, H, W) blended in, in object order: (H, W, 3) uint8."""
    h, w = image.shape[:2]
    out = image.astype(np.float32)
    for m, c in zip(masks, colors):
        if m.shape != (h, w):
            raise ValueError(f"overlay: mask shape {m.shape} does not match image {(h, w)}")
        a = alpha * m.astype(np.float32)[..., None]
        out = out * (1.0 - a) + np.asarray(c, np.float32) * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write_labels(
    image: np.ndarray,
    pixel_boxes: list[tuple[int, int, int, int]],
    colors: list[tuple[int, int, int]],
    labels: list[str],
) -> np.ndarray:
    """Each label in PIL's default font just inside its box's top-left corner: (H, W, 3) uint8."""
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for (x0, y0, _, _), c, text in zip(pixel_boxes, colors, labels):
        draw.text((x0 + 2, y0 + 1), text, fill=tuple(c))
    return np.asarray(pil)
