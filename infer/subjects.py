"""Subject cut-outs for inference: the model library's one subject-image function
(`subjectdiff.model.subject_image`: the mask's bounding box, pixels outside the mask white, padded to a centred
square, resized), which the trainer calls too, with its augmentation on.

The mask comes from the user, or from SAM prompted with a box or a point in the source image, or (neither) from
SAM's most salient object: a point at the image centre, the multimask output whose pixels lie closest to the
centre (the reference code's `find_main_entity`), holes filled.

Coordinates: every box and point a user gives here is normalized to [0, 1] in the SOURCE image (xyxy for boxes,
xy for points); they cross to SAM's pixel coordinates through `subjectdiff.catalogs.boxes`.
(The layout boxes, where subjects go in the generated image, are another thing: see infer.pipeline.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from subjectdiff.catalogs import images
from subjectdiff.catalogs.boxes import xy_norm_to_xy_pixels, xyxy_norm_to_xyxy_pixels
from subjectdiff.model.subject_image import fill_holes, fill_holes_pil, mask_array, rgb_array, subject_image  # noqa: F401  (re-exported)
from subjectdiff.sam import load_sam

log = logging.getLogger(__name__)


def load_image(image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB. A path decodes as datagen decodes its inputs
    (catalogs.images.decode: upright by its EXIF orientation, HEIC/AVIF, 16-bit, alpha over white)."""
    if isinstance(image, (str, os.PathLike)):
        image = images.decode(Path(image).read_bytes()).pixels
    return rgb_array(image)


def load_mask(mask: str | os.PathLike | Image.Image | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A path, PIL image or array (nonzero = subject; subject_image.mask_array: an alpha channel is the mask)
    -> (H, W) bool, resized (nearest) to `shape` (H, W). A file is turned upright by its EXIF orientation, as
    the photo is (load_image)."""
    if isinstance(mask, (str, os.PathLike)):
        with Image.open(mask) as im:
            mask = ImageOps.exif_transpose(im)
    mask = mask_array(mask)
    if mask.shape != tuple(shape):
        mask = np.asarray(Image.fromarray((mask > 0).astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST))
    return mask > 0


def main_entity(masks: np.ndarray, min_area: float = 0.01) -> int:
    """masks: (K, H, W) bool -> index of the mask whose pixels lie closest (mean squared distance) to the image
    centre, among those covering at least min_area of the image (the reference code's salient-object rule)."""
    k, h, w = masks.shape
    best, best_d = 0, np.inf
    for i in range(k):
        ys, xs = np.nonzero(masks[i])
        if len(ys) < min_area * h * w:
            continue
        d = ((ys + 0.5 - h / 2) ** 2).mean() + ((xs + 0.5 - w / 2) ** 2).mean()
        if d < best_d:
            best, best_d = i, d
    return best


@dataclass
class Subject:
    """One subject to draw.

    image: a path, PIL image or (H, W, 3) uint8 array (the source photo).
    label: the class word of the prompt clause ", the {label} is sks" ("dog", "teapot").
    box: where to draw it, xyxy normalized to [0, 1] in the GENERATED image; None = the default layout.
    mask: the subject's mask in the source image (path or array, nonzero = subject); None = segment with SAM.
    region: SAM box prompt, xyxy normalized in the source image. point: SAM point prompt, xy normalized.
        Neither: SAM's most salient object (a point at the centre, see `main_entity`).
    """

    image: str | os.PathLike | Image.Image | np.ndarray
    label: str = "object"
    box: tuple[float, float, float, float] | None = None
    mask: str | os.PathLike | np.ndarray | None = None
    region: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for name in ("box", "region"):
            b = getattr(self, name)
            if b is not None:
                b = tuple(float(v) for v in b)
                if len(b) != 4 or not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
                    raise ValueError(
                        f"subject {name} {b} must be xyxy normalized: 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1"
                    )
                setattr(self, name, b)
        if self.point is not None and not all(0 <= float(v) <= 1 for v in self.point):
            raise ValueError(f"subject point {self.point} must be xy normalized to [0, 1]")

    def source(self) -> str:
        return str(self.image) if isinstance(self.image, (str, os.PathLike)) else f"<{type(self.image).__name__}>"


@dataclass
class Prepared:
    """A subject ready for the model. cutout: (E, E, 3) uint8 RGB on white; method: how it was segmented
    ("mask", "sam-box", "sam-point", "sam-salient", or "none" = the whole image, no segmenter given)."""

    subject: Subject
    cutout: np.ndarray
    method: str


class SubjectCutter:
    """Cuts subjects out of their photos. sam: an official SAM checkpoint path (or a built Sam module), or None
    (then subjects need a mask, or are used whole). size: side E of the cut-outs (the image encoder's input)."""

    def __init__(self, sam=None, size: int = 224, model_type: str = "auto", device: str = "cpu"):
        self.size = size
        self.predictor = None
        self.cache: dict[tuple, Prepared] = {}  # SAM results of subjects given as files (DreamBench reuses them)
        if sam is not None:
            from segment_anything import SamPredictor

            model = load_sam(sam, model_type) if isinstance(sam, (str, os.PathLike)) else sam
            self.predictor = SamPredictor(model.to(device))

    def __call__(self, subject: Subject) -> Prepared:
        key = None
        if isinstance(subject.image, (str, os.PathLike)) and subject.mask is None:
            key = (str(subject.image), subject.region, subject.point)
            if key in self.cache:
                return Prepared(subject, self.cache[key].cutout, self.cache[key].method)
        prepared = self.prepare(subject)
        if key is not None:
            self.cache[key] = prepared
        return prepared

    def prepare(self, subject: Subject) -> Prepared:
        image = load_image(subject.image)
        h, w = image.shape[:2]
        if subject.mask is not None:
            mask, method = load_mask(subject.mask, (h, w)), "mask"
        elif self.predictor is not None:
            mask, method = self.segment(image, subject)
        else:
            log.warning("%s: no mask and no SAM checkpoint: using the whole image as the subject", subject.source())
            mask, method = np.ones((h, w), bool), "none"
        if not mask.any():
            log.warning("%s: empty subject mask (%s); using the whole image", subject.source(), method)
            mask = np.ones((h, w), bool)
        return Prepared(subject, subject_image(image, mask, self.size), method)

    def segment(self, image: np.ndarray, subject: Subject) -> tuple[np.ndarray, str]:
        """SAM from the subject's region (box), point, or the salient-object rule -> ((H, W) bool, method)."""
        h, w = image.shape[:2]
        self.predictor.set_image(image)
        if subject.region is not None:
            box = xyxy_norm_to_xyxy_pixels(subject.region, w, h)[0]  # (4,) pixels
            masks, _, _ = self.predictor.predict(box=box, multimask_output=False)
            return masks[0], "sam-box"
        point = subject.point if subject.point is not None else (0.5, 0.5)
        masks, scores, _ = self.predictor.predict(
            point_coords=xy_norm_to_xy_pixels(point, w, h)[None], point_labels=np.array([1]), multimask_output=True
        )
        if subject.point is not None:
            return masks[int(np.argmax(scores))], "sam-point"
        return fill_holes(masks[main_entity(masks)]), "sam-salient"


def save_cutout(prepared: Prepared, path: str | os.PathLike) -> Path:
    Image.fromarray(prepared.cutout).save(path)
    return Path(path)
