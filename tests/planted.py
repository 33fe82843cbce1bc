"""Planted duplicates, for the curation tests: the bundled photos with exact, resized, cropped and re-encoded
copies of some of them, as image bytes (`planted`) or as curated records in two shards (`write_planted`)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from subjectdiff.catalogs import hashing
from subjectdiff.catalogs.schema import Failure, Record, make_key
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.datagen.tiny import SAMPLE_IMAGES
from subjectdiff.photo_records import photo, photo_record

PHOTOS = ("astronaut", "chelsea", "coffee", "coins", "hubble_deep_field", "rocket")
DIM = 8  # the curated records' embedding size


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_bytes(name: str) -> bytes:
    return (SAMPLE_IMAGES / f"{name}.jpg").read_bytes()


def crop_sides(im: Image.Image, frac: float) -> Image.Image:
    w, h = im.size
    return im.crop((round(w * frac), round(h * frac), w - round(w * frac), h - round(h * frac)))


def unrelated_photo() -> bytes:
    from skimage import data

    return jpeg(Image.fromarray(np.stack([data.camera()] * 3, -1)))


def planted() -> dict[str, bytes]:
    """source -> bytes: the six photos (shard 00000 in the table below), then the planted copies and the
    unrelated photo (shard 00001), so each original is its group's first member in plan order."""
    out = {f"orig/{n}.jpg": photo_bytes(n) for n in PHOTOS}
    rocket = Image.open(io.BytesIO(photo_bytes("rocket"))).convert("RGB")
    chelsea = Image.open(io.BytesIO(photo_bytes("chelsea"))).convert("RGB")
    out["copy/astronaut-exact.jpg"] = photo_bytes("astronaut")
    out["copy/rocket-resized.jpg"] = jpeg(
        rocket.resize((rocket.width * 2 // 3, rocket.height * 2 // 3), Image.LANCZOS), quality=75
    )
    out["copy/chelsea-cropped.jpg"] = jpeg(crop_sides(chelsea, 0.03))
    out["other/camera.jpg"] = unrelated_photo()
    return out


def curated(name: str, source: str, *, quality: int | None = None, seed: int = 0) -> Record:
    """photo_record with the curate stage's fields: sha256 and phash of its bytes, fixed scores, a unit embedding.
    quality: re-encode the same pixels at that JPEG quality (other bytes, a near-identical phash)."""
    rec, _ = photo_record(name, source=source)
    if quality is not None:
        buf = io.BytesIO()
        Image.fromarray(photo(name)).save(buf, "JPEG", quality=quality)
        rec.image = buf.getvalue()
    rec.sha256 = hashlib.sha256(rec.image).hexdigest()
    rec.phash = hashing.phash_int64(Image.open(io.BytesIO(rec.image)))
    rng = np.random.default_rng(seed)
    e = rng.normal(size=DIM)
    rec.clip_embedding = (e / np.linalg.norm(e)).astype(np.float32)
    rec.clip_score, rec.aesthetic = 0.25 + 0.01 * seed, 5.0 + 0.1 * seed
    for i, o in enumerate(rec.objects):
        o.label_score, o.label_rank = 0.3 - 0.05 * i, 1 + i
    return rec


def write_planted(out: Path) -> dict[str, Record]:
    """Shard 00000: astronaut, chelsea, coffee, a failure; shard 00001: an exact copy of the astronaut, the chelsea
    re-encoded at quality 60, and the rocket. Returns source -> record."""
    plan = {
        "00000": [
            ("astronaut", "orig/astronaut", None),
            ("chelsea", "orig/chelsea", None),
            ("coffee", "orig/coffee", None),
        ],
        "00001": [
            ("astronaut", "copy/astronaut", None),
            ("chelsea", "copy/chelsea-q60", 60),
            ("rocket", "orig/rocket", None),
        ],
    }
    recs = {}
    seed = 0
    for shard, rows in plan.items():
        with ShardWriter(out, shard, embedding_meta={"model": "test", "pretrained": None}) as w:
            for name, src, quality in rows:
                recs[src] = rec = curated(name, src, quality=quality, seed=seed)
                seed += 1
                w.write(rec)
                if shard == "00000" and src == "orig/chelsea":
                    w.fail(Failure(make_key(f"bad/{shard}"), f"bad/{shard}", "decode", "truncated"))
    return recs
