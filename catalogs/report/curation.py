"""The report's curation section: what datagen's curate stage measured, to judge by eye.

    distributions   histograms of samples.clip_score and samples.aesthetic and of objects.label_score, each over
                    its own range (CLIP cosines sit near 0.2-0.35 for real weights, LAION aesthetic scores near
                    4-7), with p10 / median / p90;
    duplicates      the largest duplicate groups (catalogs.duplicates.duplicate_groups at DEFAULT_MAX_DISTANCE, plan
                    order), each a row of thumbnails of its first members, with their kind and phash distance
                    to the group's first member: what `catalog select --dedup near` would drop;
    label scores    the objects with the lowest label_score, the likely false detections (a box labelled "dog"
                    around a cushion): the record's thumbnail with only that object's mask and box, its label,
                    label score, the rank of its own label among the record's labels, its detection score, and
                    the record's other labels.

Each part appears when the catalog has values for it; a catalog of shards made without the curate stage gets
one note instead. `where` narrows all three as it narrows the rest of the report (duplicate groups are then
searched among the selected samples only). Queries run in DuckDB on the report's read-only connection; only
the shown records are read from the tars, as for the record cards.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import duckdb
import numpy as np

from subjectdiff.catalogs import duplicates
from subjectdiff.catalogs.catalog import PLAN_ORDER
from subjectdiff.catalogs.report.charts import svg_histogram
from subjectdiff.catalogs.report.draw import object_color, overlay
from subjectdiff.catalogs.report.sql import Scope, query
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

BINS = 20
DUP_GROUPS = 8  # groups shown, largest first
DUP_MEMBERS = 6  # members shown per group, in plan order
DUP_THUMB = 160  # longest side of a duplicate's thumbnail, pixels
WEAK_OBJECTS = 12  # objects with the lowest label_score shown
WEAK_THUMB = 240
WEAK_COLOR = object_color(0)  # one color: the thumbnail shows only the weak object

# (title, table of the scope, column, what is counted)
_HISTOGRAMS = (
    ("CLIP score (image vs. caption)", "samples", "clip_score", "images"),
    ("Aesthetic score (LAION predictor)", "samples", "aesthetic", "images"),
    ("Label score (subject crop vs. its label)", "objects", "label_score", "objects"),
)


@dataclass
class CurationData:
    """What the section shows, gathered while the catalog is open; thumbnails are read afterwards.

    figures: rendered histogram figures. measured: whether any curation column has a value. groups:
    [(group_id, kind, size, [(key, shard, source, distance)])], largest first. weak: rows of the objects with
    the lowest label_score (key, shard, index, label, label_score, label_rank, score). paths: shard -> tar.
    """

    figures: list[str] = field(default_factory=list)
    measured: bool = False
    has_phash: bool = False
    n_groups: int = 0
    groups: list[tuple[int, str, int, list[tuple]]] = field(default_factory=list)
    weak: list[tuple] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)


def _histogram(con: duckdb.DuckDBPyConnection, relation: str, col: str, title: str, counted: str) -> str | None:
    """A histogram figure of COL over its [min, max] in BINS bins, or None when COL has no value."""
    ((lo, hi, n, qs),) = query(
        con,
        f"SELECT min({col}), max({col}), count({col}), quantile_cont({col}, [0.1, 0.5, 0.9]) "
        f"FROM {relation} WHERE {col} IS NOT NULL AND NOT isnan({col})",
    )
    if not n:
        return None
    lo, hi = float(lo), float(hi)
    if hi <= lo:  # one value: a bin around it
        lo, hi = lo - 0.5e-3, hi + 0.5e-3
    scale = BINS / (hi - lo)
    counts = [0] * BINS
    # Clamped here rather than in SQL (distributions.py's _fine_counts: least() over the float costs more than the scan)
    for b, c in query(
        con,
        f"SELECT floor(({col} - ({lo!r})) * {scale!r})::BIGINT b, count(*) FROM {relation} "
        f"WHERE {col} IS NOT NULL AND NOT isnan({col}) GROUP BY b",
    ):
        counts[min(max(int(b), 0), BINS - 1)] += c
    note = f"n {n:,} · p10 {qs[0]:.3f} · median {qs[1]:.3f} · p90 {qs[2]:.3f}"
    svg = svg_histogram(counts, lo, hi, xlabel=col, ylabel=counted)
    return (
        f'<figure class="chart" id="hist-{esc(col)}"><figcaption>{esc(title)}</figcaption>{svg}'
        f'<p class="note">{esc(note)}</p></figure>'
    )


def gather(
    con: duckdb.DuckDBPyConnection,
    where: str | None,
    *,
    max_distance: int = duplicates.DEFAULT_MAX_DISTANCE,
    n_groups: int = DUP_GROUPS,
    n_members: int = DUP_MEMBERS,
    n_weak: int = WEAK_OBJECTS,
) -> CurationData:
    """Everything but the thumbnails (module docstring), from the catalog connection CON."""
    scope = Scope.of(where)
    data = CurationData()
    for title, table, col, counted in _HISTOGRAMS:
        fig = _histogram(con, getattr(scope, table), col, title, counted)
        if fig is not None:
            data.figures.append(fig)
    ((n_phash, n_sha),) = query(con, f"SELECT count(phash), count(sha256) FROM {scope.samples}")
    data.has_phash = bool(n_phash or n_sha)
    data.measured = bool(data.figures) or data.has_phash
    if data.has_phash:
        groups = duplicates.duplicate_groups(con, scope.samples, max_distance=max_distance, order_by=PLAN_ORDER)
        by_group: dict[int, list[tuple]] = {}
        kinds: dict[int, str] = {}
        for r in groups.to_pylist():
            by_group.setdefault(r["group_id"], []).append((r["key"], r["shard"], r["source"], r["distance"]))
            kinds[r["group_id"]] = r["kind"]
        data.n_groups = len(by_group)
        top = sorted(by_group, key=lambda g: (-len(by_group[g]), g))[:n_groups]
        data.groups = [(g, kinds[g], len(by_group[g]), by_group[g][:n_members]) for g in top]
    data.weak = query(
        con,
        f'SELECT key, shard, "index", label, label_score, label_rank, score FROM {scope.objects} '
        f"WHERE label_score IS NOT NULL AND NOT isnan(label_score) "
        f'ORDER BY label_score, key, shard, "index" LIMIT {int(n_weak)}',
    )
    data.paths = dict(query(con, "SELECT name, path FROM shards"))
    return data


def _img_tag(img: np.ndarray, alt: str) -> str:
    """A JPEG thumbnail as an <img> with its data: URI."""
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(img)).decode("ascii")
    return f'<img class="thumb" src="{uri}" width="{img.shape[1]}" height="{img.shape[0]}" alt="{esc(alt)}">'


def _duplicate_html(data: CurationData, members: dict, errors: dict, max_distance: int) -> str:
    if not data.has_phash:
        return '<p class="note">no sample has a sha256 or phash</p>'
    if not data.groups:
        return f'<p class="note">no duplicates (exact, or phash within {max_distance} bits)</p>'
    rows = []
    for gid, kind, size, shown in data.groups:
        figs = []
        for i, (key, shard, source, distance) in enumerate(shown):
            err = missing(members, errors, key, shard)
            if err is None:
                try:
                    meta, raw = image_member(members[(shard, key)])
                    img = _img_tag(thumbnail(raw, meta["width"], meta["height"], DUP_THUMB), f"duplicate {key}")
                except Exception as e:  # a broken record shows as such; the report still renders
                    img, err = "", f"cannot render: {type(e).__name__}: {e}"
            else:
                img = ""
            role = "kept" if i == 0 else f"distance {distance if distance is not None else '?'}"
            body = img if err is None else f'<p class="error">{esc(err)}</p>'
            figs.append(
                f'<figure class="dup{" first" if i == 0 else ""}">{body}<figcaption><b>{esc(role)}</b> · '
                f'<code>{esc(key)}</code><br><span class="src" title="{esc(source)}">{esc(source)}</span> '
                f'<span class="shard">shard {esc(shard)}</span></figcaption></figure>'
            )
        more = f'<p class="note">and {size - len(shown)} more</p>' if size > len(shown) else ""
        rows.append(
            f'<div class="group" id="group-{gid}"><h3>group {gid} · {esc(kind)} · {size} samples</h3>'
            f'<div class="members">{"".join(figs)}</div>{more}</div>'
        )
    note = (
        f'<p class="note">{data.n_groups:,} groups (same bytes, or phash within {max_distance} bits); the '
        f"{len(data.groups)} largest, members in plan order: the first is the one <code>catalog select "
        "--dedup near</code> keeps</p>"
    )
    return note + "".join(rows)


def _weak_html(data: CurationData, members: dict, errors: dict) -> str:
    if not data.weak:
        return '<p class="note">no object has a label score</p>'
    cards = []
    for key, shard, index, label, score, rank, det in data.weak:
        err = missing(members, errors, key, shard)
        img, labels = "", []
        if err is None:
            try:
                meta, raw = image_member(members[(shard, key)])
                objects = [ObjectAnn.from_json(o) for o in meta["objects"]]
                o = objects[index]
                labels = list(dict.fromkeys(x.label for x in objects))
                thumb = thumbnail(raw, meta["width"], meta["height"], WEAK_THUMB)
                size = (thumb.shape[1], thumb.shape[0])
                drawn = overlay(thumb, mask_coverage(o.mask, size)[None], np.asarray([o.box], np.float32), [WEAK_COLOR])
                img = _img_tag(drawn, f"object {index} of {key}")
            except Exception as e:
                err = f"cannot render: {type(e).__name__}: {e}"
        others = [lb for lb in labels if lb != label]
        rank_text = "?" if rank is None else f"{rank} of {max(len(labels), 1)}"
        body = img if err is None else f'<p class="error">{esc(err)}</p>'
        cards.append(
            f'<article class="weak">{body}<p class="label"><b>{esc(label)}</b> · label score '
            f'<span class="num">{score:.3f}</span></p><p class="meta">own label ranks {esc(rank_text)} · '
            f'detection {det:.3f} · object {index}</p><p class="meta">other labels: '
            f'{esc(", ".join(others)) if others else "none"}</p><p class="meta"><code>{esc(key)}</code> · shard '
            f"{esc(shard)}</p></article>"
        )
    return (
        '<p class="note">the objects whose masked crop matches "a photo of a {label}" least: likely false '
        "detections (<code>objects.label_score</code>, lowest first)</p>"
        f'<div class="weakgrid">{"".join(cards)}</div>'
    )


def curation_html(root: Folder, data: CurationData, *, max_distance: int = duplicates.DEFAULT_MAX_DISTANCE) -> str:
    """The section's HTML: reads the shown records' members from their tars."""
    if not data.measured:
        return (
            '<p class="note" id="no-curation">no curation signals: the shards were made without the curate '
            "stage (or before it existed)</p>"
        )
    wanted = [(k, s) for _, _, _, shown in data.groups for k, s, _, _ in shown] + [(r[0], r[1]) for r in data.weak]
    members, errors = read_records(root, wanted, data.paths)
    charts = f'<div class="charts">{"".join(data.figures)}</div>' if data.figures else ""
    return (
        f'{charts}<h3 id="duplicates">Duplicates</h3>{_duplicate_html(data, members, errors, max_distance)}'
        f'<h3 id="low-label-scores">Lowest label scores</h3>{_weak_html(data, members, errors)}'
    )


__all__ = ["CurationData", "curation_html", "gather"]
