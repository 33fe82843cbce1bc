"""Joining or starting Ray for a datagen run, the way Ray jobs expect, with a console that shows only what a
user must act on.

    --ray-address ADDR      join that cluster
    RAY_ADDRESS set         join it (what `ray job submit` sets for the job's driver)
    `ray start` ran here    join that cluster (its address is in Ray's temp folder, as `ray.init()` finds it)
    none of these           start a Ray on this machine, with enough CPU slots for every actor

Joining passes no resources (Ray refuses num_cpus/num_gpus then) and keeps every GPU request: on an
autoscaling cluster, GPU nodes appear when the stage actors ask for them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from subjectdiff.catalogs.storage import storage_env
from subjectdiff.datagen.job import PipelineConfig
from subjectdiff.datagen.progress import notice

# Loggers whose start-up messages are not for the user (their full logs stay in the Ray session folder):
# token-authentication notices, the "Started a local Ray instance" line.
_QUIET = ("ray._private.authentication.authentication_token_setup", "ray._private.worker", "ray.worker")


def cpu_slots(cfg: PipelineConfig, stages: tuple[str, ...] | None = None) -> float:
    """Logical CPUs the run reserves at once: its stage actors (of STAGES, `job.active_stages`; None: every
    registered stage), one committer per last-stage actor, and room for two decode tasks (a Ray whose slots
    all went to actors could never decode a block)."""
    pools = cfg.stage_pools(stages)
    actors = sum(p.concurrency * p.num_cpus for p in pools.values())
    writers = list(pools.values())[-1].concurrency * cfg.writer_num_cpus
    return actors + writers + 2 * max(cfg.read_num_cpus, 0.25)


def existing_cluster() -> str | None:
    """The address of a live Ray cluster this machine runs (`ray start`), as ray.init() would find it; None
    when there is none, or when the recorded one is gone (a stale file from a stopped cluster)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # older layouts
        from ray._private.utils import get_ray_address_file  # type: ignore[no-redef]
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def connect(address: str | None, cfg: PipelineConfig, stages: tuple[str, ...] | None = None) -> bool:
    """Join a cluster or start Ray here (see the module docstring); True when a cluster was joined. A Ray the
    caller already initialized is used as it is (as a cluster when it has several nodes)."""
    import ray

    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return len(ray.nodes()) > 1
    t0 = time.monotonic()
    address = address or os.environ.get("RAY_ADDRESS") or existing_cluster()
    if address:
        notice(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        # Ray's CPUs are scheduling slots, not cores: on a small machine, offer enough for every actor.
        slots = max(os.cpu_count() or 1, int(cpu_slots(cfg, stages) + 0.999))
        notice(f"starting Ray on this machine ({slots} CPU slots)")
        # "local": a new Ray even where a stopped cluster left its address file behind (ray.init() would try it)
        ray.init(
            address="local", num_cpus=slots, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
        )
    res, nodes = ray.cluster_resources(), sum(n["Alive"] for n in ray.nodes())
    notice(
        f"Ray ready in {time.monotonic() - t0:.1f} s: {nodes} node(s), {res.get('CPU', 0):g} CPU(s), "
        f"{res.get('GPU', 0):g} GPU(s)"
    )
    return bool(address)


def worker_options() -> dict:
    """Ray options for every task and actor of a run: the driver's storage settings (`storage.storage_env`)
    as their environment. A worker inherits its node's environment (`ray start`'s, or that of the Ray this
    process joined), not the driver's: without this, `AWS_ENDPOINT_URL=... subjectdiff datagen run` would
    reach a different endpoint, or none, from the other nodes. Ray merges these with a job's own env_vars."""
    env = storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def resolve_gpus(cfg: PipelineConfig, joined: bool, stages: tuple[str, ...] | None = None) -> None:
    """A Ray started here that has no GPU never will: its GPU stages run on CPU. On a cluster, GPU nodes
    may not exist yet (an autoscaler starts them when the GPU actors ask): the requests stay. Only the pools
    of STAGES (`job.active_stages`; None: every registered stage) count: a stage that is off starts no pool."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return
    wanted = [name for name, pool in cfg.pools.items() if pool.num_gpus > 0 and (stages is None or name in stages)]
    if not wanted:
        return
    if joined:
        print(
            f"[datagen] no GPU node in the Ray cluster yet: stages {', '.join(wanted)} wait for the "
            "autoscaler to add one (set their pipeline.pools.STAGE.num_gpus = 0 to run them on CPU)",
            file=sys.stderr,
        )
        return
    for name in wanted:
        print(f"[datagen] no GPU on this machine: stage {name} runs on CPU", file=sys.stderr)
        cfg.pools[name].num_gpus = 0.0
