"""Box conventions, each crossing named by its formats.

    GroundingDINO output   cxcywh, normalized to [0, 1] by the (unpadded) image size
    records (catalogs)     xyxy, normalized to [0, 1]
    SAM prompts            xyxy, pixels of the original image (SamPredictor rescales to its 1024 input)

All functions take and return (N, 4) float tensors or arrays of the same kind.
"""

from __future__ import annotations

import numpy as np
import torch


def cxcywh_norm_to_xyxy_norm(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) cxcywh normalized -> (N, 4) xyxy normalized, clamped to [0, 1]."""
    cx, cy, w, h = boxes.unbind(-1)
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return out.clamp(0.0, 1.0)


def xyxy_norm_to_xyxy_pixels(boxes, width: int, height: int):
    """(N, 4) xyxy normalized -> (N, 4) xyxy in pixels of a width x height image (float)."""
    scale = [width, height, width, height]
    if isinstance(boxes, torch.Tensor):
        return boxes * torch.tensor(scale, dtype=boxes.dtype, device=boxes.device)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.asarray(scale, dtype=np.float64)


def xyxy_pixels_to_xyxy_norm(boxes, width: int, height: int):
    """(N, 4) xyxy pixels -> (N, 4) xyxy normalized, clamped to [0, 1]."""
    scale = [width, height, width, height]
    if isinstance(boxes, torch.Tensor):
        return (boxes / torch.tensor(scale, dtype=boxes.dtype, device=boxes.device)).clamp(0.0, 1.0)
    return np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.asarray(scale, dtype=np.float64), 0.0, 1.0)
