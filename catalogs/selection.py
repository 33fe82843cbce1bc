"""Selections: the training subsets `catalog select` writes, and reading them back.

A selection is a Parquet file with one row per selected sample, in (shard, key) order:
    key    the record key
    shard  the shard id in the catalog
    path   the shard's tar (a local path or an fsspec URL): what a reader opens
Its schema metadata `subjectdiff.selection` records the catalog, the predicate, the time and the row count.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from catalogs.catalog import query


def select(root: str | os.PathLike, where: str, out: str | os.PathLike) -> int:
    """Write the keys, shard ids and shard paths of the samples matching WHERE to a Parquet file.

    WHERE is a SQL predicate over `samples` columns; object conditions go through a subquery, e.g.
    "n_objects BETWEEN 2 AND 8 AND key IN (SELECT key FROM objects WHERE score > 0.5)".
    Returns the number of selected samples.
    """
    sql = (
        "WITH sel AS (SELECT key, shard FROM samples WHERE (" + where + ")) "
        "SELECT sel.key, sel.shard, shards.path FROM sel JOIN shards ON sel.shard = shards.name "
        "ORDER BY sel.shard, sel.key"
    )
    table = query(root, sql)
    meta = {
        b"subjectdiff.selection": json.dumps(
            {"catalog": str(Path(root).resolve()), "where": where, "created": time.time(), "rows": table.num_rows}
        ).encode()
    }
    table = table.replace_schema_metadata(meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return table.num_rows


def load_selection(path: str | os.PathLike) -> dict[str, set[str]]:
    """Read a selection Parquet (`catalog select` output): {shard path: {keys}}."""
    table = pq.read_table(path, columns=["key", "path"])
    out: dict[str, set[str]] = {}
    for key, shard_path in zip(table.column("key").to_pylist(), table.column("path").to_pylist()):
        out.setdefault(shard_path, set()).add(key)
    return out
