"""The four datagen model stages with the tiny preset, on scikit-image's real photos.

Tiny checkpoints are written once per session in the official formats (datagen/tiny.py) and loaded
through the same user-facing code as real ones: config preset -> stage classes -> checkpoint loaders.
"""

from __future__ import annotations

import io
import itertools
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.schema import Failure, Record, make_key, validate
from subjectdiff.datagen import config
from subjectdiff.datagen.assemble import to_record
from subjectdiff.datagen.stages.common import decode_item
from subjectdiff.datagen.tiny import tiny_models

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # groundingdino-py / timm / transformers internals
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return img if img.ndim == 3 else np.stack([img] * 3, -1)


def encode(img: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


def make_items(names=PHOTOS, fmt="JPEG") -> list[dict]:
    return [decode_item(f"skimage/{n}.{fmt.lower()}", encode(photo(n), fmt), alt_text=f"alt {n}") for n in names]


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def cfg(tiny_paths):
    return config.tiny(tiny_paths)


@pytest.fixture(scope="session")
def captioner(cfg):
    from subjectdiff.datagen.stages.caption import Captioner

    return Captioner(cfg.caption)


@pytest.fixture(scope="session")
def nouns(cfg):
    from subjectdiff.datagen.stages.nouns import NounExtractor

    return NounExtractor(cfg.nouns)


@pytest.fixture(scope="session")
def grounder(cfg):
    from subjectdiff.datagen.stages.ground import Grounder

    return Grounder(cfg.ground)


@pytest.fixture(scope="session")
def segmenter(cfg):
    from subjectdiff.datagen.stages.segment import Segmenter

    return Segmenter(cfg.segment)


@pytest.fixture(scope="session")
def grounded(captioner, nouns, grounder):
    """The four photos after caption, nouns and ground (copied per test: stages mutate items)."""
    return grounder(nouns(captioner(make_items())))


def fresh(items):
    return [dict(it) for it in items]


# -------------------------------------------------------------------------------------------- caption


def test_caption_real_words_per_image(captioner, nouns):
    items = nouns(captioner(make_items()))
    caps = [it["caption"] for it in items]
    assert all(isinstance(c, str) and c for c in caps)
    assert "astronaut" in caps[0] and "cat" in caps[1], caps  # the tiny captioner was fit to these photos
    assert len(set(caps)) > 1, "captions should depend on the image"
    assert [it["alt_text"] for it in items] == [f"alt {n}" for n in PHOTOS], "the source caption stays beside it"
    assert all(it["nouns"] for it in items), [(c, it.get("failure")) for c, it in zip(caps, items)]
    assert captioner.dtype == torch.float32  # CPU: fp32


def test_caption_batch_with_one_and_three_pixel_high_images(captioner):
    """(1, W, 3) and (3, W, 3) images look channels-first to the image processor; among normal images, and
    first in the batch (where the processor guesses the layout), each still gets its own caption."""
    rng = np.random.default_rng(0)
    thin = [rng.integers(0, 256, (h, 64, 3), dtype=np.uint8) for h in (1, 3)]
    items = [decode_item(f"thin{i}.png", encode(im, "PNG")) for i, im in enumerate(thin)]
    items = [items[0], *make_items(["astronaut"]), items[1], *make_items(["chelsea"])]
    assert [it["image"].shape[0] for it in items] == [1, 512, 3, 300]
    out = captioner(items)
    assert all(
        isinstance(it.get("caption"), str) and it["caption"] or it["failure"]["stage"] == "caption" for it in out
    ), [(it.get("caption"), it.get("failure")) for it in out]
    assert "astronaut" in out[1]["caption"] and "cat" in out[3]["caption"], "the normal images keep their captions"


def test_caption_skips_failed_items(captioner):
    items = [decode_item("broken.jpg", b"\xff\xd8 broken"), *make_items(["chelsea"])]
    out = captioner(items)
    assert out[0]["failure"]["stage"] == "decode" and "caption" not in out[0]
    assert out[1]["caption"]


# --------------------------------------------------------------------------------------------- ground


def test_ground_boxes_normalized_and_mapped_to_nouns(grounded, cfg):
    with_dets = [it for it in grounded if it.get("detections")]
    assert len(with_dets) >= 3, [it.get("failure") for it in grounded]
    for it in grounded:
        if not it.get("detections"):
            assert it["failure"]["stage"] == "ground"
            continue
        assert it["ground_prompt"] == " . ".join(n["phrase"].lower() for n in it["nouns"]) + " ."
        dets = it["detections"]
        assert len(dets) <= cfg.ground.max_detections
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        for d in dets:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1
            assert d["score"] > cfg.ground.box_threshold
            assert 0 <= d["noun"] < len(it["nouns"])
        for a, b in itertools.combinations(dets, 2):  # class-agnostic NMS at 0.5
            assert iou(a["box"], b["box"]) <= cfg.ground.nms_iou + 1e-6


def test_positive_map_spans_multi_wordpiece_nouns(grounder):
    from subjectdiff.datagen.stages.ground import build_prompt, positive_map

    prompt, spans = build_prompt(["Rocket", "launchpad", "sky"])
    assert prompt == "rocket . launchpad . sky ." and spans == [(0, 6), (9, 18), (21, 24)]
    pm = positive_map(grounder.tokenizer, prompt, spans)
    # [CLS] rocket . launch ##pad . sky . [SEP]
    assert [row.nonzero().flatten().tolist() for row in pm] == [[1], [3, 4], [6]]


def test_detections_follow_the_token_positive_map():
    from subjectdiff.datagen.config import GroundConfig
    from subjectdiff.datagen.stages.ground import select_detections

    cfg = GroundConfig(box_threshold=0.25, text_threshold=0.2, nms_iou=0.5)
    pm = torch.zeros(2, 256, dtype=torch.bool)
    pm[0, 1] = True  # noun 0: token 1
    pm[1, [3, 4]] = True  # noun 1: tokens 3-4 (a word split in two)
    probs = torch.zeros(4, 256)
    probs[0, [3, 4]] = torch.tensor([0.9, 0.5])  # grounds noun 1
    probs[1, 1] = 0.6  # grounds noun 0
    probs[2, 1] = 0.5  # overlaps query 1 at IoU > 0.5, lower score: NMS drops it
    probs[3, 2] = 0.99  # a '.' token, not a noun: no detection
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.4, 0.4], [0.71, 0.7, 0.4, 0.4], [0.5, 0.5, 0.5, 0.5]])
    dets = select_detections(probs, boxes, pm, cfg)
    assert [(d["noun"], round(d["score"], 4)) for d in dets] == [(1, 0.9), (0, 0.6)]
    assert dets[0]["box"] == pytest.approx([0.2, 0.2, 0.4, 0.4])  # cxcywh -> xyxy


@pytest.mark.parametrize("resize", ["square", "keep_ratio"])
def test_ground_batched_equals_one_at_a_time(grounder, grounded, resize):
    """Different prompts in one batch, and with keep_ratio images of three processed shapes (batched per
    shape), give the same detections as one image at a time."""
    items = [it for it in grounded if it.get("nouns")]
    images, nouns = [it["image"] for it in items], [it["nouns"] for it in items]
    assert len({len(n) for n in nouns}) > 1, "prompts of different lengths in one batch"
    old = grounder.cfg.resize, grounder.cfg.batch_size
    try:
        grounder.cfg.resize = resize
        shapes = {tuple(grounder.preprocess(im).shape) for im in images}
        assert len(shapes) == (1 if resize == "square" else 3), shapes  # keep_ratio: mixed aspect ratios
        grounder.cfg.batch_size = 8
        batched = grounder.detect(images, nouns)
        grounder.cfg.batch_size = 1
        single = grounder.detect(images, nouns)
    finally:
        grounder.cfg.resize, grounder.cfg.batch_size = old
    for (pb, db), (ps, ds) in zip(batched, single):
        assert pb == ps
        assert [d["noun"] for d in db] == [d["noun"] for d in ds]
        np.testing.assert_allclose([d["box"] for d in db], [d["box"] for d in ds], atol=1e-5)
        np.testing.assert_allclose([d["score"] for d in db], [d["score"] for d in ds], atol=1e-5)


def test_padding_changes_detections_so_keep_ratio_batches_group_by_shape(grounder, grounded):
    """Guards the grouping above: GroundingDINO accepts padded batches (a NestedTensor with a padding mask),
    but its Swin backbone has no padding mask, so an image padded to a batch's larger shape gets other
    query probabilities than alone. Should padding ever stop changing them, pad mixed shapes into one batch."""
    from groundingdino.util.misc import NestedTensor

    it = next(it for it in grounded if it.get("nouns"))
    x = grounder.preprocess(it["image"])
    prompt = grounder.prompt_for(it["nouns"])[0]
    h, w = x.shape[1:]
    padded = torch.zeros(1, 3, h + 16, w + 48)
    padded[0, :, :h, :w] = x
    mask = torch.ones(1, h + 16, w + 48, dtype=torch.bool)
    mask[0, :h, :w] = False
    with torch.inference_mode():
        out = grounder.model(NestedTensor(padded, mask), captions=[prompt])
    alone = grounder.forward([x], [prompt])[0][0]
    assert (out["pred_logits"].sigmoid()[0] - alone).nan_to_num(0.0).abs().max() > 1e-2


def test_upstream_text_mask_is_wrong_in_batches_and_fixed_on_our_instance(grounder, grounded):
    """Guards the test above: without our layer class, groundingdino-py 0.4.0 mixes masks across images."""
    from groundingdino.models.GroundingDINO.transformer_vanilla import TransformerEncoderLayer

    items = [it for it in grounded if it.get("nouns")][:3]
    old = grounder.cfg.resize
    grounder.cfg.resize = "square"
    try:
        x = [grounder.preprocess(it["image"]) for it in items]
        prompts = [grounder.prompt_for(it["nouns"])[0] for it in items]
        single = torch.cat([grounder.forward([t], [p])[0] for t, p in zip(x, prompts)])
        fixed = grounder.forward(x, prompts)[0]
        layers = [m for m in grounder.model.modules() if isinstance(m, TransformerEncoderLayer)]
        assert layers and all(type(m) is not TransformerEncoderLayer for m in layers)
        patched_cls = type(layers[0])
        for m in layers:
            m.__class__ = TransformerEncoderLayer
        upstream = grounder.forward(x, prompts)[0]
    finally:
        for m in layers:
            m.__class__ = patched_cls
        grounder.cfg.resize = old
    finite = torch.isfinite(single) & (single > 0)
    assert (fixed - single)[finite].abs().max() < 1e-5
    assert (upstream - single).nan_to_num(1.0)[finite].abs().max() > 1e-3


def test_ground_failures_are_data(grounder):
    no_nouns = make_items(["chelsea"])[0] | {"nouns": []}
    failed = {"key": "k", "source": "s", "failure": {"stage": "caption", "reason": "empty caption"}}
    out = grounder([no_nouns, failed])
    assert out[0]["failure"] == {"stage": "ground", "reason": "no nouns to ground"}
    assert out[1] == {"key": "k", "source": "s", "failure": {"stage": "caption", "reason": "empty caption"}}
    old = grounder.cfg.box_threshold
    grounder.cfg.box_threshold = 1.0
    try:
        item = make_items(["coffee"])[0] | {"nouns": [{"label": "cup", "phrase": "cup", "span": [2, 5], "tokens": [2]}]}
        out = grounder([item])
    finally:
        grounder.cfg.box_threshold = old
    assert out[0]["failure"]["stage"] == "ground" and "no detection" in out[0]["failure"]["reason"]


# -------------------------------------------------------------------------------------------- segment


def test_segment_masks_match_detections(segmenter, grounded):
    items = segmenter(fresh(grounded))
    done = [it for it in items if "masks" in it]
    assert done
    for it in done:
        h, w = it["image"].shape[:2]
        assert len(it["masks"]) == len(it["mask_scores"]) == len(it["detections"])
        for rle in it["masks"]:
            assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
            assert mask_codec.decode(rle).shape == (h, w)
        assert all(isinstance(s, float) for s in it["mask_scores"])
    for it in items:
        if not it.get("detections"):
            assert it["failure"]["stage"] in ("ground", "segment")


def test_segment_batched_equals_one_at_a_time(segmenter):
    images = [photo(n) for n in ("astronaut", "chelsea", "coffee")]
    boxes = [
        np.array([[0.1, 0.05, 0.9, 1.0], [0.55, 0.6, 0.95, 0.98]]),
        np.array([[0.05, 0.0, 0.95, 1.0]]),
        np.array([[0.2, 0.1, 0.8, 0.75], [0.05, 0.4, 0.95, 0.98], [0.55, 0.55, 0.98, 0.9]]),
    ]
    old = segmenter.cfg.batch_size
    try:
        segmenter.cfg.batch_size = 3
        batched = segmenter.encode(images)
        segmenter.cfg.batch_size = 1
        single = segmenter.encode(images)
    finally:
        segmenter.cfg.batch_size = old
    for (fb, ib, ob), (fs, is_, os_), bx in zip(batched, single, boxes):
        assert (ib, ob) == (is_, os_)
        torch.testing.assert_close(fb, fs, atol=1e-4, rtol=1e-4)
        mb, sb = segmenter.decode(fb, ib, ob, bx)
        ms, ss = segmenter.decode(fs, is_, os_, bx)
        assert mb.shape == (len(bx), *ob)
        assert (mb != ms).mean() < 1e-4
        np.testing.assert_allclose(sb, ss, atol=1e-4)


def test_segment_without_boxes_fails(segmenter):
    item = make_items(["rocket"])[0] | {"detections": []}
    assert segmenter([item])[0]["failure"] == {"stage": "segment", "reason": "no boxes to segment"}


# ------------------------------------------------------------------------------------ filters, records


def test_image_filters():
    from subjectdiff.datagen.config import FilterConfig
    from subjectdiff.datagen.stages.filters import image_reject_reason

    paper = config.default().filters
    assert (paper.min_detections, paper.max_detections) == (2, 8)
    assert image_reject_reason(512, 512, 3, paper) is None
    assert "fewer than" in image_reject_reason(512, 512, 1, paper)
    assert "more than" in image_reject_reason(512, 512, 9, paper)
    assert "min_side" in image_reject_reason(100, 512, 3, paper)
    assert "max_aspect" in image_reject_reason(300, 1000, 3, paper)
    with pytest.raises(ValueError, match="min_detections"):
        FilterConfig(min_detections=5, max_detections=2)


def test_the_reference_data_recipe_preset():
    """subjectdiff.datagen.config.paper(): data_process.py's greedy captions, 3-8 nouns, a side of 600 px, count
    words."""
    from subjectdiff.datagen.stages.filters import ImageFilter, image_reject_reason
    from subjectdiff.datagen.stages.nouns import NounExtractor

    p = config.paper()
    assert (p.caption.num_beams, p.caption.max_new_tokens, p.caption.min_new_tokens) == (1, 20, 0)
    assert (p.nouns.min_caption_nouns, p.nouns.max_caption_nouns) == (3, 8)
    assert (p.filters.min_detections, p.filters.max_detections, p.filters.min_long_side) == (2, 8, 600)
    assert "min_long_side" in image_reject_reason(500, 580, 3, p.filters)
    assert image_reject_reason(400, 600, 3, p.filters) is None  # either side reaching 600 is enough
    caption = "a dog and a cat on a lawn"
    item = {"key": "k", "source": "s", "caption": caption, "image": np.zeros((600, 800, 3), np.uint8)}
    item = NounExtractor(p.nouns)([item])[0]
    dog = [n["label"] for n in item["nouns"]].index("dog")
    item["detections"] = [
        {"box": [0, 0, 0.5, 1], "score": 0.9, "noun": dog},
        {"box": [0.5, 0, 1, 1], "score": 0.8, "noun": dog},
    ]
    out = ImageFilter(p.filters)([item])[0]
    assert "failure" not in out and out["caption"] == "two dog and a cat on a lawn"
    assert all(out["caption"][n["span"][0] : n["span"][1]] == n["phrase"] for n in out["nouns"])


def test_prefilter_rejects_small_images_before_any_model():
    """run_stages applies the size/aspect rules first: the captioner never sees a 100x100 thumbnail."""
    from subjectdiff.datagen.config import FilterConfig
    from subjectdiff.datagen.stages.chain import run_stages
    from subjectdiff.datagen.stages.common import live
    from subjectdiff.datagen.stages.filters import ImageFilter, prefilter

    class RecordingCaptioner:
        def __init__(self):
            self.seen = []

        def __call__(self, items):
            for i in live(items):
                self.seen.append(items[i]["image"].shape[:2])
                items[i]["caption"] = "a cat"
            return items

    filters = FilterConfig(min_detections=0, min_side=256, max_aspect=3.0)
    items = [
        decode_item(f"{w}x{h}.png", encode(np.zeros((h, w, 3), np.uint8), "PNG"))
        for w, h in ((100, 100), (300, 300), (1000, 300))
    ]
    cap = RecordingCaptioner()
    out = run_stages([cap, ImageFilter(filters)], items)
    assert cap.seen == [(300, 300)]
    assert out[0]["failure"] == {"stage": "filter", "reason": "image is 100x100, shorter side below min_side 256"}
    assert out[2]["failure"] == {"stage": "filter", "reason": "image is 1000x300, aspect 3.33 above max_aspect 3.0"}
    assert "failure" not in out[1] and out[1]["caption"] == "a cat"
    # idempotent, and a failed item keeps its first failure
    assert prefilter(dict(out[0]), filters)["failure"] == out[0]["failure"]
    broken = decode_item("broken.jpg", b"junk")
    assert prefilter(broken, filters)["failure"]["stage"] == "decode"
    # an item that skipped the prefilter is still filtered for its size after grounding
    skipped = make_items(["chelsea"])[0] | {"detections": [{"box": [0, 0, 1, 1], "score": 0.9, "noun": 0}]}
    reason = ImageFilter(replace(filters, min_side=400))([skipped])[0]["failure"]["reason"]
    assert reason == "image is 451x300, shorter side below min_side 400"


def test_warns_when_the_detection_cap_disables_the_crowd_filter(monkeypatch, caplog):
    from subjectdiff.datagen.config import DatagenConfig, FilterConfig, GroundConfig

    monkeypatch.setattr(config, "_WARNED_CAPS", set())
    with caplog.at_level(logging.WARNING, logger="subjectdiff.datagen.config"):
        config.default()  # ground keeps 32 boxes, the filter rejects more than 8: no warning
        assert not caplog.records
        for _ in range(2):
            DatagenConfig(ground=GroundConfig(max_detections=8), filters=FilterConfig(max_detections=8))
    assert len(caplog.records) == 1, "once per combination"
    assert "ground.max_detections (8) <= filters.max_detections (8)" in caplog.records[0].getMessage()


def test_end_to_end_records(cfg, captioner, nouns, grounder, segmenter):
    from subjectdiff.datagen.stages.filters import ImageFilter

    items = make_items() + make_items(["chelsea"], fmt="PNG") + [decode_item("junk.jpg", b"junk")]
    for stage in (captioner, nouns, grounder, ImageFilter(cfg.filters), segmenter):
        items = stage(items)
    out = [to_record(it) for it in items]
    records = [r for r in out if isinstance(r, Record)]
    assert len(records) >= 3, [r for r in out if isinstance(r, Failure)]
    for r, it in zip(out, items):
        if isinstance(r, Failure):
            assert r.stage == it["failure"]["stage"] and r.key == make_key(it["source"])
            continue
        validate(r)
        assert r.image is it["image_bytes"] and r.key == make_key(r.source)
        assert r.image_ext == ("png" if r.source.endswith(".png") else "jpg")
        assert r.alt_text == it["alt_text"] and r.objects
        for o in r.objects:
            assert r.caption[o.span[0] : o.span[1]] == o.phrase and o.tokens
            assert np.isfinite([o.area, o.aspect, o.mask_area, o.mask_fill, o.containment]).all()
    assert out[-1].stage == "decode"


# ----------------------------------------------------------------------------- real-checkpoint loading


def test_tiny_checkpoints_are_in_the_official_formats(tiny_paths):
    blip = tiny_paths.blip
    for f in ("config.json", "preprocessor_config.json", "vocab.txt", "tokenizer_config.json"):
        assert (blip / f).exists(), f
    assert list(blip.glob("model*.safetensors"))
    ckpt = torch.load(tiny_paths.gdino_checkpoint, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model"} and any(k.startswith("backbone.0.") for k in ckpt["model"])
    assert "text_encoder_type" in tiny_paths.gdino_config.read_text()
    sam = torch.load(tiny_paths.sam_checkpoint, map_location="cpu", weights_only=True)
    assert "image_encoder.patch_embed.proj.weight" in sam and "mask_decoder.iou_token.weight" in sam


def test_checkpoints_load_from_urls_into_the_cache(tiny_paths, tmp_path, monkeypatch):
    """A URL spec is fetched once into $SUBJECTDIFF_CACHE and loaded like a local file (file:// offline)."""
    from subjectdiff.datagen.config import GroundConfig, SegmentConfig
    from subjectdiff.datagen.stages.ground import load_groundingdino
    from subjectdiff.datagen.stages.segment import load_sam
    from subjectdiff.weights import manifest_entry

    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    sam_url = tiny_paths.sam_checkpoint.as_uri()
    sam = load_sam(SegmentConfig(checkpoint=sam_url, model_type="auto"))
    assert sam.image_encoder.patch_embed.proj.out_channels == 32
    gd = load_groundingdino(
        GroundConfig(config_file=str(tiny_paths.gdino_config), checkpoint=tiny_paths.gdino_checkpoint.as_uri())
    )
    assert gd.num_queries == 30
    cached = list((tmp_path / "cache" / "url").rglob("*.pth"))
    assert sorted(p.name for p in cached) == ["groundingdino_tiny.pth", "sam_tiny.pth"]
    entry = manifest_entry(sam_url)
    assert entry["path"].startswith(str(tmp_path / "cache")) and len(entry["sha256"]) == 64


def test_sam_architecture_checks(tiny_paths):
    from subjectdiff.datagen.config import SegmentConfig
    from subjectdiff.datagen.stages.segment import SAM_ARCHS, arch_from_state_dict, build_sam, load_sam

    for name, arch in SAM_ARCHS.items():  # the official variants, built on the meta device (no memory)
        with torch.device("meta"):
            state = build_sam(arch).state_dict()
        assert arch_from_state_dict(state) == arch, name
    with pytest.raises(ValueError, match="model_type"):
        load_sam(SegmentConfig(checkpoint=str(tiny_paths.sam_checkpoint), model_type="vit_h"))


def test_default_preset_names_the_real_checkpoints():
    from subjectdiff.weights import WeightsError, resolve

    d = config.default()
    assert d.caption.model == "Salesforce/blip-image-captioning-large" and d.caption.kind == "blip"
    assert d.ground.checkpoint.endswith("/groundingdino_swint_ogc.pth")
    assert resolve(d.ground.config_file).name == "GroundingDINO_SwinT_OGC.py"
    assert (d.ground.box_threshold, d.ground.text_threshold, d.ground.nms_iou) == (0.25, 0.2, 0.5)
    assert d.segment.model_type == "vit_h" and d.segment.checkpoint.endswith("/sam_vit_h_4b8939.pth")
    with pytest.raises(WeightsError, match="downloads are off"):
        resolve("https://example.invalid/never-downloaded.pth", download=False)
    with pytest.raises(WeightsError, match="not a local path"):
        resolve("/no/such/checkpoint.pth")


def test_blip2_option(tmp_path):
    from subjectdiff.datagen.config import CaptionConfig
    from subjectdiff.datagen.stages.caption import Captioner
    from subjectdiff.datagen.tiny import save_tiny_blip2

    folder = save_tiny_blip2(tmp_path / "blip2")
    # With no prompt the random OPT decoder repeats its BOS token, which decodes to an empty caption; after a
    # prompt it writes words, so a caption longer than the prompt shows generate and decode worked.
    cap = Captioner(
        CaptionConfig(
            model=str(folder), kind="blip2", prompt="a", num_beams=1, max_new_tokens=4, min_new_tokens=1, device="cpu"
        )
    )
    thin = decode_item("thin.png", encode(np.zeros((1, 64, 3), np.uint8), "PNG"))  # read channels-last too
    out = cap([thin, *make_items(["chelsea"])])
    assert [it.get("failure") for it in out] == [None, None]
    for it in out:
        assert isinstance(it["caption"], str) and it["caption"].startswith("a ") and len(it["caption"].split()) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_half_precision_on_gpu(tiny_paths):
    from dataclasses import replace

    from subjectdiff.datagen.stages.caption import Captioner

    c = config.tiny(tiny_paths)
    cap = Captioner(replace(c.caption, device="cuda"))
    assert cap.dtype in (torch.bfloat16, torch.float16)
    assert cap(make_items(["astronaut"]))[0]["caption"]


def test_ground_and_segment_report_the_dtype_they_run_in(cfg, grounder, segmenter):
    """Half precision is autocast on CUDA only: on CPU they run (and report) fp32 whatever was asked."""
    from subjectdiff.datagen.stages.ground import Grounder
    from subjectdiff.datagen.stages.segment import Segmenter

    assert Grounder(replace(cfg.ground, dtype="bfloat16"), model=grounder.model).dtype == torch.float32
    assert Segmenter(replace(cfg.segment, dtype="float16"), sam=segmenter.sam).dtype == torch.float32


# --------------------------------------------------------------------------------- small contracts


def test_box_conversions_name_their_formats():
    from subjectdiff.catalogs.boxes import cxcywh_norm_to_xyxy_norm, xyxy_norm_to_xyxy_pixels, xyxy_pixels_to_xyxy_norm

    xyxy = cxcywh_norm_to_xyxy_norm(torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.95, 0.5, 0.2, 0.2]]))
    torch.testing.assert_close(xyxy, torch.tensor([[0.25, 0.375, 0.75, 0.625], [0.85, 0.4, 1.0, 0.6]]))
    px = xyxy_norm_to_xyxy_pixels(xyxy.numpy(), width=200, height=100)
    np.testing.assert_allclose(px[0], [50, 37.5, 150, 62.5], rtol=1e-6)
    np.testing.assert_allclose(xyxy_pixels_to_xyxy_norm(px, 200, 100), xyxy.numpy(), rtol=1e-6)


def test_decode_helper():
    ok = decode_item("skimage/chelsea.png", encode(photo("chelsea"), "PNG"))
    assert ok["image"].shape == (300, 451, 3) and ok["image"].dtype == np.uint8 and "failure" not in ok
    assert ok["key"] == make_key("skimage/chelsea.png")
    # A GIF is converted (PNG of its first frame) by default; with decode.convert_formats off it fails, saying so.
    gif = decode_item("a.gif", encode(photo("chelsea"), "GIF"), cfg=config.DecodeConfig(convert_formats=False))
    assert gif["failure"]["stage"] == "decode" and "gif" in gif["failure"]["reason"]
    assert "decode.convert_formats" in gif["failure"]["reason"]
    assert decode_item("b.jpg", b"")["failure"] == {"stage": "decode", "reason": "empty image bytes"}
    assert isinstance(to_record(gif), Failure)


def test_empty_caption_is_a_failure(captioner, monkeypatch):
    monkeypatch.setattr(captioner, "caption_images", lambda images: [""] * len(images))
    out = captioner(make_items(["coffee"]))
    assert out[0]["failure"] == {"stage": "caption", "reason": "empty caption"}


def test_run_manifest_hashes_local_checkpoints(cfg, tiny_paths):
    from subjectdiff.datagen.manifest import run_manifest

    m = run_manifest(cfg)
    assert m["config"]["name"] == "tiny"
    assert all(
        len(m["checkpoints"][k]["sha256"]) == 64
        for k in ("caption.model", "ground.checkpoint", "segment.checkpoint", "ground.text_encoder")
    )
    # the text encoder the grounder loads: the config file's text_encoder_type (the tiny local BERT folder)
    assert m["checkpoints"]["ground.text_encoder"]["spec"] == str(tiny_paths.gdino_config.parent / "bert")


def fake_hub_snapshot(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567"):
    """What huggingface_hub's snapshot_download leaves in <cache>/hf: refs/main naming a snapshot folder."""
    repo = cache / "hf" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(shutil.copytree(folder, repo / "snapshots" / commit))


def test_hub_text_encoder_loads_from_the_subjectdiff_cache(tiny_paths, tmp_path, monkeypatch):
    """GroundingDINO's config names a hub id ("bert-base-uncased"): it loads from its snapshot in
    $SUBJECTDIFF_CACHE/hf (not the default Hugging Face cache), and the manifest records that snapshot."""
    from subjectdiff.datagen.config import GroundConfig
    from subjectdiff.datagen.manifest import run_manifest
    from subjectdiff.datagen.stages.ground import load_groundingdino, text_encoder_spec

    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    snap = fake_hub_snapshot(tmp_path / "cache", "bert-base-uncased", tiny_paths.gdino_config.parent / "bert")
    config_file = tmp_path / "gdino_hub_bert.py"
    config_file.write_text(
        re.sub(
            r"(?m)^text_encoder_type = .*$",
            'text_encoder_type = "bert-base-uncased"',
            tiny_paths.gdino_config.read_text(),
        )
    )
    ground = GroundConfig(config_file=str(config_file), checkpoint=str(tiny_paths.gdino_checkpoint))
    assert text_encoder_spec(ground) == "bert-base-uncased"
    model = load_groundingdino(ground)
    assert Path(model.tokenizer.name_or_path) == snap
    entry = run_manifest(replace(config.tiny(tiny_paths), ground=ground))["checkpoints"]["ground.text_encoder"]
    assert entry == {"spec": "bert-base-uncased", "path": str(snap), "sha256": "", "revision": snap.name}
    default = run_manifest(config.default())["checkpoints"]["ground.text_encoder"]
    assert default["spec"] == "bert-base-uncased" and default["path"] == str(snap)


def test_uncached_hub_text_encoder_is_a_clear_error(tiny_paths, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from subjectdiff.datagen.config import GroundConfig
    from subjectdiff.datagen.manifest import run_manifest
    from subjectdiff.datagen.stages.ground import load_groundingdino
    from subjectdiff.weights import WeightsError, resolve_text_encoder

    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests
    bert = tiny_paths.gdino_config.parent / "bert"
    assert resolve_text_encoder(str(bert), download=False) == bert  # a local folder is used in place
    ground = GroundConfig(
        config_file=str(tiny_paths.gdino_config),
        checkpoint=str(tiny_paths.gdino_checkpoint),
        text_encoder="google-bert/bert-base-uncased",
    )
    with pytest.raises(WeightsError, match=r"'google-bert/bert-base-uncased'.*`subjectdiff datagen weights`"):
        load_groundingdino(ground)
    entry = run_manifest(replace(config.tiny(tiny_paths), ground=ground))["checkpoints"]["ground.text_encoder"]
    assert entry == {"spec": "google-bert/bert-base-uncased", "path": "", "sha256": "", "revision": ""}
    # huggingface_hub keeps one HTTP session per thread, and one made while offline refuses every URL later:
    # the next test gets a fresh one.
    monkeypatch.undo()
    reset_sessions()
