"""Records with the geometry of real photos, for everything that takes record geometry (training samples, crops,
selection rules, the preview), and a hypothesis strategy for any valid record.

`GEOMETRY` holds hand-made cases on scikit-image's photos, the shapes real annotated photos have and clean
demos lack: many objects per image, tiny objects, boxes touching every border, subjects farther apart than the
image's short side, a box wider than the short side, an image without objects, a near-white image, masks that do
not fill their boxes, spill past them, miss them or are empty, plural and multi-word labels, several objects with
one label, a caption that fills the 77-token context, a zero-width box, a tiny image. `records()` draws any record
the contract allows (catalogs.schema.validate).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from subjectdiff.catalogs.reader import DecodedRecord, decode_record
from subjectdiff.catalogs.schema import Record, compute_quality, make_key, object_from_arrays, validate
from subjectdiff.catalogs.tokens import clip_token_positions
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.photo_records import ellipse_mask, photo

MASK_KINDS = ("ellipse", "rect", "partial", "spill", "outside", "empty", "blob")
# (label, the caption's words for it): plurals, compounds and multi-word labels as the nouns stage writes them
NOUNS = [
    ("person", "people"),
    ("person", "person"),
    ("knife", "knives"),
    ("dog", "dogs"),
    ("dog", "dog"),
    ("teddy bear", "teddy bear"),
    ("cup", "coffee cup"),
    ("cat", "cat"),
    ("table", "table"),
]
FILLER = "a long caption that keeps going with many plain words about the scene and its light and colours " * 4


@dataclass
class Obj:
    """One object of a hand-made record: box xyxy normalized, mask kind (MASK_KINDS), detection score."""

    label: str
    phrase: str
    box: tuple[float, float, float, float]
    mask: str = "ellipse"
    score: float = 0.8


def box_pixels(box, h: int, w: int) -> tuple[int, int, int, int]:
    x0, y0 = int(np.floor(box[0] * w)), int(np.floor(box[1] * h))
    return x0, y0, max(int(np.ceil(box[2] * w)), x0), max(int(np.ceil(box[3] * h)), y0)


def make_mask(kind: str, box, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) bool mask of a kind: the ellipse inscribed in the box, the whole box, its top third rows, the ellipse
    plus a band past the box, a blob outside the box, nothing, or random pixels inside the box."""
    x0, y0, x1, y1 = box_pixels(box, h, w)
    m = np.zeros((h, w), bool)
    if kind in ("ellipse", "spill"):
        m = ellipse_mask(h, w, list(box)) if x1 > x0 and y1 > y0 else m
        if kind == "spill":
            m[min(y1, h - 1) :, :] = True  # the rows below the box (the last row when the box reaches the bottom)
    elif kind == "rect":
        m[y0:y1, x0:x1] = True
    elif kind == "partial":
        m[y0 : y0 + max((y1 - y0) // 3, 1), x0:x1] = True
    elif kind == "outside":  # a band beside the box, on a side where there is room
        for band in (np.s_[:, :x0], np.s_[:y0, :], np.s_[:, x1:], np.s_[y1:, :]):
            if m[band].size:
                m[band] = True
                break
    elif kind == "blob":
        m[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.5
    return m


def make_record(name: str, image: np.ndarray, caption: str, objects: list[Obj], seed: int = 0) -> Record:
    """A valid record (PNG, lossless: the pixels are exactly `image`) with these objects; each phrase's span is
    its first occurrence as whole words in the caption, as the nouns stage gives two detections of one noun."""
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    anns = []
    for o in objects:
        start = re.search(rf"(?<![A-Za-z]){re.escape(o.phrase)}(?![A-Za-z])", caption).start()  # a whole word
        span = [start, start + len(o.phrase)]
        anns.append(
            object_from_arrays(
                label=o.label,
                phrase=o.phrase,
                span=span,
                tokens=clip_token_positions(caption, span),
                box=list(o.box),
                score=o.score,
                mask=make_mask(o.mask, o.box, h, w, rng),
                mask_score=0.9,
            )
        )
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    source = f"geometry://{name}"
    return Record(
        key=make_key(source),
        image=buf.getvalue(),
        image_ext="png",
        caption=caption,
        width=w,
        height=h,
        source=source,
        objects=anns,
    )


def decoded(record: Record) -> DecodedRecord:
    """The DecodedRecord a reader gives for `record` (validated, quality fields filled, decoded by the reader's
    own decode_record), without writing a shard."""
    validate(record)
    compute_quality(record.objects, record.width, record.height)
    meta = json.dumps(record.meta_json()).encode()
    return decode_record({"__key__": record.key, "json": meta, record.image_ext: record.image})


def sized(name: str, w: int, h: int, transpose: bool = False) -> np.ndarray:
    img = photo(name)
    img = img.transpose(1, 0, 2) if transpose else img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def geometry_cases() -> dict[str, Record]:
    """The hand-made records of the module docstring, by name."""
    white = sized("astronaut", 128, 96).copy()
    white[: int(0.6 * 96)] = 255  # 60 % near-white
    crowd = "three people and two dogs near a teddy bear with knives on a table"
    cases = {
        "crowd": (
            sized("chelsea", 160, 100),
            crowd,
            [
                Obj("table", "table", (0.0, 0.0, 1.0, 1.0), "rect", 0.4),  # first: the others are painted over it
                Obj("person", "people", (0.02, 0.10, 0.30, 0.60), score=0.9),
                Obj("person", "people", (0.35, 0.12, 0.62, 0.62), score=0.85),
                Obj("person", "people", (0.66, 0.08, 0.95, 0.58), "rect", 0.7),
                Obj("dog", "dogs", (0.05, 0.62, 0.40, 0.98), score=0.8),
                Obj("dog", "dogs", (0.45, 0.65, 0.80, 0.99), "partial", 0.6),
                Obj("teddy bear", "teddy bear", (0.82, 0.60, 0.99, 0.95), score=0.95),
                Obj("knife", "knives", (0.50, 0.50, 0.52, 0.53), score=0.5),  # 3 x 3 px
                Obj("knife", "knives", (0.70, 0.70, 0.71, 0.72), "rect", 0.45),  # 2 x 2 px
            ],
        ),
        "borders": (
            sized("coffee", 150, 100),
            "a cup on a saucer beside a spoon on a table",
            [
                Obj("cup", "cup", (0.0, 0.2, 0.3, 0.7), score=0.9),
                Obj("saucer", "saucer", (0.3, 0.0, 0.7, 0.4), score=0.8),
                Obj("spoon", "spoon", (0.75, 0.3, 1.0, 0.8), score=0.7),
                Obj("table", "table", (0.1, 0.6, 0.9, 1.0), score=0.6),
                Obj("table", "table", (0.02, 0.1, 0.98, 0.9), "rect", 0.5),  # 144 px wide: more than the short side
            ],
        ),
        "apart": (
            sized("rocket", 200, 90),
            "a rocket and a cat far apart",
            [
                Obj("rocket", "rocket", (0.02, 0.1, 0.32, 0.9), score=0.9),
                Obj("cat", "cat", (0.68, 0.15, 0.98, 0.95), score=0.85),
            ],
        ),
        "portrait": (
            sized("astronaut", 90, 180, transpose=True),
            "a dog above a cat",
            [
                Obj("dog", "dog", (0.1, 0.02, 0.9, 0.35), score=0.9),
                Obj("cat", "cat", (0.1, 0.62, 0.9, 0.98), score=0.8),
            ],
        ),
        "empty": (sized("camera", 120, 120), "a grey photo of nothing in particular", []),
        "white": (
            white,
            "a person and a dog on white",
            [
                Obj("person", "person", (0.1, 0.2, 0.5, 0.9), score=0.9),
                Obj("dog", "dog", (0.55, 0.3, 0.95, 0.9), score=0.8),
            ],
        ),
        "loose": (
            sized("hubble_deep_field", 140, 100),
            "a cat a dog a cup a table and a person",
            [
                Obj("cat", "cat", (0.05, 0.1, 0.4, 0.6), "partial", 0.9),
                Obj("dog", "dog", (0.45, 0.1, 0.9, 0.6), "spill", 0.85),
                Obj("cup", "cup", (0.3, 0.3, 0.6, 0.8), "outside", 0.8),
                Obj("table", "table", (0.1, 0.5, 0.5, 0.95), "empty", 0.75),
                Obj("person", "person", (0.55, 0.5, 0.95, 0.95), "blob", 0.7),
            ],
        ),
        "long_caption": (
            sized("coffee", 120, 90),
            "a cup on a table " + FILLER,
            [
                Obj("cup", "cup", (0.2, 0.2, 0.6, 0.7), score=0.9),
            ],
        ),
        "tiny_image": (sized("chelsea", 20, 12), "a cat", [Obj("cat", "cat", (0.1, 0.1, 0.9, 0.9), score=0.9)]),
        "zero_width": (
            sized("rocket", 100, 80),
            "a rocket and a table",
            [
                Obj("rocket", "rocket", (0.5, 0.2, 0.5, 0.8), "empty", 0.9),
                Obj("table", "table", (0.1, 0.3, 0.5, 0.9), score=0.8),
            ],
        ),
    }
    return {name: make_record(name, *case, seed=i) for i, (name, case) in enumerate(cases.items())}


def write_geometry_shards(out_dir: str | os.PathLike) -> list[str]:
    """GEOMETRY's records in two shards; returns their keys."""
    recs = list(geometry_cases().values())
    half = len(recs) // 2
    for s, chunk in enumerate((recs[:half], recs[half:])):
        with ShardWriter(out_dir, f"{s:05d}") as w:
            for r in chunk:
                w.write(r)
    return [r.key for r in recs]


@st.composite
def records(draw, max_side: int = 96, max_objects: int = 6) -> Record:
    """Any valid record: an image of any size and aspect (a part of it near-white, or not), 0..max_objects objects
    with boxes anywhere (on the borders, degenerate, the whole image), masks of every kind, any scores, labels
    plural, compound or multi-word, repeated; sometimes a caption past the 77-token context."""
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 230, (h, w, 3), dtype=np.uint8)
    image[: int(draw(st.floats(0, 1)) * h)] = 255
    nouns = draw(st.lists(st.sampled_from(NOUNS), max_size=max_objects))
    edge = st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1))
    objects = []
    for label, phrase in nouns:
        xs, ys = sorted((draw(edge), draw(edge))), sorted((draw(edge), draw(edge)))
        objects.append(
            Obj(label, phrase, (xs[0], ys[0], xs[1], ys[1]), draw(st.sampled_from(MASK_KINDS)), draw(st.floats(0, 1)))
        )
    caption = "a photo of " + " and ".join(p for _, p in nouns) if nouns else "a photo"
    if draw(st.booleans()):
        caption += " " + FILLER
    return make_record(f"drawn/{seed}", image, caption, objects, seed)
