"""Where shards live: a local folder or any fsspec URL (`s3://`, `gs://`, `file://`, `memory://`, ...).

    folder = Folder("s3://bucket/sd-records")      # or "out/", "file:///data/out"
    folder.join("00000.tar")                         # "s3://bucket/sd-records/00000.tar"
    folder.listing()                                 # {"00000.tar": Entry(size, version), ...}, recursively
    folder.commit(local_file, "00000.tar")           # publish a finished file under its final name

Credentials and endpoints are fsspec's and the SDKs' own: s3fs reads the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, instance roles), gcsfs Google's; nothing is configured
here. `SUBJECTDIFF_STORAGE_OPTIONS` (a JSON object) adds fsspec storage options for every remote URL, or per
protocol ({"s3": {...}, "https": {...}}), for the rare setting that has no environment variable.
`storage_env()` is the part of the environment that says where and how to reach storage: a datagen run hands it
to its Ray workers, so a worker on another node reaches the same endpoint with the same keys as the driver.

Errors: `transient(e)` says whether an error may pass on another try (a connection reset, a response cut
mid-body, a timeout, throttling or a server error), by what the error is rather than where it was raised, so
every reader and writer of the project retries the same things; `describe(e)` puts an error in stable words
for a failure reason (no byte counts, addresses or request ids, so reasons group), `detail(e)` adds the
error's own message for logs. A remote folder's operations are retried on transient errors (`RETRY_DELAYS`,
$SUBJECTDIFF_STORAGE_RETRY_DELAYS), on top of the client's own retries (botocore's `AWS_MAX_ATTEMPTS`, s3fs's
`retries` storage option); an operation that still fails raises StorageError, one line naming the URL and the
error.

Publishing (`commit`) is where local folders and object stores differ. A local file is written under a
temporary name in the same folder and renamed into place (atomic on POSIX). An object store has no rename,
but a single PUT (or a completed multipart upload) is atomic: readers see no object or the whole object,
never a part. Either way a file appears under its final name only when complete; the order in which a
shard's files are published (its `_stats.json` last) then marks the shard complete (catalogs/writer.py).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENV_OPTIONS = "SUBJECTDIFF_STORAGE_OPTIONS"
ENV_CACHE = "SUBJECTDIFF_CACHE"
ENV_RETRY_DELAYS = "SUBJECTDIFF_STORAGE_RETRY_DELAYS"
# Variables that configure storage clients: the AWS SDKs' and s3fs's (endpoint, region, keys, profile),
# fsspec's own (FSSPEC_<PROTOCOL>_<OPTION>), and ours (options, retry delays).
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", ENV_OPTIONS, ENV_RETRY_DELAYS)

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """A folder or URL cannot be used; the message names it and says why. Raised once retries are spent (or
    for a setting that no retry can fix), so it is never transient itself."""


# ---------------------------------------------------------------------------------------------- errors


def _retry_delays(default: tuple[float, ...] = (0.5, 2.0, 8.0)) -> tuple[float, ...]:
    """Seconds before the 2nd, 3rd, ... attempt of a remote operation: $SUBJECTDIFF_STORAGE_RETRY_DELAYS
    ("0.5,2,8": one more attempt than delays), else DEFAULT. Read once, at import, in every process (the
    driver, its subprocesses and Ray workers inherit it; `storage_env` hands it to other nodes)."""
    text = os.environ.get(ENV_RETRY_DELAYS, "").strip()
    if not text:
        return default
    try:
        delays = tuple(float(x) for x in text.split(","))
    except ValueError:
        delays = (-1.0,)
    if any(not d >= 0 for d in delays):
        raise ValueError(f"${ENV_RETRY_DELAYS}={text!r}: expected seconds >= 0 separated by commas, e.g. 0.5,2,8")
    return delays


RETRY_DELAYS = _retry_delays()

# Errors that mean the request should not be repeated as it is: a missing object, a folder, no access.
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError, StorageError)
_PERMANENT_WORDS = (
    (FileNotFoundError, "no such file"),
    (IsADirectoryError, "a folder, not a file"),
    (NotADirectoryError, "not a folder"),
    (PermissionError, "permission denied"),
    (FileExistsError, "already exists"),
)
# OSErrors without an HTTP status that no retry fixes (a full disk, a read-only mount, an invalid argument).
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EINVAL, errno.ENAMETOOLONG, errno.ENOSYS, errno.EDQUOT}
# S3 error codes worth another try whatever their status (RequestTimeout comes as HTTP 400).
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}
# Network errors by kind, as the clients under fsspec name them (aiohttp: s3fs, gcsfs, http; botocore;
# requests and urllib3: huggingface_hub; the standard library). Matched by class name along the class
# hierarchy, so that none of these optional libraries is imported here. Tried in order: a more precise
# kind first (aiohttp's ServerTimeoutError is also a ServerConnectionError).
_NETWORK_KINDS = (
    (
        "connection lost mid-response",
        {
            "ClientPayloadError",
            "ContentLengthError",
            "TransferEncodingError",
            "IncompleteRead",
            "IncompleteReadError",
            "ResponseStreamingError",
            "ChunkedEncodingError",
            "ProtocolError",
        },
    ),
    (
        "timed out",
        {
            "TimeoutError",
            "timeout",
            "ServerTimeoutError",
            "ReadTimeoutError",
            "ConnectTimeoutError",
            "FSTimeoutError",
            "Timeout",
        },
    ),
    ("server disconnected", {"ServerDisconnectedError", "RemoteDisconnected", "ConnectionClosedError"}),
    ("connection reset", {"ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError"}),
    (
        "cannot connect",
        {"ConnectionRefusedError", "ClientConnectorError", "EndpointConnectionError", "NewConnectionError"},
    ),
    ("connection error", {"ConnectionError", "ClientConnectionError", "ClientOSError", "HTTPClientError"}),
)


def _chain(e: BaseException) -> list[BaseException]:
    """E and what caused it (`raise ... from`, and Ray's `cause`: a remote task's own error). Not
    `__context__`: an error raised while another was handled is not caused by it."""
    out: list[BaseException] = []
    while e is not None and len(out) < 8 and all(e is not x for x in out):
        out.append(e)
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else e.__cause__
    return out


def _http(chain: list[BaseException]) -> tuple[int, str] | None:
    """(status, S3 error code or reason phrase) of the HTTP response behind the errors of CHAIN, if any:
    aiohttp's errors carry `status` and `message`, botocore's a `response` dict, requests' a `response`."""
    for e in chain:
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return status, str(getattr(e, "message", "") or "")
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "ResponseMetadata" in response:
            meta, error = response.get("ResponseMetadata") or {}, response.get("Error") or {}
            if isinstance(meta.get("HTTPStatusCode"), int):
                return meta["HTTPStatusCode"], str(error.get("Code") or "")
        if isinstance(getattr(response, "status_code", None), int):
            return response.status_code, str(getattr(response, "reason", "") or "")
    return None


def _network_kind(chain: list[BaseException]) -> str | None:
    names = [{c.__name__ for c in type(e).__mro__} for e in chain]
    for words, kinds in _NETWORK_KINDS:
        if any(kinds & n for n in names):
            return words
    return None


def transient(e: BaseException) -> bool:
    """Whether E may pass on another try: throttling and server errors (HTTP 429, 503 SlowDown, 408, 5xx,
    S3's RequestTimeout), a connection reset, refused or closed, a response cut mid-body (aiohttp's
    ClientPayloadError), a timeout, or any other OSError but a missing file, a folder, a denied permission
    or a full or read-only disk. Everything else (a 4xx, a bug, a StorageError whose retries are spent) is
    permanent."""
    if isinstance(e, _PERMANENT):
        return False
    chain = _chain(e)
    http = _http(chain)
    if http is not None:
        return http[0] >= 500 or http[0] in (408, 429) or http[1] in _RETRY_CODES
    if _network_kind(chain) is not None:
        return True
    return isinstance(e, OSError) and e.errno not in _PERMANENT_ERRNOS


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def detail(e: BaseException) -> str:
    """E in one line for a user or a log: the HTTP status and error code (or reason phrase), a missing file
    or denied permission in words, else `Type: message` (with whatever the message names: sizes, addresses,
    request ids)."""
    http = _http(_chain(e))
    if http is not None:
        return f"HTTP {http[0]}" + (f": {http[1]}" if http[1] and http[1] != str(http[0]) else "")
    for cls, words in _PERMANENT_WORDS:
        if isinstance(e, cls):
            return words
    msg = _one_line(str(e))
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def describe(e: BaseException) -> str:
    """E in stable words, for a failure reason that groups with others of its kind: `detail` without what
    varies from one request to the next. A network error is its kind ("connection lost mid-response",
    "timed out", ...); an OSError its error text without the file name; anything else `Type: message`."""
    chain = _chain(e)
    if any(isinstance(e, cls) for cls, _ in _PERMANENT_WORDS) or _http(chain) is not None:
        return detail(e)
    kind = _network_kind(chain)
    if kind is not None:
        return kind
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {_one_line(e.strerror)}"
    return detail(e)


def retrying(fn: Callable[[], T], what: str, delays: tuple[float, ...] = RETRY_DELAYS) -> T:
    """fn(), with transient errors retried after DELAYS; once they are spent, StorageError("WHAT: error
    (after N attempts)"). Permanent errors pass through as they are (FileNotFoundError stays itself)."""
    for attempt, delay in enumerate((*delays, None), 1):
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            if delay is None:
                raise StorageError(f"{what}: {detail(e)} (after {attempt} attempts)") from e
            log.info("%s: %s; retrying in %.1f s", what, detail(e), delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def is_url(spec: str | os.PathLike) -> bool:
    return "://" in os.fspath(spec)


def is_local(spec: str | os.PathLike) -> bool:
    """A local path or a file:// URL."""
    s = os.fspath(spec)
    return not is_url(s) or s.startswith(("file://", "local://"))


def local_path(spec: str | os.PathLike) -> Path:
    """The local path of a local path or file:// URL."""
    s = os.fspath(spec)
    for scheme in ("file://", "local://"):
        if s.startswith(scheme):
            return Path(s[len(scheme) :])
    return Path(s)


def storage_options(protocol: str) -> dict[str, Any]:
    """$SUBJECTDIFF_STORAGE_OPTIONS for PROTOCOL ("s3", "https", ...). The JSON object is either options for every
    remote protocol ({"endpoint_url": "..."}) or options per protocol, keyed by fsspec's protocol names
    ({"s3": {"endpoint_url": "..."}, "gs": {"project": "..."}}): a run that reads records from a bucket and
    checkpoints over https must not hand the bucket's endpoint_url to https."""
    raw = os.environ.get(ENV_OPTIONS)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise StorageError(f"${ENV_OPTIONS} is not JSON: {e}") from None
    if not isinstance(opts, dict):
        raise StorageError(f"${ENV_OPTIONS} must be a JSON object, got {type(opts).__name__}")
    if not _per_protocol(opts):
        return opts
    return dict(opts.get(protocol, {}))


def _per_protocol(opts: dict[str, Any]) -> bool:
    """Whether OPTS is keyed by protocol: every key one fsspec knows, every value an object."""
    known = set(fsspec.available_protocols())
    return bool(opts) and all(k in known and isinstance(v, dict) for k, v in opts.items())


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment ({name: value} of STORAGE_ENV_PREFIXES)."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def _url_options(url: str) -> dict[str, Any]:
    """The storage options for URL: $SUBJECTDIFF_STORAGE_OPTIONS for its protocol, given to the storage itself. In
    a chained URL ("simplecache::s3://b/k") that is the last protocol, not the cache in front of it (which fsspec
    would otherwise give them to)."""
    protocol = url.rsplit("::", 1)[-1].split("://", 1)[0]
    opts = storage_options(protocol)
    if "::" not in url or not opts:
        return opts
    return {protocol: opts}


def filesystem(url: str | os.PathLike):
    """(fsspec filesystem, path inside it) for a URL or local path: the project's one way into fsspec, so that
    every reader and writer (outputs, datagen inputs, checkpoint URLs) gets $SUBJECTDIFF_STORAGE_OPTIONS."""
    s = os.fspath(url)
    if is_local(s):
        return LocalFileSystem(), str(local_path(s).absolute())
    try:
        return fsspec.core.url_to_fs(s, **_url_options(s))
    except (ImportError, ValueError) as e:
        raise StorageError(f"{s}: fsspec cannot open this URL ({e})") from None


def cache_root() -> Path:
    """$SUBJECTDIFF_CACHE, else ~/.cache/subjectdiff: checkpoints, and the catalogs of remote outputs."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "subjectdiff").expanduser()


@dataclass(frozen=True)
class Entry:
    """One file of a listing. version: the object's ETag on object stores, its mtime locally: with the size,
    what tells a changed file from an unchanged one without opening it."""

    size: int
    version: str


class Folder:
    """A folder on the local disk or in an object store, addressed by names relative to it."""

    def __init__(self, url: str | os.PathLike):
        s = os.fspath(url)
        self.local = is_local(s)
        if self.local:
            self.path = str(local_path(s).absolute()).rstrip("/") or "/"
            self.url = self.path
        else:
            self.url = s.rstrip("/")
        self.fs, fs_path = filesystem(self.url)
        if not self.local:
            self.path = fs_path.rstrip("/")

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def join(self, name: str) -> str:
        """The URL (or absolute local path) of NAME in this folder."""
        return os.path.join(self.url, name) if self.local else f"{self.url}/{name}"

    def _p(self, name: str) -> str:
        return posixpath.join(self.path, name) if not self.local else os.path.join(self.path, name)

    def _retrying(self, fn: Callable[[], T], what: str) -> T:
        """fn(), its transient errors retried when this folder is remote (`retrying`); a local disk's errors
        are not the network's, and are raised at once."""
        return fn() if self.local else retrying(fn, what)

    def exists(self, name: str) -> bool:
        return self._retrying(lambda: self.fs.exists(self._p(name)), f"cannot reach {self.join(name)}")

    def is_folder(self) -> bool:
        try:
            return bool(self._retrying(lambda: self.fs.isdir(self.path), f"cannot list {self.url}"))
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"{self.url} cannot be listed: {detail(e)}") from None

    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        # object stores have no folders: a prefix exists once an object is under it

    def open(self, name: str, mode: str = "rb"):
        return self._retrying(lambda: self.fs.open(self._p(name), mode), f"cannot open {self.join(name)}")

    def read_bytes(self, name: str) -> bytes:
        def read() -> bytes:
            with self.fs.open(self._p(name), "rb") as f:
                return f.read()

        return self._retrying(read, f"cannot read {self.join(name)}")

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_text(self, name: str, text: str) -> None:
        """Write NAME whole: renamed into place locally, one PUT remotely (readers never see a part)."""
        data = text.encode("utf-8")
        if self.local:
            tmp = self._p(name) + ".tmp"
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._p(name))
        else:
            retrying(lambda: self.fs.pipe_file(self._p(name), data), f"cannot write {self.join(name)}")

    def commit(self, local_file: str | os.PathLike, name: str) -> None:
        """Publish a finished local file as NAME (see the module docstring): a rename for a local folder
        (LOCAL_FILE should then be in the same folder), an upload for an object store. The local file is gone
        afterwards."""
        if self.local:
            target = self._p(name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.replace(local_file, target)
            except OSError:  # another file system (a spool folder elsewhere): copy beside, then rename
                tmp = target + ".tmp"
                shutil.copyfile(local_file, tmp)
                os.replace(tmp, target)
                os.unlink(local_file)
            return
        retrying(lambda: self.fs.put_file(os.fspath(local_file), self._p(name)), f"cannot upload {self.join(name)}")
        os.unlink(local_file)

    def remove(self, names: list[str]) -> None:
        """Delete NAMES; missing ones are fine."""
        for n in names:
            try:
                self._retrying(lambda n=n: self.fs.rm_file(self._p(n)), f"cannot delete {self.join(n)}")
            except FileNotFoundError:
                pass

    def listing(self, suffixes: tuple[str, ...] = ()) -> dict[str, Entry]:
        """Every file below this folder, recursively, by relative POSIX name (optionally only names ending in
        one of SUFFIXES). One listing call on object stores, no file opened."""
        if not self.is_folder():
            return {}
        self.fs.invalidate_cache(self.path)
        found = self._retrying(lambda: self.fs.find(self.path, detail=True), f"cannot list {self.url}")
        # A listing is a snapshot for its caller, not a cache: s3fs would open a file rewritten since with the
        # listed ETag, and fail (FileExpired).
        self.fs.invalidate_cache(self.path)
        out: dict[str, Entry] = {}
        base = self.path.rstrip("/") + "/"
        for p, info in found.items():
            if info.get("type") == "directory":
                continue
            name = p[len(base) :] if p.startswith(base) else p
            if self.local:
                name = name.replace(os.sep, "/")
            if suffixes and not name.endswith(suffixes):
                continue
            out[name] = Entry(int(info.get("size") or 0), _version(info))
        return out


def _version(info: dict[str, Any]) -> str:
    for k in ("ETag", "etag", "md5Hash", "generation"):
        if info.get(k):
            return str(info[k]).strip('"')
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


def row_group_batches(pf, batch_size: int, columns: list[str] | None = None):
    """The record batches of the pyarrow ParquetFile PF, one row group at a time. Over a whole file, pyarrow 26's
    iter_batches pre-buffers every column chunk it will read (memory grew with the file: ~400 MB over a 12M-row
    plan, ~23 GB over a 24 GB pairs file; cf. apache/arrow#39808); per row group it stays at one group."""
    for i in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_size, row_groups=[i], columns=columns)


def open_url(url: str | os.PathLike, mode: str = "rb"):
    """Open a local path or fsspec URL (through `filesystem`, so with the project's storage options)."""
    fs, path = filesystem(url)
    return fs.open(path, mode)


class RetryingReader(io.RawIOBase):
    """A sequential reader of URL that survives dropped connections: a read that fails with a transient
    error (`transient`: a reset, a response cut mid-body, throttling) reopens the file and seeks back to
    where it was, up to len(delays) times in a row (object stores drop long reads now and then; a training
    epoch reads for hours), then raises StorageError. Missing files and denied permissions fail at once."""

    def __init__(self, url: str, delays: tuple[float, ...] = RETRY_DELAYS):
        self.url, self.delays = url, delays
        self.pos = 0
        self._f = open_url(url, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        for attempt, delay in enumerate((*self.delays, None), 1):
            try:
                if self._f is None:
                    self._f = open_url(self.url, "rb")
                    self._f.seek(self.pos)
                data = self._f.read(len(buf))
                break
            except Exception as e:
                if not transient(e):
                    raise
                if delay is None:
                    raise StorageError(
                        f"cannot read {self.url} at byte {self.pos}: {detail(e)} (after {attempt} attempts)"
                    ) from e
                self._close_inner()
                time.sleep(delay)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _close_inner(self) -> None:
        try:
            if self._f is not None:
                self._f.close()
        except OSError:
            pass
        self._f = None

    def close(self) -> None:
        self._close_inner()
        super().close()
