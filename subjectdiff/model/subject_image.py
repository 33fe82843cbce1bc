"""The subject image: the one function that turns a photo and a subject mask into the image encoder's input,
for training (with augmentation, train/data.py) and inference (without, infer/subjects.py).

    img = subject_image(photo, mask, 224)                                    # inference: the cut-out on white
    img = subject_image(photo, mask, 224, augment=SubjectAugment(), rng=rng, background=bg)   # training

Steps (the reference code's `get_entity_image` and `synthesize`, `custom_dataset.py`):
1. the mask's bounding box, pixels outside the mask white (hard edge, at the photo's resolution);
2. either padded white to a centred square and resized (bicubic) to `size`, or, with a background photo
   (`background`, size x size), scaled so that its box covers `augment.background_area` of the image (about
   half, keeping its aspect) and pasted at a random position through its mask (bilinear, soft edge);
3. with `augment`: horizontal flip, rotation, perspective warp (torchvision's RandomPerspective), in that order.

Every random draw comes from `rng`, so a caller seeding it per (seed, epoch, key) gets the same image back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from subjectdiff.catalogs import images
from subjectdiff.catalogs.images import IMAGE_SUFFIXES

WHITE = (255, 255, 255)


def rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or (H, W, 3|4) / (H, W) uint8 array -> (H, W, 3) uint8 RGB (alpha dropped, grey repeated)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"subject image must be a PIL image or (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def mask_array(mask: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or array (nonzero = subject; bool or numbers; (H, W), (H, W, 3) or (H, W, 4)) -> (H, W) bool.
    An image with an alpha channel (a cut-out PNG, an (H, W, 4) array) is a mask by its alpha: its colours are
    the subject's, whose grey levels would make a wrong mask."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.getchannel("A") if "A" in mask.getbands() else mask.convert("L"))
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] in (3, 4):
        mask = mask[..., 3] if mask.shape[2] == 4 else mask.max(-1)
    if mask.ndim != 2:
        raise ValueError(f"a subject mask must be (H, W), (H, W, 3) or (H, W, 4), got {mask.shape}")
    return mask > 0


@dataclass
class SubjectAugment:
    """flip_p: horizontal flip probability. rotate_deg: rotation uniform in [-rotate_deg, rotate_deg].
    perspective: torchvision's distortion_scale (corners move inward by up to perspective / 2 of the side);
    perspective_p: its probability. background_area: box area / image area of a subject pasted on a
    background photo. Reference: 0.5, 10, 0.5, 0.5, 0.5."""

    flip_p: float = 0.5
    rotate_deg: float = 10.0
    perspective: float = 0.5
    perspective_p: float = 0.5
    background_area: float = 0.5


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(H, W) bool -> the mask's bounding box, integer pixel xyxy (x1, y1 exclusive)."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    if not len(ys):
        raise ValueError("the subject mask is empty")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the mask with its enclosed holes filled (the reference code's `fill_cavity`). scipy when
    installed (it comes with scikit-image); else `fill_holes_pil`."""
    try:
        from scipy.ndimage import binary_fill_holes
    except ImportError:
        return fill_holes_pil(mask)
    return binary_fill_holes(mask)


def fill_holes_pil(mask: np.ndarray) -> np.ndarray:
    """fill_holes without scipy: flood the background (4-connected) from a one-pixel frame around the mask; what
    it does not reach is object or hole."""
    from PIL import ImageDraw

    outside = Image.fromarray(np.pad(~mask, 1, constant_values=True).astype(np.uint8) * 255).copy()
    ImageDraw.floodfill(outside, (0, 0), 128)
    return np.asarray(outside)[1:-1, 1:-1] != 128


def perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """PIL's 8 PERSPECTIVE coefficients that map output points `dst` (4, 2) back to input points `src` (4, 2)."""
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    return np.linalg.solve(a, src.reshape(-1).astype(float))


def paste_on_background(
    crop: np.ndarray, mask: np.ndarray, background: np.ndarray, area: float, rng: np.random.Generator
) -> Image.Image:
    """crop (h, w, 3) uint8 and its mask (h, w) bool -> the background (S, S, 3) with the crop scaled to `area`
    of it (aspect kept, each side at most S) at a uniform random position, blended through the resized mask."""
    size = background.shape[0]
    h, w = mask.shape
    scale = (size * size * area / (h * w)) ** 0.5
    nh, nw = max(1, min(int(h * scale), size)), max(1, min(int(w * scale), size))
    x0, y0 = int(rng.integers(0, size - nw + 1)), int(rng.integers(0, size - nh + 1))
    out = Image.fromarray(background)
    rgb = Image.fromarray(crop).resize((nw, nh), Image.BICUBIC, reducing_gap=2.0)
    alpha = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR, reducing_gap=2.0)
    out.paste(rgb, (x0, y0), alpha)
    return out


def augment_image(
    pil: Image.Image, aug: SubjectAugment, rng: np.random.Generator, fill: tuple[int, int, int] = WHITE
) -> Image.Image:
    """Flip, rotation and perspective warp of a square image (torchvision's RandomHorizontalFlip,
    RandomRotation, RandomPerspective, in the reference's order); uncovered corners get `fill`."""
    size = pil.width
    if rng.random() < aug.flip_p:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if aug.rotate_deg > 0:
        pil = pil.rotate(float(rng.uniform(-aug.rotate_deg, aug.rotate_deg)), Image.BILINEAR, fillcolor=fill)
    if aug.perspective > 0 and rng.random() < aug.perspective_p:
        d = int(aug.perspective * (size // 2))
        corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], float)
        shift = rng.integers(0, d + 1, (4, 2)) * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
        coeffs = perspective_coeffs(corners, corners + shift)
        pil = pil.transform((size, size), Image.PERSPECTIVE, tuple(coeffs), Image.BILINEAR, fillcolor=fill)
    return pil


def subject_image(
    image: np.ndarray,
    mask: np.ndarray,
    size: int,
    *,
    augment: SubjectAugment | None = None,
    rng: np.random.Generator | None = None,
    background: np.ndarray | None = None,
    fill: tuple[int, int, int] = WHITE,
) -> np.ndarray:
    """image (H, W, 3) uint8 RGB, mask (H, W) bool -> (size, size, 3) uint8: the subject image (module
    docstring). background: (size, size, 3) uint8 photo to paste the subject on (needs augment and rng), or None
    for the cut-out on `fill`. Without augment and background this is exactly the inference cut-out."""
    x0, y0, x1, y1 = mask_bbox(mask)
    m = mask[y0:y1, x0:x1]
    crop = image[y0:y1, x0:x1]
    if background is not None:
        if augment is None or rng is None:
            raise ValueError("a background needs augment (its background_area) and rng (the paste position)")
        pil = paste_on_background(crop, m, background, augment.background_area, rng)
    else:
        cut = np.where(m[..., None], crop, np.array(fill, np.uint8))
        h, w = m.shape
        side = max(h, w)
        square = Image.new("RGB", (side, side), fill)
        square.paste(Image.fromarray(cut), ((side - w) // 2, (side - h) // 2))
        pil = square.resize((size, size), Image.BICUBIC, reducing_gap=2.0)
    if augment is not None:
        if rng is None:
            raise ValueError("augment needs rng")
        pil = augment_image(pil, augment, rng, fill)
    return np.asarray(pil, dtype=np.uint8)


@lru_cache(maxsize=8)
def background_files(folder: str) -> tuple[str, ...]:
    """The photos of a background folder (BG-20k's train/, or any), recursively, in sorted order: the same list
    on every rank and worker, so an index drawn from a seeded generator names the same photo everywhere."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data.backgrounds: {folder} is not a folder of background photos")
    files = tuple(sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"data.backgrounds: no photos ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def background_photo(path: str | os.PathLike, size: int, rng: np.random.Generator) -> np.ndarray:
    """A background photo as the reference prepares it (Resize(size) + RandomCrop(size)): shorter side resized
    to `size`, a random size x size crop. -> (size, size, 3) uint8. JPEGs decode at a reduced scale (draft)."""
    images.register_plugins()  # HEIC backgrounds open like datagen's inputs
    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at the smallest scale still >= size (no-op for others)
        im = im.convert("RGB")
        s = size / min(im.size)
        w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
        im = im.resize((w, h), Image.BILINEAR, reducing_gap=2.0)
    x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return np.asarray(im.crop((x0, y0, x0 + size, y0 + size)), np.uint8)
