"""Hand-made records on real photographs (scikit-image's bundled ones), for tests, benchmarks and trying
training without running datagen (`python -m subjectdiff.photo_records OUT`; scikit-image comes with the `test`
extra).

Each photo gets a fixed caption and objects with hand-placed boxes and elliptical masks, two of them
overlapping, and words that CLIP's BPE splits into several tokens ("hippopotamus", "astronaut"...).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from subjectdiff.catalogs.card import write_card
from subjectdiff.catalogs.schema import Failure, Record, make_key, object_from_arrays
from subjectdiff.catalogs.tokens import clip_token_positions
from subjectdiff.catalogs.writer import ShardWriter

# photo name -> (caption, [(phrase, label, box xyxy normalized)]); phrases occur once in the caption.
PHOTOS = {
    "astronaut": (
        "an astronaut holding a helmet beside a flag",
        [
            ("astronaut", "astronaut", [0.10, 0.05, 0.90, 1.00]),
            ("helmet", "helmet", [0.55, 0.60, 0.95, 0.98]),
            ("flag", "flag", [0.00, 0.00, 0.35, 0.45]),
        ],
    ),
    "chelsea": (
        "a tabby cat with whiskers on a rug",
        [
            ("cat", "cat", [0.05, 0.00, 0.95, 1.00]),
            ("whiskers", "whisker", [0.30, 0.45, 0.75, 0.80]),
        ],
    ),
    "coffee": (
        "a cup of espresso on a saucer with a spoon",
        [
            ("cup", "cup", [0.20, 0.10, 0.80, 0.75]),
            ("saucer", "saucer", [0.05, 0.40, 0.95, 0.98]),
            ("spoon", "spoon", [0.55, 0.55, 0.98, 0.90]),
        ],
    ),
    "rocket": (
        "a rocket on a launchpad under the sky",
        [
            ("rocket", "rocket", [0.35, 0.05, 0.65, 0.90]),
            ("launchpad", "launchpad", [0.10, 0.60, 0.90, 1.00]),
        ],
    ),
    "hubble_deep_field": (
        "galaxies and a hippopotamus shaped nebula",
        [
            ("galaxies", "galaxy", [0.00, 0.00, 1.00, 1.00]),
            ("hippopotamus", "hippopotamus", [0.25, 0.25, 0.70, 0.65]),
        ],
    ),
}


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return img if img.ndim == 3 else np.stack([img] * 3, -1)


def ellipse_mask(h: int, w: int, box: list[float]) -> np.ndarray:
    """A filled ellipse inscribed in a normalized xyxy box: (H, W) bool."""
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (box[0] + box[2]) / 2 * w, (box[1] + box[3]) / 2 * h
    rx, ry = max((box[2] - box[0]) / 2 * w, 1), max((box[3] - box[1]) / 2 * h, 1)
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


def encode(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, quality=90)
    return buf.getvalue()


def photo_record(name: str, *, source: str | None = None, fmt: str = "JPEG") -> tuple[Record, list[np.ndarray]]:
    """A record for one photo, and its masks as (H, W) bool arrays in object order."""
    caption, objs = PHOTOS[name]
    img = photo(name)
    h, w = img.shape[:2]
    objects, masks = [], []
    for i, (phrase, label, box) in enumerate(objs):
        start = caption.index(phrase)
        span = [start, start + len(phrase)]
        m = ellipse_mask(h, w, box)
        masks.append(m)
        objects.append(
            object_from_arrays(
                label=label,
                phrase=phrase,
                span=span,
                tokens=clip_token_positions(caption, span),
                box=box,
                score=0.9 - 0.1 * i,
                mask=m,
                mask_score=0.95 - 0.05 * i,
            )
        )
    source = source or f"skimage://{name}"
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    rec = Record(
        key=make_key(source),
        image=encode(img, fmt),
        image_ext=ext,
        caption=caption,
        width=w,
        height=h,
        source=source,
        objects=objects,
    )
    return rec, masks


# (photo (H, W, 3) uint8, masks [(H, W) bool], boxes [xyxy normalized]) -> (n_objects, D) identity embeddings
IdentityFn = Callable[[np.ndarray, list[np.ndarray], list[list[float]]], np.ndarray]


def write_photo_shards(
    out_dir: str | os.PathLike,
    n_shards: int = 2,
    per_shard: int = 5,
    failures_per_shard: int = 1,
    identity: IdentityFn | None = None,
    identity_meta: dict | None = None,
) -> list[str]:
    """Write n_shards shards of per_shard records cycling over PHOTOS (distinct sources, hence keys),
    plus failures_per_shard failed samples each, and the folder's dataset card (catalogs/card.py). Returns the
    keys of the ok records.

    identity: a function giving each photo's objects their identity embeddings (datagen's identity stage, say);
    then every shard gets its identity sidecar (catalogs/identity.py), with IDENTITY_META as its metadata."""
    names = list(PHOTOS)
    keys = []
    cache: dict[str, Record] = {}
    for s in range(n_shards):
        with ShardWriter(out_dir, f"{s:05d}", identity_meta=identity_meta) as w:
            for i in range(per_shard):
                n = s * per_shard + i
                name = names[n % len(names)]
                if name not in cache:
                    cache[name], masks = photo_record(name)
                    if identity is not None:
                        boxes = [list(o.box) for o in cache[name].objects]
                        cache[name].identity_embeddings = np.asarray(identity(photo(name), masks, boxes))
                base = cache[name]
                source = f"skimage://{name}/{n}"
                rec = Record(
                    **{
                        **base.__dict__,
                        "key": make_key(source),
                        "source": source,
                        "objects": [type(o)(**o.__dict__) for o in base.objects],
                    }
                )
                w.write(rec)
                keys.append(rec.key)
            for j in range(failures_per_shard):
                src = f"broken://{s}/{j}"
                w.fail(Failure(key=make_key(src), source=src, stage="decode", reason="cannot identify image file"))
    write_card(out_dir)  # a complete shard set, as a datagen run leaves one: `datasets.load_dataset(out_dir)` reads it
    return keys


def write_photo_video(
    path: str | os.PathLike,
    names: list[str],
    *,
    frames_per_shot: int = 18,
    fps: int = 12,
    size: tuple[int, int] = (128, 96),
    codec: str = "libx264",
    faststart: bool = True,
) -> list[tuple[int, int]]:
    """A video of the photos NAMES, one shot each with hard cuts between them: within a shot the camera pans across
    and zooms into the photo (its objects move and grow). Returns the shots as [start, end) frame ranges.

    size: (W, H), even. codec: "libx264" (H.264) or "mpeg4"; the container follows PATH's suffix (.mp4, .mkv,
    .mov). faststart: an MP4's index (moov atom) written first, so a copy cut short still plays up to the cut.
    """
    import av  # function-level: only video tests and benchmarks make videos

    w, h = size
    shots = []
    mp4 = str(path).lower().endswith((".mp4", ".mov"))
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart and mp4 else {}) as c:
        stream = c.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for name in names:
            shots.append((len(shots) and shots[-1][1], (len(shots) and shots[-1][1]) + frames_per_shot))
            img = Image.fromarray(photo(name))
            for i in range(frames_per_shot):
                t = i / max(1, frames_per_shot - 1)
                crop = _pan_zoom(img.size, 1.0 - 0.25 * t, t, w / h)
                pixels = np.asarray(img.crop(crop).resize((w, h), Image.BILINEAR).convert("RGB"))
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return shots


def _pan_zoom(size: tuple[int, int], zoom: float, t: float, aspect: float) -> tuple[int, int, int, int]:
    """The crop box (x0, y0, x1, y1) of an image of SIZE: ZOOM of its width (1: all), at ASPECT (w / h), moved from
    left to right as T goes from 0 to 1."""
    W, H = size
    cw = min(W * zoom, H * zoom * aspect)
    ch = cw / aspect
    x0 = (W - cw) * (0.4 + 0.2 * t)
    y0 = (H - ch) / 2
    return round(x0), round(y0), round(x0 + cw), round(y0 + ch)


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sample_records")
    print(len(write_photo_shards(out)), "records ->", out)
