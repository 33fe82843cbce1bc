"""The report's sections about the whole run, whatever `--where` selects: throughput over the run (from the shards'
start and end times), failures by stage and by (stage, reason) with examples, and the datagen manifests."""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

import duckdb
import numpy as np

from subjectdiff.catalogs.report.charts import svg_lines
from subjectdiff.catalogs.report.sql import query
from subjectdiff.catalogs.report.text import esc, utc
from subjectdiff.catalogs.schema import FAILURE_STAGES
from subjectdiff.catalogs.storage import Folder, is_local, open_url

MAX_REASONS = 50  # (stage, reason) rows shown; the rest are counted


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


def run_html(con: duckdb.DuckDBPyConnection, manifest_times: tuple[float, float] | None) -> str:
    rows = query(
        con,
        "SELECT start_time, end_time, n_ok, n_failed, duration FROM shards "
        "WHERE start_time IS NOT NULL AND end_time IS NOT NULL",
    )
    if not rows:
        return '<p class="note">no shard timings in the catalog</p>'
    xs, total, ok = throughput([r[:4] for r in rows])
    t0, t1 = min(r[0] for r in rows), max(r[1] for r in rows)
    n_total = sum(r[2] + r[3] for r in rows)
    wall = max(t1 - t0, 1e-9)
    durations = sorted(r[4] or 0.0 for r in rows)
    lines = [
        f"{len(rows):,} shards written from {utc(t0)} to {utc(t1)} ({_duration(t1 - t0)})",
        f"{n_total:,} samples processed: {60 * n_total / wall:,.1f} per minute on average",
        f"median shard time {_duration(durations[len(durations) // 2])}, slowest {_duration(durations[-1])}",
    ]
    if manifest_times:
        a, b = manifest_times
        lines.append(f"run (manifest): {utc(a)} to {utc(b)} ({_duration(b - a)})")
    unit, per = ("seconds", 1 / 60) if t1 - t0 < 180 else ("minutes", 1.0) if t1 - t0 < 3 * 3600 else ("hours", 60.0)
    plot = svg_lines(
        [x / per for x in xs],
        {"processed": total, "ok": ok},
        xlabel=f"{unit} since the first shard started",
        ylabel="samples / min",
    )
    items = "".join(f"<li>{esc(t)}</li>" for t in lines)
    return f'<figure class="chart"><figcaption>Throughput over the run</figcaption>{plot}</figure><ul>{items}</ul>'


def failures_html(con: duckdb.DuckDBPyConnection, seed: int, n_processed: int) -> str:
    by_stage = dict(query(con, "SELECT stage, count(*) FROM failures GROUP BY stage"))
    if not by_stage:
        return '<p class="note">no failures</p>'
    order = [s for s in FAILURE_STAGES if s in by_stage] + sorted(s for s in by_stage if s not in FAILURE_STAGES)
    peak = max(by_stage.values())
    stage_rows = "".join(
        f'<tr><td>{esc(s)}</td><td class="num">{by_stage[s]:,}</td><td class="num">'
        f'{100 * by_stage[s] / max(n_processed, 1):.2f}%</td><td><span class="hbar" '
        f'style="width:{200 * by_stage[s] / peak:.0f}px"></span></td></tr>'
        for s in order
    )
    reasons = query(
        con,
        "SELECT stage, reason, count(*) n, min_by({'key': key, 'source': source, 'shard': shard}, "
        "hash(key, ?::BIGINT), 3) FROM failures GROUP BY stage, reason ORDER BY n DESC, stage, reason "
        f"LIMIT {MAX_REASONS + 1}",
        [seed],
    )
    n_reasons = query(con, "SELECT count(*) FROM (SELECT DISTINCT stage, reason FROM failures)")[0][0]
    reason_rows = "".join(
        f'<tr><td>{esc(stage)}</td><td class="reason">{esc(reason)}</td><td class="num">{n:,}</td><td><ul>'
        + "".join(
            f'<li><code>{esc(x["key"])}</code> <span class="src">{esc(x["source"])}</span> '
            f'<span class="shard">shard {esc(x["shard"])}</span></li>'
            for x in examples
        )
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
    dirs = [root.url] + sorted(
        {p.rsplit("/", 1)[0] if not is_local(p) else os.path.dirname(p) for p in shard_paths if p}
    )
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
        text += f' <span class="note">({esc(utc(value))})</span>'
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
        name = os.path.relpath(p, root.url) if root.local else p[len(root.url) + 1 :] if p.startswith(root.url) else p
        try:
            with open_url(p, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:
            parts.append(f'<h3>{esc(name)}</h3><p class="error">unreadable: {esc(e)}</p>')
            continue
        times = times or manifest_times(manifest)
        parts.append(f'<h3>{esc(name)}</h3><div class="manifest">{_json_html(manifest)}</div>')
    return "".join(parts), times
