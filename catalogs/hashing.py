"""Image hashes for duplicate search: the perceptual hash of datagen's curate stage, and the hashes of a held-out
set for `catalog select --exclude-near` (both sides must come from the same function: `phash_int64`).

Hashes
    `sha256` is the hex digest of a sample's stored bytes. `phash` is imagehash's 64-bit perceptual hash of
    the decoded image (`phash_int64` of the record's pixels: upright, 8-bit RGB, as catalogs.images decodes
    them), stored as a signed BIGINT: imagehash's 8 x 8 bit matrix (the signs of the 8 x 8 lowest DCT
    frequencies of a 32 x 32 grey thumbnail against their median) read row-major, its first element
    `hash[0, 0]` the most significant bit, then reinterpreted as two's complement int64. So
    `format(phash & (2**64 - 1), "016x") == str(imagehash.phash(img))`; bit 63, the sign, is the DC term's,
    which is nearly always above the median (most values are negative). The Hamming distance of two hashes
    is `bit_count(xor(a, b))` in DuckDB, the same for the signed and the unsigned reading.

The search over these hashes (exact and near duplicates, held-out exclusion) is catalogs/duplicates.py.
Everything here is DuckDB, pyarrow, numpy, PIL and imagehash: no torch, no Ray (the catalogs/ rule).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import duckdb
import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from subjectdiff.catalogs import images
from subjectdiff.catalogs.images import IMAGE_SUFFIXES

MASK64 = (1 << 64) - 1


def to_int64(unsigned: int) -> int:
    """A 64-bit unsigned value -> the signed int64 with the same bits (what a DuckDB BIGINT holds)."""
    unsigned &= MASK64
    return unsigned - (1 << 64) if unsigned >> 63 else unsigned


def int64_to_hex(value: int) -> str:
    """Signed int64 phash -> imagehash's 16-digit hex (`str(imagehash.phash(img))`)."""
    return format(value & MASK64, "016x")


def hex_to_int64(text: str) -> int:
    """imagehash's hex string -> the signed int64 phash."""
    return to_int64(int(text, 16))


def phash_int64(image) -> int:
    """imagehash.phash of an image as a signed int64 (module docstring: bit order and sign).

    image: a PIL image or an (H, W, 3) uint8 RGB array. Converted to RGB first, as datagen's decode does, so
    a palette or CMYK file hashes the same whether it went through the pipeline or `hash_folder`.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    bits = imagehash.phash(image.convert("RGB")).hash.reshape(-1)  # (64,) bool, row-major, [0, 0] first
    return to_int64(int("".join("1" if b else "0" for b in bits), 2))


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes (signed or unsigned)."""
    return ((a ^ b) & MASK64).bit_count()


def hash_image_file(path: str | os.PathLike) -> int:
    """phash_int64 of an image file, decoded as datagen decodes with its default `decode` settings
    (catalogs.images: first frame, upright by its EXIF orientation, 16-bit scaled, transparency on white)."""
    with images.no_pil_pixel_limit():
        return phash_int64(images.decode(Path(path).read_bytes()).pixels)


def hash_folder(folder: str | os.PathLike, extensions: Iterable[str] = IMAGE_SUFFIXES) -> pa.Table:
    """Every image below `folder` (recursively, sorted by path) -> a table (name: relative path, phash: int64).

    An unreadable file is an error naming it, not a skip: a held-out image that is silently left out is one
    that can leak into training.
    """
    folder = Path(folder)
    exts = {e.lower() for e in extensions}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    names, hashes, bad = [], [], []
    for p in files:
        try:
            hashes.append(hash_image_file(p))
            names.append(str(p.relative_to(folder)))
        except Exception as e:  # PIL raises many types for broken files
            bad.append(f"{p}: {type(e).__name__}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} images below {folder} cannot be read; remove or fix them: " + "; ".join(bad[:5]))
    if not names:
        raise ValueError(f"no images ({', '.join(sorted(exts))}) below {folder}")
    return pa.table({"name": pa.array(names, pa.string()), "phash": pa.array(hashes, pa.int64())})


def held_out_hashes(spec: str | os.PathLike) -> pa.Table:
    """The held-out set of `--exclude-near`: a catalog folder (its samples' phash, named by key), a catalog
    .duckdb file, or a folder of images (hashed with `hash_folder`). Returns (name, phash)."""
    path = Path(spec)
    db = path if path.suffix == ".duckdb" else path / "catalog.duckdb"
    if db.is_file():
        con = duckdb.connect(str(db), read_only=True)
        try:
            table = con.sql(
                "SELECT key AS name, phash FROM samples WHERE phash IS NOT NULL ORDER BY shard, key"
            ).to_arrow_table()
        finally:
            con.close()
        if table.num_rows == 0:
            raise ValueError(f"the catalog {db} has no sample with a phash (built before the curate stage?)")
        return table
    if path.is_dir():
        return hash_folder(path)
    raise ValueError(f"--exclude-near {spec}: not a folder of images, a catalog folder or a .duckdb file")
