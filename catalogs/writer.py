"""Shard writer: webdataset tars with Parquet sidecars and a `_stats.json`, committed atomically, to a local
folder or any fsspec URL (catalogs/storage.py).

A shard named NAME in DIR is these files:
    NAME.tar              the records (KEY.jpg|png|webp + KEY.json)
    NAME.samples.parquet  one row per sample, ok and failed (status, stage, reason), as img2dataset does
    NAME.objects.parquet  one row per object of the ok samples
    NAME.clip.parquet     only when the records carry image embeddings (datagen's curate stage): one row per ok
                          sample with one, in record order (catalogs/embeddings.py)
    NAME.identity.parquet only when the records carry identity embeddings (datagen's identity stage): one row per
                          object of each ok sample with them, in record and object order (catalogs/identity.py)
    NAME_stats.json       counts, failure reasons, timings, the sizes of the files above, and who wrote the
                          shard: written last, it marks the shard complete

Nothing is visible under a final name before it is complete. The shard is assembled in a spool folder on the
local disk (for a local DIR, DIR itself under `.tmp` names; for a remote DIR, a temporary folder of this
machine), then each file is published in turn, tar, samples, objects, embeddings and the stats last: renamed into place
locally, uploaded as one object remotely (object stores have no rename, but an upload is atomic). A shard
without its stats file is incomplete, and readers, the catalog and resumed runs ignore or redo it; a stats
file whose recorded sizes disagree with the files beside it (a stale upload) counts as incomplete too. The
embedding and identity sidecars are optional: a shard without one (a run without the curate or identity stage) is
complete.
`complete_shards` says which shards of a listing are complete, `partial_files` what an interrupted attempt left
of the others (a run removes it before redoing them whole).

Each kind of file has its own suffix, so a glob names one kind (`*.samples.parquet`, `*.objects.parquet`,
`*.clip.parquet`) and never mixes schemas. Shards written before issue #19 name their samples sidecar
`NAME.parquet` (`LEGACY_NAMES`): they stay complete and readable (`listed_names` says which name a shard
uses), and a retry that rewrites such a shard removes the old name. Every sidecar is written with its fixed
schema (SAMPLE_SCHEMA, OBJECT_SCHEMA), so a nullable column is typed even in a shard where it is all null.

Records may arrive in parts (`part=`, a block index): each part is spooled to its own file and the tar is
assembled in part order on close, so blocks that finish out of order still give the plan-ordered, byte-stable
tar; memory holds only the sidecar rows, never the image bytes.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from subjectdiff.catalogs import embeddings as emb_sidecar
from subjectdiff.catalogs import identity as id_sidecar
from subjectdiff.catalogs.schema import (
    SCHEMA_VERSION,
    Failure,
    Record,
    RecordError,
    VideoFrame,
    compute_quality,
    validate,
    white_fraction,
)
from subjectdiff.catalogs.storage import Folder

TMP_SUFFIX = ".tmp"
KINDS = ("tar", "samples", "objects", "stats")  # a shard's required files, in the order they are published
OPTIONAL_KINDS = ("embeddings", "identity")  # published after objects and before stats, when the shard has them
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE

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
        # curation signals (datagen's curate stage), null when not measured and for failed samples
        ("sha256", pa.string()),
        ("phash", pa.int64()),
        ("clip_score", pa.float32()),
        ("alt_clip_score", pa.float32()),
        ("aesthetic", pa.float32()),
        # near-white pixels / pixels (schema version 3), null for failed samples
        ("white_fraction", pa.float32()),
        # the video frame the sample is (schema version 4; catalogs.schema.VideoFrame), null for photos
        ("video", pa.string()),
        ("video_shot", pa.int32()),
        ("video_frame", pa.int64()),
        ("video_time", pa.float64()),
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
        ("label_score", pa.float32()),
        ("label_rank", pa.int32()),
    ]
)


SAMPLES_SUFFIX = ".samples.parquet"
OBJECTS_SUFFIX = ".objects.parquet"


def shard_names(name: str) -> dict[str, str]:
    """The file names of shard NAME's required files, by kind (tar, samples, objects, stats), as this writer
    names them."""
    return {
        "tar": f"{name}.tar",
        "samples": f"{name}{SAMPLES_SUFFIX}",
        "objects": f"{name}{OBJECTS_SUFFIX}",
        "stats": f"{name}_stats.json",
    }


def legacy_names(name: str) -> dict[str, str]:
    """The names shard NAME's files had before issue #19, by kind, where they differ from shard_names: the
    samples sidecar was `NAME.parquet`, which `*.parquet` globbed together with the other sidecars."""
    return {"samples": f"{name}.parquet"}


def listed_names(name: str, have) -> dict[str, str] | None:
    """The file names of shard NAME's required files as the listing HAVE (names, or a mapping keyed by name)
    holds them: shard_names, or for a shard written before issue #19 its legacy samples name; None when one
    is missing (the shard is not complete)."""
    names = shard_names(name)
    for kind, old in legacy_names(name).items():
        if names[kind] not in have and old in have:
            names[kind] = old
    return names if all(n in have for n in names.values()) else None


def optional_names(name: str) -> dict[str, str]:
    """The file names of the files shard NAME may have besides the required ones (OPTIONAL_KINDS)."""
    return {"embeddings": f"{name}{emb_sidecar.SUFFIX}", "identity": f"{name}{id_sidecar.SUFFIX}"}


def shard_files(directory: str | os.PathLike, name: str) -> dict[str, str]:
    """The final paths (or URLs) of shard NAME's files in DIRECTORY."""
    folder = Folder(directory)
    return {k: folder.join(n) for k, n in shard_names(name).items()}


def complete_names(names) -> list[str]:
    """The shards complete in a listing of file NAMES (relative, POSIX): those with all four files (under
    their names or the legacy ones, `listed_names`). Sorted."""
    have = set(names)
    stems = [n[: -len("_stats.json")] for n in have if n.endswith("_stats.json")]
    return sorted(s for s in stems if listed_names(s, have) is not None)


def complete_shards(directory: str | os.PathLike, listing=None) -> list[str]:
    """Names of the complete shards directly in DIRECTORY, sorted, from one listing of it (no file is opened);
    LISTING: that listing when the caller has made it already (Folder.listing)."""
    return [n for n in complete_names(Folder(directory).listing() if listing is None else listing) if "/" not in n]


_PART = re.compile(r"(.+)\.part\d+" + re.escape(TMP_SUFFIX))  # a local writer's spooled part (`_part_path`)


def shard_of(name: str) -> str | None:
    """The shard a top-level file NAME belongs to: one of its files (shard_names, optional_names, legacy_names),
    such a file's temporary name, or a local writer's spooled part (`<shard>.part<n>.tmp`); None for any
    other."""
    if "/" in name:
        return None
    part = _PART.fullmatch(name)
    if part:
        return part.group(1)
    stem = name.removesuffix(TMP_SUFFIX)
    shard = stem.split(".", 1)[0].split("_", 1)[0]
    names = (shard_names(shard), optional_names(shard), legacy_names(shard))
    return shard if any(stem in n.values() for n in names) else None


def partial_files(listing, shards) -> list[str]:
    """What earlier attempts left of SHARDS, shards that are not complete: the names of LISTING (the file names
    of their folder) that belong to them (`shard_of`), and nothing else. A shard is redone whole, so these go
    first."""
    todo = set(shards)
    return [n for n in listing if shard_of(n) in todo]


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

        with ShardWriter(out_dir_or_url, "00000") as w:
            w.write(record)          # validated, quality fields computed
            w.fail(Failure(...))     # a sample that dropped out, with its stage and reason
        # on exit: files published (stats last), stats returned by w.stats

    spool: the local folder to assemble a remote shard in (default: a new temporary folder, removed on
    close or abort). A local shard is always assembled beside its final files, so publishing is a rename.
    replace: the shard exists and is being rewritten (a retry): its stats file is removed before the new
    files are published, so that a crash in between leaves an incomplete shard, never a mix of versions.
    embedding_meta: what the embedding sidecar's metadata says of its model ({"model", "pretrained"}); the
    sidecar is written only when some record carries `clip_embedding`.
    identity_meta: what the identity sidecar's metadata says of its model ({"model", "sha256", ...}); the sidecar
    is written only when some record carries `identity_embeddings`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        name: str,
        *,
        extra_stats: dict[str, Any] | None = None,
        spool: str | os.PathLike | None = None,
        replace: bool = False,
        embedding_meta: dict[str, Any] | None = None,
        identity_meta: dict[str, Any] | None = None,
    ):
        if "/" in name or name.startswith("."):
            raise ValueError(f"shard name {name!r} must be a plain file stem")
        self.folder = Folder(directory)
        self.folder.makedirs()
        self.name = name
        self.names = shard_names(name)
        if self.folder.local:
            self._spool, self._own_spool = Path(self.folder.path), False
        else:
            base = Path(spool) if spool is not None else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self._spool, self._own_spool = Path(tempfile.mkdtemp(prefix=f"shard-{name}-", dir=base)), True
        self.names.update(optional_names(name))
        self.tmp = {k: self._spool / (n + TMP_SUFFIX) for k, n in self.names.items()}
        self.stats = ShardStats(name)
        self.extra_stats = extra_stats or {}
        self._keys: set[str] = set()
        self._parts: dict[int, Any] = {}  # part -> open spool file of its tar members
        self._samples: dict[int, list[dict[str, Any]]] = {}
        self._objects: dict[int, list[dict[str, Any]]] = {}
        self._embeddings: dict[int, list[tuple[str, np.ndarray]]] = {}  # part -> (key, (D,) float16)
        self._dim: int | None = None
        self.embedding_meta = embedding_meta or {}
        # part -> (key, object index, label, (D,) float16) rows of the identity sidecar
        self._identity: dict[int, list[tuple[str, int, str, np.ndarray]]] = {}
        self._identity_dim: int | None = None
        self.identity_meta = identity_meta or {}
        self._closed = False
        self.replace = replace

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

    def _part_path(self, part: int) -> Path:
        return self._spool / f"{self.name}.part{part:06d}{TMP_SUFFIX}"

    def _part_file(self, part: int):
        """The spool file of PART, open for appending. One stays open at a time (a retry writes one part per
        record), the others are reopened when written again."""
        if part < 0:
            raise ValueError(f"part must be >= 0, got {part}")
        f = self._parts.get(part)
        if f is None or f.closed:
            for other in self._parts.values():
                if not other.closed:
                    other.close()
            # "wb" the first time: a spool file left by a killed process must not be appended to
            self._parts[part] = f = open(self._part_path(part), "ab" if part in self._parts else "wb")
        return f

    def _add_member(self, part: int, name: str, data: bytes) -> None:
        # Members of one sample share a fixed mtime (0) so that the same records give the same bytes.
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        f = self._part_file(part)
        f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        f.write(data)
        f.write(b"\0" * (-len(data) % _BLOCK))

    def write(self, record: Record, part: int = 0) -> None:
        """Validate the record, fill its quality fields, and append it to the shard (to PART: see the module
        docstring)."""
        validate(record)
        emb = self._embedding(record.key, record.clip_embedding)
        ids = self._identity_rows(record.key, [o.label for o in record.objects], record.identity_embeddings)
        self._claim(record.key)
        compute_quality(record.objects, record.width, record.height)
        if record.white_fraction is None:  # datagen fills it from the pixels it decoded; others pay a decode here
            record.white_fraction = encoded_white_fraction(record.image)
        meta = json.dumps(record.meta_json(), ensure_ascii=False).encode("utf-8")
        self._add_member(part, f"{record.key}.{record.image_ext}", record.image)
        self._add_member(part, f"{record.key}.json", meta)
        self.stats.n_ok += 1
        self.stats.n_objects += len(record.objects)
        self.stats.bytes += len(record.image) + len(meta)
        self._samples.setdefault(part, []).append(
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
                "sha256": record.sha256,
                "phash": None if record.phash is None else int(record.phash),
                "clip_score": record.clip_score,
                "alt_clip_score": record.alt_clip_score,
                "aesthetic": record.aesthetic,
                "white_fraction": record.white_fraction,
                **_video_columns(record.video),
            }
        )
        if emb is not None:
            self._embeddings.setdefault(part, []).append((record.key, emb))
        if ids:
            self._identity.setdefault(part, []).extend(ids)
        rows = self._objects.setdefault(part, [])
        for i, o in enumerate(record.objects):
            rows.append(
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
                    "label_score": o.label_score,
                    "label_rank": None if o.label_rank is None else int(o.label_rank),
                }
            )

    def _embedding(self, key: str, e) -> np.ndarray | None:
        """A record's embedding as stored ((D,) float16), checked against the shard's dimension."""
        if e is None:
            return None
        e = np.asarray(e, np.float16).reshape(-1)
        if self._dim is None:
            self._dim = e.shape[0]
        elif e.shape[0] != self._dim:
            raise RecordError(
                f"{key}: clip_embedding has {e.shape[0]} dimensions, the shard's others "
                f"{self._dim} (one model per shard)"
            )
        return e

    def _identity_rows(self, key: str, labels: list[str], e) -> list[tuple[str, int, str, np.ndarray]]:
        """A record's identity-sidecar rows, (key, object index, label, (D,) float16) per object, checked against
        the shard's dimension; [] when it has no identity embeddings."""
        if e is None or not labels:
            return []
        e = np.asarray(e, np.float16)
        if e.shape[0] != len(labels):
            raise RecordError(f"{key}: {e.shape[0]} identity embeddings for {len(labels)} objects")
        if self._identity_dim is None:
            self._identity_dim = e.shape[1]
        elif e.shape[1] != self._identity_dim:
            raise RecordError(
                f"{key}: identity_embeddings have {e.shape[1]} dimensions, the shard's others "
                f"{self._identity_dim} (one model per shard)"
            )
        return [(key, i, lb, e[i]) for i, lb in enumerate(labels)]

    def fail(self, failure: Failure, part: int = 0) -> None:
        """Record a sample that dropped out at `failure.stage`; it appears in the catalog's failures."""
        self._claim(failure.key)
        self.stats.n_failed += 1
        self.stats.failures_by_stage[failure.stage] += 1
        self.stats.failures_by_reason[failure.reason] += 1
        self._samples.setdefault(part, []).append(
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
                **_video_columns(failure.video),
            }
        )

    def copy(
        self,
        part: int,
        members: list[bytes],
        samples: list[dict[str, Any]],
        objects: list[dict[str, Any]],
        embeddings: dict[str, np.ndarray] | None = None,
        identity: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Carry samples of an existing shard over unchanged (a retry that keeps them): MEMBERS are their raw
        tar members (512-byte header, data, padding) as the old tar holds them, SAMPLES and OBJECTS their
        sidecar rows (rows of an older sidecar without the newer columns get nulls there), EMBEDDINGS their
        rows of the embedding sidecar by key, when it had them, IDENTITY their (n_objects, D) identity embeddings by
        key, when it had them. Stats are counted from the rows."""
        embeddings = embeddings or {}
        identity = identity or {}
        labels: dict[str, list[str]] = {}
        for o in sorted(objects, key=lambda o: o["index"]):
            labels.setdefault(o["key"], []).append(o["label"])
        ids = [
            row
            for r in samples
            if r["status"] == "ok" and r["key"] in identity
            for row in self._identity_rows(r["key"], labels.get(r["key"], []), identity[r["key"]])
        ]
        kept = [
            (r["key"], self._embedding(r["key"], embeddings[r["key"]]))
            for r in samples
            if r["status"] == "ok" and r["key"] in embeddings
        ]
        for row in samples:
            self._claim(row["key"])
        f = self._part_file(part)
        for raw in members:
            f.write(raw)
        for row in samples:
            if row["status"] == "ok":
                self.stats.n_ok += 1
                self.stats.n_objects += row["n_objects"] or 0
            else:
                self.stats.n_failed += 1
                self.stats.failures_by_stage[row["stage"]] += 1
                self.stats.failures_by_reason[row["reason"]] += 1
        self.stats.bytes += sum(int(m[124:136].strip(b"\0 ") or b"0", 8) for m in members)  # ustar size fields
        self._samples.setdefault(part, []).extend({**r, "shard": self.name} for r in samples)
        self._objects.setdefault(part, []).extend({**r, "shard": self.name} for r in objects)
        if kept:
            self._embeddings.setdefault(part, []).extend(kept)
        if ids:
            self._identity.setdefault(part, []).extend(ids)

    def _rows(self, by_part: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        return [r for p in sorted(by_part) for r in by_part[p]]

    def _assemble_tar(self) -> None:
        """The parts in order, then the end-of-archive blocks, padded to a whole tar record (as tarfile does)."""
        size = 0
        with open(self.tmp["tar"], "wb") as out:
            for part in sorted(self._parts):
                self._parts[part].close()
                with open(self._part_path(part), "rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        size += len(chunk)
                self._part_path(part).unlink()
            end = 2 * _BLOCK
            end += -(size + end) % _RECORD
            out.write(b"\0" * end)
            out.flush()
            os.fsync(out.fileno())
        self._parts = {}

    def close(self) -> ShardStats:
        """Assemble the files and publish them; the stats file goes last and marks completion."""
        if self._closed:
            return self.stats
        try:
            self._assemble_tar()
            pq.write_table(pa.Table.from_pylist(self._rows(self._samples), schema=SAMPLE_SCHEMA), self.tmp["samples"])
            pq.write_table(pa.Table.from_pylist(self._rows(self._objects), schema=OBJECT_SCHEMA), self.tmp["objects"])
            kinds = ["tar", "samples", "objects"]
            emb = self._rows(self._embeddings)
            if emb:
                emb_sidecar.write_embeddings(
                    self.tmp["embeddings"], [k for k, _ in emb], np.stack([e for _, e in emb]), meta=self.embedding_meta
                )
                kinds.append("embeddings")
            ids = self._rows(self._identity)
            if ids:
                self._write_identity(ids)
                kinds.append("identity")
            self.stats.end_time = time.time()
            files = {k: self.tmp[k].stat().st_size for k in kinds}
            stats = {**self.stats.to_json(), "files": files, **self.extra_stats}
            self.tmp["stats"].write_text(json.dumps(stats, indent=2, sort_keys=True))
            if self.replace:  # the stats first (the shard turns incomplete), then a sidecar the new one lacks and
                # the legacy names, which would otherwise stand beside the new files
                lacks = [self.names[k] for k, rows in (("embeddings", emb), ("identity", ids)) if not rows]
                self.folder.remove([self.names["stats"], *lacks, *legacy_names(self.name).values()])
            for kind in kinds + ["stats"]:
                if self.folder.local:
                    _fsync(self.tmp[kind])
                self.folder.commit(self.tmp[kind], self.names[kind])
            if self.folder.local:
                _fsync_dir(self._spool)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._drop_spool()
        return self.stats

    def _write_identity(self, rows: list[tuple[str, int, str, np.ndarray]]) -> None:
        keys, index, labels, vectors = zip(*rows)
        id_sidecar.write_identity(
            self.tmp["identity"], list(keys), list(index), list(labels), np.stack(vectors), meta=self.identity_meta
        )

    def abort(self) -> None:
        """Drop everything spooled so far; nothing of this shard is published. (A failure while publishing can
        leave some of the data files, never the stats file: the shard stays incomplete.)"""
        for f in self._parts.values():
            f.close()
        for part in self._parts:
            self._part_path(part).unlink(missing_ok=True)
        self._parts = {}
        for p in self.tmp.values():
            p.unlink(missing_ok=True)
        self._closed = True
        self._drop_spool()

    def _drop_spool(self) -> None:
        if self._own_spool:
            shutil.rmtree(self._spool, ignore_errors=True)


def _video_columns(video: VideoFrame | None) -> dict[str, Any]:
    """The samples sidecar's video columns of a record or failure (all null for a photo)."""
    if video is None:
        return {"video": None, "video_shot": None, "video_frame": None, "video_time": None}
    return {"video": video.source, "video_shot": video.shot, "video_frame": video.frame, "video_time": video.time}


def encoded_white_fraction(data: bytes) -> float:
    """subjectdiff.catalogs.schema.white_fraction of encoded image bytes, decoded as catalogs.reader decodes them."""
    with Image.open(io.BytesIO(data)) as im:
        return white_fraction(np.asarray(im.convert("RGB")))


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
