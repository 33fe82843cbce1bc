"""The DuckDB catalog of a shard folder: SQL over samples, objects, shards and failures.

The folder is local or any fsspec URL (`s3://bucket/out`); the catalog is always a local DuckDB file:
DIR/catalog.duckdb for a local folder, a file in the cache for a remote one (`catalog_path`), or any path
given as `catalog=` (`--catalog PATH`). It is built from the shards' Parquet sidecars and `_stats.json` files
(never from the tars, read through pyarrow and fsspec, not DuckDB's httpfs), so building is cheap and
incremental: one listing tells new and changed shards (size and ETag or mtime of their four files) from
unchanged ones, only those are read, shards that disappeared are dropped, and building twice changes nothing.

Tables (see docs/records.md for every column):
    samples(key, shard, idx, caption, alt_text, width, height, n_objects, source, image_ext, image_bytes, ...,
            sha256, phash, clip_score, alt_clip_score, aesthetic, white_fraction,
            video, video_shot, video_frame, video_time, sample_id)
    objects(key, shard, index, label, phrase, span_start, span_end, tokens, score, x0, y0, x1, y1,
            area, aspect, mask_area, mask_fill, containment, mask_score, label_score, label_rank, sample_id)
    shards(name, path, n_ok, n_failed, n_objects, bytes, start_time, end_time, duration, fingerprint, first_id)
    failures(key, shard, idx, source, stage, reason, video, video_frame, video_shot)
    videos (a view: one row per video input) (video, shard, frames, frames_ok, frames_failed, shots, status, reason)
    bad_shards(name, file, reason, detail, seen_at)
    pairs(ref_key, ref_index, target_key, target_index, label, method, similarity, frame_gap, change,
          phash_distance)   cross-image pairs (catalogs/pairs.py): loaded by `catalog pairs`, kept by builds

`idx` is a sample's position in its shard's samples sidecar (ok and failed samples counted together), which is
the plan order within the shard: plan order across a catalog is `ORDER BY shard, idx`. `sample_id` is one
integer per sample, `shards.first_id` + idx, on the sample and on each of its objects: join and group samples with
their objects on it rather than on (key, shard). Builds number the samples densely from 0 in the order they load
the shards (a shard takes the ids after the highest any earlier shard took), so every catalog connection lets
DuckDB group by sample_id with a directly indexed table instead of hashing (`_per_sample_grouping`). The
curation columns are NULL for sidecars written without them (before the curate stage existed, or with it off);
white_fraction, which sidecars have since schema version 3, is computed from the shard's images when its sidecar
lacks it. A catalog made by another CATALOG_VERSION is rebuilt from scratch by the next build.

A bad shard (an unreadable or corrupt sidecar, one with a wrong schema, counts its stats file contradicts) does
not stop a build: every good shard is loaded, and each bad one is a row of `bad_shards` naming its file and why,
tried again by every build until it loads. A build is all or nothing: one that fails or dies leaves the catalog
as it was, and a first one leaves no catalog (`open_catalog` refuses a file no build finished). A small refresh
is one transaction in place; a first build, a rebuild or a refresh of more than IN_PLACE_SHARDS shards fills a
copy (CATALOG.building) a chunk of shards per transaction and renames it over the catalog at the end, so its
memory does not grow with the catalog and readers keep the old catalog meanwhile. Builds and `catalog pairs`
take a writer lock (CATALOG.lock): one changes a catalog at a time.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from subjectdiff.catalogs.schema import RECORD_IMAGE_FORMATS
from subjectdiff.catalogs.storage import Folder, cache_root, is_local, local_path
from subjectdiff.catalogs.writer import (
    KINDS,
    OBJECT_SCHEMA,
    SAMPLE_SCHEMA,
    complete_names,
    encoded_white_fraction,
    listed_names,
)

CATALOG_FILE = "catalog.duckdb"
# 2: samples/failures.idx and the curation columns; 3: samples.white_fraction; 4: the video columns;
# 5: failures.video_shot and the videos view; 6: samples/objects.sample_id, shards.number; 7: sample_id dense
# from 0 (shards.first_id instead of shards.number)
CATALOG_VERSION = 7
PLAN_ORDER = "shard, idx"  # the order datagen planned the samples in (module docstring)

_DDL = """
CREATE TABLE IF NOT EXISTS samples (
    key VARCHAR, shard VARCHAR, idx INTEGER, caption VARCHAR, alt_text VARCHAR, width INTEGER, height INTEGER,
    n_objects INTEGER, source VARCHAR, image_ext VARCHAR, image_bytes BIGINT, schema_version INTEGER,
    sha256 VARCHAR, phash BIGINT, clip_score REAL, alt_clip_score REAL, aesthetic REAL, white_fraction REAL,
    video VARCHAR, video_shot INTEGER, video_frame BIGINT, video_time DOUBLE, sample_id BIGINT);
CREATE TABLE IF NOT EXISTS objects (
    key VARCHAR, shard VARCHAR, "index" INTEGER, label VARCHAR, phrase VARCHAR,
    span_start INTEGER, span_end INTEGER, tokens INTEGER[], score REAL,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL, area REAL, aspect REAL, mask_area REAL, mask_fill REAL,
    containment REAL, mask_score REAL, label_score REAL, label_rank INTEGER, sample_id BIGINT);
CREATE TABLE IF NOT EXISTS shards (
    name VARCHAR PRIMARY KEY, path VARCHAR, n_ok INTEGER, n_failed INTEGER, n_objects INTEGER,
    bytes BIGINT, start_time DOUBLE, end_time DOUBLE, duration DOUBLE, fingerprint VARCHAR, first_id BIGINT);
CREATE TABLE IF NOT EXISTS failures (
    key VARCHAR, shard VARCHAR, idx INTEGER, source VARCHAR, stage VARCHAR, reason VARCHAR,
    video VARCHAR, video_frame BIGINT, video_shot INTEGER);
CREATE TABLE IF NOT EXISTS bad_shards (
    name VARCHAR PRIMARY KEY, file VARCHAR, reason VARCHAR, detail VARCHAR, seen_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS catalog_info (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS pairs (
    ref_key VARCHAR, ref_index INTEGER, target_key VARCHAR, target_index INTEGER, label VARCHAR, method VARCHAR,
    similarity REAL, frame_gap BIGINT, change REAL, phash_distance INTEGER);
CREATE OR REPLACE VIEW videos AS
WITH rows AS (
    SELECT video, shard, video_shot, video_frame, source <> video AS is_frame, true AS ok, NULL AS reason
    FROM samples WHERE video IS NOT NULL
    UNION ALL
    SELECT video, shard, video_shot, video_frame, source <> video, false, CASE WHEN source = video THEN reason END
    FROM failures WHERE video IS NOT NULL)
SELECT video, any_value(shard) AS shard,
    count(*) FILTER (WHERE is_frame) AS frames,
    count(*) FILTER (WHERE is_frame AND ok) AS frames_ok,
    count(*) FILTER (WHERE is_frame AND NOT ok) AS frames_failed,
    coalesce(max(video_shot) FILTER (WHERE is_frame OR video_frame > 0) + 1, 0) AS shots,
    CASE WHEN count(reason) = 0 THEN 'ok' WHEN count(*) FILTER (WHERE is_frame) > 0 THEN 'partial' ELSE 'failed' END
        AS status,
    any_value(reason) AS reason
FROM rows GROUP BY video;
"""
# videos: a frame row's source is `VIDEO#frame=N`; the one row whose source is the video itself is the video's own
# failure (it did not open, or broke at video_frame: datagen/video.py), whose shot is the last one found.
# `pairs` (catalogs/pairs.py) is not in _TABLES: no shard file holds it, so a rebuild from scratch keeps it
# (`_drop` deletes the pairs of the shards it drops); `catalog pairs` replaces a method's rows (replace_pairs).
_TABLES = ("samples", "objects", "shards", "failures", "bad_shards", "catalog_info")

# Statement types a read-only query may contain.
_READ_ONLY_TYPES = {"SELECT", "EXPLAIN"}


class CatalogError(RuntimeError):
    """A catalog operation failed; the message is one line a user can act on."""


class ShardError(ValueError):
    """One file of a shard cannot be loaded. file: its path or URL; reason: a short stable phrase to group by
    ("not JSON", "wrong schema", ...); detail: the one-line specifics (the column, the underlying error)."""

    def __init__(self, file: str, reason: str, detail: str):
        super().__init__(f"{file}: {reason} ({detail})")
        self.file, self.reason, self.detail = file, reason, detail


@dataclass(frozen=True)
class BadShard:
    """A shard a build could not load: a row of `bad_shards`."""

    name: str
    file: str
    reason: str
    detail: str

    def line(self) -> str:
        return f"bad shard {self.name}: {self.file}: {self.reason} ({self.detail})"


@dataclass
class BuildReport:
    """added: the shards loaded by this build; removed: those dropped (gone, or changed and reloaded); bad: those
    that could not be loaded (in `bad_shards`); incomplete: those whose stats record other file sizes than the
    listing shows (a stale or half-replaced upload), left out until they agree."""

    added: list[str]
    removed: list[str]
    unchanged: int
    seconds: float
    bad: list[BadShard] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    found: int | None = None  # complete shards the listing showed

    def summary(self) -> str:
        notes = [f"{len(self.bad)} bad (not loaded: see the bad_shards table)"] if self.bad else []
        if self.incomplete:
            notes.append(f"{len(self.incomplete)} incomplete (stats disagree with the listing)")
        if self.found == 0:
            notes.append("no complete shard (NAME.tar with NAME_stats.json) found")
        return (
            f"catalog: {len(self.added)} shard(s) loaded, {len(self.removed)} dropped, "
            f"{self.unchanged} unchanged{''.join(', ' + n for n in notes)} ({self.seconds:.2f} s)"
        )


def catalog_path(root: str | os.PathLike, catalog: str | os.PathLike | None = None) -> Path:
    """Where ROOT's catalog is: CATALOG when given (`--catalog PATH`); ROOT/catalog.duckdb for a local ROOT;
    for a remote ROOT (DuckDB needs a local file) `$SUBJECTDIFF_CACHE/catalogs/<bucket-path>-<hash>.duckdb`,
    the same file for the same URL on this machine."""
    if catalog is not None:
        return Path(catalog).expanduser()
    if is_local(root):
        return local_path(root) / CATALOG_FILE
    url = os.fspath(root).rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
    return cache_root() / "catalogs" / f"{slug}-{hashlib.sha1(url.encode()).hexdigest()[:10]}.duckdb"


def is_catalog_file(path: str | os.PathLike) -> bool:
    """Whether PATH names a catalog file (a .duckdb, or any existing file) rather than a shard folder or URL."""
    return os.fspath(path).endswith(".duckdb") or os.path.isfile(path)


def catalog_root(path: str | os.PathLike) -> str:
    """The shard folder (or URL) of the catalog file PATH: DIR for DIR/catalog.duckdb (catalog_path's, wherever
    DIR was copied or moved) and for a file not made yet (`build(DIR, catalog=PATH)` makes it); otherwise the
    `root` its build recorded (a bucket's catalog in the cache, a `--catalog FILE` of `catalog build`), or the
    folder holding the file when that root is a local folder no longer there."""
    path = Path(path).expanduser()
    if path.name == CATALOG_FILE or not path.exists():
        return str(path.parent)
    con = _connect(path, read_only=True)
    try:
        rows = con.execute("SELECT value FROM catalog_info WHERE name = 'root'").fetchall()
    except duckdb.Error:  # not a catalog this code built
        raise CatalogError(f"{path} is not a subjectdiff catalog (no catalog_info)") from None
    finally:
        con.close()
    root = rows[0][0] if rows else None
    if root is None or (is_local(root) and not local_path(root).is_dir()):
        return str(path.parent)
    return root


def env_settings() -> dict[str, str]:
    """DuckDB options every catalog connection takes from the environment: SUBJECTDIFF_DUCKDB_MEMORY_LIMIT
    (DuckDB's memory_limit, e.g. "6GB"; DuckDB's own default is 80 % of the machine's memory) and
    SUBJECTDIFF_DUCKDB_TEMP_DIRECTORY (where it spills what does not fit), SUBJECTDIFF_DUCKDB_THREADS (DuckDB's
    threads; its default is one a core) and SUBJECTDIFF_DUCKDB_PERFECT_HT_THRESHOLD (instead of the catalog's own
    choice, `_per_sample_grouping`; 12, DuckDB's default, turns it off). A command's own flags override them."""
    names = {
        "memory_limit": "SUBJECTDIFF_DUCKDB_MEMORY_LIMIT",
        "temp_directory": "SUBJECTDIFF_DUCKDB_TEMP_DIRECTORY",
        "threads": "SUBJECTDIFF_DUCKDB_THREADS",
        "perfect_ht_threshold": "SUBJECTDIFF_DUCKDB_PERFECT_HT_THRESHOLD",
    }
    return {option: os.environ[var] for option, var in names.items() if os.environ.get(var)}


def _connect(
    path: Path, *, read_only: bool, timeout: float = 60.0, settings: dict[str, str] | None = None
) -> duckdb.DuckDBPyConnection:
    """Open the catalog, waiting for another process's write lock (a running build) up to `timeout` s.
    settings: DuckDB options fixed at connect time (memory_limit, temp_directory: a read-only connection
    cannot change its temp_directory later)."""
    config = {"enable_external_access": False} if read_only else {}
    config.update(env_settings())
    config.update(settings or {})
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only, config=config)
            _per_sample_grouping(con)
            return con
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise CatalogError(f"cannot open {path}: {one_line(e)}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# DuckDB groups by integer columns with a directly indexed table instead of a hash table when their range fits in
# perfect_ht_threshold bits (default 12). sample_id is dense, so raising the threshold to its range makes a
# per-sample GROUP BY over every object an array update (several times faster over 100M objects: BENCHMARKS.md).
# The table has a slot for every id in each thread, whether or not a row reaches it: about 13 bytes for a count's
# state, about 36 for `list(x ORDER BY y)`'s (measured at 2^25 ids), so a query that keeps few samples pays for all
# of them. The threshold is raised only while each thread's table at _PERFECT_HT_BYTES a slot fits in a quarter
# of DuckDB's memory limit together; `catalog select --object-where` turns it off for its query.
_PERFECT_HT_BYTES = 48
_PERFECT_HT_MAX_BITS = 32  # DuckDB's own bound


def _per_sample_grouping(con: duckdb.DuckDBPyConnection) -> None:
    """Let CON group by sample_id without hashing (above) when its tables fit; nothing for a file no build wrote
    or when the user set the threshold (SUBJECTDIFF_DUCKDB_PERFECT_HT_THRESHOLD)."""
    if "perfect_ht_threshold" in env_settings():
        return
    try:
        bits = max(_next_sample_id(con) - 1, 1).bit_length()
    except duckdb.CatalogException:  # a new file: no catalog_info yet
        return
    threads, limit = con.execute("SELECT current_setting('threads'), current_setting('memory_limit')").fetchone()
    if 12 < bits <= _PERFECT_HT_MAX_BITS and int(threads) * _PERFECT_HT_BYTES << bits <= _bytes(limit) // 4:
        con.execute(f"SET perfect_ht_threshold = {bits}")


def _bytes(size: str) -> int:
    """DuckDB's spelling of a size ("5.5 GiB", "512.0 MiB", "0 bytes") in bytes."""
    number, _, unit = size.partition(" ")
    scale = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50}
    return int(float(number) * scale.get(unit, 1))


@contextmanager
def open_catalog(
    root: str | os.PathLike,
    *,
    catalog: str | os.PathLike | None = None,
    timeout: float = 60.0,
    settings: dict[str, str] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to ROOT's catalog (see catalog_path; external file access disabled; temporary
    tables allowed). settings: DuckDB options such as {"memory_limit": "4GB", "temp_directory": DIR}."""
    path = catalog_path(root, catalog)
    hint = f"run `subjectdiff catalog build {root}{f' --catalog {catalog}' if catalog is not None else ''}` first"
    if not path.exists():
        raise CatalogError(f"no catalog at {path}; {hint}")
    con = _connect(path, read_only=True, timeout=timeout, settings=settings)
    try:
        if _version(con) is None:  # the file of a first build that died before its commit: no catalog yet
            raise CatalogError(f"no catalog at {path} (no build of it finished); {hint}")
        yield con
    finally:
        con.close()


def _version(con: duckdb.DuckDBPyConnection) -> str | None:
    """The catalog_version a finished build recorded; None in a file no build finished."""
    has_info = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'catalog_info' AND table_schema = 'main'"
    ).fetchall()[0][0]
    if not has_info:
        return None
    row = con.execute("SELECT value FROM catalog_info WHERE name = 'catalog_version'").fetchall()
    return row[0][0] if row else None


def bad_shard_names(root: str | os.PathLike, *, catalog: str | os.PathLike | None = None) -> list[str]:
    """The shards ROOT's catalog could not load when it was last built (its bad_shards table), sorted."""
    with open_catalog(root, catalog=catalog) as con:
        return _bad_names(con)


def _bad_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    if not con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'bad_shards' AND table_schema = 'main'"
    ).fetchall()[0][0]:
        return []  # built before the table existed, and not refreshed since
    return [r[0] for r in con.execute("SELECT name FROM bad_shards ORDER BY name").fetchall()]


def one_line(e: BaseException) -> str:
    """An error's message as one line: its lines joined with '; ', DuckDB's hints ("Did you mean ...",
    "Candidate bindings: ...") kept whole, its echo of the query (`LINE 1: ...` and the caret under it) left out;
    an empty message is the error's type."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    lines = [line for line in lines if line and not line.startswith("LINE ") and set(line) != {"^"}]
    return "; ".join(lines) if lines else type(e).__name__


@dataclass(frozen=True)
class ShardListing:
    """A complete shard as a listing shows it: its files' names (relative to the root; a shard written before
    issue #19 has its legacy samples name, catalogs.writer.listed_names), URLs and sizes, and a fingerprint
    of the four files (size and ETag or mtime) that changes when any of them is rewritten."""

    names: dict[str, str]
    urls: dict[str, str]
    sizes: dict[str, int]
    fingerprint: str


def scan_shards(root: str | os.PathLike) -> dict[str, ShardListing]:
    """Complete shards below ROOT (recursively), from one listing, opening no file: {shard id: listing}. The id
    is the path relative to ROOT without extension ("00000", or "part-a/00000" in a subfolder)."""
    folder = Folder(root)
    entries = folder.listing()
    found = {}
    for sid in complete_names(entries):
        names = listed_names(sid, entries)
        found[sid] = ShardListing(
            names=names,
            urls={k: folder.join(n) for k, n in names.items()},
            sizes={k: entries[n].size for k, n in names.items()},
            fingerprint="|".join(f"{entries[names[k]].size}:{entries[names[k]].version}" for k in KINDS),
        )
    return found


def build(root: str | os.PathLike, *, catalog: str | os.PathLike | None = None, timeout: float = 600.0) -> BuildReport:
    """Create or refresh ROOT's catalog (catalog_path) from the sidecars of ROOT's complete shards.

    Incremental: a shard is read only when it is new, its listing changed, or it was bad last time; unchanged
    shards cost nothing but the listing. A shard whose stats file records other file sizes than the listing
    shows (a stale or half-replaced upload) is left out, as incomplete. A bad shard is recorded in `bad_shards`
    (report.bad) and the rest is loaded. All or nothing: a build that fails raises CatalogError and changes
    nothing (a first one leaves no catalog file). Builds of one catalog run one at a time (`timeout`: how long
    one waits for another)."""
    t0 = time.monotonic()
    path = catalog_path(root, catalog)
    try:
        folder = Folder(root)
        if not folder.is_folder():
            raise CatalogError(f"{root} is not a folder")
        found = scan_shards(root)
    except (OSError, CatalogError) as e:
        kept = f"; the catalog at {path} is kept as it was" if path.exists() else ""
        raise CatalogError(f"cannot list {root}: {one_line(e)}{kept}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(path, timeout):
        had_catalog = path.exists()  # under the lock: what a concurrent first build made counts
        try:
            report = _update(path, folder, found, timeout)
        except Exception as e:
            outcome = f"the catalog at {path} is kept as it was" if had_catalog else "no catalog was made"
            raise CatalogError(f"catalog build of {folder.url} failed, {outcome}: {one_line(e)}") from e
    report.seconds = time.monotonic() - t0
    return report


@contextmanager
def writer_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold PATH's writer lock (an flock on PATH.lock): builds and `catalog pairs` change a catalog one at a time.
    DuckDB's own lock is not enough: a build that stages a copy (_update) lets readers, and so other writers, open
    the catalog until it swaps the copy in."""
    lock = open(path.with_name(path.name + ".lock"), "a")
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CatalogError(f"cannot change {path}: another build or `catalog pairs` holds it") from None
                time.sleep(0.2)
        yield
    finally:
        lock.close()  # releases the flock


def _remove_catalog(path: Path) -> None:
    """Delete a DuckDB file and its write-ahead log."""
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


@dataclass
class _Plan:
    """What a build changes: fresh (a catalog of another CATALOG_VERSION, or none: every shard loaded again),
    removed (catalogued shards gone or changed), todo (shards to read), was_bad (bad_shards of the last build)."""

    fresh: bool
    removed: list[str]
    todo: list[str]
    was_bad: set[str]

    def nothing(self) -> bool:
        return not (self.fresh or self.todo or self.removed or self.was_bad)


def _plan(con: duckdb.DuckDBPyConnection | None, found: dict[str, ShardListing]) -> _Plan:
    prints = {sid: shard.fingerprint for sid, shard in found.items()}
    if con is None or _version(con) != str(CATALOG_VERSION):
        return _Plan(True, [], sorted(found), set())
    known = dict(con.execute("SELECT name, fingerprint FROM shards").fetchall())
    was_bad = {r[0] for r in con.execute("SELECT name FROM bad_shards").fetchall()}
    removed = sorted(s for s in known if prints.get(s) != known[s])
    return _Plan(False, removed, sorted(s for s in found if known.get(s) != prints[s]), was_bad)


# A build that reads more shards than this stages a copy of the catalog, commits it a chunk of shards at a time
# and swaps it in: one transaction of all its rows would hold them in memory until the commit (DuckDB keeps a
# transaction's appends in memory, beyond its memory_limit: 22 GB at 100M objects; benchmarks/catalog.py).
IN_PLACE_SHARDS = 1024
CHUNK_SHARDS = 256  # shards read and inserted together


def _update(path: Path, folder: Folder, found: dict[str, ShardListing], timeout: float) -> BuildReport:
    """Bring the catalog at PATH in line with the listing FOUND, all or nothing, under the writer lock: gone and
    changed shards dropped, new, changed and formerly bad ones read (every shard when the catalog is fresh). A
    small change is one transaction in place; a fresh catalog or a large change is made in a staged copy
    (IN_PLACE_SHARDS)."""
    con = _connect(path, read_only=False, timeout=timeout) if path.exists() else None
    try:
        plan = _plan(con, found)
        if plan.nothing():
            return BuildReport([], [], len(found), 0.0, found=len(found))
        if not plan.fresh and len(plan.todo) <= IN_PLACE_SHARDS:
            con.execute("BEGIN TRANSACTION")
            try:
                report = _apply(con, folder, found, plan, commit_chunks=False)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("CHECKPOINT")
            return report
        if con is not None:
            con.execute("CHECKPOINT")  # the copy must hold everything: nothing left in the write-ahead log
            con.close()
            con = None
        return _staged(path, folder, found, plan)
    finally:
        if con is not None:
            con.close()


def _staged(path: Path, folder: Folder, found: dict[str, ShardListing], plan: _Plan) -> BuildReport:
    """_apply on a copy of the catalog at PATH (a new file when there is none), committing a chunk of shards at a
    time, then the copy renamed over PATH: readers see the old catalog until then, and a build that fails or
    dies leaves it as it was (the copy, PATH.building, is removed, or the next build removes it)."""
    stage = path.with_name(path.name + ".building")
    _remove_catalog(stage)  # what a build that died left (this one holds the writer lock)
    if path.exists():
        shutil.copyfile(path, stage)
    con = _connect(stage, read_only=False)
    try:
        report = _apply(con, folder, found, plan, commit_chunks=True)
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        _remove_catalog(stage)
        raise
    con.close()
    path.with_name(path.name + ".wal").unlink(missing_ok=True)  # checkpointed above: a stale one is a dead build's
    os.replace(stage, path)
    return report


def _apply(
    con: duckdb.DuckDBPyConnection, folder: Folder, found: dict[str, ShardListing], plan: _Plan, commit_chunks: bool
) -> BuildReport:
    """Make PLAN's changes on CON: drop the removed shards, read the todo ones CHUNK_SHARDS at a time (each chunk
    its own transaction when COMMIT_CHUNKS), record the bad ones, then catalog_info, which makes the catalog one
    `open_catalog` accepts (a file without it is one no build finished)."""
    if plan.fresh:
        for table in _TABLES:  # `pairs` is kept: no shard holds it
            con.execute(f"DROP TABLE IF EXISTS {table}")
    con.execute(_DDL)  # also adds tables a catalog of this version made before they existed
    _drop(con, plan.removed)
    loaded, bad, incomplete = [], [], []
    for chunk in _chunks(plan.todo, CHUNK_SHARDS):
        if commit_chunks:
            con.execute("BEGIN TRANSACTION")
        got = _load(con, folder, {s: found[s] for s in chunk})
        if commit_chunks:
            con.execute("COMMIT")
        loaded += got[0]
        bad += got[1]
        incomplete += got[2]
    _record_bad(con, bad)
    con.execute(
        "INSERT OR REPLACE INTO catalog_info VALUES ('catalog_version', ?), ('built_at', ?), ('root', ?)",
        [str(CATALOG_VERSION), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), folder.url],
    )
    return BuildReport(loaded, plan.removed, len(found) - len(plan.todo), 0.0, bad, incomplete, len(found))


def _drop(con: duckdb.DuckDBPyConnection, names: list[str]) -> None:
    """Delete every row of these shards."""
    if not names:
        return
    con.execute("CREATE TEMP TABLE gone AS SELECT unnest(?::VARCHAR[]) AS name", [names])
    con.execute(
        "DELETE FROM pairs WHERE ref_key IN (SELECT key FROM samples WHERE shard IN (SELECT name FROM gone)) "
        "OR target_key IN (SELECT key FROM samples WHERE shard IN (SELECT name FROM gone))"
    )
    for table in ("samples", "objects", "failures"):
        con.execute(f"DELETE FROM {table} WHERE shard IN (SELECT name FROM gone)")
    con.execute("DELETE FROM shards WHERE name IN (SELECT name FROM gone)")
    con.execute("DROP TABLE gone")


def _record_bad(con: duckdb.DuckDBPyConnection, bad: list[BadShard]) -> None:
    """bad_shards := this build's bad shards. Every bad shard is read again by every build (it is in no other
    table), so the ones not bad now were loaded, or are gone."""
    con.execute("DELETE FROM bad_shards")
    if not bad:
        return
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)
    con.executemany(
        "INSERT INTO bad_shards VALUES (?, ?, ?, ?, ?)", [(b.name, b.file, b.reason, b.detail, now) for b in bad]
    )


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


_SAMPLE_COLUMNS = [
    "key",
    "shard",
    "idx",
    "caption",
    "alt_text",
    "width",
    "height",
    "n_objects",
    "source",
    "image_ext",
    "image_bytes",
    "schema_version",
    "sha256",
    "phash",
    "clip_score",
    "alt_clip_score",
    "aesthetic",
    "white_fraction",
    "video",
    "video_shot",
    "video_frame",
    "video_time",
    "sample_id",
]
_FAILURE_COLUMNS = ["key", "shard", "idx", "source", "stage", "reason", "video", "video_frame", "video_shot"]
_OBJECT_COLUMNS = [
    "key",
    "shard",
    "index",
    "label",
    "phrase",
    "span_start",
    "span_end",
    "tokens",
    "score",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "aspect",
    "mask_area",
    "mask_fill",
    "containment",
    "mask_score",
    "label_score",
    "label_rank",
    "sample_id",
]
# The sidecars' types (catalogs.writer). Columns added to the contract after its first version: a sidecar written
# before one existed gets it as NULLs. Any other column missing means the sidecar is not one of ours.
_SIDECAR_SCHEMA = {"samples": SAMPLE_SCHEMA, "objects": OBJECT_SCHEMA}
_ADDED_COLUMNS = {
    "sha256",
    "phash",
    "clip_score",
    "alt_clip_score",
    "aesthetic",
    "white_fraction",
    "label_score",
    "label_rank",
    "video",
    "video_shot",
    "video_frame",
    "video_time",
}
_STATS_INTS = ("count", "successes", "failed", "objects", "bytes")
_STATS_FLOATS = ("start_time", "end_time", "duration")


def _read_shard(folder: Folder, sid: str, shard: ShardListing) -> tuple[dict, pa.Table, pa.Table] | None:
    """(stats, samples, objects) of one shard, the sidecars conformed to the writer's schema (`shard` set to its
    id, the columns an older sidecar lacks added as NULLs) and the samples' `idx` their row number; None when its
    stats record file sizes other than the listing's. Raises ShardError naming the file that cannot be loaded."""
    names = shard.names
    st = _read_stats(folder, names["stats"], shard.urls["stats"])
    recorded = st.get("files") or {}
    if any(recorded.get(k, shard.sizes[k]) != shard.sizes[k] for k in ("tar", "samples", "objects")):
        return None
    samples, objects = (
        _conform(_read_parquet(folder, names[k], shard.urls[k]), k, sid, shard.urls[k]) for k in ("samples", "objects")
    )
    _check_counts(st, samples, objects, shard.urls)
    samples = _with_white_fractions(samples, folder, names["tar"], shard.urls["tar"])
    return st, samples.append_column("idx", pa.array(range(samples.num_rows), pa.int32())), objects


def _detail(e: BaseException) -> str:
    return f"{type(e).__name__}: {one_line(e)}"[:300]


def _read_bytes(folder: Folder, name: str, url: str) -> bytes:
    """NAME's bytes; a file that cannot be read is a ShardError ("missing": gone since the listing)."""
    try:
        return folder.read_bytes(name)
    except FileNotFoundError as e:
        raise ShardError(url, "missing", f"gone since the listing ({_detail(e)})") from None
    except Exception as e:
        raise ShardError(url, "read failed", _detail(e)) from None


def _read_stats(folder: Folder, name: str, url: str) -> dict[str, Any]:
    """A shard's `_stats.json`, checked for what the catalog takes from it (counts, times, file sizes)."""
    try:
        st = json.loads(_read_bytes(folder, name, url).decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(url, "not JSON", _detail(e)) from None
    if not isinstance(st, dict):
        raise ShardError(url, "not a JSON object", f"a JSON {type(st).__name__}")
    for k in _STATS_INTS + _STATS_FLOATS:
        v = st.get(k)
        ok = isinstance(v, int) or (k in _STATS_FLOATS and isinstance(v, float))
        if v is not None and (isinstance(v, bool) or not ok):
            kind = "an integer" if k in _STATS_INTS else "a number"
            raise ShardError(url, "wrong field", f"{k} is {v!r}, not {kind}")
    if not isinstance(st.get("files") or {}, dict):
        raise ShardError(url, "wrong field", f"files is {st['files']!r}, not an object of file sizes")
    return st


def _read_parquet(folder: Folder, name: str, url: str) -> pa.Table:
    """A sidecar, read whole (sidecars are small) so that a storage failure and a corrupt file are told apart."""
    data = _read_bytes(folder, name, url)
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as e:
        raise ShardError(url, "not Parquet", _detail(e)) from None


def _conform(t: pa.Table, kind: str, sid: str, url: str) -> pa.Table:
    """The sidecar T with exactly the writer's columns and types (what the INSERTs expect), `shard` set to SID;
    ShardError ("wrong schema", "bad rows") for a column that is missing or does not convert, a row without a
    key, a status other than ok / failed."""
    schema, n = _SIDECAR_SCHEMA[kind], t.num_rows
    columns = []
    for f in schema:
        if f.name == "shard":
            columns.append(pa.array([sid] * n, pa.string()))
        elif f.name not in t.schema.names:
            if f.name not in _ADDED_COLUMNS:
                raise ShardError(url, "wrong schema", f"column {f.name!r} is missing")
            columns.append(pa.nulls(n, f.type))
        else:
            col = t.column(f.name)
            try:
                columns.append(col if col.type == f.type else col.cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise ShardError(url, "wrong schema", f"column {f.name!r} is {col.type}, not {f.type}") from None
    out = pa.Table.from_arrays(columns, schema=schema)
    if out.column("key").null_count:
        raise ShardError(url, "bad rows", f"{out.column('key').null_count} row(s) without a key")
    if kind == "samples":
        odd = sorted(set(out.column("status").to_pylist()) - {"ok", "failed"}, key=str)
        if odd:
            raise ShardError(url, "bad rows", f"status {odd[0]!r}: not 'ok' or 'failed'")
    return out


def _check_counts(st: dict[str, Any], samples: pa.Table, objects: pa.Table, urls: dict[str, str]) -> None:
    """The stats file's counts agree with the sidecars (the reader's balanced split trusts `successes`)."""
    status = samples.column("status").to_pylist()
    for field_, n, what in (
        ("successes", status.count("ok"), f"{_name(urls['samples'])} has {{}} ok row(s)"),
        ("failed", status.count("failed"), f"{_name(urls['samples'])} has {{}} failed row(s)"),
        ("objects", objects.num_rows, f"{_name(urls['objects'])} has {{}} row(s)"),
    ):
        if st.get(field_, n) != n:
            raise ShardError(urls["stats"], "counts disagree", f"{field_} is {st[field_]}, {what.format(n)}")


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _with_white_fractions(samples: pa.Table, folder: Folder, tar: str, url: str) -> pa.Table:
    """Samples rows written before schema version 3 (a sidecar without the column, or rows a retry carried over)
    have no white_fraction: computed here, once per build of the shard, from the images in its tar (streamed,
    decoded as the reader decodes them). A shard whose ok rows all have it is returned as it is."""
    keys, status = samples.column("key").to_pylist(), samples.column("status").to_pylist()
    values = samples.column("white_fraction").to_pylist()
    todo = {k for k, st, v in zip(keys, status, values) if st == "ok" and v is None}
    if not todo:
        return samples
    found: dict[str, float] = {}
    try:
        with folder.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as archive:
            for member in archive:
                key, _, ext = member.name.rpartition(".")
                if key in todo and ext in RECORD_IMAGE_FORMATS and member.isfile():
                    found[key] = _white_fraction_or_none(archive.extractfile(member).read())
    except tarfile.TarError as e:
        raise ShardError(url, "not a tar", _detail(e)) from None
    except Exception as e:
        raise ShardError(url, "read failed", _detail(e)) from None
    filled = pa.array([found.get(k, v) for k, v in zip(keys, values)], pa.float32())
    return samples.set_column(samples.schema.get_field_index("white_fraction"), "white_fraction", filled)


def _white_fraction_or_none(data: bytes) -> float | None:
    """encoded_white_fraction, None for bytes that do not decode: that record is bad, not its shard (the
    reader refuses it where it is read)."""
    try:
        return encoded_white_fraction(data)
    except Exception:
        return None


def _read_or_why(folder: Folder, sid: str, shard: ShardListing) -> tuple[dict, pa.Table, pa.Table] | BadShard | None:
    """_read_shard, a bad shard as its BadShard."""
    try:
        return _read_shard(folder, sid, shard)
    except ShardError as e:
        return BadShard(sid, e.file, e.reason, e.detail)


def _load(
    con: duckdb.DuckDBPyConnection, folder: Folder, shards: dict[str, ShardListing]
) -> tuple[list[str], list[BadShard], list[str]]:
    """Insert a batch of shards (sidecars read in parallel: object stores answer slowly but concurrently);
    returns (the ids loaded, the bad shards, the ids left out as incomplete)."""
    workers = 4 if folder.local else 16
    with ThreadPoolExecutor(workers) as pool:
        read = list(pool.map(lambda kv: (kv[0], _read_or_why(folder, *kv)), shards.items()))
    rows, samples, objects, loaded = [], [], [], []
    first = _next_sample_id(con)
    bad = [got for _, got in read if isinstance(got, BadShard)]
    incomplete = [sid for sid, got in read if got is None]
    for sid, got in read:
        if got is None or isinstance(got, BadShard):
            continue
        st, s, o = got
        loaded.append(sid)
        rows.append(
            (
                sid,
                shards[sid].urls["tar"],
                st.get("successes", 0),
                st.get("failed", 0),
                st.get("objects", 0),
                st.get("bytes", 0),
                st.get("start_time"),
                st.get("end_time"),
                st.get("duration"),
                shards[sid].fingerprint,
                first,
            )
        )
        s, o = _with_sample_ids(s, o, first)
        samples.append(s)
        objects.append(o)
        first += s.num_rows  # idx counts ok and failed samples: the shard's ids are first_id .. first_id + rows - 1
    if not loaded:
        return [], bad, incomplete
    con.executemany("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute("INSERT OR REPLACE INTO catalog_info VALUES ('next_sample_id', ?)", [str(first)])
    con.register("new_samples", pa.concat_tables(samples))
    con.register("new_objects", pa.concat_tables(objects))
    q = lambda cols: ", ".join(f'"{c}"' for c in cols)
    con.execute(f"INSERT INTO samples SELECT {q(_SAMPLE_COLUMNS)} FROM new_samples WHERE status = 'ok'")
    con.execute(f"INSERT INTO failures SELECT {q(_FAILURE_COLUMNS)} FROM new_samples WHERE status = 'failed'")
    con.execute(f"INSERT INTO objects SELECT {q(_OBJECT_COLUMNS)} FROM new_objects")
    con.unregister("new_samples")
    con.unregister("new_objects")
    return loaded, bad, incomplete


def _next_sample_id(con: duckdb.DuckDBPyConnection) -> int:
    """The first sample_id no shard of the catalog has taken: ids are never reused, even those of a dropped shard,
    so an id names one sample for the life of the catalog (until a rebuild from scratch)."""
    row = con.execute("SELECT value FROM catalog_info WHERE name = 'next_sample_id'").fetchone()
    return int(row[0]) if row else 0


def _with_sample_ids(samples: pa.Table, objects: pa.Table, first: int) -> tuple[pa.Table, pa.Table]:
    """SAMPLES and OBJECTS of one shard with their `sample_id`: FIRST + the sample's idx, an object's that of the
    sample of its key. One integer per sample across the catalog: joining samples with their objects on it took
    2.3 s at 100M objects against 15.8 s on (key, shard) (BENCHMARKS.md)."""
    base = pa.scalar(first, pa.int64())
    idx = pc.index_in(objects.column("key"), value_set=samples.column("key")).cast(pa.int64())
    return (
        samples.append_column("sample_id", pc.add(samples.column("idx").cast(pa.int64()), base)),
        objects.append_column("sample_id", pc.add(idx, base)),
    )


def check_read_only(sql: str) -> None:
    """Raise CatalogError unless SQL is exactly one read-only statement (SELECT / EXPLAIN)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise CatalogError(f"invalid SQL: {one_line(e)}") from None
    if len(statements) != 1:
        raise CatalogError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_ONLY_TYPES:
        raise CatalogError(f"only read-only queries (SELECT) are allowed; this is a {kind} statement")


def query(
    root: str | os.PathLike, sql: str, params: list[Any] | None = None, *, catalog: str | os.PathLike | None = None
) -> pa.Table:
    """Run one read-only statement against ROOT's catalog; returns an Arrow table."""
    check_read_only(sql)
    with open_catalog(root, catalog=catalog) as con:
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as e:
            raise CatalogError(one_line(e)) from None


def stats(
    root: str | os.PathLike, *, catalog: str | os.PathLike | None = None, top_labels: int = 20, bins: int = 10
) -> dict[str, Any]:
    """Counts (bad shards too), label histogram, score and area distributions, the curation signals'
    distributions and the number of exact duplicates (samples beyond the first with the same sha256), and
    failures by stage and reason. A quantiles dict's `n` counts its non-NULL values."""
    with open_catalog(root, catalog=catalog) as con:

        def rows(sql: str) -> list[tuple]:
            return con.execute(sql).fetchall()

        n_samples, n_objects = rows("SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM objects)")[0]
        n_failed, n_shards = rows("SELECT (SELECT count(*) FROM failures), (SELECT count(*) FROM shards)")[0]

        def hist(col: str) -> list[dict[str, Any]]:
            edges = [i / bins for i in range(bins + 1)]
            counts = dict(
                rows(
                    f"SELECT least(floor({col} * {bins}), {bins - 1})::INT AS b, count(*) FROM objects "
                    f"WHERE {col} IS NOT NULL AND NOT isnan({col}) GROUP BY b"
                )
            )
            return [{"lo": edges[i], "hi": edges[i + 1], "count": counts.get(i, 0)} for i in range(bins)]

        def quantiles(col: str, table: str = "objects") -> dict[str, float | None]:
            q = rows(
                f"SELECT min({col}), quantile_cont({col}, [0.1, 0.5, 0.9]), max({col}), avg({col}), "
                f"count({col}) FROM {table} WHERE NOT isnan({col})"
            )[0]
            qs = q[1] or [None, None, None]
            return {"min": q[0], "p10": qs[0], "median": qs[1], "p90": qs[2], "max": q[2], "mean": q[3], "n": q[4]}

        return {
            "shards": n_shards,
            "bad_shards": len(_bad_names(con)),
            "samples": n_samples,
            "failed": n_failed,
            "objects": n_objects,
            "objects_per_sample": rows("SELECT n_objects, count(*) FROM samples GROUP BY 1 ORDER BY 1"),
            "labels": rows(
                f"SELECT label, count(*) AS n FROM objects GROUP BY 1 ORDER BY n DESC, label LIMIT {top_labels}"
            ),
            "n_labels": rows("SELECT count(DISTINCT label) FROM objects")[0][0],
            "score": {"quantiles": quantiles("score"), "histogram": hist("score")},
            "area": {"quantiles": quantiles("area"), "histogram": hist("area")},
            # the curate stage's signals (NULL where it did not run, or for aesthetic: no head configured)
            "curation": {
                "clip_score": quantiles("clip_score", "samples"),
                "alt_clip_score": quantiles("alt_clip_score", "samples"),
                "aesthetic": quantiles("aesthetic", "samples"),
                "label_score": quantiles("label_score"),
                "exact_duplicates": rows(
                    "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM samples "
                    "WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING n > 1)"
                )[0][0],
            },
            "pairs": pair_counts(con),
            "failures_by_stage": rows("SELECT stage, count(*) AS n FROM failures GROUP BY 1 ORDER BY n DESC, stage"),
            "failures_by_reason": rows(
                "SELECT stage, reason, count(*) AS n FROM failures GROUP BY 1, 2 ORDER BY n DESC, stage, reason"
            ),
        }


def replace_pairs(
    root: str | os.PathLike,
    pairs: pa.Table | pa.RecordBatchReader,
    method: str,
    *,
    catalog: str | os.PathLike | None = None,
) -> int:
    """Load PAIRS (catalogs.pairs.PAIR_SCHEMA rows of one METHOD; a table, or a reader DuckDB streams) into ROOT's
    catalog as the `pairs` table's rows
    of that method, replacing the ones there, in one transaction. Returns the rows the table now holds."""
    path = catalog_path(root, catalog)
    with open_catalog(root, catalog=catalog):  # a catalog a build finished, or its one-line error
        pass
    with writer_lock(path, timeout=600.0):
        con = _connect(path, read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(_DDL)  # a catalog built before the pairs table existed
            con.execute("DELETE FROM pairs WHERE method = ?", [method])
            con.register("new_pairs", pairs)
            con.execute("INSERT INTO pairs SELECT * FROM new_pairs")
            con.unregister("new_pairs")
            total = con.execute("SELECT count(*) FROM pairs").fetchall()[0][0]
            con.execute("COMMIT")
            return total
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()


def pair_counts(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """[(method, pairs)] of the catalog's `pairs` table (each direction a row); [] before it exists."""
    if not con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'pairs' AND table_schema = 'main'"
    ).fetchall()[0][0]:
        return []
    return con.execute("SELECT method, count(*) FROM pairs GROUP BY 1 ORDER BY 1").fetchall()
