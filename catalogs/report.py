"""The visual report of a shard folder: one self-contained HTML page to judge a dataset by looking at it.

    build_report("out/", "report.html", where="n_objects >= 2", sample=24, seed=0)
    subjectdiff catalog report out/ --where "n_objects >= 2" --sample 24 --out report.html

The page shows
    records        a grid of sampled records: the image with each object's mask tinted and its box drawn in
                   the object's own color, tagged with its noun and detection score; the caption underneath
                   with each grounded phrase (its span) highlighted in the same color;
    distributions  label frequency, detection score, mask score and box area histograms, objects per image;
    curation       CLIP, aesthetic and label score histograms, the largest duplicate groups as thumbnails, the
                   objects with the lowest label score (catalogs/report_curation.py);
    run            throughput over the run (samples per minute, from the shards' start and end times);
    failures       counts by stage and by (stage, reason), with example keys and sources;
    manifest       DIR/manifest.json of the datagen run (model ids, thresholds, versions), rendered as is.
`where` (a SQL predicate over `samples`, as in `catalog select`) narrows the records and distributions;
the run, failures and manifest sections always describe the whole catalog.

Scale: everything but the sampled records is aggregated in DuckDB. The sample is the N selected keys with
the smallest hash(key, seed): a top-N in one scan, deterministic, and stable as shards are added (a key
shown stays shown unless a smaller hash arrives). Only those records are read, by walking the tar headers
of the shards that hold them (seeking over member data) and reading just their members.

Self-contained: images are base64 JPEG data URIs, plots inline SVG, no script at all; a
Content-Security-Policy forbids loading anything else, so user text (captions, sources, reasons) is
escaped and, even if escaping failed, could not load or run anything.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import os
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
from PIL import Image

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.catalog import CatalogError, check_read_only, open_catalog
from subjectdiff.catalogs.boxes import xyxy_norm_to_pixel_rect
from subjectdiff.catalogs.schema import FAILURE_STAGES, IMAGE_EXTENSIONS, ObjectAnn
from subjectdiff.catalogs.storage import Folder, is_local, open_url
from subjectdiff.catalogs.tars import member_index

DEFAULT_SAMPLE = 24
THUMB_SIDE = 384  # longest side of a record's thumbnail, pixels
TOP_LABELS = 30
HIST_BINS = 20
MAX_OBJECTS_BAR = 30  # objects-per-image bars beyond this are pooled into one ">= 30" bar
MAX_REASONS = 50  # (stage, reason) rows shown; the rest are counted

# 20 distinct colors (Trubetskoy's list, black for its white), object i of a record gets PALETTE[i % 20].
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 225, 25), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
    (128, 128, 128), (0, 0, 0),
]


def esc(value: Any) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def object_color(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _hex(c: tuple[int, int, int]) -> str:
    return "#%02x%02x%02x" % c


def _ink(c: tuple[int, int, int]) -> str:
    """Black or white text, whichever reads on background color c (relative luminance)."""
    return "#000" if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 150 else "#fff"


# ---------------------------------------------------------------------------------------------- overlays


def overlay(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    colors: list[tuple[int, int, int]],
    *,
    alpha: float = 0.45,
    thickness: int = 2,
) -> np.ndarray:
    """Tint each object's mask and draw its box, each object in its own color.

    image: (H, W, 3) uint8 RGB. masks: (N, H, W), bool, or float coverage in [0, 1] (a downscaled mask's
    edge pixels then blend partially). boxes: (N, 4) xyxy normalized to [0, 1]. colors: N RGB triples.
    Masks are blended in object order with opacity `alpha`; boxes are drawn on top, `thickness` pixels
    inside the box's pixel extent (catalogs.boxes.xyxy_norm_to_pixel_rect). Returns a new (H, W, 3) uint8 array.
    """
    h, w = image.shape[:2]
    if len(masks) != len(boxes) or len(colors) < len(boxes):
        raise ValueError(f"overlay: {len(masks)} masks, {len(boxes)} boxes, {len(colors)} colors")
    out = image.astype(np.float32)
    for m, c in zip(masks, colors):
        if m.shape != (h, w):
            raise ValueError(f"overlay: mask shape {m.shape} does not match image {(h, w)}")
        a = alpha * m.astype(np.float32)[..., None]
        out = out * (1.0 - a) + np.asarray(c, np.float32) * a
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    for box, c in zip(boxes, colors):
        x0, y0, x1, y1 = xyxy_norm_to_pixel_rect([float(v) for v in box], w, h)
        t = thickness
        out[y0 : min(y0 + t, y1), x0:x1] = c
        out[max(y1 - t, y0) : y1, x0:x1] = c
        out[y0:y1, x0 : min(x0 + t, x1)] = c
        out[y0:y1, max(x1 - t, x0) : x1] = c
    return out


def caption_html(caption: str, spans: list[list[int]], colors: list[tuple[int, int, int]],
                 labels: list[str] | None = None) -> str:
    """The escaped caption with each object's span [start, end) highlighted in its color, followed by the
    object's number. Spans may overlap or coincide (two instances of one phrase): the text takes the first
    covering object's color and every object's number follows the span's end."""
    n = len(caption)
    spans = [[max(0, min(int(s), n)), max(0, min(int(e), n))] for s, e in spans]
    cuts = sorted({0, n} | {v for span in spans for v in span})
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        text = esc(caption[a:b])
        cover = [i for i, (s, e) in enumerate(spans) if s <= a and b <= e and s < e]
        if cover:
            c = colors[cover[0]]
            title = ", ".join(f"{i + 1} {labels[i]}" for i in cover) if labels else ""
            parts.append(f'<mark style="background:rgba({c[0]},{c[1]},{c[2]},.35);border-color:{_hex(c)}"'
                         f' title="{esc(title)}">{text}</mark>')
        else:
            parts.append(text)
        for i, (s, e) in enumerate(spans):
            if e == b and s < e:
                parts.append(f'<sup style="background:{_hex(colors[i])};color:{_ink(colors[i])}">{i + 1}</sup>')
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- records


@dataclass
class Card:
    """One sampled record, ready to render. thumb: JPEG bytes of the overlaid thumbnail."""

    key: str
    shard: str
    source: str = ""
    caption: str = ""
    width: int = 0
    height: int = 0
    thumb: bytes = b""
    thumb_size: tuple[int, int] = (0, 0)
    objects: list[ObjectAnn] = field(default_factory=list)
    error: str | None = None


def read_members(tar_path: str | os.PathLike, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} for the wanted keys of one uncompressed webdataset tar.

    Only the 512-byte headers are read, seeking over member data, then just the wanted members; the walk
    stops once every wanted key has its JSON and an image (the writer puts a sample's members together).
    """
    found: dict[str, dict[str, bytes]] = {}
    complete: set[str] = set()
    with open_url(tar_path, "rb") as f:
        for name, offset, size in member_index(f, tar_path):
            key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if key not in keys:
                continue
            f.seek(offset)
            members = found.setdefault(key, {})
            members[ext] = f.read(size)
            if "json" in members and any(e in members for e in IMAGE_EXTENSIONS):
                complete.add(key)
                if len(complete) == len(keys):
                    break
    return found


def _thumbnail(raw: bytes, width: int, height: int, max_side: int) -> np.ndarray:
    """Decode an image straight to thumbnail size: (h, w, 3) uint8, longest side <= max_side."""
    scale = min(1.0, max_side / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    with Image.open(io.BytesIO(raw)) as im:
        im.draft("RGB", size)  # JPEG: decode at a reduced scale (still >= size) instead of full size
        return np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS))


def _mask_coverage(rle: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    """A mask downscaled to size (w, h) as float coverage in [0, 1]: (h, w) float32."""
    m = Image.fromarray(mask_codec.decode(rle).astype(np.uint8) * 255)
    return np.asarray(m.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0


def render_card(key: str, shard: str, members: dict[str, bytes], *, max_side: int = THUMB_SIDE) -> Card:
    """Decode one record's members and draw its overlay thumbnail."""
    meta = json.loads(members["json"])
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise ValueError(f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
    objects = [ObjectAnn.from_json(o) for o in meta["objects"]]
    img = _thumbnail(members[ext], meta["width"], meta["height"], max_side)
    size = (img.shape[1], img.shape[0])
    masks = np.stack([_mask_coverage(o.mask, size) for o in objects]) if objects else np.zeros((0, *img.shape[:2]))
    boxes = np.asarray([o.box for o in objects], dtype=np.float32).reshape(-1, 4)
    drawn = overlay(img, masks, boxes, [object_color(i) for i in range(len(objects))])
    buf = io.BytesIO()
    Image.fromarray(drawn).save(buf, "JPEG", quality=85)
    return Card(key=key, shard=shard, source=meta.get("source", ""), caption=meta.get("caption", ""),
                width=meta["width"], height=meta["height"], thumb=buf.getvalue(), thumb_size=size,
                objects=objects)


def _shard_tar(root: Folder, shard: str, path: str | None) -> str:
    """The shard's tar: the catalog's recorded path, or under ROOT when a local folder was moved."""
    if path and (not is_local(path) or os.path.exists(path)):
        return path
    return root.join(f"{shard}.tar")


def load_cards(root: Folder, sampled: list[tuple[str, str, str | None]], *, max_side: int = THUMB_SIDE) -> list[Card]:
    """Cards for sampled (key, shard, tar path) rows, in sample order; unreadable records become error
    cards rather than failing the report."""
    by_shard: dict[str, set[str]] = {}
    paths: dict[str, str | None] = {}
    for key, shard, path in sampled:
        by_shard.setdefault(shard, set()).add(key)
        paths[shard] = path
    members: dict[tuple[str, str], dict[str, bytes]] = {}
    errors: dict[str, str] = {}
    for shard, keys in by_shard.items():
        try:
            for key, m in read_members(_shard_tar(root, shard, paths[shard]), keys).items():
                members[(shard, key)] = m
        except (OSError, ValueError, tarfile.TarError) as e:  # missing, truncated or corrupt tar
            errors[shard] = f"cannot read shard {shard}: {e}"
    cards = []
    for key, shard, _ in sampled:
        m = members.get((shard, key))
        if m is None or "json" not in m:
            cards.append(Card(key, shard, error=errors.get(shard, f"not found in shard {shard}'s tar")))
            continue
        try:
            cards.append(render_card(key, shard, m, max_side=max_side))
        except Exception as e:  # a broken record is shown as such; the rest of the report still renders
            cards.append(Card(key, shard, error=f"cannot render: {type(e).__name__}: {e}"))
    return cards


def card_html(card: Card) -> str:
    if card.error:
        return (f'<article class="card broken"><p class="meta"><code>{esc(card.key)}</code> · shard '
                f'{esc(card.shard)}</p><p class="error">{esc(card.error)}</p></article>')
    colors = [object_color(i) for i in range(len(card.objects))]
    tags = []
    for i, (o, c) in enumerate(zip(card.objects, colors)):
        x0, y0 = min(max(o.box[0], 0.0), 0.97), min(max(o.box[1], 0.0), 0.97)
        cls = "tag above" if y0 > 0.08 else "tag"
        tags.append(f'<span class="{cls}" style="left:{100 * x0:.1f}%;top:{100 * y0:.1f}%;background:{_hex(c)};'
                    f'color:{_ink(c)}">{i + 1} {esc(o.label)} {o.score:.2f}</span>')
    rows = "".join(
        f'<tr><td style="color:{_hex(c)}">■ {i + 1}</td><td>{esc(o.label)}</td><td>{esc(o.phrase)}</td>'
        f"<td>{o.score:.3f}</td><td>{o.mask_score:.3f}</td><td>{o.area:.3f}</td></tr>"
        for i, (o, c) in enumerate(zip(card.objects, colors))
    )
    w, h = card.thumb_size
    src = "data:image/jpeg;base64," + base64.b64encode(card.thumb).decode("ascii")
    caption = caption_html(card.caption, [o.span for o in card.objects], colors, [o.label for o in card.objects])
    return (
        f'<article class="card" id="r-{esc(card.key)}"><div class="frame">'
        f'<img src="{src}" width="{w}" height="{h}" alt="record {esc(card.key)}">{"".join(tags)}</div>'
        f'<p class="caption">{caption}</p>'
        f'<p class="meta"><code>{esc(card.key)}</code> · shard {esc(card.shard)} · {card.width}×{card.height}'
        f" · {len(card.objects)} object{'s' if len(card.objects) != 1 else ''}</p>"
        f'<p class="source" title="{esc(card.source)}">{esc(card.source)}</p>'
        f"<details><summary>objects</summary><table><tr><th>#</th><th>label</th><th>phrase</th><th>score</th>"
        f"<th>mask</th><th>area</th></tr>{rows}</table></details></article>"
    )


# ------------------------------------------------------------------------------------------------ plots

_PW, _PH = 520, 230  # plot width and height, px
_ML, _MR, _MT, _MB = 56, 14, 12, 42  # margins: left, right, top, bottom


def _tick_step(vmax: float, n: int = 4) -> float:
    """A 1-2-2.5-5 step giving about n ticks from 0 to vmax."""
    if vmax <= 0:
        return 1.0
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag)


def _num(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _svg(body: list[str], label: str, height: int = _PH) -> str:
    return (f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{_PW}" height="{height}" '
            f'viewBox="0 0 {_PW} {height}" role="img" aria-label="{esc(label)}">{"".join(body)}</svg>')


def _y_axis(vmax: float, ylabel: str) -> tuple[list[str], float]:
    """Y gridlines and tick labels from 0 to a rounded-up vmax; returns (elements, the axis top value)."""
    step = _tick_step(vmax)
    top = step * max(1, math.ceil(vmax / step))
    ih = _PH - _MT - _MB
    out = []
    for k in range(int(round(top / step)) + 1):
        y = _MT + ih - ih * k * step / top
        out.append(f'<line class="gridline" x1="{_ML}" x2="{_PW - _MR}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(k * step)}</text>')
    out.append(f'<text x="14" y="{_MT + ih / 2:.1f}" text-anchor="middle" transform="rotate(-90 14 '
               f'{_MT + ih / 2:.1f})">{esc(ylabel)}</text>')
    return out, top


def svg_columns(counts: list[float], ticks: list[tuple[float, str]], *, xlabel: str, ylabel: str,
                tips: list[str]) -> str:
    """Vertical bars, one per count, evenly spaced. ticks: (position in bar units from 0 to len, text)."""
    body, top = _y_axis(max(counts, default=0), ylabel)
    iw, ih = _PW - _ML - _MR, _PH - _MT - _MB
    bw = iw / max(1, len(counts))
    for i, (c, tip) in enumerate(zip(counts, tips)):
        bh = ih * c / top
        body.append(f'<rect class="bar" x="{_ML + i * bw + 0.5:.1f}" y="{_MT + ih - bh:.1f}" '
                    f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}"><title>{esc(tip)}</title></rect>')
    for pos, text in ticks:
        body.append(f'<text x="{_ML + pos * bw:.1f}" y="{_MT + ih + 16}" text-anchor="middle">{esc(text)}</text>')
    body.append(f'<line class="axis" x1="{_ML}" x2="{_PW - _MR}" y1="{_MT + ih}" y2="{_MT + ih}"/>'
                f'<text x="{_ML + iw / 2:.1f}" y="{_PH - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    return _svg(body, f"{ylabel} by {xlabel}")


def svg_histogram(counts: list[int], lo: float, hi: float, *, xlabel: str, ylabel: str = "objects") -> str:
    """A histogram of len(counts) equal bins over [lo, hi]; ylabel names what is counted."""
    n = len(counts)
    width = (hi - lo) / n
    tips = [f"[{lo + i * width:.2f}, {lo + (i + 1) * width:.2f}): {c:,}" for i, c in enumerate(counts)]
    ticks = [(k * n / 4, f"{lo + k * (hi - lo) / 4:.3g}") for k in range(5)]
    return svg_columns([float(c) for c in counts], ticks, xlabel=xlabel, ylabel=ylabel, tips=tips)


def svg_hbars(items: list[tuple[str, int]], *, label: str) -> str:
    """Horizontal bars, one row per (name, count), longest first as given."""
    row, name_w = 18, 130
    height = _MT + row * max(1, len(items)) + 8
    vmax = max((c for _, c in items), default=0) or 1
    iw = _PW - name_w - 70
    body = []
    for i, (name, c) in enumerate(items):
        y = _MT + i * row
        shown = name if len(name) <= 20 else name[:19] + "…"
        body.append(
            f'<text x="{name_w - 6}" y="{y + 13}" text-anchor="end"><title>{esc(name)}</title>{esc(shown)}</text>'
            f'<rect class="bar" x="{name_w}" y="{y + 2}" width="{max(iw * c / vmax, 0.5):.1f}" height="{row - 4}">'
            f"<title>{esc(name)}: {c:,}</title></rect>"
            f'<text x="{name_w + iw * c / vmax + 4:.1f}" y="{y + 13}">{c:,}</text>'
        )
    return _svg(body, label, height)


def svg_lines(xs: list[float], series: dict[str, list[float]], *, xlabel: str, ylabel: str) -> str:
    """Line chart of one or more series over shared xs (x from 0), with a legend."""
    body, top = _y_axis(max((max(ys, default=0) for ys in series.values()), default=0), ylabel)
    iw, ih = _PW - _ML - _MR, _PH - _MT - _MB
    xmax = max(xs, default=0) or 1.0
    px = lambda x: _ML + iw * x / xmax  # noqa: E731
    py = lambda y: _MT + ih - ih * y / top  # noqa: E731
    for k, (name, ys) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        # The legend sits in the bottom-left corner, under the axis, where no data can hide it.
        body.append(f'<polyline class="line s{k}" points="{pts}"><title>{esc(name)}</title></polyline>'
                    f'<text class="legend s{k}" x="{4 + 80 * k}" y="{_PH - 6}">■ {esc(name)}</text>')
    step = _tick_step(xmax)
    for k in range(int(xmax / step) + 1):
        body.append(f'<text x="{px(k * step):.1f}" y="{_MT + ih + 16}" text-anchor="middle">{_num(k * step)}</text>')
    body.append(f'<line class="axis" x1="{_ML}" x2="{_PW - _MR}" y1="{_MT + ih}" y2="{_MT + ih}"/>'
                f'<text x="{_ML + iw / 2:.1f}" y="{_PH - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    return _svg(body, f"{ylabel} over {xlabel}")


# ------------------------------------------------------------------------------------------- SQL parts


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[tuple]:
    check_read_only(sql)
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.Error as e:
        raise CatalogError(f"report query failed: {str(e).strip().splitlines()[0]}") from None


@dataclass
class _Scope:
    """FROM expressions for the selected samples and their objects (the bare tables without a predicate)."""

    samples: str = "samples"
    objects: str = "objects"

    @classmethod
    def of(cls, where: str | None) -> _Scope:
        if where is None:
            return cls()
        keys = f"(SELECT key, shard FROM samples WHERE ({where}))"
        return cls(f"(SELECT * FROM samples WHERE ({where}))",
                   f"(SELECT o.* FROM objects o SEMI JOIN {keys} s ON o.key = s.key AND o.shard = s.shard)")


def _check_where(con: duckdb.DuckDBPyConnection, where: str) -> int:
    """Count the samples matching WHERE; a bad predicate is a one-line CatalogError."""
    sql = f"SELECT count(*) FROM samples WHERE ({where})"
    try:
        check_read_only(sql)
        return con.execute(sql).fetchone()[0]
    except (duckdb.Error, CatalogError) as e:
        raise CatalogError(f"invalid --where predicate {where!r}: {str(e).strip().splitlines()[0]}") from None


def sample_keys(con: duckdb.DuckDBPyConnection, where: str | None, n: int, seed: int) -> list[tuple[str, str, str]]:
    """The n selected (key, shard, tar path) rows with the smallest hash(key, seed)."""
    if n <= 0:
        return []
    # Integers inlined rather than bound: a `?` inside the user's predicate would take the parameter.
    return _rows(
        con,
        f"SELECT s.key, s.shard, shards.path FROM {_Scope.of(where).samples} s LEFT JOIN shards "
        f"ON s.shard = shards.name ORDER BY hash(s.key, {int(seed)}::BIGINT), s.key, s.shard LIMIT {int(n)}",
    )


_FINE = 10_000  # bins of [0, 1] counted in SQL; plots pool them to HIST_BINS, quantiles read them


def _fine_counts(con: duckdb.DuckDBPyConnection, scope: _Scope, col: str) -> np.ndarray:
    """Counts of COL in _FINE equal bins over [0, 1] (values outside go to the end bins): (_FINE,) int64.

    One GROUP BY on an integer bin: clamping and pooling happen here, since SQL least/greatest over
    the float expression costs ten times the scan at millions of rows.
    """
    rows = _rows(con, f"SELECT floor({col} * {_FINE})::BIGINT b, count(*) FROM {scope.objects} "
                      f"WHERE {col} IS NOT NULL AND NOT isnan({col}) GROUP BY b")
    counts = np.zeros(_FINE, np.int64)
    for b, n in rows:
        counts[min(max(b, 0), _FINE - 1)] += n
    return counts


def _quantile_note(counts: np.ndarray) -> str:
    """p10, median, p90 read off the fine histogram (to within 1/_FINE)."""
    total = counts.sum()
    if not total:
        return "no objects"
    cum = np.cumsum(counts)
    q = [(np.searchsorted(cum, p * total) + 0.5) / _FINE for p in (0.1, 0.5, 0.9)]
    return f"n {total:,} · p10 {q[0]:.3f} · median {q[1]:.3f} · p90 {q[2]:.3f}"


def _histogram_figure(con: duckdb.DuckDBPyConnection, scope: _Scope, col: str, title: str, xlabel: str) -> tuple:
    fine = _fine_counts(con, scope, col)
    coarse = fine.reshape(HIST_BINS, -1).sum(axis=1).tolist()
    return title, svg_histogram(coarse, 0, 1, xlabel=xlabel), _quantile_note(fine)


def distributions_html(con: duckdb.DuckDBPyConnection, where: str | None) -> str:
    scope = _Scope.of(where)
    labels = _rows(con, f"SELECT label, count(*) n, count(*) OVER () FROM {scope.objects} GROUP BY label "
                        f"ORDER BY n DESC, label LIMIT {TOP_LABELS}")
    n_labels = labels[0][2] if labels else 0
    per_image = dict(_rows(con, f"SELECT least(n_objects, {MAX_OBJECTS_BAR}), count(*) FROM {scope.samples} "
                                "GROUP BY 1"))
    top = max(per_image, default=0)
    counts = [float(per_image.get(i, 0)) for i in range(top + 1)]
    names = [f"{i}" if i < MAX_OBJECTS_BAR else f"≥{MAX_OBJECTS_BAR}" for i in range(top + 1)]
    every = max(1, math.ceil(len(names) / 16))
    objects_plot = svg_columns(counts, [(i + 0.5, s) for i, s in enumerate(names) if i % every == 0],
                               xlabel="objects per image", ylabel="images",
                               tips=[f"{s} objects: {int(c):,} images" for s, c in zip(names, counts)])
    figures = [
        (f"Label frequency (top {len(labels)} of {n_labels:,} labels)",
         svg_hbars([(lb, n) for lb, n, _ in labels], label="label frequency"), ""),
        ("Objects per image", objects_plot, f"{int(sum(counts)):,} images"),
        _histogram_figure(con, scope, "score", "Detection score", "score"),
        _histogram_figure(con, scope, "area", "Box area (fraction of the image)", "box area"),
        _histogram_figure(con, scope, "mask_score", "Mask score (SAM's predicted IoU)", "mask score"),
    ]
    return "".join(f'<figure class="chart"><figcaption>{esc(t)}</figcaption>{svg}<p class="note">{esc(note)}</p>'
                   f"</figure>" for t, svg, note in figures)


def throughput(shards: list[tuple[float, float, int, int]], bins: int = 48) -> tuple[list[float], ...]:
    """Samples per minute over the run from per-shard (start, end, n_ok, n_failed), epoch seconds.

    Each shard's samples are spread evenly over its [start, end] (all in one bin when it took no time),
    then summed in `bins` equal time bins from the first start to the last end. Returns (bin centers in
    minutes since the first start, processed per minute, ok per minute).
    """
    s = np.asarray([r[0] for r in shards], np.float64)
    e = np.maximum(np.asarray([r[1] for r in shards], np.float64), s)
    ok = np.asarray([r[2] for r in shards], np.float64)
    total = ok + np.asarray([r[3] for r in shards], np.float64)
    t0, t1 = float(s.min()), float(e.max())
    width = max(t1 - t0, 1.0) / bins  # a run shorter than a second is drawn over one second
    lo = t0 + width * np.arange(bins)
    overlap = np.clip(np.minimum(e[:, None], lo + width) - np.maximum(s[:, None], lo), 0, None)
    dur = e - s
    frac = overlap / np.where(dur > 0, dur, 1.0)[:, None]  # (shards, bins): share of each shard per bin
    instant = np.nonzero(dur <= 0)[0]
    frac[instant] = 0.0
    frac[instant, np.minimum(((s[instant] - t0) / width).astype(int), bins - 1)] = 1.0
    per_min = 60.0 / width
    centers = ((lo + width / 2 - t0) / 60.0).tolist()
    return centers, (total @ frac * per_min).tolist(), (ok @ frac * per_min).tolist()


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    h, m = divmod(int(round(seconds / 60)), 60)
    return f"{h} h {m:02d} min" if h else f"{m} min"


def _utc(t: float) -> str:
    """Epoch seconds as UTC text; a value that is no such time (milliseconds, garbage) as itself."""
    try:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):
        return str(t)


def run_html(con: duckdb.DuckDBPyConnection, manifest_times: tuple[float, float] | None) -> str:
    rows = _rows(con, "SELECT start_time, end_time, n_ok, n_failed, duration FROM shards "
                      "WHERE start_time IS NOT NULL AND end_time IS NOT NULL")
    if not rows:
        return '<p class="note">no shard timings in the catalog</p>'
    xs, total, ok = throughput([r[:4] for r in rows])
    t0, t1 = min(r[0] for r in rows), max(r[1] for r in rows)
    n_total = sum(r[2] + r[3] for r in rows)
    wall = max(t1 - t0, 1e-9)
    durations = sorted(r[4] or 0.0 for r in rows)
    lines = [
        f"{len(rows):,} shards written from {_utc(t0)} to {_utc(t1)} ({_duration(t1 - t0)})",
        f"{n_total:,} samples processed: {60 * n_total / wall:,.1f} per minute on average",
        f"median shard time {_duration(durations[len(durations) // 2])}, slowest {_duration(durations[-1])}",
    ]
    if manifest_times:
        a, b = manifest_times
        lines.append(f"run (manifest): {_utc(a)} to {_utc(b)} ({_duration(b - a)})")
    unit, per = ("seconds", 1 / 60) if t1 - t0 < 180 else ("minutes", 1.0) if t1 - t0 < 3 * 3600 else ("hours", 60.0)
    plot = svg_lines([x / per for x in xs], {"processed": total, "ok": ok},
                     xlabel=f"{unit} since the first shard started", ylabel="samples / min")
    items = "".join(f"<li>{esc(t)}</li>" for t in lines)
    return f'<figure class="chart"><figcaption>Throughput over the run</figcaption>{plot}</figure><ul>{items}</ul>'


def failures_html(con: duckdb.DuckDBPyConnection, seed: int, n_processed: int) -> str:
    by_stage = dict(_rows(con, "SELECT stage, count(*) FROM failures GROUP BY stage"))
    if not by_stage:
        return '<p class="note">no failures</p>'
    order = [s for s in FAILURE_STAGES if s in by_stage] + sorted(s for s in by_stage if s not in FAILURE_STAGES)
    peak = max(by_stage.values())
    stage_rows = "".join(
        f'<tr><td>{esc(s)}</td><td class="num">{by_stage[s]:,}</td><td class="num">'
        f"{100 * by_stage[s] / max(n_processed, 1):.2f}%</td><td><span class=\"hbar\" "
        f'style="width:{200 * by_stage[s] / peak:.0f}px"></span></td></tr>'
        for s in order
    )
    reasons = _rows(
        con,
        "SELECT stage, reason, count(*) n, min_by({'key': key, 'source': source, 'shard': shard}, "
        "hash(key, ?::BIGINT), 3) FROM failures GROUP BY stage, reason ORDER BY n DESC, stage, reason "
        f"LIMIT {MAX_REASONS + 1}",
        [seed],
    )
    n_reasons = _rows(con, "SELECT count(*) FROM (SELECT DISTINCT stage, reason FROM failures)")[0][0]
    reason_rows = "".join(
        f'<tr><td>{esc(stage)}</td><td class="reason">{esc(reason)}</td><td class="num">{n:,}</td><td><ul>'
        + "".join(f'<li><code>{esc(x["key"])}</code> <span class="src">{esc(x["source"])}</span> '
                  f'<span class="shard">shard {esc(x["shard"])}</span></li>' for x in examples)
        + "</ul></td></tr>"
        for stage, reason, n, examples in reasons[:MAX_REASONS]
    )
    more = f'<p class="note">and {n_reasons - MAX_REASONS:,} more reasons</p>' if n_reasons > MAX_REASONS else ""
    return (
        f'<table class="failures"><tr><th>stage</th><th>failed</th><th>of processed</th><th></th></tr>'
        f"{stage_rows}</table>"
        f'<table class="failures reasons"><tr><th>stage</th><th>reason</th><th>count</th><th>examples</th></tr>'
        f"{reason_rows}</table>{more}"
    )


# ---------------------------------------------------------------------------------------------- manifest


def find_manifests(root: Folder, shard_paths: list[str]) -> list[str]:
    """ROOT/manifest.json, then manifest.json of the folders holding shards (a catalog over several runs):
    their paths or URLs."""
    dirs = [root.url] + sorted({p.rsplit("/", 1)[0] if not is_local(p) else os.path.dirname(p)
                                for p in shard_paths if p})
    seen, out = set(), []
    for d in dirs:
        folder = Folder(d)
        p = folder.join("manifest.json")
        if p not in seen and folder.exists("manifest.json"):
            seen.add(p)
            out.append(p)
        if len(out) == 20:
            break
    return out


def _json_html(value: Any, key: str = "") -> str:
    """Any JSON value as nested key/value tables; timestamps (keys ending in time/_at) also shown in UTC."""
    if isinstance(value, dict):
        if not value:
            return "<em>{}</em>"
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{_json_html(v, str(k))}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return esc(", ".join(json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v for v in value))
        return "<ol>" + "".join(f"<li>{_json_html(v)}</li>" for v in value) + "</ol>"
    if isinstance(value, str):
        return esc(value)
    text = esc(json.dumps(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _is_time_key(key) and 1e8 < value < 1e10:
        text += f' <span class="note">({esc(_utc(value))})</span>'
    return text


def _is_time_key(key: str) -> bool:
    k = key.lower()
    return k.endswith("time") or k.endswith("_at") or k in ("start", "end", "started", "ended", "finished")


def _as_epoch(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            t = dt.datetime.fromisoformat(v)
        except ValueError:
            return None
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None


def manifest_times(manifest: Any) -> tuple[float, float] | None:
    """(start, end) epoch seconds from a manifest's start/end time fields, top level or one level down."""
    if not isinstance(manifest, dict):
        return None
    scopes = [manifest] + [v for v in manifest.values() if isinstance(v, dict)]
    for d in scopes:
        start = next((_as_epoch(d[k]) for k in ("start_time", "started_at", "start") if k in d), None)
        end = next((_as_epoch(d[k]) for k in ("end_time", "ended_at", "finished_at", "end") if k in d), None)
        if start is not None and end is not None and end >= start:
            return start, end
    return None


def manifest_html(paths: list[str], root: Folder) -> tuple[str, tuple[float, float] | None]:
    """The manifests rendered, and the run's (start, end) from the first one that has them."""
    if not paths:
        return '<p class="note" id="no-manifest">no manifest (no manifest.json next to the shards)</p>', None
    parts, times = [], None
    for p in paths:
        name = os.path.relpath(p, root.url) if root.local else p[len(root.url) + 1:] if p.startswith(root.url) else p
        try:
            with open_url(p, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:
            parts.append(f'<h3>{esc(name)}</h3><p class="error">unreadable: {esc(e)}</p>')
            continue
        times = times or manifest_times(manifest)
        parts.append(f'<h3>{esc(name)}</h3><div class="manifest">{_json_html(manifest)}</div>')
    return "".join(parts), times


# ------------------------------------------------------------------------------------------------- page


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header,section{padding:12px 24px}
header{background:#20242b;color:#eee}header h1{margin:0 0 4px;font-size:20px}
header code{color:#ffd27f;word-break:break-all}nav a{color:#9cf;margin-right:14px}
h2{border-bottom:1px solid #ccc;padding-bottom:4px}
.summary{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.stat{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;color:#222}
.stat b{display:block;font-size:18px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px;align-items:start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}
.card.broken{border-color:#c33;background:#fff4f4}
.frame{position:relative;overflow:hidden;line-height:0}
.frame img{width:100%;height:auto;display:block}
.tag{position:absolute;font:11px/1.3 system-ui,sans-serif;padding:0 3px;white-space:nowrap;border-radius:2px;
  opacity:.92}
.tag.above{transform:translateY(-100%)}
.caption{font-size:15px;margin:8px 0 4px}
mark{border-bottom:3px solid;padding:0 1px;border-radius:2px;color:inherit}
sup{font-weight:bold;font-size:10px;padding:0 2px;border-radius:3px;margin-left:1px}
.meta,.source,.note{color:#666;font-size:12px;margin:2px 0}
.source{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.error{color:#b00}
details table{font-size:12px;border-collapse:collapse}details td,details th{padding:1px 6px;text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:14px}
.chart{display:inline-block;background:#fff;border:1px solid #ddd;border-radius:6px;margin:0;padding:8px}
.chart figcaption{font-weight:600;margin-bottom:4px}
svg.plot text{font:11px system-ui,sans-serif;fill:#333}
svg.plot .bar{fill:#4c78a8}svg.plot .bar:hover{fill:#f58518}
svg.plot .gridline{stroke:#e4e4e4}svg.plot .axis{stroke:#888}
svg.plot .line{fill:none;stroke-width:2}svg.plot .line.s0{stroke:#4c78a8}svg.plot .line.s1{stroke:#54a24b}
svg.plot .legend.s0{fill:#4c78a8}svg.plot .legend.s1{fill:#54a24b}
table.failures{border-collapse:collapse;background:#fff;margin-bottom:12px}
table.failures td,table.failures th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.failures ul{margin:0;padding-left:16px}.num{text-align:right}
.hbar{display:inline-block;height:10px;background:#e45756}
.src{color:#555;word-break:break-all}.shard{color:#888}
table.kv{border-collapse:collapse;background:#fff}
table.kv th,table.kv td{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f0f0ee;font-weight:600}.manifest{overflow-x:auto}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin:8px 0}
.group h3{margin:2px 0 6px;font-size:14px}.members{display:flex;flex-wrap:wrap;gap:10px}
figure.dup{margin:0;width:170px;font-size:11px}figure.dup.first img{outline:3px solid #54a24b}
figure.dup figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.weakgrid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
article.weak{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
article.weak .label{margin:6px 0 2px;font-size:14px}img.thumb{display:block;max-width:100%;height:auto}
"""

# Nothing may load but the page itself and its data: URIs; no script runs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass
class _Summary:
    root: str
    built_at: str
    n_shards: int
    n_samples: int
    n_failed: int
    n_objects: int
    where: str | None
    n_selected: int
    n_shown: int
    seed: int
    command: str


def _header_html(s: _Summary) -> str:
    processed = s.n_samples + s.n_failed
    stats = [
        ("shards", f"{s.n_shards:,}"), ("samples", f"{s.n_samples:,}"),
        ("failed", f"{s.n_failed:,} ({100 * s.n_failed / max(processed, 1):.1f}%)"), ("objects", f"{s.n_objects:,}"),
    ]
    if s.where is not None:
        stats.append(("selected", f"{s.n_selected:,}"))
    stats.append(("shown", f"{s.n_shown:,} (seed {s.seed})"))
    cells = "".join(f'<div class="stat"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in stats)
    where = f" · where <code>{esc(s.where)}</code>" if s.where is not None else ""
    return (
        f"<header><h1>subjectdiff dataset report</h1><div><code>{esc(s.root)}</code>{where} · catalog built "
        f"{esc(s.built_at)}</div><div class=\"summary\">{cells}</div><div>reproduce: <code>{esc(s.command)}</code>"
        '</div><nav><a href="#records">records</a><a href="#distributions">distributions</a>'
        '<a href="#curation">curation</a><a href="#run">run</a>'
        '<a href="#failures">failures</a><a href="#manifest">manifest</a></nav></header>'
    )


def page_html(summary: _Summary, cards: list[Card], distributions: str, run: str, failures: str,
              manifest: str, seconds: float, curation: str = "") -> str:
    scope = " (the selection)" if summary.where is not None else ""
    empty = "no records match" if summary.n_selected == 0 else "no records sampled (--sample 0)"
    grid = "".join(card_html(c) for c in cards) or f'<p class="note">{empty}</p>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f"<title>subjectdiff report: {esc(summary.root)}</title><style>{_CSS}</style></head><body>"
        f"{_header_html(summary)}"
        f'<section id="records"><h2>Records{scope}: {len(cards)} sampled</h2><div class="grid">{grid}</div></section>'
        f'<section id="distributions"><h2>Distributions{scope}</h2><div class="charts">{distributions}</div></section>'
        f'<section id="curation"><h2>Curation{scope}</h2>{curation}</section>'
        f'<section id="run"><h2>Run</h2>{run}</section>'
        f'<section id="failures"><h2>Failures</h2>{failures}</section>'
        f'<section id="manifest"><h2>Manifest</h2>{manifest}</section>'
        f'<section><p class="note">generated {esc(_utc(time.time()))} in {seconds:.2f} s</p></section>'
        "</body></html>\n"
    )


def _command(root: str, out: Path, where: str | None, sample: int, seed: int) -> str:
    parts = ["subjectdiff", "catalog", "report", str(root)]
    if where is not None:
        parts += ["--where", where]
    parts += ["--sample", str(sample), "--seed", str(seed), "--out", str(out)]
    return shlex.join(parts)


def build_report(root: str | os.PathLike, out: str | os.PathLike, *, where: str | None = None,
                 sample: int = DEFAULT_SAMPLE, seed: int = 0, catalog: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of ROOT's catalog to OUT (see the module docstring) and return OUT.

    where: SQL predicate over `samples` (object conditions through a subquery on `objects`), or None
    for everything. sample: number of records shown. seed: picks which records (same seed, same records).
    Raises CatalogError (one line) for a missing catalog, a bad predicate, or an unwritable OUT.
    """
    t0 = time.monotonic()
    folder, out = Folder(root), Path(out)
    root = os.fspath(root)
    if sample < 0:
        raise CatalogError(f"--sample must be >= 0, got {sample}")
    if where is not None and not where.strip():
        where = None
    with open_catalog(root, catalog=catalog) as con:
        n_shards, n_samples, n_failed, n_objects = _rows(
            con, "SELECT (SELECT count(*) FROM shards), (SELECT count(*) FROM samples), "
                 "(SELECT count(*) FROM failures), (SELECT count(*) FROM objects)")[0]
        n_selected = _check_where(con, where) if where is not None else n_samples
        built = dict(_rows(con, "SELECT name, value FROM catalog_info")).get("built_at", "?")
        sampled = sample_keys(con, where, sample, seed)
        shard_paths = [r[0] for r in _rows(con, "SELECT DISTINCT path FROM shards")]
        manifest, times = manifest_html(find_manifests(folder, shard_paths), folder)
        distributions = distributions_html(con, where)
        from subjectdiff.catalogs import report_curation  # imports this module's helpers

        curation = report_curation.gather(con, where)
        run = run_html(con, times)
        failures = failures_html(con, seed, n_samples + n_failed)
    cards = load_cards(folder, sampled)
    curation_section = report_curation.curation_html(folder, curation)
    summary = _Summary(root, built, n_shards, n_samples, n_failed, n_objects, where, n_selected,
                       len(cards), seed, _command(root, out, where, sample, seed))
    text = page_html(summary, cards, distributions, run, failures, manifest, time.monotonic() - t0,
                     curation_section)
    _write_atomic(out, text)
    return out


def _write_atomic(out: Path, text: str) -> None:
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise CatalogError(f"cannot write the report to {out}: {e.strerror or e}") from None
