"""Everything that takes record geometry, fed records like real photos (tests/geometry.py) and any valid record
hypothesis draws: training samples are well-formed and deterministic, crops stay in the image, the subject rules
hold, box conversions and mask RLE round-trip. Then training, preview and selection over the hand-made records.
CPU, no model but the tiny one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.boxes import (
    cxcywh_norm_to_xyxy_norm,
    xyxy_norm_to_pixel_rect,
    xyxy_norm_to_xyxy_pixels,
    xyxy_pixels_to_xyxy_norm,
    xyxy_pixels_union_rect,
)
from subjectdiff.catalogs.catalog import build, query
from subjectdiff.catalogs.selection import REFERENCE_OBJECT_WHERE, load_eligible_objects, select
from subjectdiff.cli import main
from subjectdiff.train.config import load_config
from subjectdiff.train.data import (
    MAX_LOC_TOKENS,
    NoSubject,
    choose_subjects,
    contained,
    crop_box_ok,
    make_sample,
    object_ok,
    sample_rng,
    square_crop,
)
from tests.geometry import decoded, geometry_cases, records, write_geometry_shards

SUBJECT = 32  # subject image side in these tests
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def configs() -> dict[str, object]:
    """The presets on the tiny model, and the options that change what a sample is."""
    out = {"tiny": load_config("tiny"), "paper": load_config("paper", arch="tiny")}
    out["rules_off"] = load_config("tiny", ["data.object_rules=false"])
    out["zoom_random"] = load_config("tiny", ["data.crop='zoom'", "data.pick='random'", "data.no_subject='skip'"])
    out["one_slot"] = load_config("paper", ["model.max_subjects=1", "data.augment=false"], arch="tiny")
    return out


CONFIGS = configs()


def check_sample(s, rec, cfg) -> None:
    """A sample of record `rec` under `cfg` is well-formed (train/data.py's module docstring): shapes, a crop
    inside the image, present slots first with distinct objects that pass the rules, boxes in [0, 1] of the crop
    that pass the post-crop rule, each subject's localization mask non-empty and inside its box, its clause's
    placeholder and tokens in the prompt."""
    d, n, r = cfg.data, cfg.model.max_subjects, cfg.data.resolution
    if isinstance(s, NoSubject):
        assert d.no_subject == "skip" and s.detail and "\n" not in s.detail
        return
    assert s["image"].shape == (3, r, r) and s["image"].dtype == np.uint8
    assert s["subjects"].shape == (n, 3, SUBJECT, SUBJECT) and s["masks"].shape == (n, r // 8, r // 8)
    x0, y0, side = (int(v) for v in s["crop"])
    assert 0 <= x0 <= rec.width - side and 0 <= y0 <= rec.height - side  # never padded
    assert side == min(rec.width, rec.height) if d.crop == "short-side" else 1 <= side <= min(rec.width, rec.height)
    present = s["present"]
    k = int(present.sum())
    assert k <= n and present[:k].all() and not present[k:].any()
    objs = [int(o) for o in s["objects"][:k]]
    assert len(set(objs)) == k and all(0 <= i < len(rec.labels) for i in objs) and (s["objects"][k:] == -1).all()
    assert json.loads(s["labels"]) == [rec.labels[i] for i in objs]
    assert s["prompt"].startswith(rec.caption.rstrip())
    for j, i in enumerate(objs):
        b = s["boxes"][j]
        assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
        assert object_ok(rec, i, d)
        if d.object_rules:
            assert crop_box_ok(b, d) and not any(
                contained(rec.boxes[c], rec.boxes[i], d.max_containment) for c in objs[:j]
            )
        m = s["masks"][j]
        assert m.max() > 0 and m.min() >= 0 and m.max() <= 1
        ys, xs = np.nonzero(m)
        cell, slack = 1 / m.shape[0], 1 / side  # a latent cell; one pixel of the crop
        assert xs.min() * cell < b[2] + slack and (xs.max() + 1) * cell > b[0] - slack
        assert ys.min() * cell < b[3] + slack and (ys.max() + 1) * cell > b[1] - slack
        assert (xs * cell < b[2] + slack).all() and ((xs + 1) * cell > b[0] - slack).all()
        assert (ys * cell < b[3] + slack).all() and ((ys + 1) * cell > b[1] - slack).all()
        p = int(s["placeholder_pos"][j])
        assert 1 <= p < 76 and p in s["loc_pos"][j]
    assert (s["boxes"][k:] == 0).all() and (s["masks"][k:] == 0).all() and (s["placeholder_pos"][k:] == -1).all()
    assert (s["loc_pos"] < 76).all() and s["loc_pos"].shape == (n, MAX_LOC_TOKENS)


def same(a, b) -> bool:
    if isinstance(a, NoSubject) or isinstance(b, NoSubject):
        return a == b
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_hand_made_record_gives_a_well_formed_sample(config):
    cfg = CONFIGS[config]
    for name, record in geometry_cases().items():
        rec = decoded(record)
        for epoch in range(3):
            s = make_sample(rec, cfg, SUBJECT, sample_rng(0, epoch, rec.key))
            check_sample(s, rec, cfg)
            assert same(s, make_sample(rec, cfg, SUBJECT, sample_rng(0, epoch, rec.key))), name


@PROPERTY
@given(record=records(), config=st.sampled_from(list(CONFIGS)), seed=st.integers(0, 3))
def test_any_valid_record_gives_a_well_formed_deterministic_sample(record, config, seed):
    cfg, rec = CONFIGS[config], decoded(record)
    s = make_sample(rec, cfg, SUBJECT, sample_rng(seed, 0, rec.key))
    check_sample(s, rec, cfg)
    assert same(s, make_sample(rec, cfg, SUBJECT, sample_rng(seed, 0, rec.key)))


@PROPERTY
@given(record=records(), pick=st.sampled_from(["score", "random"]), n=st.integers(1, 3), data=st.data())
def test_chosen_subjects_pass_the_rules_in_order(record, pick, n, data):
    rec = decoded(record)
    cfg = load_config("tiny", [f"data.pick='{pick}'"]).data
    allowed = data.draw(st.none() | st.lists(st.integers(0, max(len(rec.labels) - 1, 0)), unique=True))
    chosen = choose_subjects(rec, n, cfg, np.random.default_rng(0), allowed)
    assert len(chosen) <= n and len(set(chosen)) == len(chosen)
    assert allowed is None or set(chosen) <= set(allowed)
    for j, i in enumerate(chosen):
        assert object_ok(rec, i, cfg)
        assert not any(contained(rec.boxes[c], rec.boxes[i], cfg.max_containment) for c in chosen[:j])
    if pick == "score":
        scores = [float(rec.scores[i]) for i in chosen]
        assert scores == sorted(scores, reverse=True)


@settings(max_examples=300, deadline=None)
@given(
    w=st.integers(1, 600),
    h=st.integers(1, 600),
    policy=st.sampled_from(["short-side", "zoom"]),
    boxes=st.lists(st.tuples(*[st.floats(0, 1)] * 4), max_size=4),
    seed=st.integers(0, 100),
)
def test_square_crop_is_inside_the_image_and_contains_the_subjects_that_fit(w, h, policy, boxes, seed):
    px = np.array(
        [[min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h] for a, b, c, d in boxes], np.float64
    ).reshape(-1, 4)
    x0, y0, side = square_crop(w, h, px, np.random.default_rng(seed), policy)
    short = min(w, h)
    assert 0 <= x0 <= w - side and 0 <= y0 <= h - side and 1 <= side <= short
    if policy == "short-side" or not len(px):
        assert side == short
    unions = [xyxy_pixels_union_rect(px[:k]) for k in range(1, len(px) + 1)]
    fits = [k for k, u in enumerate(unions, 1) if max(u[2] - u[0], u[3] - u[1]) <= short]
    if fits:  # the largest prefix of the subjects (in pick order) that fits is in the crop
        ux0, uy0, ux1, uy1 = xyxy_pixels_union_rect(px[: max(fits)])
        assert x0 <= ux0 and y0 <= uy0 and x0 + side >= ux1 and y0 + side >= uy1


@settings(max_examples=200, deadline=None)
@given(box=st.tuples(*[st.floats(0, 1)] * 4), w=st.integers(1, 4000), h=st.integers(1, 4000))
def test_box_conversions_round_trip_and_stay_in_the_image(box, w, h):
    xyxy = np.array([[min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])]])
    back = xyxy_pixels_to_xyxy_norm(xyxy_norm_to_xyxy_pixels(xyxy, w, h), w, h)
    assert np.allclose(back, xyxy, atol=1e-9)
    x0, y0, x1, y1 = xyxy_norm_to_pixel_rect(list(xyxy[0]), w, h)
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert x0 <= xyxy[0, 0] * w + 1e-9 or x0 == w - 1  # a zero-width box on the right border: its last pixel
    assert xyxy[0, 2] * w <= x1 + 1e-9 or x1 == x0 + 1
    cx, cy = (xyxy[0, 0] + xyxy[0, 2]) / 2, (xyxy[0, 1] + xyxy[0, 3]) / 2
    bw, bh = xyxy[0, 2] - xyxy[0, 0], xyxy[0, 3] - xyxy[0, 1]
    out = cxcywh_norm_to_xyxy_norm(torch.tensor([[cx, cy, bw, bh]], dtype=torch.float64)).numpy()
    assert np.allclose(out, xyxy, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 48), w=st.integers(1, 48), seed=st.integers(0, 2**32 - 1), p=st.floats(0, 1))
def test_mask_rle_round_trips(h, w, seed, p):
    m = np.random.default_rng(seed).random((h, w)) < p
    assert np.array_equal(mask_codec.decode(mask_codec.encode(m)), m)
    assert np.array_equal(mask_codec.decode_many([mask_codec.encode(m)] * 2, h, w), np.stack([m, m]))


@pytest.fixture(scope="module")
def geometry_shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("geometry")
    write_geometry_shards(d)
    build(d)
    return d


def test_reference_selection_on_real_photo_geometry(geometry_shards):
    """`--object-where reference` and the trainer's rules agree: the SQL keeps every object the trainer's
    per-object rules accept (it cannot test segments in a box, so it may keep more), names people by "people",
    and leaves out the near-white image, whose white_fraction the catalog holds."""
    d = geometry_shards
    n = select(d, None, d / "ref.parquet", object_where=REFERENCE_OBJECT_WHERE)
    eligible = load_eligible_objects(d / "ref.parquet")
    cases = geometry_cases()
    key = {name: r.key for name, r in cases.items()}
    assert n == len(eligible) and not {key["white"], key["empty"]} & set(eligible)
    cfg = load_config("paper").data
    for name, record in cases.items():
        rec = decoded(record)
        if name != "white":
            assert {i for i in range(len(rec.labels)) if object_ok(rec, i, cfg)} <= set(eligible.get(rec.key, []))
    crowd = decoded(cases["crowd"])
    assert any(crowd.labels[i] == "person" for i in eligible[key["crowd"]])  # "three people" names them
    wf = {r["key"]: r["white_fraction"] for r in query(d, "SELECT key, white_fraction FROM samples").to_pylist()}
    assert wf[key["white"]] == pytest.approx(0.6, abs=0.02) and wf[key["apart"]] < 0.1


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "tiny"],
        ["--preset", "paper", "--arch", "tiny", "data.num_workers=2", "run.precision='fp32'"],
        ["--preset", "tiny", "--object-where", "reference", "data.num_workers=2", "data.batch_size=3"],
    ],
    ids=["tiny", "paper-tiny", "reference"],
)
def test_training_and_preview_run_over_real_photo_geometry(geometry_shards, tmp_path, argv):
    """A few steps and a preview on records like real photos, with the loaders' settings as given: no crash, the
    logged losses finite, and every previewed subject a well-formed one."""
    data = (
        ["--catalog", str(geometry_shards / "catalog.duckdb")]
        if "--object-where" in argv
        else ["--records", str(geometry_shards)]
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *argv,
                *data,
                "--out",
                str(out),
                "run.max_steps=3",
                "run.ckpt_every=100",
                "run.log_every=1",
                "run.progress='off'",
            ]
        )
        == 0
    )
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(np.isfinite(r["loss"]) for r in logs)
    page = tmp_path / "preview"
    assert main(["train", "preview", *argv, *data, "--sample", "6", "--out", str(page)]) == 0
    rows = [json.loads(line) for line in (page / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert all(0 <= v <= 1 for b in row["boxes"] for v in b) and len(row["objects"]) == len(row["labels"])
