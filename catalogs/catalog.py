"""The DuckDB catalog of a shard folder: SQL over samples, objects, shards and failures.

The folder is local or any fsspec URL (`s3://bucket/out`); the catalog is always a local DuckDB file:
DIR/catalog.duckdb for a local folder, a file in the cache for a remote one (`catalog_path`), or any path
given as `catalog=` (`--catalog PATH`). It is built from the shards' Parquet sidecars and `_stats.json` files
(never from the tars, read through pyarrow and fsspec, not DuckDB's httpfs), so building is cheap and
incremental: one listing tells new and changed shards (size and ETag or mtime of their four files) from
unchanged ones, only those are read, shards that disappeared are dropped, and building twice changes nothing.

Tables (see docs/records.md for every column):
    samples(key, shard, idx, caption, alt_text, width, height, n_objects, source, image_ext, image_bytes, ...,
            sha256, phash, clip_score, alt_clip_score, aesthetic, white_fraction)
    objects(key, shard, index, label, phrase, span_start, span_end, tokens, score, x0, y0, x1, y1,
            area, aspect, mask_area, mask_fill, containment, mask_score, label_score, label_rank)
    shards(name, path, n_ok, n_failed, n_objects, bytes, start_time, end_time, duration, fingerprint)
    failures(key, shard, idx, source, stage, reason)

`idx` is a sample's position in its shard's samples sidecar (ok and failed samples counted together), which is
the plan order within the shard: plan order across a catalog is `ORDER BY shard, idx`. The curation columns
are NULL for sidecars written without them (before the curate stage existed, or with it off); white_fraction,
which sidecars have since schema version 3, is computed from the shard's images when its sidecar lacks it. A catalog made
by another CATALOG_VERSION is rebuilt from scratch by the next build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from catalogs.schema import IMAGE_EXTENSIONS
from catalogs.storage import Folder, cache_root, is_local, local_path
from catalogs.writer import KINDS, OBJECT_SCHEMA, SAMPLE_SCHEMA, complete_names, encoded_white_fraction, shard_names

CATALOG_FILE = "catalog.duckdb"
CATALOG_VERSION = 3  # 2: samples/failures.idx and the curation columns; 3: samples.white_fraction
PLAN_ORDER = "shard, idx"  # the order datagen planned the samples in (module docstring)

_DDL = """
CREATE TABLE IF NOT EXISTS samples (
    key VARCHAR, shard VARCHAR, idx INTEGER, caption VARCHAR, alt_text VARCHAR, width INTEGER, height INTEGER,
    n_objects INTEGER, source VARCHAR, image_ext VARCHAR, image_bytes BIGINT, schema_version INTEGER,
    sha256 VARCHAR, phash BIGINT, clip_score REAL, alt_clip_score REAL, aesthetic REAL, white_fraction REAL);
CREATE TABLE IF NOT EXISTS objects (
    key VARCHAR, shard VARCHAR, "index" INTEGER, label VARCHAR, phrase VARCHAR,
    span_start INTEGER, span_end INTEGER, tokens INTEGER[], score REAL,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL, area REAL, aspect REAL, mask_area REAL, mask_fill REAL,
    containment REAL, mask_score REAL, label_score REAL, label_rank INTEGER);
CREATE TABLE IF NOT EXISTS shards (
    name VARCHAR PRIMARY KEY, path VARCHAR, n_ok INTEGER, n_failed INTEGER, n_objects INTEGER,
    bytes BIGINT, start_time DOUBLE, end_time DOUBLE, duration DOUBLE, fingerprint VARCHAR);
CREATE TABLE IF NOT EXISTS failures (
    key VARCHAR, shard VARCHAR, idx INTEGER, source VARCHAR, stage VARCHAR, reason VARCHAR);
CREATE TABLE IF NOT EXISTS catalog_info (name VARCHAR PRIMARY KEY, value VARCHAR);
"""
_TABLES = ("samples", "objects", "shards", "failures", "catalog_info")

# Statement types a read-only query may contain.
_READ_ONLY_TYPES = {"SELECT", "EXPLAIN"}


class CatalogError(RuntimeError):
    """A catalog operation failed; the message is one line a user can act on."""


@dataclass
class BuildReport:
    added: list[str]
    removed: list[str]
    unchanged: int
    seconds: float

    def summary(self) -> str:
        return (
            f"catalog: {len(self.added)} shard(s) loaded, {len(self.removed)} dropped, "
            f"{self.unchanged} unchanged ({self.seconds:.2f} s)"
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


def _connect(path: Path, *, read_only: bool, timeout: float = 60.0,
             settings: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """Open the catalog, waiting for another process's write lock (a running build) up to `timeout` s.
    settings: DuckDB options fixed at connect time (memory_limit, temp_directory: a read-only connection
    cannot change its temp_directory later)."""
    config = {"enable_external_access": False} if read_only else {}
    config.update(settings or {})
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise CatalogError(f"cannot open {path}: {_one_line(e)}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


@contextmanager
def open_catalog(root: str | os.PathLike, *, catalog: str | os.PathLike | None = None,
                 timeout: float = 60.0, settings: dict[str, str] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to ROOT's catalog (see catalog_path; external file access disabled; temporary
    tables allowed). settings: DuckDB options such as {"memory_limit": "4GB", "temp_directory": DIR}."""
    path = catalog_path(root, catalog)
    if not path.exists():
        hint = f" --catalog {catalog}" if catalog is not None else ""
        raise CatalogError(f"no catalog at {path}; run `subjectdiff catalog build {root}{hint}` first")
    con = _connect(path, read_only=True, timeout=timeout, settings=settings)
    try:
        yield con
    finally:
        con.close()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass(frozen=True)
class ShardListing:
    """A complete shard as a listing shows it: its files' URLs and sizes, and a fingerprint of the four files
    (size and ETag or mtime) that changes when any of them is rewritten."""

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
        names = shard_names(sid)
        found[sid] = ShardListing(
            urls={k: folder.join(n) for k, n in names.items()},
            sizes={k: entries[n].size for k, n in names.items()},
            fingerprint="|".join(f"{entries[names[k]].size}:{entries[names[k]].version}" for k in KINDS),
        )
    return found


def build(root: str | os.PathLike, *, catalog: str | os.PathLike | None = None, timeout: float = 600.0) -> BuildReport:
    """Create or refresh ROOT's catalog (catalog_path) from the sidecars of ROOT's complete shards.

    Incremental: a shard is read only when it is new or its listing changed; unchanged shards cost nothing
    but the listing. A shard whose stats file records other file sizes than the listing shows (a stale or
    half-replaced upload) is left out, as incomplete."""
    t0 = time.monotonic()
    try:
        folder = Folder(root)
        if not folder.is_folder():
            raise CatalogError(f"{root} is not a folder")
        found = scan_shards(root)
    except OSError as e:
        raise CatalogError(f"cannot list {root}: {_one_line(e)}") from None
    prints = {sid: shard.fingerprint for sid, shard in found.items()}
    path = catalog_path(root, catalog)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(path, read_only=False, timeout=timeout)
    try:
        _create_or_rebuild(con)
        known = dict(con.execute("SELECT name, fingerprint FROM shards").fetchall())
        removed = sorted(s for s in known if prints.get(s) != known[s])
        added = sorted(s for s in found if known.get(s) != prints[s])
        if not added and not removed:
            return BuildReport([], [], len(found), time.monotonic() - t0)
        con.execute("BEGIN TRANSACTION")
        try:
            if removed:
                con.execute("CREATE TEMP TABLE gone AS SELECT unnest(?::VARCHAR[]) AS name", [removed])
                for table in ("samples", "objects", "failures"):
                    con.execute(f"DELETE FROM {table} WHERE shard IN (SELECT name FROM gone)")
                con.execute("DELETE FROM shards WHERE name IN (SELECT name FROM gone)")
                con.execute("DROP TABLE gone")
            loaded = []
            for chunk in _chunks(added, 256):
                loaded += _load(con, folder, {s: found[s] for s in chunk})
            con.execute(
                "INSERT OR REPLACE INTO catalog_info VALUES ('catalog_version', ?), ('built_at', ?), ('root', ?)",
                [str(CATALOG_VERSION), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), folder.url],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("CHECKPOINT")
        return BuildReport(loaded, removed, len(found) - len(added), time.monotonic() - t0)
    finally:
        con.close()


def _create_or_rebuild(con: duckdb.DuckDBPyConnection) -> None:
    """The tables, created when missing; a catalog of another CATALOG_VERSION (other columns) is emptied first,
    so the build that follows loads every shard again."""
    has_info = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'catalog_info' "
                           "AND table_schema = 'main'").fetchall()[0][0]
    version = None
    if has_info:
        row = con.execute("SELECT value FROM catalog_info WHERE name = 'catalog_version'").fetchall()
        version = row[0][0] if row else None
    if version != str(CATALOG_VERSION):
        con.execute("BEGIN TRANSACTION")
        for table in _TABLES:
            con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute(_DDL)
        con.execute("INSERT INTO catalog_info VALUES ('catalog_version', ?)", [str(CATALOG_VERSION)])
        con.execute("COMMIT")
    else:
        con.execute(_DDL)


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


_SAMPLE_COLUMNS = ["key", "shard", "idx", "caption", "alt_text", "width", "height", "n_objects", "source",
                   "image_ext", "image_bytes", "schema_version", "sha256", "phash", "clip_score", "alt_clip_score",
                   "aesthetic", "white_fraction"]
_FAILURE_COLUMNS = ["key", "shard", "idx", "source", "stage", "reason"]
_OBJECT_COLUMNS = ["key", "shard", "index", "label", "phrase", "span_start", "span_end", "tokens", "score", "x0",
                   "y0", "x1", "y1", "area", "aspect", "mask_area", "mask_fill", "containment", "mask_score",
                   "label_score", "label_rank"]
# The sidecars' types (catalogs.writer): a sidecar written before a column existed gets it as NULLs.
_SIDECAR_SCHEMA = {"samples": SAMPLE_SCHEMA, "objects": OBJECT_SCHEMA}


def _read_shard(folder: Folder, sid: str, shard: ShardListing) -> tuple[dict, pa.Table, pa.Table] | None:
    """(stats, samples, objects) of one shard, the sidecars' `shard` column set to its id, the samples' `idx`
    their row number, and the columns an older sidecar lacks added as NULLs; None when its stats record file
    sizes other than the listing's."""
    names = shard_names(sid)
    st = json.loads(folder.read_text(names["stats"]))
    recorded = st.get("files") or {}
    if any(recorded.get(k, shard.sizes[k]) != shard.sizes[k] for k in ("tar", "samples", "objects")):
        return None
    tables = []
    for kind in ("samples", "objects"):
        if folder.local:
            t = pq.read_table(shard.urls[kind])
        else:
            with folder.open(names[kind]) as f:
                t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array([sid] * t.num_rows, pa.string()))
        missing = [f for f in _SIDECAR_SCHEMA[kind] if f.name not in t.schema.names]
        for f in missing:
            t = t.append_column(f, pa.nulls(t.num_rows, f.type))
        if kind == "samples":
            t = _with_white_fractions(t, folder, names["tar"])
        if kind == "samples":
            t = t.append_column("idx", pa.array(range(t.num_rows), pa.int32()))
        tables.append(t)
    return st, tables[0], tables[1]


def _with_white_fractions(samples: pa.Table, folder: Folder, tar: str) -> pa.Table:
    """Samples rows written before schema version 3 (a sidecar without the column, or rows a retry carried over)
    have no white_fraction: computed here, once per build of the shard, from the images in its tar (streamed,
    decoded as the reader decodes them). A shard whose ok rows all have it is returned as it is."""
    keys, status = samples.column("key").to_pylist(), samples.column("status").to_pylist()
    values = samples.column("white_fraction").to_pylist()
    todo = {k for k, st, v in zip(keys, status, values) if st == "ok" and v is None}
    if not todo:
        return samples
    found: dict[str, float] = {}
    with folder.open(tar) as f, tarfile.open(fileobj=f, mode="r|") as archive:
        for member in archive:
            key, _, ext = member.name.rpartition(".")
            if key in todo and ext in IMAGE_EXTENSIONS and member.isfile():
                found[key] = encoded_white_fraction(archive.extractfile(member).read())
    filled = pa.array([found.get(k, v) for k, v in zip(keys, values)], pa.float32())
    return samples.set_column(samples.schema.get_field_index("white_fraction"), "white_fraction", filled)


def _load(con: duckdb.DuckDBPyConnection, folder: Folder, shards: dict[str, ShardListing]) -> list[str]:
    """Insert a batch of shards (sidecars read in parallel: object stores answer slowly but concurrently);
    returns the ids loaded."""
    workers = 4 if folder.local else 16
    with ThreadPoolExecutor(workers) as pool:
        read = list(pool.map(lambda kv: (kv[0], _read_shard(folder, *kv)), shards.items()))
    rows, samples, objects, loaded = [], [], [], []
    for sid, got in read:
        if got is None:
            continue
        st, s, o = got
        loaded.append(sid)
        rows.append((sid, shards[sid].urls["tar"], st.get("successes", 0), st.get("failed", 0), st.get("objects", 0),
                     st.get("bytes", 0), st.get("start_time"), st.get("end_time"), st.get("duration"),
                     shards[sid].fingerprint))
        samples.append(s)
        objects.append(o)
    if not loaded:
        return []
    con.executemany("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    new_samples = pa.concat_tables(samples, promote_options="permissive")
    new_objects = pa.concat_tables(objects, promote_options="permissive")
    con.register("new_samples", new_samples)
    con.register("new_objects", new_objects)
    q = lambda cols: ", ".join(f'"{c}"' for c in cols)  # noqa: E731
    con.execute(f"INSERT INTO samples SELECT {q(_SAMPLE_COLUMNS)} FROM new_samples WHERE status = 'ok'")
    con.execute(f"INSERT INTO failures SELECT {q(_FAILURE_COLUMNS)} FROM new_samples WHERE status = 'failed'")
    con.execute(f"INSERT INTO objects SELECT {q(_OBJECT_COLUMNS)} FROM new_objects")
    con.unregister("new_samples")
    con.unregister("new_objects")
    return loaded


def check_read_only(sql: str) -> None:
    """Raise CatalogError unless SQL is exactly one read-only statement (SELECT / EXPLAIN)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise CatalogError(f"invalid SQL: {_one_line(e)}") from None
    if len(statements) != 1:
        raise CatalogError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_ONLY_TYPES:
        raise CatalogError(f"only read-only queries (SELECT) are allowed; this is a {kind} statement")


def query(root: str | os.PathLike, sql: str, params: list[Any] | None = None, *,
          catalog: str | os.PathLike | None = None) -> pa.Table:
    """Run one read-only statement against ROOT's catalog; returns an Arrow table."""
    check_read_only(sql)
    with open_catalog(root, catalog=catalog) as con:
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as e:
            raise CatalogError(_one_line(e)) from None


def stats(root: str | os.PathLike, *, catalog: str | os.PathLike | None = None, top_labels: int = 20,
          bins: int = 10) -> dict[str, Any]:
    """Counts, label histogram, score and area distributions, the curation signals' distributions and the
    number of exact duplicates (samples beyond the first with the same sha256), and failures by stage and
    reason. A quantiles dict's `n` counts its non-NULL values."""
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
            q = rows(f"SELECT min({col}), quantile_cont({col}, [0.1, 0.5, 0.9]), max({col}), avg({col}), "
                     f"count({col}) FROM {table} WHERE NOT isnan({col})")[0]
            qs = q[1] or [None, None, None]
            return {"min": q[0], "p10": qs[0], "median": qs[1], "p90": qs[2], "max": q[2], "mean": q[3], "n": q[4]}

        return {
            "shards": n_shards,
            "samples": n_samples,
            "failed": n_failed,
            "objects": n_objects,
            "objects_per_sample": rows("SELECT n_objects, count(*) FROM samples GROUP BY 1 ORDER BY 1"),
            "labels": rows(f"SELECT label, count(*) AS n FROM objects GROUP BY 1 ORDER BY n DESC, label LIMIT {top_labels}"),
            "n_labels": rows("SELECT count(DISTINCT label) FROM objects")[0][0],
            "score": {"quantiles": quantiles("score"), "histogram": hist("score")},
            "area": {"quantiles": quantiles("area"), "histogram": hist("area")},
            # the curate stage's signals (NULL where it did not run, or for aesthetic: no head configured)
            "curation": {
                "clip_score": quantiles("clip_score", "samples"),
                "alt_clip_score": quantiles("alt_clip_score", "samples"),
                "aesthetic": quantiles("aesthetic", "samples"),
                "label_score": quantiles("label_score"),
                "exact_duplicates": rows("SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM samples "
                                         "WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING n > 1)")[0][0],
            },
            "failures_by_stage": rows("SELECT stage, count(*) AS n FROM failures GROUP BY 1 ORDER BY n DESC, stage"),
            "failures_by_reason": rows(
                "SELECT stage, reason, count(*) AS n FROM failures GROUP BY 1, 2 ORDER BY n DESC, stage, reason"
            ),
        }
