"""`subjectdiff train` / `python -m subjectdiff.train` / `torchrun --nproc_per_node=N -m subjectdiff.train`: the
trainer's command line.

    torchrun --nproc_per_node=8 -m subjectdiff.train --preset sd2-base data.shards=/data/shards run.out_dir=runs/a
    subjectdiff train --preset tiny --records out/ run.max_steps=20
    subjectdiff train --config my.toml --catalog out/catalog.duckdb --where "n_objects >= 2" --object-where reference
    subjectdiff train preview --preset paper --records out/ --sample 16 --out preview/   # what the trainer would feed
    subjectdiff train --preset tiny --records out/ --pairs out/pairs.parquet data.pair_ratio=0.3   # cross-image pairs
    subjectdiff train --preset paper --arch tiny --catalog out/catalog.duckdb run.max_steps=20  # the paper, tiny

Overrides are KEY=VALUE over the TrainConfig tables (model., data., optim., loss., run.), anywhere among the
options. `preview` is a subcommand: the first word after `train` (TrainParser). torch is imported only when the
command runs (`train preview` builds no model). The flags' words are docs/cli.md's.
"""

from __future__ import annotations

import argparse
import sys

from subjectdiff.cli_words import deprecated, renamed
from subjectdiff.errors import UsageError, run_command, without_debug

_PREVIEW_HELP = "write what the trainer would feed for N samples (HTML contact sheet + samples.jsonl); no model"
_EPILOG = f"""commands:
  preview    {_PREVIEW_HELP}
             (`train preview --help`)"""


class IntermixedParser(argparse.ArgumentParser):
    """A parser whose KEY=VALUE overrides may stand anywhere among the options. argparse's plain parsing binds the
    positionals to the first run of them and rejects later ones."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back in: parse plainly there
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


class TrainParser(IntermixedParser):
    """`train`'s parser: `train preview ...` is parsed by the preview parser (its own flags and --help), anything
    else trains. argparse's subparsers would take the first override for a subcommand's name, so the first word
    decides here, before any parsing."""

    preview: argparse.ArgumentParser | None = None

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if not self._inner and self.preview is not None and args[:1] == ["preview"]:
            return self.preview.parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The config: a preset, a TOML file over it, another model preset (train and preview alike)."""
    p.add_argument(
        "--preset",
        metavar="NAME",
        default=None,
        help="tiny, sd2-base or paper (default: the --config file's `preset`, else sd2-base)",
    )
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help="TOML tables [model] [data] [optim] [loss] [run] over the preset (a preset name here is "
        "deprecated: --preset NAME)",
    )
    arch = p.add_argument(
        "--arch",
        default=None,
        metavar="NAME",
        help="tiny or sd2-base: run the config on this model architecture preset at its native resolution "
        "(`--preset paper --arch tiny`: the paper's data, loss and schedule on a CPU)",
    )
    renamed(p, "--model", arch)  # --model is a trained model everywhere else (generate, eval, export)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Which records: a record folder, a selection, or a catalog (and its predicates)."""
    records = p.add_argument(
        "--records",
        action="append",
        default=None,
        metavar="DIR",
        help="record (shard) folder, file or pattern, local or a URL (data.shards); repeatable",
    )
    renamed(p, "--shards", records)
    p.add_argument("--selection", default=None, metavar="FILE", help="a `catalog select` Parquet (data.selection)")
    p.add_argument(
        "--catalog",
        default=None,
        metavar="FILE.duckdb",
        help="the DuckDB catalog that selects the records: all of them, or those --where / --object-where "
        "select; its records are --records DIR when given, else the folder it was built from "
        "(data.catalog)",
    )
    p.add_argument("--where", default=None, help="SQL predicate over the catalog's samples (data.where)")
    p.add_argument(
        "--object-where",
        default=None,
        help="SQL predicate over the catalog's objects: the subjects are chosen among the objects it "
        "keeps (data.object_where; 'reference' = the reference code's object rules)",
    )
    p.add_argument(
        "--pairs",
        default=None,
        metavar="FILE",
        help="a pairs.parquet (`catalog pairs`; a path or URL): pair samples take the subject image from the "
        "reference object and the target from the other image, data.pair_ratio of the samples (default 0.5) "
        "(data.pairs)",
    )


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--print-config",
        action="store_true",
        help='print the resolved config as TOML (what --config reads; unset options as "none") and exit',
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings over the preset and --config, e.g. "
        "run.max_steps=20 data.batch_size=2 (values are TOML literals)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Training's flags."""
    add_config_arguments(p)
    p.add_argument("--resume", default=None, help="'latest' (newest checkpoint of run.out_dir) or a checkpoint folder")
    add_data_arguments(p)
    p.add_argument("--out", default=None, metavar="DIR", help="the run's folder (run.out_dir)")
    add_overrides(p)
    p.set_defaults(func=run, preview=False)


def add_preview_arguments(p: argparse.ArgumentParser) -> None:
    """`train preview`'s flags: training's config and data flags, and its page."""
    add_config_arguments(p)
    add_data_arguments(p)
    sample = p.add_argument("--sample", type=int, default=16, metavar="N", help="how many samples (default 16)")
    renamed(p, "--n", sample)
    p.add_argument("--out", required=True, metavar="DIR", help="the folder of the page")
    add_overrides(p)
    p.set_defaults(func=run, preview=True, command_name="subjectdiff train preview")


def train_parser(p: TrainParser) -> TrainParser:
    """Give P (train's parser) training's flags and its `preview` subcommand."""
    add_arguments(p)
    p.preview = IntermixedParser(prog=f"{p.prog} preview", description=_PREVIEW_HELP)
    add_preview_arguments(p.preview)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train Subject-Diffusion on catalogued records (one process; torchrun for DDP); "
        "`train preview`: what it would feed",
        usage="%(prog)s [preview] [options] [KEY=VALUE ...]",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.__class__ = TrainParser  # subparsers are built as the top parser's class; this one dispatches `preview`
    train_parser(p)


def preset_and_file(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(--preset, --config): a preset's name given to --config (the old form) still works, with the notice."""
    from subjectdiff.train.config import PRESETS

    if args.config and args.config in PRESETS and not args.preset:
        deprecated(f"--config {args.config}", f"--preset {args.config}")
        return args.config, None
    return args.preset, args.config


def resolved_config(args: argparse.Namespace):
    import json

    from subjectdiff.catalogs.catalog import is_catalog_file
    from subjectdiff.train.config import load_config

    if "preview" in args.overrides:
        raise UsageError("`preview` is a subcommand: put it first, `subjectdiff train preview [options]`")
    if args.catalog and not is_catalog_file(args.catalog):
        deprecated(f"--catalog {args.catalog} (a shard folder)", "--catalog DIR/catalog.duckdb, or --records DIR")
    extra = []
    flags = [
        ("records", "data.shards"),
        ("selection", "data.selection"),
        ("catalog", "data.catalog"),
        ("where", "data.where"),
        ("object_where", "data.object_where"),
        ("pairs", "data.pairs"),
    ]
    if not args.preview:
        flags.append(("out", "run.out_dir"))
    for flag, key in flags:
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={json.dumps(value)}")
    preset, config_file = preset_and_file(args)
    return load_config(preset, [*args.overrides, *extra], arch=args.arch, config_file=config_file)


def run(args: argparse.Namespace) -> int:
    """Train, preview or print the config. Errors end the command as subjectdiff/errors.py says (a bad setting or
    record: one line, exit 2)."""
    cfg = resolved_config(args)
    if args.print_config:
        from subjectdiff.train.config import config_toml

        print(config_toml(cfg), end="")
        return 0
    if args.preview:
        if args.sample < 1:
            raise UsageError("train preview needs --sample N >= 1")
        from subjectdiff.train.preview import write_preview

        print(f"preview -> {write_preview(cfg, args.sample, args.out)}")
        return 0
    from subjectdiff.train.trainer import run as train_run

    train_run(cfg, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = TrainParser(
        prog="python -m subjectdiff.train",
        description="train Subject-Diffusion (torchrun for DDP)",
        usage="%(prog)s [preview] [options] [KEY=VALUE ...]",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    argv, debug = without_debug(sys.argv[1:] if argv is None else list(argv))
    args = train_parser(p).parse_args(argv)
    args.debug = debug
    return run_command(run, args, getattr(args, "command_name", "subjectdiff train"))
