"""A datagen run on two Ray nodes survives losing a node mid-run: every input accounted for exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from subjectdiff.catalogs import catalog

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"


class SlowStage:
    """The real stage, slowed down so that the run is still going when the node dies."""

    def __init__(self, name, cfg, delay):
        from subjectdiff.datagen.stage_pool import build_stage

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
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=4)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_run_completes_when_a_worker_node_dies(tmp_path, two_node_cluster):
    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.run import run

    cluster, worker = two_node_cluster
    src = tmp_path / "in"
    src.mkdir()
    photos = sorted(SAMPLES.glob("*.jpg"))
    for i in range(8):  # four shards: the node dies after the first, with three left to redo or finish
        (src / f"{i:02d}.jpg").write_bytes(photos[i % len(photos)].read_bytes())
    cfg = preset("tiny")
    cfg.pipeline.shard_size = 2
    cfg.pipeline.batch_size = 1
    cfg.pipeline.writer_num_cpus = 0  # the writer stays with the driver, on the head
    out = tmp_path / "out"
    result: dict = {}

    def drive():
        try:
            result["summary"] = run(str(src), out, cfg, stage_factory=slow_factory, progress_every=60)
        except BaseException as e:
            result["error"] = e

    # The run drives Ray from a thread; the node is killed and replaced from the main thread (Ray starts
    # node processes only from the main thread: it installs signal handlers).
    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    deadline = time.monotonic() + 300
    while not list(out.glob("*_stats.json")) and time.monotonic() < deadline and driver.is_alive():
        time.sleep(0.1)
    cluster.remove_node(worker)  # the node and every actor and task on it are gone
    cluster.add_node(num_cpus=4)  # as an autoscaler would replace it
    driver.join(timeout=600)
    assert not driver.is_alive(), "the run did not finish after the node was replaced"
    if "error" in result:
        raise result["error"]
    summary = result["summary"]
    assert summary.incomplete == []
    sources = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures")
    assert sorted(sources.column("source").to_pylist()) == sorted(str(p) for p in src.glob("*.jpg"))
    assert len(list(out.glob("*_stats.json"))) == 4


class RaisingStage:
    """The real stage, except that it raises on any block holding one given photo (a model error on odd
    input, a GPU out of memory on one huge image)."""

    def __init__(self, name, cfg, bad: str, stage: str):
        from subjectdiff.datagen.stage_pool import build_stage

        self.inner, self.name, self.bad, self.stage = build_stage(name, cfg), name, bad, stage

    def __call__(self, items):
        if self.name == self.stage and any(it["source"].endswith(self.bad) for it in items):
            raise RuntimeError(f"boom on {self.bad}")
        return self.inner(items)


def raising_factory(name, cfg):
    return RaisingStage(name, cfg, "chelsea.jpg", "ground")


def test_a_stage_exception_fails_only_its_sample(tmp_path):
    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.run import run

    src = tmp_path / "in"
    src.mkdir()
    photos = [SAMPLES / n for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")]
    for p in photos:
        (src / p.name).write_bytes(p.read_bytes())
    cfg = preset("tiny")
    cfg.pipeline.batch_size = 3  # the bad photo shares its block with the two others
    summary = run(str(src), tmp_path / "out", cfg, stage_factory=raising_factory, progress_every=60)
    assert summary.incomplete == [] and summary.ok + summary.failed == 3
    fails = catalog.query(tmp_path / "out", "SELECT source, stage, reason FROM failures").to_pylist()
    assert [(Path(f["source"]).name, f["stage"]) for f in fails] == [("chelsea.jpg", "ground")]
    assert fails[0]["reason"] == "error: RuntimeError: boom on chelsea.jpg"
    ok = catalog.query(tmp_path / "out", "SELECT source FROM samples").column("source").to_pylist()
    assert sorted(Path(s).name for s in ok) == ["astronaut.jpg", "coffee.jpg"]


class WrongCountStage:
    """A broken stage that drops items: a bug, not a sample's failure; the run must stop and say so."""

    def __init__(self, name, cfg):
        from subjectdiff.datagen.stage_pool import build_stage

        self.inner, self.name = build_stage(name, cfg), name

    def __call__(self, items):
        out = self.inner(items)
        return out[:-1] if self.name == "nouns" else out


def test_a_broken_stage_stops_the_run_and_the_manifest_says_why(tmp_path):
    import json

    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.run import run

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes((SAMPLES / "chelsea.jpg").read_bytes())
    with pytest.raises(Exception):  # noqa: B017 - Ray reports it as one of several wrapper types
        run(str(src), tmp_path / "out", preset("tiny"), stage_factory=WrongCountStage, progress_every=60)
    last = json.loads((tmp_path / "out" / "manifest.json").read_text())["runs"][-1]
    # The innermost error Ray hands back: the stage's own message, or Ray's account of the aborted actor.
    assert last["status"] == "failed" and last["error"] and last["end"] is not None


def test_fused_stage_errors_name_the_stage_the_sample_reached():
    from subjectdiff.datagen import config
    from subjectdiff.datagen.stage_pool import StageActor

    def factory(name, cfg):
        def chain(items):
            raise MemoryError("CUDA out of memory")

        return chain

    actor = StageActor("fused", config.DatagenConfig(), factory=factory)
    items = [
        {"key": "a", "source": "a", "image": 1},
        {"key": "b", "source": "b", "image": 1, "caption": "a cat", "nouns": [{"label": "cat"}]},
        {"key": "c", "source": "c", "image": 1, "caption": "a cat", "nouns": [], "detections": []},
    ]
    out = actor.map(items)
    assert [it["failure"]["stage"] for it in out] == ["caption", "ground", "segment"]
    assert {it["failure"]["reason"] for it in out} == {"error: MemoryError: CUDA out of memory"}


def test_resume_refuses_other_stage_settings_but_not_other_batch_sizes(tmp_path):
    from subjectdiff.datagen import config
    from subjectdiff.datagen.plan import make_or_reuse as _plan
    from subjectdiff.datagen.plan import stages_fingerprint
    from subjectdiff.datagen.sources import SourceError

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes((SAMPLES / "chelsea.jpg").read_bytes())
    cfg = config.tiny()
    counts = _plan(str(src), tmp_path, 10, stages_fingerprint(cfg))
    cfg.ground.batch_size, cfg.caption.device = 1, "cpu"  # how fast, not what: the same records
    assert _plan(str(src), tmp_path, 10, stages_fingerprint(cfg)) == counts
    cfg.ground.box_threshold = 0.3  # other records: mixing them with the first run's is refused
    with pytest.raises(SourceError, match="other stage settings"):
        _plan(str(src), tmp_path, 10, stages_fingerprint(cfg))


def test_gpu_requests_drop_on_a_local_cpu_ray_but_wait_for_a_cluster_autoscaler(monkeypatch, capsys):
    import ray

    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.ray_setup import resolve_gpus as _resolve_gpus

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    cfg = preset("default").pipeline
    _resolve_gpus(cfg, joined=True)  # a cluster whose GPU workers are not up yet
    assert cfg.pools["segment"].num_gpus == 0.5 and "wait for the autoscaler" in capsys.readouterr().err
    _resolve_gpus(cfg, joined=False)  # this machine: no GPU will ever come
    assert all(p.num_gpus == 0 for p in cfg.pools.values()) and "runs on CPU" in capsys.readouterr().err


def test_datagen_settings_from_toml_then_overrides(tmp_path):
    from subjectdiff.datagen.job import PoolConfig, load_config

    f = tmp_path / "datagen.toml"
    f.write_text(
        '[ground]\nbox_threshold = 0.3\n[nouns]\nstop_nouns = ["top", "view"]\n'
        "[pipeline]\nshard_size = 500\n[pipeline.pools.segment]\nconcurrency = 2\nnum_gpus = 0.5\n"
    )
    cfg = load_config("tiny", str(f), ["ground.box_threshold=0.4", "pipeline.pools.caption.num_gpus=0.25"])
    assert cfg.stages.ground.box_threshold == 0.4 and cfg.stages.nouns.stop_nouns == ("top", "view")
    assert cfg.pipeline.shard_size == 500
    assert cfg.pipeline.pools["segment"] == PoolConfig(concurrency=2, num_gpus=0.5, num_cpus=0.25)
    assert cfg.pipeline.pools["caption"].num_gpus == 0.25
    assert cfg.stages.caption.model == load_config("tiny").stages.caption.model  # the rest is the preset's
    with pytest.raises(ValueError, match=r"unknown setting ground\.box_treshold; known: \["):
        load_config("tiny", None, ["ground.box_treshold=0.3"])
    with pytest.raises(ValueError, match=r"ground.box_threshold = 2.0 must be in \[0, 1\]"):
        load_config("tiny", None, ["ground.box_threshold=2"])
    with pytest.raises(ValueError, match="pipeline.shard_size: expected int"):
        load_config("tiny", None, ["pipeline.shard_size=big"])


def test_progress_line_keeps_slow_rates_and_long_etas_readable():
    import io

    from subjectdiff.progress import Progress

    out = io.StringIO()
    prog = Progress(total=10_000_000, every=0.0, stream=out)
    prog.t0 -= 1000.0  # 1000 s in, 30 samples done: 0.03 img/s, about 10 years left
    prog.update(25, 5)
    line = out.getvalue().strip()
    assert line.startswith("[datagen] 30/10000000 samples (25 ok, 5 failed) 0.03 img/s, ETA ")
    days = int(line.rsplit("ETA ", 1)[1].split("d ")[0])
    assert abs(days - (10_000_000 - 30) / 0.03 / 86400) < 1
