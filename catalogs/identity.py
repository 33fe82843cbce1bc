"""The identity sidecar: one Parquet file beside each shard, one row per object, holding an embedding of the
object's masked crop that says *which instance* it is (DINOv2 by default), where CLIP's says what it shows.
Cross-image pairs (catalogs/pairs.py) compare these.

    NNNNN.identity.parquet
        key        string                          the record key, as in NNNNN.samples.parquet
        index      int32                           the object's position in the record's `objects` (objects.index)
        label      string                          the object's label, so pairing can partition without a join
        embedding  fixed_size_list<halffloat>[D]   L2-normalized (cosine = dot)
    schema metadata `subjectdiff.identity`: {"model", "sha256", "dim", "normalized": true, ...}

Rows follow the shard's record order, objects in index order. float16 keeps a 768-d DINOv2-base embedding at
1.5 KB an object. A shard made without the identity stage has no sidecar and is complete all the same.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUFFIX = ".identity.parquet"
META_KEY = b"subjectdiff.identity"


def identity_schema(dim: int, meta: dict | None = None) -> pa.Schema:
    """The sidecar's schema for D = dim; meta (model, sha256, ...) goes into its metadata."""
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("index", pa.int32()),
            ("label", pa.string()),
            ("embedding", pa.list_(pa.float16(), dim)),
        ]
    )
    info = {**(meta or {}), "dim": dim, "normalized": True}
    return schema.with_metadata({META_KEY: json.dumps(info).encode()})


def identity_table(
    keys: list[str], indices: list[int], labels: list[str], embeddings: np.ndarray, meta: dict | None = None
) -> pa.Table:
    """keys, indices, labels (N,) and embeddings (N, D), any float dtype (stored float16) -> the sidecar table."""
    emb = np.ascontiguousarray(np.asarray(embeddings, np.float16))
    if emb.ndim != 2 or not (len(emb) == len(keys) == len(indices) == len(labels)):
        raise ValueError(
            f"need one (D,) embedding per object: {len(keys)} keys, {len(indices)} indices, "
            f"{len(labels)} labels, embeddings {emb.shape}"
        )
    dim = emb.shape[1] if len(emb) else int((meta or {}).get("dim", 0))
    arrays = [
        pa.array(keys, pa.string()),
        pa.array(indices, pa.int32()),
        pa.array(labels, pa.string()),
        embedding_column(emb, dim),
    ]
    return pa.Table.from_arrays(arrays, schema=identity_schema(dim, meta))


def write_identity(
    path: str | os.PathLike,
    keys: list[str],
    indices: list[int],
    labels: list[str],
    embeddings: np.ndarray,
    meta: dict | None = None,
) -> None:
    pq.write_table(identity_table(keys, indices, labels, embeddings, meta), path)


def embedding_column(emb: np.ndarray, dim: int | None = None) -> pa.FixedSizeListArray:
    """(N, D) embeddings -> the `embedding` column (fixed_size_list<halffloat>[D]); DIM when N is 0."""
    emb = np.ascontiguousarray(np.asarray(emb, np.float16))
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim or emb.shape[1])


def embedding_array(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """The `embedding` column (of a sidecar, or of any table that carries it) -> (N, D) float16."""
    dim = column.type.list_size
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float16, copy=False)


def read_identity(source) -> tuple[pa.Table, np.ndarray, dict]:
    """A sidecar (a path, a file object, or an already-read pa.Table) -> (its key/index/label columns as a table,
    the (N, D) float16 embeddings, the metadata)."""
    table = source if isinstance(source, pa.Table) else pq.read_table(source)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table.select(["key", "index", "label"]), embedding_array(table["embedding"]), meta


def read_footer(source) -> tuple[int, dict]:
    """A sidecar's (rows, metadata) from its Parquet footer alone: no embedding is read."""
    md = pq.read_metadata(source)
    return md.num_rows, json.loads((md.metadata or {}).get(META_KEY, b"{}"))
