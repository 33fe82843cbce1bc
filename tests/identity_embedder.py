"""The identity embeddings the pairs tests use: the tiny preset's identity stage (datagen/stages/identity.py, a
seeded DINOv2 with random weights), one image's objects at a time, exactly as a datagen run embeds them."""

from __future__ import annotations

import functools

import numpy as np

from subjectdiff.datagen.job import preset
from subjectdiff.datagen.stages.identity import Identifier


@functools.cache
def identifier() -> Identifier:
    return Identifier(preset("tiny").stages.identity)


def embed_objects(images: list[np.ndarray], masks: list[np.ndarray], boxes: list[list[float]]) -> np.ndarray:
    """N objects (their image (H, W, 3) uint8, mask (H, W) bool, box xyxy normalized) -> (N, D) float32
    L2-normalized identity embeddings, each object embedded as the stage embeds it."""
    rows = [identifier().embed_objects(im, [m], [b])[0] for im, m, b in zip(images, masks, boxes)]
    return np.stack(rows).astype(np.float32)
