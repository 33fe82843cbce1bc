"""Bad shards and bad records (issue #17): a catalog build loads every good shard and lists each bad one, locally
and on a bucket; a build that fails or dies leaves the catalog as it was, or none; the reader refuses link members,
missing members and malformed JSON naming the shard and the key, and the trainer stops on them or skips and counts
them. Real files and a real S3 API (moto's server), no mocks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from subjectdiff.catalogs import catalog, storage
from subjectdiff.catalogs.reader import BadRecord, BadRecordError, DecodedRecord, RecordReader
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.cli import main
from subjectdiff.photo_records import write_photo_shards
from subjectdiff.train.config import load_config
from subjectdiff.train.data import BatchStream, TrainSamples, make_reader
from tests.geometry import Obj, make_record, sized

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "subjectdiff", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


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
    samples = pq.read_table(io.BytesIO(get(root, "00001.samples.parquet")))
    put(root, "00001.samples.parquet", sidecar_bytes(samples.drop_columns(["width"])))  # a sidecar of another schema
    samples = pq.read_table(io.BytesIO(get(root, "00002.samples.parquet")))
    wide = samples.set_column(samples.schema.get_field_index("width"), "width", pa.array(["wide"] * samples.num_rows))
    put(root, "00002.samples.parquet", sidecar_bytes(wide))  # a column of another type
    for sid in ("00001", "00002"):
        set_recorded_size(root, sid, "samples", f"{sid}.samples.parquet")
    put(root, "00003_stats.json", b'{"successes": 2, "files": ')  # cut short
    size = len(get(root, "00004.objects.parquet"))
    put(root, "00004.objects.parquet", b"\x00" * size)  # corrupt bytes, the recorded size
    st = json.loads(get(root, "00005_stats.json"))
    put(root, "00005_stats.json", json.dumps({**st, "successes": st["successes"] + 1}).encode())
    bad = {
        "00001": ("00001.samples.parquet", "wrong schema"),
        "00002": ("00002.samples.parquet", "wrong schema"),
        "00003": ("00003_stats.json", "not JSON"),
        "00004": ("00004.objects.parquet", "not Parquet"),
        "00005": ("00005_stats.json", "counts disagree"),
    }
    if remote:  # a sidecar the listing shows but a GET refuses: archived by a lifecycle rule
        put(root, "00006.samples.parquet", get(root, "00006.samples.parquet"), StorageClass="GLACIER")
        bad["00006"] = ("00006.samples.parquet", "read failed")
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
        assert any(
            line.startswith(f"bad shard {sid}: {storage.Folder(root).join(name)}: {reason} (") for line in lines
        ), (sid, lines)
    assert f"{8 - len(bad)} shard(s) loaded" in proc.stdout and f"{len(bad)} bad" in proc.stdout
    loaded = catalog.query(root, "SELECT key FROM samples ORDER BY key", catalog=db).column("key").to_pylist()
    assert loaded == sorted(good)
    rows = catalog.query(
        root, "SELECT name, file, reason, detail, seen_at FROM bad_shards ORDER BY name", catalog=db
    ).to_pylist()
    assert {r["name"]: (r["file"], r["reason"]) for r in rows} == {
        sid: (storage.Folder(root).join(name), reason) for sid, (name, reason) in bad.items()
    }
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
    build = subprocess.Popen(
        [sys.executable, "-m", "subjectdiff", "catalog", "build", str(d), "--catalog", str(db)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
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
    for args in (
        ("query", str(d), "SELECT count(*) FROM samples"),
        ("select", str(d), "--where", "true", "--out", str(tmp_path / "sel.parquet")),
    ):
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


def test_a_large_refresh_fills_a_copy_readers_keep_the_old_catalog_and_a_failure_changes_nothing(tmp_path, monkeypatch):
    """A refresh of more shards than IN_PLACE_SHARDS (here 0: every refresh) commits a chunk of shards at a time
    into CATALOG.building and swaps it in at the end, so its memory stays flat at 100M objects. Meanwhile readers
    get the old catalog; one that fails midway leaves the catalog, its pairs, and no copy behind; one that ends is
    row for row a fresh build, pairs kept."""
    from subjectdiff.catalogs.pairs import PAIR_SCHEMA

    d, db, later = tmp_path / "shards", tmp_path / "c.duckdb", tmp_path / "later"
    write_photo_shards(d, n_shards=4, per_shard=2, failures_per_shard=1)
    later.mkdir()
    for f in d.glob("0000[23]*"):  # shards 2 and 3 come after the first build
        f.rename(later / f.name)
    catalog.build(d, catalog=db)
    pair = {"ref_key": "a", "ref_index": 0, "target_key": "b", "target_index": 0, "label": "cat", "method": "video"}
    catalog.replace_pairs(d, pa.Table.from_pylist([pair], schema=PAIR_SCHEMA), "video", catalog=db)
    for f in later.iterdir():
        f.rename(d / f.name)
    monkeypatch.setattr(catalog, "IN_PLACE_SHARDS", 0)
    monkeypatch.setattr(catalog, "CHUNK_SHARDS", 1)

    def count(sql: str = "SELECT count(*) AS n FROM samples") -> int:
        return catalog.query(d, sql, catalog=db).column(0)[0].as_py()

    load, seen = catalog._load, []

    def load_then_fail(con, folder, shards):
        seen.append(count())  # a reader while the copy fills
        got = load(con, folder, shards)
        if len(seen) == 2:
            raise RuntimeError("disk full")
        return got

    monkeypatch.setattr(catalog, "_load", load_then_fail)
    with pytest.raises(catalog.CatalogError, match="kept as it was: disk full"):
        catalog.build(d, catalog=db)
    assert seen == [4, 4] and count() == 4 and count("SELECT count(*) FROM pairs") == 1
    assert not db.with_name("c.duckdb.building").exists() and not db.with_name("c.duckdb.building.wal").exists()

    monkeypatch.setattr(catalog, "_load", load)
    report = catalog.build(d, catalog=db)
    assert sorted(report.added) == ["00002", "00003"] and report.unchanged == 2
    fresh = tmp_path / "fresh.duckdb"
    catalog.build(d, catalog=fresh)
    for table, own in (("samples", "shard, sample_id"), ("objects", "shard, sample_id"), ("failures", "shard")):
        sql = f"SELECT * EXCLUDE ({own}) FROM {table} ORDER BY ALL"  # sample_id: the order the builds loaded shards
        assert catalog.query(d, sql, catalog=db) == catalog.query(d, sql, catalog=fresh), table
    assert count() == 8 and count("SELECT count(*) FROM pairs") == 1
    # sample_id joins each object to its own sample, one id a sample, across the shards of both builds
    assert count("SELECT count(DISTINCT sample_id) FROM samples") == 8
    assert count("SELECT count(*) FROM objects") == count(
        "SELECT count(*) FROM objects o JOIN samples s "
        "ON o.sample_id = s.sample_id AND o.key = s.key AND o.shard = s.shard"
    )


def test_one_writer_at_a_time(tmp_path):
    """A build waits for the writer lock another build or `catalog pairs` holds, and says so when it gives up."""
    d, db = tmp_path / "shards", tmp_path / "c.duckdb"
    write_photo_shards(d, n_shards=1, per_shard=2)
    with catalog.writer_lock(db, timeout=1):
        with pytest.raises(catalog.CatalogError, match="another build or `catalog pairs` holds it"):
            catalog.build(d, catalog=db, timeout=0.5)
    assert not db.exists()
    assert "1 shard(s) loaded" in catalog.build(d, catalog=db, timeout=0.5).summary()


def test_an_empty_selection_says_so(tmp_path):
    d = tmp_path / "shards"
    write_photo_shards(d, n_shards=1, per_shard=2)
    catalog.build(d)
    proc = cli("catalog", "select", str(d), "--where", "width < 0", "--out", str(tmp_path / "sel.parquet"))
    assert proc.returncode == 0 and "selected 0 sample(s)" in proc.stdout
    assert "no sample selected" in proc.stderr and pq.read_table(tmp_path / "sel.parquet").num_rows == 0


# ------------------------------------------------------------------------------------------------ bad records

BAD = {1: "is a symlink", 2: "is a hard link", 3: ".json is malformed", 4: "found none", 5: ".json member beside"}


@pytest.fixture(scope="module")
def bad_members(tmp_path_factory) -> tuple[Path, list[str]]:
    """A shard of 9 records whose tar was rewritten by hand: record 1's image is a symlink, record 2's JSON a hard
    link, record 3's JSON malformed, record 4 has no image, record 5 no JSON; its sidecars list all 9."""
    d = tmp_path_factory.mktemp("bad_members")
    records = [
        make_record(f"r{i}", sized("chelsea", 120, 90), "a cat", [Obj("cat", "cat", (0.2, 0.2, 0.7, 0.9))])
        for i in range(9)
    ]
    with ShardWriter(d, "00000") as w:
        for r in records:
            w.write(r)
    keys = [r.key for r in records]
    tar = d / "00000.tar"
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            i = keys.index(key)
            if i == 1 and ext == "png":
                m = tarfile.TarInfo(m.name)
                m.type, m.linkname = tarfile.SYMTYPE, f"{keys[0]}.png"
            elif i == 2 and ext == "json":
                m = tarfile.TarInfo(m.name)
                m.type, m.linkname = tarfile.LNKTYPE, f"{keys[0]}.json"
            elif i == 3 and ext == "json":
                data = b'{"key": "' + key.encode() + b'", "caption": '
                m.size = len(data)
            elif (i, ext) in ((4, "png"), (5, "json")):
                continue
            out.addfile(m, io.BytesIO(data) if m.isfile() else None)
    set_recorded_size(str(d), "00000", "tar", "00000.tar")
    return d, keys


def test_the_reader_refuses_link_members_missing_members_and_malformed_json(bad_members):
    """Was: webdataset skipped a link member without a word (the record then lacked it and the trainer died on a
    KeyError naming no shard); malformed JSON was a JSONDecodeError naming neither shard nor key."""
    d, keys = bad_members
    tar = str(d / "00000.tar")
    got = list(RecordReader(d, on_error="yield"))
    assert [type(r) for r in got] == [DecodedRecord] + [BadRecord] * 5 + [DecodedRecord] * 3
    for i, why in BAD.items():
        assert (got[i].shard, got[i].key) == (tar, keys[i]) and why in got[i].reason, got[i]
        with pytest.raises(BadRecordError) as e:
            list(RecordReader(d, keys=[keys[i]]))
        assert (e.value.shard, e.value.key) == (tar, keys[i]) and why in e.value.reason
        assert str(e.value).startswith(f"record {keys[i]} (shard {tar}): ") and "\n" not in str(e.value)
    assert [r.key for r in RecordReader(d, on_error="warn")] == [keys[0]] + keys[6:]


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("subjectdiff train")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.usefixtures("one_thread")
def test_training_stops_on_a_bad_record_naming_it_or_skips_and_counts(bad_members, tmp_path, capsys):
    d, keys = bad_members
    run = ["train", "--preset", "tiny", "--records", str(d), "run.progress='off'", "run.max_steps=3"]
    for workers in (0, 1):  # in the process, and re-raised from a DataLoader worker
        assert main([*run, "--out", str(tmp_path / f"raise{workers}"), f"data.num_workers={workers}"]) == 2
        err = error_line(capsys.readouterr().err)
        assert f"record {keys[1]} (shard {d / '00000.tar'}): member {keys[1]}.png is a symlink" in err, err

    assert main([*run, "--out", str(tmp_path / "skip"), "data.on_bad_record='skip'"]) == 0
    out, err = capsys.readouterr()
    assert "data: epoch 0: 5 bad records skipped (data.on_bad_record=skip)" in out, out
    assert f"data: skipped bad record {keys[1]} (shard {d / '00000.tar'})" in err

    assert (
        main(
            [
                "train",
                "preview",
                "--preset",
                "tiny",
                "--records",
                str(d),
                "--sample",
                "3",
                "--out",
                str(tmp_path / "pv"),
                "data.on_bad_record='skip'",
            ]
        )
        == 0
    )
    page = (tmp_path / "pv" / "index.html").read_text()
    assert "5 bad records skipped" in page


def test_skipped_bad_records_count_as_read_and_a_resume_is_exact(bad_members):
    d, _ = bad_members
    cfg = load_config(
        "tiny", [f"data.shards=['{d}']", "data.num_workers=2", "data.batch_size=2", "data.on_bad_record='skip'"]
    )

    def stream(state=None) -> BatchStream:
        s = BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 2)
        if state is not None:
            s.load_state(state)
        return s

    def take(it, n: int) -> list[list[str]]:
        return [list(next(it)["key"]) for _ in range(n)]

    straight = stream()
    batches = take(iter(straight), 6)
    # 2 batches per epoch: worker 0's [r0] (r1-r3 skipped after it), worker 1's [r6, r7] (r4, r5 before them)
    assert straight.skipped == {"bad record": 15}
    for cut in (1, 3):
        first = stream()
        it = iter(first)
        assert take(it, cut) == batches[:cut]
        state = first.state()
        it.close()
        assert take(iter(stream(state)), 6 - cut) == batches[cut:], cut
