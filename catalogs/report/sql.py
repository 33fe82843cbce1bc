"""The report's queries on the catalog: read-only rows, the scope a `--where` selects, and the sampled keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb

from subjectdiff.catalogs.catalog import CatalogError, check_read_only, one_line


def query(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[tuple]:
    """All rows of a read-only query; a DuckDB error becomes a one-line CatalogError."""
    check_read_only(sql)
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.Error as e:
        raise CatalogError(f"report query failed: {one_line(e)}") from None


@dataclass
class Scope:
    """FROM expressions for the selected samples and their objects (the bare tables without a predicate)."""

    samples: str = "samples"
    objects: str = "objects"

    @classmethod
    def of(cls, where: str | None) -> Scope:
        if where is None:
            return cls()
        keys = f"(SELECT key, shard FROM samples WHERE ({where}))"
        return cls(
            f"(SELECT * FROM samples WHERE ({where}))",
            f"(SELECT o.* FROM objects o SEMI JOIN {keys} s ON o.key = s.key AND o.shard = s.shard)",
        )


def check_where(con: duckdb.DuckDBPyConnection, where: str) -> int:
    """Count the samples matching WHERE; a bad predicate is a one-line CatalogError."""
    sql = f"SELECT count(*) FROM samples WHERE ({where})"
    try:
        check_read_only(sql)
        return con.execute(sql).fetchone()[0]
    except (duckdb.Error, CatalogError) as e:
        raise CatalogError(f"invalid --where predicate {where!r}: {one_line(e)}") from None


def sample_keys(con: duckdb.DuckDBPyConnection, where: str | None, n: int, seed: int) -> list[tuple[str, str, str]]:
    """The n selected (key, shard, tar path) rows with the smallest hash(key, seed)."""
    if n <= 0:
        return []
    # Integers inlined rather than bound: a `?` inside the user's predicate would take the parameter.
    return query(
        con,
        f"SELECT s.key, s.shard, shards.path FROM {Scope.of(where).samples} s LEFT JOIN shards "
        f"ON s.shard = shards.name ORDER BY hash(s.key, {int(seed)}::BIGINT), s.key, s.shard LIMIT {int(n)}",
    )
