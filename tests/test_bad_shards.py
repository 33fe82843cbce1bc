"""Bad shards (issue #17): a catalog build loads every good shard and lists each bad one, locally and on a bucket;
a build that fails or dies leaves the catalog as it was, or none. Real files and a real S3 API (moto's server), no
mocks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs import catalog, storage
from catalogs.writer import ShardWriter
from tests.geometry import Obj, make_record, sized
from tests.records import write_photo_shards

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "subjectdiff", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def put(root: str, name: str, data: bytes, **s3_args) -> None:
    """Write NAME under ROOT (a local folder or an s3:// URL) as it is, whatever it holds."""
    url = storage.Folder(root).join(name)
    if s3_args:
        bucket, key = url.removeprefix("s3://").split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data, **s3_args)
        return
    fs, path = storage.filesystem(url)
    fs.pipe_file(path, data)


def get(root: str, name: str) -> bytes:
    return storage.Folder(root).read_bytes(name)


def set_recorded_size(root: str, shard: str, kind: str, name: str) -> None:
    """Make shard's stats record the current size of its file NAME (as a writer of that file would have)."""
    st = json.loads(get(root, f"{shard}_stats.json"))
    st["files"][kind] = len(get(root, name))
    put(root, f"{shard}_stats.json", json.dumps(st).encode())


def sidecar_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "shards")
    return f"{request.getfixturevalue('bucket')}/shards"


def damage(root: str, remote: bool) -> dict[str, tuple[str, str]]:
    """Spoil shards 00001-00005 of ROOT (00006 too on a bucket) one way each: {shard: (its bad file, reason)}."""
    samples = pq.read_table(io.BytesIO(get(root, "00001.parquet")))
    put(root, "00001.parquet", sidecar_bytes(samples.drop_columns(["width"])))  # a sidecar of another schema
    samples = pq.read_table(io.BytesIO(get(root, "00002.parquet")))
    wide = samples.set_column(samples.schema.get_field_index("width"), "width", pa.array(["wide"] * samples.num_rows))
    put(root, "00002.parquet", sidecar_bytes(wide))  # a column of another type
    for sid in ("00001", "00002"):
        set_recorded_size(root, sid, "samples", f"{sid}.parquet")
    put(root, "00003_stats.json", b'{"successes": 2, "files": ')  # cut short
    size = len(get(root, "00004.objects.parquet"))
    put(root, "00004.objects.parquet", b"\x00" * size)  # corrupt bytes, the recorded size
    st = json.loads(get(root, "00005_stats.json"))
    put(root, "00005_stats.json", json.dumps({**st, "successes": st["successes"] + 1}).encode())
    bad = {"00001": ("00001.parquet", "wrong schema"), "00002": ("00002.parquet", "wrong schema"),
           "00003": ("00003_stats.json", "not JSON"), "00004": ("00004.objects.parquet", "not Parquet"),
           "00005": ("00005_stats.json", "counts disagree")}
    if remote:  # a sidecar the listing shows but a GET refuses: archived by a lifecycle rule
        put(root, "00006.parquet", get(root, "00006.parquet"), StorageClass="GLACIER")
        bad["00006"] = ("00006.parquet", "read failed")
    return bad


def test_bad_shards_are_listed_and_every_good_one_is_loaded(root, tmp_path):
    """Was: the first bad shard ended the build with a traceback naming no shard, and no good shard was loaded."""
    remote = root.startswith("s3://")
    keys = write_photo_shards(root, n_shards=8, per_shard=2, failures_per_shard=0)
    pristine = {n: get(root, n) for n in storage.Folder(root).listing()}
    bad = damage(root, remote)
    good = [k for i, k in enumerate(keys) if f"{i // 2:05d}" not in bad]
    db = str(tmp_path / "c.duckdb")

    proc = cli("catalog", "build", root, "--catalog", db)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sorted(lines) == sorted(line for line in lines if line.startswith("bad shard ")) and len(lines) == len(bad)
    for sid, (name, reason) in bad.items():
        assert any(line.startswith(f"bad shard {sid}: {storage.Folder(root).join(name)}: {reason} (")
                   for line in lines), (sid, lines)
    assert f"{8 - len(bad)} shard(s) loaded" in proc.stdout and f"{len(bad)} bad" in proc.stdout
    loaded = catalog.query(root, "SELECT key FROM samples ORDER BY key", catalog=db).column("key").to_pylist()
    assert loaded == sorted(good)
    rows = catalog.query(root, "SELECT name, file, reason, detail, seen_at FROM bad_shards ORDER BY name",
                         catalog=db).to_pylist()
    assert {r["name"]: (r["file"], r["reason"]) for r in rows} == {
        sid: (storage.Folder(root).join(name), reason) for sid, (name, reason) in bad.items()}
    assert all(r["detail"] and "\n" not in r["detail"] and r["seen_at"] for r in rows)
    query = cli("catalog", "query", root, "--catalog", db, "SELECT count(*) AS n FROM samples")
    assert query.returncode == 0 and f"{len(bad)} bad shard(s) are not in the catalog" in query.stderr

    # Fixed shards load at the next build and leave bad_shards; the others stay as they were.
    for sid, (name, _) in bad.items():
        for n in (name, f"{sid}_stats.json"):
            put(root, n, pristine[n])
    proc = cli("catalog", "build", root, "--catalog", db)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"{len(bad)} shard(s) loaded" in proc.stdout and f"{8 - len(bad)} unchanged" in proc.stdout
    loaded = catalog.query(root, "SELECT key FROM samples ORDER BY key", catalog=db).column("key").to_pylist()
    assert loaded == sorted(keys)
    assert catalog.query(root, "SELECT count(*) AS n FROM bad_shards", catalog=db).column("n")[0].as_py() == 0


def kill_a_build_reading(stats: Path, d: Path, db: Path) -> None:
    """Run `catalog build D` and kill it while it reads STATS (a FIFO in its place meanwhile: opening it for
    writing returns once the build has opened it, inside its transaction); STATS is restored after."""
    saved = stats.read_bytes()
    stats.unlink()
    os.mkfifo(stats)
    build = subprocess.Popen([sys.executable, "-m", "subjectdiff", "catalog", "build", str(d), "--catalog", str(db)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(stats, "wb"):
        build.kill()
        build.wait(timeout=60)
    stats.unlink()
    stats.write_bytes(saved)


def test_a_first_build_that_fails_or_dies_leaves_no_catalog(tmp_path):
    """Was: a first build that failed on a shard left an empty catalog behind, which answered 0 rows with exit 0.
    A build killed mid-way (the shard it reads is a FIFO the test holds open) leaves no catalog either."""
    d, db = tmp_path / "shards", tmp_path / "c.duckdb"
    write_photo_shards(d, n_shards=2, per_shard=2, failures_per_shard=0)
    proc = cli("catalog", "build", str(tmp_path / "nowhere"), "--catalog", str(db))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not db.exists()

    kill_a_build_reading(d / "00001_stats.json", d, db)
    for args in (("query", str(d), "SELECT count(*) FROM samples"), ("select", str(d), "--where", "true", "--out",
                                                                      str(tmp_path / "sel.parquet"))):
        proc = cli("catalog", *args, "--catalog", str(db))
        assert proc.returncode == 2 and "no catalog" in proc.stderr and "catalog build" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr

    proc = cli("catalog", "build", str(d), "--catalog", str(db))
    assert proc.returncode == 0 and "2 shard(s) loaded" in proc.stdout, proc.stderr
    assert catalog.query(d, "SELECT count(*) AS n FROM samples", catalog=db).column("n")[0].as_py() == 4


def test_a_failed_refresh_keeps_the_previous_catalog_and_says_so(tmp_path):
    """A refresh that cannot list the folder, or that dies mid-way, changes nothing; the first says so."""
    d, db = tmp_path / "shards", tmp_path / "c.duckdb"
    write_photo_shards(d, n_shards=2, per_shard=2, failures_per_shard=0)
    assert cli("catalog", "build", str(d), "--catalog", str(db)).returncode == 0

    def count() -> list[int]:  # records per catalogued shard
        return catalog.query(d, "SELECT n_ok FROM shards ORDER BY name", catalog=db).column("n_ok").to_pylist()

    moved = tmp_path / "moved"
    d.rename(moved)
    proc = cli("catalog", "build", str(d), "--catalog", str(db))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert f"the catalog at {db} is kept as it was" in proc.stderr
    assert count() == [2, 2]
    moved.rename(d)

    with ShardWriter(d, "00002") as w:
        w.write(make_record("late", sized("chelsea", 120, 90), "a cat", [Obj("cat", "cat", (0.2, 0.2, 0.7, 0.9))]))
    kill_a_build_reading(d / "00002_stats.json", d, db)
    assert count() == [2, 2]
    assert cli("catalog", "build", str(d), "--catalog", str(db)).returncode == 0 and count() == [2, 2, 1]


def test_an_empty_selection_says_so(tmp_path):
    d = tmp_path / "shards"
    write_photo_shards(d, n_shards=1, per_shard=2)
    catalog.build(d)
    proc = cli("catalog", "select", str(d), "--where", "width < 0", "--out", str(tmp_path / "sel.parquet"))
    assert proc.returncode == 0 and "selected 0 sample(s)" in proc.stdout
    assert "no sample selected" in proc.stderr and pq.read_table(tmp_path / "sel.parquet").num_rows == 0
