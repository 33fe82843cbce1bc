"""Curation signals (issue #13): the curate stage on the tiny open_clip model, and duplicate search in DuckDB.

Duplicates are planted among the bundled real photos (datagen/sample_images, scikit-image's): an exact copy,
a resized and re-encoded copy, a copy cropped 3 % off each side, and an unrelated photo. The stage's scores
are checked against open_clip called directly on the same inputs; the aesthetic heads against the reference
code's own computation on heads saved in the official formats.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from subjectdiff.catalogs import duplicates, hashing
from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.schema import make_key
from subjectdiff.datagen import config
from subjectdiff.datagen.stages.common import decode_item, fail
from subjectdiff.datagen.tiny import SAMPLE_IMAGES, TinyModels, save_tiny_aesthetic_head, save_tiny_clip
from tests.planted import crop_sides, jpeg, photo_bytes, planted, unrelated_photo

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


def samples_table(images: dict[str, bytes]) -> pa.Table:
    """The columns the catalog's `samples` will have for these images: hashed as the curate stage hashes."""
    rows = []
    for src, data in images.items():
        rows.append(
            {
                "key": make_key(src),
                "shard": "00000" if src.startswith("orig/") else "00001",
                "source": src,
                "sha256": hashlib.sha256(data).hexdigest(),
                "phash": hashing.phash_int64(Image.open(io.BytesIO(data))),
            }
        )
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("key", pa.string()),
                ("shard", pa.string()),
                ("source", pa.string()),
                ("sha256", pa.string()),
                ("phash", pa.int64()),
            ]
        ),
    )


@pytest.fixture
def con():
    c = duckdb.connect()
    c.register("samples", samples_table(planted()))
    yield c
    c.close()


def random_hashes(n: int, n_pairs: int, max_d: int, seed: int) -> np.ndarray:
    """n uniform int64 hashes plus n_pairs copies of some of them with 1..max_d random bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64, endpoint=True)
    extra = []
    for i in rng.choice(n, n_pairs, replace=False):
        flip = 0
        for b in rng.choice(64, int(rng.integers(1, max_d + 1)), replace=False):
            flip |= 1 << int(b)
        extra.append(hashing.to_int64(int(h[i]) ^ flip))
    return np.concatenate([h, np.array(extra, np.int64)])


# ----------------------------------------------------------------------------------------------- hashes


def test_phash_is_imagehash_as_signed_int64():
    import imagehash

    im = Image.open(SAMPLE_IMAGES / "astronaut.jpg")
    value = hashing.phash_int64(im)
    ref = imagehash.phash(im.convert("RGB"))
    assert hashing.int64_to_hex(value) == str(ref)
    assert hashing.hex_to_int64(str(ref)) == value
    assert -(1 << 63) <= value < (1 << 63)
    assert (value < 0) == bool(ref.hash[0, 0])  # hash[0, 0] is the sign bit
    assert hashing.phash_int64(np.asarray(im.convert("RGB"))) == value
    other = imagehash.phash(Image.open(SAMPLE_IMAGES / "coins.jpg").convert("RGB"))
    assert hashing.hamming(value, hashing.hex_to_int64(str(other))) == ref - other


def test_duckdb_distance_counts_all_64_bits():
    a, b = hashing.to_int64(0xFFFF_0000_0000_0001), 1
    got = duckdb.connect().execute(f"SELECT bit_count(xor(({a})::BIGINT, ({b})::BIGINT))").fetchone()[0]
    assert got == hashing.hamming(a, b) == 16


# ---------------------------------------------------------------------------------------- banded search


@pytest.mark.parametrize("max_distance", [1, 4, 6])
def test_banded_search_finds_the_brute_force_pairs(max_distance):
    hashes = random_hashes(3000, 300, max_distance, seed=max_distance)
    con = duplicates.connect()
    got = duplicates.near_pairs(con, hashes, max_distance=max_distance)
    pairs = set(zip(got["a"].to_pylist(), got["b"].to_pylist()))
    assert len(pairs) == got.num_rows  # each pair once, though several tables share its key
    expected = duplicates.brute_force_pairs(hashes, max_distance)
    assert len(expected) >= 300
    assert pairs == expected
    assert all(
        d == hashing.hamming(a, b) <= max_distance
        for a, b, d in zip(got["a"].to_pylist(), got["b"].to_pylist(), got["distance"].to_pylist())
    )
    # between two sets: the held-out search of --exclude-near; identical values are pairs there
    held = hashes[-400:]
    got = duplicates.near_pairs(con, hashes[:3000], held, max_distance=max_distance)
    assert set(zip(got["a"].to_pylist(), got["b"].to_pylist())) == duplicates.brute_force_pairs(
        hashes[:3000], max_distance, held
    )


@pytest.mark.parametrize("bands", [5, 7, 9])
def test_every_band_count_above_the_distance_is_exact(bands):
    hashes = random_hashes(2000, 200, 4, seed=bands)
    got = duplicates.near_pairs(duplicates.connect(), hashes, max_distance=4, bands=bands)
    assert set(zip(got["a"].to_pylist(), got["b"].to_pylist())) == duplicates.brute_force_pairs(hashes, 4)


def test_band_plan_follows_the_pigeonhole_rule():
    with pytest.raises(ValueError, match="must exceed max_distance"):
        duplicates.plan_bands(1000, 4, bands=4)
    plan = duplicates.plan_bands(10_000_000, 4)
    assert plan.key_bands == plan.bands - 4 and len(plan.masks) == __import__("math").comb(plan.bands, 4)
    assert min(plan.key_bits) >= 24  # ~log2(10M): a few random candidates per hash
    bits = duplicates.band_bits(plan.bands)
    assert sorted(b for band in bits for b in band) == list(range(64))


# --------------------------------------------------------------------------------------------- groups


def test_planted_duplicates_are_grouped(con):
    groups = duplicates.duplicate_groups(con)
    assert groups.schema == duplicates.DUPS_SCHEMA
    rows = groups.to_pylist()
    by_group: dict[int, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["group_id"], []).append(r)
    members = {g: [r["source"] for r in rs] for g, rs in by_group.items()}
    # group ids follow the first members' plan order (shard, key); each original comes first in its group
    firsts = sorted((make_key(ms[0]), ms[0]) for ms in members.values())
    assert [members[g][0] for g in sorted(members)] == [s for _, s in firsts]
    assert sorted(members.values()) == [
        ["orig/astronaut.jpg", "copy/astronaut-exact.jpg"],
        ["orig/chelsea.jpg", "copy/chelsea-cropped.jpg"],
        ["orig/rocket.jpg", "copy/rocket-resized.jpg"],
    ]
    kind = {r["source"]: r["kind"] for r in rows}
    assert kind["copy/astronaut-exact.jpg"] == kind["orig/astronaut.jpg"] == "exact"
    assert kind["copy/rocket-resized.jpg"] == kind["copy/chelsea-cropped.jpg"] == "near"
    dist = {r["source"]: r["distance"] for r in rows}
    assert dist["orig/astronaut.jpg"] == dist["copy/astronaut-exact.jpg"] == 0
    assert 0 <= dist["copy/rocket-resized.jpg"] <= 2 and 0 < dist["copy/chelsea-cropped.jpg"] <= 4
    assert "other/camera.jpg" not in kind and "orig/coffee.jpg" not in kind
    # every member row names its sample
    assert all(r["key"] == make_key(r["source"]) for r in rows)


def test_groups_chain_and_link_by_sha256_without_phash():
    t = pa.table(
        {
            "key": ["a", "b", "c", "d", "e"],
            "shard": ["0"] * 5,
            "source": list("abcde"),
            "sha256": ["s1", "s2", "s3", "s9", "s9"],
            "phash": pa.array([0, 0b111, 0b111111, -1, None], pa.int64()),
        }
    )
    con = duckdb.connect()
    rows = duplicates.duplicate_groups(con, t, max_distance=3).to_pylist()
    # a-b at 3 bits, b-c at 3 bits: one group, though a-c are 6 apart; d and e share bytes, e has no phash
    assert [(r["key"], r["group_id"], r["kind"], r["distance"]) for r in rows] == [
        ("a", 0, "near", 0),
        ("b", 0, "near", 3),
        ("c", 0, "near", 6),
        ("d", 1, "exact", 0),
        ("e", 1, "exact", None),
    ]


def test_dedup_keeps_the_first_member_of_each_group(con):
    near = duplicates.dedup_drop(con, "near")
    assert sorted(near["key"].to_pylist()) == sorted(
        make_key(s) for s in ("copy/astronaut-exact.jpg", "copy/rocket-resized.jpg", "copy/chelsea-cropped.jpg")
    )
    exact = duplicates.dedup_drop(con, "exact")
    assert exact["key"].to_pylist() == [make_key("copy/astronaut-exact.jpg")]
    # a selection without a group's first member keeps its first selected member
    kept_copy = duplicates.dedup_drop(con, "near", where="source <> 'orig/rocket.jpg'")
    assert make_key("copy/rocket-resized.jpg") not in kept_copy["key"].to_pylist()
    # a dups.parquet made elsewhere decides the groups instead; at 0 bits the crop is no duplicate (the
    # resized copy has its original's very phash)
    tight = duplicates.duplicate_groups(con, max_distance=0)
    assert sorted(duplicates.dedup_drop(con, "near", groups=tight)["key"].to_pylist()) == sorted(
        make_key(s) for s in ("copy/astronaut-exact.jpg", "copy/rocket-resized.jpg")
    )
    with pytest.raises(ValueError, match="exact.*near"):
        duplicates.dedup_drop(con, "fuzzy")


def test_duplicates_parquet_round_trips(con, tmp_path):
    import pyarrow.parquet as pq

    groups = duplicates.duplicate_groups(con)
    out = duplicates.write_duplicates(groups, tmp_path / "dups.parquet", meta={"max_distance": 4})
    back = pq.read_table(out)
    assert back.to_pylist() == groups.to_pylist() and back.schema.names == duplicates.DUPS_SCHEMA.names
    assert b"subjectdiff.duplicates" in back.schema.metadata


# ------------------------------------------------------------------------------------ held-out exclusion


def held_out_folder(root: Path) -> Path:
    """An evaluation set in DreamBench's layout (subject folders of images) holding copies of two training
    photos, re-encoded and resized or cropped, and one image no training sample is near."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "astronaut").mkdir()
    (root / "cat").mkdir()
    (root / "camera").mkdir()
    astro = Image.open(SAMPLE_IMAGES / "astronaut.jpg").convert("RGB")
    chelsea = Image.open(SAMPLE_IMAGES / "chelsea.jpg").convert("RGB")
    astro.resize((300, 300), Image.BICUBIC).save(root / "astronaut" / "00.png")
    (root / "cat" / "00.jpg").write_bytes(jpeg(crop_sides(chelsea, 0.02), quality=80))
    (root / "camera" / "00.jpg").write_bytes(unrelated_photo())
    return root


def test_exclude_near_drops_the_copies_of_a_held_out_folder(tmp_path):
    train = {src: data for src, data in planted().items() if src != "other/camera.jpg"}
    con = duckdb.connect()
    con.register("samples", samples_table(train))
    held = hashing.held_out_hashes(held_out_folder(tmp_path / "dreambench"))
    assert held["name"].to_pylist() == ["astronaut/00.png", "camera/00.jpg", "cat/00.jpg"]
    drop = duplicates.near_held_out(con, held)
    got = {r["source"]: r["held_out"] for r in drop.to_pylist()}
    assert got == {
        "orig/astronaut.jpg": "astronaut/00.png",
        "copy/astronaut-exact.jpg": "astronaut/00.png",
        "orig/chelsea.jpg": "cat/00.jpg",
        "copy/chelsea-cropped.jpg": "cat/00.jpg",
    }
    assert all(d <= duplicates.DEFAULT_EXCLUDE_DISTANCE for d in drop["distance"].to_pylist())


def test_held_out_set_from_another_catalog(tmp_path):
    folder = tmp_path / "eval-run"
    folder.mkdir()
    db = duckdb.connect(str(folder / "catalog.duckdb"))
    db.execute("CREATE TABLE samples (key VARCHAR, shard VARCHAR, phash BIGINT)")
    db.execute(
        "INSERT INTO samples VALUES ('k1', '00000', ?), ('k2', '00000', NULL)",
        [hashing.hash_image_file(SAMPLE_IMAGES / "coffee.jpg")],
    )
    db.close()
    held = hashing.held_out_hashes(folder)
    assert held.to_pylist() == [{"name": "k1", "phash": hashing.hash_image_file(SAMPLE_IMAGES / "coffee.jpg")}]
    con = duckdb.connect()
    con.register("samples", samples_table(planted()))
    assert duplicates.near_held_out(con, held)["source"].to_pylist() == ["orig/coffee.jpg"]


def test_unreadable_held_out_image_is_an_error(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(photo_bytes("coins"))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        hashing.hash_folder(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        hashing.held_out_hashes(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ curate stage


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The tiny preset's open_clip model and aesthetic head, written as tiny_models writes them."""
    root = tmp_path_factory.mktemp("tiny-clip")
    cfg, ckpt = save_tiny_clip(root / "clip")
    head = save_tiny_aesthetic_head(root / "aesthetic" / "aesthetic_mlp_tiny.pth")
    unused = root / "unused"
    return TinyModels(
        blip=unused,
        gdino_config=unused,
        gdino_checkpoint=unused,
        sam_checkpoint=unused,
        clip_config=cfg,
        clip_checkpoint=ckpt,
        aesthetic_head=head,
    )


@pytest.fixture(scope="session")
def curate_cfg(tiny_clip):
    return config.tiny(tiny_clip).curate  # the tiny preset's settings


@pytest.fixture(scope="session")
def curator(curate_cfg):
    from subjectdiff.datagen.stages.curate import Curator

    return Curator(curate_cfg)


@pytest.fixture(scope="session")
def reference(tiny_clip):
    """The tiny CLIP loaded by open_clip directly: (model, eval transform, tokenizer)."""
    import open_clip

    open_clip.add_model_config(tiny_clip.clip_config)
    model, _, preprocess = open_clip.create_model_and_transforms(
        tiny_clip.clip_config.stem, pretrained=str(tiny_clip.clip_checkpoint)
    )
    return model.eval(), preprocess, open_clip.get_tokenizer(tiny_clip.clip_config.stem)


def box_mask(h: int, w: int, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = True
    return m


def stage_items() -> list[dict]:
    """Items as the segment stage leaves them (caption, nouns, detections, masks), with fixed contents so the
    test does not depend on what random upstream models write."""
    specs = {
        "astronaut": (
            "an astronaut holding a helmet",
            "NASA portrait",
            [("astronaut", (0.1, 0.05, 0.9, 1.0)), ("helmet", (0.6, 0.5, 0.95, 0.95))],
        ),
        "chelsea": (
            "a cat lying on a rug",
            None,
            [("cat", (0.2, 0.1, 0.8, 0.9)), ("rug", (0.0, 0.7, 1.0, 1.0)), ("cat", (0.3, 0.2, 0.6, 0.5))],
        ),
        "coffee": ("a cup of coffee on a saucer", "", [("cup", (0.2, 0.1, 0.8, 0.8))]),
        "rocket": ("a rocket on a launchpad", "Saturn V", []),
    }
    items = []
    for name, (caption, alt, objects) in specs.items():
        it = decode_item(f"skimage/{name}.jpg", photo_bytes(name), alt_text=alt)
        h, w = it["image"].shape[:2]
        labels = list(dict.fromkeys(lb for lb, _ in objects))
        it["caption"] = caption
        it["nouns"] = [{"label": lb, "phrase": lb, "span": [0, 1], "tokens": [1]} for lb in labels]
        it["detections"] = [{"box": list(b), "score": 0.9, "noun": labels.index(lb)} for lb, b in objects]
        it["masks"] = [mask_codec.encode(box_mask(h, w, *b)) for _, b in objects]
        items.append(it)
    return items


def fresh(items: list[dict]) -> list[dict]:
    return [{**it, "detections": [dict(d) for d in it["detections"]]} for it in items]


@torch.inference_mode()
def direct_image(reference, image: np.ndarray) -> np.ndarray:
    model, preprocess, _ = reference
    return model.encode_image(preprocess(Image.fromarray(image))[None], normalize=True)[0].numpy()


@torch.inference_mode()
def direct_text(reference, text: str) -> np.ndarray:
    model, _, tokenizer = reference
    return model.encode_text(tokenizer([text]), normalize=True)[0].numpy()


def test_clip_scores_equal_open_clip_directly(curator, reference, one_thread):
    items = curator(fresh(stage_items()))
    for it in items:
        img = direct_image(reference, it["image"])
        assert it["clip_score"] == pytest.approx(float(img @ direct_text(reference, it["caption"])), abs=1e-5)
        if it["alt_text"]:
            assert it["alt_clip_score"] == pytest.approx(float(img @ direct_text(reference, it["alt_text"])), abs=1e-5)
        else:
            assert it["alt_clip_score"] is None  # no alt text, or an empty one
        emb = it["clip_embedding"]
        assert emb.dtype == np.float16 and emb.shape == (32,)
        np.testing.assert_allclose(emb.astype(np.float32), img, atol=1e-3)
        assert it["sha256"] == hashlib.sha256(it["image_bytes"]).hexdigest()
        assert it["phash"] == hashing.phash_int64(Image.open(io.BytesIO(it["image_bytes"])))


def test_label_scores_equal_open_clip_on_the_masked_crop(curator, reference, one_thread):
    from subjectdiff.datagen.stages.curate import NEUTRAL_RGB, masked_crop

    items = curator(fresh(stage_items()))
    for it in items:
        labels = [it["nouns"][d["noun"]]["label"] for d in it["detections"]]
        distinct = list(dict.fromkeys(labels))
        prompts = {lb: direct_text(reference, f"a photo of a {lb}") for lb in distinct}
        for det, rle, lb in zip(it["detections"], it["masks"], labels):
            crop = direct_image(reference, masked_crop(it["image"], mask_codec.decode(rle)))
            sims = {other: float(crop @ prompts[other]) for other in distinct}
            assert det["label_score"] == pytest.approx(sims[lb], abs=1e-5)
            assert det["label_rank"] == 1 + sum(s > sims[lb] for s in sims.values())
    assert items[3]["detections"] == []  # no objects: nothing to score
    # the crop: the mask's box on CLIP's mean colour, centred on a square
    img = np.full((10, 20, 3), 200, np.uint8)
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:12] = True
    mask[2, 4] = False
    crop = masked_crop(img, mask)
    assert crop.shape == (8, 8, 3)
    assert (crop[2:6].reshape(-1, 3) == 200).sum() == 3 * (4 * 8 - 1)
    assert tuple(crop[0, 0]) == tuple(crop[2, 0]) == NEUTRAL_RGB
    assert masked_crop(img, np.zeros((10, 20), bool)) is None


def test_missing_inputs_give_none_and_failed_items_pass_through(curator, one_thread):
    items = fresh(stage_items())
    items[0]["masks"][1] = mask_codec.encode(np.zeros(items[0]["image"].shape[:2], bool))  # an empty mask
    del items[1]["masks"]  # segmentation skipped
    del items[2]["caption"]
    fail(items[3], "segment", "no boxes to segment")
    out = curator(items)
    assert out[0]["detections"][0]["label_score"] is not None
    assert (out[0]["detections"][1]["label_score"], out[0]["detections"][1]["label_rank"]) == (None, None)
    assert all(d["label_score"] is None for d in out[1]["detections"])
    assert out[2]["clip_score"] is None and out[2]["alt_clip_score"] is None and out[2]["sha256"]
    assert "sha256" not in out[3] and out[3]["failure"]["stage"] == "segment"


def test_batched_equals_one_at_a_time(curate_cfg, one_thread):
    from dataclasses import replace

    from subjectdiff.datagen.stages.curate import Curator

    batched = Curator(replace(curate_cfg, batch_size=8))(fresh(stage_items()))
    single_stage = Curator(replace(curate_cfg, batch_size=1))
    single = [single_stage([it])[0] for it in fresh(stage_items())]
    for b, s in zip(batched, single):
        assert (b["sha256"], b["phash"]) == (s["sha256"], s["phash"])
        for k in ("clip_score", "alt_clip_score", "aesthetic"):
            assert (b[k] is None) == (s[k] is None) and (b[k] is None or abs(b[k] - s[k]) < 1e-5), k
        np.testing.assert_allclose(
            b["clip_embedding"].astype(np.float32), s["clip_embedding"].astype(np.float32), atol=1e-3
        )
        for db, ds in zip(b["detections"], s["detections"]):
            assert db["label_score"] == pytest.approx(ds["label_score"], abs=1e-5)
            assert db["label_rank"] == ds["label_rank"]


# ----------------------------------------------------------------------------------------- aesthetic head


def reference_mlp(in_features: int, relu: bool) -> torch.nn.Module:
    """improved-aesthetic-predictor's MLP as its simple_inference.py defines it (relu: its ReLU variant)."""
    nn = torch.nn
    act = [nn.ReLU()] if relu else []
    m = nn.Module()
    m.layers = nn.Sequential(
        nn.Linear(in_features, 1024),
        *act,
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        *act,
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        *act,
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        *act,
        nn.Linear(16, 1),
    )
    return m


def normalized(a: np.ndarray) -> np.ndarray:
    """The reference code's L2 normalization of CLIP image embeddings before the head."""
    n = np.atleast_1d(np.linalg.norm(a, 2, -1))
    n[n == 0] = 1
    return a / np.expand_dims(n, -1)


@torch.inference_mode()
def test_aesthetic_head_in_the_official_mlp_format(curator, tiny_clip, reference, one_thread):
    items = curator(fresh(stage_items()))
    ref = reference_mlp(32, relu=False)
    ref.load_state_dict(torch.load(tiny_clip.aesthetic_head, weights_only=True))
    ref.eval()
    model, preprocess, _ = reference
    for it in items:
        emb = model.encode_image(preprocess(Image.fromarray(it["image"]))[None]).numpy()
        want = float(ref.layers(torch.from_numpy(normalized(emb)).float())[0, 0])
        assert it["aesthetic"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("layout", ["linear", "mlp-relu"])
def test_aesthetic_heads_load_from_files_in_either_official_format(tmp_path, layout):
    from subjectdiff.datagen.stages.curate import load_aesthetic_head

    torch.manual_seed(1)
    if layout == "linear":  # LAION-AI/aesthetic-predictor: torch.nn.Linear(768, 1) state dict
        ref = torch.nn.Linear(768, 1)
        forward = ref
    else:
        ref = reference_mlp(768, relu=True)
        forward = ref.layers
    path = tmp_path / "head.pth"
    torch.save(ref.state_dict(), path)
    x = torch.from_numpy(normalized(np.random.default_rng(0).normal(size=(3, 768)))).float()
    head = load_aesthetic_head(str(path))
    with torch.inference_mode():
        torch.testing.assert_close(head(x), forward.eval()(x))


def test_aesthetic_head_of_an_unknown_format_is_refused():
    from subjectdiff.datagen.stages.curate import aesthetic_head_from_state_dict

    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        aesthetic_head_from_state_dict({"fc.weight": torch.zeros(1, 768)})
    with pytest.raises(ValueError, match="neither of the"):
        aesthetic_head_from_state_dict({"layers.0.weight": torch.zeros(4, 768), "layers.1.weight": torch.zeros(1, 4)})


def test_without_a_head_aesthetic_is_none(curate_cfg, one_thread):
    from dataclasses import replace

    from subjectdiff.datagen.stages.curate import Curator

    items = Curator(replace(curate_cfg, aesthetic=None))(fresh(stage_items()))
    assert [it["aesthetic"] for it in items] == [None] * len(items)
    assert all(it["clip_score"] is not None for it in items)


# ------------------------------------------------------------------------------------------------ config


def test_presets_configure_the_curate_stage(tiny_clip):
    from subjectdiff.datagen.stages.curate import clip_checkpoint_specs, manifest_specs

    d = config.default().curate
    assert (d.enabled, d.model, d.pretrained, d.aesthetic) == (True, "ViT-L-14", "openai", None)
    # the OpenAI tag stands for the file open_clip itself fetches for it, through subjectdiff.weights
    assert clip_checkpoint_specs(d) == [
        "hf://timm/vit_large_patch14_clip_224.openai/open_clip_model.safetensors",
        "hf://timm/vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin",
    ]
    t = config.tiny(tiny_clip).curate
    assert (t.model, t.pretrained, t.aesthetic, t.device) == (
        str(tiny_clip.clip_config),
        str(tiny_clip.clip_checkpoint),
        str(tiny_clip.aesthetic_head),
        "cpu",
    )
    assert manifest_specs(t) == {
        "curate.model": t.model,
        "curate.pretrained": t.pretrained,
        "curate.aesthetic": t.aesthetic,
    }
    from subjectdiff.weights import manifest_entry

    assert all(len(manifest_entry(spec)["sha256"]) == 64 for spec in manifest_specs(t).values())
    assert manifest_specs(config.CurateConfig(enabled=False)) == {}
    assert config.full_random(tiny_clip).curate.pretrained is None  # random ViT-L-14 built in memory
    with pytest.raises(ValueError, match="label_prompt"):
        config.CurateConfig(label_prompt="a photo")


def test_embedding_sidecar_round_trips(curator, tmp_path, one_thread):
    from subjectdiff.catalogs import embeddings

    items = curator(fresh(stage_items()))
    keys = [it["key"] for it in items]
    emb = np.stack([it["clip_embedding"] for it in items])
    path = tmp_path / f"00000{embeddings.SUFFIX}"
    embeddings.write_embeddings(path, keys, emb, meta={"model": "subjectdiff-tiny-clip"})
    got_keys, got, meta = embeddings.read_embeddings(path)
    assert got_keys == keys and got.dtype == np.float16 and np.array_equal(got, emb)
    assert meta == {"model": "subjectdiff-tiny-clip", "dim": 32, "normalized": True}
    # DuckDB reads it as a list of floats: the cosine of two samples is their dot product
    dot = (
        duckdb.connect()
        .execute(
            f"SELECT list_dot_product(a.clip_embedding, b.clip_embedding) FROM '{path}' a, '{path}' b "
            "WHERE a.key = ? AND b.key = ?",
            [keys[0], keys[1]],
        )
        .fetchone()[0]
    )
    assert dot == pytest.approx(float(emb[0].astype(np.float32) @ emb[1].astype(np.float32)), abs=1e-3)
    with pytest.raises(ValueError, match="one \\(D,\\) embedding per key"):
        embeddings.embedding_table(keys[:2], emb)
