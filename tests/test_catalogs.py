"""The record contract: writer -> reader -> catalog round trips on real photos with hand-made objects."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import Failure, Record, RecordError, make_key, object_from_arrays
from subjectdiff.catalogs.selection import load_selection
from subjectdiff.catalogs.tokens import clip_token_positions, clip_tokenizer
from subjectdiff.catalogs.writer import ShardWriter, complete_shards
from subjectdiff.photo_records import PHOTOS, ellipse_mask, photo_record, write_photo_shards
from tests.bench import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "subjectdiff", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("shards")
    keys = write_photo_shards(out, n_shards=3, per_shard=4, failures_per_shard=1)
    catalog.build(out)
    return out, keys


def test_round_trip_is_exact(tmp_path):
    written = {}
    with ShardWriter(tmp_path, "00000") as w:
        for name in PHOTOS:
            rec, masks = photo_record(name, fmt="JPEG" if name != "rocket" else "PNG")
            w.write(rec)
            written[rec.key] = (rec, masks)
    got = {r.key: r for r in RecordReader(tmp_path)}
    assert set(got) == set(written)
    for key, (rec, masks) in written.items():
        r = got[key]
        # The image travels in its original encoding, byte for byte (no JPEG re-encode).
        assert r.image_bytes == rec.image and r.image_ext == rec.image_ext
        assert r.image.shape == (rec.height, rec.width, 3) and r.image.dtype == np.uint8
        assert r.caption == rec.caption and r.source == rec.source
        np.testing.assert_array_equal(r.boxes, np.asarray([o.box for o in rec.objects], np.float32))
        assert r.masks.shape == (len(masks), rec.height, rec.width)
        for got_mask, want in zip(r.masks, masks):
            np.testing.assert_array_equal(got_mask, want)
        assert r.tokens == [o.tokens for o in rec.objects]
        assert r.labels == [o.label for o in rec.objects]
        assert [r.caption[s:e] for s, e in r.spans] == r.phrases


def test_token_positions_match_open_clip_for_split_words():
    tok = clip_tokenizer()
    caption = "a hippopotamus and an astronaut on a skateboard"
    ids = tok([caption])[0].tolist()
    assert ids[0] == tok.sot_token_id
    for word in ("hippopotamus", "astronaut", "skateboard"):
        start = caption.index(word)
        pos = clip_token_positions(caption, (start, start + len(word)))
        assert [ids[p] for p in pos] == tok.encode(word)
    hippo = caption.index("hippopotamus")
    assert len(clip_token_positions(caption, (hippo, hippo + 12))) > 1  # a word BPE splits
    with pytest.raises(ValueError, match="word boundaries"):
        clip_token_positions(caption, (hippo + 2, hippo + 12))


def test_overlapping_masks_survive(tmp_path):
    rec, masks = photo_record("coffee")  # cup, saucer and spoon overlap
    overlap = masks[0] & masks[1]
    assert overlap.sum() > 1000
    with ShardWriter(tmp_path, "s") as w:
        w.write(rec)
    (r,) = list(RecordReader(tmp_path))
    assert (r.masks[0] & r.masks[1]).sum() == overlap.sum()
    np.testing.assert_array_equal(r.masks[1], masks[1])
    # Quality fields are derived from boxes and masks on write.
    o = r.objects[0]
    assert o.containment > 0 and 0 < o.mask_fill <= 1 and o.area == pytest.approx(0.6 * 0.65, rel=1e-6)


def test_invalid_records_are_refused_with_the_field_named(tmp_path):
    rec, _ = photo_record("chelsea")
    rec.objects[0].box = [0.5, 0.1, 1.2, 0.9]
    with pytest.raises(RecordError, match=r"objects\[0\].*box"):
        with ShardWriter(tmp_path, "bad") as w:
            w.write(rec)
    rec, _ = photo_record("chelsea")
    rec.objects[1].span = [0, 3]
    with pytest.raises(RecordError, match="not the phrase"):
        with ShardWriter(tmp_path, "bad") as w:
            w.write(rec)
    with pytest.raises(RecordError, match="key"):
        with ShardWriter(tmp_path, "bad") as w:
            w.write(Record(**{**photo_record("chelsea")[0].__dict__, "key": "a.b"}))
    assert list(tmp_path.iterdir()) == []  # every aborted shard left nothing behind


def test_interrupted_write_leaves_no_visible_shard(tmp_path):
    # A process killed mid-shard: only temporary files remain, never a final name.
    script = f"""
import os
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.photo_records import photo_record
w = ShardWriter({str(tmp_path)!r}, "00007")
w.write(photo_record("astronaut")[0])
w._part_file(0).flush()
os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert proc.returncode == 9
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names and all(n.endswith(".tmp") for n in names), names
    assert complete_shards(tmp_path) == []
    assert catalog.build(tmp_path).added == []
    with pytest.raises(FileNotFoundError, match="no complete shards"):
        RecordReader(tmp_path)


def test_catalog_tables_account_for_every_sample(shards):
    out, keys = shards
    assert catalog.query(out, "SELECT key FROM samples ORDER BY key").column("key").to_pylist() == sorted(keys)
    names = list(PHOTOS)
    n_obj = sum(len(PHOTOS[names[i % len(names)]][1]) for i in range(12))  # 12 records cycle over the photos
    assert catalog.query(out, "SELECT count(*) AS n FROM objects").column("n")[0].as_py() == n_obj
    shards_t = catalog.query(out, "SELECT name, n_ok, n_failed FROM shards ORDER BY name").to_pylist()
    assert shards_t == [{"name": f"{i:05d}", "n_ok": 4, "n_failed": 1} for i in range(3)]
    fails = catalog.query(out, "SELECT shard, stage, reason FROM failures ORDER BY shard").to_pylist()
    assert [f["stage"] for f in fails] == ["decode"] * 3
    tokens = catalog.query(out, "SELECT tokens FROM objects WHERE label = 'hippopotamus' LIMIT 1")
    assert len(tokens.column("tokens")[0].as_py()) == 3


def test_catalog_build_is_incremental_and_idempotent(tmp_path):
    write_photo_shards(tmp_path, n_shards=2, per_shard=2)
    first = catalog.build(tmp_path)
    assert first.added == ["00000", "00001"]
    dump = lambda: {
        t: catalog.query(tmp_path, f"SELECT * FROM {t} ORDER BY ALL").to_pylist()
        for t in ("samples", "objects", "shards", "failures")
    }
    before = dump()
    again = catalog.build(tmp_path)
    assert (again.added, again.removed, again.unchanged) == ([], [], 2)
    assert dump() == before
    # A new shard is picked up; the others are not reloaded.
    with ShardWriter(tmp_path, "00002") as w:
        w.write(photo_record("rocket", source="new://rocket")[0])
    third = catalog.build(tmp_path)
    assert (third.added, third.unchanged) == (["00002"], 2)
    assert catalog.query(tmp_path, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 5
    # A shard that disappears is dropped, with all its rows.
    for p in tmp_path.glob("00000*"):
        p.unlink()
    fourth = catalog.build(tmp_path)
    assert fourth.removed == ["00000"]
    n = catalog.query(tmp_path, "SELECT count(*) AS n FROM objects WHERE shard = '00000'").column("n")[0].as_py()
    assert n == 0


def test_duckdb_settings_from_the_environment_reach_every_catalog_connection(shards, tmp_path, monkeypatch):
    """SUBJECTDIFF_DUCKDB_MEMORY_LIMIT / _TEMP_DIRECTORY / _THREADS are what a user sets for a catalog of 100M
    objects (docs/records.md): every query sees them."""
    out, _ = shards
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_MEMORY_LIMIT", "1GB")
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_TEMP_DIRECTORY", str(tmp_path / "spill"))
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_THREADS", "3")
    got = catalog.query(
        out,
        "SELECT current_setting('memory_limit') AS m, current_setting('temp_directory') AS t, "
        "current_setting('threads') AS n",
    ).to_pylist()[0]
    assert got["m"] == "953.6 MiB" and got["t"] == str(tmp_path / "spill"), got  # 1 GB = 10^9 bytes
    assert int(got["n"]) == 3


def test_sample_ids_are_dense_never_reused_and_grouped_without_hashing(tmp_path, monkeypatch):
    """sample_id numbers a catalog's samples from 0, a shard's from where the shards loaded before it stopped
    (`first_id` + idx; a failed sample keeps its idx's id unused); a shard loaded later never takes the ids of
    one dropped. Because they are dense, every catalog connection lets DuckDB group by sample_id with a directly
    indexed table (a per-sample GROUP BY over 100M objects: 2.2 s instead of 6.5), unless its threads' tables would
    not fit in a quarter of the memory limit; the answer is the same either way."""
    bench = load_benchmark("catalog")
    bench.write_synthetic(tmp_path, 6000, per_shard=1500, per_sample=1)  # 4 shards of 1,500 (+15 failed)
    catalog.build(tmp_path)
    sql = lambda q: catalog.query(tmp_path, q).to_pylist()
    shards_t = sql("SELECT name, first_id, n_ok + n_failed AS n FROM shards ORDER BY name")
    assert [r["first_id"] for r in shards_t] == [0, 1515, 3030, 4545]
    assert (
        sql("SELECT count(*) AS n FROM samples JOIN shards ON shard = name WHERE sample_id != first_id + idx")[0]["n"]
        == 0
    )
    assert sql("SELECT count(DISTINCT sample_id) AS n, max(sample_id) AS hi FROM samples")[0] == {"n": 6000, "hi": 6044}
    group = "SELECT sample_id, count(*) AS n FROM objects WHERE score > 0.5 GROUP BY sample_id ORDER BY sample_id"
    plan = lambda: " ".join(r["explain_value"] for r in sql("EXPLAIN " + group))
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_MEMORY_LIMIT", "20MB")
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_THREADS", "2")  # 2 x 48 B x 2^13 ids: 0.8 MB, under 5 MB
    assert "Perfect Hash" in plan()
    fast = sql(group)
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_THREADS", "16")  # 6.3 MB: over a quarter of the limit
    assert "Perfect Hash" not in plan()
    assert sql(group) == fast and len(fast) > 2000
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_THREADS", "2")
    monkeypatch.setenv("SUBJECTDIFF_DUCKDB_PERFECT_HT_THRESHOLD", "12")  # the user's choice wins: DuckDB's default
    assert "Perfect Hash" not in plan()
    monkeypatch.delenv("SUBJECTDIFF_DUCKDB_PERFECT_HT_THRESHOLD")
    monkeypatch.delenv("SUBJECTDIFF_DUCKDB_MEMORY_LIMIT")
    monkeypatch.delenv("SUBJECTDIFF_DUCKDB_THREADS")
    # The last shard dropped, a new one loaded: it takes ids after the dropped shard's, not its.
    for p in tmp_path.glob("00003*"):
        p.unlink()
    (tmp_path / "extra").mkdir()
    bench.write_synthetic(tmp_path / "extra", 100, per_shard=100, per_sample=1)
    for p in (tmp_path / "extra").glob("00000*"):
        p.rename(tmp_path / p.name.replace("00000", "00009"))
    report = catalog.build(tmp_path)
    assert (report.added, report.removed) == (["00009"], ["00003"])
    assert sql("SELECT first_id FROM shards WHERE name = '00009'") == [{"first_id": 6060}]


def test_bad_sql_and_writes_fail_with_one_line(shards):
    out, _ = shards
    for sql in (
        "SELEC key FROM samples",
        "SELECT nope FROM samples",
        "DROP TABLE samples",
        "DELETE FROM samples",
        "INSERT INTO shards VALUES ('x')",
        "COPY samples TO '/tmp/steal.csv'",
        "ATTACH '/tmp/other.duckdb'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT 1; DROP TABLE samples",
    ):
        proc = cli("catalog", "query", str(out), sql)
        assert proc.returncode != 0, sql
        assert "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("subjectdiff catalog: error:")
    assert catalog.query(out, "SELECT count(*) AS n FROM samples").column("n")[0].as_py() == 12
    proc = cli("catalog", "query", str(out / "nowhere"), "SELECT 1")
    assert proc.returncode != 0 and "catalog build" in proc.stderr and "Traceback" not in proc.stderr


def test_query_formats(shards):
    out, keys = shards
    sql = "SELECT key, n_objects FROM samples ORDER BY key"
    table = cli("catalog", "query", str(out), sql, check=True).stdout
    assert table.splitlines()[0].split() == ["key", "n_objects"] and "(12 rows)" in table
    csv = cli("catalog", "query", str(out), sql, "--format", "csv", check=True).stdout.splitlines()
    assert csv[0] == '"key","n_objects"' and len(csv) == 13
    rows = json.loads(cli("catalog", "query", str(out), sql, "--format", "json", check=True).stdout)
    assert [r["key"] for r in rows] == sorted(keys)


def test_stats_reports_counts_labels_and_failures(shards):
    out, _ = shards
    st = catalog.stats(out)
    assert (st["shards"], st["samples"], st["failed"]) == (3, 12, 3)
    assert sum(b["count"] for b in st["score"]["histogram"]) == st["objects"]
    assert sum(b["count"] for b in st["area"]["histogram"]) == st["objects"]
    assert st["failures_by_reason"] == [("decode", "cannot identify image file", 3)]
    text = cli("catalog", "stats", str(out), check=True).stdout
    assert "samples 12" in text and "cannot identify image file" in text and "astronaut" in text


def test_selection_reader_yields_exactly_the_selected_keys(shards, tmp_path):
    out, _ = shards
    where = "shard <> '00000' AND key IN (SELECT key FROM objects WHERE label = 'cat' OR label = 'rocket')"
    sel = tmp_path / "sel.parquet"
    proc = cli("catalog", "select", str(out), "--where", where, "--out", str(sel), check=True)
    want = set(catalog.query(out, f"SELECT key FROM samples WHERE {where}").column("key").to_pylist())
    assert want and f"selected {len(want)}" in proc.stdout
    assert set(pq.read_table(sel).column("key").to_pylist()) == want
    got = [r.key for r in RecordReader(selection=sel)]
    assert sorted(got) == sorted(want)
    # Shards holding no selected key are not even opened.
    assert set(load_selection(sel)) < set(catalog.query(out, "SELECT path FROM shards").column("path").to_pylist())
    bad = cli("catalog", "select", str(out), "--where", "nonsense_column > 1", "--out", str(tmp_path / "x.parquet"))
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_reader_splits_ranks_and_workers_disjointly(shards, split):
    out, keys = shards
    seen = []
    for rank in range(2):
        reader = RecordReader(out, rank=rank, world_size=2, split=split, decode_image=False, decode_masks=False)
        loader = __import__("torch").utils.data.DataLoader(reader, batch_size=None, num_workers=2)
        seen.append([r.key for r in loader])
    assert not set(seen[0]) & set(seen[1])
    if split == "sample":  # every reader scans everything and keeps every 4th sample
        assert sorted(seen[0] + seen[1]) == sorted(keys)
    else:  # 3 shards over 4 readers: whole shards, some readers idle; nothing read twice
        assert len(seen[0]) + len(seen[1]) == len(set(seen[0]) | set(seen[1])) <= len(keys)
    auto = [
        [r.key for r in RecordReader(out, rank=k, world_size=3, decode_image=False, decode_masks=False)]
        for k in range(3)
    ]
    assert sorted(sum(auto, [])) == sorted(keys) and all(len(a) == 4 for a in auto)


def test_failures_are_data_and_keys_are_stable(tmp_path):
    assert make_key("s3://bucket/a.jpg") == make_key("s3://bucket/a.jpg") != make_key("s3://bucket/b.jpg")
    for bad in ("Not a stage", "", "x" * 33, "ground;drop"):
        with pytest.raises(RecordError, match="stage"):
            Failure(key="k", source="x", stage=bad, reason="r")
    Failure(key="k", source="x", stage="nsfw_filter", reason="r")  # a registered stage's own name is a stage
    with ShardWriter(tmp_path, "f") as w:
        w.fail(Failure(key=make_key("x"), source="x", stage="ground", reason="no detection"))
        with pytest.raises(RecordError, match="twice"):
            w.fail(Failure(key=make_key("x"), source="x", stage="ground", reason="no detection"))
    stats = json.loads((tmp_path / "f_stats.json").read_text())
    assert stats["failed"] == 1 and stats["failures_by_reason"] == {"no detection": 1}
    with tarfile.open(tmp_path / "f.tar") as tf:
        assert tf.getnames() == []


def test_object_from_arrays_refuses_stacked_masks():
    h, w = 20, 30
    m = ellipse_mask(h, w, [0.1, 0.1, 0.9, 0.9])
    with pytest.raises(ValueError, match="one"):
        object_from_arrays(
            label="x",
            phrase="x",
            span=[0, 1],
            tokens=[1],
            box=[0, 0, 1, 1],
            score=1,
            mask=np.stack([m, m]),
            mask_score=1,
        )
