"""`subjectdiff`: one command, one subcommand group per app.

Each app package exposes `cli.register(subparsers)`, which adds its subcommands and sets `func`
(args -> exit code) on each; apps are imported only when listed here, so `subjectdiff catalog ...`
never pays for importing torch models.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module that registers them, the top-level subcommands it adds). A missing module is not offered.
APPS = [
    ("subjectdiff.catalogs.cli", ("catalog",)),
    ("subjectdiff.datagen.cli", ("datagen", "demo")),
    ("subjectdiff.train.cli", ("train",)),
    ("subjectdiff.infer.cli", ("generate", "eval", "export")),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subjectdiff",
        description="Subject-Diffusion: build grounded subject datasets, catalog them, train and generate.",
    )
    from subjectdiff import __version__

    parser.add_argument("--version", action="version", version=f"subjectdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv else None
    if wanted not in {c for _, commands in APPS for c in commands}:
        wanted = None  # --help, or a typo: offer every subcommand
    for module, commands in APPS:
        # Import only the app the user asked for (all of them for --help), keeping start-up fast.
        if wanted and wanted not in commands:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
