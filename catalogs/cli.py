"""`subjectdiff catalog build|query|stats|select|duplicates|report`: the catalog from the command line.

Every failure a user can cause (a missing catalog, bad SQL, a write statement) is a CatalogError: one line on
stderr (DuckDB's "Did you mean" hints kept), no traceback (subjectdiff/errors.py). Exit status: 0 done; 1
`build` loaded every good shard but some are bad (one `bad shard NAME: FILE: REASON (DETAIL)` line each on
stderr; the `bad_shards` table); 2 an error (one line), after which a catalog is as it was and a first build
left none.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

from subjectdiff.catalogs.catalog import CatalogError, one_line

EXIT_BAD_SHARDS = 1  # `catalog build`: the catalog holds every good shard; the bad ones are in bad_shards
_DIR_HELP = "the shard folder: a local path or a URL (s3://bucket/out)"
_CATALOG_HELP = (
    "the DuckDB file (default: DIR/catalog.duckdb for a local DIR, a file under $SUBJECTDIFF_CACHE/catalogs for a URL)"
)


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help=_DIR_HELP)
    p.add_argument("--catalog", metavar="FILE", help=_CATALOG_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("catalog", help="build and query the DuckDB catalog of a shard folder (local or a URL)")
    csub = p.add_subparsers(dest="catalog_command", metavar="ACTION", required=True)

    b = csub.add_parser(
        "build",
        help="create or refresh DIR/catalog.duckdb from the shards' sidecars",
        description="Create or refresh the catalog from the sidecars of DIR's complete shards. A "
        "shard that cannot be loaded is listed on stderr and in the bad_shards table, and tried "
        "again by the next build. Exit status: 0 every complete shard loaded; 1 the good shards "
        "loaded, some bad; 2 an error (the catalog is as it was; a first build leaves none).",
    )
    _add_dir(b)
    b.add_argument(
        "--card",
        action="store_true",
        help="also write DIR/README.md, the dataset card with which `datasets.load_dataset(DIR)` reads the "
        "catalogued samples, objects and failures (a datagen run writes it itself)",
    )
    b.set_defaults(func=_build)

    q = csub.add_parser("query", help="run one read-only SQL statement and print the result")
    _add_dir(q)
    q.add_argument("sql")
    q.add_argument("--format", choices=["table", "csv", "json", "jsonl"], default="table")
    q.add_argument("--max-rows", type=int, default=40, help="rows shown in table format (default 40)")
    q.set_defaults(func=_query)

    s = csub.add_parser("stats", help="counts, labels, score/area and curation-score distributions, failures")
    _add_dir(s)
    s.add_argument("--top", type=int, default=20, help="labels to list (default 20)")
    s.add_argument("--format", choices=["text", "json"], default="text")
    s.set_defaults(func=_stats)

    sel = csub.add_parser("select", help="write the keys and shards matching a predicate to Parquet")
    _add_dir(sel)
    sel.add_argument("--where", help="SQL predicate over `samples` (subqueries may use `objects`)")
    sel.add_argument(
        "--object-where",
        help="SQL predicate over `objects` (and the sample's caption, width, height, "
        "white_fraction): "
        "records each sample's eligible objects, drops samples with none; 'reference' = the reference "
        "code's object rules",
    )
    sel.add_argument(
        "--dedup",
        choices=["exact", "near"],
        help="keep one sample per duplicate group, the first in plan order (shard, then position in "
        "the shard): exact = same sha256, near = phash within --max-distance (or the groups of --dups)",
    )
    sel.add_argument("--dups", metavar="FILE", help="a `catalog duplicates` file whose groups --dedup near uses")
    sel.add_argument(
        "--max-distance",
        type=int,
        default=4,
        metavar="D",
        help="--dedup near: phash bits (of 64) within which two samples are duplicates (default 4)",
    )
    sel.add_argument(
        "--exclude-near",
        metavar="FOLDER_OR_CATALOG",
        help="drop samples near any image of a held-out set: a folder of images (e.g. DreamBench), a "
        "catalog folder or URL, or a .duckdb file",
    )
    sel.add_argument(
        "--exclude-distance",
        type=int,
        default=8,
        metavar="D",
        help="--exclude-near: phash bits within which a sample counts as a held-out image (default 8)",
    )
    sel.add_argument("--out", required=True, help="output .parquet file")
    sel.set_defaults(func=_select)

    d = csub.add_parser("duplicates", help="groups of exact (sha256) and near (phash) duplicates -> Parquet")
    _add_dir(d)
    d.add_argument(
        "--max-distance",
        type=int,
        default=4,
        metavar="D",
        help="phash bits (of 64) within which two samples are near duplicates (default 4)",
    )
    d.add_argument("--bands", type=int, metavar="B", help="bands of the index (default: chosen for the catalog's size)")
    d.add_argument(
        "--order-by", metavar="SQL", help="which member of a group comes first (default: plan order, 'shard, idx')"
    )
    d.add_argument("--memory-limit", metavar="SIZE", help="DuckDB's memory limit (e.g. 4GB); beyond it joins spill")
    d.add_argument("--temp-directory", metavar="DIR", help="where DuckDB spills")
    d.add_argument("--out", required=True, help="output .parquet file (one row per sample in a group)")
    d.set_defaults(func=_duplicates)

    _add_pairs(csub)

    r = csub.add_parser("report", help="write a self-contained HTML report: sampled records, plots, failures, manifest")
    _add_dir(r)
    r.add_argument("--where", help="SQL predicate over `samples` narrowing the records and plots (as in select)")
    r.add_argument("--sample", type=int, default=24, help="records shown (default 24)")
    r.add_argument("--seed", type=int, default=0, help="which records are sampled (default 0)")
    r.add_argument("--out", required=True, help="output .html file")
    r.set_defaults(func=_report)


def _add_pairs(csub: argparse._SubParsersAction) -> None:
    from subjectdiff.catalogs.pairs import PairConfig

    d = PairConfig()
    p = csub.add_parser(
        "pairs",
        help="mine cross-image pairs of one subject (video frames or nearest neighbours) -> Parquet and the catalog",
        description="Pair objects that show the same subject in two images, from the identity embeddings "
        "(NNNNN.identity.parquet) and the catalog: video = the same label in two frames of one video, "
        "retrieval = each object's nearest neighbours of its label from other sources. Writes --out and "
        "replaces the method's rows of the catalog's `pairs` table.",
    )
    _add_dir(p)
    p.add_argument("--method", choices=["video", "retrieval"], required=True)
    p.add_argument("--out", required=True, help="output .parquet file (one row per directed pair)")
    p.add_argument("--min-sim", type=float, default=d.min_sim, help=f"identity cosine (default {d.min_sim})")
    p.add_argument(
        "--min-sim-across-shots",
        type=float,
        default=d.min_sim_across_shots,
        help=f"video: the cosine for two frames in different shots (default {d.min_sim_across_shots})",
    )
    p.add_argument(
        "--min-phash",
        type=int,
        default=d.min_phash,
        help="phash bits (of 64) the two images differ in: video keeps a pair at this distance or with "
        f"--min-change, retrieval drops closer pairs as near duplicates (default {d.min_phash})",
    )
    p.add_argument(
        "--min-change",
        type=float,
        default=d.min_change,
        help=f"video: box shape change (0 = a pure move or zoom) that keeps a pair (default {d.min_change})",
    )
    p.add_argument("--max-gap", type=int, help="video: at most this many frames apart (default: any)")
    p.add_argument("--k", type=int, default=d.k, help=f"retrieval: neighbours kept per object (default {d.k})")
    p.add_argument(
        "--search-k", type=int, help="retrieval: neighbours fetched before the source/duplicate filters (3k+1)"
    )
    p.add_argument("--index", choices=["ivf", "hnsw", "exact"], default=d.index, help="retrieval: the ANN index")
    p.add_argument("--nprobe", type=int, default=d.nprobe, help=f"retrieval, ivf: lists searched (default {d.nprobe})")
    p.add_argument("--num-cpus", type=int, help="retrieval: CPUs of the Ray started here (default: all)")
    p.set_defaults(func=_pairs)


def _pairs(args: argparse.Namespace) -> int:
    import time

    from subjectdiff.catalogs.pairs import PairConfig, find_pairs, load_pairs

    cfg = PairConfig(
        min_sim=args.min_sim,
        min_sim_across_shots=args.min_sim_across_shots,
        min_phash=args.min_phash,
        min_change=args.min_change,
        max_gap=args.max_gap,
        k=args.k,
        search_k=args.search_k,
        index=args.index,
        nprobe=args.nprobe,
        num_cpus=args.num_cpus,
    )
    t0, shown = time.monotonic(), [-1e9]

    def progress(done: int, total: int, unit: str) -> None:
        # a line every 5 s, in subjectdiff/progress.py's form (that class lives on the floor, above catalogs/)
        now = time.monotonic()
        if now - shown[0] >= 5.0 or done == total:
            shown[0] = now
            rate = done / max(now - t0, 1e-9)
            print(f"[pairs] {done}/{total} {unit} ({rate:.0f} {unit}/s)", file=sys.stderr, flush=True)

    rows = find_pairs(args.dir, args.method, args.out, cfg, catalog=args.catalog, progress=progress)
    total = load_pairs(args.dir, args.out, args.method, catalog=args.catalog)
    print(
        f"{rows} {args.method} pair rows (both directions) -> {args.out}; the catalog's pairs table "
        f"holds {total} ({time.monotonic() - t0:.1f} s)"
    )
    _warn_bad_shards(args)
    return 0


def _build(args: argparse.Namespace) -> int:
    from subjectdiff.catalogs.catalog import build

    report = build(args.dir, catalog=args.catalog)
    for bad in report.bad:
        print(bad.line(), file=sys.stderr)
    print(report.summary())
    if args.card:
        from subjectdiff.catalogs.card import CARD_FILE, write_card

        write_card(args.dir, exclude=[b.name for b in report.bad] + report.incomplete)
        print(f"dataset card: {args.dir.rstrip('/')}/{CARD_FILE}")
    return EXIT_BAD_SHARDS if report.bad else 0


def _warn_bad_shards(args: argparse.Namespace) -> None:
    """One line on stderr when the catalog left shards out: an answer without their samples is not the folder's."""
    from subjectdiff.catalogs.catalog import bad_shard_names

    names = bad_shard_names(args.dir, catalog=args.catalog)
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        print(
            f"subjectdiff catalog: warning: {len(names)} bad shard(s) are not in the catalog ({shown}): their "
            "samples are missing; `SELECT * FROM bad_shards` says why, `catalog build` tries them again",
            file=sys.stderr,
        )


def _query(args: argparse.Namespace) -> int:
    from subjectdiff.catalogs.catalog import query

    table = query(args.dir, args.sql, catalog=args.catalog)
    sys.stdout.write(format_table(table, args.format, max_rows=args.max_rows))
    _warn_bad_shards(args)
    return 0


def format_table(table, fmt: str, *, max_rows: int = 40) -> str:
    """Render an Arrow table as an aligned text table, CSV, a JSON array, or JSON lines."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return buf.getvalue().decode("utf-8")
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps(rows, default=str, ensure_ascii=False) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in rows)
    names = table.column_names
    shown = rows[:max_rows]
    cells = [[_cell(r[n]) for n in names] for r in shown]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [line(names), line(["-" * w for w in widths])] + [line(c) for c in cells]
    more = f" (showing {len(shown)})" if len(rows) > len(shown) else ""
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _stats(args: argparse.Namespace) -> int:
    from subjectdiff.catalogs.catalog import stats

    st = stats(args.dir, catalog=args.catalog, top_labels=args.top)
    if args.format == "json":
        print(json.dumps(st, default=str, indent=2))
        return 0
    print(
        f"shards {st['shards']}   samples {st['samples']}   failed {st['failed']}   objects {st['objects']}"
        f"   distinct labels {st['n_labels']}" + (f"   bad shards {st['bad_shards']}" if st["bad_shards"] else "")
    )
    print("\nobjects per sample:  " + "  ".join(f"{n}:{c}" for n, c in st["objects_per_sample"]))
    print(f"\ntop {args.top} labels:")
    for label, n in st["labels"]:
        print(f"  {label:<24} {n}")
    for name in ("score", "area"):
        q = st[name]["quantiles"]
        print(f"\n{name}: " + "  ".join(f"{k} {_cell(v)}" for k, v in q.items()))
        peak = max((b["count"] for b in st[name]["histogram"]), default=0) or 1
        for b in st[name]["histogram"]:
            print(f"  [{b['lo']:.1f}, {b['hi']:.1f})  {'#' * round(30 * b['count'] / peak):<30} {b['count']}")
    cur = st["curation"]
    print("\ncuration:" + ("" if cur["clip_score"]["n"] or cur["label_score"]["n"] else " not run"))
    for name in ("clip_score", "alt_clip_score", "aesthetic", "label_score"):
        q = cur[name]
        if q["n"]:
            print(f"  {name:<15} " + "  ".join(f"{k} {_cell(v)}" for k, v in q.items() if k != "n") + f"  (n {q['n']})")
    if cur["clip_score"]["n"]:
        print(f"  exact duplicates {cur['exact_duplicates']} (catalog duplicates finds near ones too)")
    if st.get("pairs"):
        print("\npairs (rows, both directions):  " + "  ".join(f"{m}:{n}" for m, n in st["pairs"]))
    print("\nfailures by reason:" + ("" if st["failures_by_reason"] else " none"))
    for stage, reason, n in st["failures_by_reason"]:
        print(f"  {stage:<8} {reason:<50} {n}")
    return 0


def _select(args: argparse.Namespace) -> int:
    from subjectdiff.catalogs.selection import REFERENCE_OBJECT_WHERE, select

    if not (args.where or args.object_where or args.dedup or args.exclude_near):
        raise CatalogError("select: give --where, --object-where, --dedup or --exclude-near")
    objects = REFERENCE_OBJECT_WHERE if args.object_where == "reference" else args.object_where
    n = select(
        args.dir,
        args.where,
        args.out,
        catalog=args.catalog,
        object_where=objects,
        dedup=args.dedup,
        dups=args.dups,
        max_distance=args.max_distance,
        exclude_near=args.exclude_near,
        exclude_distance=args.exclude_distance,
    )
    print(f"selected {n} sample(s) -> {args.out}")
    if n == 0:
        print(
            f"subjectdiff catalog: warning: no sample selected: {args.out} is empty, training on it would have "
            "nothing; `catalog stats` shows what the catalog holds",
            file=sys.stderr,
        )
    _warn_bad_shards(args)
    return 0


def _duplicates(args: argparse.Namespace) -> int:
    import duckdb

    from subjectdiff.catalogs.duplicates import find_duplicates

    try:
        groups = find_duplicates(
            args.dir,
            args.out,
            catalog=args.catalog,
            max_distance=args.max_distance,
            bands=args.bands,
            order_by=args.order_by,
            memory_limit=args.memory_limit,
            temp_directory=args.temp_directory,
        )
    except (ValueError, duckdb.Error) as e:
        raise CatalogError(one_line(e)) from None
    kinds: dict[int, str] = dict(zip(groups["group_id"].to_pylist(), groups["kind"].to_pylist()))
    n_exact = sum(k == "exact" for k in kinds.values())
    print(
        f"{len(kinds)} duplicate group(s) ({n_exact} exact, {len(kinds) - n_exact} near), "
        f"{groups.num_rows} sample(s) -> {args.out}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from subjectdiff.catalogs.report import build_report

    out = build_report(args.dir, args.out, where=args.where, sample=args.sample, seed=args.seed, catalog=args.catalog)
    print(f"report -> {out}")
    return 0
