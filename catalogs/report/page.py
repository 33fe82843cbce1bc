"""The report page: runs every section's queries on one read-only catalog connection, reads the shown records,
and assembles the self-contained HTML (inline CSS, images as data: URIs, no script, a Content-Security-Policy
that forbids loading anything else). The package docstring (catalogs/report/__init__.py) describes the page."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from subjectdiff.catalogs.catalog import CatalogError, open_catalog
from subjectdiff.catalogs.report.curation import curation_html, gather
from subjectdiff.catalogs.report.distributions import distributions_html
from subjectdiff.catalogs.report.pairs import gather_pairs, pairs_html
from subjectdiff.catalogs.report.records import Card, card_html, load_cards
from subjectdiff.catalogs.report.run import failures_html, find_manifests, manifest_html, run_html
from subjectdiff.catalogs.report.sql import check_where, query, sample_keys
from subjectdiff.catalogs.report.text import esc, utc
from subjectdiff.catalogs.storage import Folder

DEFAULT_SAMPLE = 24

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
class Summary:
    """The header's facts about the catalog and this report."""

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


def _header_html(s: Summary) -> str:
    processed = s.n_samples + s.n_failed
    stats = [
        ("shards", f"{s.n_shards:,}"),
        ("samples", f"{s.n_samples:,}"),
        ("failed", f"{s.n_failed:,} ({100 * s.n_failed / max(processed, 1):.1f}%)"),
        ("objects", f"{s.n_objects:,}"),
    ]
    if s.where is not None:
        stats.append(("selected", f"{s.n_selected:,}"))
    stats.append(("shown", f"{s.n_shown:,} (seed {s.seed})"))
    cells = "".join(f'<div class="stat"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in stats)
    where = f" · where <code>{esc(s.where)}</code>" if s.where is not None else ""
    return (
        f"<header><h1>subjectdiff dataset report</h1><div><code>{esc(s.root)}</code>{where} · catalog built "
        f'{esc(s.built_at)}</div><div class="summary">{cells}</div><div>reproduce: <code>{esc(s.command)}</code>'
        '</div><nav><a href="#records">records</a><a href="#distributions">distributions</a>'
        '<a href="#curation">curation</a><a href="#pairs">pairs</a><a href="#run">run</a>'
        '<a href="#failures">failures</a><a href="#manifest">manifest</a></nav></header>'
    )


def page_html(
    summary: Summary,
    cards: list[Card],
    distributions: str,
    run: str,
    failures: str,
    manifest: str,
    seconds: float,
    curation: str = "",
    pairs: str = "",
) -> str:
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
        f'<section id="pairs"><h2>Pairs</h2>{pairs}</section>'
        f'<section id="run"><h2>Run</h2>{run}</section>'
        f'<section id="failures"><h2>Failures</h2>{failures}</section>'
        f'<section id="manifest"><h2>Manifest</h2>{manifest}</section>'
        f'<section><p class="note">generated {esc(utc(time.time()))} in {seconds:.2f} s</p></section>'
        "</body></html>\n"
    )


def _command(root: str, out: Path, where: str | None, sample: int, seed: int) -> str:
    parts = ["subjectdiff", "catalog", "report", str(root)]
    if where is not None:
        parts += ["--where", where]
    parts += ["--sample", str(sample), "--seed", str(seed), "--out", str(out)]
    return shlex.join(parts)


def build_report(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    where: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    catalog: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report of ROOT's catalog to OUT (see the package docstring) and return OUT.

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
        n_shards, n_samples, n_failed, n_objects = query(
            con,
            "SELECT (SELECT count(*) FROM shards), (SELECT count(*) FROM samples), "
            "(SELECT count(*) FROM failures), (SELECT count(*) FROM objects)",
        )[0]
        n_selected = check_where(con, where) if where is not None else n_samples
        built = dict(query(con, "SELECT name, value FROM catalog_info")).get("built_at", "?")
        sampled = sample_keys(con, where, sample, seed)
        shard_paths = [r[0] for r in query(con, "SELECT DISTINCT path FROM shards")]
        manifest, times = manifest_html(find_manifests(folder, shard_paths), folder)
        distributions = distributions_html(con, where)
        gathered = gather(con, where)
        pair_counts, pair_rows = gather_pairs(con, seed)
        run = run_html(con, times)
        failures = failures_html(con, seed, n_samples + n_failed)
    cards = load_cards(folder, sampled)
    curation_section = curation_html(folder, gathered)
    summary = Summary(
        root,
        built,
        n_shards,
        n_samples,
        n_failed,
        n_objects,
        where,
        n_selected,
        len(cards),
        seed,
        _command(root, out, where, sample, seed),
    )
    pairs_section = pairs_html(folder, pair_counts, pair_rows)
    text = page_html(
        summary, cards, distributions, run, failures, manifest, time.monotonic() - t0, curation_section, pairs_section
    )
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
