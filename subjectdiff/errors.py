"""How a command ends: the one home for user errors, interrupts and their exit statuses (docs/cli.md).

    status = run_command(args.func, args, "subjectdiff train")   # what the front door (and `-m subjectdiff.train`) do

A user error (a wrong flag, file, setting, record or SQL: `is_user_error`) prints one line on stderr, naming what
was wrong, and exits 2; `--debug` or SUBJECTDIFF_DEBUG=1 shows its traceback instead. Any other exception is a
bug and keeps its traceback. SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt, so `finally` blocks
and a datagen run's manifest see it) and exit 130 and 143, as a shell reports a process the signal ended.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from subjectdiff.catalogs.catalog import CatalogError
from subjectdiff.catalogs.catalog import one_line as catalog_one_line
from subjectdiff.catalogs.storage import StorageError

EXIT_USER_ERROR = 2
DEBUG_ENV = "SUBJECTDIFF_DEBUG"


class UsageError(ValueError):
    """A wrong flag, file or setting; the message says which and what is expected (one line)."""


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM (signum); its exit status is 128 + signum."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


# The signal interrupts() last turned into Interrupted. Code that catches it and raises a plain
# KeyboardInterrupt instead (Ray's ray.wait / ray.get, when the signal arrives while they block) loses its
# signum; this still knows it.
_received: int | None = None


# (name, debug) of the command run_command runs now: say_now prints as it would.
_command: tuple[str, bool] | None = None


def _signum(e: KeyboardInterrupt) -> int:
    return getattr(e, "signum", None) or _received or signal.SIGINT


def exit_status(e: KeyboardInterrupt) -> int:
    """130 for SIGINT (a plain KeyboardInterrupt too, unless interrupts() saw a SIGTERM), 143 for SIGTERM."""
    return 128 + _signum(e)


def signal_name(e: KeyboardInterrupt) -> str:
    """'SIGINT' (a plain KeyboardInterrupt too, unless interrupts() saw a SIGTERM) or 'SIGTERM'."""
    return signal.Signals(_signum(e)).name


def _raise_interrupted(signum: int, frame: Any) -> None:
    global _received
    _received = signum
    raise Interrupted(signum)


@contextmanager
def interrupts() -> Iterator[None]:
    """Within it, SIGINT and SIGTERM raise Interrupted in the main thread (elsewhere it does nothing); the
    handlers before it are restored after. Enter it again after anything that installs its own (ray.init makes
    SIGTERM a plain sys.exit)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    before = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def is_user_error(e: BaseException) -> bool:
    """An error the user caused and can fix from its message, not a bug. ValueError holds the settings'
    checks, unknown presets, overrides, TOML syntax, bad records (RecordError, BadRecordError) and sources
    (SourceError); FileNotFoundError a named file that is missing; CatalogError bad SQL or a missing catalog;
    a StorageError without a cause a setting (an unknown URL scheme, bad storage options), not an outage."""
    if isinstance(e, StorageError):
        return e.__cause__ is None
    return isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, CatalogError))


def one_line(e: BaseException) -> str:
    """An error's message as one line (catalogs.catalog.one_line: DuckDB's hints kept). An error re-raised from
    a DataLoader worker (its message holds the worker's traceback) is the traceback's last line, the original
    error."""
    text = str(e).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].strip()
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]  # str(KeyError) quotes its message
    return catalog_one_line(e)


def without_debug(argv: list[str]) -> tuple[list[str], bool]:
    """ARGV without `--debug`, wherever it stands (before or after the subcommand), and whether it was there."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def say_now(e: BaseException) -> None:
    """Print user error E's one line now rather than when it reaches run_command, and mark it said (run_command
    does not print it again). For a process that others may end first: torchrun stops every rank once one
    exits, so rank 0 says why it failed before it tells the other ranks to stop. A bug (its traceback),
    --debug, or no run_command: nothing now."""
    if _command is None or _command[1] or not is_user_error(e):
        return
    print(f"{_command[0]}: error: {one_line(e)}", file=sys.stderr, flush=True)
    e.said = True  # type: ignore[attr-defined]


def run_command(func: Callable[[Any], int | None], args: Any, name: str) -> int:
    """FUNC(ARGS) as a command named NAME: its exit status, or 2 after one line for a user error, or 130/143
    after one line for an interrupt; a bug's traceback stays. `args.debug` (or SUBJECTDIFF_DEBUG=1): every
    error's traceback."""
    global _command
    debug = bool(getattr(args, "debug", False)) or debugging()
    before, _command = _command, (name, debug)
    try:
        with interrupts():
            return int(func(args) or 0)
    except KeyboardInterrupt as e:
        print(f"{name}: interrupted ({signal_name(e)})", file=sys.stderr, flush=True)
        return exit_status(e)
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        if not getattr(e, "said", False):
            print(f"{name}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        _command = before
