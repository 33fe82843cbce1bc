"""`subjectdiff train` / `python -m train` / `torchrun --nproc_per_node=N -m train`: the trainer's command line.

    torchrun --nproc_per_node=8 -m train --config sd2-base data.shards=/data/shards run.out_dir=runs/a
    subjectdiff train --config tiny --shards out/ run.max_steps=20
    subjectdiff train --config my.toml --catalog out/ --where "n_objects >= 2" --resume latest

Overrides are KEY=VALUE over the TrainConfig tables (model., data., optim., loss., run.); with
`subjectdiff train` put them after the options. torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="sd2-base", help="a preset (tiny, sd2-base) or a TOML file")
    p.add_argument("--resume", default=None, help="'latest' (newest checkpoint of run.out_dir) or a checkpoint folder")
    p.add_argument("--shards", action="append", default=None,
                   help="shard folder, file or pattern (data.shards); repeatable")
    p.add_argument("--selection", default=None, help="a `catalog select` Parquet (data.selection)")
    p.add_argument("--catalog", default=None, help="shard folder holding catalog.duckdb, for --where")
    p.add_argument("--where", default=None, help="SQL predicate over the catalog's samples (data.where)")
    p.add_argument("--out", default=None, help="run.out_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train Subject-Diffusion on catalogued records (one process; torchrun for DDP)")
    add_arguments(p)
    p.set_defaults(func=run)


def resolved_config(args: argparse.Namespace):
    import json

    from train.config import load_config

    extra = []
    for flag, key in (("shards", "data.shards"), ("selection", "data.selection"), ("catalog", "data.catalog"),
                      ("where", "data.where"), ("out", "run.out_dir")):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={json.dumps(value)}")
    return load_config(args.config, [*args.overrides, *extra])


def run(args: argparse.Namespace) -> int:
    import json

    try:
        cfg = resolved_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"subjectdiff train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from train.trainer import run as train_run

    train_run(cfg, resume=args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train", description="train Subject-Diffusion (torchrun for DDP)")
    add_arguments(p)
    return run(p.parse_intermixed_args(argv))
