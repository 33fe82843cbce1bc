"""The identity sidecars of a shard folder: every embedding at once (`read_folder`: video pairing, tests), or only
the footers' row counts (`read_footers`: retrieval pairing plans its shuffle from them, catalogs/pairs.py).

The one format lives in catalogs/identity.py; this module only walks a folder's complete shards (the writer's
`complete_names`, which the identity module cannot import: the writer imports it) and stacks their sidecars.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from subjectdiff.catalogs.identity import SUFFIX, read_footer, read_identity
from subjectdiff.catalogs.storage import Folder
from subjectdiff.catalogs.writer import complete_names


def read_folder(root: str | os.PathLike) -> tuple[pa.Table, np.ndarray, dict]:
    """The identity sidecars of every complete shard below ROOT (a local folder or an fsspec URL such as
    s3://bucket/out; recursively, as the catalog scans), in shard order, rows in each shard's record and object
    order -> (table, embeddings, meta):

        table       pa.Table: key string, index int32, label string, shard string (the shard id relative to
                    ROOT without extension, "00000" or "part-a/00000", as the catalog's `shard` column)
        embeddings  (N, D) float16, row i for table row i, L2-normalized (cosine = dot)
        meta        the sidecars' metadata ({"model", "sha256", "dim", "normalized", ...})

    Complete shards without a sidecar (made without the identity stage) add no rows; incomplete shards are
    skipped as every reader skips them. No sidecar at all: an empty table, a (0, 0) array and {}. ValueError
    when two shards' embeddings come from different models or dimensions (their cosines would mean nothing).
    """
    folder = Folder(root)
    tables, arrays, meta = [], [], {}
    for sid in sidecar_shards(folder):
        name = sid + SUFFIX
        with folder.open(name) as f:
            table, emb, m = read_identity(f)
        _check_same_model(meta, m, folder.join(name))
        meta = meta or m
        tables.append(table.append_column("shard", pa.array([sid] * table.num_rows, pa.string())))
        arrays.append(emb)
    if not tables:
        empty = pa.table({"key": pa.array([], pa.string()), "index": pa.array([], pa.int32())})
        empty = empty.append_column("label", pa.array([], pa.string()))
        return empty.append_column("shard", pa.array([], pa.string())), np.zeros((0, 0), np.float16), {}
    return pa.concat_tables(tables), np.concatenate(arrays), meta


def sidecar_shards(folder: Folder) -> list[str]:
    """The complete shards below FOLDER that have an identity sidecar, in shard order (one listing)."""
    listing = folder.listing()
    return [sid for sid in complete_names(listing) if sid + SUFFIX in listing]


def read_footers(root: str | os.PathLike, threads: int = 32) -> list[tuple[str, int]]:
    """(shard, identity rows) of each complete shard below ROOT with a sidecar, in shard order, as `read_folder`
    walks them, from the sidecars' footers alone (THREADS at a time: one small read each). ValueError when two
    shards' embeddings come from different models or dimensions."""
    folder = Folder(root)
    shards = sidecar_shards(folder)

    def footer(sid: str) -> tuple[int, dict]:
        with folder.open(sid + SUFFIX) as f:
            return read_footer(f)

    with ThreadPoolExecutor(threads) as pool:
        footers = list(pool.map(footer, shards))
    meta: dict = {}
    for sid, (_, m) in zip(shards, footers):
        _check_same_model(meta, m, folder.join(sid + SUFFIX))
        meta = meta or m
    return [(sid, rows) for sid, (rows, _) in zip(shards, footers)]


def _check_same_model(first: dict, meta: dict, url: str) -> None:
    if not first:
        return
    for k in ("model", "sha256", "dim"):
        if k == "sha256" and not (first.get(k) and meta.get(k)):  # a hub id not yet cached is recorded without
            continue
        if first.get(k) != meta.get(k):
            raise ValueError(
                f"{url}: identity embeddings of {k} {meta.get(k)!r}, earlier shards' {first.get(k)!r}: "
                "one folder's identities must come from one model"
            )
