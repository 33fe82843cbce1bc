"""`subjectdiff datagen run` end to end on Ray with the tiny preset: accounting, inputs, resume, faults."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.datagen.run import run
from subjectdiff.datagen.sources import SourceError, detect
from tests.pipelines import assert_close, assert_loads_the_catalog, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """The bundled photos (one in a subfolder, one as PNG) plus deliberately broken files."""
    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    for i, p in enumerate(sorted(SAMPLES.glob("*.jpg"))):
        if i == 0:
            Image.open(p).save(d / "sub" / (p.stem + ".png"))
        else:
            (d / p.name).write_bytes(p.read_bytes())
    good = (SAMPLES / "astronaut.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "not_an_image.jpg").write_text("this is a text file, not a JPEG\n")
    (d / "empty.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image extension: ignored, not an input\n")
    return d


def records(out: Path) -> dict[str, tuple[dict, bytes]]:
    return {r.key: (r.meta, r.image_bytes) for r in RecordReader(out, decode_image=False, decode_masks=False)}


def tables(out: Path) -> dict[str, list]:
    return {
        "samples": catalog.query(out, "SELECT * EXCLUDE (sample_id) FROM samples ORDER BY key").to_pylist(),
        "objects": catalog.query(out, "SELECT * EXCLUDE (sample_id) FROM objects ORDER BY key, index").to_pylist(),
        "failures": catalog.query(out, "SELECT * FROM failures ORDER BY key").to_pylist(),
        "shards": catalog.query(out, "SELECT name, n_ok, n_failed, n_objects FROM shards ORDER BY name").to_pylist(),
    }


def accounted(out: Path) -> list[str]:
    rows = catalog.query(out, "SELECT source FROM samples UNION ALL SELECT source FROM failures").column("source")
    return sorted(rows.to_pylist())


@pytest.fixture(scope="module")
def reference_run(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_bs8")
    summary = run(str(photo_dir), out, tiny_cfg(batch_size=8), progress_every=0.5)
    return out, summary


def test_every_input_is_accounted_for_exactly_once(photo_dir, reference_run):
    out, summary = reference_run
    inputs = sorted(str(p) for p in photo_dir.rglob("*") if p.suffix in (".jpg", ".png"))
    assert accounted(out) == inputs  # each image once, in samples or in failures; notes.txt is no input
    assert summary.incomplete == [] and summary.ok + summary.failed == len(inputs)
    fails = {Path(f["source"]).name: (f["stage"], f["reason"]) for f in tables(out)["failures"]}
    assert fails["truncated.jpg"][0] == "decode"
    assert fails["not_an_image.jpg"][0] == "decode"
    assert fails["empty.png"] == ("decode", "empty image bytes")
    # The photos made records with real nouns, boxes and masks.
    objs = catalog.query(out, "SELECT label, x0, y0, x1, y1 FROM objects").to_pylist()
    assert objs and all(0 <= o["x0"] <= o["x1"] <= 1 and 0 <= o["y0"] <= o["y1"] <= 1 for o in objs)
    for _key, (meta, image) in records(out).items():
        assert meta["objects"] and all(o["mask"]["size"] == [meta["height"], meta["width"]] for o in meta["objects"])
        assert Path(meta["source"]).read_bytes() == image  # the bytes are passed through, never re-encoded
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preset"] == "tiny" and manifest["runs"][-1]["status"] == "complete"
    assert manifest["counts"]["samples"] == summary.ok and manifest["versions"]["torch"]
    assert manifest["models"]["segment"]["sha256"]


def test_load_dataset_reads_what_the_run_catalogued(reference_run, tmp_path):
    """The run leaves a dataset card: `datasets.load_dataset(OUT)` gives its samples, and the objects and
    failures configs the rest, row for row the catalog's (skipped where `datasets` is not installed)."""
    out, summary = reference_run
    assert (out / "README.md").is_file() and summary.failed > 0
    assert_loads_the_catalog(out, tmp_path / "cache")


def test_batch_size_does_not_change_records(photo_dir, reference_run, tmp_path):
    """Blocks and model batches of 1 against the reference run's 8 (shards of 3: batches of up to 3 photos).
    The run of 1s is fused (one actor runs every model stage, each at batch size 1: one worker process loads
    the models, not six): the records must then match across both settings."""
    out8, _ = reference_run
    cfg = tiny_cfg(batch_size=1)
    cfg.pipeline.fuse = True
    run(str(photo_dir), tmp_path, cfg)
    assert_close(records(tmp_path), records(out8))  # same keys, captions, nouns, tokens, masks; boxes to 1e-5
    assert_close(tables(tmp_path), tables(out8))


def test_rerun_of_a_complete_output_changes_nothing(photo_dir, reference_run):
    out, _ = reference_run
    before = tables(out)
    again = run(str(photo_dir), out, tiny_cfg(batch_size=8))
    assert again.skipped_shards == again.shards and again.ok == again.failed == 0
    assert tables(out) == before
    with pytest.raises(SourceError, match="another --out"):
        run(str(photo_dir), out, tiny_cfg(shard_size=2))


def test_killed_fused_driver_then_same_command_gives_the_uninterrupted_result(photo_dir, reference_run, tmp_path):
    """A run with fused stages (one actor runs every model stage: one worker process loads the models, not six),
    killed after its first shard, then the same command: the records and tables of the unfused reference run."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "subjectdiff",
        "datagen",
        "run",
        "--input",
        str(photo_dir),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--shard-size",
        "3",
        "--batch-size",
        "8",
        "pipeline.fuse=true",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(out.glob("*_stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    done = sorted(p.name for p in out.glob("*_stats.json"))
    assert 1 <= len(done) < 4
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, _ = reference_run
    assert_close(records(out), records(ref))
    assert_close(tables(out), tables(ref))
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["running", "complete"]  # the killed run never finished


def _img2dataset_shard(path: Path, photos: list[Path], *, bad_member: bool) -> list[str]:
    """A tar as img2dataset writes it (KEY.jpg, KEY.txt, KEY.json), its Parquet and _stats.json."""
    urls = []
    with tarfile.open(path, "w") as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        for i, p in enumerate(photos):
            key = f"{path.stem}{i:04d}"
            url = f"https://example.com/img/{p.name}?shard={path.stem}"
            urls.append(url)
            add(f"{key}.jpg", p.read_bytes())
            add(f"{key}.txt", f"alt text of {p.stem}".encode())
            add(f"{key}.json", json.dumps({"url": url, "key": key, "status": "success"}).encode())
        if bad_member:
            url = "https://example.com/img/broken.jpg"
            urls.append(url)
            add(f"{path.stem}9999.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
            add(f"{path.stem}9999.json", json.dumps({"url": url}).encode())
    pq.write_table(
        pa.table({"url": urls, "key": [f"{path.stem}{i:04d}" for i in range(len(urls))]}), path.with_suffix(".parquet")
    )
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"count": len(urls), "successes": len(urls)}))
    return urls


def test_img2dataset_input_with_a_bad_member_and_a_truncated_tar(tmp_path):
    src = tmp_path / "img2dataset"
    src.mkdir()
    photos = sorted(SAMPLES.glob("*.jpg"))
    urls = _img2dataset_shard(src / "00000.tar", photos[:3], bad_member=True)
    cut = _img2dataset_shard(src / "00001.tar", photos[3:5], bad_member=False)
    data = (src / "00001.tar").read_bytes()
    (src / "00001.tar").write_bytes(data[: len(data) - 20000])  # the last image of this tar is cut short
    assert detect(str(src)) == "shards"
    out = tmp_path / "out"
    summary = run(str(src), out, tiny_cfg(shard_size=4))
    assert summary.incomplete == []
    got = accounted(out)
    # The cut image is accounted for too (its json member, with the URL, was cut off: its source is the member).
    assert len(got) == len(urls + cut) and set(urls + cut[:-1]) <= set(got)
    (lost,) = set(got) - set(urls + cut[:-1])
    alt = catalog.query(out, "SELECT source, alt_text FROM samples").to_pylist()
    assert alt and all(a["alt_text"] == f"alt text of {Path(a['source'].split('?')[0]).stem}" for a in alt)
    fails = {f["source"]: f["stage"] for f in catalog.query(out, "SELECT source, stage FROM failures").to_pylist()}
    assert fails["https://example.com/img/broken.jpg"] == "decode"
    assert fails[lost] in ("read", "decode")


def test_list_and_brace_inputs_plan_every_unit(tmp_path):
    from subjectdiff.datagen.sources import write_plan
    from subjectdiff.datagen.units import read_unit

    photos = sorted(SAMPLES.glob("*.jpg"))
    lst = tmp_path / "list.csv"
    lst.write_text(
        "path,caption\n"
        + "".join(f"{p},caption {i}\n" for i, p in enumerate(photos[:3]))
        + f"{photos[0]},a duplicate is planned once\n"
    )
    counts = write_plan(str(lst), tmp_path / "plan.parquet", shard_size=2)
    plan = pq.read_table(tmp_path / "plan.parquet").to_pylist()
    assert counts == {"00000": 2, "00001": 1} and [r["source"] for r in plan] == [str(p) for p in photos[:3]]
    assert [r["alt_text"] for r in plan] == ["caption 0", "caption 1", "caption 2"]
    assert read_unit(plan[1]["path"], plan[1]["offset"], plan[1]["size"]) == photos[1].read_bytes()
    urls = _img2dataset_shard(tmp_path / "00000.tar", photos[:2], bad_member=False)
    urls += _img2dataset_shard(tmp_path / "00001.tar", photos[2:3], bad_member=False)
    counts = write_plan(str(tmp_path / "{00000..00001}.tar"), tmp_path / "plan2.parquet", shard_size=10)
    plan = pq.read_table(tmp_path / "plan2.parquet").to_pylist()
    assert counts == {"00000": 3} and [r["source"] for r in plan] == urls
    assert read_unit(plan[2]["path"], plan[2]["offset"], plan[2]["size"]) == photos[2].read_bytes()


def test_bad_input_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "subjectdiff",
            "datagen",
            "run",
            "--input",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--preset",
            "tiny",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not a folder" in proc.stderr
