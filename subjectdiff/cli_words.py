"""The command line's vocabulary, and how its old words keep working for one release (docs/cli.md).

    out = p.add_argument("--out", required=True, metavar="DIR", help="...")
    renamed(p, "--output", out)      # `--output X` still works, as `--out X`, after one notice on stderr

Every app's cli.py names its flags from the same words (`--out`, `--catalog FILE`, `--records DIR`,
`--preset NAME`, `--config FILE`); a word that changed stays for one release as a hidden alias that prints
one `deprecated` line, from here, so every notice reads alike and goes away in one release.
"""

from __future__ import annotations

import argparse
import os
import sys

REMOVED_IN = "0.3"  # the release that drops the deprecated words


def deprecated(old: str, new: str) -> None:
    """The one line a deprecated word prints on stderr, from rank 0 alone under torchrun (every rank parses the
    same command line: eight ranks would print it eight times)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"subjectdiff: {old} is deprecated; use {new} (it will be removed in {REMOVED_IN})", file=sys.stderr)


class _Renamed(argparse.Action):
    """An old flag: stores what its new flag would (same dest, appending when the new one appends), after one
    notice per parse (a repeated `--shards A --shards B` prints one line)."""

    def __init__(self, option_strings, dest, new: argparse.Action, **kwargs):
        super().__init__(
            option_strings, dest, nargs=new.nargs, type=new.type, metavar=new.metavar, help=argparse.SUPPRESS, **kwargs
        )
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        warned = getattr(namespace, "_deprecated_warned", set())
        if option_string not in warned:
            deprecated(option_string, self.new.option_strings[0])
            namespace._deprecated_warned = warned | {option_string}
        if isinstance(self.new, argparse._AppendAction):
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def renamed(p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: argparse.Action) -> None:
    """Keep OLD working as NEW (the action `add_argument` returned) for one release, hidden from --help.
    A required NEW is satisfied by either: put both in a required mutually exclusive group (`required_out`)."""
    p.add_argument(old, dest=new.dest, action=_Renamed, new=new)


def required_out(p: argparse.ArgumentParser, old: str | None = None, **kwargs) -> argparse.Action:
    """A required `--out`, and OLD (`--output`) renamed to it: either one must be given, not both."""
    group = p.add_mutually_exclusive_group(required=True)
    out = group.add_argument("--out", **kwargs)
    if old:
        renamed(group, old, out)
    return out
