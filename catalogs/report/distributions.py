"""The report's distributions section: label frequency, objects per image, and the detection score, box area and
mask score histograms over the selected objects, aggregated in DuckDB however large the catalog."""

from __future__ import annotations

import math

import duckdb
import numpy as np

from subjectdiff.catalogs.report.charts import svg_columns, svg_hbars, svg_histogram
from subjectdiff.catalogs.report.sql import Scope, query
from subjectdiff.catalogs.report.text import esc

TOP_LABELS = 30
HIST_BINS = 20
MAX_OBJECTS_BAR = 30  # objects-per-image bars beyond this are pooled into one ">= 30" bar
_FINE = 10_000  # bins of [0, 1] counted in SQL; plots pool them to HIST_BINS, quantiles read them


def _fine_counts(con: duckdb.DuckDBPyConnection, scope: Scope, col: str) -> np.ndarray:
    """Counts of COL in _FINE equal bins over [0, 1] (values outside go to the end bins): (_FINE,) int64.

    One GROUP BY on an integer bin: clamping and pooling happen here, since SQL least/greatest over
    the float expression costs ten times the scan at millions of rows.
    """
    rows = query(
        con,
        f"SELECT floor({col} * {_FINE})::BIGINT b, count(*) FROM {scope.objects} "
        f"WHERE {col} IS NOT NULL AND NOT isnan({col}) GROUP BY b",
    )
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


def _histogram_figure(con: duckdb.DuckDBPyConnection, scope: Scope, col: str, title: str, xlabel: str) -> tuple:
    fine = _fine_counts(con, scope, col)
    coarse = fine.reshape(HIST_BINS, -1).sum(axis=1).tolist()
    return title, svg_histogram(coarse, 0, 1, xlabel=xlabel), _quantile_note(fine)


def distributions_html(con: duckdb.DuckDBPyConnection, where: str | None) -> str:
    scope = Scope.of(where)
    labels = query(
        con,
        f"SELECT label, count(*) n, count(*) OVER () FROM {scope.objects} GROUP BY label "
        f"ORDER BY n DESC, label LIMIT {TOP_LABELS}",
    )
    n_labels = labels[0][2] if labels else 0
    per_image = dict(
        query(con, f"SELECT least(n_objects, {MAX_OBJECTS_BAR}), count(*) FROM {scope.samples} GROUP BY 1")
    )
    top = max(per_image, default=0)
    counts = [float(per_image.get(i, 0)) for i in range(top + 1)]
    names = [f"{i}" if i < MAX_OBJECTS_BAR else f"≥{MAX_OBJECTS_BAR}" for i in range(top + 1)]
    every = max(1, math.ceil(len(names) / 16))
    objects_plot = svg_columns(
        counts,
        [(i + 0.5, s) for i, s in enumerate(names) if i % every == 0],
        xlabel="objects per image",
        ylabel="images",
        tips=[f"{s} objects: {int(c):,} images" for s, c in zip(names, counts)],
    )
    figures = [
        (
            f"Label frequency (top {len(labels)} of {n_labels:,} labels)",
            svg_hbars([(lb, n) for lb, n, _ in labels], label="label frequency"),
            "",
        ),
        ("Objects per image", objects_plot, f"{int(sum(counts)):,} images"),
        _histogram_figure(con, scope, "score", "Detection score", "score"),
        _histogram_figure(con, scope, "area", "Box area (fraction of the image)", "box area"),
        _histogram_figure(con, scope, "mask_score", "Mask score (SAM's predicted IoU)", "mask score"),
    ]
    return "".join(
        f'<figure class="chart"><figcaption>{esc(t)}</figcaption>{svg}<p class="note">{esc(note)}</p></figure>'
        for t, svg, note in figures
    )
