"""Cross-image pairs for training (`train --pairs pairs.parquet`): the pairs table indexed once into numpy arrays,
random access to the records the pairs name, and the seeded mixer of pair and single-image sample slots.

    index = PairIndex.build("pairs.parquet", reader.urls, selection, eligible)   # on rank 0, before the fork
    index.rows                  # P valid pairs (both records in the selection / shards, both objects eligible)
    rec = index.records.read(index.ref_rec[p])   # a DecodedRecord, read straight from its tar
    mixer = PairMixer(ratio=0.5, seed=0)
    mixer.is_pair(j, phase)                      # is slot j of a worker's epoch a pair sample?

Memory (docs/training.md): the valid pairs are four int32 arrays, sorted by target record (16 bytes a pair,
16 MB per million pairs) plus, per record a pair names, its tar location (url id, two offsets and sizes: 37 bytes)
and key; a DataLoader worker adds its epoch's pair order (8 bytes a pair). Workers inherit the arrays when they
fork (numpy arrays are not touched by reference counting, so their pages stay shared). The Parquet file is read
once, four columns, and the shards' tar headers walked once, on rank 0: the other ranks receive the index
(train.data.batch_stream, through torch.distributed).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from subjectdiff.catalogs.pairs import PAIR_SCHEMA
from subjectdiff.catalogs.reader import DecodedRecord, decode_record
from subjectdiff.catalogs.schema import RECORD_IMAGE_FORMATS
from subjectdiff.catalogs.storage import filesystem, is_local, open_url, retrying
from subjectdiff.catalogs.tars import member_index
from subjectdiff.errors import UsageError

INDEX_COLUMNS = ("ref_key", "ref_index", "target_key", "target_index")


def check_pairs_schema(path: str) -> None:
    """UsageError (one line, naming the file and the column) unless PATH's schema has PAIR_SCHEMA's columns with
    their types. A file that is not Parquet at all is named too."""
    try:
        with open_url(path) as f:
            schema = pq.read_schema(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--pairs {path}: no such pairs file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise UsageError(f"--pairs {path}: not a Parquet pairs file ({' '.join(str(e).split())[:200]})") from None
    for field in PAIR_SCHEMA:
        if field.name not in schema.names:
            raise UsageError(f"--pairs {path}: column {field.name!r} is missing (catalogs.pairs.PAIR_SCHEMA)")
        have = schema.field(field.name).type
        if have != field.type:
            raise UsageError(
                f"--pairs {path}: column {field.name!r} is {have}, PAIR_SCHEMA says {field.type} (catalogs.pairs)"
            )


@dataclass
class RecordLocations:
    """Where each record a pair names lies in its tar, for reading it alone (no tar stream).

    keys: (R,) str. url: (R,) int32 into urls. json_at, image_at: (R,) int64 data offsets; json_size,
    image_size: (R,) int64. ext: (R,) int8 into RECORD_IMAGE_FORMATS."""

    urls: list[str]
    keys: np.ndarray
    url: np.ndarray
    json_at: np.ndarray
    json_size: np.ndarray
    image_at: np.ndarray
    image_size: np.ndarray
    ext: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, r: int) -> DecodedRecord:
        """Record r, decoded (catalogs.reader.decode_record: BadRecordError for one that breaks the contract).
        One ranged read (one GET on an object store, retried when the connection drops) spans its JSON and image
        members, which the shard writer puts side by side."""
        url, ext = self.urls[int(self.url[r])], RECORD_IMAGE_FORMATS[int(self.ext[r])]
        spans = ((int(self.json_at[r]), int(self.json_size[r])), (int(self.image_at[r]), int(self.image_size[r])))
        lo, hi = min(a for a, _ in spans), max(a + n for a, n in spans)
        fs, path = filesystem(url)
        blob = retrying(lambda: fs.cat_file(path, start=lo, end=hi), f"reading record {self.keys[r]} of {url}")
        meta, image = (blob[a - lo : a - lo + n] for a, n in spans)
        return decode_record({"__key__": str(self.keys[r]), "__url__": url, "json": meta, ext: image})


def _shard_members(url: str, keys: set[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {extension: (offset, size)}} of the wanted keys in one tar, from its headers alone (catalogs.tars)."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    with open_url(url) as f:
        for name, offset, size in member_index(f, url):
            key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if key in keys:
                found.setdefault(key, {}).setdefault(ext.lower(), (offset, size))
    return found


def locate(urls: list[str], selection: Mapping[str, set[str]] | None, wanted: set[str]) -> RecordLocations:
    """The locations of the wanted keys that the shards (and the selection, when given) hold: each shard's tar
    headers are walked once, in parallel (one request each on an object store); a key in two shards: the first."""

    def keys_of(u: str) -> set[str]:
        if selection is None:
            return wanted
        sel = selection.get(u) or (selection.get(os.path.abspath(u)) if is_local(u) else None) or set()
        return wanted & sel

    jobs = [(u, keys_of(u)) for u in urls]
    jobs = [(u, ks) for u, ks in jobs if ks]
    with ThreadPoolExecutor(16 if any(not is_local(u) for u, _ in jobs) else 2) as pool:
        found = list(pool.map(lambda job: _shard_members(*job), jobs))
    rows: dict[str, tuple[int, int, int, int, int, int]] = {}
    for i, members in enumerate(found):
        for key, m in members.items():
            ext = next((e for e in RECORD_IMAGE_FORMATS if e in m), None)
            if key in rows or "json" not in m or ext is None:
                continue
            rows[key] = (i, *m["json"], *m[ext], RECORD_IMAGE_FORMATS.index(ext))
    table = np.array(list(rows.values()), np.int64).reshape(len(rows), 6)
    return RecordLocations(
        urls=[u for u, _ in jobs],
        keys=np.array(list(rows), dtype=str),
        url=table[:, 0].astype(np.int32),
        json_at=table[:, 1],
        json_size=table[:, 2],
        image_at=table[:, 3],
        image_size=table[:, 4],
        ext=table[:, 5].astype(np.int8),
    )


@dataclass
class PairIndex:
    """The valid pairs of a pairs file (both records located), sorted by target record.

    ref_rec, ref_obj, tgt_rec, tgt_obj: (P,) int32 (record ids into `records`, object positions in the record).
    starts: (R + 1,) int64: the pairs whose target is record r are rows starts[r]:starts[r + 1].
    total: the pairs file's rows; dropped: total - P (a record not in the selection or the shards, or an object the
    selection's object predicate (--object-where) left out)."""

    path: str
    records: RecordLocations
    ref_rec: np.ndarray
    ref_obj: np.ndarray
    tgt_rec: np.ndarray
    tgt_obj: np.ndarray
    starts: np.ndarray
    total: int

    @property
    def rows(self) -> int:
        return len(self.ref_rec)

    @property
    def dropped(self) -> int:
        return self.total - self.rows

    def same_target(self, p: int) -> np.ndarray:
        """(k,) the pair rows whose target record is pair p's (p included)."""
        r = int(self.tgt_rec[p])
        return np.arange(self.starts[r], self.starts[r + 1])

    def dropped_line(self) -> str:
        return (
            f"data: --pairs {self.path}: {self.dropped} of {self.total} pairs dropped (their reference or target "
            "record is not in the selection or the shards, or its object is not eligible in it)"
        )

    @classmethod
    def build(
        cls,
        path: str,
        urls: list[str],
        selection: Mapping[str, set[str]] | None,
        eligible: Mapping[str, list[int]] | None = None,
    ) -> PairIndex:
        """Index PATH (PAIR_SCHEMA, else a one-line UsageError) over the records of `urls` (and `selection`).
        eligible: {key: object indices} of a selection made with an object predicate (--object-where;
        catalogs.selection.load_eligible_objects): a pair is kept only when both its objects are among them, as a
        single-image sample takes its subjects only among them (None: every object)."""
        check_pairs_schema(path)
        with open_url(path) as f:
            t = pq.read_table(f, columns=list(INDEX_COLUMNS))
        wanted = set(pc.unique(pa.chunked_array(t["ref_key"].chunks + t["target_key"].chunks, pa.string())).to_pylist())
        wanted.discard(None)
        records = locate(urls, selection, wanted)
        known = pa.array(records.keys.tolist(), pa.string())
        ref = pc.index_in(t["ref_key"], value_set=known).to_numpy(zero_copy_only=False)
        tgt = pc.index_in(t["target_key"], value_set=known).to_numpy(zero_copy_only=False)
        ref_obj = t["ref_index"].to_numpy(zero_copy_only=False)
        tgt_obj = t["target_index"].to_numpy(zero_copy_only=False)
        ok = ~(nulls(ref) | nulls(tgt) | nulls(ref_obj) | nulls(tgt_obj))  # a key not located: not in the selection
        if eligible is not None:
            allowed = eligible_codes(records.keys, eligible)
            ok[ok] = np.isin(object_code(ref[ok], ref_obj[ok]), allowed)
            ok[ok] = np.isin(object_code(tgt[ok], tgt_obj[ok]), allowed)
        order = np.argsort(tgt[ok], kind="stable")
        tgt_rec = tgt[ok][order].astype(np.int32)
        return cls(
            path=path,
            records=records,
            ref_rec=ref[ok][order].astype(np.int32),
            ref_obj=ref_obj[ok][order].astype(np.int32),
            tgt_rec=tgt_rec,
            tgt_obj=tgt_obj[ok][order].astype(np.int32),
            starts=np.searchsorted(tgt_rec, np.arange(len(records) + 1)).astype(np.int64),
            total=t.num_rows,
        )


def object_code(rec: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """(n,) int64 codes of (record id, object index) pairs: one integer each, for np.isin."""
    return rec.astype(np.int64) * (1 << 16) + obj.astype(np.int64)  # a record holds far fewer than 65536 objects


def eligible_codes(keys: np.ndarray, eligible: Mapping[str, list[int]]) -> np.ndarray:
    """The object_codes of the eligible objects of the located records KEYS (R,): a record the selection does not
    list has none."""
    recs = [np.full(len(eligible.get(k, ())), r, np.int64) for r, k in enumerate(keys.tolist())]
    objs = [np.asarray(eligible.get(k, ()), np.int64) for k in keys.tolist()]
    if not recs:
        return np.zeros(0, np.int64)
    return object_code(np.concatenate(recs), np.concatenate(objs))


def nulls(a: np.ndarray) -> np.ndarray:
    """(n,) bool: the nulls of an integer column read to numpy (pyarrow gives floats with NaN when it has some)."""
    return np.isnan(a) if a.dtype.kind == "f" else np.zeros(len(a), bool)


def _unit(*parts: object) -> float:
    """A number in [0, 1) from a hash of parts: the same on every rank, worker and run."""
    h = hashlib.sha1("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


@dataclass(frozen=True)
class PairMixer:
    """Which sample slots of a worker's epoch are pair samples, and which pair each takes.

    Slot j of reader (rank x worker part) `reader` is a pair slot when floor((j + 1) r + u) > floor(j r + u)
    (r = ratio, u = the reader's phase in [0, 1), seeded): the pair slots are spread evenly, exactly
    floor(n r + u) of the first n slots, so every batch holds about r pair samples. A single slot takes the
    reader's next record (as a run without pairs does), a pair slot its next pair: the k-th pair slot takes row
    `pair_row(k, ...)` of a per-epoch seeded permutation of the valid pairs, cut into one contiguous range per
    reader; k past the range starts a new permutation (cycle), so pairs fewer than records repeat, more than
    records are met in later epochs. ratio 1: every slot is a pair slot and a reader's epoch is its range."""

    ratio: float
    seed: int

    def phase(self, epoch: int, reader: int) -> float:
        return _unit("pair-phase", self.seed, epoch, reader)

    def pairs_before(self, j: int, phase: float) -> int:
        """How many of slots [0, j) are pair slots."""
        return math.floor(j * self.ratio + phase) - math.floor(phase)

    def is_pair(self, j: int, phase: float) -> bool:
        return self.pairs_before(j + 1, phase) > self.pairs_before(j, phase)

    @staticmethod
    def quota(pairs: int, readers: int) -> int:
        """Pairs in each reader's range: equal ranges, the remainder left to the next permutation; with fewer
        pairs than readers each reader takes one (pairs repeat)."""
        return max(pairs // readers, 1) if pairs else 0

    def pair_row(self, k: int, epoch: int, reader: int, readers: int, pairs: int) -> int:
        """The valid-pair row of this reader's k-th pair slot in the epoch (pairs >= 1)."""
        q = self.quota(pairs, readers)
        cycle, i = divmod(k, q)
        order = self.order(epoch, cycle, pairs)
        return int(order[(reader * q + i) % pairs])

    def order(self, epoch: int, cycle: int, pairs: int) -> np.ndarray:
        """(pairs,) the seeded permutation of the valid pairs for (epoch, cycle): the same on every reader."""
        return _cached_order(self.seed, epoch, cycle, pairs)


_ORDER: dict[tuple[int, int, int, int], np.ndarray] = {}


def _cached_order(seed: int, epoch: int, cycle: int, pairs: int) -> np.ndarray:
    """The permutation, computed once per (seed, epoch, cycle) in a process (a worker keeps the latest only)."""
    key = (seed, epoch, cycle, pairs)
    if key not in _ORDER:
        _ORDER.clear()
        rng = np.random.default_rng(int(_unit("pair-order", seed, epoch, cycle) * 2**63))
        _ORDER[key] = rng.permutation(pairs).astype(np.int32)  # 4 bytes a pair: P < 2**31
    return _ORDER[key]
