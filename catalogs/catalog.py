"""The DuckDB catalog of a shard folder: SQL over samples, objects, shards and failures.

DIR/catalog.duckdb is built from the shards' Parquet sidecars and `_stats.json` files (never from the
tars), so building is cheap and incremental: a shard is (re)loaded only when it is new or its files
changed, shards that disappeared are dropped, and building twice changes nothing.

Tables (see docs/records.md for every column):
    samples(key, shard, caption, alt_text, width, height, n_objects, source, image_ext, image_bytes, ...)
    objects(key, shard, index, label, phrase, span_start, span_end, tokens, score, x0, y0, x1, y1,
            area, aspect, mask_area, mask_fill, containment, mask_score)
    shards(name, path, n_ok, n_failed, n_objects, bytes, start_time, end_time, duration, fingerprint)
    failures(key, shard, source, stage, reason)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from catalogs.writer import shard_files

CATALOG_FILE = "catalog.duckdb"
CATALOG_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS samples (
    key VARCHAR, shard VARCHAR, caption VARCHAR, alt_text VARCHAR, width INTEGER, height INTEGER,
    n_objects INTEGER, source VARCHAR, image_ext VARCHAR, image_bytes BIGINT, schema_version INTEGER);
CREATE TABLE IF NOT EXISTS objects (
    key VARCHAR, shard VARCHAR, "index" INTEGER, label VARCHAR, phrase VARCHAR,
    span_start INTEGER, span_end INTEGER, tokens INTEGER[], score REAL,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL, area REAL, aspect REAL, mask_area REAL, mask_fill REAL,
    containment REAL, mask_score REAL);
CREATE TABLE IF NOT EXISTS shards (
    name VARCHAR PRIMARY KEY, path VARCHAR, n_ok INTEGER, n_failed INTEGER, n_objects INTEGER,
    bytes BIGINT, start_time DOUBLE, end_time DOUBLE, duration DOUBLE, fingerprint VARCHAR);
CREATE TABLE IF NOT EXISTS failures (key VARCHAR, shard VARCHAR, source VARCHAR, stage VARCHAR, reason VARCHAR);
CREATE TABLE IF NOT EXISTS catalog_info (name VARCHAR PRIMARY KEY, value VARCHAR);
"""

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


def catalog_path(root: str | os.PathLike) -> Path:
    return Path(root) / CATALOG_FILE


def _connect(path: Path, *, read_only: bool, timeout: float = 60.0) -> duckdb.DuckDBPyConnection:
    """Open the catalog, waiting for another process's write lock (a running build) up to `timeout` s."""
    config = {"enable_external_access": False} if read_only else {}
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
def open_catalog(root: str | os.PathLike, *, timeout: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to DIR/catalog.duckdb (external file access disabled)."""
    path = catalog_path(root)
    if not path.exists():
        raise CatalogError(f"no catalog at {path}; run `subjectdiff catalog build {root}` first")
    con = _connect(path, read_only=True, timeout=timeout)
    try:
        yield con
    finally:
        con.close()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _fingerprint(files: dict[str, Path]) -> str:
    parts = []
    for kind in ("tar", "samples", "objects", "stats"):
        st = files[kind].stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def scan_shards(root: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """Complete shards below ROOT (recursively): {shard id: its files}. The id is the path relative to
    ROOT without extension ("00000", or "part-a/00000" in a subfolder)."""
    root = Path(root)
    found: dict[str, dict[str, Path]] = {}
    for stats in sorted(root.rglob("*_stats.json")):
        name = stats.name[: -len("_stats.json")]
        files = shard_files(stats.parent, name)
        if all(p.exists() for p in files.values()):
            rel = stats.parent.relative_to(root) / name
            found[rel.as_posix()] = files
    return found


def build(root: str | os.PathLike, *, timeout: float = 600.0) -> BuildReport:
    """Create or refresh ROOT/catalog.duckdb from the sidecars of ROOT's complete shards."""
    t0 = time.monotonic()
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root} is not a folder")
    found = scan_shards(root)
    prints = {sid: _fingerprint(files) for sid, files in found.items()}
    con = _connect(catalog_path(root), read_only=False, timeout=timeout)
    try:
        con.execute(_DDL)
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
            for chunk in _chunks(added, 512):
                _load(con, {s: found[s] for s in chunk}, prints)
            con.execute(
                "INSERT OR REPLACE INTO catalog_info VALUES ('catalog_version', ?), ('built_at', ?)",
                [str(CATALOG_VERSION), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("CHECKPOINT")
        return BuildReport(added, removed, len(found) - len(added), time.monotonic() - t0)
    finally:
        con.close()


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _load(con: duckdb.DuckDBPyConnection, shards: dict[str, dict[str, Path]], prints: dict[str, str]) -> None:
    """Insert a batch of shards: sidecars are read by DuckDB in one scan per table."""
    rows = []
    for sid, files in shards.items():
        st = json.loads(files["stats"].read_text())
        rows.append(
            (sid, str(files["tar"].resolve()), st.get("successes", 0), st.get("failed", 0), st.get("objects", 0),
             st.get("bytes", 0), st.get("start_time"), st.get("end_time"), st.get("duration"), prints[sid])
        )
    con.executemany("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    samples = [str(f["samples"].resolve()) for f in shards.values()]
    objects = [str(f["objects"].resolve()) for f in shards.values()]
    con.register("fmap", pa.table({"file": samples + objects, "sid": list(shards) * 2}))
    con.execute(
        """INSERT INTO samples SELECT p.key, m.sid, p.caption, p.alt_text, p.width, p.height, p.n_objects,
               p.source, p.image_ext, p.image_bytes, p.schema_version
           FROM read_parquet(?, filename = true) p JOIN fmap m ON p.filename = m.file WHERE p.status = 'ok'""",
        [samples],
    )
    con.execute(
        """INSERT INTO failures SELECT p.key, m.sid, p.source, p.stage, p.reason
           FROM read_parquet(?, filename = true) p JOIN fmap m ON p.filename = m.file WHERE p.status = 'failed'""",
        [samples],
    )
    con.execute(
        """INSERT INTO objects SELECT p.key, m.sid, p."index", p.label, p.phrase, p.span_start, p.span_end,
               p.tokens, p.score, p.x0, p.y0, p.x1, p.y1, p.area, p.aspect, p.mask_area, p.mask_fill,
               p.containment, p.mask_score
           FROM read_parquet(?, filename = true) p JOIN fmap m ON p.filename = m.file""",
        [objects],
    )
    con.unregister("fmap")


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


def query(root: str | os.PathLike, sql: str, params: list[Any] | None = None) -> pa.Table:
    """Run one read-only statement against ROOT's catalog; returns an Arrow table."""
    check_read_only(sql)
    with open_catalog(root) as con:
        try:
            return con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as e:
            raise CatalogError(_one_line(e)) from None


def stats(root: str | os.PathLike, *, top_labels: int = 20, bins: int = 10) -> dict[str, Any]:
    """Counts, label histogram, score and area distributions, and failures by stage and reason."""
    with open_catalog(root) as con:

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

        def quantiles(col: str) -> dict[str, float | None]:
            q = rows(f"SELECT min({col}), quantile_cont({col}, [0.1, 0.5, 0.9]), max({col}), avg({col}) FROM objects")[0]
            qs = q[1] or [None, None, None]
            return {"min": q[0], "p10": qs[0], "median": qs[1], "p90": qs[2], "max": q[2], "mean": q[3]}

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
            "failures_by_stage": rows("SELECT stage, count(*) AS n FROM failures GROUP BY 1 ORDER BY n DESC, stage"),
            "failures_by_reason": rows(
                "SELECT stage, reason, count(*) AS n FROM failures GROUP BY 1, 2 ORDER BY n DESC, stage, reason"
            ),
        }
