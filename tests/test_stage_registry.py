"""Adding a stage is one class plus one registry entry: a stage registered here, in the test process only,
runs through the real pipeline (local Ray, the tiny preset) and its effect lands in the records and failures."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray import cloudpickle  # Ray's own copy, the one that pickles its tasks' arguments

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.datagen.stages import registry
from subjectdiff.datagen.stages.common import fail, live

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"


# ---------------------------------------------------------------------------- the stage: its whole module


@dataclass
class BrightnessConfig:
    min_mean: float = 10.0  # mean pixel value (0-255) below which an image is too dark to train on


class Brightness:
    """No model: records each image's mean pixel value in extra["brightness"], and fails the very dark ones."""

    def __init__(self, cfg: BrightnessConfig):
        self.cfg = cfg

    def __call__(self, items: list[dict]) -> list[dict]:
        for i in live(items):
            mean = float(np.asarray(items[i]["image"]).mean())
            items[i].setdefault("extra", {})["brightness"] = round(mean, 2)
            if mean < self.cfg.min_mean:
                fail(items[i], "brightness", f"mean pixel value {mean:.1f} below min_mean {self.cfg.min_mean}")
        return items


# ... and its one registry entry (in a built-in stage's case, one line of registry.STAGES)
BRIGHTNESS = registry.Stage("brightness", "brightness", Brightness, model=False, config=BrightnessConfig)


@pytest.fixture
def brightness_stage():
    """The stage registered after the captioner for one test; Ray pickles this module's classes by value, since
    the workers cannot import the tests."""
    registry.register(BRIGHTNESS, after="caption")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield BRIGHTNESS
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    registry.unregister("brightness")


def test_a_registered_stage_joins_the_chain_the_fingerprint_and_the_settings(brightness_stage):
    from subjectdiff.datagen.job import active_stages, load_config
    from subjectdiff.datagen.plan import stages_fingerprint

    cfg = load_config("default", overrides=["extra.brightness.min_mean=12"])
    assert active_stages(cfg.stages) == (
        "caption",
        "brightness",
        "nouns",
        "ground",
        "filter",
        "segment",
        "identity",
        "curate",
    )
    assert "brightness" not in cfg.stage_pools()  # no model: a CPU task per block, no actor pool
    assert brightness_stage.settings(cfg.stages) == BrightnessConfig(min_mean=12)
    other = load_config("default", overrides=["extra.brightness.min_mean=30"])
    assert stages_fingerprint(other.stages) != stages_fingerprint(cfg.stages)  # its settings shape records
    with pytest.raises(ValueError, match="registered already"):
        registry.register(BRIGHTNESS)
    with pytest.raises(ValueError, match="stage name"):
        registry.register(registry.Stage("Not A Name", "x", Brightness))


def test_a_stage_registered_in_the_test_runs_through_the_real_pipeline(tmp_path, brightness_stage):
    from subjectdiff.datagen.job import load_config
    from subjectdiff.datagen.run import run

    src = tmp_path / "in"
    src.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg")):
        (src / p.name).write_bytes(p.read_bytes())
    dark = {"dark_chelsea.jpg": "chelsea.jpg", "dark_coffee.jpg": "coffee.jpg"}
    for name, photo in dark.items():  # the same photos at 3 % of their brightness: mean pixel value below 4
        pixels = np.asarray(Image.open(SAMPLES / photo).convert("RGB")) * 0.03
        Image.fromarray(pixels.astype(np.uint8)).save(src / name, quality=95)
    cfg = load_config("tiny", overrides=["extra.brightness.min_mean=10", "pipeline.shard_size=4"])
    summary = run(str(src), tmp_path / "out", cfg, progress_every=60)

    assert summary.incomplete == [] and summary.ok + summary.failed == 8
    fails = catalog.query(tmp_path / "out", "SELECT source, stage, reason FROM failures").to_pylist()
    dark_fails = sorted((Path(f["source"]).name, f["stage"]) for f in fails if f["stage"] == "brightness")
    assert dark_fails == [(name, "brightness") for name in sorted(dark)]  # only the dark ones, at their stage
    assert all(f["reason"].startswith("mean pixel value") for f in fails if f["stage"] == "brightness")
    records = list(RecordReader(tmp_path / "out", decode_image=False, decode_masks=False))
    assert records and all(r.meta["extra"]["brightness"] >= 10 for r in records)  # every record went through it
    hubble = [r for r in records if r.meta["source"].endswith("hubble_deep_field.jpg")]
    assert all(r.meta["extra"]["brightness"] == pytest.approx(19.2, abs=0.1) for r in hubble)  # dark, not too dark
