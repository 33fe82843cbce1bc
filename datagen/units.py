"""Reading one unit of a plan, on any worker, in any order: a whole file, a byte range of a tar, or an image
cell of a Parquet row (datagen/sources.py makes the plan). Transient errors (catalogs.storage.transient) are
retried; a unit that cannot be read raises UnitReadError, whose message says in words what was read and why
it failed, and whose `reason` says why in words that group (what a failure records).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq

from subjectdiff.catalogs import storage

_RETRY_DELAYS = (0.2, 0.8)  # seconds before read_unit's 2nd and 3rd attempts


def is_url(src: str) -> bool:
    """A URL, or an fsspec chained URL ("simplecache::s3://...")."""
    return "://" in src or "::" in src


def is_local(path: str) -> bool:
    return not is_url(path) or path.startswith(("file://", "local://"))


class UnitReadError(OSError):
    """One unit cannot be read. str(e) is the whole story, for a user and the log: what was read (file or
    URL, and the byte offset, or the row index and column), and what went wrong (the HTTP status, "no such
    file", the underlying exception's type and message). `reason` is the same without what varies from unit
    to unit (addresses, offsets, row indices, byte counts): the failure reason, so that `GROUP BY reason`
    counts a bucket's throttling once, not once per object."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self):  # two arguments: pickled (to and from Ray workers) as it was made
        return type(self), (str(self), self.reason)


def read_unit(path: str, offset: int, size: int, column: str | None = None) -> bytes:
    """The bytes of one unit (local or fsspec URL): the whole file PATH (offset -1); `size` bytes at
    `offset` of the tar PATH; or, with COLUMN, the image in that column at row index `offset` of the
    Parquet PATH (a binary cell, or a struct's `bytes`; a struct whose `bytes` is null is read from its
    `path`, relative to the Parquet's folder, when it has one).

    Transient errors (catalogs.storage.transient: a connection reset, a response cut mid-body, a timeout,
    throttling, an HTTP 5xx; and a short read of a remote tar member) are retried, 3 attempts in all with
    0.2 s and 0.8 s pauses, on top of the storage client's own retries. A local tar member cut short fails
    at once: it will not grow back. Any failure raises UnitReadError (see there).

    Parquet rows are read one row group at a time: each process keeps the image column of the last row
    group it read (and the footers of the last few files), so the consecutive rows of a block cost one
    read of their row group, not one per row. That bounds the cache to one row group's images per process.
    """
    if column:
        return _CELLS.read(path, offset, column)
    if offset < 0:
        return _retry(
            lambda: _read_range(path, -1, -1), (f"cannot read {path}", "cannot read the image"), is_local(path)
        )
    return _retry(
        lambda: _read_range(path, offset, size),
        (f"cannot read {path} at byte {offset}", "cannot read the tar member"),
        is_local(path),
    )


SPOOL_CHUNK = 8 << 20  # bytes copied at a time by spool_unit


def spool_unit(path: str, offset: int, size: int, dest: str) -> None:
    """Copy one unit (a whole file, offset -1; or `size` bytes at `offset` of a tar) to the local file DEST,
    SPOOL_CHUNK bytes at a time: what read_unit reads, without holding it in memory (a long video). Retried
    and failing as read_unit does."""
    what = (
        (f"cannot read {path}", "cannot read the video")
        if offset < 0
        else (
            f"cannot read {path} at byte {offset}",
            "cannot read the tar member",
        )
    )
    _retry(lambda: _copy_range(path, offset, size, dest), what, is_local(path))


def _copy_range(path: str, offset: int, size: int, dest: str) -> None:
    left = size if offset >= 0 else -1
    with storage.open_url(path, "rb") as f, open(dest, "wb") as out:
        if offset >= 0:
            f.seek(offset)
        while left != 0:
            chunk = f.read(SPOOL_CHUNK if left < 0 else min(SPOOL_CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk) if left > 0 else 0
    if left > 0:
        raise _ShortRead(f"{path}: the tar member at byte {offset} ends {left} bytes short of its {size}")


class _ShortRead(OSError):
    """A tar member ended before its size (str: with the sizes; `reason`: without)."""

    reason = "truncated tar member"


def _read_range(path: str, offset: int, size: int) -> bytes:
    with storage.open_url(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise _ShortRead(f"truncated tar member: read {len(data)} of {size} bytes")
    return data


def describe(e: BaseException) -> str:
    """E in stable words, for a failure reason (catalogs.storage.describe; a short read without its sizes)."""
    if isinstance(e, (UnitReadError, _ShortRead)):
        return e.reason
    return storage.describe(e)


def _detail(e: BaseException) -> str:
    """E in one line with its particulars, for the message (catalogs.storage.detail)."""
    return str(e) if isinstance(e, (UnitReadError, _ShortRead)) else storage.detail(e)


def _transient(e: BaseException, local: bool) -> bool:
    if isinstance(e, _ShortRead):
        return not local
    return not isinstance(e, UnitReadError) and storage.transient(e)


def _retry(fn: Callable[[], object], what: tuple[str, str] | Callable[[], tuple[str, str]], local: bool):
    """fn(), transient errors retried (see read_unit); when it fails for good, UnitReadError with message
    "WHAT[0]: error" and reason "WHAT[1]: error in stable words" (WHAT may be a function, asked then). A
    UnitReadError raised by fn passes through as it is."""
    for attempt, delay in enumerate((*_RETRY_DELAYS, None), 1):
        try:
            return fn()
        except UnitReadError:
            raise
        except Exception as e:
            if delay is None or not _transient(e, local):
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                where, why = what() if callable(what) else what
                raise UnitReadError(f"{where}: {_detail(e)}{tries}", f"{why}: {describe(e)}{tries}") from e
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
            raise UnitReadError(f"{where}: {values}", values.reason) from values.__cause__
        return _cell_image(path, where, values[row - first].as_py())

    def _load(self, path: str, fkey: tuple, row: int, column: str, where: str, local: bool) -> tuple:
        """Open the file once: its footer (unless kept), then the row group holding ROW."""
        found: dict = {}
        step = [("cannot read the file", "cannot read the file")]  # what failed: for the message, the reason

        def read_group():
            with storage.open_url(path, "rb") as f:
                md = self._footers.get(fkey)
                pf = pq.ParquetFile(f, metadata=md)
                if md is None:
                    self._footers[fkey] = md = pf.metadata
                    while len(self._footers) > self._max_footers:
                        self._footers.popitem(last=False)
                self._footers.move_to_end(fkey)
                starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
                if not 0 <= row < starts[-1]:
                    raise UnitReadError(f"no such row; the file has {starts[-1]} rows", "no such row")
                names = pf.schema_arrow.names
                if column not in names:
                    raise UnitReadError(f"no such column; its columns are {names}", "no such column")
                i = int(np.searchsorted(starts, row, side="right")) - 1
                found.update(first=int(starts[i]), end=int(starts[i + 1]))
                step[0] = (
                    f"cannot read its row group {i} (row indices {found['first']} to {found['end'] - 1})",
                    "cannot read its row group",
                )
                return pf.read_row_group(i, columns=[column]).column(0)

        try:
            values = _retry(read_group, lambda: step[0], local)
        except UnitReadError as e:
            if "first" not in found:  # no file, no such row or column: nothing to keep
                raise UnitReadError(f"{where}: {e}", e.reason) from e.__cause__
            values = e
        return (fkey, column, found["first"], found["end"], values)


def _cell_image(path: str, where: str, cell) -> bytes:
    """A Parquet cell's image bytes: a binary cell, a struct's `bytes`, or the file its struct's `path` names
    when `bytes` is null (relative to the Parquet's folder, as a list's paths are)."""
    if cell is None:
        raise UnitReadError(f"{where}: the image is null", "the image is null")
    if not isinstance(cell, dict):
        return bytes(cell)
    if cell.get("bytes") is not None:
        return bytes(cell["bytes"])
    ref = cell.get("path")
    if not ref:
        why = "the image bytes are null and there is no path to read instead"
        raise UnitReadError(f"{where}: {why}", why)
    url = str(ref)
    if not is_url(url) and not os.path.isabs(url):
        url = f"{path.rsplit('/', 1)[0]}/{url}" if is_url(path) else os.path.join(os.path.dirname(path), url)
    return _retry(
        lambda: _read_range(url, -1, -1),
        (
            f"{where}: the image bytes are null and its path {str(ref)!r} cannot be read",
            "the image bytes are null and its path cannot be read",
        ),
        is_local(url),
    )


def _local_stamp(path: str) -> tuple[int, int] | None:
    """(mtime ns, size) of a local file, None when it cannot be stat'ed (reading it will say why)."""
    try:
        st = os.stat(path.removeprefix("file://").removeprefix("local://"))
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


_CELLS = _ParquetCells()
