"""Reading the few records a report shows straight from their shards, and shrinking their images.

Only the 512-byte tar headers are walked (seeking over member data), then just the wanted members are read;
images are decoded straight to thumbnail size. Shared by the record cards and the curation section.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.schema import RECORD_IMAGE_FORMATS
from subjectdiff.catalogs.storage import Folder, is_local, open_url
from subjectdiff.catalogs.tars import member_index

Members = dict[str, bytes]  # one record's members: {extension: bytes}


def read_members(tar_path: str | os.PathLike, keys: set[str]) -> dict[str, Members]:
    """{key: {extension: bytes}} for the wanted keys of one uncompressed webdataset tar.

    Only the 512-byte headers are read, seeking over member data, then just the wanted members; the walk
    stops once every wanted key has its JSON and an image (the writer puts a sample's members together).
    """
    found: dict[str, Members] = {}
    complete: set[str] = set()
    with open_url(tar_path, "rb") as f:
        for name, offset, size in member_index(f, tar_path):
            key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if key not in keys:
                continue
            f.seek(offset)
            members = found.setdefault(key, {})
            members[ext] = f.read(size)
            if "json" in members and any(e in members for e in RECORD_IMAGE_FORMATS):
                complete.add(key)
                if len(complete) == len(keys):
                    break
    return found


def shard_tar(root: Folder, shard: str, path: str | None) -> str:
    """The shard's tar: the catalog's recorded path, or under ROOT when a local folder was moved."""
    if path and (not is_local(path) or os.path.exists(path)):
        return path
    return root.join(f"{shard}.tar")


def read_records(
    root: Folder, wanted: list[tuple[str, str]], paths: dict[str, str | None]
) -> tuple[dict[tuple[str, str], Members], dict[str, str]]:
    """({(shard, key): members}, {shard: error}) for the wanted (key, shard) records; paths: shard -> tar path.

    A lost or damaged shard does not fail the report: its records' cards and thumbnails say why instead.
    """
    by_shard: dict[str, set[str]] = {}
    for key, shard in wanted:
        by_shard.setdefault(shard, set()).add(key)
    members: dict[tuple[str, str], Members] = {}
    errors: dict[str, str] = {}
    for shard, keys in by_shard.items():
        try:
            for key, m in read_members(shard_tar(root, shard, paths.get(shard)), keys).items():
                members[(shard, key)] = m
        except (OSError, ValueError, tarfile.TarError) as e:  # missing, truncated or corrupt tar
            errors[shard] = f"cannot read shard {shard}: {e}"
    return members, errors


def missing(members: dict[tuple[str, str], Members], errors: dict[str, str], key: str, shard: str) -> str | None:
    """Why record (key, shard) has no members to show (read_records' result), or None when it has."""
    m = members.get((shard, key))
    if m is None or "json" not in m:
        return errors.get(shard, f"not found in shard {shard}'s tar")
    return None


def image_member(members: Members) -> tuple[dict, bytes]:
    """A record's (JSON metadata, encoded image bytes); ValueError when it has no image member."""
    meta = json.loads(members["json"])
    ext = next((e for e in RECORD_IMAGE_FORMATS if e in members), None)
    if ext is None:
        raise ValueError(f"no image member ({', '.join(RECORD_IMAGE_FORMATS)})")
    return meta, members[ext]


def thumbnail(raw: bytes, width: int, height: int, max_side: int) -> np.ndarray:
    """Decode an image straight to thumbnail size: (h, w, 3) uint8, longest side <= max_side."""
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    with Image.open(io.BytesIO(raw)) as im:
        im.draft("RGB", size)  # JPEG: decode at a reduced scale (still >= size) instead of full size
        return np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS))


def mask_coverage(rle: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """A mask downscaled to size (w, h) as float coverage in [0, 1]: (h, w) float32."""
    m = Image.fromarray(mask_codec.decode(rle).astype(np.uint8) * 255)
    return np.asarray(m.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0


def jpeg_bytes(img: np.ndarray) -> bytes:
    """(h, w, 3) uint8 -> JPEG bytes at the quality every thumbnail of the report uses."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()
