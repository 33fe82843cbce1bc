"""Image files -> upright 8-bit pixels: the one way a source image is decoded, for datagen's records and for the
hashes of held-out images (catalogs/hashing.py), so both sides see the same pixels. IMAGE_SUFFIXES names the files
read as images: a source folder's (datagen/sources.py) and a held-out folder's (catalogs/hashing.py).

    with no_pil_pixel_limit():
        d = decode(data, exif_transpose=True, background=(255, 255, 255), max_pixels=128_000_000)
    d.pixels      # PIL image, mode "L" or "RGB", 8 bits per channel, (W, H) at most max_pixels
    d.transforms  # what was done beyond what `Image.open(...).convert("RGB")` does, e.g. ["exif_transpose"]

What `decode` does, in order (docs/pipeline.md, "What each image becomes"):
    open        any format Pillow reads; HEIC/HEIF through pillow-heif; AVIF (Pillow's wheels read it);
                the first frame of a multi-frame file (GIF, TIFF, MPO, HEIF sequences)
    size        above max_pixels a JPEG is decoded at a reduced scale (PIL's `draft`: 1/2, 1/4 or 1/8, no
                full-size decode), anything else at full size; an image whose decode would still exceed
                DECODE_CEILING x max_pixels is refused (TooLarge) from its header, before any pixel is
                decoded: PIL's own decompression-bomb check does the same at 2 x its limit
    orientation the EXIF orientation tag (2-8) applied: pixels in the frame every viewer shows
    depth       16-bit (I;16*) and 32-bit int (I) images scaled by 255/65535, float (F) images from [0, 1] (or
                their own range) to 0-255: never clipped (`convert("RGB")` clips them to 255)
    alpha       transparency (RGBA, LA, PA, P or RGB/L with a transparent colour) composited on `background`
                when any pixel is not opaque
    downscale   to at most max_pixels (aspect kept, Lanczos)
An image none of this applies to decodes to exactly `Image.open(data).convert("RGB")`: what
catalogs.reader reads from a record's bytes.
"""

from __future__ import annotations

import io
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from PIL import Image, ImageOps

WHITE = (255, 255, 255)
# The files read as images, by suffix, in any case (IMG_0001.HEIC). HEIC/HEIF (.hif: Fujifilm's and Canon's
# spelling) and AVIF are what phones write by default; `decode` opens them all. A record stores only
# schema.RECORD_IMAGE_FORMATS: datagen converts the rest to PNG (datagen.stages.common.decode_item).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".hif", ".avif")
DEFAULT_MAX_PIXELS = 128_000_000  # a 108 MP phone photo (12000x9000) decodes at full size
# Decoding more than this many times max_pixels at full size before downscaling is refused: 2 x 128 MP as RGBA
# is 1 GB, the most one decode task should hold.
DECODE_CEILING = 2
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_GRAY_MODES = ("1", "L", "LA", "La") + _DEPTH_MODES
_DRAFT_FORMATS = ("JPEG", "MPO")  # formats PIL can decode at 1/2, 1/4, 1/8 scale

_registered = False
_limit_lock = threading.Lock()
_limit_users = 0
_saved_limit: int | None = None


class TooLarge(ValueError):
    """The image would need more memory to decode than its pixel limit allows; the message says what to set."""


@dataclass
class Decoded:
    """A decoded image. pixels: mode "L" or "RGB", upright, at most max_pixels. format: Pillow's name, lower
    case ("jpeg", "png", "heif", ...). size: (W, H) upright, before any downscale. transforms: in order, each
    of "exif_transpose", "16bit->8bit", "int->8bit", "float->8bit", "alpha->background", "downscaled".
    frames: frames in the file (only the first is decoded). icc_profile: the source's, when it fits `pixels`."""

    pixels: Image.Image
    format: str
    size: tuple[int, int]
    frames: int = 1
    transforms: list[str] = field(default_factory=list)
    icc_profile: bytes | None = None


def register_plugins() -> None:
    """HEIC/HEIF through pillow-heif, once per process (AVIF needs nothing: Pillow reads it)."""
    global _registered
    if not _registered:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        _registered = True


@contextmanager
def no_pil_pixel_limit():
    """PIL's decompression-bomb check off while the block runs: `decode` enforces its own limit from the
    header's size before decoding. Thread-safe and re-entrant: the first to enter saves PIL's limit, the last
    to leave restores it (other code of the process sees no limit meanwhile)."""
    global _limit_users, _saved_limit
    with _limit_lock:
        if _limit_users == 0:
            _saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _saved_limit


def fit_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """(W, H) scaled down to at most max_pixels, aspect kept (each side at least 1); SIZE when it fits."""
    w, h = size
    if w * h <= max_pixels:
        return size
    s = math.sqrt(max_pixels / (w * h))
    return max(1, math.floor(w * s)), max(1, math.floor(h * s))


def decode(
    data: bytes,
    *,
    exif_transpose: bool = True,
    background: tuple[int, int, int] = WHITE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Encoded image bytes -> Decoded (module docstring). Raises TooLarge, or whatever PIL raises for bytes it
    cannot decode. Call it inside `no_pil_pixel_limit()` for images above PIL's limit (89.5 MP)."""
    register_plugins()
    # Not closed: closing frees the pixels `out` may share, and a BytesIO holds no file handle.
    im = Image.open(io.BytesIO(data))
    fmt, full = (im.format or "").lower(), im.size
    _reduce_on_decode(im, max_pixels)
    frames = getattr(im, "n_frames", 1)  # before load: counting a GIF's frames seeks, then back to the first
    icc = im.info.get("icc_profile")
    im.load()
    out, orientation = _upright(im) if exif_transpose else (im, 1)
    out, transforms = _to_8bit(out, background)
    size = (full[1], full[0]) if orientation in (5, 6, 7, 8) else full  # quarter turns swap the sides
    transforms = (["exif_transpose"] if orientation != 1 else []) + transforms
    target = fit_size(size, max_pixels)
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        transforms.append("downscaled")
    return Decoded(out, fmt, size, frames, transforms, icc if _icc_fits(icc, out.mode) else None)


def _reduce_on_decode(im: Image.Image, max_pixels: int) -> None:
    """Above max_pixels, have a JPEG decode at the smallest of 1/2, 1/4, 1/8 scale still at least the
    downscaled size; refuse (TooLarge) what would still be above DECODE_CEILING x max_pixels."""
    w, h = im.size
    if w * h > max_pixels and im.format in _DRAFT_FORMATS:
        tw, th = fit_size((w, h), max_pixels)
        im.draft(im.mode, (tw, th))
    if im.size[0] * im.size[1] > DECODE_CEILING * max_pixels:
        raise TooLarge(
            f"image too large to decode: above {DECODE_CEILING} x decode.max_pixels "
            f"({max_pixels} pixels) at full size; raise decode.max_pixels to take it"
        )


def _upright(im: Image.Image) -> tuple[Image.Image, int]:
    """IM with its EXIF orientation applied, and that orientation (2-8); (IM, 1) when there is none."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:
        return im, 1
    if orientation not in range(2, 9):
        return im, 1
    return ImageOps.exif_transpose(im), orientation


def _to_8bit(im: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, list[str]]:
    """IM as mode "L" or "RGB" at 8 bits, and the transforms that took beyond `convert("RGB")`."""
    tags = []
    if im.mode in _DEPTH_MODES:
        im, tag = _scale_depth(im)
        tags.append(tag)
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            flat = Image.new("RGB", rgba.size, background)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat, tags + ["alpha->background"]
    if im.mode in ("L", "RGB"):
        return im, tags
    # Exactly what catalogs.reader's convert("RGB") gives; a gray mode stays one channel (a smaller PNG).
    return im.convert("L" if im.mode in _GRAY_MODES else "RGB"), tags


def _scale_depth(im: Image.Image) -> tuple[Image.Image, str]:
    """A 16-bit, 32-bit int or float image -> mode "L". 16-bit (and int values within 0-65535) scale by
    255/65535; other ints by their own range; floats from [0, 1] when they lie in it, else their finite range."""
    import numpy as np

    a = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and a.min() >= 0 and a.max() <= 65535):
        out, tag = (a.astype(np.uint32) * 255 + 32767) // 65535, "16bit->8bit"
    else:
        tag = "float->8bit" if im.mode == "F" else "int->8bit"
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (0.0, 1.0) if im.mode == "F" and a.min() >= 0 and a.max() <= 1 else (a.min(), a.max())
        out = np.rint((a - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L"), tag


def _icc_fits(icc: bytes | None, mode: str) -> bool:
    """Whether an ICC profile describes pixels of MODE (its colour space: bytes 16-20 of the header)."""
    return bool(icc) and len(icc) >= 20 and icc[16:20] == (b"GRAY" if mode == "L" else b"RGB ")
