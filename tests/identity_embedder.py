"""The identity embedder the pairs tests use: a tiny seeded DINOv2 (transformers' Dinov2Model, random weights)
over each object's masked crop on a grey background, L2-normalized, as the identity stage embeds objects.

One function, `embed_objects`, so that the identity stage's own function can replace it once both exist.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

SIDE = 56  # input side of the tiny model (patch 8 -> 7 x 7 patches)
GREY = 128


@functools.cache
def _model():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        patch_size=8,
        image_size=SIDE,
    )
    return Dinov2Model(cfg).eval()


def masked_crop(image: np.ndarray, mask: np.ndarray, box: list[float]) -> np.ndarray:
    """image (H, W, 3) uint8, mask (H, W) bool, box xyxy normalized -> the box's crop with the pixels outside
    the mask grey, resized to (SIDE, SIDE, 3) uint8."""
    h, w = mask.shape
    x0, y0 = int(box[0] * w), int(box[1] * h)
    x1, y1 = max(int(np.ceil(box[2] * w)), x0 + 1), max(int(np.ceil(box[3] * h)), y0 + 1)
    crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], GREY).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((SIDE, SIDE), Image.Resampling.BILINEAR))


@torch.no_grad()
def embed_objects(images: list[np.ndarray], masks: list[np.ndarray], boxes: list[list[float]]) -> np.ndarray:
    """N objects (their image (H, W, 3) uint8, mask (H, W) bool, box xyxy normalized) -> (N, D) float32
    L2-normalized identity embeddings: the CLS token and the mean patch token of the tiny DINOv2, concatenated."""
    crops = np.stack([masked_crop(i, m, b) for i, m, b in zip(images, masks, boxes)])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    hidden = _model()(pixel_values=x).last_hidden_state  # (N, 1 + patches, D)
    emb = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], -1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()
