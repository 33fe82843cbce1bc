"""`datagen run` where users run it: input and output in a bucket (a real S3 API: moto's server on loopback,
through s3fs), a driver killed mid-run, a 3-node Ray cluster joined through RAY_ADDRESS or found on the
machine, training with torchrun on a selection that lives in the bucket, and --retry-failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from subjectdiff.catalogs import catalog, storage
from subjectdiff.catalogs.identity_folder import read_folder
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.datagen.run import run
from tests.pipelines import assert_close, fresh_cache, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"

pytestmark = pytest.mark.slow


def tiny(shard_size: int = 3, batch_size: int = 4, fuse: bool = False):
    """tiny_cfg; FUSE: one actor runs every model stage (one worker process loads the models, not six), for
    runs whose test is about storage or resuming, not the stage pools (the records are the same)."""
    cfg = tiny_cfg(shard_size, batch_size)
    cfg.pipeline.fuse = fuse
    return cfg


def new_bucket() -> str:
    import uuid

    fs, _ = storage.filesystem("s3://x")
    name = f"dg-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return f"s3://{name}"


def put(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)
    fs.pipe_file(path, data)


def listing(url: str) -> list[str]:
    return sorted(storage.Folder(url).listing())


@pytest.fixture(scope="module")
def bucket_photos(s3_server, tmp_path_factory):
    """The bundled photos (one as PNG) and broken files, uploaded to a bucket folder; and their URLs."""
    root = new_bucket()
    src = f"{root}/photos"
    inputs = []
    for i, p in enumerate(sorted(SAMPLES.glob("*.jpg"))):
        if i == 0:
            tmp = tmp_path_factory.mktemp("png") / (p.stem + ".png")
            Image.open(p).save(tmp)
            put(f"{src}/sub/{tmp.name}", tmp.read_bytes())
            inputs.append(f"{src}/sub/{tmp.name}")
        else:
            put(f"{src}/{p.name}", p.read_bytes())
            inputs.append(f"{src}/{p.name}")
    good = (SAMPLES / "astronaut.jpg").read_bytes()
    put(f"{src}/truncated.jpg", good[: len(good) // 3])
    put(f"{src}/not_an_image.jpg", b"this is a text file, not a JPEG\n")
    put(f"{src}/notes.txt", b"not an image extension: ignored\n")
    inputs += [f"{src}/truncated.jpg", f"{src}/not_an_image.jpg"]
    return root, src, sorted(inputs)


def records(out: str) -> dict:
    return {r.key: (r.meta, r.image_bytes) for r in RecordReader(out, decode_image=False, decode_masks=False)}


def embeddings(out: str) -> dict:
    """{key: float16 embedding} from every embedding sidecar of OUT."""
    from subjectdiff.catalogs.embeddings import SUFFIX, read_embeddings

    folder = storage.Folder(out)
    found = {}
    for name in folder.listing():
        if name.endswith(SUFFIX):
            with folder.open(name) as f:
                keys, vectors, _ = read_embeddings(f)
            found.update(zip(keys, vectors))
    return found


def tables(out: str, catalog_file=None) -> dict:
    q = lambda sql: catalog.query(out, sql, catalog=catalog_file).to_pylist()
    return {
        "samples": q("SELECT * EXCLUDE (shard, sample_id) FROM samples ORDER BY key"),
        "objects": q("SELECT * EXCLUDE (shard, sample_id) FROM objects ORDER BY key, index"),
        "failures": q("SELECT key, source, stage, reason FROM failures ORDER BY key"),
        "shards": q("SELECT name, n_ok, n_failed, n_objects, path FROM shards ORDER BY name"),
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: its catalogs of the bucket's outputs (and the tiny models' paths recorded in
    records, so runs compared with each other must share it)."""
    fresh = fresh_cache(tmp_path_factory.mktemp("cache"))  # the tiny models linked, not built again
    saved = os.environ.get("SUBJECTDIFF_CACHE")
    os.environ["SUBJECTDIFF_CACHE"] = str(fresh)
    yield os.environ["SUBJECTDIFF_CACHE"]
    if saved is None:
        os.environ.pop("SUBJECTDIFF_CACHE")
    else:
        os.environ["SUBJECTDIFF_CACHE"] = saved


@pytest.fixture(scope="module")
def straight_run(bucket_photos, cache):
    """The reference run, on a Ray started before the storage settings were in the environment, as on a
    cluster whose nodes were started without them: the run hands the driver's to its workers, which
    otherwise could not reach the bucket. Fused: what is tested is storage and resuming, not the stage pools
    (the three-node job runs them unfused against the bucket; tests/test_pipeline.py checks that fused and
    unfused runs give the same records)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    try:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.update(saved)
    root, src, _ = bucket_photos
    out = f"{root}/records"
    try:
        summary = run(src, out, tiny(fuse=True), progress_every=60)
    finally:
        ray.shutdown()
    return out, summary


def test_a_bucket_in_and_a_bucket_out_account_for_every_input(bucket_photos, straight_run):
    _, _, inputs = bucket_photos
    out, summary = straight_run
    assert summary.incomplete == [] and summary.ok + summary.failed == len(inputs)
    got = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures")
    assert sorted(got.column("source").to_pylist()) == inputs  # each once, in samples or failures
    fails = {f["source"].rsplit("/", 1)[-1]: f["stage"] for f in tables(out)["failures"]}
    assert fails == {"truncated.jpg": "decode", "not_an_image.jpg": "decode"}
    # The catalog is a local file built from the bucket's sidecars; the shards, plan and manifest are in the bucket.
    assert catalog.catalog_path(out).is_file() and not str(catalog.catalog_path(out)).startswith("s3:")
    names = listing(out)
    assert {"_plan.parquet", "_plan.json", "manifest.json", "README.md"} <= set(names)  # README.md: the dataset card
    assert not [n for n in names if n.endswith(".tmp")]  # nothing half-written is left in the bucket
    kinds = {n.split(".", 1)[1] for n in names if n.startswith("00000.")}  # one suffix per kind of file
    assert kinds == {"tar", "samples.parquet", "objects.parquet", "clip.parquet", "identity.parquet"}
    recs = records(out)
    assert len(recs) == summary.ok
    fs, _ = storage.filesystem(out)
    for meta, image in recs.values():
        assert meta["objects"] and fs.cat_file(meta["source"]) == image  # bytes passed through unchanged
    manifest = json.loads(storage.Folder(out).read_text("manifest.json"))
    assert manifest["output"] == out and manifest["runs"][-1]["status"] == "complete"
    assert manifest["counts"]["samples"] == summary.ok


def test_killed_driver_then_same_command_gives_the_straight_result(bucket_photos, straight_run, tmp_path):
    root, src, _ = bucket_photos
    ref, _ = straight_run
    out = f"{root}/killed"
    cmd = [
        sys.executable,
        "-m",
        "subjectdiff",
        "datagen",
        "run",
        "--input",
        src,
        "--out",
        out,
        "--preset",
        "tiny",
        "--shard-size",
        "3",
        "--batch-size",
        "4",
        "pipeline.fuse=true",  # the same records (tests/test_pipeline.py), with one actor's start-up, not six
    ]
    env = dict(os.environ)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    stats = lambda: [n for n in listing(out) if n.endswith("_stats.json")] if storage.Folder(out).is_folder() else []
    while not stats() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    assert 1 <= len(stats()) < 3
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(records(out), records(ref))
    got, want = tables(out), tables(ref)
    for t in ("samples", "objects", "failures"):
        assert_close(got[t], want[t])
    assert [(s["name"], s["n_ok"], s["n_failed"]) for s in got["shards"]] == [
        (s["name"], s["n_ok"], s["n_failed"]) for s in want["shards"]
    ]
    runs = json.loads(storage.Folder(out).read_text("manifest.json"))["runs"]
    assert [r["status"] for r in runs] == ["running", "complete"]


@pytest.fixture
def three_node_cluster():
    """A head (no CPUs: the driver only) and two workers, each with one `slot` (a stand-in for a GPU)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # no dashboard: nothing here asks it, and it is the slowest process of a head to start
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=3, resources={"slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def test_a_job_on_a_three_node_cluster_writes_from_several_nodes(bucket_photos, three_node_cluster, cache):
    """As `ray job submit` runs it: RAY_ADDRESS set, no --ray-address. The last stage's actors (curate: one per
    worker node, as one per GPU) each have a writer beside them, so shards are assembled and uploaded on both
    workers. Then a second job
    with neither RAY_ADDRESS nor --ray-address finds the cluster running on this machine and joins it."""
    cluster, nodes = three_node_cluster
    root, photos, _ = bucket_photos
    # Four of the inputs, copied to a folder of their own: four shards of one for the two writers (the PNG in
    # its subfolder, two photos, a truncated one), at half the cost of all eight through seven actors.
    src = f"{root}/four"
    fs, _ = storage.filesystem(root)
    inputs = []
    for name in ("sub/astronaut.png", "chelsea.jpg", "coffee.jpg", "truncated.jpg"):
        fs.copy(f"{photos}/{name}".removeprefix("s3://"), f"{src}/{name}".removeprefix("s3://"))
        inputs.append(f"{src}/{name}")
    inputs.sort()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    base = [
        sys.executable,
        "-m",
        "subjectdiff",
        "datagen",
        "run",
        "--input",
        src,
        "--preset",
        "tiny",
        "--shard-size",
        "1",
        "--batch-size",
        "1",
        "pipeline.pools.curate.concurrency=2",
        "pipeline.pools.curate.resources={slot = 1}",
    ]
    out = f"{root}/cluster"
    r = subprocess.run(base + ["--out", out], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "num_cpus and num_gpus must not be provided" not in r.stderr
    got = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures")
    assert sorted(got.column("source").to_pylist()) == inputs
    folder = storage.Folder(out)
    writers = [json.loads(folder.read_text(n))["writer"]["node_id"] for n in listing(out) if n.endswith("_stats.json")]
    workers = {n.node_id for n in nodes}  # the two nodes with CPUs (the head has none)
    assert len(writers) == len(inputs) and set(writers) <= workers and len(set(writers)) == 2

    env.pop("RAY_ADDRESS")
    again = f"{root}/found"
    # one photo through one actor that runs every model stage: this job only has to find the cluster
    light = ["pipeline.fuse=true", "pipeline.pools.curate.concurrency=1"]
    r = subprocess.run(
        base[:6] + [f"{src}/sub"] + base[7:] + light + ["--out", again],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (stats,) = [n for n in listing(again) if n.endswith("_stats.json")]
    assert json.loads(storage.Folder(again).read_text(stats))["writer"]["node_id"] in workers  # joined, not local


def test_retry_failures_redoes_only_what_may_pass_now(s3_server, cache, tmp_path):
    """A first run in which some reads fail (the files are not there yet) and one image does not decode; then
    the files appear and --retry-failures redoes only the read failures: they move to samples, the decode
    failure (a local file: it would fail again) and every record stay exactly as they were."""
    photos = sorted(SAMPLES.glob("*.jpg"))
    src = tmp_path / "imgs"
    src.mkdir()
    late = [src / "late0.jpg", src / "late1.jpg"]
    for p in photos[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    lst = tmp_path / "list.csv"
    lst.write_text("path\n" + "".join(f"{p}\n" for p in sorted(src.iterdir())) + "".join(f"{p}\n" for p in late))
    out = f"{new_bucket()}/retry"
    first = run(str(lst), out, tiny(shard_size=4, fuse=True), progress_every=60)
    assert first.failed == 3 and first.ok == 3
    before = tables(out)
    assert sorted((f["source"].rsplit("/", 1)[-1], f["stage"]) for f in before["failures"]) == [
        ("broken.jpg", "decode"),
        ("late0.jpg", "read"),
        ("late1.jpg", "read"),
    ]
    kept_records = records(out)
    kept_vectors = embeddings(out)
    assert set(kept_vectors) == set(kept_records)  # the curate stage's sidecar: one row per record
    kept_ids = identities(out)  # the identity stage's: one row per object
    assert {k for k, _ in kept_ids} == set(kept_records)
    for p, photo in zip(late, photos[3:5]):
        p.write_bytes(photo.read_bytes())

    again = run(str(lst), out, tiny(shard_size=4, fuse=True), retry_failures=True, progress_every=60)
    assert again.incomplete == [] and again.ok == 2 and again.failed == 0
    after = tables(out)
    assert [f["source"].rsplit("/", 1)[-1] for f in after["failures"]] == ["broken.jpg"]
    sources = sorted(s["source"] for s in after["samples"])
    assert sources == sorted(str(p) for p in [*[src / p.name for p in photos[:3]], *late])
    got = records(out)
    assert {k: v for k, v in got.items() if k in kept_records} == kept_records  # untouched, byte for byte
    vectors = embeddings(out)  # the retried shard keeps its records' embeddings, and has the new ones'
    assert set(vectors) == set(got) and all((vectors[k] == v).all() for k, v in kept_vectors.items())
    ids = identities(out)  # and its objects' identities, in the sidecar a retry rewrites too
    assert {k for k, _ in ids} == set(got) and all((ids[k] == v).all() for k, v in kept_ids.items())
    n = len(after["samples"]) + len(after["failures"])
    assert n == 6 and not {s["key"] for s in after["samples"]} & {f["key"] for f in after["failures"]}
    manifest = json.loads(storage.Folder(out).read_text("manifest.json"))
    assert manifest["runs"][-1]["retried"] == 2 and manifest["counts"]["failures"] == 1
    # Nothing left to retry: a second --retry-failures changes nothing.
    third = run(str(lst), out, tiny(shard_size=4, fuse=True), retry_failures=True, progress_every=60)
    assert third.ok == third.failed == 0 and tables(out) == after


def identities(out: str) -> dict:
    """{(key, object index): (D,) float16} of every complete shard's identity sidecar."""
    table, vectors, _ = read_folder(out)
    return {(r["key"], r["index"]): v for r, v in zip(table.to_pylist(), vectors)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_on_a_bucket_selection_killed_and_resumed_is_a_straight_run(bucket, cache, tmp_path):
    """`catalog select` on the bucket, then 2 gloo ranks train from the selection's shard URLs: a run killed
    after its first checkpoint and resumed ends where a straight run ends."""
    from safetensors.torch import load_file

    from subjectdiff.catalogs.selection import select
    from subjectdiff.photo_records import write_photo_shards

    url = f"{bucket}/train-records"
    write_photo_shards(url, n_shards=2, per_shard=4)
    # `train --records URL --where`: the bucket's catalog is made on rank 0 (a local file), and the run reads
    # the selected tars from the bucket.
    env0 = {**os.environ, "OMP_NUM_THREADS": "1"}
    w = subprocess.run(
        [
            sys.executable,
            "-m",
            "subjectdiff.train",
            "--preset",
            "tiny",
            "--records",
            url,
            "--where",
            "n_objects >= 3",
            "--out",
            str(tmp_path / "where"),
            "run.max_steps=1",
            "run.trace=true",
            "data.batch_size=2",
            "run.val_every=0",
        ],
        cwd=REPO,
        env=env0,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert w.returncode == 0, w.stderr[-3000:]
    want = set(catalog.query(url, "SELECT key FROM samples WHERE n_objects >= 3").column("key").to_pylist())
    seen = {
        k
        for line in (tmp_path / "where" / "trace-rank0.jsonl").read_text().splitlines()
        for k in json.loads(line)["keys"]
    }
    assert seen and seen <= want
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    sel = tmp_path / "sel.parquet"
    assert select(url, "n_objects >= 2", sel) == 8

    def cmd(out: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "-m",
            "subjectdiff.train",
            "--preset",
            "tiny",
            "--selection",
            str(sel),
            "--out",
            str(out),
            "run.max_steps=4",
            "run.ckpt_every=2",
            "data.batch_size=1",
            "run.val_every=0",
            *extra,
        ]

    straight = subprocess.run(
        cmd(tmp_path / "straight"), cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd(out), cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = out / "checkpoints" / "step-0000002"
    deadline = time.monotonic() + 300
    while not first.is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_dir()
    resumed = subprocess.run(
        cmd(out, "--resume", "latest"), cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "model.safetensors")
    b = load_file(out / "checkpoints" / "step-0000004" / "model.safetensors")
    assert a.keys() == b.keys()
    import torch

    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
