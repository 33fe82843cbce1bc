"""The report's charts: inline SVG columns, histograms, horizontal bars and lines, sized alike, with no script.

Each returns one <svg class="plot"> element; the page's CSS colors its bars, gridlines and series.
"""

from __future__ import annotations

import math

from subjectdiff.catalogs.report.text import esc

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
    return (
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{_PW}" height="{height}" '
        f'viewBox="0 0 {_PW} {height}" role="img" aria-label="{esc(label)}">{"".join(body)}</svg>'
    )


def _y_axis(vmax: float, ylabel: str) -> tuple[list[str], float]:
    """Y gridlines and tick labels from 0 to a rounded-up vmax; returns (elements, the axis top value)."""
    step = _tick_step(vmax)
    top = step * max(1, math.ceil(vmax / step))
    ih = _PH - _MT - _MB
    out = []
    for k in range(int(round(top / step)) + 1):
        y = _MT + ih - ih * k * step / top
        out.append(
            f'<line class="gridline" x1="{_ML}" x2="{_PW - _MR}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_num(k * step)}</text>'
        )
    out.append(
        f'<text x="14" y="{_MT + ih / 2:.1f}" text-anchor="middle" transform="rotate(-90 14 '
        f'{_MT + ih / 2:.1f})">{esc(ylabel)}</text>'
    )
    return out, top


def svg_columns(
    counts: list[float], ticks: list[tuple[float, str]], *, xlabel: str, ylabel: str, tips: list[str]
) -> str:
    """Vertical bars, one per count, evenly spaced. ticks: (position in bar units from 0 to len, text)."""
    body, top = _y_axis(max(counts, default=0), ylabel)
    iw, ih = _PW - _ML - _MR, _PH - _MT - _MB
    bw = iw / max(1, len(counts))
    for i, (c, tip) in enumerate(zip(counts, tips)):
        bh = ih * c / top
        body.append(
            f'<rect class="bar" x="{_ML + i * bw + 0.5:.1f}" y="{_MT + ih - bh:.1f}" '
            f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}"><title>{esc(tip)}</title></rect>'
        )
    for pos, text in ticks:
        body.append(f'<text x="{_ML + pos * bw:.1f}" y="{_MT + ih + 16}" text-anchor="middle">{esc(text)}</text>')
    body.append(
        f'<line class="axis" x1="{_ML}" x2="{_PW - _MR}" y1="{_MT + ih}" y2="{_MT + ih}"/>'
        f'<text x="{_ML + iw / 2:.1f}" y="{_PH - 6}" text-anchor="middle">{esc(xlabel)}</text>'
    )
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
    px = lambda x: _ML + iw * x / xmax
    py = lambda y: _MT + ih - ih * y / top
    for k, (name, ys) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        # The legend sits in the bottom-left corner, under the axis, where no data can hide it.
        body.append(
            f'<polyline class="line s{k}" points="{pts}"><title>{esc(name)}</title></polyline>'
            f'<text class="legend s{k}" x="{4 + 80 * k}" y="{_PH - 6}">■ {esc(name)}</text>'
        )
    step = _tick_step(xmax)
    for k in range(int(xmax / step) + 1):
        body.append(f'<text x="{px(k * step):.1f}" y="{_MT + ih + 16}" text-anchor="middle">{_num(k * step)}</text>')
    body.append(
        f'<line class="axis" x1="{_ML}" x2="{_PW - _MR}" y1="{_MT + ih}" y2="{_MT + ih}"/>'
        f'<text x="{_ML + iw / 2:.1f}" y="{_PH - 6}" text-anchor="middle">{esc(xlabel)}</text>'
    )
    return _svg(body, f"{ylabel} over {xlabel}")
