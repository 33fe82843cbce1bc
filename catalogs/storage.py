"""Where shards live: a local folder or any fsspec URL (`s3://`, `gs://`, `file://`, `memory://`, ...).

    folder = Folder("s3://bucket/sd-records")      # or "out/", "file:///data/out"
    folder.join("00000.tar")                         # "s3://bucket/sd-records/00000.tar"
    folder.listing()                                 # {"00000.tar": Entry(size, version), ...}, recursively
    folder.commit(local_file, "00000.tar")           # publish a finished file under its final name

Credentials and endpoints are fsspec's and the SDKs' own: s3fs reads the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, instance roles), gcsfs Google's; nothing is configured
here. `SUBJECTDIFF_STORAGE_OPTIONS` (a JSON object) adds fsspec storage options for every remote URL, for
the rare setting that has no environment variable. `storage_env()` is the part of the environment that says
where and how to reach storage: a datagen run hands it to its Ray workers, so a worker on another node
reaches the same endpoint with the same keys as the driver.

Publishing (`commit`) is where local folders and object stores differ. A local file is written under a
temporary name in the same folder and renamed into place (atomic on POSIX). An object store has no rename,
but a single PUT (or a completed multipart upload) is atomic: readers see no object or the whole object,
never a part. Either way a file appears under its final name only when complete; the order in which a
shard's files are published (its `_stats.json` last) then marks the shard complete (catalogs/writer.py).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

ENV_OPTIONS = "SUBJECTDIFF_STORAGE_OPTIONS"
ENV_CACHE = "SUBJECTDIFF_CACHE"
# Variables that configure storage clients: the AWS SDKs' and s3fs's (endpoint, region, keys, profile),
# fsspec's own (FSSPEC_<PROTOCOL>_<OPTION>), and ours.
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", ENV_OPTIONS)


class StorageError(OSError):
    """A folder or URL cannot be used; the message names it and says why."""


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
            return Path(s[len(scheme):])
    return Path(s)


def storage_options() -> dict[str, Any]:
    raw = os.environ.get(ENV_OPTIONS)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise StorageError(f"${ENV_OPTIONS} is not JSON: {e}") from None
    if not isinstance(opts, dict):
        raise StorageError(f"${ENV_OPTIONS} must be a JSON object, got {type(opts).__name__}")
    return opts


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment ({name: value} of STORAGE_ENV_PREFIXES)."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def filesystem(url: str | os.PathLike):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    s = os.fspath(url)
    if is_local(s):
        return LocalFileSystem(), str(local_path(s).absolute())
    try:
        return fsspec.core.url_to_fs(s, **storage_options())
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

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._p(name))

    def is_folder(self) -> bool:
        try:
            return bool(self.fs.isdir(self.path))
        except OSError as e:
            raise StorageError(f"{self.url} cannot be listed: {type(e).__name__}: {e}") from None

    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        # object stores have no folders: a prefix exists once an object is under it

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self._p(name), mode)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name, "rb") as f:
            return f.read()

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
            self.fs.pipe_file(self._p(name), data)

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
        self.fs.put_file(os.fspath(local_file), self._p(name))
        os.unlink(local_file)

    def remove(self, names: list[str]) -> None:
        """Delete NAMES; missing ones are fine."""
        for n in names:
            try:
                self.fs.rm_file(self._p(n))
            except FileNotFoundError:
                pass

    def listing(self, suffixes: tuple[str, ...] = ()) -> dict[str, Entry]:
        """Every file below this folder, recursively, by relative POSIX name (optionally only names ending in
        one of SUFFIXES). One listing call on object stores, no file opened."""
        if not self.is_folder():
            return {}
        self.fs.invalidate_cache(self.path)
        found = self.fs.find(self.path, detail=True)
        out: dict[str, Entry] = {}
        base = self.path.rstrip("/") + "/"
        for p, info in found.items():
            if info.get("type") == "directory":
                continue
            name = p[len(base):] if p.startswith(base) else p
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


def open_url(url: str | os.PathLike, mode: str = "rb"):
    """Open a local path or fsspec URL."""
    fs, path = filesystem(url)
    return fs.open(path, mode)


_RETRY_DELAYS = (0.5, 2.0, 8.0)  # seconds before the 2nd, 3rd and 4th attempt of a read


class RetryingReader(io.RawIOBase):
    """A sequential reader of URL that survives dropped connections: a read that raises OSError reopens the
    file and seeks back to where it was, up to len(delays) times in a row (object stores drop long reads now
    and then; a training epoch reads for hours). Missing files and denied permissions fail at once."""

    def __init__(self, url: str, delays: tuple[float, ...] = _RETRY_DELAYS):
        self.url, self.delays = url, delays
        self.pos = 0
        self._f = open_url(url, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        for delay in (*self.delays, None):
            try:
                if self._f is None:
                    self._f = open_url(self.url, "rb")
                    self._f.seek(self.pos)
                data = self._f.read(len(buf))
                break
            except (FileNotFoundError, PermissionError):
                raise
            except OSError:
                if delay is None:
                    raise
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
