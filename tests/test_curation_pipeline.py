"""Issue #13 end to end: `datagen run` with the tiny preset (its curate stage: a tiny random open_clip and an
aesthetic head in the official format) over real photos with planted duplicates, then the catalog, `catalog
duplicates` and `catalog select --dedup / --exclude-near` from the command line.

The input folder holds the six bundled photos (1-orig/), an exact copy of the astronaut, the rocket resized
to 2/3 and re-encoded, the cat photo cropped 3 % off each side (2-copy/), and an unrelated photo (3-other/):
plan order is sorted paths, so each original comes before its copies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from subjectdiff.catalogs import catalog, duplicates, hashing
from subjectdiff.catalogs.embeddings import read_embeddings
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import make_key
from subjectdiff.cli import main
from subjectdiff.datagen.job import preset
from subjectdiff.datagen.run import run
from tests.planted import crop_sides, jpeg, planted

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]

LAYOUT = {"orig/": "1-orig/", "copy/": "2-copy/", "other/": "3-other/"}
COPIES = {
    "2-copy/astronaut-exact.jpg": "1-orig/astronaut.jpg",
    "2-copy/rocket-resized.jpg": "1-orig/rocket.jpg",
    "2-copy/chelsea-cropped.jpg": "1-orig/chelsea.jpg",
}


@pytest.fixture(scope="module")
def curated_run(tmp_path_factory):
    src = tmp_path_factory.mktemp("photos")
    for name, data in planted().items():
        for old, new in LAYOUT.items():
            name = name.replace(old, new)
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    cfg = preset("tiny")
    cfg.pipeline.shard_size = 5
    cfg.pipeline.fuse = True  # one actor loads the models (the signals, not the pools, are tested here)
    out = tmp_path_factory.mktemp("out")
    summary = run(str(src), out, cfg, progress_every=60)
    assert summary.incomplete == [] and summary.failed == 0, "every planted photo must become a record"
    return src, out, cfg


def src_key(src: Path, rel: str) -> str:
    return make_key(str(src / rel))


def test_the_catalog_holds_every_signal(curated_run):
    src, out, _ = curated_run
    rows = catalog.query(out, "SELECT * FROM samples ORDER BY shard, idx").to_pylist()
    assert len(rows) == 10
    for r in rows:
        data = Path(r["source"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert r["phash"] == hashing.hash_image_file(r["source"])
        assert r["clip_score"] is not None and r["aesthetic"] is not None
        assert r["alt_clip_score"] is None  # a folder of images has no alt text
    objs = catalog.query(out, "SELECT label_score, label_rank FROM objects").to_pylist()
    assert objs and all(o["label_score"] is not None and o["label_rank"] >= 1 for o in objs)
    # each shard's embedding sidecar: one row per record, in the tar's order, listed in its stats
    for shard in ("00000", "00001"):
        keys, vectors, meta = read_embeddings(out / f"{shard}.clip.parquet")
        tar = [r.key for r in RecordReader(str(out / f"{shard}.tar"), decode_image=False, decode_masks=False)]
        assert keys == tar and vectors.shape == (len(tar), 32) and meta["model"] == "subjectdiff-tiny-clip"
        np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
        stats = json.loads((out / f"{shard}_stats.json").read_text())
        assert stats["files"]["embeddings"] == (out / f"{shard}.clip.parquet").stat().st_size
    # the manifest names the curate stage's files with their hashes
    curate = json.loads((out / "manifest.json").read_text())["models"]["curate"]
    assert all(len(curate[k]["sha256"]) == 64 for k in ("model", "weights", "aesthetic"))


def test_catalog_values_equal_the_stage_run_directly(curated_run, one_thread):
    """The records' own inputs (image bytes, caption, nouns, masks) through a Curator built here: the scores
    the catalog holds are the stage's, and the sidecar holds its embeddings."""
    from subjectdiff.datagen.stages.common import decode_item
    from subjectdiff.datagen.stages.curate import Curator

    _, out, cfg = curated_run
    stage = Curator(cfg.stages.curate)
    scores = {r["key"]: r for r in catalog.query(out, "SELECT * FROM samples").to_pylist()}
    objects = catalog.query(out, 'SELECT key, "index", label_score, label_rank FROM objects').to_pylist()
    label_scores = {(o["key"], o["index"]): (o["label_score"], o["label_rank"]) for o in objects}
    vectors = {}
    for shard in ("00000", "00001"):
        keys, v, _ = read_embeddings(out / f"{shard}.clip.parquet")
        vectors.update(zip(keys, v))
    for rec in RecordReader(out, decode_image=False, decode_masks=False):
        item = decode_item(rec.meta["source"], rec.image_bytes)
        labels = list(dict.fromkeys(o["label"] for o in rec.meta["objects"]))
        item["caption"] = rec.meta["caption"]
        item["nouns"] = [{"label": lb} for lb in labels]
        item["detections"] = [{"noun": labels.index(o["label"])} for o in rec.meta["objects"]]
        item["masks"] = [o["mask"] for o in rec.meta["objects"]]
        (direct,) = stage([item])
        row = scores[rec.key]
        assert row["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-5)
        assert row["aesthetic"] == pytest.approx(direct["aesthetic"], abs=1e-5)
        assert rec.meta["clip_score"] == pytest.approx(direct["clip_score"], abs=1e-5)  # the record's JSON too
        for i, det in enumerate(direct["detections"]):
            assert label_scores[(rec.key, i)][0] == pytest.approx(det["label_score"], abs=1e-5)
            assert label_scores[(rec.key, i)][1] == det["label_rank"]
        np.testing.assert_allclose(
            vectors[rec.key].astype(np.float32), direct["clip_embedding"].astype(np.float32), atol=2e-3
        )


def test_catalog_duplicates_finds_the_planted_groups(curated_run, tmp_path, capsys):
    src, out, _ = curated_run
    dups = tmp_path / "dups.parquet"
    assert main(["catalog", "duplicates", str(out), "--out", str(dups)]) == 0
    assert "3 duplicate group(s) (1 exact, 2 near)" in capsys.readouterr().out
    rows = pq.read_table(dups).to_pylist()
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group_id"], []).append(r)
    rel = lambda r: str(Path(r["source"]).relative_to(src))
    got = sorted([rel(r) for r in g] for g in groups.values())
    assert got == sorted([orig, copy] for copy, orig in COPIES.items())  # each original first, in plan order
    kinds = {rel(r): r["kind"] for r in rows}
    assert kinds["2-copy/astronaut-exact.jpg"] == "exact" and kinds["2-copy/rocket-resized.jpg"] == "near"
    assert "3-other/camera.jpg" not in kinds  # the unrelated photo is in no group
    meta = json.loads(pq.read_schema(dups).metadata[b"subjectdiff.duplicates"])
    assert meta["max_distance"] == duplicates.DEFAULT_MAX_DISTANCE and meta["order_by"] == catalog.PLAN_ORDER


def test_select_dedup_near_keeps_one_per_group(curated_run, tmp_path, capsys):
    src, out, _ = curated_run
    sel = tmp_path / "sel.parquet"
    assert main(["catalog", "select", str(out), "--dedup", "near", "--out", str(sel)]) == 0
    t = pq.read_table(sel)
    kept = set(t.column("key").to_pylist())
    assert len(kept) == 7 and not kept & {src_key(src, c) for c in COPIES}
    assert {src_key(src, o) for o in COPIES.values()} <= kept
    meta = json.loads(t.schema.metadata[b"subjectdiff.selection"])
    assert meta["dedup"] == "near" and meta["dropped"] == {"duplicates": 3}
    assert main(["catalog", "select", str(out), "--dedup", "exact", "--out", str(sel)]) == 0
    assert src_key(src, "2-copy/astronaut-exact.jpg") not in pq.read_table(sel).column("key").to_pylist()
    assert pq.read_table(sel).num_rows == 9


def test_select_exclude_near_removes_the_copies_of_a_held_out_folder(curated_run, tmp_path):
    from skimage import data

    src, out, _ = curated_run
    held = tmp_path / "dreambench"
    for sub in ("astronaut", "cat", "moon"):
        (held / sub).mkdir(parents=True)
    astro = Image.open(src / "1-orig/astronaut.jpg").convert("RGB")
    chelsea = Image.open(src / "1-orig/chelsea.jpg").convert("RGB")
    astro.resize((300, 300), Image.BICUBIC).save(held / "astronaut" / "00.png")
    (held / "cat" / "00.jpg").write_bytes(jpeg(crop_sides(chelsea, 0.02), quality=80))
    Image.fromarray(data.moon()).convert("RGB").save(held / "moon" / "00.png")  # near nothing of the run
    sel = tmp_path / "sel.parquet"
    assert main(["catalog", "select", str(out), "--exclude-near", str(held), "--out", str(sel)]) == 0
    kept = set(pq.read_table(sel).column("key").to_pylist())
    gone = {
        src_key(src, r)
        for r in (
            "1-orig/astronaut.jpg",
            "2-copy/astronaut-exact.jpg",
            "1-orig/chelsea.jpg",
            "2-copy/chelsea-cropped.jpg",
        )
    }
    assert len(kept) == 6 and not kept & gone
    meta = json.loads(pq.read_schema(sel).metadata[b"subjectdiff.selection"])
    assert meta["exclude_near"] == str(held) and meta["exclude_distance"] == duplicates.DEFAULT_EXCLUDE_DISTANCE
