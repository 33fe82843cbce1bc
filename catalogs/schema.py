"""The record contract: what one webdataset sample of subjectdiff holds.

A record describes one source image: the image bytes in their original encoding, and a JSON member with
the caption and one entry per grounded object (noun, character span, CLIP token positions, box, mask).
docs/records.md is the prose version of this module; bump SCHEMA_VERSION when either changes.

white_fraction (version 3): the fraction of the image's pixels that are near-white (all three channels above
0.9, NEAR_WHITE), the reference's test for cut-out and product shots; training skips the subjects of an image
above `data.max_white` and `catalog select --where "white_fraction <= 0.1"` leaves such images out.

Curation signals (version 2, from datagen's curate stage; None where a run did not measure them): per record
sha256, phash, clip_score, alt_clip_score, aesthetic, and the image embedding (`clip_embedding`, which goes to
the shard's embedding sidecar, not into the JSON); per object label_score and label_rank.

video (version 4): a record made from a frame of a video says which (`VideoFrame`: the source video, the shot
index, the frame index, the time in seconds); None for a photo. Cross-image pairs (catalogs/pairs.py) pair objects
of different frames of one video.

Coordinate conventions:
    box: [x0, y0, x1, y1], xyxy, normalized to [0, 1] by image width and height.
    span: [start, end) character offsets into the caption.
    tokens: positions in open_clip's tokenization of the caption, start-of-text token at 0.
    mask: COCO RLE {"size": [h, w], "counts": str}, one per object (overlaps survive).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.boxes import xyxy_intersection_area, xyxy_norm_to_pixel_rect

# 2: the curation signals (records of version 1 have none of them); 3: white_fraction; 4: `video` (frames of videos)
SCHEMA_VERSION = 4
_INT64 = (-(1 << 63), (1 << 63) - 1)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# The image formats a record may store, passed through as-is, named by their webdataset member extension
# (what files are read as images is catalogs.images.IMAGE_SUFFIXES).
RECORD_IMAGE_FORMATS = ("jpg", "png", "webp")
_EXT_ALIASES = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}

# Failure stages: where a sample dropped out of the pipeline. These are the built-in ones; a datagen stage
# registered later (datagen/stages/registry.py) fails under its own name, so a failure stage is checked by its
# form (`is_failure_stage`), not against this list: catalogs, the lower layer, never asks datagen.
FAILURE_STAGES = ("read", "decode", "caption", "nouns", "ground", "segment", "filter", "write")
_STAGE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
NEAR_WHITE = 229  # a channel above 0.9 of 255 (the reference's `image > 0.9` on [0, 1] tensors)


class RecordError(ValueError):
    """A record breaks the contract; the message names the key and the field."""


def is_failure_stage(stage: str) -> bool:
    """Whether STAGE can name a failure stage: a lowercase identifier of at most 32 characters ("filter",
    "nsfw_filter"), as every built-in one (FAILURE_STAGES) and every registered datagen stage is named."""
    return isinstance(stage, str) and _STAGE_RE.fullmatch(stage) is not None


def make_key(source: str, length: int = 20) -> str:
    """A stable webdataset key for a source (path, URL, or `shard.tar#member`).

    Hex of SHA-1 over the source string: the same source always gives the same key, keys never hold
    the dots webdataset splits member names on, and 80 bits keep collisions negligible at 1e9 images.
    """
    if not source:
        raise RecordError("cannot derive a key from an empty source")
    return hashlib.sha1(source.encode("utf-8")).hexdigest()[:length]


def image_extension(name_or_format: str) -> str:
    """Normalize 'JPEG', '.jpeg', 'photo.JPG' ... to the member extension ('jpg', 'png', 'webp')."""
    ext = name_or_format.rsplit(".", 1)[-1].lower()
    if ext not in _EXT_ALIASES:
        raise RecordError(f"unsupported image encoding {name_or_format!r}; expected one of {RECORD_IMAGE_FORMATS}")
    return _EXT_ALIASES[ext]


@dataclass
class ObjectAnn:
    """One grounded object instance.

    label: lemmatized noun ("dog"); phrase: the words as they stand in the caption ("dogs").
    span: [start, end) character offsets of `phrase` in the caption.
    tokens: CLIP BPE positions of the phrase (start token at 0); several when a word splits.
    box: [x0, y0, x1, y1] normalized xyxy. score: detection confidence.
    mask: COCO RLE dict {"size": [h, w], "counts": str}. mask_score: SAM's predicted IoU.
    Quality fields (filled by `compute_quality`, never by hand):
        area: box area / image area; aspect: box width / height in pixels;
        mask_area: mask pixels / image pixels; mask_fill: mask pixels inside the box / box pixels;
        containment: the largest fraction of this box covered by any other box of the record.
    Curation (datagen's curate stage; None when not measured):
        label_score: CLIP cosine of the object's masked crop and "a photo of a {label}";
        label_rank: 1 + the number of the record's other labels whose prompt the crop matches better.
    """

    label: str
    phrase: str
    span: list[int]
    tokens: list[int]
    box: list[float]
    score: float
    mask: dict[str, Any]
    mask_score: float
    area: float = float("nan")
    aspect: float = float("nan")
    mask_area: float = float("nan")
    mask_fill: float = float("nan")
    containment: float = float("nan")
    label_score: float | None = None
    label_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ObjectAnn:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class VideoFrame:
    """Where a record's image came from in a video.

    source: the video (path, URL or `shard.tar#member`, as the plan named it); shot: 0-based index of the shot
    (scene) the frame lies in; frame: 0-based index of the frame in the video's stream; time: its presentation
    time in seconds from the start.
    """

    source: str
    shot: int
    frame: int
    time: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> VideoFrame | None:
        return None if d is None else cls(str(d["source"]), int(d["shot"]), int(d["frame"]), float(d["time"]))


@dataclass
class Record:
    """One source image and its grounded objects. `image` holds the encoded bytes (never re-encoded).

    Curation signals (None when not measured): sha256, hex SHA-256 of `image`; phash, imagehash's 64-bit
    perceptual hash as a signed int64 (catalogs.hashing.phash_int64); clip_score / alt_clip_score, CLIP cosine of
    the image and `caption` / `alt_text`; aesthetic, the LAION aesthetic score; clip_embedding, (D,) L2-normalized
    image embedding (float16), written to the shard's embedding sidecar (catalogs/embeddings.py), not the JSON.
    """

    key: str
    image: bytes
    image_ext: str
    caption: str
    width: int
    height: int
    source: str
    objects: list[ObjectAnn] = field(default_factory=list)
    alt_text: str | None = None  # the source's own caption, when it had one
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (model ids, ...)
    sha256: str | None = None
    phash: int | None = None
    clip_score: float | None = None
    alt_clip_score: float | None = None
    aesthetic: float | None = None
    clip_embedding: np.ndarray | None = field(default=None, repr=False)
    white_fraction: float | None = None  # filled by the writer from the pixels when None
    video: VideoFrame | None = None  # the video frame this image is, None for a photo
    # (n_objects, D) L2-normalized instance-identity embeddings, row i for objects[i] (datagen's identity stage),
    # written to the shard's identity sidecar (catalogs/identity.py), not the JSON; None when not measured
    identity_embeddings: np.ndarray | None = field(default=None, repr=False)

    def meta_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "key": self.key,
            "caption": self.caption,
            "alt_text": self.alt_text,
            "width": self.width,
            "height": self.height,
            "source": self.source,
            "sha256": self.sha256,
            "phash": self.phash,
            "clip_score": self.clip_score,
            "alt_clip_score": self.alt_clip_score,
            "aesthetic": self.aesthetic,
            "white_fraction": self.white_fraction,
            "video": None if self.video is None else self.video.to_json(),
            "objects": [o.to_json() for o in self.objects],
            "extra": self.extra,
        }


@dataclass
class Failure:
    """A sample that dropped out: recorded as data so a run can account for every input."""

    key: str
    source: str
    stage: str
    reason: str
    video: VideoFrame | None = None  # the frame that failed, when the input was a video

    def __post_init__(self) -> None:
        if not is_failure_stage(self.stage):
            raise RecordError(
                f"failure stage {self.stage!r} of {self.key}: not a stage name (a lowercase "
                f"identifier, such as {', '.join(FAILURE_STAGES)})"
            )


def white_fraction(image: np.ndarray) -> float:
    """(H, W, 3) uint8 -> the fraction of pixels whose three channels all exceed 0.9 (NEAR_WHITE)."""
    darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])  # 10x faster than .all(-1)
    return float(np.count_nonzero(darkest > NEAR_WHITE) / max(darkest.size, 1))


def compute_quality(objects: list[ObjectAnn], width: int, height: int) -> None:
    """Fill the quality fields of every object in place (see ObjectAnn); they are derived, not supplied."""
    areas = [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in objects]
    for i, o in enumerate(objects):
        bw_px = (o.box[2] - o.box[0]) * width
        bh_px = (o.box[3] - o.box[1]) * height
        o.area = float(areas[i])
        o.aspect = float(bw_px / bh_px) if bh_px > 0 else float("inf")
        m = mask_codec.decode(o.mask)
        x0, y0, x1, y1 = xyxy_norm_to_pixel_rect(o.box, width, height)
        o.mask_area = float(m.sum() / m.size)
        box_px = (x1 - x0) * (y1 - y0)
        o.mask_fill = float(m[y0:y1, x0:x1].sum() / box_px) if box_px else 0.0
        o.containment = max(
            (xyxy_intersection_area(o.box, p.box) / areas[i] for j, p in enumerate(objects) if j != i and areas[i] > 0),
            default=0.0,
        )
        o.containment = float(o.containment)


def validate(record: Record) -> None:
    """Raise RecordError with an actionable message if the record breaks the contract."""
    k = record.key
    if not _KEY_RE.match(k or ""):
        raise RecordError(f"key {k!r}: keys are [A-Za-z0-9_-]+ (webdataset splits member names on dots)")
    if record.image_ext not in RECORD_IMAGE_FORMATS:
        raise RecordError(f"{k}: image_ext {record.image_ext!r} is not one of {RECORD_IMAGE_FORMATS}")
    if not record.image:
        raise RecordError(f"{k}: empty image bytes")
    if record.width <= 0 or record.height <= 0:
        raise RecordError(f"{k}: width and height must be positive, got {record.width}x{record.height}")
    _validate_curation(record)
    if record.video is not None:
        validate_video(record.video, k)
    for i, o in enumerate(record.objects):
        where = f"{k}: objects[{i}] ({o.label!r})"
        if len(o.box) != 4 or not all(0.0 <= v <= 1.0 for v in o.box):
            raise RecordError(f"{where}: box {o.box} must be 4 numbers in [0, 1] (normalized xyxy)")
        if not (o.box[0] <= o.box[2] and o.box[1] <= o.box[3]):
            raise RecordError(f"{where}: box {o.box} must satisfy x0 <= x1 and y0 <= y1")
        s, e = o.span
        if not (0 <= s < e <= len(record.caption)):
            raise RecordError(f"{where}: span {o.span} is outside the caption (length {len(record.caption)})")
        if record.caption[s:e] != o.phrase:
            raise RecordError(f"{where}: caption[{s}:{e}] is {record.caption[s:e]!r}, not the phrase {o.phrase!r}")
        if not o.tokens or any(t < 1 for t in o.tokens):
            raise RecordError(f"{where}: tokens {o.tokens} must be non-empty positions >= 1 (0 is the start token)")
        size = o.mask.get("size") if isinstance(o.mask, dict) else None
        if size != [record.height, record.width] or not isinstance(o.mask.get("counts"), str):
            raise RecordError(
                f"{where}: mask must be COCO RLE {{'size': [{record.height}, {record.width}], 'counts': str}}, "
                f"got size {size}"
            )


def validate_video(v: VideoFrame, key: str) -> None:
    """A VideoFrame names its video and has a shot and frame index >= 0 and a finite time >= 0."""
    if not isinstance(v, VideoFrame):
        raise RecordError(f"{key}: video must be a VideoFrame, got {type(v).__name__}")
    if not (isinstance(v.source, str) and v.source):
        raise RecordError(f"{key}: video.source must name the video, got {v.source!r}")
    for name in ("shot", "frame"):
        value = getattr(v, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise RecordError(f"{key}: video.{name} must be an integer >= 0, got {value!r}")
    if not (_finite_or_none(v.time) and v.time is not None and v.time >= 0):
        raise RecordError(f"{key}: video.time must be a finite number of seconds >= 0, got {v.time!r}")


def _finite_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v))


def _validate_curation(record: Record) -> None:
    """The curation fields, when present: a hex digest, an int64 hash, finite scores, ranks from 1, one (D,)
    finite embedding."""
    k = record.key
    if record.sha256 is not None and not (isinstance(record.sha256, str) and _SHA256_RE.match(record.sha256)):
        raise RecordError(f"{k}: sha256 {record.sha256!r} must be 64 lowercase hex digits (hashlib's hexdigest)")
    if record.phash is not None and not (
        isinstance(record.phash, (int, np.integer))
        and not isinstance(record.phash, bool)
        and _INT64[0] <= record.phash <= _INT64[1]
    ):
        raise RecordError(f"{k}: phash {record.phash!r} must be a signed 64-bit integer (catalogs.hashing.phash_int64)")
    for name in ("clip_score", "alt_clip_score", "aesthetic"):
        if not _finite_or_none(getattr(record, name)):
            raise RecordError(f"{k}: {name} {getattr(record, name)!r} must be a finite number or None")
    wf = record.white_fraction
    if wf is not None and not (_finite_or_none(wf) and 0 <= wf <= 1):
        raise RecordError(f"{k}: white_fraction {wf!r} must be a fraction in [0, 1] or None")
    for i, o in enumerate(record.objects):
        if not _finite_or_none(o.label_score):
            raise RecordError(f"{k}: objects[{i}] ({o.label!r}): label_score {o.label_score!r} must be finite or None")
        if o.label_rank is not None and not (isinstance(o.label_rank, (int, np.integer)) and o.label_rank >= 1):
            raise RecordError(
                f"{k}: objects[{i}] ({o.label!r}): label_rank {o.label_rank!r} must be an int >= 1 or None"
            )
    e = record.clip_embedding
    if e is not None:
        arr = np.asarray(e)
        if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise RecordError(
                f"{k}: clip_embedding must be a non-empty (D,) array of finite floats, got "
                f"shape {arr.shape} dtype {arr.dtype}"
            )
    ids = record.identity_embeddings
    if ids is not None:
        arr = np.asarray(ids)
        if (
            arr.ndim != 2
            or arr.shape[0] != len(record.objects)
            or arr.shape[1] == 0
            or arr.dtype.kind != "f"
            or not np.isfinite(arr).all()
        ):
            raise RecordError(
                f"{k}: identity_embeddings must be an (n_objects={len(record.objects)}, D) array of finite floats, "
                f"one row per object, got shape {arr.shape} dtype {arr.dtype}"
            )


def object_from_arrays(
    *,
    label: str,
    phrase: str,
    span: list[int],
    tokens: list[int],
    box: list[float] | np.ndarray,
    score: float,
    mask: np.ndarray,
    mask_score: float,
) -> ObjectAnn:
    """Build an ObjectAnn from a boolean (H, W) mask array (encoded here to RLE)."""
    return ObjectAnn(
        label=label,
        phrase=phrase,
        span=[int(span[0]), int(span[1])],
        tokens=[int(t) for t in tokens],
        box=[float(v) for v in box],
        score=float(score),
        mask=mask_codec.encode(mask),
        mask_score=float(mask_score),
    )
