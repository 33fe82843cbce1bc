"""Shards, catalog, selections and the reader on object storage: a real S3 API (moto's server on loopback)
reached through s3fs, the way users reach their buckets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from subjectdiff.catalogs import catalog, storage
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.selection import load_selection, select
from subjectdiff.catalogs.writer import ShardWriter, complete_shards, shard_names
from subjectdiff.photo_records import photo_record, write_photo_shards

REPO = Path(__file__).resolve().parents[1]


def fs_of(url: str):
    return storage.filesystem(url)


@pytest.fixture
def remote_shards(bucket, tmp_path):
    """Two shards written straight to the bucket, and the same two written to a local folder."""
    url = f"{bucket}/sd-records"
    keys = write_photo_shards(url, n_shards=2, per_shard=3)
    local = tmp_path / "local"
    assert write_photo_shards(local, n_shards=2, per_shard=3) == keys
    return url, local, keys


def test_shards_written_to_a_bucket_are_the_local_shards(remote_shards):
    url, local, keys = remote_shards
    fs, path = fs_of(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) == sorted(p.name for p in local.iterdir())
    for name in shard_names("00000").values():
        remote = fs.cat_file(f"{path}/{name}")
        if name.endswith(".tar") or name.endswith(".parquet"):
            assert remote == (local / name).read_bytes(), name  # byte for byte
    stats = json.loads(fs.cat_file(f"{path}/00000_stats.json"))
    assert stats["files"]["tar"] == (local / "00000.tar").stat().st_size
    assert complete_shards(url) == ["00000", "00001"]


def test_an_unfinished_remote_shard_publishes_nothing(bucket, tmp_path):
    url = f"{bucket}/out"
    spool = tmp_path / "spool"
    w = ShardWriter(url, "00003", spool=spool)
    w.write(photo_record("astronaut")[0])
    w.abort()
    fs, path = fs_of(url)
    assert not fs.exists(path) or fs.ls(path) == []
    assert list(spool.iterdir()) == []  # the spool is cleaned too


def test_catalog_of_a_bucket_is_a_local_file_refreshed_from_the_listing(
    remote_shards, tmp_path, monkeypatch, s3_requests
):
    url, local, keys = remote_shards
    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    report = catalog.build(url)
    assert sorted(report.added) == ["00000", "00001"]
    path = catalog.catalog_path(url)
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    remote = catalog.query(url, "SELECT key, caption FROM samples ORDER BY key").to_pylist()
    catalog.build(local)
    assert remote == catalog.query(local, "SELECT key, caption FROM samples ORDER BY key").to_pylist()
    assert catalog.query(url, "SELECT path FROM shards ORDER BY name").column("path").to_pylist() == [
        f"{url}/00000.tar",
        f"{url}/00001.tar",
    ]

    # Refreshing unchanged shards reads no sidecar: the server saw listings only.
    s3_requests.reset()
    again = catalog.build(url)
    assert again.added == [] and again.unchanged == 2
    seen = s3_requests()
    assert seen and all(m == "GET" and "list-type" in q or m == "HEAD" and p.count("/") <= 2 for m, p, q in seen), seen

    # A new shard: only it is read; a shard rewritten with other content is reloaded.
    write_photo_shards(url + "/more", n_shards=1, per_shard=2)
    third = catalog.build(url)
    assert third.added == ["more/00000"] and third.unchanged == 2

    # An explicit --catalog path works the same.
    other = tmp_path / "elsewhere.duckdb"
    catalog.build(url, catalog=other)
    assert catalog.query(url, "SELECT count(*) AS n FROM samples", catalog=other).column("n")[0].as_py() == 8


def test_a_stats_file_that_disagrees_with_the_listing_is_incomplete(remote_shards, tmp_path, monkeypatch):
    """A stats object replaced by one from another attempt (its recorded sizes no longer match the files beside
    it) makes the shard incomplete for the catalog, rather than cataloguing records that are not in the tar."""
    url, _, _ = remote_shards
    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    catalog.build(url)
    fs, path = fs_of(url)
    st = json.loads(fs.cat_file(f"{path}/00001_stats.json"))
    st["files"]["tar"] += 512
    fs.pipe_file(f"{path}/00001_stats.json", json.dumps(st).encode())
    report = catalog.build(url)
    assert report.removed == ["00001"] and report.added == []  # changed and inconsistent: left out
    shards = catalog.query(url, "SELECT name FROM shards").column("name").to_pylist()
    assert shards == ["00000"]


def test_select_on_a_bucket_keeps_shard_urls_and_the_reader_streams_them(remote_shards, tmp_path, monkeypatch):
    url, _, keys = remote_shards
    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    catalog.build(url)
    sel = tmp_path / "sel.parquet"
    n = select(url, "n_objects >= 2", sel)
    assert n == len(keys)
    assert set(pq.read_table(sel).column("path").to_pylist()) == {f"{url}/00000.tar", f"{url}/00001.tar"}
    assert set(load_selection(sel)) == {f"{url}/00000.tar", f"{url}/00001.tar"}
    got = sorted(r.key for r in RecordReader(selection=sel))
    assert got == sorted(keys)
    # The folder URL itself, and a balanced split counted from the remote sidecars.
    reader = RecordReader(url, split="balanced", rank=0, world_size=1)
    assert reader.epoch_size() == len(keys)
    recs = list(reader)
    assert sorted(r.key for r in recs) == sorted(keys)
    assert all(r.image.shape == (r.height, r.width, 3) for r in recs)


def test_catalog_cli_on_a_bucket(remote_shards, tmp_path):
    url, _, keys = remote_shards
    env = {**__import__("os").environ, "SUBJECTDIFF_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "subjectdiff", "catalog", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    missing = cli("query", url, "SELECT 1")
    assert missing.returncode == 2 and "catalog build" in missing.stderr
    assert cli("build", url).returncode == 0
    q = cli("query", url, "SELECT count(*) AS n FROM samples", "--format", "json")
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout) == [{"n": len(keys)}]
    st = cli("stats", url, "--format", "json")
    assert st.returncode == 0 and json.loads(st.stdout)["samples"] == len(keys)
    sel = tmp_path / "sel.parquet"
    assert cli("select", url, "--where", "true", "--out", str(sel)).returncode == 0
    assert pq.read_table(sel).num_rows == len(keys)
    report = tmp_path / "report.html"
    r = cli("report", url, "--out", str(report), "--sample", "4")
    assert r.returncode == 0, r.stderr
    page = report.read_text()
    assert page.count('class="card"') == 4 and "cannot read shard" not in page
    own = tmp_path / "mine.duckdb"
    assert cli("build", url, "--catalog", str(own)).returncode == 0 and own.is_file()


def test_storage_options_per_protocol_reach_only_their_protocol(bucket, s3_server, monkeypatch):
    """SUBJECTDIFF_STORAGE_OPTIONS keyed by protocol: the bucket's endpoint (given nowhere else) reaches s3://
    URLs, plain or chained behind a cache, and https:// gets its own options, not the bucket's endpoint_url."""
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    options = {"s3": {"endpoint_url": s3_server}, "https": {"headers": {"X-Project": "subjectdiff"}}}
    monkeypatch.setenv("SUBJECTDIFF_STORAGE_OPTIONS", json.dumps(options))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with storage.open_url(f"{bucket}/a.txt", "wb") as f:
            f.write(b"through the options")
        with storage.open_url(f"simplecache::{bucket}/a.txt") as f:
            assert f.read() == b"through the options"
        fs, _ = storage.filesystem("https://models.example/sam.pth")
        assert fs.kwargs == {"headers": {"X-Project": "subjectdiff"}}
        assert storage.storage_options("gs") == {}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    # The flat form still reaches every protocol, as before.
    monkeypatch.setenv("SUBJECTDIFF_STORAGE_OPTIONS", json.dumps({"endpoint_url": s3_server}))
    assert storage.storage_options("s3") == storage.storage_options("gs") == {"endpoint_url": s3_server}
