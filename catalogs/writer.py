"""Shard writer: webdataset tars with Parquet sidecars and a `_stats.json`, committed atomically.

A shard named NAME in DIR is these files:
    NAME.tar              the records (KEY.jpg|png|webp + KEY.json)
    NAME.parquet          one row per sample, ok and failed (status, stage, reason), as img2dataset does
    NAME.objects.parquet  one row per object of the ok samples
    NAME_stats.json       counts, failure reasons, timings: written last, it marks the shard complete

Everything is written under a `.tmp` name first and renamed when complete, so a crash never leaves a
half shard under a final name. `NAME_stats.json` is renamed last: a shard without it is incomplete, and
readers, the catalog and resumed runs ignore or redo it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from catalogs.schema import SCHEMA_VERSION, Failure, Record, RecordError, compute_quality, validate

TMP_SUFFIX = ".tmp"

SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),  # "ok" | "failed"
        ("stage", pa.string()),  # failure stage, null when ok
        ("reason", pa.string()),  # failure reason, null when ok
        ("source", pa.string()),
        ("caption", pa.string()),
        ("alt_text", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_objects", pa.int32()),
        ("image_ext", pa.string()),
        ("image_bytes", pa.int64()),
        ("schema_version", pa.int32()),
    ]
)

OBJECT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("label", pa.string()),
        ("phrase", pa.string()),
        ("span_start", pa.int32()),
        ("span_end", pa.int32()),
        ("tokens", pa.list_(pa.int32())),
        ("score", pa.float32()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("area", pa.float32()),
        ("aspect", pa.float32()),
        ("mask_area", pa.float32()),
        ("mask_fill", pa.float32()),
        ("containment", pa.float32()),
        ("mask_score", pa.float32()),
    ]
)


def shard_files(directory: str | os.PathLike, name: str) -> dict[str, Path]:
    """The final paths of shard NAME's files."""
    d = Path(directory)
    return {
        "tar": d / f"{name}.tar",
        "samples": d / f"{name}.parquet",
        "objects": d / f"{name}.objects.parquet",
        "stats": d / f"{name}_stats.json",
    }


def is_complete(directory: str | os.PathLike, name: str) -> bool:
    """A shard is complete when all its files exist; the stats file is committed last."""
    return all(p.exists() for p in shard_files(directory, name).values())


def complete_shards(directory: str | os.PathLike) -> list[str]:
    """Names of the complete shards in DIR, sorted."""
    names = [p.name[: -len("_stats.json")] for p in Path(directory).glob("*_stats.json")]
    return sorted(n for n in names if is_complete(directory, n))


@dataclass
class ShardStats:
    name: str
    n_ok: int = 0
    n_failed: int = 0
    n_objects: int = 0
    bytes: int = 0
    failures_by_stage: Counter = field(default_factory=Counter)
    failures_by_reason: Counter = field(default_factory=Counter)
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        end = self.end_time or time.time()
        return {
            "shard": self.name,
            "schema_version": SCHEMA_VERSION,
            "count": self.n_ok + self.n_failed,
            "successes": self.n_ok,
            "failed": self.n_failed,
            "objects": self.n_objects,
            "bytes": self.bytes,
            "failures_by_stage": dict(self.failures_by_stage),
            "failures_by_reason": dict(self.failures_by_reason),
            "start_time": self.start_time,
            "end_time": end,
            "duration": end - self.start_time,
        }


class ShardWriter:
    """Write one shard. Use as a context manager: an exception inside aborts and leaves nothing visible.

        with ShardWriter(out_dir, "00000") as w:
            w.write(record)          # validated, quality fields computed
            w.fail(Failure(...))     # a sample that dropped out, with its stage and reason
        # on exit: files renamed into place, stats returned by w.stats
    """

    def __init__(self, directory: str | os.PathLike, name: str, *, extra_stats: dict[str, Any] | None = None):
        if "/" in name or name.startswith("."):
            raise ValueError(f"shard name {name!r} must be a plain file stem")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.final = shard_files(self.directory, name)
        self.tmp = {k: p.with_name(p.name + TMP_SUFFIX) for k, p in self.final.items()}
        self.stats = ShardStats(name)
        self.extra_stats = extra_stats or {}
        self._keys: set[str] = set()
        self._samples: list[dict[str, Any]] = []
        self._objects: list[dict[str, Any]] = []
        self._tar = tarfile.open(self.tmp["tar"], "w", format=tarfile.USTAR_FORMAT)
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __contains__(self, key: str) -> bool:
        """Whether KEY was already written (or failed) to this shard."""
        return key in self._keys

    def _claim(self, key: str) -> None:
        if self._closed:
            raise RuntimeError(f"shard {self.name} is already closed")
        if key in self._keys:
            raise RecordError(f"{key}: key written twice to shard {self.name}")
        self._keys.add(key)

    def _add_member(self, name: str, data: bytes, mtime: float) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(mtime)
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, record: Record) -> None:
        """Validate the record, fill its quality fields, and append it to the shard."""
        validate(record)
        self._claim(record.key)
        compute_quality(record.objects, record.width, record.height)
        meta = json.dumps(record.meta_json(), ensure_ascii=False).encode("utf-8")
        # Members of one sample share a fixed mtime so that the same records give the same bytes.
        self._add_member(f"{record.key}.{record.image_ext}", record.image, 0)
        self._add_member(f"{record.key}.json", meta, 0)
        self.stats.n_ok += 1
        self.stats.n_objects += len(record.objects)
        self.stats.bytes += len(record.image) + len(meta)
        self._samples.append(
            {
                "key": record.key,
                "shard": self.name,
                "status": "ok",
                "stage": None,
                "reason": None,
                "source": record.source,
                "caption": record.caption,
                "alt_text": record.alt_text,
                "width": record.width,
                "height": record.height,
                "n_objects": len(record.objects),
                "image_ext": record.image_ext,
                "image_bytes": len(record.image),
                "schema_version": SCHEMA_VERSION,
            }
        )
        for i, o in enumerate(record.objects):
            self._objects.append(
                {
                    "key": record.key,
                    "shard": self.name,
                    "index": i,
                    "label": o.label,
                    "phrase": o.phrase,
                    "span_start": o.span[0],
                    "span_end": o.span[1],
                    "tokens": o.tokens,
                    "score": o.score,
                    "x0": o.box[0],
                    "y0": o.box[1],
                    "x1": o.box[2],
                    "y1": o.box[3],
                    "area": o.area,
                    "aspect": o.aspect,
                    "mask_area": o.mask_area,
                    "mask_fill": o.mask_fill,
                    "containment": o.containment,
                    "mask_score": o.mask_score,
                }
            )

    def fail(self, failure: Failure) -> None:
        """Record a sample that dropped out at `failure.stage`; it appears in the catalog's failures."""
        self._claim(failure.key)
        self.stats.n_failed += 1
        self.stats.failures_by_stage[failure.stage] += 1
        self.stats.failures_by_reason[failure.reason] += 1
        self._samples.append(
            {
                "key": failure.key,
                "shard": self.name,
                "status": "failed",
                "stage": failure.stage,
                "reason": failure.reason,
                "source": failure.source,
                "caption": None,
                "alt_text": None,
                "width": None,
                "height": None,
                "n_objects": 0,
                "image_ext": None,
                "image_bytes": None,
                "schema_version": SCHEMA_VERSION,
            }
        )

    def close(self) -> ShardStats:
        """Finish the files and rename them into place; the stats file goes last and marks completion."""
        if self._closed:
            return self.stats
        self._tar.close()
        pq.write_table(pa.Table.from_pylist(self._samples, schema=SAMPLE_SCHEMA), self.tmp["samples"])
        pq.write_table(pa.Table.from_pylist(self._objects, schema=OBJECT_SCHEMA), self.tmp["objects"])
        self.stats.end_time = time.time()
        stats = {**self.stats.to_json(), **self.extra_stats}
        self.tmp["stats"].write_text(json.dumps(stats, indent=2, sort_keys=True))
        for kind in ("tar", "samples", "objects", "stats"):
            _fsync(self.tmp[kind])
            os.replace(self.tmp[kind], self.final[kind])
        _fsync_dir(self.directory)
        self._closed = True
        return self.stats

    def abort(self) -> None:
        """Drop everything written so far; no file of this shard remains, final or temporary."""
        try:
            self._tar.close()
        finally:
            for p in self.tmp.values():
                p.unlink(missing_ok=True)
            self._closed = True


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardSink:
    """Rolls records over numbered shards (00000, 00001, ...) of at most `max_count` samples each.

    For jobs that do not own a fixed input partition per shard (datagen names shards after its input
    partitions instead, so that a resumed run rewrites exactly the shards it lost).
    """

    def __init__(self, directory: str | os.PathLike, *, max_count: int = 1000, start: int = 0, digits: int = 5):
        if max_count < 1:
            raise ValueError("max_count must be >= 1")
        self.directory = Path(directory)
        self.max_count = max_count
        self.index = start
        self.digits = digits
        self._writer: ShardWriter | None = None
        self.written: list[ShardStats] = []

    def _current(self) -> ShardWriter:
        w = self._writer
        if w is not None and w.stats.n_ok + w.stats.n_failed >= self.max_count:
            self.written.append(w.close())
            w = None
        if w is None:
            w = ShardWriter(self.directory, f"{self.index:0{self.digits}d}")
            self.index += 1
        self._writer = w
        return w

    def write(self, record: Record) -> None:
        self._current().write(record)

    def fail(self, failure: Failure) -> None:
        self._current().fail(failure)

    def close(self) -> list[ShardStats]:
        if self._writer is not None:
            self.written.append(self._writer.close())
            self._writer = None
        return self.written

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.abort()
