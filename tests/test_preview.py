"""`subjectdiff train preview`: what the trainer would feed, on demo records (subjectdiff/photo_records.py's
photos), with any preset (no model is built); the contact sheet as a person sees it in headless Chromium (skipped
when Debian's `chromium` is not installed). The Chromium test keeps its screenshot at tests/artifacts/preview.png."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from subjectdiff.catalogs.catalog import build
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.cli import main
from subjectdiff.photo_records import write_photo_shards
from subjectdiff.train.config import load_config
from subjectdiff.train.data import contained, crop_box_ok, object_ok
from tests.browser import chromium, needs_chromium, page_errors, probe

ARTIFACTS = Path(__file__).parent / "artifacts"
# Counts what the browser laid out and decoded (run only in a probe copy of the page).
PROBE = """<script nonce="probe">window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("article.sample img")];
  const r = {samples: document.querySelectorAll("article.sample").length, images: imgs.length,
             decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
             placeholders: document.querySelectorAll(".prompt .ph").length,
             loc: document.querySelectorAll(".prompt .loc").length, height: document.documentElement.scrollHeight};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});</script>"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("preview_shards")
    write_photo_shards(d, n_shards=2, per_shard=4)
    build(d)
    return d


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def check_rules(rows: list[dict], demo: Path, cfg) -> None:
    """Every chosen object passes the per-object rules, none is contained in one chosen before it, its box
    passes the crop rule, and the prompt marks its clause's placeholder and label."""
    recs = {r.key: r for r in RecordReader(demo)}
    for row in rows:
        rec = recs[row["key"]]
        for j, i in enumerate(row["objects"]):
            assert object_ok(rec, i, cfg.data), (row, i)
            assert not any(contained(rec.boxes[c], rec.boxes[i], cfg.data.max_containment) for c in row["objects"][:j])
            assert crop_box_ok(np.array(row["boxes"][j]), cfg.data)
            assert rec.labels[i] == row["labels"][j] and row["placeholder_pos"][j] in row["loc_pos"][j]
        scores = [float(rec.scores[i]) for i in row["objects"]]
        assert scores == sorted(scores, reverse=True)  # the reference's order: descending score
        assert row["prompt"] == rec.caption + "".join(f", the {lab} is sks" for lab in row["labels"])


def test_preview_writes_what_the_trainer_feeds(demo, tmp_path):
    out = tmp_path / "pv"
    assert (
        main(["train", "preview", "--preset", "tiny", "--records", str(demo), "--sample", "5", "--out", str(out)]) == 0
    )
    rows = rows_of(out)
    assert len(rows) == 5 and {"key", "objects", "boxes", "prompt", "placeholder_pos", "loc_pos"} <= set(rows[0])
    check_rules(rows, demo, load_config("tiny"))
    # exactly the trainer's stream: its first batches' keys and chosen objects, in order
    from subjectdiff.train.data import BatchStream, TrainSamples, make_reader

    cfg = load_config("tiny", [f"data.shards=['{demo}']"])
    stream = iter(BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 0))
    fed = [b for _, b in zip(range(3), stream)]
    keys = [k for b in fed for k in b["key"]][:5]
    assert [r["key"] for r in rows] == keys
    objects = [[int(o) for o in row if o >= 0] for b in fed for row in b["objects"]][:5]
    assert [r["objects"] for r in rows] == objects
    page = (out / "index.html").read_text()
    assert page.count('<article class="sample"') == 5 and "Content-Security-Policy" in page


def test_preview_runs_offline_with_the_paper_preset_and_object_where(demo, tmp_path):
    out = tmp_path / "paper"
    assert (
        main(
            [
                "train",
                "preview",
                "--preset",
                "paper",
                "--catalog",
                str(demo / "catalog.duckdb"),
                "--object-where",
                "label <> 'flag'",
                "--sample",
                "4",
                "--out",
                str(out),
                "data.batch_size=2",
                "data.num_workers=0",
            ]
        )
        == 0
    )
    rows = rows_of(out)
    assert len(rows) == 4 and all("flag" not in r["labels"] for r in rows)
    check_rules(rows, demo, load_config("paper"))
    assert (out / "selection.parquet").is_file()
    img = re.search(r'src="data:image/png;base64,[^"]+"', (out / "index.html").read_text())
    assert img  # the page embeds its images
    assert (
        main(["train", "preview", "--preset", "tiny", "--records", str(demo), "--sample", "0", "--out", str(out)]) == 2
    )


@needs_chromium
def test_preview_renders_in_headlesschromium(demo, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    out = ARTIFACTS / "preview"
    n = 6
    assert (
        main(
            [
                "train",
                "preview",
                "--preset",
                "tiny",
                "--records",
                str(demo),
                "--sample",
                str(n),
                "--out",
                str(out),
                f"data.backgrounds='{Path(__file__).parents[1] / 'datagen' / 'sample_images'}'",
            ]
        )
        == 0
    )
    rows = rows_of(out)
    subjects = sum(len(r["objects"]) for r in rows)
    html_text = (out / "index.html").read_text(encoding="utf-8")
    seen = probe(html_text, PROBE, tmp_path)
    assert seen["samples"] == n and seen["images"] == n + subjects == seen["decoded"], seen
    assert seen["placeholders"] == subjects and seen["loc"] >= 2 * subjects, seen  # label + placeholder each
    shot = ARTIFACTS / "preview.png"
    shot.unlink(missing_ok=True)
    height = min(max(seen["height"], 800), 12000)
    run = chromium(out / "index.html", tmp_path / "profile2", f"--window-size=1280,{height}", f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert page_errors(run.stderr) == [], "\n".join(page_errors(run.stderr))
    with Image.open(shot) as im:
        assert im.size == (1280, height)
        assert np.asarray(im.convert("RGB")).std() > 20, "the screenshot is blank"
