"""Storage that misbehaves: a fault-injecting proxy (tests/faults.py) in front of the moto server, reached through
s3fs as users reach their buckets. Transient errors are retried by what they are, failure reasons group, a
fresh run deletes nothing, heavy faults end in one line per shard and a rerun is exact, progress never goes
back; and a selection file that is not there is one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from subjectdiff.catalogs import catalog, storage
from subjectdiff.datagen import units

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"
PHOTOS = sorted(SAMPLES.glob("*.jpg"))


def new_bucket() -> str:
    fs, _ = storage.filesystem("s3://x")
    name = f"faults-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return f"s3://{name}"


def put(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)
    fs.pipe_file(path, data)


def key_path(url: str) -> str:
    """The request path of an s3:// URL, as the proxy and moto see it (an anchored regex)."""
    return "^/" + re.escape(url.removeprefix("s3://")) + r"(\?|$)"


@pytest.fixture
def no_sleep(monkeypatch):
    """Retry pauses recorded instead of slept (units' and storage's: one `time` module), and one attempt per
    s3fs call in this process: a fault reaches the project's retries at once, and the test does not wait."""
    import s3fs

    slept: list[float] = []
    monkeypatch.setattr(units.time, "sleep", slept.append)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    return slept


# ---- reads and writes of one object -----------------------------------------------------------------------


def test_a_response_cut_mid_body_is_read_again(fault_proxy, no_sleep):
    """aiohttp's ClientPayloadError (the connection reset mid-body) is transient: the unit is read again."""
    url = f"{new_bucket()}/a.jpg"
    photo = PHOTOS[0].read_bytes()
    put(url, photo)
    fault_proxy.fail("cut", method="GET", path=key_path(url), times=1)
    assert units.read_unit(url, -1, -1) == photo
    assert fault_proxy.count("GET", key_path(url)) == 2 and no_sleep == [0.2]


def test_reads_that_keep_failing_give_reasons_that_group(fault_proxy, no_sleep):
    """Each failure reason is the same words for every object that failed the same way: no address, no byte
    count; the message (for the log) keeps them."""
    root = new_bucket()
    urls = [f"{root}/{p.name}" for p in PHOTOS[:4]]
    for u, p in zip(urls, PHOTOS):
        put(u, p.read_bytes())
    for u in urls[:2]:
        fault_proxy.fail("cut", method="GET", path=key_path(u))
    for u in urls[2:]:
        fault_proxy.fail("503", method="GET", path=key_path(u))
    errors = []
    for u in urls:
        with pytest.raises(units.UnitReadError) as e:
            units.read_unit(u, -1, -1)
        errors.append(e.value)
    reasons = [e.reason for e in errors]
    assert (
        reasons
        == ["cannot read the image: connection lost mid-response (after 3 attempts)"] * 2
        + ["cannot read the image: HTTP 503: SlowDown (after 3 attempts)"] * 2
    )
    assert all(u in str(e) for u, e in zip(urls, errors))  # the message names the object
    assert "bytes" in str(errors[0]) and "ClientPayloadError" in str(errors[0])
    # A tar member and a row group say the same, in their own words.
    with pytest.raises(units.UnitReadError) as e:
        units.read_unit(urls[0], 100, 200)
    assert e.value.reason == "cannot read the tar member: connection lost mid-response (after 3 attempts)"
    assert f"{urls[0]} at byte 100" in str(e.value)


def test_errors_are_classified_by_what_they_are():
    import aiohttp
    from botocore.exceptions import ClientError, ConnectionClosedError

    def s3_error(status: int, code: str) -> OSError:
        err = OSError(16, "translated by s3fs")
        err.__cause__ = ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "R1"},
            },
            "GetObject",
        )
        return err

    transient = [
        aiohttp.ClientPayloadError("Response payload is not completed: (received 1 of 2 bytes)"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError(104, "reset"),
        TimeoutError(),
        ConnectionClosedError(endpoint_url="http://x"),
        s3_error(503, "SlowDown"),
        s3_error(500, "InternalError"),
        s3_error(429, "TooManyRequests"),
        s3_error(400, "RequestTimeout"),
    ]
    permanent = [
        FileNotFoundError("x"),
        PermissionError("x"),
        s3_error(400, "InvalidArgument"),
        s3_error(416, "InvalidRange"),
        ValueError("x"),
        OSError(28, "No space left on device"),
        storage.StorageError("retries spent"),
    ]
    assert [storage.transient(e) for e in transient] == [True] * len(transient)
    assert [storage.transient(e) for e in permanent] == [False] * len(permanent)
    assert [storage.describe(e) for e in transient[:4]] == [
        "connection lost mid-response",
        "server disconnected",
        "connection reset",
        "timed out",
    ]
    assert storage.describe(transient[5]) == "HTTP 503: SlowDown"


def test_retry_delays_are_a_setting(monkeypatch):
    """$SUBJECTDIFF_STORAGE_RETRY_DELAYS: the delays, one more attempt than delays; a bad value is one line."""
    assert storage._retry_delays() == storage.RETRY_DELAYS == (0.5, 2.0, 8.0)
    monkeypatch.setenv(storage.ENV_RETRY_DELAYS, "0.1, 1,0")
    assert storage._retry_delays() == (0.1, 1.0, 0.0)
    assert storage.storage_env()[storage.ENV_RETRY_DELAYS] == "0.1, 1,0"  # handed to the run's Ray workers
    for bad in ("fast", "1,-2", "1,,2"):
        monkeypatch.setenv(storage.ENV_RETRY_DELAYS, bad)
        with pytest.raises(ValueError, match=r"^\$SUBJECTDIFF_STORAGE_RETRY_DELAYS=.*expected seconds >= 0"):
            storage._retry_delays()
    # a process started with it (a datagen run, its Ray workers) retries with those delays
    code = "from subjectdiff.catalogs import storage as s; "
    code += "print(s.retrying.__defaults__, s.RetryingReader.__init__.__defaults__)"
    env = {**os.environ, storage.ENV_RETRY_DELAYS: "0.1,1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["((0.1,", "1.0),)", "((0.1,", "1.0),)"]


def test_the_training_reader_and_uploads_ride_out_transient_errors(fault_proxy, tmp_path, no_sleep):
    root = new_bucket()
    data = os.urandom(3 << 20)
    put(f"{root}/big.tar", data)
    fault_proxy.fail("cut", method="GET", path=key_path(f"{root}/big.tar"), times=2)
    with storage.RetryingReader(f"{root}/big.tar") as r:
        assert r.read() == data
    assert no_sleep == [0.5, 2.0]

    local = tmp_path / "00000.tar"
    local.write_bytes(b"shard")
    folder = storage.Folder(f"{root}/out")
    fault_proxy.fail(("503", "reset"), method="PUT", path=key_path(f"{root}/out/00000.tar"), times=2)
    folder.commit(local, "00000.tar")
    assert folder.read_bytes("00000.tar") == b"shard" and not local.exists()
    assert fault_proxy.count("PUT", key_path(f"{root}/out/00000.tar")) == 3

    fault_proxy.fail("503", method="PUT", path=key_path(f"{root}/out/manifest.json"))
    with pytest.raises(storage.StorageError) as e:
        folder.write_text("manifest.json", "{}")
    assert str(e.value) == f"cannot write {root}/out/manifest.json: HTTP 503: SlowDown (after 4 attempts)"


def test_a_missing_or_foreign_selection_file_is_one_line(tmp_path):
    from subjectdiff.catalogs.selection import load_eligible_objects, load_selection

    missing = tmp_path / "missing.parquet"
    for load in (load_selection, load_eligible_objects):
        with pytest.raises(FileNotFoundError) as e:
            load(missing)
        assert str(e.value).startswith(f"selection {missing}: no such file") and "\n" not in str(e.value)
    (tmp_path / "notes.parquet").write_text("not a Parquet file\n")
    with pytest.raises(ValueError, match=r"^selection .*notes\.parquet: not a readable selection Parquet file"):
        load_selection(tmp_path / "notes.parquet")


def test_progress_never_goes_back_when_a_shard_is_redone():
    from subjectdiff.progress import Progress

    out = io.StringIO()
    prog = Progress(total=8, every=0.0, stream=out)
    prog.update(2, 1, shard="00000")
    prog.update(3, 0, shard="00001")
    prog.restart("00000")  # its attempt was lost: redone from zero
    prog.update(1, 0, shard="00000")
    prog.update(1, 1, shard="00000")
    prog.update(1, 0, shard="00000")
    done = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert done == sorted(done) and done[-1] == 7 and (prog.ok, prog.failed) == (6, 1)


# ---- a datagen run through the proxy ----------------------------------------------------------------------


def s3_retries() -> int:
    """Attempts s3fs makes per call in Ray workers and subprocesses (its class default)."""
    import s3fs

    return s3fs.S3FileSystem.retries


@contextlib.contextmanager
def own_cache(path: Path):
    saved = os.environ.get("SUBJECTDIFF_CACHE")
    os.environ["SUBJECTDIFF_CACHE"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SUBJECTDIFF_CACHE")
        else:
            os.environ["SUBJECTDIFF_CACHE"] = saved


@pytest.fixture(scope="module")
def faulty_run(s3_server, tmp_path_factory):
    """A run from a bucket folder into a fresh bucket prefix, through the proxy: the first reads of one photo
    are cut mid-body (as many as s3fs retries: one call fails for good), every read of two others is cut,
    and the first upload of shard 00001's tar is refused (the shard is redone). Returns the run's output,
    inputs, stderr (progress every update), the proxy's and the server's view of the requests."""
    import ray

    from subjectdiff.datagen.run import run
    from tests.faults import FaultProxy, MotoRecorder, through
    from tests.pipelines import fresh_cache, tiny_cfg

    proxy = FaultProxy(s3_server)
    recorder = MotoRecorder(s3_server)
    with through(proxy), own_cache(fresh_cache(tmp_path_factory.mktemp("cache"))):
        root = new_bucket()
        src, out = f"{root}/photos", f"{root}/records"
        inputs = [f"{src}/{p.name}" for p in PHOTOS[:4]]  # astronaut, chelsea | coffee, coins: two shards
        for u, p in zip(inputs, PHOTOS):
            put(u, p.read_bytes())
        proxy.fail("cut", method="GET", path=key_path(inputs[0]), times=s3_retries())
        for u in inputs[1:3]:
            proxy.fail("cut", method="GET", path=key_path(u))
        proxy.fail("403", method="PUT", path=key_path(f"{out}/00001.tar"), times=1)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        cfg = tiny_cfg(shard_size=2, batch_size=1)
        cfg.pipeline.fuse = True  # one actor loads every model, not six: what is tested is storage, not the pools
        recorder.start()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                summary = run(src, out, cfg, progress_every=0)
            seen = recorder()
        finally:
            recorder.stop()
            ray.shutdown()
            proxy.stop()
        yield {
            "out": out,
            "inputs": inputs,
            "summary": summary,
            "stderr": err.getvalue(),
            "proxy": proxy,
            "server": seen,
        }


def test_a_run_accounts_for_every_input_through_faults(faulty_run):
    out, inputs, summary = faulty_run["out"], faulty_run["inputs"], faulty_run["summary"]
    assert summary.incomplete == [] and summary.ok + summary.failed == len(inputs)
    got = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures")
    assert sorted(got.column("source").to_pylist()) == inputs  # each once, in samples or failures
    assert "Traceback" not in faulty_run["stderr"]


def test_a_read_cut_mid_body_is_read_again_and_makes_its_record(faulty_run):
    out, first = faulty_run["out"], faulty_run["inputs"][0]
    assert catalog.query(out, "SELECT source FROM samples").column("source").to_pylist().count(first) == 1
    assert faulty_run["proxy"].count("GET", key_path(first)) == s3_retries() + 1  # one more call: it passed


def test_failed_reads_of_a_run_group_by_reason(faulty_run):
    rows = catalog.query(faulty_run["out"], "SELECT stage, reason, count(*) AS n FROM failures GROUP BY ALL")
    assert rows.to_pylist() == [
        {"stage": "read", "reason": "cannot read the image: connection lost mid-response (after 3 attempts)", "n": 2}
    ]


def test_a_fresh_run_on_a_bucket_deletes_nothing(faulty_run):
    seen = faulty_run["server"]
    assert seen and [r for r in seen if r[0] == "DELETE" or "delete" in r[2]] == []


def test_progress_never_goes_back_while_a_shard_is_redone(faulty_run):
    err = faulty_run["stderr"]
    assert "shard 00001: attempt 1 failed" in err  # the refused upload: the shard was redone
    done = [int(m) for m in re.findall(r"^\[datagen\] (\d+)/\d+ inputs, \d+ samples", err, re.M)]
    assert done and done == sorted(done) and done[-1] == len(faulty_run["inputs"]), done


# ---- heavy faults, through the command line ---------------------------------------------------------------


def test_heavy_faults_end_in_one_line_per_shard_and_a_rerun_is_exact(fault_proxy, s3_requests, tmp_path):
    """An outage (every request fails) stops the run before any shard with one line; then every shard's
    stats upload fails (each shard is left without its stats file, so incomplete): one line per shard and
    a summary, exit status 1, no traceback. Once the storage is healthy, the same command completes, deleting
    only what the failed attempts left, and every input is a sample or a failure, once."""
    from tests.pipelines import fresh_cache

    src = tmp_path / "in"
    src.mkdir()
    for p in PHOTOS[:3]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"not a JPEG")
    inputs = sorted(str(p) for p in src.iterdir())
    out = f"{new_bucket()}/heavy"
    cmd = [
        sys.executable,
        "-m",
        "subjectdiff",
        "datagen",
        "run",
        "--input",
        str(src),
        "--out",
        out,
        "--preset",
        "tiny",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "pipeline.max_attempts=2",
        # one actor runs every model stage: each of the two runs that get as far as the stages starts one
        # worker process and loads the models once, instead of six (what is tested is storage, not the pools)
        "pipeline.fuse=true",
    ]
    # the same 4 attempts per operation, a few ms apart rather than 0.5, 2 and 8 s: each failed upload or
    # listing of the three runs would otherwise wait 10.5 s (and each shard is tried twice)
    env = {
        **os.environ,
        "SUBJECTDIFF_CACHE": str(fresh_cache(tmp_path / "cache")),  # the tiny models linked, not built again
        storage.ENV_RETRY_DELAYS: "0.01,0.01,0.01",
    }

    def datagen() -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    fault_proxy.fail(("503", "500", "reset"))
    outage = datagen()
    assert outage.returncode == 1 and "Traceback" not in outage.stderr, outage.stderr[-3000:]
    last = outage.stderr.strip().splitlines()[-1]
    assert last.startswith(f"subjectdiff datagen: error: storage failed: cannot reach {out}/")
    assert "(after 4 attempts)" in last and "rerun the same command" in last

    fault_proxy.clear()
    fault_proxy.fail(("503", "500", "reset"), method="PUT", path=r"/heavy/\d+_stats\.json$")
    heavy = datagen()
    assert heavy.returncode == 1 and "Traceback" not in heavy.stderr, heavy.stderr[-3000:]
    lines = heavy.stderr.strip().splitlines()
    assert lines[-4] == "subjectdiff datagen: 2 of 2 shard(s) incomplete after their attempts:", lines[-6:]
    for line, shard in zip(lines[-3:-1], ("00000", "00001")):
        assert line.startswith(f"  shard {shard}: StorageError: cannot upload {out}/{shard}_stats.json: ")
    assert "rerun the same command" in lines[-1]
    left = {n for n in storage.Folder(out).listing() if n[:5].isdigit()}
    assert left and not any(n.endswith("_stats.json") for n in left)  # partial shards, never a stats file

    fault_proxy.clear()
    s3_requests.reset()
    healthy = datagen()
    assert healthy.returncode == 0, healthy.stderr[-3000:]
    prefix = "/" + out.removeprefix("s3://") + "/"
    deleted = {p.removeprefix(prefix) for m, p, _ in s3_requests() if m == "DELETE"}
    assert deleted == left  # one listing: what the failed attempts left, and nothing else
    with own_cache(tmp_path / "cache"):
        got = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures")
    assert sorted(got.column("source").to_pylist()) == inputs
    manifest = json.loads(storage.Folder(out).read_text("manifest.json"))
    assert [r["status"] for r in manifest["runs"]] == ["incomplete", "complete"]
