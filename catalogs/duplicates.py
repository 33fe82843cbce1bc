"""Exact and near duplicates over the catalog's `sha256` and `phash` columns, without an all-pairs comparison.

The hashes themselves (what `sha256` and `phash` hold, bit order and sign) are catalogs/hashing.py's: the
Hamming distance of two phashes is `bit_count(xor(a, b))` in DuckDB, the same for the signed and the unsigned
reading.

Near pairs: a banded index (multi-index hashing, Manku et al. 2007 / Norouzi et al. 2012)
    The 64 bits are dealt into B bands, bit i to band i mod B (interleaved, so every band mixes low and high
    DCT frequencies and buckets fill evenly). Two hashes at distance d <= D differ in at most D bands
    (each flipped bit lies in one band), so at least B - D bands agree exactly: pigeonhole. Index every
    choice of K = B - D bands (C(B, K) tables, each keyed on the hash masked to those bands); a pair within
    D then shares the key of at least one table, so candidates are the pairs that share a key in some table,
    and `bit_count(xor(a, b)) <= D` keeps the true ones. Recall is exact by construction (1.0), not
    probabilistic. K = 1 is the classic "share one band" index (needs B > D bands of 64 / B bits).

    The cost is what picks B. Each table is one DuckDB hash self-join over the N distinct hashes; uniform
    hashes give N^2 / 2 / 2^k random candidates per table for a k-bit key. A key must hold about log2(N)
    bits to keep that near N, and K bands of 64 / B bits hold 64 (B - D) / B: more bands make longer keys
    but C(B, B - D) tables. `plan_bands` takes the B in (D, 64] that minimises
    C(B, B - D) * N + 3 * candidates (a candidate costs about three rows of a join: CANDIDATE_COST). For
    D = 4: N = 1M gives B = 6 (15 tables, 20-22-bit keys), N = 10M gives B = 7 (35 tables, 27-28-bit keys).
    The cost climbs steeply with D at a fixed N; measured on two cores (benchmarks/curation.py, uniform
    random hashes): D = 4 takes ~1 s at 1M and ~23 s at 10M (~1.5 GB); D = 5 ~90 s at 10M (56 tables);
    D = 6 ~20 s at 1M (84 tables); D = 8 ~340 s at 1M (495 tables).

The default distance, DEFAULT_MAX_DISTANCE = 4 (of 64 bits)
    Measured with imagehash on the bundled photos (datagen/sample_images) and scikit-image's: a copy resized
    to half and re-encoded as JPEG (quality 70) is at 0-2 bits; cropping 2 % off each side moves 2-8
    (most photos 4), 3 % 4-12, 5 % 8-18; unrelated photos sit near 32 (the median; a random pair is within 4
    with probability ~4e-14). D = 4 keeps every resize and re-encode with margin and the lightest crops,
    and at 10M hashes stays well inside a minute; larger D catch larger crops at more cost and more false
    pairs on images with flat, similar layouts. Pass `max_distance` (the CLI's --max-distance) to trade.
    Held-out exclusion (`near_held_out`) compares N samples with M << N held-out hashes, N * M / 2^k
    candidates, so it defaults wider (DEFAULT_EXCLUDE_DISTANCE = 8): a leaked evaluation subject costs more
    than a dropped training image.

Groups
    Near groups are the connected components of the graph whose edges join samples with the same sha256,
    the same phash, or phashes within D (chains can put two members further than D apart). A group's first
    member is the first in plan order: `order_by` (default "shard, key"; shards are written in plan order,
    the key within a shard is a hash of the source, so pass a plan-position column when there is one: the
    catalog's `samples.idx`, as `catalogs.catalog.PLAN_ORDER` = "shard, idx", which `find_duplicates`, the
    `catalog duplicates` command and `catalog select --dedup` use).
    `kind` is "exact" when all members share one sha256 (byte-identical copies), else "near"; `distance`
    is each member's phash distance to the first member (NULL where a phash is missing). group_id numbers the
    groups by their first member's plan order, from 0.

Everything here is DuckDB, pyarrow and numpy: no torch, no Ray (the catalogs/ rule).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from subjectdiff.catalogs.catalog import PLAN_ORDER, open_catalog
from subjectdiff.catalogs.hashing import hamming, to_int64
from subjectdiff.catalogs.storage import Folder

DEFAULT_MAX_DISTANCE = 4
DEFAULT_EXCLUDE_DISTANCE = 8
# A candidate pair costs about 3 rows of a table's join (measured: DuckDB 2.0, 10M hashes, two cores; a 27-bit
# key's table ~0.7 s with 0.4M candidates, a 24-bit key's ~1.2-1.6 s with 3M).
CANDIDATE_COST = 3.0

DUPS_SCHEMA = pa.schema(
    [
        ("group_id", pa.int64()),
        ("kind", pa.string()),  # "exact" | "near"
        ("key", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("distance", pa.int32()),  # phash bits to the group's first member; NULL where a phash is missing
    ]
)


def brute_force_pairs(left: np.ndarray, max_distance: int, right: np.ndarray | None = None) -> set[tuple[int, int]]:
    """All pairs within max_distance by comparing every pair: the reference for the banded search.

    left, right: int64 hash arrays. right None: pairs (a, b) of values of `left` with a < b; else every
    (a in left, b in right). O(len(left) * len(right)) with numpy: tests and benchmark samples only.
    """
    left = np.unique(np.asarray(left, np.int64))
    other = left if right is None else np.unique(np.asarray(right, np.int64))
    other_u = other.view(np.uint64)  # numpy's bitwise_count counts a signed value's absolute value's bits
    out = set()
    for a, a_u in zip(left, left.view(np.uint64)):
        d = np.bitwise_count(np.bitwise_xor(other_u, a_u))
        for b in other[d <= max_distance]:
            if right is not None or a < b:
                out.add((int(a), int(b)))
    return out


# -------------------------------------------------------------------------------------------- banded index


def band_bits(bands: int) -> list[list[int]]:
    """Band j holds bits {i : i mod B == j} (bit 0 the least significant): B lists of bit positions."""
    assert 1 <= bands <= 64, f"bands must be in [1, 64], got {bands}"
    return [list(range(j, 64, bands)) for j in range(bands)]


@dataclass(frozen=True)
class BandPlan:
    """The index that finds every pair within max_distance: one table per choice of key_bands of the bands
    (combos[t], in lexicographic order); table t keys each hash on `hash & masks[t]`, the bits of its bands.
    Masks are signed int64, as DuckDB's BIGINT holds them; band_masks[j] is band j's bits."""

    max_distance: int
    bands: int
    key_bands: int
    combos: tuple[tuple[int, ...], ...]
    masks: tuple[int, ...]
    band_masks: tuple[int, ...]
    key_bits: tuple[int, ...]
    estimated_candidates: float

    def first_table_rule(self, t: int) -> list[int]:
        """Band masks that must NOT agree for table t to own a pair. A pair agrees on a set A of bands and
        matches every table whose bands lie in A; it is kept by the first such table in lexicographic
        order, whose bands are the key_bands lowest of A. So table t owns it when no band below its
        highest one, and not its own, agrees: at most max_distance checks."""
        combo = self.combos[t]
        return [self.band_masks[j] for j in range(combo[-1]) if j not in combo]

    def describe(self) -> str:
        return (
            f"{self.bands} bands of {64 // self.bands}-{math.ceil(64 / self.bands)} bits, keys of "
            f"{self.key_bands} bands ({min(self.key_bits)}-{max(self.key_bits)} bits): {len(self.masks)} tables, "
            f"~{self.estimated_candidates:.3g} candidates to check"
        )


def _plan(bands: int, max_distance: int, pairs: float) -> tuple[BandPlan, float]:
    band_masks = [sum(1 << i for i in bits) for bits in band_bits(bands)]
    k = bands - max_distance
    combos = tuple(itertools.combinations(range(bands), k))
    masks = [sum(band_masks[j] for j in combo) for combo in combos]
    key_bits = tuple(m.bit_count() for m in masks)
    cand = sum(pairs / 2.0**b for b in key_bits)
    plan = BandPlan(
        max_distance,
        bands,
        k,
        combos,
        tuple(to_int64(m) for m in masks),
        tuple(to_int64(m) for m in band_masks),
        key_bits,
        cand,
    )
    return plan, cand


def plan_bands(
    n_left: int,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    *,
    n_right: int | None = None,
    bands: int | None = None,
    max_tables: int = 2000,
) -> BandPlan:
    """The band count for finding every pair within max_distance among n_left distinct hashes (or between
    n_left and n_right), by the cost model in the module docstring: per table, one pass over the rows plus
    the candidates a uniform hash gives its key. `bands` forces B (must exceed max_distance)."""
    assert 0 <= max_distance < 64, f"max_distance must be in [0, 63], got {max_distance}"
    pairs = n_left * (n_left - 1) / 2 if n_right is None else float(n_left) * n_right
    rows = n_left if n_right is None else n_left + n_right
    if bands is not None:
        if bands <= max_distance:
            raise ValueError(
                f"bands ({bands}) must exceed max_distance ({max_distance}): with B bands a pair "
                "within D < B bands always shares at least B - D of them, and none when D >= B"
            )
        return _plan(bands, max_distance, pairs)[0]
    best, best_cost = None, math.inf
    for b in range(max_distance + 1, 65):
        if math.comb(b, b - max_distance) > max_tables:
            continue
        plan, cand = _plan(b, max_distance, pairs)
        cost = len(plan.masks) * rows + CANDIDATE_COST * cand
        if cost < best_cost:
            best, best_cost = plan, cost
    assert best is not None, f"no band plan with at most {max_tables} tables for max_distance {max_distance}"
    return best


def connect(
    memory_limit: str | None = None, temp_directory: str | None = None, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection for the searches, with optional memory limit (spilling to
    temp_directory beyond it) and thread count."""
    con = duckdb.connect()
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if temp_directory:
        con.execute(f"SET temp_directory = '{temp_directory}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


_TMP = itertools.count()


def _tmp(prefix: str) -> str:
    return f"_dedup_{prefix}_{os.getpid()}_{next(_TMP)}"


def _as_relation(con: duckdb.DuckDBPyConnection, hashes, column: str = "h") -> str:
    """A new temp table (its name) of the DISTINCT non-null int64 values of `column`, as column h."""
    name = _tmp("h")
    if isinstance(hashes, str):
        con.execute(
            f"CREATE TEMP TABLE {name} AS SELECT DISTINCT {column} AS h FROM {hashes} WHERE {column} IS NOT NULL"
        )
    else:
        arr = (
            hashes
            if isinstance(hashes, (pa.Table, pa.RecordBatch))
            else pa.table({column: np.asarray(hashes, np.int64)})
        )
        view = _tmp("v")
        con.register(view, arr)
        try:
            con.execute(
                f"CREATE TEMP TABLE {name} AS SELECT DISTINCT CAST({column} AS BIGINT) AS h FROM {view} "
                f"WHERE {column} IS NOT NULL"
            )
        finally:
            con.unregister(view)
    return name


def near_pairs(
    con: duckdb.DuckDBPyConnection,
    left,
    right=None,
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    bands: int | None = None,
    column: str = "h",
    plan: BandPlan | None = None,
) -> pa.Table:
    """Every pair of distinct hash values within max_distance bits, by the banded index.

    left, right: a table or view name on `con` with an int64 `column`, a pyarrow table with one, or an array
    of int64. right None: pairs within left, a < b (equal values are one value: identical hashes are no
    pair here; `duplicate_groups` groups them). Else pairs (a in left, b in right), identical values included.
    Returns a table (a: int64, b: int64, distance: int32), each pair once.

    Each table of the plan is one hash join; a pair that shares the keys of several tables is kept only by
    the first of them (`BandPlan.first_table_rule`), so no DISTINCT over the output is needed.
    """
    lname = _as_relation(con, left, column)
    rname = lname
    if right is not None:
        rname = _as_relation(con, right, column)
    out = _tmp("pairs")
    try:
        n_left = con.execute(f"SELECT count(*) FROM {lname}").fetchone()[0]
        n_right = None if right is None else con.execute(f"SELECT count(*) FROM {rname}").fetchone()[0]
        plan = plan or plan_bands(n_left, max_distance, n_right=n_right, bands=bands)
        assert plan.max_distance == max_distance, "the plan was made for another max_distance"
        con.execute(f"CREATE TEMP TABLE {out} (a BIGINT, b BIGINT, distance INTEGER)")
        order = "AND l.h < r.h" if right is None else ""
        for t, mask in enumerate(plan.masks):
            m = f"CAST(({mask}) AS BIGINT)"  # parenthesized: -9223372036854775808::BIGINT would overflow
            earlier = "".join(f" AND (xor(l.h, r.h) & CAST(({e}) AS BIGINT)) <> 0" for e in plan.first_table_rule(t))
            con.execute(
                f"INSERT INTO {out} SELECT l.h, r.h, CAST(bit_count(xor(l.h, r.h)) AS INTEGER) "
                f"FROM {lname} l JOIN {rname} r ON (l.h & {m}) = (r.h & {m}) {order} "
                f"WHERE bit_count(xor(l.h, r.h)) <= {int(max_distance)}{earlier}"
            )
        return con.sql(f"SELECT a, b, distance FROM {out} ORDER BY a, b").to_arrow_table()
    finally:
        for name in {lname, rname, out}:
            con.execute(f"DROP TABLE IF EXISTS {name}")


# ------------------------------------------------------------------------------------------------- groups


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        root = parent.setdefault(x, x)
        while root != parent[root]:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _source_sql(con: duckdb.DuckDBPyConnection, samples) -> tuple[str, str | None]:
    """(relation name, a view we registered to drop later) for a table name or an Arrow table."""
    if isinstance(samples, str):
        return samples, None
    view = _tmp("samples")
    con.register(view, samples)
    return view, view


def duplicate_groups(
    con: duckdb.DuckDBPyConnection,
    samples="samples",
    *,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    bands: int | None = None,
    order_by: str = "shard, key",
) -> pa.Table:
    """Groups of exact and near duplicates (module docstring): one row per sample in a group, DUPS_SCHEMA
    (group_id, kind, key, source, shard, distance), ordered by group_id then plan order.

    samples: a table or view on `con` (the catalog's `samples`), or a pyarrow table, with columns key, shard,
    source, sha256 (hex string, may be NULL) and phash (int64, may be NULL), plus what `order_by` names.
    Only the members are brought into Python: the search runs in DuckDB over the distinct hashes.
    """
    rel, view = _source_sql(con, samples)
    try:
        edges = near_pairs(con, rel, column="phash", max_distance=max_distance, bands=bands)
        edge_hashes = _tmp("eh")
        con.register(
            edge_hashes, pa.table({"h": pa.concat_arrays([edges["a"].combine_chunks(), edges["b"].combine_chunks()])})
        )
        try:
            # Members: a phash shared by 2+ samples or in a near pair, or a sha256 whose copies do not all
            # share one phash (a NULL phash, or hashes made by another version): all other samples are alone.
            members = con.sql(f"""
                WITH shared_p AS (SELECT phash FROM {rel} WHERE phash IS NOT NULL GROUP BY phash HAVING count(*) > 1),
                     shared_s AS (SELECT sha256 FROM {rel} WHERE sha256 IS NOT NULL GROUP BY sha256
                                  HAVING count(*) > 1 AND (count(DISTINCT phash) > 1 OR count(phash) < count(*)))
                SELECT key, shard, source, sha256, phash FROM {rel}
                WHERE phash IN (SELECT phash FROM shared_p) OR phash IN (SELECT h FROM {edge_hashes})
                   OR sha256 IN (SELECT sha256 FROM shared_s)
                ORDER BY {order_by}""").to_arrow_table()
        finally:
            con.unregister(edge_hashes)
    finally:
        if view:
            con.unregister(view)
    return _group_members(members, edges)


def _group_members(members: pa.Table, edges: pa.Table) -> pa.Table:
    """Members in plan order + near edges between phash values -> DUPS_SCHEMA rows (union-find over the
    phash and sha256 nodes of the members only)."""
    uf = _UnionFind()
    keys, shards, sources = (members[c].to_pylist() for c in ("key", "shard", "source"))
    shas, phs = members["sha256"].to_pylist(), members["phash"].to_pylist()
    nodes = []
    for sha, ph in zip(shas, phs):
        node = ("p", ph) if ph is not None else ("s", sha)
        uf.find(node)
        if ph is not None and sha is not None:
            uf.union(node, ("s", sha))
        nodes.append(node)
    for a, b in zip(edges["a"].to_pylist(), edges["b"].to_pylist()):
        uf.union(("p", a), ("p", b))
    comp = [uf.find(n) for n in nodes]
    size: dict = {}
    for c in comp:
        size[c] = size.get(c, 0) + 1
    first: dict = {}  # component -> (group_id, index of its first member in plan order)
    for i, c in enumerate(comp):
        if size[c] > 1 and c not in first:
            first[c] = (len(first), i)
    rows = [i for i, c in enumerate(comp) if size[c] > 1]
    kinds: dict = {}
    for i in rows:
        kinds.setdefault(comp[i], set()).add(shas[i])
    rows.sort(key=lambda i: (first[comp[i]][0], i))
    out = {name: [] for name in DUPS_SCHEMA.names}
    for i in rows:
        gid, f = first[comp[i]]
        s = kinds[comp[i]]
        out["group_id"].append(gid)
        out["kind"].append("exact" if len(s) == 1 and None not in s else "near")
        out["key"].append(keys[i])
        out["source"].append(sources[i])
        out["shard"].append(shards[i])
        out["distance"].append(None if phs[i] is None or phs[f] is None else hamming(phs[i], phs[f]))
    return pa.table(out, schema=DUPS_SCHEMA)


def write_duplicates(table: pa.Table, out: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Write dups.parquet atomically (a temporary name, then rename); meta goes into the schema metadata
    under `subjectdiff.duplicates` (e.g. the catalog, max_distance and the band plan)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if meta:
        table = table.replace_schema_metadata({b"subjectdiff.duplicates": json.dumps(meta).encode()})
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------- select helpers


def dedup_drop(
    con: duckdb.DuckDBPyConnection,
    mode: str,
    samples="samples",
    *,
    where: str | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    order_by: str = "shard, key",
    groups: pa.Table | None = None,
) -> pa.Table:
    """The (key, shard) rows `select --dedup MODE` drops: every member of a group but its first selected one.

    mode "exact": groups are samples with one sha256; "near": `duplicate_groups` (which contain the exact
    ones), or the given `groups` (a dups.parquet table, e.g. made with another --max-distance). Groups are
    the catalog's; where: the selection's predicate over `samples`, applied before choosing, so a group
    whose first member is not selected keeps its first selected member. Plan order is `order_by` (for
    "near" with `groups`: the order of the rows within each group, as dups.parquet keeps it).
    """
    if mode not in ("exact", "near"):
        raise ValueError(f"--dedup {mode!r}: use 'exact' or 'near'")
    rel, view = _source_sql(con, samples)
    pred = f"({where})" if where else "TRUE"
    try:
        if mode == "exact":
            return con.sql(f"""
                SELECT key, shard FROM (
                    SELECT key, shard, row_number() OVER (PARTITION BY sha256 ORDER BY {order_by}) AS nth
                    FROM {rel} WHERE sha256 IS NOT NULL AND {pred})
                WHERE nth > 1 ORDER BY shard, key""").to_arrow_table()
        if groups is None:
            groups = duplicate_groups(con, rel, max_distance=max_distance, order_by=order_by)
        g = _tmp("groups")
        con.register(g, groups.append_column("member", pa.array(np.arange(groups.num_rows), pa.int64())))
        try:
            return con.sql(f"""
                WITH sel AS (SELECT g.key, g.shard, g.group_id, g.member FROM {g} g
                             JOIN (SELECT key, shard FROM {rel} WHERE {pred}) s USING (key, shard))
                SELECT key, shard FROM (
                    SELECT key, shard, row_number() OVER (PARTITION BY group_id ORDER BY member) AS nth FROM sel)
                WHERE nth > 1 ORDER BY shard, key""").to_arrow_table()
        finally:
            con.unregister(g)
    finally:
        if view:
            con.unregister(view)


def near_held_out(
    con: duckdb.DuckDBPyConnection,
    held_out: pa.Table,
    samples="samples",
    *,
    max_distance: int = DEFAULT_EXCLUDE_DISTANCE,
    bands: int | None = None,
) -> pa.Table:
    """Samples within max_distance of any held-out hash (what `select --exclude-near` drops).

    held_out: (name, phash) as `held_out_hashes` returns. Returns (key, shard, source, held_out, distance):
    one row per sample, with its nearest held-out image (ties: the first name), ordered by shard, key.
    """
    rel, view = _source_sql(con, samples)
    try:
        pairs = near_pairs(con, rel, held_out, column="phash", max_distance=max_distance, bands=bands)
        p, h = _tmp("pairs"), _tmp("held")
        con.register(p, pairs)
        con.register(h, held_out)
        try:
            return con.sql(f"""
                SELECT key, shard, source, held_out, distance FROM (
                    SELECT s.key, s.shard, s.source, h.name AS held_out, p.distance,
                           row_number() OVER (PARTITION BY s.key, s.shard ORDER BY p.distance, h.name) AS nth
                    FROM {rel} s JOIN {p} p ON s.phash = p.a JOIN {h} h ON h.phash = p.b)
                WHERE nth = 1 ORDER BY shard, key""").to_arrow_table()
        finally:
            con.unregister(p)
            con.unregister(h)
    finally:
        if view:
            con.unregister(view)


# --------------------------------------------------------------------------------------- on a catalog


def require_hashes(con: duckdb.DuckDBPyConnection, column: str, samples: str = "samples") -> None:
    """A ValueError when SAMPLES has rows but none with COLUMN: its shards were made without the curate stage
    (or before it existed), and a duplicate search would silently find nothing."""
    n, have = con.execute(f"SELECT count(*), count({column}) FROM {samples}").fetchall()[0]
    if n and not have:
        raise ValueError(
            f"no sample of the catalog has a {column} (its shards were made without the curate "
            "stage, or before it existed): nothing to compare"
        )


def find_duplicates(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    catalog: str | os.PathLike | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    bands: int | None = None,
    order_by: str | None = None,
    memory_limit: str | None = None,
    temp_directory: str | None = None,
) -> pa.Table:
    """`subjectdiff catalog duplicates`: the duplicate groups of ROOT's catalog (duplicate_groups, in plan order
    `catalogs.catalog.PLAN_ORDER` unless order_by says otherwise) written to OUT (dups.parquet, DUPS_SCHEMA,
    its metadata naming the catalog, the distance, the band plan and the order). Returns the table.

    memory_limit / temp_directory: DuckDB's, for catalogs whose hash joins outgrow memory (it spills there).
    """
    order_by = order_by or PLAN_ORDER
    settings = {k: v for k, v in (("memory_limit", memory_limit), ("temp_directory", temp_directory)) if v}
    with open_catalog(root, catalog=catalog, settings=settings) as con:
        require_hashes(con, "phash")
        n = con.execute("SELECT count(DISTINCT phash) FROM samples").fetchall()[0][0]
        plan = plan_bands(n, max_distance, bands=bands)
        groups = duplicate_groups(con, max_distance=max_distance, order_by=order_by, bands=plan.bands)
    kinds = groups["kind"].to_pylist()
    meta = {
        "catalog": Folder(root).url,
        "max_distance": max_distance,
        "bands": plan.describe(),
        "order_by": order_by,
        "created": time.time(),
        "rows": groups.num_rows,
        "groups": len(set(groups["group_id"].to_pylist())),
        "exact_rows": kinds.count("exact"),
        "near_rows": kinds.count("near"),
    }
    write_duplicates(groups, out, meta=meta)
    return groups
