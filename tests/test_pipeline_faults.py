"""A datagen run on two Ray nodes survives losing a node mid-run: every input accounted for exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from catalogs import catalog

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"


class SlowStage:
    """The real stage, slowed down so that the run is still going when the node dies."""

    def __init__(self, name, cfg, delay):
        from datagen.pipeline import build_stage

        self.stage, self.delay = build_stage(name, cfg), delay

    def __call__(self, items):
        time.sleep(self.delay)
        return self.stage(items)


def slow_factory(name, cfg):
    return SlowStage(name, cfg, 1.0 if name == "segment" else 0.0)


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # The head has no CPUs for work: every stage actor and task lands on the worker node, which dies.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_run_completes_when_a_worker_node_dies(tmp_path, two_node_cluster):
    from datagen.pipeline import preset, run

    cluster, worker = two_node_cluster
    src = tmp_path / "in"
    src.mkdir()
    photos = sorted(SAMPLES.glob("*.jpg"))
    for i in range(12):
        (src / f"{i:02d}.jpg").write_bytes(photos[i % len(photos)].read_bytes())
    cfg = preset("tiny")
    cfg.pipeline.shard_size = 2
    cfg.pipeline.batch_size = 1
    cfg.pipeline.writer_num_cpus = 0  # the writer stays with the driver, on the head
    out = tmp_path / "out"

    def kill_when_started():
        deadline = time.monotonic() + 300
        while not list(out.glob("*_stats.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        cluster.remove_node(worker)  # the node and every actor and task on it are gone
        cluster.add_node(num_cpus=4)  # as an autoscaler would replace it

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    summary = run(str(src), out, cfg, stage_factory=slow_factory, progress_every=60)
    killer.join(timeout=5)
    assert summary.incomplete == []
    sources = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures")
    assert sorted(sources.column("source").to_pylist()) == sorted(str(p) for p in src.glob("*.jpg"))
    assert len(list(out.glob("*_stats.json"))) == 6
