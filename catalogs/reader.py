"""Shard reader: decoded records from webdataset shards, split over DDP ranks and DataLoader workers.

    reader = RecordReader("out/")                       # every complete shard of a datagen output folder
    reader = RecordReader(["a.tar", "b.tar"])           # explicit shards (paths or fsspec URLs)
    reader = RecordReader("out/{00000..00009}.tar")     # a brace pattern
    reader = RecordReader(selection="sel.parquet")      # the keys of a `catalog select`
    for rec in reader: rec.image (H, W, 3) uint8, rec.masks (N, H, W) bool, rec.boxes (N, 4) xyxy in [0, 1]

RecordReader is a webdataset pipeline, hence a torch IterableDataset: hand it to a DataLoader as is.
Each (rank, worker) pair reads a disjoint part: whole shards when there are at least as many shards as
readers, otherwise every reader scans the shards and keeps every k-th sample. split="balanced" (training) gives
every reader exactly as many records: see RecordReader.

Records are checked where they are read: a tar member that is not a regular file (a symlink or hard link, which
webdataset would skip without a word), a record without its JSON or its image, malformed JSON and fields that
break the contract raise BadRecordError naming the shard and the key, or with on_error="yield" come out as a
BadRecord in the record's place, for the consumer to count and go on.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import braceexpand
import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image
from webdataset.utils import pytorch_worker_info

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.schema import RECORD_IMAGE_FORMATS, ObjectAnn, Record, RecordError, validate
from subjectdiff.catalogs.selection import load_selection
from subjectdiff.catalogs.storage import Folder, RetryingReader, is_local, local_path, open_url
from subjectdiff.catalogs.writer import SAMPLES_SUFFIX, complete_shards, shard_files


@dataclass
class DecodedRecord:
    """One record, decoded.

    image: (H, W, 3) uint8 RGB, or None when the reader was told not to decode images.
    masks: (N, H, W) bool, one per object (overlaps preserved), or None when not decoded.
    boxes: (N, 4) float32 xyxy normalized to [0, 1]. scores, mask_scores: (N,) float32.
    tokens: per object, CLIP token positions (start token at 0). spans: [start, end) into caption.
    """

    key: str
    caption: str
    width: int
    height: int
    source: str
    image: np.ndarray | None
    masks: np.ndarray | None
    boxes: np.ndarray
    labels: list[str]
    phrases: list[str]
    spans: list[list[int]]
    tokens: list[list[int]]
    scores: np.ndarray
    mask_scores: np.ndarray
    objects: list[ObjectAnn] = field(repr=False, default_factory=list)
    image_bytes: bytes | None = field(repr=False, default=None)
    image_ext: str = "jpg"
    shard: str = ""
    meta: dict[str, Any] = field(repr=False, default_factory=dict)


class BadRecordError(ValueError):
    """A record the reader refuses, named: shard (its tar's path or URL), key, reason (one line). Raised for a
    tar member that is not a regular file (a symlink, a hard link), a record without its JSON or image member,
    JSON that does not parse, and fields that break the contract (catalogs.schema.validate, the image's size)."""

    def __init__(self, shard: str, key: str | None = None, reason: str | None = None):
        if key is None and reason is None:  # torch's DataLoader re-raises a worker's error as type(e)(message)
            super().__init__(shard)
            self.shard, self.key, self.reason = "", "", shard
            return
        super().__init__(f"record {key} (shard {shard}): {reason}")
        self.shard, self.key, self.reason = shard, key or "", reason or ""


@dataclass(frozen=True)
class BadRecord:
    """What RecordReader(on_error="yield") yields in place of a record it refuses (BadRecordError's fields), so
    that its consumer can count it as read."""

    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"record {self.key} (shard {self.shard}): {self.reason}"


def shard_counts(
    urls: Iterable[str], selection: Mapping[str, set[str]] | None, wanted: set[str] | None
) -> dict[str, int]:
    """How many records each shard gives a reader with this selection / key filter: counted from the selection,
    else from the shard's sidecars beside its tar (NAME_stats.json; NAME.samples.parquet, or a shard written
    before issue #19 its NAME.parquet, when a key filter applies),
    read in parallel (each is one request on an object store)."""
    urls = list(urls)
    if selection is not None:
        out = {}
        for u in urls:
            keys = selection.get(u) or (selection.get(os.path.abspath(u)) if is_local(u) else None) or set()
            out[u] = len(keys if wanted is None else keys & wanted)
        return out

    def count(u: str) -> int:
        stem = u[: -len(".tar")] if u.endswith(".tar") else u
        sidecar = f"{stem}_stats.json" if wanted is None else f"{stem}{SAMPLES_SUFFIX}"
        try:
            if wanted is None:
                with open_url(sidecar) as f:
                    return int(json.load(f)["successes"])
            t = _sample_status(stem)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{u}: a balanced split needs each shard's record count, from {sidecar} (written "
                "with the shard), which is missing; read a selection instead, or split='auto'"
            ) from None
        return sum(st == "ok" and k in wanted for k, st in zip(t["key"], t["status"]))

    with ThreadPoolExecutor(16 if any(not is_local(u) for u in urls) else 2) as pool:
        return dict(zip(urls, pool.map(count, urls)))


def _sample_status(stem: str) -> dict[str, list]:
    """{key, status} of the samples sidecar beside the tar STEM.tar: STEM.samples.parquet, else (a shard
    written before issue #19) STEM.parquet; FileNotFoundError when neither is there."""
    try:
        f = open_url(f"{stem}{SAMPLES_SUFFIX}")
    except FileNotFoundError:
        f = open_url(f"{stem}.parquet")
    with f:
        return pq.read_table(f, columns=["key", "status"]).to_pydict()


def resolve_shards(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard URLs from a folder (its complete shards; a local path or a URL such as s3://bucket/out), a brace
    pattern, one path, or a list of these."""
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if not s.endswith(".tar") and "{" not in s and Folder(s).is_folder():
            names = complete_shards(s)
            if not names:
                raise FileNotFoundError(f"no complete shards (NAME.tar with NAME_stats.json) in {s}")
            return [shard_files(s, n)["tar"] for n in names]
        urls = list(braceexpand.braceexpand(s))
        missing = [u for u in urls if is_local(u) and not os.path.exists(local_path(u))]
        if missing:  # here, not as the first shard's missing sidecar or tar
            raise FileNotFoundError(f"{missing[0]}: no such record folder or shard")
        return urls
    out: list[str] = []
    for item in spec:
        out.extend(resolve_shards(item))
    return out


def open_shards(src: Iterator[dict[str, Any]], handler=wds.reraise_exception) -> Iterator[dict[str, Any]]:
    """webdataset's url_opener for any fsspec URL (its own gopen has no s3): each {"url"} gets a "stream" that
    retries dropped reads (storage.RetryingReader)."""
    for sample in src:
        url = sample["url"]
        try:
            stream = io.BufferedReader(RetryingReader(url), buffer_size=1 << 20)
        except Exception as e:
            e.args = e.args + (url,)
            if handler(e):
                continue
            break
        yield {**sample, "stream": stream}


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them


def _tar_samples(src: Iterator[dict[str, Any]], handler=wds.reraise_exception) -> Iterator[dict[str, Any]]:
    """Shard URLs -> raw samples ({"__key__", "__url__", "json", "jpg"|...: bytes}), members grouped by key as
    webdataset groups them, with open_shards as the opener. Where webdataset skips a member that is not a regular
    file without a word (a symlink or hard link: the record then lacks it, or vanishes), its sample keeps
    `__problems__` saying so, for decode_record to refuse."""
    for source in open_shards(src, handler):
        try:
            yield from _shard_samples(source["stream"], source["url"])
        except Exception as e:
            e.args = e.args + (source["url"],)
            if handler(e):
                continue
            break
        finally:
            source["stream"].close()


def _shard_samples(stream, url: str) -> Iterator[dict[str, Any]]:
    """One tar stream's samples (_tar_samples)."""
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            tar.members = []  # a streamed tar need not remember its members: memory stays flat over a shard
            prefix, suffix = wds.tariterators.base_plus_ext(member.name)
            if member.isdir() or prefix is None or _META_MEMBER.match(member.name):
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": prefix, "__url__": url}
            if not member.isfile():
                kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                current.setdefault("__problems__", []).append(f"member {member.name} is a {kind}, not a file")
            elif suffix in current:
                current.setdefault("__problems__", []).append(f"member {member.name} appears twice")
            else:
                current[suffix] = tar.extractfile(member).read()
    if current is not None:
        yield current


# KEY.json fields every record has, with their types (catalogs.schema.Record.meta_json)
_JSON_FIELDS = {"key": str, "caption": str, "width": int, "height": int, "source": str, "objects": list}
_CURATION_FIELDS = ("sha256", "phash", "clip_score", "alt_clip_score", "aesthetic", "white_fraction")


def decode_record(sample: dict[str, Any], *, decode_image: bool = True, decode_masks: bool = True) -> DecodedRecord:
    """A raw webdataset sample ({"__key__", "json", "jpg"|...: bytes}) -> DecodedRecord. A sample that breaks the
    contract raises BadRecordError naming its shard and key (see BadRecordError)."""
    url, key = sample.get("__url__", ""), sample["__key__"]
    meta, objects, ext = _checked(sample)
    raw = sample[ext]
    h, w = meta["height"], meta["width"]
    image = None
    if decode_image:
        try:
            with Image.open(io.BytesIO(raw)) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise BadRecordError(url, key, f"{key}.{ext} does not decode: {type(e).__name__}: {e}") from None
        if image.shape[:2] != (h, w):
            raise BadRecordError(url, key, f"image is {image.shape[1]}x{image.shape[0]}, its JSON says {w}x{h}")
    masks = None
    if decode_masks:
        try:
            masks = mask_codec.decode_many([o.mask for o in objects], h, w)
        except Exception as e:
            raise BadRecordError(url, key, f"a mask does not decode: {type(e).__name__}: {e}") from None
    n = len(objects)
    return DecodedRecord(
        key=meta["key"],
        caption=meta["caption"],
        width=w,
        height=h,
        source=meta["source"],
        image=image,
        masks=masks,
        boxes=np.asarray([o.box for o in objects], dtype=np.float32).reshape(n, 4),
        labels=[o.label for o in objects],
        phrases=[o.phrase for o in objects],
        spans=[list(o.span) for o in objects],
        tokens=[list(o.tokens) for o in objects],
        scores=np.asarray([o.score for o in objects], dtype=np.float32),
        mask_scores=np.asarray([o.mask_score for o in objects], dtype=np.float32),
        objects=objects,
        image_bytes=raw,
        image_ext=ext,
        shard=os.path.basename(url),
        meta=meta,
    )


def _checked(sample: dict[str, Any]) -> tuple[dict[str, Any], list[ObjectAnn], str]:
    """(meta, objects, image extension) of a raw sample that has its two members, parsing JSON whose fields keep
    the contract (catalogs.schema.validate); BadRecordError otherwise. Cheap: nothing is decoded."""
    url, key = sample.get("__url__", ""), sample["__key__"]

    def bad(reason: str) -> BadRecordError:
        return BadRecordError(url, key, reason)

    if sample.get("__problems__"):
        raise bad("; ".join(sample["__problems__"]))
    exts = [e for e in RECORD_IMAGE_FORMATS if e in sample]
    if "json" not in sample:
        raise bad(f"no {key}.json member beside {key}.{exts[0]}" if exts else f"no {key}.json member")
    if len(exts) != 1:
        found = ", ".join(f"{key}.{e}" for e in exts) or "none"
        raise bad(f"expected one image member ({', '.join(RECORD_IMAGE_FORMATS)}), found {found}")
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise bad(f"{key}.json is malformed: {e}") from None
    if not isinstance(meta, dict):
        raise bad(f"{key}.json is a JSON {type(meta).__name__}, not an object")
    for name, kind in _JSON_FIELDS.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            have = "missing" if name not in meta else f"a {type(meta[name]).__name__}"
            raise bad(f"{key}.json field {name!r} is {have}, not a {kind.__name__}")
    if meta["key"] != key:
        raise bad(f"{key}.json says key {meta['key']!r}")
    try:
        objects = [ObjectAnn.from_json(o) for o in meta["objects"]]
        validate(
            Record(
                key=key,
                image=sample[exts[0]],
                image_ext=exts[0],
                caption=meta["caption"],
                width=meta["width"],
                height=meta["height"],
                source=meta["source"],
                objects=objects,
                **{f: meta.get(f) for f in _CURATION_FIELDS},
            )
        )
    except RecordError as e:
        raise bad(str(e).removeprefix(f"{key}: ")) from None
    except (TypeError, ValueError, AttributeError) as e:  # an object that is not one (a missing field, a list)
        raise bad(f"{key}.json objects break the contract: {type(e).__name__}: {e}") from None
    return meta, objects, exts[0]


def _decode_or_mark(sample: dict[str, Any], **kwargs) -> DecodedRecord | BadRecord:
    """decode_record, a refused record as its BadRecord."""
    try:
        return decode_record(sample, **kwargs)
    except BadRecordError as e:
        return BadRecord(e.shard, e.key, e.reason)


class RecordReader(wds.DataPipeline):
    """Decoded records from shards; see the module docstring.

    split: "auto" (shards when there are enough, else samples), "shard", "sample", or "balanced".
    rank/world_size: default from torch.distributed or RANK/WORLD_SIZE; workers from the DataLoader.
    selection: a `catalog select` Parquet, or its content as {shard path: keys} (as load_selection returns it).
    keys: keep only these keys (in addition to a selection's).
    shuffle_seed: when set, shard order is permuted with (seed, epoch); call set_epoch(e) each epoch.
    on_error: what a broken sample or shard does: "raise" (a record that breaks the contract as BadRecordError,
        naming its shard and key), "warn" (skipped with a warning), or "yield" (a refused record is yielded as a
        BadRecord in its place, for the consumer to count; other errors raise).

    split="balanced": the epoch's records, in shard order, are cut into one contiguous range per reader, all of
    the same length (`quota`: a multiple of `multiple` when the records allow it); the remainder, at most
    readers x multiple records at the end of the epoch's order, is dropped (with fewer records than readers,
    each reader reads one and records repeat). Every rank and worker then yields the same number of full batches per
    epoch, so no rank runs ahead into the next epoch, and a position within the epoch is just the number of
    records each reader has yielded: set_epoch(e, skip=...) resumes there, opening no shard that lies wholly
    before it and decoding nothing before it. Shard record counts come from the selection or the sidecars.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        *,
        selection: str | os.PathLike | Mapping[str, Iterable[str]] | None = None,
        keys: Iterable[str] | None = None,
        split: str = "auto",
        multiple: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        decode_image: bool = True,
        decode_masks: bool = True,
        shuffle_seed: int | None = None,
        on_error: str = "raise",
    ):
        if split not in ("auto", "shard", "sample", "balanced"):
            raise ValueError(f"split must be 'auto', 'shard', 'sample' or 'balanced', got {split!r}")
        if on_error not in ("raise", "warn", "yield"):
            raise ValueError(f"on_error must be 'raise', 'warn' or 'yield', got {on_error!r}")
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        urls = resolve_shards(shards) if shards is not None else []
        wanted: set[str] | None = set(keys) if keys is not None else None
        sel = None
        if selection is not None:
            if isinstance(selection, Mapping):
                sel = {path: set(ks) for path, ks in selection.items()}
            else:
                sel = load_selection(selection)
            if shards is None:
                urls = sorted(sel)
            else:
                urls = [u for u in urls if u in sel or (is_local(u) and os.path.abspath(u) in sel)]
            sel_keys = set().union(*sel.values()) if sel else set()
            wanted = sel_keys if wanted is None else wanted & sel_keys
        if shards is None and selection is None:
            raise ValueError("RecordReader needs shards, a selection, or both")
        self.urls = urls
        self.wanted = wanted
        self.split = split
        self._rank, self._world = rank, world_size
        self.shuffle_seed = shuffle_seed
        self.multiple = multiple
        self.counts = shard_counts(urls, sel, wanted) if split == "balanced" else None
        self.epoch, self.skip, self.first_worker = 0, (), 0
        self.on_error = on_error
        handler = wds.warn_and_continue if on_error == "warn" else wds.reraise_exception
        decode = partial(
            _decode_or_mark if on_error == "yield" else decode_record,
            decode_image=decode_image,
            decode_masks=decode_masks,
        )
        super().__init__(
            self._shard_stage,
            wds.filters.pipelinefilter(_tar_samples)(handler=handler),
            self._sample_stage,
            wds.map(decode, handler=handler),
        )

    def set_epoch(self, epoch: int, skip: Sequence[int] = (), first_worker: int = 0) -> None:
        """Read epoch `epoch` (its shard order). Balanced split only: worker part w of this rank starts after
        its first skip[w] records; DataLoader worker k reads part (k + first_worker) % workers, so that a
        DataLoader started mid-epoch (it always asks worker 0 first) takes up the round robin where it stopped."""
        if (any(skip) or first_worker) and self.split != "balanced":
            raise ValueError("set_epoch(skip=, first_worker=) needs split='balanced'")
        self.epoch, self.skip, self.first_worker = epoch, tuple(skip), first_worker

    def worker_part(self) -> tuple[int, int]:
        """(the worker part this process reads, DataLoader workers per rank); one part outside a DataLoader."""
        _, _, worker, n_workers = pytorch_worker_info()
        return (worker + self.first_worker) % n_workers, n_workers

    def reader_index(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and DataLoader workers."""
        rank, world, _, _ = pytorch_worker_info()
        rank = self._rank if self._rank is not None else rank
        world = self._world if self._world is not None else world
        part, n_workers = self.worker_part()
        return rank * n_workers + part, world * n_workers

    def epoch_size(self) -> int:
        """Records per epoch over all readers, before a balanced split drops its remainder."""
        if self.counts is None:
            raise ValueError("epoch_size() needs split='balanced' (the shards' record counts)")
        return sum(self.counts.values())

    def quota(self, readers: int) -> int:
        """Records each of `readers` readers yields per epoch in a balanced split: a multiple of `multiple` when
        every reader gets one, else as many as each can get, and 1 when there are fewer records than readers
        (reader i then reads record i modulo the epoch's size: records repeat)."""
        total = self.epoch_size()
        each = total // readers
        if each >= self.multiple:
            return each // self.multiple * self.multiple
        return each or min(total, 1)

    def _epoch_urls(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed * 1_000_003 + self.epoch).shuffle(urls)
        return urls

    def _balanced_windows(self) -> dict[str, tuple[int, int]]:
        """This reader's part of the epoch, past its skip: {shard: [first, stop) of its records}, in read order."""
        i, n = self.reader_index()
        q, total = self.quota(n), self.epoch_size()
        part, n_workers = self.worker_part()
        if self.skip and len(self.skip) != n_workers:
            raise ValueError(
                f"set_epoch(skip={list(self.skip)}) is for {len(self.skip)} workers, this DataLoader has {n_workers}"
            )
        start = i * q if total >= n else i % max(total, 1)  # fewer records than readers: each reads one, in turn
        lo, hi = start + min(self.skip[part] if self.skip else 0, q), start + q
        windows, pos = {}, 0
        for u in self._epoch_urls():
            c = self.counts[u]
            if pos < hi and pos + c > lo:
                windows[u] = (max(lo - pos, 0), min(hi - pos, c))
            pos += c
        return windows

    def _by_shard(self) -> bool:
        _, n = self.reader_index()
        return self.split == "shard" or (self.split == "auto" and len(self.urls) >= n)

    def _shard_stage(self) -> Iterator[dict[str, str]]:
        if self.split == "balanced":
            yield from ({"url": u} for u in self._balanced_windows())
            return
        urls = self._epoch_urls()
        if self._by_shard():
            i, n = self.reader_index()
            urls = urls[i::n]
        for u in urls:
            yield {"url": u}

    def _sample_stage(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.split == "balanced":
            yield from self._balanced_samples(samples)
            return
        by_shard = self._by_shard()
        i, n = self.reader_index()
        seen = 0
        for s in samples:
            if self.wanted is not None and s["__key__"] not in self.wanted:
                continue
            if not by_shard:
                seen += 1
                if (seen - 1) % n != i:
                    continue
            yield s

    def _balanced_samples(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The raw samples inside this reader's windows (before decoding: skipped records cost tar reading only)."""
        windows = self._balanced_windows()
        left = sum(stop - first for first, stop in windows.values())
        index: dict[str, int] = {}
        for s in samples:
            if self.wanted is not None and s["__key__"] not in self.wanted:
                continue
            u = s["__url__"]
            k = index[u] = index.get(u, -1) + 1
            first, stop = windows[u]
            if first <= k < stop:
                left -= 1
                yield s
                if left == 0:
                    return  # the rest of the last shard belongs to the next reader
        if left and self.on_error != "warn":
            raise ValueError(
                f"reader {self.reader_index()}: its shards ran out {left} records short of their "
                "counts (selection or _stats.json): a shard holds fewer records than catalogued"
            )
