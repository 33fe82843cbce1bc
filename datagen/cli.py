"""`subjectdiff datagen run` and `subjectdiff demo`. Heavy imports happen inside the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from subjectdiff.cli_words import renamed, required_out
from subjectdiff.datagen.config import PRESETS
from subjectdiff.errors import is_user_error

SAMPLE_IMAGES = Path(__file__).resolve().parent / "sample_images"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datagen", help="build catalogued Subject-Diffusion records from images (Ray)")
    dsub = p.add_subparsers(dest="datagen_command", metavar="ACTION", required=True)
    r = dsub.add_parser(
        "run",
        help="run or resume the pipeline from SRC into --out DIR",
        description="Rerunning the same command resumes: complete shards are kept, the rest redone.",
    )
    r.add_argument(
        "--input",
        required=True,
        metavar="SRC",
        help="image folder, webdataset shards (.tar / brace pattern / fsspec URL), img2dataset "
        "folder, or a .parquet/.csv list of image paths, URLs or image bytes (Hugging Face "
        "datasets Parquet, hf:// URLs); videos (.mp4 .mov .webm .mkv) are taken beside images",
    )
    r.add_argument(
        "--image-column",
        metavar="NAME",
        help="a list's column of image paths, URLs or bytes, in any case (default: the first of "
        "path, url, image_path, filepath, image)",
    )
    r.add_argument(
        "--caption-column",
        metavar="NAME",
        help="a list's column that becomes alt_text, in any case (default: the first of caption, text, alt_text)",
    )
    required_out(
        r,
        "--output",
        metavar="DIR",
        help="a local folder or any fsspec URL (s3://bucket/prefix, gs://...): shards, sidecars, plan "
        "and manifest go there",
    )
    r.add_argument(
        "--catalog",
        metavar="FILE",
        help="the DuckDB catalog file (default: DIR/catalog.duckdb, or a file under "
        "$SUBJECTDIFF_CACHE/catalogs for a URL)",
    )
    r.add_argument(
        "--retry-failures",
        action="store_true",
        help="redo only the failed samples that may pass on a second try (read errors, decode errors "
        "of remote inputs, stage errors such as out of memory); everything else stays",
    )
    r.add_argument(
        "--preset",
        default="default",
        choices=PRESETS,
        help="default: the paper's checkpoints; paper: those with the authors' data recipe (3-8 nouns, "
        "count words, long side >= 600, greedy captions); tiny: tiny random models (offline); "
        "full-random: the default architectures with random weights, built into the cache "
        "(speed tests, one node)",
    )
    r.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML overrides: [decode] [caption] [nouns] [ground] [segment] [filters] [curate] [pipeline] "
        "[pipeline.pools.STAGE]",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="a Ray cluster to join (default: $RAY_ADDRESS, as `ray job submit` sets it, else a cluster "
        "`ray start` runs on this machine, else a Ray started here)",
    )
    r.add_argument("--batch-size", type=int, metavar="N", help="items per block and per model batch")
    r.add_argument("--shard-size", type=int, metavar="N", help="samples per output shard")
    r.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings over the preset and --config, e.g. ground.box_threshold=0.3 "
        "pipeline.pools.segment.concurrency=4 (values are TOML literals)",
    )
    add_print_config(r)
    r.set_defaults(func=_run)

    w = dsub.add_parser("weights", help="download a preset's checkpoints into the cache ($SUBJECTDIFF_CACHE)")
    w.add_argument("--preset", default="default", choices=PRESETS)
    w.add_argument("--config", metavar="FILE.toml")
    w.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for `datagen run`")
    add_print_config(w)
    w.set_defaults(func=_weights)

    d = sub.add_parser("demo", help="the whole pipeline offline on the bundled sample images (tiny models)")
    out = d.add_argument("--out", default="demo_out", metavar="DIR", help="the demo's folder (default demo_out)")
    renamed(d, "--output", out)
    d.add_argument("--input", default=str(SAMPLE_IMAGES), metavar="SRC", help=argparse.SUPPRESS)
    d.set_defaults(func=_demo)


def add_print_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--print-config",
        action="store_true",
        help='print the resolved config as TOML (what --config reads; unset options as "none") and exit',
    )


def _print_config(args: argparse.Namespace) -> int:
    print(_config(args).to_toml(), end="")  # a bad setting: one line, exit 2 (subjectdiff/errors.py)
    return 0


def _config(args: argparse.Namespace):
    from subjectdiff.datagen.job import load_config

    cfg = load_config(args.preset, args.config, getattr(args, "overrides", ()))
    if getattr(args, "batch_size", None):
        from subjectdiff.datagen.stages import registry

        cfg.pipeline.batch_size = args.batch_size
        for stage in registry.STAGES:  # each stage whose settings batch its model
            if hasattr(stage.settings(cfg.stages), "batch_size"):
                stage.settings(cfg.stages).batch_size = args.batch_size
    if getattr(args, "shard_size", None):
        cfg.pipeline.shard_size = args.shard_size
    return cfg


def _run(args: argparse.Namespace) -> int:
    """Exit status: 0 when every shard is complete; 1 when shards are left incomplete or the storage failed
    (rerun the same command to resume); 2 for a bad input, output or setting, 130/143 interrupted
    (subjectdiff/errors.py)."""
    if args.print_config:
        return _print_config(args)
    cfg = _config(args)
    from subjectdiff.datagen.run import run

    try:
        summary = run(
            args.input,
            args.out,
            cfg,
            ray_address=args.ray_address,
            command=["subjectdiff", *sys.argv[1:]],
            image_column=args.image_column,
            caption_column=args.caption_column,
            retry_failures=args.retry_failures,
            catalog_file=args.catalog,
        )
    except Exception as e:
        if is_user_error(e) or not _is_storage_error(e):
            raise  # a setting's one line (errors.run_command), or a bug's traceback
        return _storage_failed(e)
    print(summary.line())
    if summary.incomplete:
        print(
            f"subjectdiff datagen: {len(summary.incomplete)} of {summary.shards} shard(s) incomplete after "
            "their attempts:",
            file=sys.stderr,
        )
        for line in summary.incomplete_lines():
            print(line, file=sys.stderr)
        print(
            "subjectdiff datagen: the complete shards are kept; rerun the same command to finish the others",
            file=sys.stderr,
        )
        return 1
    return 0


def _is_storage_error(e: BaseException) -> bool:
    """An error of the storage rather than of the code: an OSError (StorageError included) or a transient
    network error, possibly wrapped by Ray (whose remote errors carry the original as `cause`)."""
    from subjectdiff.catalogs.storage import transient

    inner = getattr(e, "cause", None)
    return isinstance(e, OSError) or transient(e) or (isinstance(inner, BaseException) and _is_storage_error(inner))


def _storage_failed(e: BaseException) -> int:
    """One line for a run stopped by its storage, and what to do."""
    from subjectdiff.catalogs.storage import StorageError, detail

    while not isinstance(e, StorageError) and isinstance(getattr(e, "cause", None), BaseException):
        e = e.cause  # Ray's wrapper of a remote error: the error itself says more
    what = str(e) if isinstance(e, StorageError) else detail(e)
    name = getattr(e, "filename", None)  # an OSError raised by a client names its file here, if anywhere
    if name and str(name) not in what:
        what += f" ({name})"
    print(
        f"subjectdiff datagen: error: storage failed: {what}; the complete shards are kept: rerun the same "
        "command when the storage is reachable",
        file=sys.stderr,
    )
    return 1


def _weights(args: argparse.Namespace) -> int:
    """Fetch (or find in the cache) every checkpoint the active stages of the preset need (each registry entry's
    `checkpoints`), each checked against its expected digests; one `spec -> path` line per checkpoint on stdout,
    download progress on stderr."""
    from subjectdiff.datagen.job import load_config
    from subjectdiff.datagen.stages import registry

    if args.print_config:
        return _print_config(args)
    st = load_config(args.preset, args.config, args.overrides).stages
    try:
        for stage in registry.active(st):
            for ck in stage.checkpoint_list(st, download=True):
                print(f"{ck.spec} -> {ck.fetch()}", flush=True)
    except Exception as e:  # network, bucket and hub errors vary; one line says which checkpoint failed and why
        print(f"subjectdiff datagen: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _demo(args: argparse.Namespace) -> int:
    from subjectdiff.catalogs import catalog
    from subjectdiff.catalogs.cli import format_table
    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.run import run

    cfg = preset("tiny")
    cfg.pipeline.shard_size = 4
    print(
        f"demo: tiny random models (offline) on {len(list(Path(args.input).glob('*.jpg')))} sample images "
        f"-> {args.out}",
        flush=True,
    )
    summary = run(args.input, args.out, cfg, command=["subjectdiff", "demo", "--out", args.out])
    print(summary.line())
    sql = (
        "SELECT s.key, o.label, round(o.score, 3) AS score, round(o.area, 3) AS area, s.caption "
        "FROM objects o JOIN samples s USING (key) ORDER BY o.score DESC LIMIT 10"
    )
    print(f'\n$ subjectdiff catalog query {args.out} "{sql}"')
    print(format_table(catalog.query(args.out, sql), "table"))
    out = Path(args.out).resolve()
    from subjectdiff.catalogs.report import build_report

    report = build_report(out, out / "report.html")
    print(f"shards, sidecars, stats:  {out}/*.tar, *.samples.parquet, *.objects.parquet, *_stats.json")
    print(f"Hugging Face datasets:    load_dataset({str(out)!r})   ({out}/README.md: samples, objects, failures)")
    print(f"visual report:            {report}   (open it in a browser)")
    print(f"catalog (DuckDB):         {out}/catalog.duckdb   (subjectdiff catalog stats {args.out})")
    print(f"run manifest:             {out}/manifest.json")
    return 0 if not summary.incomplete else 1
