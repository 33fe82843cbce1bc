"""Fixtures shared by several test modules."""

import json
import logging
import os
import socket
import tempfile
import uuid

import pytest

from tests.faults import MotoRecorder

# Ray's temporary folder for this test session alone: a Ray cluster started on this machine by anyone else
# (`ray start`, another test run) is then invisible to the tests, whose runs start or join only their own.
# Short, because Ray's socket paths live under it.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))


@pytest.fixture
def one_thread():
    """One intra-op torch thread: tiny models run several times faster on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on a loopback port: moto's server mode, started here and stopped at the end.

    The standard AWS variables point every client at it (boto3, s3fs, pyarrow through fsspec, and the
    subprocesses and Ray workers the tests start, which inherit the environment): no code under test is
    given an endpoint. Yields the endpoint URL."""
    os.environ.setdefault("MOTO_RECORDER_FILEPATH", os.path.join(tempfile.mkdtemp(prefix="moto"), "requests.jsonl"))
    from moto.server import ThreadedMotoServer

    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A new, empty bucket on the moto server: yields its URL, 's3://test-<random>'."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    fs.invalidate_cache()
    yield f"s3://{name}"


@pytest.fixture
def s3_requests(s3_server):
    """What the S3 server is asked while the test runs (MotoRecorder): call `recorded()` for
    [(method, object path, query)] since the last `reset()`."""
    rec = MotoRecorder(s3_server)
    rec.start()
    yield rec
    rec.stop()


@pytest.fixture
def fault_proxy(s3_server):
    """A fault-injecting proxy (tests/faults.py) in front of the moto server, started and stopped here, with
    every S3 client of the test (and the subprocesses and Ray workers it starts) pointed at it through
    AWS_ENDPOINT_URL, and botocore's own retries off (tests.faults.through)."""
    from tests.faults import FaultProxy, through

    proxy = FaultProxy(s3_server)
    with through(proxy):
        yield proxy
    proxy.stop()


@pytest.fixture
def endpoint_in_options(bucket, s3_server, monkeypatch):
    """BUCKET reachable only through $SUBJECTDIFF_STORAGE_OPTIONS: the endpoint given there alone
    (AWS_ENDPOINT_URL unset), as for a storage setting that has no environment variable. s3fs's cached
    clients are dropped before and after: one made while the variable was set would still know the endpoint."""
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("SUBJECTDIFF_STORAGE_OPTIONS", json.dumps({"endpoint_url": s3_server}))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # without the endpoint a client fails at once, not after retries
    s3fs.S3FileSystem.clear_instance_cache()
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
