"""Per-instance masks as COCO RLE (pycocotools), the encoding records store.

encode: bool/uint8 (H, W) array -> {"size": [H, W], "counts": str}
decode: that dict -> bool (H, W) array
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode one (H, W) mask. pycocotools needs Fortran-ordered uint8, hence the copy."""
    if mask.ndim != 2:
        raise ValueError(f"expected one (H, W) mask, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Decode one COCO RLE dict to a bool (H, W) array."""
    counts = rle["counts"]
    obj = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(obj).astype(bool)


def decode_many(rles: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Decode a list of RLEs to a bool (N, H, W) stack; (0, H, W) when there are none."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([decode(r) for r in rles])
