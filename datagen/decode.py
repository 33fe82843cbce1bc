"""The first step of every block: plan rows -> decoded items, as a Ray task on any node's CPUs.

A row's bytes are read where it names them (a file, a tar member, a Parquet row; datagen/sources.py) and
decoded once, as the `decode` settings say (EXIF orientation, transparency, pixel limit, formats: see
datagen.stages.common.decode_item); a unit that cannot be read or decoded becomes an item failed at `read`
or `decode`, with the reason a user can act on. With filters, an image too small or too elongated fails its
size/aspect filter here, before any model sees it.
"""

from __future__ import annotations

import logging
from typing import Any

from subjectdiff.catalogs.storage import describe
from subjectdiff.datagen import units
from subjectdiff.datagen.config import DecodeConfig, FilterConfig
from subjectdiff.datagen.stages.common import decode_item, fail, failed
from subjectdiff.datagen.stages.filters import prefilter

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
    rows: dict[str, list], filters: FilterConfig | None = None, decode: DecodeConfig | None = None
) -> list[Item]:
    """Plan rows (columns of datagen.sources.PLAN_SCHEMA, as lists) -> one item per row, in order, decoded as
    DECODE says (None: its defaults)."""
    items = []
    columns = rows.get("column") or [None] * len(rows["key"])
    for i, key in enumerate(rows["key"]):
        source, alt = rows["source"][i], _text(rows["alt_text"][i])
        err = rows["error"][i]
        if err:
            item = fail({"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read", err)
        else:
            try:
                extra = [columns[i]] if columns[i] else []
                data = units.read_unit(rows["path"][i], int(rows["offset"][i]), int(rows["size"][i]), *extra)
                item = decode_item(source, data, alt_text=alt, key=key, cfg=decode)
            except OSError as e:
                item = fail(
                    {"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read", read_failure(e)
                )
        if filters is not None and not failed(item):
            item = prefilter(item, filters)
        items.append(item)
    return items
