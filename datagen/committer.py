"""Where records become shards: a writer actor on the node that makes them, assembling shards and publishing
them to the output (a local folder or a bucket) with catalogs.writer.ShardWriter.

The distributor (datagen/distributor.py) opens a shard on one committer, routes every block of the shard to
it as the last step of the block's chain (items stay on the node: the committer sits beside a last-stage
actor), and commits the shard once all its blocks are in. Records are spooled to the node's disk as they
arrive (never a shard of images in memory) and uploaded on commit; the driver only ever sees counts.

Attempts: each time the distributor (re)starts a shard it gives a new attempt number; calls for an older
or aborted attempt are ignored, so blocks still in flight from an abandoned attempt cannot leak into the
next one. A committer that is recreated (its node was lost) knows no open shard: appends to it fail, and
the distributor redoes those shards.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from subjectdiff.catalogs.embeddings import read_embeddings
from subjectdiff.catalogs.identity import read_identity
from subjectdiff.catalogs.schema import Failure, make_key
from subjectdiff.catalogs.storage import Folder, open_url
from subjectdiff.catalogs.tars import member_index
from subjectdiff.catalogs.writer import ShardWriter, legacy_names, optional_names, shard_names
from subjectdiff.datagen.assemble import to_record

Item = dict[str, Any]


class ShardNotOpen(RuntimeError):
    """An append or commit for a shard this committer does not hold (it was restarted, or the attempt moved on)."""


class ShardCommitter:
    """Assembles and publishes shards of OUT. spool_dir: where remote shards are assembled on this node.
    embedding_meta: the model the records' embeddings come from, for the shards' embedding sidecars;
    identity_meta: the same for their identity sidecars."""

    def __init__(
        self,
        out: str,
        spool_dir: str = "",
        extra_stats: dict[str, Any] | None = None,
        embedding_meta: dict[str, Any] | None = None,
        identity_meta: dict[str, Any] | None = None,
    ):
        import ray

        self.out = out
        self.embedding_meta = embedding_meta
        self.identity_meta = identity_meta
        self.node = ray.get_runtime_context().get_node_id()
        self.extra = {
            **(extra_stats or {}),
            "writer": {"node_id": self.node, "host": platform.node(), "pid": os.getpid()},
        }
        base = spool_dir or os.path.join(tempfile.gettempdir(), "subjectdiff-spool")
        os.makedirs(base, exist_ok=True)
        _remove_stale_spools(base)
        self.spool = os.path.join(base, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._lock = threading.Lock()
        # shard -> (attempt, its writer, the writer's lock, plan positions of its keys when merging)
        self._open: dict[str, tuple[int, ShardWriter, threading.Lock, dict[str, int] | None]] = {}
        self._dead: set[tuple[str, int]] = set()

    def node_id(self) -> str:
        return self.node

    def open(self, shard: str, attempt: int, merge: dict[str, list[str]] | None = None) -> str:
        """Start ATTEMPT of SHARD (dropping an older attempt's spooled records); returns this node's id.

        merge: {"order": the shard's keys in plan order, "replace": the keys being redone} for a retry: the
        existing shard's other samples are carried over unchanged (datagen/retry.py), and each new record
        takes its plan position."""
        w = ShardWriter(
            self.out,
            shard,
            extra_stats=self.extra,
            spool=self.spool,
            replace=merge is not None,
            embedding_meta=self.embedding_meta,
            identity_meta=self.identity_meta,
        )
        positions = None
        if merge is not None:
            try:
                positions = carry_over(w, self.out, shard, merge["order"], set(merge["replace"]))
            except BaseException:
                w.abort()
                raise
        with self._lock:
            old = self._open.pop(shard, None)
            if old is not None:
                old[1].abort()
                self._dead.add((shard, old[0]))
            self._open[shard] = (attempt, w, threading.Lock(), positions)
        return self.node

    def _writer(self, shard: str, attempt: int):
        """(writer, lock, positions) of that attempt; None for an abandoned attempt; ShardNotOpen when unknown."""
        with self._lock:
            if (shard, attempt) in self._dead:
                return None
            held = self._open.get(shard)
            if held is None or held[0] != attempt:
                raise ShardNotOpen(f"shard {shard} attempt {attempt} is not open on this writer (node {self.node})")
            return held[1:]

    def append(self, shard: str, attempt: int, part: int, items: list[Item], opened: str | None = None) -> list[int]:
        """Write one block (PART of the shard) of finished items: [records, failures] written; [0, 0] for an
        abandoned attempt. `opened` is the result of `open` (passed so that the block waits for it)."""
        got = self._writer(shard, attempt)
        if got is None:
            return [0, 0]
        w, lock, positions = got
        ok = failed = 0
        with lock:
            for item in items:
                if item["key"] in w:  # a block delivered twice: written once
                    continue
                # a video's frames take its plan position (unit_key: datagen/video.py)
                if _write(w, item, part if positions is None else positions[item.get("unit_key", item["key"])]):
                    ok += 1
                else:
                    failed += 1
        return [ok, failed]

    def commit(self, shard: str, attempt: int) -> dict[str, Any]:
        """Publish the shard (stats last). Returns its counts and where it was written."""
        got = self._writer(shard, attempt)
        if got is None:
            raise ShardNotOpen(f"shard {shard} attempt {attempt} was abandoned")
        w, lock, _ = got
        t0 = time.monotonic()
        with lock:
            st = w.close()
        with self._lock:
            self._open.pop(shard, None)
        return {
            "shard": shard,
            "ok": st.n_ok,
            "failed": st.n_failed,
            "node_id": self.node,
            "publish_s": time.monotonic() - t0,
        }

    def abort(self, shard: str, attempt: int) -> None:
        """Drop ATTEMPT of SHARD; later calls for it are ignored."""
        with self._lock:
            self._dead.add((shard, attempt))
            held = self._open.get(shard)
            if held is not None and held[0] == attempt:
                del self._open[shard]
                with held[2]:
                    held[1].abort()

    def __del__(self) -> None:
        for _, w, _, _ in list(getattr(self, "_open", {}).values()):
            try:
                w.abort()
            except Exception:
                pass
        shutil.rmtree(getattr(self, "spool", ""), ignore_errors=True)


def _write(w: ShardWriter, item: Item, part: int) -> bool:
    """Append one finished item to its shard: True when written as a record, False when recorded as a failure."""
    rec = to_record(item)
    if isinstance(rec, Failure):
        w.fail(rec, part)
        return False
    try:
        w.write(rec, part)
        return True
    except ValueError as e:  # a record that breaks the contract is a failure, not a crash
        w.fail(Failure(rec.key, rec.source, "write", f"invalid record: {str(e).split(': ', 1)[-1]}"), part)
        return False


def carry_over(w: ShardWriter, out: str, shard: str, order: list[str], replace: set[str]) -> dict[str, int]:
    """Copy the samples of OUT's existing SHARD that are not in REPLACE into W, unchanged (tar members byte for
    byte, sidecar rows as they are, their image embeddings when the shard has an embedding sidecar), each as
    the part of its plan position; returns {key: plan position}. The old tar is read once, front to back,
    before anything of the new shard is published."""
    folder = Folder(out)
    names = shard_names(shard)
    if not folder.exists(names["samples"]):  # a shard written before issue #19 (catalogs/writer.py)
        names.update(legacy_names(shard))
    with folder.open(names["samples"]) as f:
        samples = pq.read_table(f).to_pylist()
    with folder.open(names["objects"]) as f:
        objects = pq.read_table(f).to_pylist()
    vectors = _embeddings(folder, shard)
    identities = _identities(folder, shard)
    plan_pos = {k: i for i, k in enumerate(order)}
    rows = {r["key"]: r for r in samples if _unit_key(r) not in replace}
    pos = {**plan_pos, **{k: plan_pos[_unit_key(r)] for k, r in rows.items()}}
    objs: dict[str, list[dict]] = {}
    for o in objects:
        if o["key"] in rows:
            objs.setdefault(o["key"], []).append(o)
    for key, row in rows.items():
        if row["status"] != "ok":
            w.copy(pos[key], [], [row], [])
    url = folder.join(names["tar"])
    copied = {k for k, r in rows.items() if r["status"] != "ok"}
    with open_url(url) as f:
        members: list[bytes] = []
        current = None
        for name, offset, size in member_index(f, url):
            key = name.rsplit("/", 1)[-1].split(".", 1)[0]
            if key != current:
                if current in rows:
                    w.copy(pos[current], members, [rows[current]], objs.get(current, []), vectors, identities)
                    copied.add(current)
                current, members = key, []
            if key in rows:
                f.seek(offset - 512)  # ShardWriter's members are plain ustar: the header is the 512 bytes before
                members.append(f.read(512 + -(-size // 512) * 512))
        if current in rows:
            w.copy(pos[current], members, [rows[current]], objs.get(current, []), vectors, identities)
            copied.add(current)
    missing = set(rows) - copied
    if missing:
        raise RuntimeError(
            f"shard {shard}: {len(missing)} record(s) of its sidecar are not in its tar "
            f"(e.g. {sorted(missing)[0]}); the shard is damaged: delete its _stats.json to redo it"
        )
    return pos


def _unit_key(row: dict) -> str:
    """The plan key of a samples-sidecar row: its video's for a frame of a video (datagen/video.py), else its own."""
    return make_key(row["video"]) if row.get("video") else row["key"]


def _embeddings(folder: Folder, shard: str) -> dict[str, Any]:
    """{key: (D,) float16 embedding} from the shard's embedding sidecar; {} when it has none."""
    name = optional_names(shard)["embeddings"]
    if not folder.exists(name):
        return {}
    with folder.open(name) as f:
        keys, vectors, _ = read_embeddings(f)
    return dict(zip(keys, vectors))


def _identities(folder: Folder, shard: str) -> dict[str, Any]:
    """{key: (n_objects, D) float16 identity embeddings} from the shard's identity sidecar; {} when it has none."""
    name = optional_names(shard)["identity"]
    if not folder.exists(name):
        return {}
    with folder.open(name) as f:
        table, vectors, _ = read_identity(f)
    rows: dict[str, list] = {}
    for key, v in zip(table["key"].to_pylist(), vectors):  # rows are in object order within a record
        rows.setdefault(key, []).append(v)
    return {k: np.stack(v) for k, v in rows.items()}


def _remove_stale_spools(base: str) -> None:
    """Spool folders of committers whose process is gone (a killed run) are removed; live ones are left alone."""
    for name in os.listdir(base):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
