"""`subjectdiff train` / `python -m subjectdiff.train` / `torchrun --nproc_per_node=N -m subjectdiff.train`: the trainer's command line.

    torchrun --nproc_per_node=8 -m subjectdiff.train --config sd2-base data.shards=/data/shards run.out_dir=runs/a
    subjectdiff train --config tiny --shards out/ run.max_steps=20
    subjectdiff train --config my.toml --catalog out/ --where "n_objects >= 2" --object-where reference --resume latest
    subjectdiff train preview --config paper --shards out/ --n 16 --out preview/     # what the trainer would feed
    subjectdiff train --config paper --model tiny --catalog out/ run.max_steps=20      # the paper's recipe, tiny

Overrides are KEY=VALUE over the TrainConfig tables (model., data., optim., loss., run.), anywhere among the
options. torch is imported only when the command runs (`train preview` builds no model).
"""

from __future__ import annotations

import argparse
import sys


class IntermixedParser(argparse.ArgumentParser):
    """`train`'s parser: KEY=VALUE overrides (and the word `preview`) may stand anywhere among the options.
    argparse's plain parsing binds the positionals to the first run of them and rejects later ones."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back in: parse plainly there
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="sd2-base", help="a preset (tiny, sd2-base, paper) or a TOML file")
    p.add_argument("--model", default=None, choices=["tiny", "sd2-base"],
                   help="run the config on this model preset at its native resolution (`--config paper --model "
                        "tiny`: the paper's data, loss and schedule on a CPU)")
    p.add_argument("--resume", default=None, help="'latest' (newest checkpoint of run.out_dir) or a checkpoint folder")
    p.add_argument("--shards", action="append", default=None,
                   help="shard folder, file or pattern (data.shards); repeatable")
    p.add_argument("--selection", default=None, help="a `catalog select` Parquet (data.selection)")
    p.add_argument("--catalog", default=None,
                   help="shard folder (or URL) whose catalog selects the records: all of them, or those --where / "
                        "--object-where select (data.catalog)")
    p.add_argument("--where", default=None, help="SQL predicate over the catalog's samples (data.where)")
    p.add_argument("--object-where", default=None,
                   help="SQL predicate over the catalog's objects: the subjects are chosen among the objects it "
                        "keeps (data.object_where; 'reference' = the reference code's object rules)")
    p.add_argument("--out", default=None, help="run.out_dir (with preview: the folder of the page)")
    p.add_argument("--n", type=int, default=16, help="preview: how many samples (default 16)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", metavar="[preview] KEY=VALUE",
                   help="`preview` first: write what the trainer would feed (HTML + samples.jsonl) to --out")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train Subject-Diffusion on catalogued records (one process; torchrun for DDP); "
                                     "`train preview`: what it would feed")
    p.__class__ = IntermixedParser  # subparsers are built as the top parser's class; this one takes intermixed args
    add_arguments(p)
    p.set_defaults(func=run)


def resolved_config(args: argparse.Namespace):
    import json

    from subjectdiff.train.config import load_config

    extra = []
    flags = [("shards", "data.shards"), ("selection", "data.selection"), ("catalog", "data.catalog"),
             ("where", "data.where"), ("object_where", "data.object_where")]
    if not args.preview:
        flags.append(("out", "run.out_dir"))
    for flag, key in flags:
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={json.dumps(value)}")
    return load_config(args.config, [*args.overrides, *extra], model=args.model)


def one_line(e: BaseException) -> str:
    """An error as one line: its message's first line, or for an error re-raised from a DataLoader worker (whose
    message holds the worker's traceback) the traceback's last line, the original error."""
    text = str(e).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def run(args: argparse.Namespace) -> int:
    import json
    import os

    args.preview = args.overrides[:1] == ["preview"]
    if args.preview:
        args.overrides = args.overrides[1:]
    name = f"subjectdiff train{' preview' if args.preview else ''}"
    try:
        cfg = resolved_config(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if args.preview:
            if not args.out or args.n < 1:
                raise ValueError("train preview needs --out DIR (the page's folder) and --n >= 1")
            from subjectdiff.train.preview import write_preview

            print(f"preview -> {write_preview(cfg, args.n, args.out)}")
            return 0
        from subjectdiff.train.trainer import run as train_run

        train_run(cfg, resume=args.resume)
        return 0
    except (ValueError, FileNotFoundError) as e:  # bad settings or data: the message says what to change
        print(f"{name}: error: {e}" if "Original Traceback" not in str(e) else f"{name}: error: {one_line(e)}",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line by default; the traceback on request
        if os.environ.get("SUBJECTDIFF_TRACEBACK"):
            raise
        print(f"{name}: error: {one_line(e)} (set SUBJECTDIFF_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    p = IntermixedParser(prog="python -m subjectdiff.train", description="train Subject-Diffusion (torchrun for DDP)")
    add_arguments(p)
    return run(p.parse_args(argv))
