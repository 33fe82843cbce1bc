"""Issue #20, an identity embedding per object: the identity stage (a tiny seeded DINOv2 in the tiny preset) in
the real pipeline, its sidecar NNNNN.identity.parquet (optional, published atomically, carried over by a retry),
the manifest entry of its model, what the embedding is invariant to, and `read_folder` on a local folder and S3.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st

from subjectdiff.catalogs.identity import SUFFIX, read_identity
from subjectdiff.catalogs.identity_folder import read_folder
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import RecordError, validate
from subjectdiff.catalogs.storage import Folder
from subjectdiff.catalogs.writer import ShardWriter, complete_shards, partial_files
from subjectdiff.datagen.assemble import identity_meta
from subjectdiff.datagen.committer import carry_over
from subjectdiff.datagen.config import IdentityConfig
from subjectdiff.datagen.job import preset
from subjectdiff.datagen.run import run
from subjectdiff.datagen.stages.common import decode_item
from subjectdiff.datagen.stages.identity import Identifier, box_mask, object_crops
from subjectdiff.datagen.tiny import SAMPLE_IMAGES, TINY_DINOV2
from subjectdiff.photo_records import photo, photo_record, write_photo_shards

# the tiny preset pools "cls+mean": two hidden states concatenated
TINY_DIM = 2 * TINY_DINOV2["hidden_size"]

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`datagen run` with the tiny preset over the six bundled photos, three per shard."""
    src = tmp_path_factory.mktemp("photos")
    for p in sorted(SAMPLE_IMAGES.glob("*.jpg")):
        shutil.copy(p, src / p.name)
    cfg = preset("tiny")
    cfg.pipeline.shard_size = 3
    cfg.pipeline.fuse = True  # the stages in one actor: what this module tests is the identity sidecar, not the pools
    out = tmp_path_factory.mktemp("out")
    try:
        summary = run(str(src), out, cfg, progress_every=60)
    finally:
        ray.shutdown()  # the run's Ray, started in this process: later tests start their own
    assert summary.incomplete == [] and summary.ok > 0
    return out, cfg


@pytest.fixture(scope="module")
def identifier():
    """The tiny preset's identity stage (its seeded DINOv2 built into the cache on first use)."""
    return Identifier(preset("tiny").stages.identity)


@pytest.mark.slow  # the module's tiny datagen run: Ray and six tiny models, 1-3 min on a shared 2-core machine
def test_every_object_of_every_record_has_one_row_in_order(tiny_run, identifier, one_thread):
    """Rows = the records' objects, in record and object order, with their labels; unit norm; D from the tiny
    Dinov2Config; equal to the stage run here on the record's own image and masks; listed in the stats."""
    out, cfg = tiny_run
    shards = complete_shards(out)
    assert shards == ["00000", "00001"]
    for shard in shards:
        table, emb, meta = read_identity(out / f"{shard}{SUFFIX}")
        records = list(RecordReader(str(out / f"{shard}.tar"), decode_image=False, decode_masks=False))
        want = [(r.key, i, o["label"]) for r in records for i, o in enumerate(r.meta["objects"])]
        assert list(zip(*(table[c].to_pylist() for c in ("key", "index", "label")))) == want
        assert emb.shape == (len(want), TINY_DIM) and emb.dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert (
            meta["model"] == cfg.stages.identity.model and len(meta["sha256"]) == 64 and meta["pooling"] == "cls+mean"
        )
        stats = json.loads((out / f"{shard}_stats.json").read_text())
        assert stats["files"]["identity"] == (out / f"{shard}{SUFFIX}").stat().st_size
        at = 0
        for r in records:
            item = decode_item(r.meta["source"], r.image_bytes)
            item["detections"] = [{"box": o["box"]} for o in r.meta["objects"]]
            item["masks"] = [o["mask"] for o in r.meta["objects"]]
            (direct,) = identifier([item])
            n = len(r.meta["objects"])
            np.testing.assert_allclose(
                emb[at : at + n].astype(np.float32), direct["identity_embeddings"].astype(np.float32), atol=2e-3
            )
            at += n


@pytest.mark.slow  # the module's tiny datagen run: Ray and six tiny models, 1-3 min on a shared 2-core machine
def test_the_manifest_lists_the_identity_model_with_its_hash(tiny_run):
    out, cfg = tiny_run
    manifest = json.loads((out / "manifest.json").read_text())
    model = manifest["models"]["identity"]
    assert model["spec"] == cfg.stages.identity.model and model["pooling"] == "cls+mean"
    table, _, meta = read_folder(out)
    assert len(model["sha256"]) == 64 and model["sha256"] == meta["sha256"]  # the sidecars name the same file


# ------------------------------------------------------------------------------------------- the sidecar


def colour_identity(image, masks, boxes):
    """A stand-in identity embedding for shards written without a model: each object's mean colour, unit norm."""
    e = np.array([image[m].mean(0) if m.any() else np.ones(3) for m in masks], np.float32) + 1.0
    return e / np.linalg.norm(e, axis=1, keepdims=True)


META = {"model": "colour", "sha256": "0" * 64}


def test_the_sidecar_is_optional_and_published_with_the_shard(tmp_path):
    """A shard without identities is complete and has no sidecar; one with them has one row per object; an
    aborted shard publishes nothing, and what an interrupted one left (its .tmp files) is its partial files."""
    plain, with_ids = tmp_path / "plain", tmp_path / "ids"
    write_photo_shards(plain, n_shards=1, per_shard=3)
    keys = write_photo_shards(with_ids, n_shards=1, per_shard=3, identity=colour_identity, identity_meta=META)
    assert complete_shards(plain) == complete_shards(with_ids) == ["00000"]
    assert not (plain / f"00000{SUFFIX}").exists()
    table, emb, meta = read_identity(with_ids / f"00000{SUFFIX}")
    n_objects = [len(photo_record(n)[0].objects) for n in ("astronaut", "chelsea", "coffee")]
    assert table["key"].to_pylist() == [k for k, n in zip(keys, n_objects) for _ in range(n)]
    assert meta["model"] == "colour" and emb.shape == (sum(n_objects), 3)

    rec = photo_record("rocket")[0]
    rec.identity_embeddings = np.ones((len(rec.objects), 3), np.float32)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "aborted", "00000", identity_meta=META) as w:
        w.write(rec)
        raise RuntimeError("the run was stopped")
    assert Folder(tmp_path / "aborted").listing() == {}
    left = ["00000.tar", f"00000{SUFFIX}.tmp", "00000.objects.parquet", "other.txt"]
    assert partial_files(left, ["00000"]) == ["00000.tar", f"00000{SUFFIX}.tmp", "00000.objects.parquet"]


def test_a_retry_carries_identities_over_and_drops_a_stale_sidecar(tmp_path):
    """A retry that redoes one record keeps the others' rows byte for byte and gives the new one its own; a
    rewrite without identities removes the old sidecar rather than leaving it beside the new shard."""
    keys = write_photo_shards(
        tmp_path, n_shards=1, per_shard=3, failures_per_shard=0, identity=colour_identity, identity_meta=META
    )
    before, emb_before, _ = read_identity(tmp_path / f"00000{SUFFIX}")
    redo = keys[1]
    rec = photo_record("chelsea", source="skimage://chelsea/1")[0]
    assert rec.key == redo
    rec.identity_embeddings = np.full((len(rec.objects), 3), 0.5**0.5 / 1.5, np.float32)
    with ShardWriter(tmp_path, "00000", replace=True, identity_meta=META) as w:
        carry_over(w, str(tmp_path), "00000", keys, {redo})
        w.write(rec, part=1)
    after, emb_after, _ = read_identity(tmp_path / f"00000{SUFFIX}")
    assert after.to_pylist() == before.to_pylist()  # same keys, indices, labels, in plan order
    kept = np.array([k != redo for k in before["key"].to_pylist()])
    np.testing.assert_array_equal(emb_after[kept], emb_before[kept])
    np.testing.assert_allclose(emb_after[~kept].astype(np.float32), rec.identity_embeddings, atol=1e-3)

    rec.identity_embeddings = None
    with ShardWriter(tmp_path, "00000", replace=True) as w:
        w.write(rec)
    assert complete_shards(tmp_path) == ["00000"] and not (tmp_path / f"00000{SUFFIX}").exists()


def test_a_record_needs_one_identity_row_per_object():
    rec = photo_record("coffee")[0]
    rec.identity_embeddings = np.ones((len(rec.objects) - 1, 8), np.float32)
    with pytest.raises(RecordError, match="one row per object"):
        validate(rec)
    rec.identity_embeddings = np.full((len(rec.objects), 8), np.nan, np.float32)
    with pytest.raises(RecordError, match="identity_embeddings"):
        validate(rec)


# ------------------------------------------------------------------------------------------- read_folder


def test_read_folder_local_and_s3(tmp_path, bucket, identifier, one_thread):
    """Every complete shard's rows with their shard id (the stage's embeddings of photo records), an incomplete
    shard's left out, locally and on S3."""
    meta = identity_meta(identifier.cfg)
    keys = write_photo_shards(tmp_path, n_shards=2, per_shard=2, identity=identifier.embed_objects, identity_meta=meta)
    write_photo_shards(tmp_path / "plain", n_shards=1, per_shard=2)  # a subfolder without identities: no rows
    table, emb, read_meta = read_folder(tmp_path)
    assert read_meta == {**meta, "dim": TINY_DIM, "normalized": True}
    assert table.column_names == ["key", "index", "label", "shard"]
    assert list(dict.fromkeys(table["key"].to_pylist())) == keys
    assert sorted(set(table["shard"].to_pylist())) == ["00000", "00001"]
    assert emb.shape == (table.num_rows, TINY_DIM) and emb.dtype == np.float16
    assert meta["model"] == identifier.cfg.model and len(meta["sha256"]) == 64

    remote = Folder(bucket)
    for p in sorted(tmp_path.glob("0000*")):
        shutil.copy(p, tmp_path / "upload")
        remote.commit(tmp_path / "upload", p.name)  # an upload, which removes the local copy
    assert read_folder(bucket)[0].to_pylist() == table.to_pylist()
    remote.remove(["00001_stats.json"])  # the second shard turns incomplete: its rows go
    t2, e2, _ = read_folder(bucket)
    assert set(t2["shard"].to_pylist()) == {"00000"}
    np.testing.assert_array_equal(e2, emb[: t2.num_rows])
    assert read_folder(tmp_path / "plain")[1].shape == (0, 0)


# ------------------------------------------------------------------------------------------- the crop


def test_same_object_at_another_scale_and_place_is_closer_than_another_object(identifier, one_thread):
    """The tiny seeded model (random weights): the astronaut's helmet pasted at 1x into one grey canvas and at
    0.5x elsewhere into another (its mask moved with it) vs the seven objects of the coffee, cat and rocket
    photos. Measured: cosine of the two helmets 0.9998, of a helmet and the closest other object 0.982: the
    crop to the box and the resize make the embedding nearly independent of place and scale even at random
    weights, while random features still tell objects apart a little. Asserted: a margin of 0.01."""
    from PIL import Image

    from subjectdiff.catalogs import masks as mask_codec

    def item(image, mask) -> dict:
        return {"image": image, "masks": [mask_codec.encode(mask)], "detections": [{"box": [0, 0, 1, 1]}]}

    rec, masks = photo_record("astronaut")
    helmet = masks[next(i for i, o in enumerate(rec.objects) if o.label == "helmet")]
    ys, xs = np.nonzero(helmet)
    box = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    patch, pmask = Image.fromarray(photo("astronaut")[box]), Image.fromarray(helmet[box])

    def placed(scale: float, y: int, x: int) -> dict:
        w, h = round(patch.width * scale), round(patch.height * scale)
        canvas, cmask = np.full((600, 700, 3), 90, np.uint8), np.zeros((600, 700), bool)
        canvas[y : y + h, x : x + w] = np.asarray(patch.resize((w, h)))
        cmask[y : y + h, x : x + w] = np.asarray(pmask.resize((w, h)))
        return item(canvas, cmask)

    others = [item(photo(n), m) for n in ("coffee", "chelsea", "rocket") for m in photo_record(n)[1]]
    out = identifier([placed(1.0, 10, 20), placed(0.5, 400, 500), *others])
    a, b, *rest = (it["identity_embeddings"][0].astype(np.float32) for it in out)
    same, other = float(a @ b), max(float(e @ x) for e in (a, b) for x in rest)
    assert same > other + 0.01, f"same helmet {same:.4f}, helmet vs the closest other object {other:.4f}"


def test_an_object_with_an_empty_mask_is_embedded_from_its_box(identifier):
    from subjectdiff.catalogs import masks as mask_codec

    img = photo("coffee")
    h, w = img.shape[:2]
    box = [0.2, 0.1, 0.8, 0.75]
    empty = {"image": img, "masks": [mask_codec.encode(np.zeros((h, w), bool))], "detections": [{"box": box}]}
    boxed = {"image": img, "masks": [mask_codec.encode(box_mask(box, w, h))], "detections": [{"box": box}]}
    a, b = identifier([empty, boxed])
    assert a["identity_embeddings"].shape == (1, TINY_DIM)
    np.testing.assert_array_equal(a["identity_embeddings"], b["identity_embeddings"])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(8, 60),
    st.integers(8, 60),
    st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1)),
    st.floats(0, 0.5),
)
def test_a_crop_is_the_square_box_with_its_margin_of_fill(h, w, box, margin):
    """Any box, any mask inside it: the crop is a square of side L + 2 round(margin L) (L the mask's longer
    side), holding the masked pixels unchanged and the fill everywhere else."""
    x0, y0 = box[0], box[1]
    x1, y1 = min(1.0, x0 + box[2]), min(1.0, y0 + box[3])
    rng = np.random.default_rng(h * 61 + w)
    img = rng.integers(10, 255, (h, w, 3), np.uint8)  # never the fill colour
    mask = box_mask([x0, y0, x1, y1], w, h)
    it = {"image": img, "masks": [], "detections": [{"box": [x0, y0, x1, y1]}]}
    (crop,) = object_crops(it, (1, 2, 3), margin)
    ys, xs = np.nonzero(mask)
    longest = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    assert crop.shape == (longest + 2 * round(margin * longest),) * 2 + (3,)
    inside = img[mask]
    assert (crop.reshape(-1, 3) == (1, 2, 3)).all(1).sum() >= crop.shape[0] ** 2 - len(inside)
    assert sorted(map(tuple, inside)) == sorted(
        map(tuple, crop.reshape(-1, 3)[~(crop.reshape(-1, 3) == (1, 2, 3)).all(1)])
    )


def test_identity_settings_are_checked():
    with pytest.raises(ValueError, match="identity.margin"):
        IdentityConfig(margin=2)
    with pytest.raises(ValueError, match="identity.batch_size"):
        IdentityConfig(batch_size=0)
