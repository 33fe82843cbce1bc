"""Box conventions and every crossing between them, each named by its formats. Record geometry is the data
contract, so its conversions live with it, where datagen, train and infer all may import them.

    GroundingDINO output   cxcywh, normalized to [0, 1] by the (unpadded) image size
    records (catalogs)     xyxy, normalized to [0, 1] by the image width and height
    SAM prompts            xyxy (boxes) or xy (points), float pixels of the original image
                           (SamPredictor rescales them to its 1024 input)
    pixel rects            xyxy whole pixels, x1 and y1 exclusive: the pixels a box covers (masks, overlays, crops)
    layout boxes (infer)   xyxy normalized to [0, 1] in the GENERATED image

The float conversions take (N, 4) torch tensors or array-likes and return the same kind (arrays as float64);
torch is never imported here (a tensor is recognised by its methods), so catalogs stays free of it.
"""

from __future__ import annotations

import math

import numpy as np


def _is_tensor(x) -> bool:
    return hasattr(x, "new_tensor")  # torch.Tensor, without importing torch


def _scale(boxes, scale: list[float]):
    """The factor SCALE as a tensor like BOXES (same dtype and device), or a float64 array."""
    return boxes.new_tensor(scale) if _is_tensor(boxes) else np.asarray(scale, dtype=np.float64)


def cxcywh_norm_to_xyxy_norm(boxes):
    """(N, 4) cxcywh normalized -> (N, 4) xyxy normalized, clamped to [0, 1] (GroundingDINO -> records)."""
    if not _is_tensor(boxes):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    out = boxes.clone() if _is_tensor(boxes) else boxes.copy()
    out[..., 0], out[..., 1], out[..., 2], out[..., 3] = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    return out.clip(0.0, 1.0)


def xyxy_norm_to_xyxy_pixels(boxes, width: int, height: int):
    """(N, 4) xyxy normalized -> (N, 4) xyxy float pixels of a width x height image (records -> SAM prompts).
    An array-like of 4 numbers gives (1, 4)."""
    scale = _scale(boxes, [width, height, width, height])
    if _is_tensor(boxes):
        return boxes * scale
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale


def xyxy_pixels_to_xyxy_norm(boxes, width: int, height: int):
    """(N, 4) xyxy float pixels -> (N, 4) xyxy normalized, clamped to [0, 1]."""
    scale = _scale(boxes, [width, height, width, height])
    if _is_tensor(boxes):
        return (boxes / scale).clamp(0.0, 1.0)
    return np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale, 0.0, 1.0)


def xy_norm_to_xy_pixels(point, width: int, height: int) -> np.ndarray:
    """(2,) xy normalized -> (2,) xy float pixels of a width x height image (a SAM point prompt)."""
    return np.asarray(point, np.float64) * [width, height]


def xyxy_norm_to_pixel_rect(box, width: int, height: int) -> tuple[int, int, int, int]:
    """(4,) xyxy normalized -> the pixel rect it covers (x0, y0, x1, y1) in whole pixels, x1 and y1 exclusive,
    clamped to the image: at least one pixel, inside the image, even for a zero-width box on the right or bottom
    border (edges round outwards: floor for x0 and y0, ceil for x1 and y1)."""
    x0 = min(max(int(math.floor(box[0] * width)), 0), width - 1)
    y0 = min(max(int(math.floor(box[1] * height)), 0), height - 1)
    x1 = int(math.ceil(box[2] * width))
    y1 = int(math.ceil(box[3] * height))
    return x0, y0, min(width, max(x1, x0 + 1)), min(height, max(y1, y0 + 1))


def xyxy_pixels_union_rect(boxes_px: np.ndarray) -> tuple[int, int, int, int]:
    """(K, 4) xyxy float pixel boxes, K >= 1 -> the pixel rect of their union (x0, y0, x1, y1), x1 and y1
    exclusive (edges round outwards; not clamped to any image)."""
    return (
        int(np.floor(boxes_px[:, 0].min())),
        int(np.floor(boxes_px[:, 1].min())),
        int(np.ceil(boxes_px[:, 2].max())),
        int(np.ceil(boxes_px[:, 3].max())),
    )


def xyxy_norm_to_crop_norm(box: np.ndarray, width: int, height: int, x0: int, y0: int, side: int) -> np.ndarray:
    """(4,) xyxy normalized in a width x height image -> (4,) float32 xyxy normalized in its square crop
    (x0, y0, side in pixels), clipped to the crop."""
    wh = np.array([width, height] * 2, np.float32)
    return np.clip((box * wh - [x0, y0, x0, y0]) / side, 0, 1).astype(np.float32)


def xyxy_intersection_area(a, b) -> float:
    """The area of the intersection of two (4,) xyxy boxes, in their units (0 when they do not overlap)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)
