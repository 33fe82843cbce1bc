"""The image-embedding sidecar: one Parquet file beside each shard, one row per sample, so later signals
(a semantic dedup, another score) need no second pass of the CLIP model.

    NNNNN.clip.parquet
        key             string                              the record key, as in NNNNN.parquet
        clip_embedding  fixed_size_list<halffloat>[D]        L2-normalized image embedding (cosine = dot)
    schema metadata `subjectdiff.embeddings`: {"model", "pretrained", "dim", "normalized": true}

Rows follow the shard's record order. float16 keeps 768-d ViT-L-14 embeddings at 1.5 KB a sample (about
1.5 GB per million); the rounding moves a cosine by ~1e-3. DuckDB reads the column as FLOAT[] (cast to
FLOAT[768] for `array_cosine_similarity`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SUFFIX = ".clip.parquet"
META_KEY = b"subjectdiff.embeddings"


def embedding_schema(dim: int, meta: dict | None = None) -> pa.Schema:
    """The sidecar's schema for D = dim; meta (model, pretrained) goes into its metadata."""
    schema = pa.schema([("key", pa.string()), ("clip_embedding", pa.list_(pa.float16(), dim))])
    info = {**(meta or {}), "dim": dim, "normalized": True}
    return schema.with_metadata({META_KEY: json.dumps(info).encode()})


def embedding_table(keys: list[str], embeddings: np.ndarray, meta: dict | None = None) -> pa.Table:
    """keys (N,) and embeddings (N, D), any float dtype (stored float16) -> the sidecar table."""
    emb = np.ascontiguousarray(np.asarray(embeddings, np.float16))
    if emb.ndim != 2 or len(emb) != len(keys):
        raise ValueError(f"need one (D,) embedding per key: {len(keys)} keys, embeddings {emb.shape}")
    dim = emb.shape[1] if len(emb) else int((meta or {}).get("dim", 0))
    values = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), values], schema=embedding_schema(dim, meta))


def write_embeddings(
    path: str | os.PathLike, keys: list[str], embeddings: np.ndarray, meta: dict | None = None
) -> None:
    pq.write_table(embedding_table(keys, embeddings, meta), path)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray, dict]:
    """(keys, (N, D) float16 embeddings, metadata) of a sidecar."""
    table = pq.read_table(path)
    dim = table.schema.field("clip_embedding").type.list_size
    values = table["clip_embedding"].combine_chunks().values.to_numpy(zero_copy_only=False)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table["key"].to_pylist(), values.reshape(-1, dim).astype(np.float16, copy=False), meta
