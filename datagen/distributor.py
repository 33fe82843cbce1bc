"""The driver of a datagen run: hands shards to writers and blocks to stage actors, and counts what comes back.

    shard  = plan rows (datagen/plan.py), opened on one committer (datagen/committer.py), the one with the
             fewest shards open; a committer sits beside each last-stage actor, on that actor's node
    block  = up to batch_size rows of one shard; its chain, submitted at once and run by Ray as inputs arrive:
             decode task -> caption -> nouns -> ground -> filter task -> segment -> curate -> committer.append
             (the registry's active stages, datagen/stages/registry.py; or decode -> fused -> append; no curate
             when curate.enabled is false), each model stage on its pool's least loaded actor
             (datagen/stage_pool.py), each stage without a model as a CPU task
    commit = when every block of a shard is appended, the committer publishes it (stats last)

Only references and counts pass through the driver: a block's items go from task to actor to committer in
Ray's object store, on the nodes that run them, and the driver never fetches them. The driver's memory holds
the plan rows of the shards in flight and one (ok, failed) pair per shard, whatever the number of images.

At most `blocks_in_flight` blocks are between decoding and writing at once, and each committer assembles at
most `shards_per_writer` shards; shards start in plan order and blocks are submitted oldest shard first, so
shards finish in about plan order and few are open at a time.

Failures: a sample's failure is data (it is written to its shard's failures). A shard whose chain breaks
(an actor or node lost beyond Ray's own retries, a committer restarted) is aborted and started again with a
new attempt number, up to `max_attempts` times; its counts for the abandoned attempt are not counted twice
(and the progress shown does not go back: subjectdiff/progress.py).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.storage import Folder, transient
from subjectdiff.datagen.assemble import embedding_meta, identity_meta
from subjectdiff.datagen.committer import ShardCommitter
from subjectdiff.datagen.decode import read_and_decode
from subjectdiff.datagen.job import JobConfig
from subjectdiff.datagen.progress import notice
from subjectdiff.datagen.ray_setup import worker_options
from subjectdiff.datagen.stage_pool import StagePool, contract_error, reason, task_block
from subjectdiff.datagen.stages import registry
from subjectdiff.progress import Progress

WAIT_NOTICE_S = 30.0  # say what the run waits for when no stage actor has started after this long


@dataclass
class ShardTask:
    """One attempt at one shard."""

    name: str
    rows: dict[str, list]
    attempt: int
    parts: list[tuple[int, int]]  # row ranges of its blocks
    committer: int = -1
    next_part: int = 0
    parts_done: int = 0
    ok: int = 0
    failed: int = 0
    dead: bool = False
    opened: Any = None  # ref of the committer's open()
    merge: dict[str, list[str]] | None = None  # a retry: see ShardCommitter.open


@dataclass
class Outcome:
    """What the run did: per shard committed (ok, failed, node id), and the shards given up on, with the
    error of their last attempt in one line."""

    done: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # records, failures written this run
    incomplete: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # shard given up on -> its last attempt's error


class Distributor:
    """Runs shards through the stage pools into committers; see the module docstring."""

    def __init__(
        self,
        out: str,
        cfg: JobConfig,
        *,
        local_output_node: str | None,
        progress: Progress,
        extra_stats: dict[str, Any],
        factory=None,
        catalog_file=None,
    ):
        import ray

        self.out, self.cfg, self.p = out, cfg, cfg.pipeline
        self.progress, self.extra, self.factory = progress, extra_stats, factory
        self.catalog_file = catalog_file
        self.local_node = local_output_node  # a local output: every committer on the driver's node
        pools = self.stage_pool_configs = cfg.stage_pools()
        self._committer_cpus = self.p.writer_num_cpus
        if self.local_node is not None:
            # A driver node without the CPUs for its committers (a CPU-less head) still hosts them: they
            # then take no CPU slot, as a driver does.
            node_cpus = next(
                (n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == self.local_node), 0.0
            )
            n = list(pools.values())[-1].concurrency
            if node_cpus < self.p.writer_num_cpus * n:
                self._committer_cpus = 0.0
        # the entries travel to the workers with each actor and task (a stage registered here only runs too)
        entries = {s.name: s for s in registry.active(cfg.stages)}
        self.pools = {
            name: StagePool(
                name, pool, cfg.stages, factory, tuple(entries.values()) if name == "fused" else (entries[name],)
            )
            for name, pool in pools.items()
        }
        notice(
            "starting the stage actors, each loads its model: "
            + ", ".join(f"{name} x{pool.concurrency}" for name, pool in pools.items())
        )
        self.chain = ["fused"] if self.p.fuse else list(entries)
        self.tasks = {name: s for name, s in entries.items() if not s.model}  # a CPU task per block each
        self.last = list(self.pools.values())[-1]
        self.committers: list[Any] = []
        self.committer_nodes: list[str | None] = []
        self.open_per_committer: list[int] = []
        self.limit = self.p.blocks_in_flight or 2 * sum(p.concurrency for p in pools.values()) + 2
        self.in_flight = 0
        self.waits: dict[Any, tuple[str, ShardTask, int]] = {}
        self._decode = ray.remote(num_cpus=self.p.read_num_cpus, max_retries=3, **worker_options())(_decode_block)
        self._stage_task = ray.remote(num_cpus=self.p.read_num_cpus, max_retries=3, **worker_options())(task_block)
        self._refresher: threading.Thread | None = None
        self._last_refresh = time.monotonic()
        self._fresh = False
        self._submitted = False  # has a block been submitted yet (the start-up notices end there)

    # ---------------------------------------------------------------------------------------- committers

    def _add_committers(self) -> None:
        """One committer per last-stage actor, on that actor's node once it is known (a local output: on
        the driver's node)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._poll_stage_nodes()
        for i in self.last.poll_nodes():
            node = self.local_node or self.last.nodes[i]
            if self.local_node:  # only this node surely sees the folder: there, or nowhere
                strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            else:  # beside the actor, or elsewhere when its node is full (never wait for room there)
                strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=True, _spill_on_unavailable=True)
            actor = (
                ray.remote(ShardCommitter)
                .options(
                    num_cpus=self._committer_cpus,
                    max_concurrency=4,
                    max_restarts=-1,
                    max_task_retries=0,
                    scheduling_strategy=strategy,
                    **worker_options(),
                )
                .remote(
                    self.out,
                    self.p.spool_dir,
                    self.extra,
                    embedding_meta(self.cfg.stages.curate),
                    identity_meta(self.cfg.stages.identity),
                )
            )
            self.committers.append(actor)
            self.committer_nodes.append(node)
            self.open_per_committer.append(0)

    def _poll_stage_nodes(self) -> None:
        """Learn which actors of the stages before the last have started (for locality, and their `ready`
        notice)."""
        for pool in self.pools.values():
            if pool is not self.last:
                pool.poll_nodes()

    # --------------------------------------------------------------------------------------------- shards

    def _task(self, name: str, rows: dict[str, list], attempt: int, merge=None) -> ShardTask:
        return ShardTask(
            name, rows, attempt, blocks(rows.get("media"), len(rows["key"]), self.p.batch_size), merge=merge
        )

    def _open(self, task: ShardTask) -> None:
        c = min(range(len(self.committers)), key=lambda i: (self.open_per_committer[i], i))
        task.committer = c
        self.open_per_committer[c] += 1
        task.opened = self.committers[c].open.remote(task.name, task.attempt, task.merge)

    def _submit_block(self, task: ShardTask) -> None:
        """The whole chain of the task's next block, as references; the committer's append ends it. Tasks go
        where Ray's locality-aware scheduler puts them (beside their input when it is large); actors are
        chosen least loaded first, then on the committer's node."""
        part = task.next_part
        task.next_part += 1
        a, b = task.parts[part]
        rows = {k: v[a:b] for k, v in task.rows.items()}
        node = self.committer_nodes[task.committer]
        ref = self._decode.remote(rows, self.cfg.stages.filters, self.cfg.stages.decode, self.cfg.stages.video)
        for stage in self.chain:
            if stage in self.tasks:
                ref = self._stage_task.remote(ref, self.tasks[stage], self.cfg.stages, self.factory)
            else:
                ref = self.pools[stage].submit(ref, node)
        done = self.committers[task.committer].append.remote(task.name, task.attempt, part, ref, task.opened)
        if not self._submitted:
            self._submitted = True
            notice("the first blocks are in the stages; the progress line starts when the first is written")
        self.waits[done] = ("append", task, part)
        self.in_flight += 1

    def _abandon(self, task: ShardTask, e: BaseException, retry: deque, outcome: Outcome) -> None:
        """A broken attempt: drop what it wrote, take back its counts, and queue the next attempt."""
        if task.dead:
            return
        task.dead = True
        self.open_per_committer[task.committer] -= 1
        try:
            self.committers[task.committer].abort.remote(task.name, task.attempt)
        except Exception:
            pass
        self.progress.restart(task.name)
        if task.attempt + 1 < self.p.max_attempts:
            print(
                f"[datagen] shard {task.name}: attempt {task.attempt + 1} failed ({reason(e)}); redoing it",
                file=sys.stderr,
                flush=True,
            )
            retry.append(self._task(task.name, task.rows, task.attempt + 1, task.merge))
        else:
            print(
                f"[datagen] shard {task.name}: giving up after {self.p.max_attempts} attempts ({reason(e)})",
                file=sys.stderr,
                flush=True,
            )
            outcome.incomplete.append(task.name)
            outcome.why[task.name] = reason(e)

    # ------------------------------------------------------------------------------------------------ run

    def run(self, shards: Iterator[tuple]) -> Outcome:
        """Process SHARDS to completion or give-up: (name, plan rows) in plan order, or (name, plan rows of the
        samples to redo, merge) for a retry (ShardCommitter.open)."""
        outcome = Outcome()
        retry: deque[ShardTask] = deque()
        active: list[ShardTask] = []
        source = iter(shards)
        exhausted = False
        t_start = time.monotonic()
        noticed = False
        while True:
            self._add_committers()
            if not self.committers and not noticed and time.monotonic() - t_start > WAIT_NOTICE_S:
                noticed = True
                waiting = [f"{p.name} {p.ready()}" for p in self.pools.values() if p.nodes.count(None)]
                notice(
                    f"still waiting for stage actors ({', '.join(waiting)} ready): loading their models, or "
                    "waiting for the resources of pipeline.pools (on a cluster an autoscaler adds nodes for them)"
                )
            capacity = len(self.committers) * self.p.shards_per_writer
            while len(active) < capacity and (retry or not exhausted):
                if retry:
                    task = retry.popleft()
                else:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                        break
                    task = self._task(*nxt[:2], 0, *nxt[2:])
                self._open(task)
                active.append(task)
            while self.in_flight < self.limit:
                task = next((t for t in active if t.next_part < len(t.parts)), None)
                if task is None:
                    break
                self._submit_block(task)
            if not active and exhausted and not retry:
                break
            self._wait(active, retry, outcome)
            active = [t for t in active if not t.dead]
            self._maybe_refresh()
        self._join_refresh()
        return outcome

    def _wait(self, active: list[ShardTask], retry: deque, outcome: Outcome) -> None:
        """Block until something finishes (at most a second), then handle everything that has."""
        import ray

        stage_refs = [r for pool in self.pools.values() for r in pool.outstanding()]
        refs = list(self.waits) + stage_refs
        if not refs:
            time.sleep(0.2)  # waiting for actors to start
            return
        ray.wait(refs, num_returns=1, timeout=1.0, fetch_local=False)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        # an actor starts (node_id) before it maps a block: its `ready` notice comes before that block's progress
        self._poll_stage_nodes()
        for ref in ready:
            if ref not in self.waits:
                for pool in self.pools.values():
                    if pool.finished(ref):
                        break
                continue
            kind, task, part = self.waits.pop(ref)
            if kind == "append":
                self.in_flight -= 1
            try:
                result = ray.get(ref)
            except Exception as e:
                bug = contract_error(e)
                if bug is not None:
                    raise bug from None
                self._abandon(task, e, retry, outcome)
                continue
            if task.dead:
                continue
            if kind == "append":
                ok, failed = result
                task.ok += ok
                task.failed += failed
                a, b = task.parts[part]  # the block's plan rows: its inputs, a video with all its frames
                self.progress.update(ok, failed, shard=task.name, units=b - a)
                task.parts_done += 1
                if task.parts_done == len(task.parts):
                    commit = self.committers[task.committer].commit.remote(task.name, task.attempt)
                    self.waits[commit] = ("commit", task, -1)
            else:  # committed; counts are this run's (a retry's kept samples are not counted again)
                outcome.done[task.name] = (task.ok, task.failed, result["node_id"])
                self.open_per_committer[task.committer] -= 1
                task.dead = True  # finished: leaves the active list
                self._fresh = True

    # -------------------------------------------------------------------------------------------- catalog

    def _maybe_refresh(self) -> None:
        """Refresh the catalog in the background every catalog_refresh_s while shards are being committed, so
        a running job can be queried (a build that finds the catalog locked is skipped)."""
        if not self._fresh or time.monotonic() - self._last_refresh < self.p.catalog_refresh_s:
            return
        if self._refresher is not None and self._refresher.is_alive():
            return
        self._fresh, self._last_refresh = False, time.monotonic()

        def build() -> None:
            try:
                catalog.build(self.out, catalog=self.catalog_file, timeout=5.0)
            except Exception as e:
                if not isinstance(e, (catalog.CatalogError, OSError)) and not transient(e):
                    raise
                # someone holds the catalog, or the store hiccuped: the final build catches up

        self._refresher = threading.Thread(target=build, daemon=True)
        self._refresher.start()

    def _join_refresh(self) -> None:
        if self._refresher is not None:
            self._refresher.join()


def _decode_block(rows: dict[str, list], filters, decode, video=None) -> list[dict]:
    return read_and_decode(rows, filters, decode, video)


def blocks(media: list[str | None] | None, n: int, batch_size: int) -> list[tuple[int, int]]:
    """The row ranges of a shard's blocks: BATCH_SIZE rows each, except that a video (MEDIA "video") is a block of
    its own, so a block holds at most batch_size photos or one video's frames (video.max_frames)."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(n):
        if media is not None and media[i] == "video":
            out += [(a, min(a + batch_size, i)) for a in range(start, i, batch_size)] + [(i, i + 1)]
            start = i + 1
    return out + [(a, min(a + batch_size, n)) for a in range(start, n, batch_size)]


def local_output_node(out: str) -> str | None:
    """The driver's node id when OUT is a local folder (only this node surely sees that path), else None."""
    import ray

    return ray.get_runtime_context().get_node_id() if Folder(out).local else None
