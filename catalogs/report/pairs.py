"""The report's pairs section: a sample of the catalog's cross-image pairs (catalogs/pairs.py), each the reference
and the target object side by side, each thumbnail with that object's mask tinted and box drawn, and the pair's
similarity, change, phash distance and frame gap underneath."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import duckdb
import numpy as np

from subjectdiff.catalogs.catalog import pair_counts
from subjectdiff.catalogs.report.draw import object_color, overlay
from subjectdiff.catalogs.report.sql import query
from subjectdiff.catalogs.report.text import esc
from subjectdiff.catalogs.report.thumbnails import (
    image_member,
    jpeg_bytes,
    mask_coverage,
    missing,
    read_records,
    thumbnail,
)
from subjectdiff.catalogs.schema import ObjectAnn
from subjectdiff.catalogs.storage import Folder

PAIR_THUMB_SIDE = 220  # longest side of each object's thumbnail, pixels
PAIRS_SHOWN = 6  # pairs shown per method

# One direction of each pair (ref_key < target_key, or the lower index in one image pair), a seeded sample per
# method: the same pairs for the same seed.
_SAMPLE_SQL = """
SELECT p.method, p.label, p.ref_key, p.ref_index, p.target_key, p.target_index, p.similarity, p.change,
       p.phash_distance, p.frame_gap, sr.shard, hr.path, st.shard, ht.path
FROM pairs p
JOIN samples sr ON sr.key = p.ref_key JOIN shards hr ON hr.name = sr.shard
JOIN samples st ON st.key = p.target_key JOIN shards ht ON ht.name = st.shard
WHERE (p.ref_key, p.ref_index) < (p.target_key, p.target_index)
QUALIFY row_number() OVER (PARTITION BY p.method ORDER BY hash(p.ref_key, p.ref_index, p.target_key, ?)) <= ?
ORDER BY p.method, p.ref_key, p.ref_index, p.target_key, p.target_index
"""


@dataclass
class PairRow:
    method: str
    label: str
    ref: tuple[str, int, str, str]  # key, object index, shard, tar path
    target: tuple[str, int, str, str]
    similarity: float
    change: float
    phash_distance: int
    frame_gap: int | None


def gather_pairs(con: duckdb.DuckDBPyConnection, seed: int, n: int = PAIRS_SHOWN) -> tuple[list, list[PairRow]]:
    """([(method, rows)] of the pairs table, up to n sampled pairs of each method); ([], []) without pairs."""
    counts = pair_counts(con)
    if not counts:
        return [], []
    rows = query(con, _SAMPLE_SQL, [seed, n])
    return counts, [
        PairRow(r[0], r[1], (r[2], r[3], r[10], r[11]), (r[4], r[5], r[12], r[13]), r[6], r[7], r[8], r[9])
        for r in rows
    ]


def _object_img(members: dict, index: int) -> str:
    """One object of a record drawn on its thumbnail: an <img> tag, or a note saying why not."""
    meta, raw = image_member(members)
    objects = [ObjectAnn.from_json(o) for o in meta["objects"]]
    if index >= len(objects):
        return f'<p class="error">object {index} not in the record ({len(objects)} objects)</p>'
    img = thumbnail(raw, meta["width"], meta["height"], PAIR_THUMB_SIDE)
    size = (img.shape[1], img.shape[0])
    obj = objects[index]
    drawn = overlay(img, mask_coverage(obj.mask, size)[None], np.asarray([obj.box], np.float32), [object_color(index)])
    data = base64.b64encode(jpeg_bytes(drawn)).decode()
    return f'<img class="thumb" alt="{esc(obj.label)}" src="data:image/jpeg;base64,{data}">'


def pairs_html(root: Folder, counts: list, rows: list[PairRow]) -> str:
    """The section's HTML: the counts by method, then each sampled pair's two objects side by side."""
    if not counts:
        return '<p class="note">no pairs: `subjectdiff catalog pairs DIR --method video|retrieval` mines them</p>'
    wanted = [(r.ref[0], r.ref[2]) for r in rows] + [(r.target[0], r.target[2]) for r in rows]
    paths = {r.ref[2]: r.ref[3] for r in rows} | {r.target[2]: r.target[3] for r in rows}
    members, errors = read_records(root, wanted, paths)
    head = " · ".join(f"{esc(m)}: {n:,} rows (both directions)" for m, n in counts)
    out = [f'<p class="note">{head}; {len(rows)} shown</p><div class="weakgrid">']
    for r in rows:
        sides = []
        for key, index, shard, _ in (r.ref, r.target):
            why = missing(members, errors, key, shard)
            try:
                body = f'<p class="error">{esc(why)}</p>' if why else _object_img(members[(shard, key)], index)
            except Exception as e:  # a broken record is shown as such
                body = f'<p class="error">cannot render: {esc(type(e).__name__)}: {esc(e)}</p>'
            sides.append(
                f'<figure class="dup">{body}<figcaption><code>{esc(key)}</code> #{index}</figcaption></figure>'
            )
        gap = "" if r.frame_gap is None else f" · {r.frame_gap} frames apart"
        out.append(
            f'<article class="weak"><p class="label">{esc(r.method)} · <b>{esc(r.label)}</b></p>'
            f'<div class="members">{"".join(sides)}</div><p class="meta">similarity {r.similarity:.3f} · change '
            f"{r.change:.2f} · phash distance {r.phash_distance}{gap}</p></article>"
        )
    out.append("</div>")
    return "".join(out)
