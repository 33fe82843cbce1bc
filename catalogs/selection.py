"""Selections: the training subsets `catalog select` writes, and reading them back.

A selection is a Parquet file with one row per selected sample, in (shard, key) order:
    key    the record key
    shard  the shard id in the catalog
    path   the shard's tar (a local path or an fsspec URL): what a reader opens
    objects  (only when selected with an object predicate) the indices, in the record, of the sample's objects
           that satisfy it, ascending: the trainer chooses subjects among these
Its schema metadata `subjectdiff.selection` records the catalog, the predicates, the curation options
(`dedup`, `dups`, `max_distance`, `exclude_near`, `exclude_distance`, and how many samples each dropped), the
time and the row count.

Curation options (catalogs/duplicates.py, catalogs/hashing.py), applied after the predicates, in this order:
    exclude_near  drop the selected samples within `exclude_distance` phash bits of any image of a held-out set
                  (a folder of images, a catalog folder or URL, or a .duckdb file): evaluation subjects must not
                  be trained on;
    dedup         "exact" (same sha256) or "near" (the catalog's duplicate groups at `max_distance`, or those
                  of a `catalog duplicates` file given as `dups`): keep the first remaining member of each group
                  in plan order (`catalogs.catalog.PLAN_ORDER`: shard, then position in the shard) and drop the
                  rest. Groups are the whole catalog's, so two selected samples joined only through an unselected
                  one are still one group.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from subjectdiff.catalogs import duplicates
from subjectdiff.catalogs.catalog import (
    PLAN_ORDER,
    CatalogError,
    catalog_path,
    check_read_only,
    one_line,
    open_catalog,
)
from subjectdiff.catalogs.hashing import held_out_hashes
from subjectdiff.catalogs.storage import Folder, is_local, local_path, open_url

# The reference code's per-object rules (Subject-Diffusion `custom_dataset.py`: verify_keys, is_valid_bbox) that
# the catalog's columns express, as an object predicate; train/data.py's data options apply the same thresholds
# (and the rules SQL cannot: segments in the box, containment in an already chosen box). The label rule accepts
# the object's own caption words too (its phrase: "people" for `person`, "knives" for `knife`), as the trainer
# does; an image more than 10 % near-white gives no subject (the reference skips it).
REFERENCE_OBJECT_WHERE = (
    "area > 0.08 AND area < 0.7 AND aspect > 0.3 AND aspect < 3 AND score > 0.3 "
    "AND strpos(trim(label), ' ') = 0 "
    "AND (strpos(caption, label) > 0 OR (phrase <> '' AND strpos(caption, phrase) > 0)) "
    "AND mask_fill >= 0.6 AND mask_area <= area AND white_fraction <= 0.1"
)


def select(
    root: str | os.PathLike,
    where: str | None,
    out: str | os.PathLike,
    *,
    catalog: str | os.PathLike | None = None,
    object_where: str | None = None,
    dedup: str | None = None,
    dups: str | os.PathLike | None = None,
    max_distance: int = duplicates.DEFAULT_MAX_DISTANCE,
    exclude_near: str | os.PathLike | None = None,
    exclude_distance: int = duplicates.DEFAULT_EXCLUDE_DISTANCE,
) -> int:
    """Write the keys, shard ids and shard paths of the samples matching WHERE to a Parquet file.

    WHERE is a SQL predicate over `samples` columns (None: every sample); object conditions go through a
    subquery, e.g. "n_objects BETWEEN 2 AND 8 AND sample_id IN (SELECT sample_id FROM objects WHERE score > 0.5)".
    OBJECT_WHERE is a predicate over `objects` columns plus the sample's `caption`, `width`, `height` and
    `white_fraction`
    (e.g. REFERENCE_OBJECT_WHERE): each selected row then lists the sample's objects that satisfy it
    (column `objects`), and samples with none are left out.
    dedup ("exact" | "near"), dups, max_distance, exclude_near, exclude_distance: the curation options of the
    module docstring. Returns the number of selected samples. Errors are one-line CatalogErrors.
    """
    if dedup not in (None, "exact", "near"):
        raise CatalogError(f"--dedup {dedup!r}: use 'exact' or 'near'")
    if dups is not None and dedup != "near":
        raise CatalogError("--dups gives near-duplicate groups: use it with --dedup near")
    sql = _predicate_sql(where, object_where)
    check_read_only(sql)
    try:  # read before the catalog is opened: a held-out catalog may be this very file
        held = held_out_hashes(_held_out_catalog(exclude_near)) if exclude_near is not None else None
        groups = pq.read_table(dups) if dups is not None else None
    except (OSError, ValueError, duckdb.Error) as e:
        raise CatalogError(one_line(e)) from None
    if groups is not None and not set(duplicates.DUPS_SCHEMA.names) <= set(groups.schema.names):
        raise CatalogError(f"--dups {dups}: not a `catalog duplicates` file (columns {groups.schema.names})")
    with open_catalog(root, catalog=catalog) as con:
        try:
            if object_where:
                # Few samples keep objects, each with a list's state: a directly indexed table of every sample_id
                # (catalog._per_sample_grouping) would hold a state for each and double the memory at 100M.
                con.execute("RESET perfect_ht_threshold")
            con.execute(f"CREATE TEMP TABLE _selected AS {sql}")
            dropped = {}
            if held is not None:
                dropped["near_held_out"] = _drop_near_held_out(con, held, exclude_distance)
            if dedup is not None:
                dropped["duplicates"] = _drop_duplicates(con, dedup, max_distance, groups)
            table = con.sql("SELECT * FROM _selected ORDER BY shard, key").to_arrow_table()
        except duckdb.Error as e:
            raise CatalogError(one_line(e)) from None
        except ValueError as e:  # catalogs.duplicates: no hashes to compare
            raise CatalogError(str(e)) from None
    info = {
        "catalog": Folder(root).url,
        "where": where,
        "object_where": object_where,
        "created": time.time(),
        "rows": table.num_rows,
    }
    if dedup is not None:
        info.update(
            dedup=dedup,
            dups=None if dups is None else os.fspath(dups),
            max_distance=max_distance if dedup == "near" and dups is None else None,
        )
    if exclude_near is not None:
        info.update(exclude_near=os.fspath(exclude_near), exclude_distance=exclude_distance)
    if dropped:
        info["dropped"] = dropped
    table = table.replace_schema_metadata({b"subjectdiff.selection": json.dumps(info).encode()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return table.num_rows


def _held_out_catalog(spec: str | os.PathLike) -> str | os.PathLike:
    """A held-out spec as hashing.held_out_hashes takes it: a remote catalog folder becomes its local catalog file."""
    return catalog_path(spec) if not is_local(spec) else spec


def _candidates(con: duckdb.DuckDBPyConnection) -> str:
    """A temp view of the catalog's rows of the samples still selected (with their hashes)."""
    con.execute(
        "CREATE OR REPLACE TEMP VIEW _candidates AS SELECT s.* FROM samples s "
        "SEMI JOIN _selected x ON s.key = x.key AND s.shard = x.shard"
    )
    return "_candidates"


def _drop(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> int:
    """Remove ROWS (key, shard) from the selection; returns how many were selected."""
    con.register("_to_drop", rows.select(["key", "shard"]))
    try:
        n = con.execute(
            "SELECT count(*) FROM _selected x SEMI JOIN _to_drop d ON x.key = d.key AND x.shard = d.shard"
        ).fetchall()[0][0]
        con.execute(
            "DELETE FROM _selected WHERE EXISTS (SELECT 1 FROM _to_drop d WHERE d.key = _selected.key "
            "AND d.shard = _selected.shard)"
        )
    finally:
        con.unregister("_to_drop")
    return n


def _drop_near_held_out(con: duckdb.DuckDBPyConnection, held: pa.Table, distance: int) -> int:
    rel = _candidates(con)
    duplicates.require_hashes(con, "phash", rel)
    return _drop(con, duplicates.near_held_out(con, held, rel, max_distance=distance))


def _drop_duplicates(con: duckdb.DuckDBPyConnection, mode: str, max_distance: int, groups: pa.Table | None) -> int:
    if groups is None:
        duplicates.require_hashes(con, "sha256" if mode == "exact" else "phash", _candidates(con))
    chosen = "EXISTS (SELECT 1 FROM _selected x WHERE x.key = samples.key AND x.shard = samples.shard)"
    return _drop(
        con,
        duplicates.dedup_drop(
            con, mode, "samples", where=chosen, max_distance=max_distance, order_by=PLAN_ORDER, groups=groups
        ),
    )


def _predicate_sql(where: str | None, object_where: str | None) -> str:
    """The selection by predicates: (key, shard, path[, objects]) rows, unordered (select orders them). Samples
    meet their objects on sample_id, one integer, not on (key, shard): the join of 100M objects is the cost."""
    sql = "WITH sel AS (SELECT key, shard, sample_id FROM samples WHERE (" + (where or "TRUE") + ")) "
    if object_where:
        sql += (
            ', ok AS (SELECT sample_id, list("index" ORDER BY "index") AS objects FROM ('
            "SELECT objects.*, samples.caption, samples.width, samples.height, samples.white_fraction FROM objects "
            "JOIN samples ON objects.sample_id = samples.sample_id) AS objects "
            "WHERE (" + object_where + ") GROUP BY sample_id) "
            "SELECT sel.key, sel.shard, shards.path, ok.objects FROM sel "
            "JOIN ok ON sel.sample_id = ok.sample_id JOIN shards ON sel.shard = shards.name"
        )
    else:
        sql += "SELECT sel.key, sel.shard, shards.path FROM sel JOIN shards ON sel.shard = shards.name"
    return sql


def load_selection(path: str | os.PathLike) -> dict[str, set[str]]:
    """Read a selection Parquet (`catalog select` output): {shard path: {keys}}. A missing file raises
    FileNotFoundError, a file that is not a selection ValueError: one line each, naming PATH."""
    table = _read(path, lambda f: pq.read_table(f, columns=["key", "path"]))
    out: dict[str, set[str]] = {}
    for key, shard_path in zip(table.column("key").to_pylist(), table.column("path").to_pylist()):
        out.setdefault(shard_path, set()).add(key)
    return out


def load_eligible_objects(path: str | os.PathLike) -> dict[str, list[int]] | None:
    """The `objects` column of a selection Parquet: {key: eligible object indices}; None when the selection was
    made without an object predicate (every object of a selected sample is eligible). Errors as load_selection's."""
    if "objects" not in _read(path, pq.read_schema).names:
        return None
    table = _read(path, lambda f: pq.read_table(f, columns=["key", "objects"]))
    return {k: list(v) for k, v in zip(table.column("key").to_pylist(), table.column("objects").to_pylist())}


def _read(path: str | os.PathLike, read):
    """read(the selection file PATH, local or a URL), its errors in one line that names PATH: pyarrow's own
    messages run over several lines and say nothing of what the file was for."""
    try:
        if is_local(path):
            return read(str(local_path(path)))
        with open_url(path) as f:
            return read(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"selection {os.fspath(path)}: no such file (`subjectdiff catalog select` writes one)"
        ) from None
    except (OSError, pa.ArrowException) as e:
        first = one_line(e)
        raise ValueError(f"selection {os.fspath(path)}: not a readable selection Parquet file ({first})") from None
