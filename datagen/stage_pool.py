"""The model stages on Ray: each stage's pool of actors, and the choice of actor for every block.

A `StageActor` hosts one stage (datagen/stages/): the model loads once in its constructor, each `map` call
maps one block of items. A `StagePool` holds a stage's actors and hands each block to the actor with the
fewest blocks outstanding (preferring, among equals, one on the node that will write the block), which is
what keeps every GPU busy when blocks differ in cost.

Actors and tasks get the registry entries they run (datagen/stages/registry.py) with their arguments, so a
stage registered only in the driver's process runs on every worker.

Restarts are safe: an actor's constructor arguments (the stage config, entries and an optional factory) are small
and travel inside the actor's creation task, not in the object store (ray-project/ray#53727), so an actor
lost with its node is recreated elsewhere, and its calls in flight are retried there.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from subjectdiff.datagen import config as stage_config
from subjectdiff.datagen.job import PoolConfig
from subjectdiff.datagen.progress import notice
from subjectdiff.datagen.ray_setup import worker_options
from subjectdiff.datagen.stages import registry
from subjectdiff.datagen.stages.registry import Stage

log = logging.getLogger(__name__)

Item = dict[str, Any]
ACTOR_RESTARTS = -1  # a lost node's actors are always recreated (an autoscaler brings nodes back)
CALL_RETRIES = 2  # a call is retried on the recreated actor this many times before its shard is redone


def build_stage(name: str, cfg: stage_config.DatagenConfig, chain: tuple[Stage, ...] | None = None):
    """The stage object for NAME, loading its model (once); `fused` is the whole chain in one object.
    chain: the registry entries to build from (what the driver hands a worker); None: the registry's active
    ones (a worker's own registry knows the built-in stages only)."""
    # function-level: the chain's modules import torch and the model packages, which only workers need
    from subjectdiff.datagen.stages.chain import build_stages, run_stages

    chain = registry.active(cfg) if chain is None else chain
    if name == "fused":
        stages = build_stages(cfg, chain)
        return lambda items: run_stages(stages, items)
    entry = next((s for s in chain if s.name == name), None) or registry.get(name)
    return entry.build(cfg)


class StageContractError(RuntimeError):
    """A stage broke its contract (it lost or invented items): a bug, which stops the run instead of being
    retried shard after shard."""


def contract_error(e: BaseException) -> StageContractError | None:
    """The StageContractError inside E (Ray wraps a remote error in its own), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, StageContractError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__
    return None


class StageActor:
    """Hosts one stage: the model loads in __init__, each `map` call maps one block."""

    def __init__(
        self, name: str, cfg: stage_config.DatagenConfig, factory=None, chain: tuple[Stage, ...] | None = None
    ):
        """chain: the registry entries it runs (the stage NAME, or every stage for `fused`); None: the registry's."""
        self.name = name
        self.chain = registry.active(cfg) if chain is None else chain
        self.stage = factory(name, cfg) if factory else build_stage(name, cfg, self.chain)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def map(self, items: list[Item]) -> list[Item]:
        """The stage over a block. An exception the stage does not turn into failures itself (a GPU out of
        memory on one huge image, a model bug on odd input) does not stop the run: the block is redone one
        item at a time, and each item that still raises becomes a failure of this stage with its error."""
        try:
            out = self.stage(items)
        except Exception as e:
            if len(items) == 1:
                return [self._failed(items[0], e)]
            log.warning(
                "stage %s raised on a block of %d (%s); redoing it one item at a time", self.name, len(items), reason(e)
            )
            out = []
            for item in items:
                try:
                    out.extend(self.stage([item]))
                except Exception as e1:
                    out.append(self._failed(item, e1))
        if len(out) != len(items):  # a stage must account for every item it was given
            raise StageContractError(f"stage {self.name} returned {len(out)} items for {len(items)}")
        return out

    def _failed(self, item: Item, e: Exception) -> Item:
        # function-level: stages.common imports torch, which the driver (it imports this module) never needs
        from subjectdiff.datagen.stages.common import fail

        stage = self.name
        if self.name == "fused":  # the last stage whose input the item holds is the one it reached
            stage = next((s.name for s in reversed(self.chain) if item.get(s.needs) is not None), self.chain[0].name)
        return fail(item, stage, f"error: {reason(e)}")


def task_block(items: list[Item], stage: Stage, cfg: stage_config.DatagenConfig, factory=None) -> list[Item]:
    """A stage without a model (the image filter) over one block, as a Ray task."""
    return StageActor(stage.name, cfg, factory, (stage,)).map(items)


def reason(e: BaseException) -> str:
    """One line for a failure or a manifest: the innermost cause (Ray wraps a stage's error in its own)."""
    seen = {id(e)}
    while (inner := getattr(e, "cause", None) or e.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


class StagePool:
    """The actors of one stage (on the driver): starts them, tracks the blocks each has outstanding, and
    picks the least loaded for the next block."""

    def __init__(
        self,
        name: str,
        pool: PoolConfig,
        cfg: stage_config.DatagenConfig,
        factory=None,
        chain: tuple[Stage, ...] | None = None,
    ):
        """chain: the registry entries its actors run (StageActor)."""
        import ray

        self.name = name
        cls = ray.remote(StageActor).options(
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            resources=dict(pool.resources) or None,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=CALL_RETRIES,
            **worker_options(),
        )
        self.actors = [cls.remote(name, cfg, factory, chain) for _ in range(pool.concurrency)]
        self.started = time.monotonic()
        self.load = [0] * len(self.actors)
        self.nodes: list[str | None] = [None] * len(self.actors)
        self._node_refs = {a.node_id.remote(): i for i, a in enumerate(self.actors)}
        self._calls: dict[Any, int] = {}  # outstanding call's result ref -> actor index

    def poll_nodes(self, timeout: float = 0.0) -> list[int]:
        """Learn the node of actors that have started; returns the indices newly known."""
        import ray

        if not self._node_refs:
            return []
        ready, _ = ray.wait(list(self._node_refs), num_returns=len(self._node_refs), timeout=timeout)
        new = []
        for ref in ready:
            i = self._node_refs.pop(ref)
            try:
                self.nodes[i] = ray.get(ref)
                new.append(i)
            except Exception as e:
                log.warning("stage %s actor %d did not start: %s", self.name, i, reason(e))
        if new and not self._node_refs:  # node_id runs after the constructor: the models are loaded
            notice(f"{self.name}: {self.ready()} actor(s) ready in {time.monotonic() - self.started:.1f} s")
        return new

    def ready(self) -> str:
        """'2/2': the actors started (their model loaded) of all."""
        return f"{sum(n is not None for n in self.nodes)}/{len(self.actors)}"

    def submit(self, block_ref, node: str | None = None):
        """Hand a block (a ref to its items) to the least loaded actor; returns the ref of its output."""
        i = min(range(len(self.actors)), key=lambda j: (self.load[j], self.nodes[j] != node, j))
        ref = self.actors[i].map.remote(block_ref)
        self.load[i] += 1
        self._calls[ref] = i
        return ref

    def outstanding(self) -> list:
        return list(self._calls)

    def finished(self, ref) -> bool:
        """Note that the call behind REF is over; False when REF is not one of this pool's calls."""
        i = self._calls.pop(ref, None)
        if i is None:
            return False
        self.load[i] -= 1
        return True
