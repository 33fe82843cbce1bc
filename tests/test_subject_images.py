"""The one subject-image function (subjectdiff.model.subject_image): the reference's augmentation, background
photos, determinism per (seed, epoch, key), and training == inference without augmentation. Real photos, CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.model.subject_image import SubjectAugment, background_photo, subject_image
from subjectdiff.photo_records import photo, write_photo_shards
from subjectdiff.train.config import load_config
from subjectdiff.train.data import make_sample, sample_rng

STILL = SubjectAugment(flip_p=0.0, rotate_deg=0.0, perspective=0.0, perspective_p=0.0)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list:
    d = tmp_path_factory.mktemp("subject_shards")
    write_photo_shards(d, n_shards=1, per_shard=5, failures_per_shard=0)
    return list(RecordReader(d))


@pytest.fixture(scope="module")
def backgrounds(tmp_path_factory) -> Path:
    """A folder of background photos (any photos do; BG-20k in real runs), in a subfolder and two formats."""
    d = tmp_path_factory.mktemp("backgrounds")
    (d / "sub").mkdir()
    Image.fromarray(photo("rocket")).save(d / "rocket.jpg")
    Image.fromarray(photo("hubble_deep_field")).resize((300, 200)).save(d / "sub" / "hubble.png")
    return d


def test_without_augmentation_training_and_inference_cut_the_same_image(records):
    """The trainer's subject image with augmentation off is the inference cut-out of the same mask."""
    from subjectdiff.infer.subjects import Subject, SubjectCutter

    cfg = load_config("tiny", ["data.augment=false", "data.fill_holes=false"])
    for rec in records:
        s = make_sample(rec, cfg, 32, sample_rng(0, 0, rec.key))
        for j, i in enumerate(s["objects"]):
            if i < 0:
                continue
            cut = SubjectCutter(size=32)(Subject(rec.image, rec.labels[i], mask=rec.masks[i])).cutout
            assert np.array_equal(s["subjects"][j].transpose(1, 2, 0), cut)


def test_augmentation_is_seeded_per_seed_epoch_and_key(records, backgrounds):
    cfg = load_config("tiny", [f"data.backgrounds='{backgrounds}'"])
    rec = records[0]
    a = make_sample(rec, cfg, 32, sample_rng(0, 3, rec.key))
    b = make_sample(rec, cfg, 32, sample_rng(0, 3, rec.key))
    assert np.array_equal(a["subjects"], b["subjects"]) and np.array_equal(a["image"], b["image"])
    others = [
        make_sample(rec, cfg, 32, sample_rng(seed, epoch, rec.key))["subjects"] for seed, epoch in ((0, 4), (1, 3))
    ]
    assert all(not np.array_equal(a["subjects"], o) for o in others)
    # on a background photo, not on white: its corners are the photo's
    white = make_sample(rec, load_config("tiny"), 32, sample_rng(0, 3, rec.key))
    assert (white["subjects"][0][:, :2, :2] == 255).all() and not (a["subjects"][0] == 255).all()


@pytest.mark.parametrize("hw", [(120, 120), (80, 160), (150, 100)])
def test_a_subject_on_a_background_covers_about_half_of_it(hw):
    """Background replacement (the reference's `synthesize`): the subject's box scaled to half the image area,
    aspect kept, at a random position; here its mask fills its box, so the changed pixels are that box."""
    h, w = hw
    subject = np.asarray(Image.fromarray(photo("coffee")).resize((w, h)))
    mask = np.ones((h, w), bool)
    size = 96
    for seed in range(3):
        rng = np.random.default_rng(seed)
        bg = background_photo(Path(__file__).parents[1] / "datagen" / "sample_images" / "rocket.jpg", size, rng)
        out = subject_image(subject, mask, size, augment=STILL, rng=rng, background=bg)
        changed = (np.abs(out.astype(int) - bg.astype(int)).max(-1) > 0).mean()
        assert 0.42 < changed < 0.55, (hw, seed, changed)
    rng = np.random.default_rng(0)
    bg = np.zeros((size, size, 3), np.uint8)
    quarter = subject_image(
        subject, mask, size, augment=SubjectAugment(0, 0, 0, 0, background_area=0.25), rng=rng, background=bg
    )
    assert 0.2 < (quarter.max(-1) > 0).mean() < 0.3


def test_flip_rotation_and_perspective_move_pixels():
    img, mask = photo("chelsea"), np.zeros(photo("chelsea").shape[:2], bool)
    mask[50:250, 100:400] = True
    plain = subject_image(img, mask, 64)
    flip = subject_image(img, mask, 64, augment=SubjectAugment(1.0, 0, 0, 0), rng=np.random.default_rng(0))
    assert np.array_equal(flip, plain[:, ::-1])
    warped = subject_image(img, mask, 64, augment=SubjectAugment(0, 0, 0.5, 1.0), rng=np.random.default_rng(1))
    turned = subject_image(img, mask, 64, augment=SubjectAugment(0, 10, 0, 0), rng=np.random.default_rng(1))
    assert not np.array_equal(warped, plain) and not np.array_equal(turned, plain)
    assert (warped[0, 0] == 255).all()  # uncovered corners are filled white, as the background
