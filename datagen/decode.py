"""The first step of every block: plan rows -> decoded items, as a Ray task on any node's CPUs.

A row's bytes are read where it names them (a file, a tar member, a Parquet row; datagen/sources.py) and
decoded once, as the `decode` settings say (EXIF orientation, transparency, pixel limit, formats: see
datagen.stages.common.decode_item); a unit that cannot be read or decoded becomes an item failed at `read`
or `decode`, with the reason a user can act on. With filters, an image too small or too elongated fails its
size/aspect filter here, before any model sees it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from subjectdiff.catalogs.storage import describe
from subjectdiff.datagen import units
from subjectdiff.datagen.config import DecodeConfig, FilterConfig, VideoConfig
from subjectdiff.datagen.stages.common import decode_item, fail, failed
from subjectdiff.datagen.stages.filters import prefilter
from subjectdiff.datagen.video import video_items

Item = dict[str, Any]
log = logging.getLogger(__name__)


def _text(v) -> str | None:
    return None if v is None or (isinstance(v, float) and v != v) else str(v)


def read_failure(e: OSError) -> str:
    """The failure reason of an unreadable unit, in words that group (UnitReadError.reason; the failure's
    source names the unit). The whole message, with addresses and sizes, goes to the worker's log."""
    log.warning("%s", e)
    if isinstance(e, units.UnitReadError):
        return e.reason
    return f"unreadable input: {describe(e)}"


def read_and_decode(
    rows: dict[str, list],
    filters: FilterConfig | None = None,
    decode: DecodeConfig | None = None,
    video: VideoConfig | None = None,
) -> list[Item]:
    """Plan rows (columns of datagen.sources.PLAN_SCHEMA, as lists) -> one item per image row, and a video row's
    items (datagen/video.py: its sampled frames, and its failure), in order, decoded as DECODE says (None: its
    defaults); VIDEO: how frames are sampled (None: its defaults)."""
    items = []
    columns = rows.get("column") or [None] * len(rows["key"])
    media = rows.get("media") or [None] * len(rows["key"])  # a plan made before videos has no media column
    for i, key in enumerate(rows["key"]):
        source, alt = rows["source"][i], _text(rows["alt_text"][i])
        err = rows["error"][i]
        if err:
            item = fail({"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read", err)
        elif media[i] == "video":
            items += _prefiltered(_video(rows, i, alt, video, decode), filters)
            continue
        else:
            try:
                extra = [columns[i]] if columns[i] else []
                data = units.read_unit(rows["path"][i], int(rows["offset"][i]), int(rows["size"][i]), *extra)
                item = decode_item(source, data, alt_text=alt, key=key, cfg=decode)
            except OSError as e:
                item = fail(
                    {"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read", read_failure(e)
                )
        items += _prefiltered([item], filters)
    return items


def _prefiltered(items: list[Item], filters: FilterConfig | None) -> list[Item]:
    return items if filters is None else [it if failed(it) else prefilter(it, filters) for it in items]


def _video(rows: dict[str, list], i: int, alt: str | None, cfg: VideoConfig | None, decode) -> list[Item]:
    """The items of the video in row I, never holding the video in memory: a whole local file is decoded in
    place; a remote one or a tar member is first copied, a chunk at a time, to a local temporary file (retried
    as any unit is) and decoded from there; only a Parquet cell, already in memory with its row group, is
    decoded from its bytes."""
    key, source, path = rows["key"][i], rows["source"][i], rows["path"][i]
    offset, size = int(rows["offset"][i]), int(rows["size"][i])
    column = (rows.get("column") or [None] * len(rows["key"]))[i]
    if offset < 0 and not column and units.is_local(path) and os.path.isfile(_local(path)):
        return video_items(source, key, _local(path), alt, cfg, decode)
    spool = None
    try:
        try:
            if column:
                data = units.read_unit(path, offset, size, column)
            else:
                fd, spool = tempfile.mkstemp(prefix="subjectdiff-video-", suffix=os.path.splitext(source)[1][:8])
                os.close(fd)
                units.spool_unit(path, offset, size, spool)
                data = spool
        except OSError as e:
            item = fail({"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read", read_failure(e))
            item["video"] = {"source": source, "shot": 0, "frame": 0, "time": 0.0}
            item["unit_key"] = key
            return [item]
        return video_items(source, key, data, alt, cfg, decode)
    finally:
        if spool is not None:
            os.unlink(spool)


def _local(path: str) -> str:
    return path.removeprefix("file://").removeprefix("local://")
