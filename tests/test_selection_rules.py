"""The reference code's object selection (custom_dataset.py), as data options (train/data.py) and as SQL
(`--object-where`), on hand-made records over a real photo: an object just inside and just outside each bound.
Duplicate nouns get distinct localization tokens. CPU, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from subjectdiff.catalogs.catalog import build
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import Record, make_key, object_from_arrays
from subjectdiff.catalogs.selection import REFERENCE_OBJECT_WHERE, load_eligible_objects, select
from subjectdiff.catalogs.tokens import clip_token_positions
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.photo_records import ellipse_mask, encode, photo
from subjectdiff.train.config import DataConfig, load_config
from subjectdiff.train.data import choose_subjects, crop_box_ok, make_sample, object_ok, sample_rng

W, H = 300, 200
CAPTION = "a cat with a ball near a teddy bear and galaxies"


def image() -> np.ndarray:
    return np.asarray(Image.fromarray(photo("chelsea")).resize((W, H)))


def box_px(x0: int, y0: int, w: int, h: int) -> list[float]:
    """A box of whole pixels, normalized xyxy."""
    return [x0 / W, y0 / H, (x0 + w) / W, (y0 + h) / H]


def rect_mask(box: list[float], rows: float = 1.0) -> np.ndarray:
    """The box's top `rows` fraction of rows filled."""
    m = np.zeros((H, W), bool)
    x0, y0, x1, y1 = round(box[0] * W), round(box[1] * H), round(box[2] * W), round(box[3] * H)
    m[y0 : y0 + round((y1 - y0) * rows), x0:x1] = True
    return m


def obj(box, mask=None, score=0.9, label="ball", phrase=None):
    phrase = phrase or label
    start = CAPTION.index(phrase)
    span = [start, start + len(phrase)]
    return object_from_arrays(
        label=label,
        phrase=phrase,
        span=span,
        tokens=clip_token_positions(CAPTION, span),
        box=box,
        score=score,
        mask=ellipse_mask(H, W, box) if mask is None else mask,
        mask_score=0.9,
    )


def record(name: str, objects, img: np.ndarray | None = None, caption: str = CAPTION) -> Record:
    src = f"rules://{name}"
    return Record(
        key=make_key(src),
        image=encode(image() if img is None else img),
        image_ext="jpg",
        caption=caption,
        width=W,
        height=H,
        source=src,
        objects=list(objects),
    )


BASE = box_px(60, 40, 120, 100)  # area 0.2, aspect 1.2, an inscribed ellipse mask: fill 0.785
ABOVE_BOX = box_px(60, 20, 120, 100)


def larger_than_box() -> np.ndarray:
    m = rect_mask(ABOVE_BOX)
    m[20:40, 60:90] = False  # background inside the box (segments: 2)
    m[150:200, 0:300] = True  # and more pixels outside it than the box has
    return m


# name -> (objects, does object 0 pass the per-object rules)
SINGLE = {
    "ok": ([obj(BASE)], True),
    "area_low_in": ([obj(box_px(20, 20, 102, 50))], True),  # 0.085
    "area_low_out": ([obj(box_px(20, 20, 90, 50))], False),  # 0.075
    "area_high_in": ([obj(box_px(10, 10, 270, 152))], True),  # 0.684
    "area_high_out": ([obj(box_px(10, 10, 270, 160))], False),  # 0.72
    "aspect_low_in": ([obj(box_px(20, 10, 57, 180))], True),  # 0.317
    "aspect_low_out": ([obj(box_px(20, 10, 51, 180))], False),  # 0.283
    "aspect_high_in": ([obj(box_px(20, 20, 174, 60))], True),  # 2.9
    "aspect_high_out": ([obj(box_px(20, 20, 186, 60))], False),  # 3.1
    "score_in": ([obj(BASE, score=0.31)], True),
    "score_out": ([obj(BASE, score=0.29)], False),
    "two_word_label": ([obj(BASE, label="teddy bear")], False),
    # the label is not in the caption, its phrase (the caption's plural) is: the object is named (was refused)
    "plural_phrase": ([obj(BASE, label="galaxy", phrase="galaxies")], True),
    "fill_in": ([obj(BASE, mask=rect_mask(BASE, 0.62))], True),
    "fill_out": ([obj(BASE, mask=rect_mask(BASE, 0.58))], False),
    "mask_larger_than_box": ([obj(ABOVE_BOX, mask=larger_than_box())], False),
}


def inner(k: int, n: int) -> object:
    """The k-th of n small objects side by side inside BASE."""
    w = 100 // n
    return obj(box_px(70 + k * w, 60, w - 4, 30), score=0.5)


SEGMENTS = {  # object 0's box holds its own mask, background and n other objects' masks
    "segments_5": ([obj(BASE), *[inner(k, 3) for k in range(3)]], True),
    "segments_6": ([obj(BASE), *[inner(k, 4) for k in range(4)]], False),
}


@pytest.fixture(scope="module")
def rules_data(tmp_path_factory) -> tuple[Path, dict[str, object]]:
    """One shard of the hand-made records, with its catalog; {case name: decoded record}."""
    d = tmp_path_factory.mktemp("rules")
    with ShardWriter(d, "00000") as w:
        for name, (objects, _) in {**SINGLE, **SEGMENTS}.items():
            w.write(record(name, objects))
    build(d)
    recs = {r.source.split("//")[1]: r for r in RecordReader(d)}
    return d, recs


@pytest.mark.parametrize("name", [*SINGLE, *SEGMENTS])
def test_each_rule_just_inside_and_just_outside(rules_data, name):
    _, recs = rules_data
    want = {**SINGLE, **SEGMENTS}[name][1]
    assert object_ok(recs[name], 0, DataConfig()) == want
    # every rule can be turned off: then only the sanity checks remain
    assert object_ok(recs[name], 0, DataConfig(object_rules=False))


def test_the_same_rules_through_object_where(rules_data, tmp_path):
    """REFERENCE_OBJECT_WHERE over the catalog keeps exactly the objects the data options keep (the rules SQL
    can express: all but the segments in a box), and leaves samples without an eligible object out."""
    from subjectdiff.cli import main

    d, recs = rules_data
    out = tmp_path / "sel.parquet"
    assert main(["catalog", "select", str(d), "--object-where", "reference", "--out", str(out)]) == 0
    eligible = load_eligible_objects(out)
    assert {n for n, r in recs.items() if n in SINGLE and r.key in eligible} == {
        n for n, (_, ok) in SINGLE.items() if ok
    }
    assert all(eligible[r.key] == [0] for n, r in recs.items() if n in SINGLE and r.key in eligible)
    # the segments rule is the trainer's: SQL keeps object 0 of both; the small inner objects fail the area rule
    assert eligible[recs["segments_5"].key] == eligible[recs["segments_6"].key] == [0]
    # --where and --object-where together; without --object-where there is no objects column
    n = select(d, "caption LIKE 'a cat%'", tmp_path / "both.parquet", object_where="score > 0.8")
    assert n == len(load_eligible_objects(tmp_path / "both.parquet")) == len(recs) - 2  # all but the 0.3x scores
    select(d, "TRUE", tmp_path / "plain.parquet")
    assert load_eligible_objects(tmp_path / "plain.parquet") is None
    assert REFERENCE_OBJECT_WHERE.startswith("area > 0.08")


def test_containment_in_a_chosen_box_and_score_order(tmp_path):
    big = box_px(20, 20, 200, 150)  # x 20..220
    cases = {  # the second box (60 x 100 px) overlaps `big` by half of it, or by 0.9 of it
        "contained_05": [obj(big, score=0.9), obj(box_px(190, 40, 60, 100), score=0.8)],
        "contained_09": [obj(big, score=0.9), obj(box_px(166, 40, 60, 100), score=0.8)],
        "contained_lower_first": [obj(box_px(30, 30, 100, 95), score=0.95), obj(big, score=0.9)],
        "order": [
            obj(box_px(10, 10, 80, 80), score=0.5),
            obj(box_px(110, 10, 80, 80), score=0.9),
            obj(box_px(210, 10, 80, 80), score=0.7),
        ],
    }
    with ShardWriter(tmp_path, "00000") as w:
        for name, objects in cases.items():
            w.write(record(name, objects))
    recs = {r.source.split("//")[1]: r for r in RecordReader(tmp_path)}
    cfg, rng = DataConfig(), np.random.default_rng(0)
    assert choose_subjects(recs["contained_05"], 2, cfg, rng) == [0, 1]  # 0.5 of the smaller box: kept
    assert choose_subjects(recs["contained_09"], 2, cfg, rng) == [0]  # 0.9 > 0.8: skipped
    assert choose_subjects(recs["contained_lower_first"], 2, cfg, rng) == [0]  # the box containing it is skipped
    assert choose_subjects(recs["order"], 2, cfg, rng) == [1, 2]  # descending score
    random = DataConfig(pick="random")
    picks = {tuple(sorted(choose_subjects(recs["order"], 2, random, np.random.default_rng(s)))) for s in range(20)}
    assert len(picks) == 3  # any two of the three
    assert choose_subjects(recs["order"], 2, cfg, rng, allowed=[0, 2]) == [2, 0]  # only the eligible ones


def test_near_white_images_and_crop_rule(tmp_path):
    img = image().copy()
    white = img.copy()
    white[: int(0.12 * H)] = 255  # 12 % of the pixels near-white
    few = img.copy()
    few[: int(0.08 * H)] = 255
    with ShardWriter(tmp_path, "00000") as w:
        w.write(record("white", [obj(BASE)], white))
        w.write(record("few", [obj(BASE)], few))
    recs = {r.source.split("//")[1]: r for r in RecordReader(tmp_path)}
    rng = np.random.default_rng(0)
    assert choose_subjects(recs["white"], 2, DataConfig(), rng) == []
    assert choose_subjects(recs["few"], 2, DataConfig(), rng) == [0]
    assert choose_subjects(recs["white"], 2, DataConfig(max_white=0.2), rng) == [0]
    # after the crop: more than 200 px of a 512 crop, height / width in (0.3, 3)
    cfg = DataConfig()
    side = 15 / 512
    assert crop_box_ok(np.array([0, 0, side, side]), cfg) and not crop_box_ok(np.array([0, 0, 14 / 512, 14 / 512]), cfg)
    assert crop_box_ok(np.array([0, 0, 0.1, 0.29]), cfg) and not crop_box_ok(np.array([0, 0, 0.1, 0.31]), cfg)
    assert not crop_box_ok(np.array([0, 0, 0.5, 0.14]), cfg)


def test_duplicate_nouns_get_their_own_clause_tokens(tmp_path):
    caption = "two dogs on a lawn"
    start = caption.index("dogs")
    span = [start, start + 4]
    dogs = [
        object_from_arrays(
            label="dog",
            phrase="dogs",
            span=span,
            tokens=clip_token_positions(caption, span),
            box=b,
            score=s,
            mask=ellipse_mask(H, W, b),
            mask_score=0.9,
        )
        for b, s in ((box_px(10, 20, 80, 150), 0.9), (box_px(110, 30, 80, 140), 0.8))
    ]  # both in a 200 px crop
    with ShardWriter(tmp_path, "00000") as w:
        w.write(record("dogs", dogs, caption=caption))
    rec = next(iter(RecordReader(tmp_path)))
    cfg = load_config("tiny")
    s = make_sample(rec, cfg, 32, sample_rng(0, 0, rec.key))
    assert s["prompt"] == "two dogs on a lawn, the dog is sks, the dog is sks" and s["present"].all()
    a, b = ({int(p) for p in row if p >= 0} for row in s["loc_pos"])
    assert a and b and not a & b  # one token is never pulled toward two masks
    assert {int(s["placeholder_pos"][0])} < a and {int(s["placeholder_pos"][1])} < b
    dog = s["input_ids"][sorted(a)[0]]
    assert all(s["input_ids"][p] == dog for p in (min(a), min(b)))  # each set holds its clause's "dog"
    # the caption phrase ("phrase") is shared: what the reference's clause tokens avoid
    shared = make_sample(rec, load_config("tiny", ["data.loc_tokens=['phrase']"]), 32, sample_rng(0, 0, rec.key))
    assert set(shared["loc_pos"][0]) == set(shared["loc_pos"][1])
    assert json.loads(s["labels"]) == ["dog", "dog"]
