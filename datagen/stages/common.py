"""What every stage shares: item failures, device and dtype choice, and the decode helper."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import torch

from subjectdiff.catalogs import images
from subjectdiff.catalogs.schema import is_failure_stage, make_key
from subjectdiff.datagen.config import DecodeConfig

Item = dict[str, Any]

# PIL format name -> record image extension; other encodings cannot pass through unchanged.
_PASSTHROUGH_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# Containers whose bytes are one of those encodings to every decoder: stored as that encoding, unchanged.
# An MPO (CIPA DC-007 multi-picture file, written by many phone and stereo cameras) is a baseline JPEG
# whose first picture every JPEG decoder reads; the further pictures follow its end-of-image marker.
_CONTAINER_FORMATS = {"mpo": "jpeg"}
# Re-encoded records (EXIF-rotated, 16-bit, transparent, converted, downscaled): zlib level 1 writes a 12 MP
# photo in ~1.3 s at ~13 bits/pixel; the default level 6 takes ~3.5x as long for 15 % fewer bytes.
_PNG_LEVEL = 1


def fail(item: Item, stage: str, reason: str) -> Item:
    """Mark an item failed at `stage` (a built-in failure stage, catalogs.schema.FAILURE_STAGES, or a registered
    stage's name); later stages skip it."""
    assert is_failure_stage(stage), f"failure stage {stage!r} is not a stage name (a lowercase identifier)"
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


def decode_item(
    source: str,
    image_bytes: bytes,
    *,
    alt_text: str | None = None,
    key: str | None = None,
    cfg: DecodeConfig | None = None,
) -> Item:
    """Encoded image bytes -> an item with `image` ((H, W, 3) uint8 RGB, upright), or one failed at 'decode'.

    Decoding follows CFG (None: DecodeConfig's defaults) through catalogs.images.decode: EXIF orientation,
    16-bit and float depths, transparency, the pixel limit and the first frame. `image_bytes` are what the
    record stores, in `image_format` ("jpeg", "png" or "webp"): the source's bytes unchanged when they decode
    to exactly `image` (catalogs.reader decodes them again, without EXIF, and checks the size); else `image`
    re-encoded as PNG (lossless), with the transforms in `extra["decode"]` (and `extra["original_size"]`,
    [W, H] upright, when downscaled). An MPO file (a camera's multi-picture JPEG) is stored as a jpg with its
    bytes unchanged, extra pictures included: every JPEG decoder reads its first picture.
    """
    cfg = cfg or DecodeConfig()
    item: Item = {"key": key or make_key(source), "source": source, "image_bytes": image_bytes, "alt_text": alt_text}
    if not image_bytes:
        return fail(item, "decode", "empty image bytes")
    try:
        with images.no_pil_pixel_limit():
            d = images.decode(
                image_bytes, exif_transpose=cfg.exif_transpose, background=cfg.background, max_pixels=cfg.max_pixels
            )
    except images.TooLarge as e:
        return fail(item, "decode", str(e))
    except ImportError:  # a missing package (pillow-heif) is this machine's fault, not the image's: stop the run
        raise
    except Exception as e:  # PIL raises many types for broken files; all mean "undecodable"
        # Reasons are aggregated in the catalog: drop per-call details such as object addresses.
        msg = re.sub(r"\s*<[^>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()
        return fail(item, "decode", f"undecodable image: {type(e).__name__}: {msg}")
    fmt = _CONTAINER_FORMATS.get(d.format, d.format)
    if fmt not in _PASSTHROUGH_FORMATS and not cfg.convert_formats:
        return fail(
            item,
            "decode",
            f"{fmt or 'unknown'} encoding: records store only "
            f"{sorted(set(_PASSTHROUGH_FORMATS.values()))} and decode.convert_formats is off",
        )
    image = np.asarray(d.pixels.convert("RGB"))
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        return fail(item, "decode", f"image has shape {image.shape}, expected (H, W, 3)")
    item["image"] = image
    item["image_format"] = fmt
    if fmt not in _PASSTHROUGH_FORMATS or d.transforms:
        _store_png(item, d, fmt)
    return item


def _store_png(item: Item, d: images.Decoded, fmt: str) -> None:
    """The decoded pixels become the record's bytes, as PNG, and extra["decode"] lists what was done:
    d.transforms, the first of several frames, and the source encoding when it was not PNG ("heif->png")."""
    tags = list(d.transforms)
    if d.frames > 1 and fmt not in _PASSTHROUGH_FORMATS:
        tags.append("first_frame")
    if fmt != "png":
        tags.append(f"{fmt or 'unknown'}->png")
    buf = io.BytesIO()
    d.pixels.save(buf, "PNG", compress_level=_PNG_LEVEL, icc_profile=d.icc_profile)
    item["image_bytes"], item["image_format"] = buf.getvalue(), "png"
    extra = item.setdefault("extra", {})
    extra["decode"] = tags
    if "downscaled" in tags:
        extra["original_size"] = list(d.size)


def chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
