"""Cross-image subject pairs: the same subject in two different images, one row per directed pair.

    pairs.parquet (PAIR_SCHEMA)
        ref_key, ref_index        the reference object: its record key and position in the record's objects
        target_key, target_index  the target object, in another image
        label                     the (shared) label of the two objects
        method                    "video" | "retrieval" (how the pair was mined)
        similarity                cosine of the two objects' identity embeddings (catalogs/identity.py)
        frame_gap                 |target frame - reference frame| for video pairs, null for retrieval pairs
        change                    how different the two appearances are, in [0, 1]: 1 - the IoU of the two
                                  boxes after aligning their centres and scales is 0 for a pure move or zoom;
                                  the pair is worth learning from when the pixels changed (see phash_distance)
        phash_distance            Hamming distance of the two images' 64-bit phashes (0 = near-duplicate frames)

A pair (a, b) is stored in both directions, (a -> b) and (b -> a): either object can be the subject image
(reference) of a training sample whose target is the other. Training (`train --pairs`) takes the subject image
from the reference object and the target image, box, mask and localization tokens from the target object.

Mining (`subjectdiff catalog pairs DIR --method video|retrieval --out pairs.parquet`; `find_pairs`)
    Both methods read the identity sidecars of DIR's complete shards and the catalog (the objects' boxes, the
    samples' video fields, source and phash), so `catalog build DIR` runs first. The objects are numbered in
    shard order, then record and object order (a shard's first row: the identity rows of the shards before it);
    the pairs file is sorted by that numbering.

    video      two objects with the same label in two frames of one video (samples.video; frames differ),
               cosine >= min_sim in one shot (>= min_sim_across_shots across a cut), each the other's best
               match in the other frame, and different enough to teach something: phash distance >= min_phash
               or change >= min_change. DuckDB makes the candidates (same video, label, another frame), numpy
               the dot products. Videos are independent partitions: shuffled by video (below), whole videos
               packed into buckets of up to VIDEO_GROUP_OBJECTS objects.
    retrieval  each object's k nearest objects of its label by cosine (faiss IVF-Flat or HNSW-Flat over inner
               products, exact numpy search for small labels), keeping those >= min_sim from another source
               (samples.source, or the video for frames) and not near duplicates (phash distance >= min_phash).
               Each neighbour edge is stored in both directions. Labels are independent partitions, so the
               embeddings are shuffled by label (below) and the calling process holds none of them.

    `change` is `box_change` of the two boxes in pixels: both moved to one centre and scaled to unit area,
    1 - their IoU = 2 (1 - s) / (2 - s) with s = sqrt(min(r1, r2) / max(r1, r2)), r = width / height. A phash
    the catalog lacks (sidecars written without the curate stage) is computed from the image.

The shuffle (issue #21: 100M objects, or 10M of DINOv2's 768 dimensions, ~19 GB of embeddings), by label for
retrieval and by video for video pairs (`by`, a "partition" below)
    plan     (calling process, `plan_pairs`) the sidecars' row counts from their Parquet footers (hence each
             shard's first row) and each partition's object count from the catalog (SQL over the objects of the
             shards with a sidecar); the partitions are packed in order into about REDUCE_TASKS buckets of at
             most BUCKET_OBJECTS objects (VIDEO_GROUP_OBJECTS for videos; a larger one is a bucket alone); the
             shards are cut into groups of about MAP_OBJECTS rows.
    map      (a task a group, `map_shards`) the group's sidecars joined with its catalog rows (which the calling
             process reads per group, _MAP_SQL: origin as a 63-bit hash, since pairing only compares origins)
             -> one map file in the staging folder: row, key, index, label, origin, phash, box (and video,
             shot, frame for video pairs), embedding, a bucket's rows in row groups of their own.
    reduce   (a task a bucket, `reduce_bucket`) the bucket's row groups of every map file -> each label's
             search (partition_edges, label_rows), or the bucket's video pairs (video_part) -> one part.
    Map and reduce run as Ray tasks (one CPU; a bucket with a faiss label the CPUs split among such buckets)
    when there are more than LOCAL_OBJECTS objects, else the same functions in the calling process, a task at a
    time. The calling process holds the labels (or videos), the shard list, one group's catalog rows and one
    merge batch: nothing that grows with the objects but the shard list and its labels or videos.

Memory: the pairs are never gathered in one process either. Each reduce task writes its rows, both directions, sorted
by (reference, target), as a part file (PART_SCHEMA: the objects' rows and keys) in a staging folder beside the output
(OUT.parts/, local or a URL as OUT is; removed at the end, the map files after the reduce); the calling process then
merges the parts into OUT one range of reference objects at a time (`merge_parts`, ~ROWS_PER_BATCH rows in memory) and
loads OUT into the catalog as a stream. On a Ray cluster, OUT and DIR must be URLs or on a filesystem every node
shares: the tasks read the sidecars and write the map files and parts where they run.

The catalog's `pairs` table holds the same columns; `catalog pairs` replaces that method's rows. A catalog build
keeps them (they come from no shard file, so a rebuild cannot reload them), except the pairs of a shard the build
drops or reloads, whose objects may have changed: run `catalog pairs` again after adding or changing shards.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from subjectdiff.catalogs import identity, images
from subjectdiff.catalogs.catalog import CatalogError, one_line, open_catalog, replace_pairs
from subjectdiff.catalogs.hashing import phash_int64
from subjectdiff.catalogs.identity_folder import read_footers
from subjectdiff.catalogs.report.thumbnails import image_member, missing, read_records
from subjectdiff.catalogs.storage import Folder, is_local, local_path, open_url, row_group_batches

METHODS = ("video", "retrieval")

PAIR_SCHEMA = pa.schema(
    [
        ("ref_key", pa.string()),
        ("ref_index", pa.int32()),
        ("target_key", pa.string()),
        ("target_index", pa.int32()),
        ("label", pa.string()),
        ("method", pa.string()),
        ("similarity", pa.float32()),
        ("frame_gap", pa.int64()),
        ("change", pa.float32()),
        ("phash_distance", pa.int32()),
    ]
)

# A staging part's rows: a, b (reference, target) are the objects' rows in find_pairs' numbering (shard, record,
# object order), which the merge sorts by; the pairs file's columns but `method` follow, so the merge writes the
# pairs file from the parts alone (this process holds no table of the objects).
PART_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), *(f for f in PAIR_SCHEMA if f.name != "method")])
# Rows the merge holds at a time (about 80 bytes each with their keys) and the pairs file's row groups; a part's
# row groups are smaller: the merge holds one of each part (a few hundred parts at 100M objects), and a step
# reads little past its range.
ROWS_PER_BATCH = 1 << 20
PART_ROW_GROUP = 1 << 14
# A video bucket (a reduce task of the video method) packs whole videos up to this many objects: its candidate
# pairs (every two objects of a label in two frames of one video) are held at once.
VIDEO_GROUP_OBJECTS = 1 << 18

INDEXES = ("ivf", "hnsw", "exact")
IDENTITY_HINT = (
    "run datagen with the identity stage on, which writes NNNNN.identity.parquet beside each shard, then "
    "`subjectdiff catalog build DIR`"
)
# (done, total, what) after each piece of work: the CLI shows it as a progress line (subjectdiff/progress.py
# lives on the floor, above catalogs/, so the command hands the line in).
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PairConfig:
    """What makes two objects a pair (module docstring). Checked here: a bad value is a one-line error.

    min_sim: cosine of the identity embeddings; min_sim_across_shots: the same for video pairs in two shots
    (a cut can show another instance of the label, so the bar is higher; never below min_sim); min_phash:
    phash bits (of 64) the two images differ in (video: enough pixels changed; retrieval: closer is a near
    duplicate, dropped);
    min_change: the box change (box_change) that makes a video pair worth keeping when the phashes are close;
    max_gap: video pairs at most this many frames apart (None: any); k: retrieval neighbours kept per object;
    search_k: neighbours fetched before the same-source and near-duplicate filters (None: 3 k + 1); index:
    "ivf" (faiss IVF-Flat, inner product), "hnsw" (faiss HNSW-Flat) or "exact" (numpy); nprobe / ef_search:
    the IVF lists / HNSW candidates a query visits; brute_force_max: a label with at most this many objects is
    searched exactly in numpy, in a bucket of small labels (module docstring); num_cpus: Ray's CPUs when it is
    started here, or the threads of a faiss label searched in this process (None: every core)."""

    min_sim: float = 0.6
    min_sim_across_shots: float = 0.75
    min_phash: int = 8
    min_change: float = 0.1
    max_gap: int | None = None
    k: int = 10
    search_k: int | None = None
    index: str = "ivf"
    nprobe: int = 32
    ef_search: int = 64
    brute_force_max: int = 8192
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_sim", "min_sim_across_shots"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is {getattr(self, name)}: a cosine, in [-1, 1]")
        if not 0 <= self.min_phash <= 64:
            raise ValueError(f"min_phash is {self.min_phash}: phash bits, in [0, 64]")
        if not 0.0 <= self.min_change <= 1.0:
            raise ValueError(f"min_change is {self.min_change}: in [0, 1]")
        if self.k < 1 or (self.search_k is not None and self.search_k < self.k):
            raise ValueError(f"k is {self.k}, search_k {self.search_k}: need 1 <= k <= search_k")
        if self.index not in INDEXES:
            raise ValueError(f"index {self.index!r}: one of {', '.join(INDEXES)}")
        if self.nprobe < 1 or self.ef_search < 1 or self.brute_force_max < 0:
            raise ValueError("nprobe and ef_search must be >= 1, brute_force_max >= 0")

    @property
    def fetch(self) -> int:
        return self.search_k if self.search_k is not None else 3 * self.k + 1


# ------------------------------------------------------------------------------------------- measures


def box_change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How much the shape of a box changed, ignoring where it is and how big it is: (N,) in [0, 1].

    a, b: (N, 4) xyxy boxes in pixels (or in any units with the same scale on both axes). Each box is
    moved to a common centre and scaled to unit area (w' = sqrt(w / h), h' = sqrt(h / w)); change is 1 - the
    IoU of the two. With s = sqrt(min(r_a, r_b) / max(r_a, r_b)) for aspect ratios r = w / h, the
    intersection is s and the union 2 - s, so change = 1 - s / (2 - s) = 2 (1 - s) / (2 - s). It is
    symmetric, 0 exactly when the aspect ratios agree (a pure move or zoom of a box) and tends to 1 as one
    box turns into a sliver of the other's shape. Degenerate boxes (a side <= 0) count as 1e-6 wide.
    """
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    ra = np.maximum(a[:, 2] - a[:, 0], 1e-6) / np.maximum(a[:, 3] - a[:, 1], 1e-6)
    rb = np.maximum(b[:, 2] - b[:, 0], 1e-6) / np.maximum(b[:, 3] - b[:, 1], 1e-6)
    s = np.sqrt(np.minimum(ra, rb) / np.maximum(ra, rb))
    return np.clip(2.0 * (1.0 - s) / (2.0 - s), 0.0, 1.0)


def pair_change(boxes: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """box_change of boxes[a] and boxes[b] (boxes (N, 4), a, b (M,) rows) -> (M,) float32, CHUNK rows at a time:
    two (M, 4) float64 gathers would be 64 bytes a pair."""
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), chunk):
        out[s : s + chunk] = box_change(boxes[a[s : s + chunk]], boxes[b[s : s + chunk]])
    return out


def phash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of int64 phashes (catalogs/hashing.py): (N,) int32 in [0, 64]."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64)
    return np.bitwise_count(x).astype(np.int32)


def cosine(emb: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """emb (N, D) L2-normalized; i, j (M,) row indices -> (M,) float32 dot products (chunked: float32 copies
    of M rows at a time)."""
    out = np.empty(len(i), np.float32)
    for s in range(0, len(i), chunk):
        a = emb[i[s : s + chunk]].astype(np.float32)
        out[s : s + chunk] = np.einsum("nd,nd->n", a, emb[j[s : s + chunk]].astype(np.float32))
    return out


# --------------------------------------------------------------------------------- objects and phashes


def pc_is_null(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)


def _fill_phash(root: Folder, table: pa.Table, keys: list[str], tars: dict[str, str]) -> pa.Table:
    """TABLE with the phash of KEYS' images computed (catalogs.hashing.phash_int64 of the decoded image, as
    the curate stage hashes) where the catalog has none; a record whose image cannot be read is an error."""
    shard_of = dict(zip(table["key"].to_pylist(), table["shard"].to_pylist()))
    wanted = [(k, shard_of[k]) for k in keys]
    members, errors = read_records(root, wanted, tars)
    hashes = {}
    for key, shard in wanted:
        why = missing(members, errors, key, shard)
        if why is not None:
            raise CatalogError(f"no phash for record {key} and its image cannot be read: {why}")
        _, raw = image_member(members[(shard, key)])
        with images.no_pil_pixel_limit():
            hashes[key] = phash_int64(images.decode(raw).pixels)
    filled = [h if h is not None else hashes[k] for k, h in zip(table["key"].to_pylist(), table["phash"].to_pylist())]
    return table.set_column(table.schema.get_field_index("phash"), "phash", pa.array(filled, pa.int64()))


def _col(table: pa.Table, name: str, dtype=None) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False) if dtype is None else table[name].to_numpy().astype(dtype)


def _boxes(table: pa.Table) -> np.ndarray:
    """(N, 4) float64 pixel xyxy boxes of TABLE's rows (its x0, y0, x1, y1 columns)."""
    return np.stack([table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in ("x0", "y0", "x1", "y1")], 1)


# ------------------------------------------------------------------------------------------------ video

_VIDEO_SQL = """
SELECT a.r AS a, b.r AS b, (a.shot = b.shot) AS same_shot, b.frame - a.frame AS gap
FROM obj a JOIN obj b ON a.video = b.video AND a.label = b.label AND a.frame < b.frame
WHERE $max_gap IS NULL OR b.frame - a.frame <= $max_gap
"""

_MUTUAL_SQL = """
SELECT * FROM cand
QUALIFY row_number() OVER (PARTITION BY a, kb ORDER BY sim DESC, b) = 1
    AND row_number() OVER (PARTITION BY b, ka ORDER BY sim DESC, a) = 1
"""


def video_pairs(objects: pa.Table, emb: np.ndarray, cfg: PairConfig) -> dict[str, np.ndarray]:
    """Video pairs among OBJECTS (a bucket's rows: key, label, video, shot, frame, phash, x0, y0, x1, y1 in
    pixels, i) with embeddings EMB (rows by objects.i): one direction
    (a earlier than b), as arrays a, b (rows of OBJECTS), similarity, frame_gap, change, phash_distance.

    Candidates (DuckDB): same video, same label, a later frame (within max_gap). Then the cosine; the
    same-shot bar min_sim, the across-shots bar min_sim_across_shots; of the candidates left, the mutual best
    match of each object in the other frame (two dogs in both frames pair dog with dog, not each with both);
    last, the two appearances must differ: phash distance >= min_phash or box_change >= min_change."""
    in_video = ~pc_is_null(objects["video"])
    video, rows = objects.filter(pa.array(in_video)), np.flatnonzero(in_video)
    obj = pa.table(
        {
            "r": rows,
            "video": video["video"],
            "label": video["label"],
            "shot": video["shot"],
            "frame": video["frame"],
        }
    )
    con = duckdb.connect()
    try:
        con.register("obj", obj)
        cand = con.sql(_VIDEO_SQL, params={"max_gap": cfg.max_gap}).to_arrow_table()
        a, b = _col(cand, "a", np.int64), _col(cand, "b", np.int64)
        ei = _col(objects, "i", np.int64)
        sim = cosine(emb, ei[a], ei[b])
        bar = np.where(_col(cand, "same_shot", bool), cfg.min_sim, max(cfg.min_sim, cfg.min_sim_across_shots))
        keep = sim >= bar
        keys = np.asarray(objects["key"].to_pylist(), object)
        kept = pa.table(
            {
                "a": a[keep],
                "b": b[keep],
                "ka": keys[a[keep]].tolist(),
                "kb": keys[b[keep]].tolist(),
                "sim": sim[keep],
                "gap": _col(cand, "gap", np.int64)[keep],
            }
        )
        con.register("cand", kept)
        best = con.sql(_MUTUAL_SQL + " ORDER BY a, b").to_arrow_table()
    finally:
        con.close()
    a, b = _col(best, "a", np.int64), _col(best, "b", np.int64)
    boxes, phash = _boxes(objects), _col(objects, "phash", np.int64)
    change = box_change(boxes[a], boxes[b]).astype(np.float32)
    dist = phash_distance(phash[a], phash[b])
    differ = (dist >= cfg.min_phash) | (change >= cfg.min_change)
    return {
        "a": a[differ],
        "b": b[differ],
        "similarity": _col(best, "sim", np.float32)[differ],
        "frame_gap": _col(best, "gap", np.int64)[differ],
        "change": change[differ],
        "phash_distance": dist[differ],
    }


def video_part(table: pa.Table, emb: np.ndarray, rows: np.ndarray, cfg: PairConfig) -> pa.Table:
    """One bucket's video pairs (video_pairs over whole videos: TABLE, a map file's rows with their video, shot
    and frame; EMB (n, D) its embeddings; ROWS (n,) their rows in find_pairs' numbering) -> a PART_SCHEMA table,
    both directions, sorted by (a, b)."""
    objects = table.append_column("i", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    found = video_pairs(objects, emb, cfg)
    swap = {"a": "b", "b": "a"}
    cols = {k: np.concatenate([v, found[swap.get(k, k)]]) for k, v in found.items()}
    cols = _keyed(cols, objects.select(["key", "index", "label"]), cols["a"], cols["b"])
    cols["a"], cols["b"] = rows[cols["a"]], rows[cols["b"]]
    return sorted_part(part_table(cols))


# -------------------------------------------------------------------------------------------- retrieval


def knn(emb: np.ndarray, fetch: int, cfg: PairConfig, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The FETCH nearest rows of each row of EMB (n, D), itself included, by inner product: (I, S), both
    (n, min(fetch, n)), each row by decreasing similarity; I is -1 where an approximate index found fewer.
    Exact (numpy, blocks of rows) for `index = "exact"` or n <= brute_force_max; else faiss ("ivf":
    IVF-Flat with 4 sqrt(n) lists trained on a seeded sample, `nprobe` lists searched; "hnsw": HNSW-Flat,
    32 links, `ef_search`), on THREADS threads."""
    emb = np.ascontiguousarray(emb, np.float32)
    n, f = len(emb), min(fetch, len(emb))
    if cfg.index == "exact" or n <= cfg.brute_force_max:
        return _exact_knn(emb, f)
    import faiss  # heavy, and only large partitions need it

    faiss.omp_set_num_threads(threads)
    index = _faiss_index(emb, cfg)
    scores, ids = index.search(emb, f)
    return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)


def _exact_knn(emb: np.ndarray, f: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    ids, scores = np.empty((len(emb), f), np.int64), np.empty((len(emb), f), np.float32)
    for s in range(0, len(emb), block):
        sims = emb[s : s + block] @ emb.T
        top = (
            np.argpartition(-sims, f - 1, axis=1)[:, :f]
            if f < len(emb)
            else np.tile(np.arange(len(emb)), (len(sims), 1))
        )
        top_s = np.take_along_axis(sims, top, 1)
        order = np.lexsort((top, -top_s), axis=1)  # by similarity, ties by row: the same answer every run
        ids[s : s + block] = np.take_along_axis(top, order, 1)
        scores[s : s + block] = np.take_along_axis(top_s, order, 1)
    return ids, scores


def _faiss_index(emb: np.ndarray, cfg: PairConfig):
    import faiss  # see knn

    n, dim = emb.shape
    if cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.add(emb)
        index.hnsw.efSearch = max(cfg.ef_search, cfg.fetch)
        return index
    # 4 sqrt(n) lists: training costs ~ nlist^2, a query nprobe n / nlist; at 100k objects, D = 32, nprobe 32
    # this finds 0.96 of the exact 10 nearest (2 sqrt(n): 0.94) in 7 CPU s (benchmarks/pairs.py). faiss wants
    # >= 39 training points a list.
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)
    index.cp.seed = 0
    index.train(emb[np.sort(sample)])
    index.add(emb)
    index.nprobe = min(cfg.nprobe, nlist)
    return index


def partition_edges(
    emb: np.ndarray, origin: np.ndarray, phash: np.ndarray, cfg: PairConfig, threads: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label's retrieval pairs: emb (n, D), origin (n,) int codes (same code = same source or video),
    phash (n,) int64 -> (a, b, similarity), rows of this partition, a's k nearest b (by similarity) with
    similarity >= min_sim, another origin and phash distance >= min_phash. One direction."""
    ids, sims = knn(emb, cfg.fetch, cfg, threads)
    rows = np.repeat(np.arange(len(emb)), ids.shape[1]).reshape(ids.shape)
    safe = np.maximum(ids, 0)
    ok = (ids >= 0) & (sims >= cfg.min_sim) & (origin[safe] != origin[rows])
    ok &= phash_distance(phash[safe], phash[rows]).reshape(ids.shape) >= cfg.min_phash
    ok &= np.cumsum(ok, axis=1) <= cfg.k
    return rows[ok], ids[ok], sims[ok]


def label_rows(
    rows: np.ndarray,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
    phash: np.ndarray,
    boxes: np.ndarray,
    ids: pa.Table,
) -> dict:
    """One partition's directed edges (partition_edges over its n objects) -> PART_SCHEMA columns, each pair in
    both directions once, sorted by (a, b): rows (n,) ascending, the objects' rows (find_pairs' numbering); phash
    (n,), boxes (n, 4) and ids (n rows: key, index, label) the partition's."""
    a, b, s = _both_directions([edges], len(rows))
    cols = {
        "a": rows[a],
        "b": rows[b],
        "similarity": s,
        "change": pair_change(boxes, a, b),
        "phash_distance": phash_distance(phash[a], phash[b]),
    }
    return _keyed(cols, ids, a, b)


def _both_directions(found, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed edges -> each unordered pair in both directions once, sorted by (a, b)."""
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a = np.concatenate([f[0] for f in found]).astype(np.int64)
    b = np.concatenate([f[1] for f in found]).astype(np.int64)
    s = np.concatenate([f[2] for f in found]).astype(np.float32)
    code = np.concatenate([a * n + b, b * n + a])
    code, first = np.unique(code, return_index=True)
    return code // n, code % n, np.concatenate([s, s])[first]


def _partitions(labels: np.ndarray) -> list[np.ndarray]:
    """The positions (ascending) of each label code of LABELS (n,) that has two objects or more, by code."""
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return [p for p in np.split(order, cuts) if len(p) > 1]


# ------------------------------------------------------------------------- the shuffle: plan, map, reduce

# A map task reads shards of about MAP_OBJECTS identity rows. A bucket, a reduce task's input, packs labels
# (retrieval) or whole videos (video, up to VIDEO_GROUP_OBJECTS objects) in order up to its size: the objects over
# REDUCE_TASKS (so a small catalog still spreads over the CPUs), at most BUCKET_OBJECTS (a task holds its bucket's
# rows, ~(2 D + 100) bytes an object, and its pairs, once, until it writes them: 1.9 GB at D = 32, k = 10); a label of
# more is a bucket alone. Every reduce task reads every map file's footer, so the buckets must not be many more than
# needed: at 100M objects in labels of 100,000, a bucket per label made 1,000 x 358 reads of 21 ms (2.1 CPU hours; 100
# buckets of 7 ms reads: 256 CPU s; BENCHMARKS.md). Up to LOCAL_OBJECTS identity rows in all, map and reduce run in
# this process: no Ray to start.
MAP_OBJECTS = 1 << 18
BUCKET_OBJECTS = 1 << 20
REDUCE_TASKS = 64
LOCAL_OBJECTS = 1 << 18


@dataclass(frozen=True)
class Plan:
    """The shuffle, planned by the calling process from the sidecars' footers and the catalog.

    by: the partition, "label" (retrieval: pairs never cross labels) or "video" (video: never cross videos);
    shards (S,): the complete shards with an identity sidecar, in shard order; first (S,): each shard's first
    row in the objects' numbering (the identity rows of the shards before it; then record and object order, as
    the sidecar lists them); rows: the identity rows in all; bucket_of: label or video -> bucket (-1 for one of
    one object: no pair; an object in no video has no bucket either); buckets (B,): (objects of its partitions
    in the catalog, large: a label of them searched by faiss); groups: the shards (positions in SHARDS) of each
    map task, consecutive."""

    by: str
    shards: list[str]
    first: list[int]
    rows: int
    bucket_of: dict[str, int]
    buckets: list[tuple[int, bool]]
    groups: list[list[int]]


_LABELS_SQL = """
SELECT label, count(*) AS n FROM objects WHERE shard IN (SELECT unnest($shards::VARCHAR[])) GROUP BY label
ORDER BY label
"""

_VIDEOS_SQL = """
SELECT s.video, count(*) AS n FROM samples s JOIN objects o ON o.sample_id = s.sample_id
WHERE s.video IS NOT NULL AND s.shard IN (SELECT unnest($shards::VARCHAR[])) GROUP BY s.video ORDER BY s.video
"""


def plan_pairs(
    root: str | os.PathLike, method: str, cfg: PairConfig, *, catalog: str | os.PathLike | None = None
) -> Plan:
    """ROOT's Plan for METHOD: the sidecars' row counts from their footers (no embedding read), the object
    counts of each label (retrieval) or video (video) from the catalog (its objects of the shards with a
    sidecar: an upper bound of the identity rows each has, which is all the packing needs). CatalogError when
    there is no sidecar, the catalog holds none of their shards' objects, or (video) none is in a video frame."""
    folder = Folder(root)
    try:
        footers = read_footers(root)
    except Exception as e:
        raise CatalogError(f"cannot read the identity sidecars of {folder.url}: {one_line(e)}") from None
    sizes = [n for _, n in footers]
    if sum(sizes) == 0:
        raise CatalogError(f"no identity sidecars (NNNNN{identity.SUFFIX}) in {folder.url}: {IDENTITY_HINT}")
    shards = [s for s, _ in footers]
    by = "video" if method == "video" else "label"
    with open_catalog(root, catalog=catalog) as con:
        counts = con.sql(_LABELS_SQL, params={"shards": shards}).fetchall()
        if counts and by == "video":
            counts = con.sql(_VIDEOS_SQL, params={"shards": shards}).fetchall()
            if not counts:
                raise CatalogError(
                    f"no object of {root} is in a video frame (samples.video is NULL): use --method retrieval"
                )
    if not counts:
        raise CatalogError(
            f"none of the {sum(sizes)} objects of the identity sidecars is in the catalog of {root}: "
            f"run `subjectdiff catalog build {root}` first"
        )
    video = by == "video"  # whole videos, up to VIDEO_GROUP_OBJECTS a bucket; none searched by faiss
    bucket_of, buckets = _buckets(counts, cfg, cap=VIDEO_GROUP_OBJECTS if video else None, searched=not video)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).tolist()
    return Plan(by, shards, first, sum(sizes), bucket_of, buckets, _groups(sizes, MAP_OBJECTS))


def _buckets(
    counts: list[tuple[str, int]], cfg: PairConfig, cap: int | None = None, searched: bool = True
) -> tuple[dict[str, int], list[tuple[int, bool]]]:
    """(partition, objects) in order -> (partition -> bucket, buckets (objects, has a large label: one searched
    by faiss, more than brute_force_max objects; never when not SEARCHED, as videos are not)). Partitions are
    packed in order into buckets of at most bucket_size(all objects, CAP); one of that size or more is a bucket
    alone; one of one object goes to none (-1). Any two buckets in a row hold more than the size: fewer than
    2 objects / size + 1 buckets."""
    bucket_of, buckets, packing = {}, [], -1
    size = bucket_size(sum(n for _, n in counts), cap)
    for label, n in counts:
        large = searched and n > cfg.brute_force_max and cfg.index != "exact"
        if n < 2:
            bucket_of[label] = -1
        elif n >= size:
            bucket_of[label], packing = len(buckets), -1  # the labels after it start a bucket: buckets in label order
            buckets.append((n, large))
        else:
            if packing < 0 or buckets[packing][0] + n > size:
                packing = len(buckets)
                buckets.append((0, False))
            bucket_of[label] = packing
            buckets[packing] = (buckets[packing][0] + n, buckets[packing][1] or large)
    return bucket_of, buckets


def bucket_size(objects: int, cap: int | None = None) -> int:
    """A bucket's objects for OBJECTS in all: about REDUCE_TASKS buckets, none above CAP (BUCKET_OBJECTS)."""
    return max(1, min(BUCKET_OBJECTS if cap is None else cap, -(-objects // REDUCE_TASKS)))


def _groups(sizes: list[int], size: int) -> list[list[int]]:
    """Consecutive positions of SIZES (rows per shard) cut into groups of about SIZE rows (a shard at least)."""
    groups, cur, acc = [], [], 0
    for i, n in enumerate(sizes):
        cur.append(i)
        acc += n
        if acc >= size:
            groups.append(cur)
            cur, acc = [], 0
    return groups + [cur] if cur else groups


# The catalog's side of a map task's objects: origin (the video, else the source: what "same source" means) as a
# hash (pairing only asks whether two origins are equal), phash, the box in pixels, the video frame.
_MAP_SQL = """
SELECT s.key, o."index", s.shard, (hash(coalesce(s.video, s.source)) >> 1)::BIGINT AS origin, s.phash,
       o.x0 * s.width AS x0, o.y0 * s.height AS y0, o.x1 * s.width AS x1, o.y1 * s.height AS y1,
       s.video, s.video_shot AS shot, s.video_frame AS frame
FROM samples s JOIN objects o ON o.sample_id = s.sample_id
WHERE s.shard BETWEEN $lo AND $hi AND o.shard BETWEEN $lo AND $hi AND s.shard IN (SELECT unnest($shards::VARCHAR[]))
"""


def map_shards(
    root: str,
    shards: list[str],
    first: list[int],
    objects: pa.Table,
    tars: dict[str, str],
    bucket_of: dict[str, int],
    staging: str,
    name: str,
    by: str = "label",
) -> tuple[str, int]:
    """Map: the identity sidecars of SHARDS (first: each one's first row) joined with OBJECTS (their catalog rows,
    _MAP_SQL; a phash the catalog lacks computed from the image, _fill_phash) -> the map file NAME of
    STAGING: columns bucket (BUCKET_OF the object's label or video: BY), row, key, index, label, origin, phash,
    x0, y0, x1, y1 (by video: and video, shot, frame), embedding, in bucket then row order, a bucket's rows in
    row groups of their own (reduce_bucket finds them by the row groups' statistics). Returns (NAME, rows)."""
    folder, tables, arrays = Folder(root), [], []
    for sid, start in zip(shards, first):
        with folder.open(sid + identity.SUFFIX) as f:
            ident, emb, _ = identity.read_identity(f)
        tables.append(ident.append_column("row", pa.array(np.arange(start, start + len(emb), dtype=np.int64))))
        arrays.append(emb)
    ident, emb = pa.concat_tables(tables), np.concatenate(arrays)
    ident = ident.append_column("pos", pa.array(np.arange(len(emb), dtype=np.int64)))
    table = ident.join(objects, keys=["key", "index"], join_type="inner").sort_by("pos")
    missing = pc_is_null(table["phash"])
    if missing.any():
        table = _fill_phash(folder, table, sorted(set(np.asarray(table["key"].to_pylist(), object)[missing])), tars)
    bucket = _bucket_column(table[by], bucket_of, shards, by)
    order = np.argsort(bucket, kind="stable")[np.count_nonzero(bucket < 0) :]  # rows stay in order in a bucket
    columns = ["row", "key", "index", "label", "origin", "phash", "x0", "y0", "x1", "y1"]
    out = table.select(columns + (["video", "shot", "frame"] if by == "video" else [])).take(order)
    out = out.add_column(0, "bucket", pa.array(bucket[order], pa.int32()))
    emb = emb[_col(table, "pos", np.int64)[order]]
    out = out.append_column("embedding", identity.embedding_column(emb, emb.shape[1]))
    staging_folder = Folder(staging)
    staging_folder.makedirs()
    with staging_folder.open(name, "wb") as f, pq.ParquetWriter(f, out.schema) as w:
        ends = [0, *(np.flatnonzero(np.diff(bucket[order])) + 1), len(order)]
        for s, e in zip(ends, ends[1:]):
            if e > s:  # a row group of no rows would have no statistics
                w.write_table(out.slice(s, e - s))
    return name, len(order)


def _bucket_column(values: pa.ChunkedArray, bucket_of: dict[str, int], shards: list[str], by: str) -> np.ndarray:
    """(n,) int64 buckets of VALUES (the objects' labels or videos: BY; -1 for a null, an object in no video);
    CatalogError for a label or video the catalog does not know."""
    names, code = _label_codes(values)
    unknown = [x for x in names if x not in bucket_of]
    if unknown:
        raise CatalogError(
            f"{by} {unknown[0]!r} of the identity sidecars of shards {shards[0]}..{shards[-1]} is in no object of "
            "the catalog: run `subjectdiff catalog build` again"
        )
    return np.asarray([bucket_of[x] for x in names] + [-1], np.int64)[code]


def _label_codes(labels: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(the distinct labels, (n,) int codes into them; -1 for a null), in Arrow: no Python string per object."""
    encoded = labels.combine_chunks().dictionary_encode()
    return encoded.dictionary.to_pylist(), encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def reduce_bucket(
    staging: str, maps: list[str], bucket: int, cfg: PairConfig, threads: int, name: str, by: str = "label"
):
    """Reduce: BUCKET's rows of the map files MAPS (in row order: the maps are in shard order) -> each label's
    pairs (partition_edges, label_rows), or its videos' pairs (BY "video": video_part), all as the part NAME of
    STAGING. Returns (NAME, rows). Holds the bucket's objects and embeddings, and one label's search at a time."""
    folder = Folder(staging)
    t = _bucket_rows(folder, maps, bucket)
    found = []
    if t.num_rows and by == "video":
        emb, rows = identity.embedding_array(t["embedding"]), _col(t, "row", np.int64)
        found.append(video_part(t.drop_columns(["embedding"]), emb, rows, cfg))
    elif t.num_rows:
        rows, emb, origin = _col(t, "row", np.int64), identity.embedding_array(t["embedding"]), _col(t, "origin")
        phash, boxes, ids = _col(t, "phash", np.int64), _boxes(t), t.select(["key", "index", "label"])
        _, labels = _label_codes(t["label"])
        del t
        for p in _partitions(labels):
            edges = partition_edges(emb[p].astype(np.float32), origin[p], phash[p], cfg, threads)
            found.append(part_table(label_rows(rows[p], edges, phash[p], boxes[p], ids.take(pa.array(p)))))
    return name, write_part(folder, name, found)  # each label's rows sorted by (a, b) (label_rows)


def _bucket_rows(folder: Folder, maps: list[str], bucket: int) -> pa.Table:
    """The rows of BUCKET in the map files MAPS, in row order: the row groups whose bucket statistics say so, of
    the maps in name order (map-GGGGGG: group, hence shard, order; the tasks finish in any order)."""
    pieces = []
    for m in sorted(maps):
        with folder.open(m) as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            mine = [i for i in range(md.num_row_groups) if md.row_group(i).column(0).statistics.min == bucket]
            if mine:
                pieces.append(pf.read_row_groups(mine))
    return pa.concat_tables(pieces) if pieces else pa.table({"row": pa.array([], pa.int64())})


def shuffle_parts(
    root: str | os.PathLike,
    plan: Plan,
    cfg: PairConfig,
    staging: Folder,
    progress: ProgressFn | None = None,
    *,
    catalog: str | os.PathLike | None = None,
) -> list[tuple[str, int]]:
    """Pairs over PLAN's objects (retrieval, or video when plan.by is "video"), written as parts of STAGING: [(part
    name, rows)], merge_parts reads them back in (a, b) order. Map (map_shards, a task per group of shards) then reduce
    (reduce_bucket, a task a bucket), as Ray tasks when the objects are more than LOCAL_OBJECTS, else in this process;
    the map files go through STAGING and are deleted after the reduce. This process holds the plan and one group's
    catalog rows.

    Labels (videos) are independent partitions (pairs never cross them, so each pair's two directions are in one
    partition). A bucket with a large label (faiss) takes all the CPUs Ray offers split among such buckets, the other
    tasks one; a label is one partition however large (its k-nearest search needs all of its objects): such a task holds
    its label's embeddings (float16 and float32), the index and its (n, search_k) neighbours, about n (10 D + 12
    search_k + 100 k) bytes."""
    run = _Ray(cfg.num_cpus) if plan.rows > LOCAL_OBJECTS else _Local(cfg.num_cpus)
    maps: list[str] = []
    try:
        with open_catalog(root, catalog=catalog) as con:
            done = 0
            jobs = _map_jobs(con, Folder(root), plan, run.put(plan.bucket_of), staging)
            for name, rows in run.run(map_shards, jobs):
                maps.append(name)
                done += rows
                if progress:
                    progress(done, plan.rows, "objects read")
        parts, done, total = [], 0, sum(n for n, _ in plan.buckets)
        objects = {_bucket_name(b): n for b, (n, _) in enumerate(plan.buckets)}
        for name, rows in run.run(reduce_bucket, _reduce_jobs(plan, maps, cfg, run.cpus, staging)):
            parts.append((name, rows))
            done += objects[name]
            if progress:
                progress(done, total, "objects")
        return parts
    finally:
        staging.remove(maps)
        run.close()


def _map_jobs(con, root: Folder, plan: Plan, bucket_of, staging: Folder):
    """(CPUs, map_shards' arguments) of each group of shards: its catalog rows are read here as it is handed out."""
    tars = dict(con.execute("SELECT name, path FROM shards").fetchall())
    for g, members in enumerate(plan.groups):
        shards = [plan.shards[i] for i in members]
        params = {"lo": shards[0], "hi": shards[-1], "shards": shards}
        try:
            objects = con.sql(_MAP_SQL, params=params).to_arrow_table()
        except duckdb.Error as e:
            raise CatalogError(one_line(e)) from None
        first = [plan.first[i] for i in members]
        args = (root.url, shards, first, objects, {s: tars.get(s) for s in shards}, bucket_of, staging.url)
        yield 1, (*args, f"map-{g:06d}.parquet", plan.by)


def _reduce_jobs(plan: Plan, maps: list[str], cfg: PairConfig, cpus: int, staging: Folder):
    """(CPUs, reduce_bucket's arguments) of each bucket: a bucket with a large label (faiss) gets the CPUs split
    among such buckets (all of them when there is one), a bucket of small labels one."""
    large = sum(lg for _, lg in plan.buckets)
    for b, (_, lg) in enumerate(plan.buckets):
        threads = max(1, cpus // large) if lg else 1
        yield min(threads, cpus), (staging.url, maps, b, cfg, threads, _bucket_name(b), plan.by)


def _bucket_name(bucket: int) -> str:
    return f"bucket-{bucket:06d}.parquet"


class _Local:
    """Map and reduce in this process, a task at a time (small inputs: no Ray to start)."""

    def __init__(self, num_cpus: int | None):
        self.cpus = num_cpus or os.cpu_count() or 1

    def put(self, value):
        return value

    def run(self, fn, jobs) -> Iterator:
        for _, args in jobs:
            yield fn(*args)

    def close(self) -> None:
        pass


class _Ray:
    """Map and reduce as Ray tasks (a Ray started here with NUM_CPUS, or the one this process runs or
    RAY_ADDRESS names: _ray_start), each with the CPUs its job asks; at most two per CPU in flight, so the
    arguments this process makes (a map group's catalog rows) are made as tasks finish, not all at once."""

    def __init__(self, num_cpus: int | None):
        import ray  # heavy; only a large input needs it

        self.started = _ray_start(num_cpus)
        self.cpus = max(1, int(ray.available_resources().get("CPU", 1)))

    def put(self, value):
        import ray

        return ray.put(value)

    def run(self, fn, jobs) -> Iterator:
        """fn(*args) of each (CPUs, args) of JOBS, results as the tasks finish."""
        import ray

        task, pending = ray.remote(fn), []
        for cpus, args in jobs:
            if len(pending) >= 2 * self.cpus:
                ready, pending = ray.wait(pending, num_returns=1)
                yield self._get(ready[0])
            pending.append(task.options(num_cpus=cpus).remote(*args))
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield self._get(ready[0])

    @staticmethod
    def _get(ref):
        """A task's result; its CatalogError raised as itself (one line for the command), not in Ray's wrapper."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, CatalogError):
                raise e.cause from None
            raise

    def close(self) -> None:
        import ray

        if self.started:
            ray.shutdown()


def _ray_start(num_cpus: int | None) -> bool:
    """Use the Ray this process runs, join RAY_ADDRESS's, or start one here with NUM_CPUS (None: every core);
    True when started here (the caller shuts it down)."""
    import logging

    import ray  # see _Ray

    if ray.is_initialized():
        return False
    # start-up notices that are not for the user (token authentication, "Started a local Ray instance")
    for name in ("ray._private.authentication.authentication_token_setup", "ray._private.worker", "ray.worker"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    return True


# ------------------------------------------------------------------------------------------------ parts


def part_table(cols: dict) -> pa.Table:
    """COLS (PART_SCHEMA's columns, numpy or Arrow; frame_gap may be left out: null) -> a PART_SCHEMA table."""
    n = len(cols["a"])
    arrays = []
    for f in PART_SCHEMA:
        x = cols.get(f.name)
        if x is None:
            arrays.append(pa.nulls(n, f.type))
        elif isinstance(x, (pa.Array, pa.ChunkedArray)):
            arrays.append(x.cast(f.type))
        else:
            arrays.append(pa.array(x, f.type))
    return pa.Table.from_arrays(arrays, schema=PART_SCHEMA)


def _keyed(cols: dict, ids: pa.Table, a: np.ndarray, b: np.ndarray) -> dict:
    """COLS with the keys of their two objects: rows A (reference) and B (target) of IDS (key, index, label)."""
    a, b = pa.array(a, pa.int64()), pa.array(b, pa.int64())
    keys, index = ids["key"], ids["index"]
    return {
        **cols,
        "ref_key": keys.take(a),
        "ref_index": index.take(a),
        "target_key": keys.take(b),
        "target_index": index.take(b),
        "label": ids["label"].take(a),
    }


def sorted_part(table: pa.Table) -> pa.Table:
    """TABLE (PART_SCHEMA) sorted by (a, b); TABLE itself when it already is."""
    a, b = _col(table, "a", np.int64), _col(table, "b", np.int64)
    da = np.diff(a)
    if np.all((da > 0) | ((da == 0) & (np.diff(b) > 0))):
        return table
    return table.take(pa.array(np.lexsort((b, a))))


def write_part(staging: Folder, name: str, tables: list[pa.Table]) -> int:
    """TABLES (PART_SCHEMA, each sorted by (a, b)) merged into the part NAME of STAGING, sorted by (a, b); returns
    its rows. Merged a range of a at a time (_merged over slices): no second copy of the rows, which a reduce task
    would otherwise hold beside its bucket's pairs (1.3 GB for a bucket of 2^20 objects at k = 10)."""
    total = sum(t.num_rows for t in tables)
    staging.makedirs()
    with staging.open(name, "wb") as f, pq.ParquetWriter(f, PART_SCHEMA) as w:
        if total:
            tables = [t for t in tables if t.num_rows]
            lo = min(_col(t, "a", np.int64)[0] for t in tables)
            hi = max(_col(t, "a", np.int64)[-1] for t in tables) + 1
            for batch in _merged([_Slices(t) for t in tables], int(lo), int(hi), total, 4 * PART_ROW_GROUP):
                w.write_table(batch.cast(PART_SCHEMA), row_group_size=PART_ROW_GROUP)
    return total


class _Slices:
    """A PART_SCHEMA table sorted by (a, b), read in order: `below(hi)` gives its next rows with a < hi (a slice)."""

    def __init__(self, table: pa.Table):
        self.table, self.a, self.pos = table, _col(table, "a", np.int64), 0

    def below(self, hi: int) -> pa.Table:
        cut = int(np.searchsorted(self.a, hi))
        out, self.pos = self.table.slice(self.pos, cut - self.pos), cut
        return out


class _Cursor:
    """A part read in order, a row group at a time: `below(hi)` gives (and drops) its next rows with a < hi."""

    def __init__(self, f):
        # read_row_group, not iter_batches: iter_batches reads ahead, ~40 MB a part (measured, pyarrow 26), which
        # hundreds of parts multiply
        pf = pq.ParquetFile(f)
        self.batches = (pf.read_row_group(i) for i in range(pf.num_row_groups))
        self.buf, self.done = PART_SCHEMA.empty_table(), False

    def below(self, hi: int) -> pa.Table:
        while not self.done and (self.buf.num_rows == 0 or self.buf["a"][-1].as_py() < hi):
            nxt = next(self.batches, None)
            if nxt is None:
                self.done = True
            else:
                self.buf = pa.concat_tables([self.buf, nxt.cast(PART_SCHEMA)])
        cut = int(np.searchsorted(self.buf["a"].to_numpy(), hi))
        out, self.buf = self.buf.slice(0, cut), self.buf.slice(cut)
        return out


def merge_parts(
    staging: Folder, parts: list[tuple[str, int]], n_objects: int, rows: int = ROWS_PER_BATCH
) -> Iterator[pa.Table]:
    """The parts' rows (PART_SCHEMA tables), sorted by (a, b) across all parts, about ROWS rows a table.

    Each part is sorted by (a, b) and a (a, b) is in one part only (a pair's two directions lie in one label or
    video), so the merge takes the rows with a in [lo, lo + step) from every part, sorts those, and moves on:
    it holds one range's rows (step = N ROWS / total rows objects: ROWS rows when the references spread evenly)
    plus a row group per part."""
    total = sum(n for _, n in parts)
    if total == 0:
        return
    with ExitStack() as stack:
        cursors = [_Cursor(stack.enter_context(staging.open(name, "rb"))) for name, n in parts if n]
        yield from _merged(cursors, 0, n_objects, total, rows)


def _merged(cursors: list, lo: int, hi: int, total: int, rows: int) -> Iterator[pa.Table]:
    """The rows of CURSORS (_Cursor or _Slices: each sorted by (a, b), TOTAL rows in all, a in [LO, HI)) sorted by
    (a, b) across them, a range of a at a time: about ROWS rows a table when the a spread evenly."""
    step = max(1, math.ceil((hi - lo) * rows / total))
    for start in range(lo, hi, step):
        got = pa.concat_tables([c.below(start + step) for c in cursors])
        if got.num_rows:
            yield got.sort_by([("a", "ascending"), ("b", "ascending")])


def remove_staging(staging: Folder, parts: list[tuple[str, int]]) -> None:
    if staging.local:
        shutil.rmtree(staging.path, ignore_errors=True)
    else:
        staging.remove([name for name, _ in parts])


# ---------------------------------------------------------------------------------------- the pairs table


def pair_rows(part: pa.Table, method: str) -> pa.Table:
    """PART (PART_SCHEMA rows) -> the PAIR_SCHEMA rows of METHOD, in PART's order."""
    method_column = pa.array([method] * part.num_rows, pa.string())
    arrays = [method_column if f.name == "method" else part[f.name] for f in PAIR_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=PAIR_SCHEMA)


def staging_folder(out: str | os.PathLike) -> Folder:
    """OUT.parts beside the pairs file OUT (local or a URL): where the tasks write their parts."""
    if is_local(out):
        path = local_path(out)
        return Folder(path.with_name(path.name + ".parts"))
    return Folder(os.fspath(out).rstrip("/") + ".parts")


def find_pairs(
    root: str | os.PathLike,
    method: str,
    out: str | os.PathLike,
    cfg: PairConfig | None = None,
    *,
    catalog: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Mine METHOD's pairs ("video" | "retrieval") among the objects of ROOT's identity sidecars that ROOT's
    catalog holds into the pairs file OUT (PAIR_SCHEMA, both directions, sorted by (reference, target) in the
    objects' order: shard order, then record and object order; the same rows in the same order on every run).
    Returns its rows. The rows go through parts in OUT.parts (module docstring), never all in this process."""
    if method not in METHODS:
        raise ValueError(f"pairs method {method!r}: one of {', '.join(METHODS)}")
    cfg = cfg or PairConfig()
    staging, parts = staging_folder(out), []
    try:
        plan = plan_pairs(root, method, cfg, catalog=catalog)
        parts = shuffle_parts(root, plan, cfg, staging, progress, catalog=catalog)
        merged = merge_parts(staging, parts, plan.rows, ROWS_PER_BATCH)
        return write_pairs((pair_rows(t, method) for t in merged), out)
    finally:
        remove_staging(staging, parts)


def write_pairs(batches: Iterator[pa.Table], out: str | os.PathLike) -> int:
    """Write the PAIR_SCHEMA tables BATCHES to OUT (a local .parquet path or a URL), a row group each, whole: a
    reader never sees a part (renamed into place locally; an object store shows an upload once it completes).
    Returns the rows written."""
    rows = 0

    def write(f) -> None:
        nonlocal rows
        with pq.ParquetWriter(f, PAIR_SCHEMA) as w:
            for t in batches:
                w.write_table(t, row_group_size=max(t.num_rows, 1))
                rows += t.num_rows

    if is_local(out):
        path = local_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)
        return rows
    url = os.fspath(out)
    folder, name = Folder(url.rsplit("/", 1)[0]), url.rsplit("/", 1)[1]
    with folder.open(name, "wb") as f:
        write(f)
    return rows


def load_pairs(
    root: str | os.PathLike, out: str | os.PathLike, method: str, *, catalog: str | os.PathLike | None = None
) -> int:
    """The pairs file OUT (find_pairs) into ROOT's catalog as METHOD's rows of its `pairs` table (replace_pairs),
    streamed a row group at a time. Returns the rows the table holds."""
    with open_url(out) as f:
        pf = pq.ParquetFile(f)
        reader = pa.RecordBatchReader.from_batches(PAIR_SCHEMA, row_group_batches(pf, PART_ROW_GROUP))
        return replace_pairs(root, reader, method, catalog=catalog)
