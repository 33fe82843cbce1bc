"""`subjectdiff`: one command, one subcommand group per app.

Each app package exposes `cli.register(subparsers)`, which adds its subcommands and sets `func`
(args -> exit code) on each; apps are imported only when listed here, so `subjectdiff catalog ...`
never pays for importing torch models.

How every command ends (a user error's one line and exit 2, `--debug`, interrupts' 130/143) is
subjectdiff/errors.py's `run_command`, here for every subcommand at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from subjectdiff.errors import DEBUG_ENV, run_command, without_debug

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
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of a user error too, not only its one line; anywhere on the line (or {DEBUG_ENV}=1)",
    )
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
    argv, debug = without_debug(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args, command_name(args))


def command_name(args: argparse.Namespace) -> str:
    """'subjectdiff catalog', 'subjectdiff eval dreambench': the words an error line starts with (an app names a
    subcommand its own way with `set_defaults(command_name=...)`)."""
    return getattr(args, "command_name", None) or f"subjectdiff {args.command}"


if __name__ == "__main__":
    raise SystemExit(main())
