"""The HTML report: overlays drawn where the masks and boxes are, escaping, sampling, the CLI, and the page
as a person sees it in headless Chromium (skipped when Debian's `chromium` is not installed).

The Chromium test keeps its screenshot at tests/artifacts/report.png (and the page at report.html).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from subjectdiff.catalogs.catalog import CatalogError, build
from subjectdiff.catalogs.report import build_report
from subjectdiff.catalogs.report.draw import overlay
from subjectdiff.catalogs.report.records import caption_html
from subjectdiff.catalogs.report.run import throughput
from subjectdiff.catalogs.report.thumbnails import read_members
from subjectdiff.catalogs.schema import Failure, Record, make_key
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.cli import main
from subjectdiff.photo_records import photo_record, write_photo_shards
from tests.browser import chromium, needs_chromium, page_errors, probe

ARTIFACTS = Path(__file__).parent / "artifacts"
HOSTILE_CAPTION_PREFIX = '<script>alert("caption")</script><img src=x onerror=alert(1)> & '
# The shape datagen's Manifest writes (datagen/manifest.py); the report renders any JSON object.
MANIFEST = {
    "input": "photos/",
    "preset": "tiny",
    "config": {"stages": {"ground": {"box_threshold": 0.35}}, "pipeline": {"batch_size": 8}},
    "models": {
        "ground": {"checkpoint": {"spec": "IDEA-Research/grounding-dino-tiny"}},
        "segment": {"model_type": "vit_b", "spec": "sam_vit_b", "sha256": "ec2df62732614e57"},
    },
    "thresholds": {"box_threshold": 0.35, "text_threshold": 0.25, "detections": [1, 8]},
    "versions": {"torch": "2.14.1", "note": "<b>not bold</b>"},
    "code_revision": "d420520+dirty",
    "runs": [
        {
            "command": ["subjectdiff", "datagen", "run"],
            "start": 1_790_000_000.0,
            "end": 1_790_000_600.0,
            "status": "complete",
        }
    ],
    "counts": {"samples": 9, "failures": 3},
    "start": 1_790_000_000.0,
    "end": 1_790_000_600.0,
}


# ------------------------------------------------------------------------------------------ test data


def _hostile_record() -> Record:
    """A record whose caption, source and phrase spans carry HTML that must come out as text."""
    rec, _ = photo_record("chelsea", source='skimage://chelsea/"><script>alert("source")</script>')
    shift = len(HOSTILE_CAPTION_PREFIX)
    rec.caption = HOSTILE_CAPTION_PREFIX + rec.caption
    for o in rec.objects:
        o.span = [o.span[0] + shift, o.span[1] + shift]
    rec.key = make_key(rec.source)
    return rec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two photo shards (4 ok + 1 failed each), a shard with one hostile record and one hostile failure
    reason, a manifest, and the catalog: 9 ok records, 3 failures."""
    root = tmp_path_factory.mktemp("report_data")
    write_photo_shards(root, n_shards=2, per_shard=4, failures_per_shard=1)
    with ShardWriter(root, "00002") as w:
        w.write(_hostile_record())
        w.fail(Failure(key=make_key("bad://x"), source="bad://x", stage="ground", reason="<b>no box</b> found"))
    (root / "manifest.json").write_text(json.dumps(MANIFEST))
    build(root)
    return root


class _Cards(HTMLParser):
    """Counts record cards (broken ones apart) and collects ids of the page's sections."""

    def __init__(self):
        super().__init__()
        self.cards = self.broken = 0
        self.ids: list[str] = []
        self.objects_per_card: list[int] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "article" and "card" in classes:
            self.cards += 1
            self.broken += "broken" in classes
            self.objects_per_card.append(0)
        if tag == "span" and "tag" in classes:
            self.objects_per_card[-1] += 1
        if a.get("id"):
            self.ids.append(a["id"])


def _parse(path: Path) -> _Cards:
    p = _Cards()
    p.feed(path.read_text(encoding="utf-8"))
    return p


# ----------------------------------------------------------------------------------------- unit tests


def test_overlay_tints_inside_the_mask_only_and_draws_the_box_edges():
    h, w = 60, 80
    image = np.full((h, w, 3), 100, np.uint8)
    box = [0.25, 0.2, 0.75, 0.8]  # normalized xyxy -> pixels x 20..60, y 12..48
    x0, y0, x1, y1 = 20, 12, 60, 48
    mask = np.zeros((h, w), bool)
    mask[20:40, 28:52] = True  # strictly inside the box, away from its edges
    red = (255, 0, 0)
    out = overlay(image, mask[None], np.asarray([box]), [red], alpha=0.5, thickness=2)

    assert out.shape == image.shape and out.dtype == np.uint8
    inside = out[mask]
    assert (inside == [178, 50, 50]).all(), "mask pixels blend half-way to the object's color"
    edges = np.zeros((h, w), bool)
    edges[y0 : y0 + 2, x0:x1] = edges[y1 - 2 : y1, x0:x1] = True
    edges[y0:y1, x0 : x0 + 2] = edges[y0:y1, x1 - 2 : x1] = True
    assert (out[edges] == red).all(), "the box is drawn on its pixel extent"
    untouched = ~mask & ~edges
    assert (out[untouched] == 100).all(), "no pixel outside the mask and the box edges changes"
    assert (out[y0 - 1, x0:x1] == 100).all() and (out[y1, x0:x1] == 100).all()
    assert (image == 100).all(), "the input image is not modified"


def test_overlay_gives_each_object_its_own_color():
    image = np.zeros((10, 20, 3), np.uint8)
    masks = np.zeros((2, 10, 20), bool)
    masks[0, :, :10] = masks[1, :, 10:] = True
    boxes = np.asarray([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    out = overlay(image, masks, boxes, [(0, 255, 0), (0, 0, 255)], alpha=1.0, thickness=0)
    assert (out[:, :10] == (0, 255, 0)).all() and (out[:, 10:] == (0, 0, 255)).all()


def test_caption_highlights_spans_in_their_colors_and_escapes_the_text():
    caption = "a <dog> & a cat"
    spans = [[2, 7], [12, 15]]
    got = caption_html(caption, spans, [(230, 25, 75), (60, 180, 75)], ["dog", "cat"])
    assert "<dog>" not in got and "&lt;dog&gt;" in got and "&amp;" in got
    marks = re.findall(r'<mark style="[^"]*border-color:(#[0-9a-f]{6})"[^>]*>([^<]*)</mark>', got)
    assert marks == [("#e6194b", "&lt;dog&gt;"), ("#3cb44b", "cat")]
    assert got.count("<sup") == 2
    # Two instances grounded in the same words ("two cats"): one highlight, both numbers after it.
    got = caption_html("two cats", [[4, 8], [4, 8]], [(230, 25, 75), (60, 180, 75)], ["cat", "cat"])
    assert got.count("<mark") == 1 and re.findall(r"<sup[^>]*>(\d)</sup>", got) == ["1", "2"]


def test_read_members_reads_only_the_wanted_keys_also_from_pax_tars(tmp_path):
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for key in ("k1", "k2", "k3"):
                for ext, data in (("jpg", key.encode() * 300), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.pax_headers = {"comment": "é"} if fmt == tarfile.PAX_FORMAT else {}
                    tar.addfile(info, io.BytesIO(data))
        got = read_members(path, {"k2", "k3"})
        assert got == {k: {"jpg": k.encode() * 300, "json": b"{}"} for k in ("k2", "k3")}, fmt


def test_throughput_spreads_each_shard_over_its_time():
    # shard A: 100 samples in minute 0-1; shard B: 40 ok + 10 failed in minute 1-2; C: instantaneous.
    shards = [(0.0, 60.0, 100, 0), (60.0, 120.0, 40, 10), (30.0, 30.0, 6, 0)]
    minutes, processed, ok = throughput(shards, bins=2)
    assert minutes == [0.5, 1.5]
    assert processed == pytest.approx([106.0, 50.0]) and ok == pytest.approx([106.0, 40.0])


def test_report_module_imports_no_torch_or_ray():
    code = "import sys, subjectdiff.catalogs.report; sys.exit(bool({'torch', 'ray'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ------------------------------------------------------------------------------------- the report file


def test_report_shows_sampled_records_plots_failures_and_manifest(dataset, tmp_path):
    out = build_report(dataset, tmp_path / "r.html", sample=5, seed=3)
    text = out.read_text(encoding="utf-8")
    page = _parse(out)
    assert (page.cards, page.broken) == (5, 0)
    assert {"records", "distributions", "run", "failures", "manifest"} <= set(page.ids)
    assert text.count('<svg class="plot"') == 6  # labels, objects/image, score, area, mask score, throughput
    assert text.count('src="data:image/jpeg;base64,') == 5
    assert not re.search(r'(src|href)="(?!data:|#)', text), "everything is embedded, nothing fetched"
    assert "cannot identify image file" in text and "broken://0/0" in text  # failures with examples
    assert "IDEA-Research/grounding-dino-tiny" in text and "ec2df62732614e57" in text  # the manifest
    assert "run (manifest)" in text and "10 min" in text


def test_report_escapes_captions_sources_reasons_and_manifest(dataset, tmp_path):
    text = build_report(dataset, tmp_path / "r.html", sample=100).read_text(encoding="utf-8")
    assert _parse(tmp_path / "r.html").cards == 9
    assert "<script" not in text.lower(), "the report has no script, and user text cannot add one"
    assert "<img src=x" not in text and "<b>no box" not in text and "<b>not bold" not in text
    assert "&lt;script&gt;alert(&quot;caption&quot;)&lt;/script&gt;" in text
    assert "&lt;b&gt;no box&lt;/b&gt; found" in text and "&lt;b&gt;not bold&lt;/b&gt;" in text


def test_sampling_is_seeded_and_where_narrows_the_records(dataset, tmp_path):
    def keys(**kw) -> list[str]:
        text = build_report(dataset, tmp_path / "r.html", **kw).read_text(encoding="utf-8")
        return re.findall(r'<article class="card" id="r-([0-9a-f]+)"', text)

    assert keys(sample=4, seed=1) == keys(sample=4, seed=1)
    assert keys(sample=4, seed=1) != keys(sample=4, seed=2) or keys(sample=9, seed=1) != keys(sample=9, seed=2)
    three = keys(sample=50, where="n_objects = 3")
    assert len(three) == 4  # astronaut and coffee records: 2 per photo shard
    assert all(n == 3 for n in _parse(tmp_path / "r.html").objects_per_card)
    assert keys(sample=3, where="key IN (SELECT key FROM objects WHERE label = 'hippopotamus')") != []


def test_report_without_manifest_after_a_move_and_with_a_lost_shard(tmp_path):
    write_photo_shards(tmp_path / "a", n_shards=2, per_shard=2, failures_per_shard=0)
    build(tmp_path / "a")
    root = (tmp_path / "a").rename(tmp_path / "moved")  # the catalog's shard paths now point nowhere
    text = build_report(root, tmp_path / "r.html", sample=4).read_text(encoding="utf-8")
    assert 'id="no-manifest"' in text and "no manifest" in text and "no failures" in text
    assert (_parse(tmp_path / "r.html").cards, _parse(tmp_path / "r.html").broken) == (4, 0)

    (root / "00001.tar").unlink()  # its records show as broken cards; the rest of the report stands
    text = build_report(root, tmp_path / "r.html", sample=4).read_text(encoding="utf-8")
    assert (_parse(tmp_path / "r.html").cards, _parse(tmp_path / "r.html").broken) == (4, 2)
    assert "cannot read shard 00001" in text


def test_cli_report_and_its_one_line_errors(dataset, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert main(["catalog", "report", str(dataset), "--sample", "3", "--out", str(out)]) == 0
    assert _parse(out).cards == 3 and str(out) in capsys.readouterr().out

    assert main(["catalog", "report", str(dataset), "--where", "no_such_column > 1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("subjectdiff catalog: error: invalid --where") and "\n" not in err
    assert main(["catalog", "report", str(dataset), "--where", "1=1); DROP TABLE samples; --", "--out", str(out)]) == 2
    assert "invalid --where" in capsys.readouterr().err
    assert main(["catalog", "report", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no catalog" in capsys.readouterr().err
    with pytest.raises(CatalogError, match="--sample"):
        build_report(dataset, out, sample=-1)


# ------------------------------------------------------------------------------- as a person sees it

# Run only in the probe copy of the page: counts what the browser actually laid out and decoded.
PROBE = """<script nonce="probe">window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("article.card img")];
  const r = {cards: document.querySelectorAll("article.card").length,
             broken: document.querySelectorAll("article.card.broken").length,
             images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
             plots: document.querySelectorAll("svg.plot").length, height: document.documentElement.scrollHeight};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});</script>"""


@needs_chromium
def test_report_renders_in_headlesschromium(dataset, tmp_path):
    n = 6
    ARTIFACTS.mkdir(exist_ok=True)
    page = build_report(dataset, ARTIFACTS / "report.html", sample=n)
    html_text = page.read_text(encoding="utf-8")

    # 1. What the browser built: the DOM after load, measured by a probe script in a copy of the page.
    seen = probe(html_text, PROBE, tmp_path)
    assert seen["cards"] == n and seen["broken"] == 0, seen
    assert seen["images"] == n and seen["decoded"] == n, f"thumbnails that did not decode: {seen}"
    assert seen["plots"] == 6, seen

    # 2. The page itself, untouched, as a screenshot: no console errors, nothing blocked or failed.
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    height = min(max(seen["height"], 800), 12000)
    run = chromium(page, tmp_path / "profile2", f"--window-size=1280,{height}", f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert page_errors(run.stderr) == [], "\n".join(page_errors(run.stderr))
    with Image.open(shot) as im:
        assert im.size == (1280, height)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 20, "the screenshot is blank"
    print(f"\nreport screenshot: {shot}")


# ------------------------------------------------------------------------------------ curation section


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """Shards whose records carry the curate stage's signals (tests/test_curation_records.py): an exact copy of
    the astronaut and a re-encoded copy of the cat among six records, fixed CLIP, aesthetic and label scores."""
    from tests.planted import write_planted

    root = tmp_path_factory.mktemp("report_curated")
    write_planted(root)
    build(root)
    return root


class _Curation(HTMLParser):
    """The duplicate groups as shown: each group's member keys in order, and which figures are the kept ones."""

    def __init__(self):
        super().__init__()
        self.groups: list[list[str]] = []
        self.kept: list[bool] = []
        self._dup = self._code = False

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and "group" in classes:
            self.groups.append([])
        elif tag == "figure" and "dup" in classes:
            self._dup = True
            self.kept.append("first" in classes)
        elif tag == "code" and self._dup:
            self._code = True

    def handle_endtag(self, tag):
        if tag == "figure":
            self._dup = False
        elif tag == "code":
            self._code = False

    def handle_data(self, text):
        if self._code:
            self.groups[-1].append(text)


def _weak_labels(text: str) -> list[tuple[str, float]]:
    return [
        (m.group(1), float(m.group(2)))
        for m in re.finditer(r'<p class="label"><b>([^<]*)</b> · label score <span class="num">([-0-9.]+)</span>', text)
    ]


def test_report_shows_curation_distributions_duplicate_groups_and_weak_labels(curated, dataset, tmp_path):
    from subjectdiff.catalogs.schema import make_key

    out = build_report(curated, tmp_path / "c.html", sample=2)
    text = out.read_text(encoding="utf-8")
    ids = set(_parse(out).ids)
    assert {
        "curation",
        "duplicates",
        "low-label-scores",
        "hist-clip_score",
        "hist-aesthetic",
        "hist-label_score",
    } <= ids
    assert text.count('<svg class="plot"') == 9  # the six of the records' plots, and three curation histograms
    page = _Curation()
    page.feed(text)
    # two groups, each original (first in plan order, the one --dedup keeps) before its copy
    assert page.groups == [
        [make_key("orig/astronaut"), make_key("copy/astronaut")],
        [make_key("orig/chelsea"), make_key("copy/chelsea-q60")],
    ]
    assert page.kept == [True, False, True, False]
    assert "group 0 · exact · 2 samples" in text and "group 1 · near · 2 samples" in text
    # the lowest label scores first, with their labels: each record's third object scores 0.2
    weak = _weak_labels(text)
    assert len(weak) == 12 and [s for _, s in weak] == sorted(s for _, s in weak)
    assert {lb for lb, s in weak if s == pytest.approx(0.2)} == {"flag", "spoon"}
    assert "other labels: astronaut, helmet" in text  # the flag's record's other subjects
    assert text.count('<img class="thumb"') == 4 + 12
    # a catalog without the curate stage's columns says so, and draws no curation plot
    plain = build_report(dataset, tmp_path / "p.html", sample=1).read_text(encoding="utf-8")
    assert 'id="no-curation"' in plain and 'id="duplicates"' not in plain
    # --where narrows the section: without the copies there is no group left
    narrowed = build_report(curated, tmp_path / "w.html", sample=1, where="source LIKE 'orig/%'")
    assert "no duplicates" in narrowed.read_text(encoding="utf-8")


CURATION_PROBE = """<script nonce="probe">window.addEventListener("load", () => {
  const thumbs = [...document.querySelectorAll("#curation img.thumb")];
  const r = {thumbs: thumbs.length, decoded: thumbs.filter(i => i.complete && i.naturalWidth > 0).length,
             groups: document.querySelectorAll("#curation div.group").length,
             weak: document.querySelectorAll("#curation article.weak").length,
             plots: document.querySelectorAll("#curation svg.plot").length};
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});</script>"""


@needs_chromium
def test_curation_section_renders_in_headlesschromium(curated, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    page = build_report(curated, ARTIFACTS / "report_curation.html", sample=2)
    seen = probe(page.read_text(encoding="utf-8"), CURATION_PROBE, tmp_path)
    assert seen == {"thumbs": 16, "decoded": 16, "groups": 2, "weak": 12, "plots": 3}, seen
    shot = ARTIFACTS / "report_curation.png"
    shot.unlink(missing_ok=True)
    run = chromium(page, tmp_path / "profile2", "--window-size=1280,4000", f"--screenshot={shot}")
    assert run.returncode == 0 and page_errors(run.stderr) == [], "\n".join(page_errors(run.stderr))
    with Image.open(shot) as im:
        assert np.asarray(im.convert("RGB")).std() > 20, "the screenshot is blank"
