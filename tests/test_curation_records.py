"""Curation signals through the data contract (issue #13): records carry them, shards store them (sidecar columns
and the embedding sidecar), retries carry them over, the catalog loads them (NULL for older shards, a catalog of
an older version rebuilt), and `catalog select` deduplicates and excludes held-out images with them.

Hand-made records on real photos (subjectdiff/photo_records.py), with signals computed as the curate stage computes the
hashes and with fixed scores: no model runs here (tests/test_curation_pipeline.py runs the stage end to end).
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from subjectdiff.catalogs import catalog, duplicates
from subjectdiff.catalogs.catalog import CatalogError
from subjectdiff.catalogs.embeddings import read_embeddings
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import SCHEMA_VERSION, Failure, Record, RecordError, make_key
from subjectdiff.catalogs.selection import select
from subjectdiff.catalogs.writer import ShardWriter, complete_shards
from subjectdiff.cli import main
from subjectdiff.photo_records import photo, photo_record
from tests.planted import DIM, curated, write_planted


def keys(*sources: str) -> list[str]:
    return sorted(make_key(s) for s in sources)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, Record]]:
    out = tmp_path_factory.mktemp("planted")
    recs = write_planted(out)
    catalog.build(out)
    return out, recs


# ------------------------------------------------------------------------------------------------- shards


def test_shards_store_the_signals_and_the_embeddings_in_record_order(planted):
    out, recs = planted
    rows = pq.read_table(out / "00000.samples.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["sha256"] for r in ok] == [recs[r["source"]].sha256 for r in ok]
    assert [r["phash"] for r in ok] == [recs[r["source"]].phash for r in ok]
    assert ok[0]["clip_score"] == pytest.approx(0.25) and ok[0]["aesthetic"] == pytest.approx(5.0)
    failed = rows[2]
    assert all(failed[c] is None for c in ("sha256", "phash", "clip_score", "alt_clip_score", "aesthetic"))
    objs = pq.read_table(out / "00000.objects.parquet").to_pylist()
    assert [(o["label_rank"], round(o["label_score"], 4)) for o in objs[:3]] == [(1, 0.3), (2, 0.25), (3, 0.2)]
    # the embedding sidecar: one row per ok sample, in the tar's order, float16 of the record's embedding
    got_keys, vectors, meta = read_embeddings(out / "00000.clip.parquet")
    tar_keys = [r.key for r in RecordReader(str(out / "00000.tar"), decode_image=False, decode_masks=False)]
    assert got_keys == tar_keys == [r["key"] for r in ok]
    for k, v in zip(got_keys, vectors):
        rec = next(r for r in recs.values() if r.key == k)
        assert np.array_equal(v, rec.clip_embedding.astype(np.float16))
    assert meta == {"model": "test", "pretrained": None, "dim": DIM, "normalized": True}
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["files"]["embeddings"] == (out / "00000.clip.parquet").stat().st_size
    # the record's JSON carries the signals (the embedding only in the sidecar)
    meta0 = next(iter(RecordReader(str(out / "00000.tar"), decode_image=False, decode_masks=False))).meta
    assert (
        meta0["schema_version"] == SCHEMA_VERSION
        and meta0["sha256"] == ok[0]["sha256"]
        and "clip_embedding" not in meta0
    )
    assert meta0["objects"][0]["label_rank"] == 1


def test_same_records_give_the_same_bytes_and_a_shard_without_embeddings_is_complete(planted, tmp_path):
    out, _ = planted
    write_planted(tmp_path)
    for name in ("00000.tar", "00000.samples.parquet", "00000.objects.parquet", "00000.clip.parquet"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    plain = tmp_path / "plain"
    with ShardWriter(plain, "00000") as w:
        w.write(photo_record("hubble_deep_field")[0])
    assert complete_shards(plain) == ["00000"] and not (plain / "00000.clip.parquet").exists()
    row = pq.read_table(plain / "00000.samples.parquet").to_pylist()[0]
    assert row["sha256"] is None and row["clip_score"] is None


def test_signals_that_break_the_contract_are_refused(tmp_path):
    rec = curated("hubble_deep_field", "x/1")
    rec.sha256 = "ABC"
    with pytest.raises(RecordError, match="sha256"):
        with ShardWriter(tmp_path, "bad") as w:
            w.write(rec)
    rec = curated("hubble_deep_field", "x/1")
    rec.objects[0].label_rank = 0
    with pytest.raises(RecordError, match=r"objects\[0\].*label_rank"):
        with ShardWriter(tmp_path, "bad") as w:
            w.write(rec)
    with pytest.raises(RecordError, match="dimensions"):  # one model per shard
        with ShardWriter(tmp_path, "bad") as w:
            w.write(curated("hubble_deep_field", "x/1"))
            other = curated("hubble_deep_field", "x/2")
            other.clip_embedding = np.ones(DIM * 2, np.float32) / 4
            w.write(other)
    assert list(tmp_path.iterdir()) == []


def test_a_retried_shard_carries_the_kept_records_embeddings_over(tmp_path):
    from subjectdiff.datagen.committer import carry_over

    out = tmp_path / "out"
    recs = [curated(n, f"s/{n}", seed=i) for i, n in enumerate(("astronaut", "chelsea", "coffee"))]
    with ShardWriter(out, "00000", embedding_meta={"model": "test"}) as w:
        for r in recs[:2]:
            w.write(r)
        w.fail(Failure(recs[2].key, recs[2].source, "read", "connection reset"))
    before = read_embeddings(out / "00000.clip.parquet")
    order = [r.key for r in recs]
    w = ShardWriter(out, "00000", embedding_meta={"model": "test"}, replace=True)
    carry_over(w, str(out), "00000", order, {recs[2].key})
    w.write(recs[2], part=2)
    w.close()
    got_keys, vectors, _ = read_embeddings(out / "00000.clip.parquet")
    assert got_keys == order  # the redone record in its plan position
    assert np.array_equal(vectors[:2], before[1])  # kept records' embeddings, unchanged
    assert np.array_equal(vectors[2], recs[2].clip_embedding.astype(np.float16))
    assert pq.read_table(out / "00000.samples.parquet").column("sha256").to_pylist() == [r.sha256 for r in recs]


def test_a_retry_of_a_shard_written_before_the_curation_columns_keeps_it_loadable(tmp_path):
    """Sidecars of an older writer lack the new columns: carried over, their rows get NULLs there."""
    from subjectdiff.datagen.committer import carry_over

    out = tmp_path / "old"
    recs = [photo_record(n, source=f"o/{n}")[0] for n in ("astronaut", "hubble_deep_field")]
    with ShardWriter(out, "00000") as w:
        w.write(recs[0])
        w.fail(Failure(recs[1].key, recs[1].source, "read", "timeout"))
    _drop_new_columns(out, "00000")
    w = ShardWriter(out, "00000", replace=True)
    carry_over(w, str(out), "00000", [r.key for r in recs], {recs[1].key})
    w.write(recs[1], part=1)
    w.close()
    rows = pq.read_table(out / "00000.samples.parquet").to_pylist()
    assert [r["key"] for r in rows] == [r.key for r in recs] and rows[0]["sha256"] is None
    assert not (out / "00000.parquet").exists()  # the rewritten shard has the current names only


def _drop_new_columns(out: Path, shard: str) -> None:
    """Rewrite a shard's sidecars as the writer before the curation columns wrote them, under the names it gave
    them (the samples sidecar was NAME.parquet before issue #19), and fix its stats."""
    new = {"sha256", "phash", "clip_score", "alt_clip_score", "aesthetic", "label_score", "label_rank"}
    (out / f"{shard}.samples.parquet").rename(out / f"{shard}.parquet")
    for name in (f"{shard}.parquet", f"{shard}.objects.parquet"):
        t = pq.read_table(out / name)
        pq.write_table(t.select([c for c in t.column_names if c not in new]), out / name)
    stats = json.loads((out / f"{shard}_stats.json").read_text())
    for kind, name in (("samples", f"{shard}.parquet"), ("objects", f"{shard}.objects.parquet")):
        stats["files"][kind] = (out / name).stat().st_size
    (out / f"{shard}_stats.json").write_text(json.dumps(stats))


# ------------------------------------------------------------------------------------------------ catalog


def test_catalog_columns_and_plan_order(planted):
    out, recs = planted
    rows = catalog.query(
        out, "SELECT source, shard, idx, sha256, phash, clip_score, aesthetic FROM samples ORDER BY shard, idx"
    ).to_pylist()
    # idx counts the failure too: it is the position in the shard's samples sidecar, i.e. the plan order
    assert [(r["shard"], r["idx"], r["source"]) for r in rows] == [
        ("00000", 0, "orig/astronaut"),
        ("00000", 1, "orig/chelsea"),
        ("00000", 3, "orig/coffee"),
        ("00001", 0, "copy/astronaut"),
        ("00001", 1, "copy/chelsea-q60"),
        ("00001", 2, "orig/rocket"),
    ]
    assert all(r["sha256"] == recs[r["source"]].sha256 and r["phash"] == recs[r["source"]].phash for r in rows)
    assert catalog.query(out, "SELECT idx FROM failures").column("idx").to_pylist() == [2]
    objs = catalog.query(out, "SELECT count(*) n, min(label_rank) lo, max(label_score) hi FROM objects").to_pylist()[0]
    assert objs["lo"] == 1 and objs["hi"] == pytest.approx(0.3)


def test_stats_report_the_signals_and_exact_duplicates(planted, capsys):
    out, recs = planted
    st = catalog.stats(out)["curation"]
    hashes = [r.sha256 for r in recs.values()]
    assert st["exact_duplicates"] == len(hashes) - len(set(hashes)) >= 1
    clip = [r.clip_score for r in recs.values()]
    assert st["clip_score"]["n"] == len(clip)
    assert st["clip_score"]["min"] == pytest.approx(min(clip)) and st["clip_score"]["max"] == pytest.approx(max(clip))
    labels = [o.label_score for r in recs.values() for o in r.objects]
    assert st["label_score"]["n"] == len(labels) and st["label_score"]["mean"] == pytest.approx(
        np.mean(labels), abs=1e-5
    )
    assert main(["catalog", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"exact duplicates {st['exact_duplicates']}" in text and "label_score" in text


def test_old_sidecars_load_as_nulls_and_an_old_catalog_is_rebuilt(tmp_path):
    out = tmp_path / "mixed"
    with ShardWriter(out, "00000") as w:
        w.write(photo_record("hubble_deep_field", source="old/coins")[0])
    _drop_new_columns(out, "00000")
    with ShardWriter(out, "00001") as w:
        w.write(curated("rocket", "new/rocket"))
    assert sorted(catalog.build(out).added) == ["00000", "00001"]
    rows = catalog.query(out, "SELECT source, sha256 IS NULL AS missing FROM samples ORDER BY source").to_pylist()
    assert rows == [{"source": "new/rocket", "missing": False}, {"source": "old/coins", "missing": True}]
    assert catalog.query(out, "SELECT count(label_score) n FROM objects WHERE shard = '00000'").to_pylist() == [
        {"n": 0}
    ]

    # a catalog made by version 1 (no idx, no curation columns) is dropped and built again
    db = out / "catalog.duckdb"
    db.unlink()
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE samples (key VARCHAR, shard VARCHAR, caption VARCHAR)")
    con.execute(
        "CREATE TABLE shards (name VARCHAR PRIMARY KEY, path VARCHAR, n_ok INTEGER, n_failed INTEGER, "
        "n_objects INTEGER, bytes BIGINT, start_time DOUBLE, end_time DOUBLE, duration DOUBLE, "
        "fingerprint VARCHAR)"
    )
    con.execute("CREATE TABLE catalog_info (name VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO catalog_info VALUES ('catalog_version', '1')")
    con.close()
    report = catalog.build(out)
    assert sorted(report.added) == ["00000", "00001"]
    assert catalog.query(out, "SELECT count(phash) n FROM samples").to_pylist() == [{"n": 1}]
    assert catalog.query(out, "SELECT value FROM catalog_info WHERE name = 'catalog_version'").to_pylist() == [
        {"value": str(catalog.CATALOG_VERSION)}
    ]
    assert catalog.build(out).added == []  # and then incremental again


# ------------------------------------------------------------------------------------------------- select


def _selected(path: Path) -> tuple[list[str], dict]:
    t = pq.read_table(path)
    return sorted(t.column("key").to_pylist()), json.loads(t.schema.metadata[b"subjectdiff.selection"])


def test_select_dedup_keeps_the_first_in_plan_order(planted, tmp_path):
    out, _ = planted
    everything = keys(
        "orig/astronaut", "orig/chelsea", "orig/coffee", "copy/astronaut", "copy/chelsea-q60", "orig/rocket"
    )
    sel = tmp_path / "sel.parquet"
    assert select(out, None, sel, dedup="exact") == 5
    got, meta = _selected(sel)
    assert got == sorted(set(everything) - set(keys("copy/astronaut")))
    assert meta["dedup"] == "exact" and meta["dropped"] == {"duplicates": 1}
    assert select(out, None, sel, dedup="near") == 4
    got, meta = _selected(sel)
    assert got == keys("orig/astronaut", "orig/chelsea", "orig/coffee", "orig/rocket")
    assert meta["max_distance"] == duplicates.DEFAULT_MAX_DISTANCE and meta["dropped"] == {"duplicates": 2}
    # a selection without a group's first member keeps its first selected member
    assert select(out, "source NOT LIKE 'orig/chelsea'", sel, dedup="near") == 4
    assert make_key("copy/chelsea-q60") in _selected(sel)[0]
    # groups from a `catalog duplicates` file: at distance 0 only byte copies and identical hashes are grouped
    dups = tmp_path / "dups.parquet"
    groups = duplicates.find_duplicates(out, dups, max_distance=0)
    assert pq.read_schema(dups).metadata[b"subjectdiff.duplicates"]
    firsts = [r["source"] for r in groups.to_pylist() if r["distance"] == 0]
    assert "orig/astronaut" in firsts
    n = select(out, None, sel, dedup="near", dups=dups)
    assert n == 6 - (groups.num_rows - len(set(groups.column("group_id").to_pylist())))
    assert _selected(sel)[1]["dups"] == str(dups)


def test_select_exclude_near_drops_copies_of_held_out_images(planted, tmp_path):
    out, _ = planted
    held = tmp_path / "dreambench" / "cat"
    held.mkdir(parents=True)
    Image.fromarray(photo("chelsea")).resize((200, 150), Image.BICUBIC).save(held / "00.png")
    sel = tmp_path / "sel.parquet"
    assert select(out, None, sel, exclude_near=tmp_path / "dreambench") == 4
    got, meta = _selected(sel)
    assert got == keys("orig/astronaut", "orig/coffee", "copy/astronaut", "orig/rocket")
    assert meta["exclude_near"] == str(tmp_path / "dreambench") and meta["dropped"] == {"near_held_out": 2}
    # both at once: the held-out copies go first, then one per duplicate group
    assert select(out, "n_objects > 0", sel, dedup="near", exclude_near=tmp_path / "dreambench") == 3
    assert _selected(sel)[0] == keys("orig/astronaut", "orig/coffee", "orig/rocket")


def test_select_options_fail_with_one_line(planted, tmp_path):
    out, _ = planted
    sel = tmp_path / "sel.parquet"
    with pytest.raises(CatalogError, match="--dups .* --dedup near"):
        select(out, None, sel, dedup="exact", dups=tmp_path / "x.parquet")
    with pytest.raises(CatalogError, match="exact.*near"):
        select(out, None, sel, dedup="fuzzy")
    plain = tmp_path / "plain"
    with ShardWriter(plain, "00000") as w:
        w.write(photo_record("hubble_deep_field")[0])
    catalog.build(plain)
    with pytest.raises(CatalogError, match="without the curate stage"):
        select(plain, None, sel, dedup="near")
    with pytest.raises(CatalogError, match="not a folder of images"):
        select(out, None, sel, exclude_near=tmp_path / "missing")


# ------------------------------------------------------------------------------------------------- config


def test_curate_off_starts_no_pool_and_keeps_the_fingerprint_of_the_other_settings():
    from subjectdiff.datagen.job import active_stages, preset
    from subjectdiff.datagen.plan import stages_fingerprint
    from subjectdiff.datagen.stages import registry

    STAGES, MODEL_STAGES = registry.names(), registry.names(model=True)
    job = preset("default")
    assert STAGES[-3:] == ("segment", "identity", "curate") and list(job.stage_pools()) == list(MODEL_STAGES)
    assert sum(p.num_gpus for p in job.stage_pools().values()) == pytest.approx(1.0)  # one GPU holds them all
    on = stages_fingerprint(job.stages)
    job.stages.curate.enabled = False
    assert active_stages(job.stages) == ("caption", "nouns", "ground", "filter", "segment", "identity")
    assert "curate" not in job.stage_pools()
    job.pipeline.fuse = True
    assert job.stage_pools()["fused"].num_gpus == pytest.approx(0.95)  # the pools of the stages that run
    off = stages_fingerprint(job.stages)
    job.stages.curate.model = "ViT-B-32"  # a setting of a stage that does not run shapes no record
    assert stages_fingerprint(job.stages) == off != on
