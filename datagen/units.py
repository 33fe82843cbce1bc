"""Reading one unit of a plan, on any worker, in any order: a whole file, a byte range of a tar, or an image
cell of a Parquet row (datagen/sources.py makes the plan). Transient errors are retried; a unit that cannot
be read raises UnitReadError, whose message says in words what was read and why it failed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import fsspec
import numpy as np
import pyarrow.parquet as pq

_RETRY_DELAYS = (0.2, 0.8)  # seconds before read_unit's 2nd and 3rd attempts


def is_url(src: str) -> bool:
    """A URL, or an fsspec chained URL ("simplecache::s3://...")."""
    return "://" in src or "::" in src


def is_local(path: str) -> bool:
    return not is_url(path) or path.startswith(("file://", "local://"))


class UnitReadError(OSError):
    """One unit cannot be read. str(e) is the whole reason, for a user: what was read (file or URL, and
    the byte offset, or the row index and column), and what went wrong (the HTTP status, "no such file",
    the underlying exception's type and message)."""


def read_unit(path: str, offset: int, size: int, column: str | None = None) -> bytes:
    """The bytes of one unit (local or fsspec URL): the whole file PATH (offset -1); `size` bytes at
    `offset` of the tar PATH; or, with COLUMN, the image in that column at row index `offset` of the
    Parquet PATH (a binary cell, or a struct's `bytes`; a struct whose `bytes` is null is read from its
    `path`, relative to the Parquet's folder, when it has one).

    Transient errors (an OSError other than a missing file, a folder or a denied permission; an HTTP 5xx,
    408 or 429; a short read of a remote tar member) are retried, 3 attempts in all with 0.2 s and 0.8 s
    pauses. A local tar member cut short fails at once: it will not grow back. Any failure raises
    UnitReadError, whose message is the whole reason.

    Parquet rows are read one row group at a time: each process keeps the image column of the last row
    group it read (and the footers of the last few files), so the consecutive rows of a block cost one
    read of their row group, not one per row. That bounds the cache to one row group's images per process.
    """
    if column:
        return _CELLS.read(path, offset, column)
    if offset < 0:
        return _retry(lambda: _read_range(path, -1, -1), f"cannot read {path}", is_local(path))
    return _retry(lambda: _read_range(path, offset, size), f"cannot read {path} at byte {offset}", is_local(path))


class _ShortRead(OSError):
    """A tar member ended before its size."""


def _read_range(path: str, offset: int, size: int) -> bytes:
    with fsspec.open(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise _ShortRead(f"truncated tar member: read {len(data)} of {size} bytes")
    return data


_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _http_status(e: BaseException) -> tuple[int, str] | None:
    """(status, reason) of the HTTP response behind E or what caused it, if any: aiohttp's errors (fsspec's
    http filesystem, which raises FileNotFoundError from a 404) carry `status`, requests' (huggingface_hub)
    a `response`."""
    seen = 0
    while e is not None and seen < 5:
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return status, str(getattr(e, "message", "") or "")
        response = getattr(e, "response", None)
        if isinstance(getattr(response, "status_code", None), int):
            return response.status_code, str(getattr(response, "reason", "") or "")
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def describe(e: BaseException) -> str:
    """E in words for a failure reason: the HTTP status, a missing file, or `Type: message`."""
    http = _http_status(e)
    if http is not None:
        return f"HTTP {http[0]}" + (f": {http[1]}" if http[1] else "")
    for cls, words in ((FileNotFoundError, "no such file"), (IsADirectoryError, "a folder, not a file"),
                       (PermissionError, "permission denied")):
        if isinstance(e, cls):
            return words
    if isinstance(e, (UnitReadError, _ShortRead)):
        return str(e)
    msg = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split())  # one line, for the catalog
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _transient(e: BaseException, local: bool) -> bool:
    http = _http_status(e)
    if http is not None:
        return http[0] >= 500 or http[0] in (408, 429)
    if isinstance(e, _ShortRead):
        return not local
    return isinstance(e, OSError) and not isinstance(e, (*_PERMANENT, UnitReadError))


def _retry(fn: Callable[[], object], what: str | Callable[[], str], local: bool):
    """fn(), transient errors retried (see read_unit); UnitReadError("WHAT: reason") when it fails for
    good (WHAT may be a function, asked then). A UnitReadError raised by fn passes through as it is."""
    for attempt, delay in enumerate((*_RETRY_DELAYS, None), 1):
        try:
            return fn()
        except UnitReadError:
            raise
        except Exception as e:  # noqa: BLE001 (every failure to read a unit becomes its reason)
            if delay is None or not _transient(e, local):
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise UnitReadError(f"{what() if callable(what) else what}: {describe(e)}{tries}") from e
        time.sleep(delay)
    raise AssertionError("unreachable")


class _ParquetCells:
    """Cells of Parquet image columns, read one row group at a time (see read_unit).

    Kept per process: the footers of the last `footers` files, and the last row group read, as
    (file, its local mtime and size, column, first row, end row) -> the column's values, or the
    UnitReadError that reading it raised (so the other rows of a broken row group fail at once, with the
    same reason, rather than each re-reading it). A local file that changed since is read afresh; a URL is
    taken as unchanged during a run, as tar members at byte offsets are."""

    def __init__(self, footers: int = 8):
        self._lock = threading.Lock()  # one reader at a time per process: a second would read the same group
        self._footers: OrderedDict[tuple, pq.FileMetaData] = OrderedDict()
        self._max_footers = footers
        self._group: tuple | None = None  # (file key, column, first row, end row, values or error)

    def read(self, path: str, row: int, column: str) -> bytes:
        where = f"{path} row index {row}, column {column!r}"
        local = is_local(path)
        with self._lock:
            fkey = (path, _local_stamp(path) if local else None)
            g = self._group
            if g is None or g[:2] != (fkey, column) or not g[2] <= row < g[3]:
                g = self._group = self._load(path, fkey, row, column, where, local)
            first, values = g[2], g[4]
        if isinstance(values, UnitReadError):
            raise UnitReadError(f"{where}: {values}") from values.__cause__
        return _cell_image(path, where, values[row - first].as_py())

    def _load(self, path: str, fkey: tuple, row: int, column: str, where: str, local: bool) -> tuple:
        """Open the file once: its footer (unless kept), then the row group holding ROW."""
        found: dict = {}
        step = ["cannot read the file"]  # what failed, for the reason

        def read_group():
            with fsspec.open(path, "rb") as f:
                md = self._footers.get(fkey)
                pf = pq.ParquetFile(f, metadata=md)
                if md is None:
                    self._footers[fkey] = md = pf.metadata
                    while len(self._footers) > self._max_footers:
                        self._footers.popitem(last=False)
                self._footers.move_to_end(fkey)
                starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
                if not 0 <= row < starts[-1]:
                    raise UnitReadError(f"no such row; the file has {starts[-1]} rows")
                names = pf.schema_arrow.names
                if column not in names:
                    raise UnitReadError(f"no such column; its columns are {names}")
                i = int(np.searchsorted(starts, row, side="right")) - 1
                found.update(first=int(starts[i]), end=int(starts[i + 1]))
                step[0] = f"cannot read its row group {i} (row indices {found['first']} to {found['end'] - 1})"
                return pf.read_row_group(i, columns=[column]).column(0)

        try:
            values = _retry(read_group, lambda: step[0], local)
        except UnitReadError as e:
            if "first" not in found:  # no file, no such row or column: nothing to keep
                raise UnitReadError(f"{where}: {e}") from e.__cause__
            values = e
        return (fkey, column, found["first"], found["end"], values)


def _cell_image(path: str, where: str, cell) -> bytes:
    """A Parquet cell's image bytes: a binary cell, a struct's `bytes`, or the file its struct's `path` names
    when `bytes` is null (relative to the Parquet's folder, as a list's paths are)."""
    if cell is None:
        raise UnitReadError(f"{where}: the image is null")
    if not isinstance(cell, dict):
        return bytes(cell)
    if cell.get("bytes") is not None:
        return bytes(cell["bytes"])
    ref = cell.get("path")
    if not ref:
        raise UnitReadError(f"{where}: the image bytes are null and there is no path to read instead")
    url = str(ref)
    if not is_url(url) and not os.path.isabs(url):
        url = f"{path.rsplit('/', 1)[0]}/{url}" if is_url(path) else os.path.join(os.path.dirname(path), url)
    return _retry(lambda: _read_range(url, -1, -1),
                  f"{where}: the image bytes are null and its path {str(ref)!r} cannot be read", is_local(url))


def _local_stamp(path: str) -> tuple[int, int] | None:
    """(mtime ns, size) of a local file, None when it cannot be stat'ed (reading it will say why)."""
    try:
        st = os.stat(path.removeprefix("file://").removeprefix("local://"))
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


_CELLS = _ParquetCells()
