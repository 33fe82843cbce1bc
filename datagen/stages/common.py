"""What every stage shares: item failures, device and dtype choice, and the decode helper."""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from catalogs.schema import FAILURE_STAGES, make_key

Item = dict[str, Any]

# PIL format name -> record image extension; other encodings cannot pass through unchanged.
_PASSTHROUGH_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# Containers whose bytes are one of those encodings to every decoder: stored as that encoding, unchanged.
# An MPO (CIPA DC-007 multi-picture file, written by many phone and stereo cameras) is a baseline JPEG
# whose first picture every JPEG decoder reads; the further pictures follow its end-of-image marker.
_CONTAINER_FORMATS = {"mpo": "jpeg"}


def fail(item: Item, stage: str, reason: str) -> Item:
    """Mark an item failed at `stage` (one of catalogs.schema.FAILURE_STAGES); later stages skip it."""
    assert stage in FAILURE_STAGES, f"failure stage {stage!r} is not one of {FAILURE_STAGES}"
    item["failure"] = {"stage": stage, "reason": reason}
    return item


def failed(item: Item) -> bool:
    return item.get("failure") is not None


def live(items: list[Item]) -> list[int]:
    """Indices of the items no earlier stage failed."""
    return [i for i, it in enumerate(items) if not failed(it)]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on GPUs that support it, else fp16; fp32 on CPU (half matmuls are slow or missing there)."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def decode_item(source: str, image_bytes: bytes, *, alt_text: str | None = None, key: str | None = None) -> Item:
    """Encoded image bytes -> an item with `image` ((H, W, 3) uint8 RGB), or one failed at 'decode'.

    The bytes are kept unchanged in `image_bytes` (records pass them through, never re-encode), and
    `image_format` is the encoding they are stored as ("jpeg", "png" or "webp"). An MPO file (a camera's
    multi-picture JPEG) is stored as a jpg with its bytes unchanged, extra pictures included: the record's
    pixels are its first picture, which is what every JPEG decoder (PIL, catalogs.reader, torchvision)
    reads from those bytes, so masks and boxes match whatever reads the record. EXIF orientation is not
    applied, matching catalogs.reader, so boxes refer to the stored pixel grid.
    """
    item: Item = {"key": key or make_key(source), "source": source, "image_bytes": image_bytes, "alt_text": alt_text}
    if not image_bytes:
        return fail(item, "decode", "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image_bytes)) as im:
                fmt = (im.format or "").lower()
                item["image_format"] = _CONTAINER_FORMATS.get(fmt, fmt)
                image = np.asarray(im.convert("RGB"))  # an MPO opens at its first picture
    except Exception as e:  # PIL raises many types for broken files; all mean "undecodable"
        # Reasons are aggregated in the catalog: drop per-call details such as object addresses.
        msg = re.sub(r"\s*<[^>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()
        return fail(item, "decode", f"undecodable image: {type(e).__name__}: {msg}")
    if item["image_format"] not in _PASSTHROUGH_FORMATS:
        return fail(item, "decode", f"{item['image_format'] or 'unknown'} encoding: records pass bytes through "
                    f"and store only {sorted(set(_PASSTHROUGH_FORMATS.values()))}")
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        return fail(item, "decode", f"image has shape {image.shape}, expected (H, W, 3)")
    item["image"] = image
    return item


def chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
