"""The report's records section: one card per sampled record, the image with each object's mask tinted and box
drawn in the object's own color, tagged with its noun and detection score, and the caption underneath with each
grounded phrase (its span) highlighted in the same color."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from subjectdiff.catalogs.report.draw import hex_color, ink, object_color, overlay
from subjectdiff.catalogs.report.text import esc
from subjectdiff.catalogs.report.thumbnails import (
    Members,
    image_member,
    jpeg_bytes,
    mask_coverage,
    missing,
    read_records,
    thumbnail,
)
from subjectdiff.catalogs.schema import ObjectAnn
from subjectdiff.catalogs.storage import Folder

THUMB_SIDE = 384  # longest side of a record's thumbnail, pixels


def caption_html(
    caption: str, spans: list[list[int]], colors: list[tuple[int, int, int]], labels: list[str] | None = None
) -> str:
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
            parts.append(
                f'<mark style="background:rgba({c[0]},{c[1]},{c[2]},.35);border-color:{hex_color(c)}"'
                f' title="{esc(title)}">{text}</mark>'
            )
        else:
            parts.append(text)
        for i, (s, e) in enumerate(spans):
            if e == b and s < e:
                parts.append(f'<sup style="background:{hex_color(colors[i])};color:{ink(colors[i])}">{i + 1}</sup>')
    return "".join(parts)


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


def render_card(key: str, shard: str, members: Members, *, max_side: int = THUMB_SIDE) -> Card:
    """Decode one record's members and draw its overlay thumbnail."""
    meta, raw = image_member(members)
    objects = [ObjectAnn.from_json(o) for o in meta["objects"]]
    img = thumbnail(raw, meta["width"], meta["height"], max_side)
    size = (img.shape[1], img.shape[0])
    masks = np.stack([mask_coverage(o.mask, size) for o in objects]) if objects else np.zeros((0, *img.shape[:2]))
    boxes = np.asarray([o.box for o in objects], dtype=np.float32).reshape(-1, 4)
    drawn = overlay(img, masks, boxes, [object_color(i) for i in range(len(objects))])
    return Card(
        key=key,
        shard=shard,
        source=meta.get("source", ""),
        caption=meta.get("caption", ""),
        width=meta["width"],
        height=meta["height"],
        thumb=jpeg_bytes(drawn),
        thumb_size=size,
        objects=objects,
    )


def load_cards(root: Folder, sampled: list[tuple[str, str, str | None]], *, max_side: int = THUMB_SIDE) -> list[Card]:
    """Cards for sampled (key, shard, tar path) rows, in sample order; unreadable records become error
    cards rather than failing the report."""
    paths = {shard: path for _, shard, path in sampled}
    members, errors = read_records(root, [(key, shard) for key, shard, _ in sampled], paths)
    cards = []
    for key, shard, _ in sampled:
        error = missing(members, errors, key, shard)
        if error is not None:
            cards.append(Card(key, shard, error=error))
            continue
        try:
            cards.append(render_card(key, shard, members[(shard, key)], max_side=max_side))
        except Exception as e:  # a broken record is shown as such; the rest of the report still renders
            cards.append(Card(key, shard, error=f"cannot render: {type(e).__name__}: {e}"))
    return cards


def card_html(card: Card) -> str:
    """One record's <article>: the overlaid thumbnail with its tags, the caption, the objects table."""
    if card.error:
        return (
            f'<article class="card broken"><p class="meta"><code>{esc(card.key)}</code> · shard '
            f'{esc(card.shard)}</p><p class="error">{esc(card.error)}</p></article>'
        )
    colors = [object_color(i) for i in range(len(card.objects))]
    tags = []
    for i, (o, c) in enumerate(zip(card.objects, colors)):
        x0, y0 = min(max(o.box[0], 0.0), 0.97), min(max(o.box[1], 0.0), 0.97)
        cls = "tag above" if y0 > 0.08 else "tag"
        tags.append(
            f'<span class="{cls}" style="left:{100 * x0:.1f}%;top:{100 * y0:.1f}%;background:{hex_color(c)};'
            f'color:{ink(c)}">{i + 1} {esc(o.label)} {o.score:.2f}</span>'
        )
    rows = "".join(
        f'<tr><td style="color:{hex_color(c)}">■ {i + 1}</td><td>{esc(o.label)}</td><td>{esc(o.phrase)}</td>'
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
