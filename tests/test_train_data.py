"""From records to batches, the defects users met (issue #16), each as the behaviour that holds now: records without
a subject, crops that never pad, plural labels, the near-white column, masks outside their boxes, small
selections, a catalog given alone, the EMA's warm-up, `--arch tiny`, one-line errors, and an exact resume when
records are skipped. Tiny model, CPU, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from subjectdiff.catalogs.catalog import build, query
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import white_fraction
from subjectdiff.catalogs.selection import REFERENCE_OBJECT_WHERE, select
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.cli import main
from subjectdiff.train.config import load_config
from subjectdiff.train.data import (
    BatchStream,
    NoSubject,
    TrainSamples,
    choose_subjects,
    make_reader,
    make_sample,
    object_ok,
    sample_rng,
)
from tests.geometry import Obj, decoded, geometry_cases, make_record, sized, write_geometry_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(err: str) -> str:
    """The command's error: one line, no traceback (other stderr lines are library warnings, e.g. torch's about
    more DataLoader workers than cores)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("subjectdiff train")]
    assert len(lines) == 1, err
    return lines[0]


def write(d: Path, records) -> list[str]:
    with ShardWriter(d, "00000") as w:
        for r in records:
            w.write(r)
    build(d)
    return [r.key for r in records]


def no_subject_records() -> list:
    """Landscape and portrait photos whose records give no subject: no objects, objects the rules refuse, a
    near-white image (the demo's records, and 77 % of real annotated photos, are like these)."""
    white = sized("astronaut", 128, 96).copy()
    white[:70] = 255
    return [
        make_record("none-landscape", sized("chelsea", 160, 100), "a cat on a rug", []),
        make_record("none-portrait", sized("coffee", 90, 150), "a cup of coffee", []),
        make_record(
            "tiny-object", sized("rocket", 140, 100), "a rocket", [Obj("rocket", "rocket", (0.4, 0.4, 0.45, 0.46))]
        ),
        make_record("white", white, "a person on white", [Obj("person", "person", (0.1, 0.2, 0.5, 0.9))]),
    ]


def test_records_without_a_subject_train_text_only_or_are_skipped(tmp_path, capsys):
    """Was: `square_crop` asked for a crop smaller than what it must contain (ValueError: low >= high) at the first
    batch. Now the tiny preset trains such records text-only on a short-side crop, and the paper preset skips
    them; when every record is skipped the run stops with one line naming a record and why."""
    records = no_subject_records()
    tiny, paper = load_config("tiny"), load_config("paper", arch="tiny")
    for r in records:
        rec = decoded(r)
        s = make_sample(rec, tiny, 32, sample_rng(0, 0, rec.key))
        assert not s["present"].any() and s["prompt"] == rec.caption and s["crop"][2] == min(rec.width, rec.height)
        assert isinstance(make_sample(rec, paper, 32, sample_rng(0, 0, rec.key)), NoSubject)
    d = tmp_path / "shards"
    write(d, records)
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--records",
                str(d),
                "--out",
                str(tmp_path / "a"),
                "run.max_steps=3",
                "run.progress='off'",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--preset",
                "paper",
                "--arch",
                "tiny",
                "--records",
                str(d),
                "--out",
                str(tmp_path / "b"),
                "run.max_steps=3",
                "run.precision='fp32'",
                "run.progress='off'",
            ]
        )
        == 2
    )
    err = error_line(capsys.readouterr().err)
    assert "no subject" in err and "record " in err and "(shard 00000.tar)" in err
    assert any(why in err for why in ("no objects", "near-white", "object rules"))


def test_skipped_records_are_counted_and_a_resume_is_exact(tmp_path):
    """The paper preset skips records without a subject (the reference's way): workers then give fewer and
    partial batches, yet a stream resumed mid-epoch yields exactly the straight stream's batches; the skipped
    records are counted by reason."""
    d = tmp_path / "geometry"
    write_geometry_shards(d)
    cfg = load_config("paper", [f"data.shards=['{d}']", "data.num_workers=2", "data.batch_size=2"], arch="tiny")

    def stream(state=None) -> BatchStream:
        s = BatchStream(TrainSamples(make_reader(cfg.data, None, 0, 1, 0), cfg, 32), 2, 2)
        if state is not None:
            s.load_state(state)
        return s

    def take(it, n: int) -> list[list[str]]:
        return [list(next(it)["key"]) for _ in range(n)]

    straight = stream()
    batches = take(iter(straight), 9)
    assert any(len(b) == 1 for b in batches)  # a worker's last, partial batch
    assert straight.skipped and set(straight.skipped) <= {
        "no objects",
        "near-white image",
        "object rules",
        "cut by the crop",
        "prompt too long",
    }
    for cut in (1, 2, 3, 5):
        first = stream()
        it = iter(first)
        assert take(it, cut) == batches[:cut]
        state = first.state()
        it.close()
        assert take(iter(stream(state)), 9 - cut) == batches[cut:], cut


def test_crops_stay_inside_the_image(tmp_path):
    """Was: subjects farther apart than the short side got a larger crop padded grey (up to half the image).
    Now the crop is the short side inside the image: its pixels are the photo's, and a subject it cuts is kept
    clipped or dropped by the post-crop rule."""
    rec = decoded(geometry_cases()["apart"])  # 200 x 90, a rocket and a cat 130 px apart
    for preset, model in (("tiny", None), ("paper", "tiny")):
        cfg = load_config(preset, ["data.resolution=88"], arch=model)
        for epoch in range(8):
            s = make_sample(rec, cfg, 32, sample_rng(0, epoch, rec.key))
            x0, y0, side = s["crop"]
            assert side == 90 and y0 == 0 and 0 <= x0 <= 110
            want = (
                Image.fromarray(rec.image)
                .crop((x0, y0, x0 + side, y0 + side))
                .resize((88, 88), Image.BICUBIC, reducing_gap=2.0)
            )
            assert np.array_equal(s["image"].transpose(1, 2, 0), np.asarray(want))
            assert (s["boxes"][s["present"]] <= 1).all() and s["present"][0]


def test_plural_labels_survive_the_label_rule(tmp_path):
    """Was: "two people" lost every `person`, "knives" every `knife` (the label is not a substring of the
    caption). The object's own phrase names it now, in the trainer's rule and in --object-where reference."""
    img = sized("chelsea", 160, 120)
    records = [
        make_record("people", img, "two people near a table", [Obj("person", "people", (0.1, 0.1, 0.45, 0.9))]),
        make_record("knives", img, "knives on a table", [Obj("knife", "knives", (0.5, 0.1, 0.9, 0.8))]),
    ]
    cfg = load_config("paper").data
    for r in records:
        assert object_ok(decoded(r), 0, cfg)
    d = tmp_path / "plural"
    write(d, records)
    assert select(d, None, tmp_path / "sel.parquet", object_where=REFERENCE_OBJECT_WHERE) == 2


def test_near_white_fraction_is_a_catalog_column(tmp_path):
    """Was: no column let --where leave near-white images out, so a reference selection fed them. Now
    samples.white_fraction (the trainer's own measure) is written with each record, computed at build time
    from the images for shards written before it existed, and --object-where reference uses it."""
    records = no_subject_records()
    d = tmp_path / "white"
    keys = write(d, records)
    wf = {r["key"]: r["white_fraction"] for r in query(d, "SELECT key, white_fraction FROM samples").to_pylist()}
    for k, r in zip(keys, records):
        assert wf[k] == pytest.approx(white_fraction(decoded(r).image), abs=1e-6)
    assert wf[keys[3]] > 0.5 and max(wf[k] for k in keys[:3]) < 0.1
    clean = query(d, "SELECT key FROM samples WHERE white_fraction <= 0.1").column("key").to_pylist()
    assert sorted(clean) == sorted(keys[:3])
    # a shard written before the column existed: its sidecar lacks it, the build computes it from the tar
    sidecar = d / "00000.samples.parquet"
    table = pq.read_table(sidecar)
    pq.write_table(table.drop_columns(["white_fraction"]), sidecar)
    stats = json.loads((d / "00000_stats.json").read_text())
    stats["files"]["samples"] = sidecar.stat().st_size
    (d / "00000_stats.json").write_text(json.dumps(stats))
    (d / "catalog.duckdb").unlink()
    build(d)
    again = {r["key"]: r["white_fraction"] for r in query(d, "SELECT key, white_fraction FROM samples").to_pylist()}
    assert again == pytest.approx(wf)


def test_a_mask_outside_its_box_is_never_a_subject():
    """Was: with the object rules off, such an object became a subject with an all-zero localization mask."""
    rec = decoded(geometry_cases()["loose"])
    outside, empty = 2, 3  # the cup's mask lies beside its box; the table's mask is empty
    for rules in ("true", "false"):
        cfg = load_config("tiny", [f"data.object_rules={rules}", "model.max_subjects=5"])
        chosen = choose_subjects(rec, 5, cfg.data, np.random.default_rng(0))
        assert outside not in chosen and empty not in chosen
        s = make_sample(rec, cfg, 32, sample_rng(0, 0, rec.key))
        assert all(s["masks"][j].max() > 0 for j in np.flatnonzero(s["present"]))


def test_small_selections_preview_and_train_with_the_paper_preset(tmp_path, capsys):
    """Was: `train preview --config paper` on a 12-record catalog failed (6 workers x batch 8 > the records).
    Now any non-empty selection works: fewer workers when the epoch is smaller than ranks x workers, partial
    last batches, and records repeated when there are fewer records than ranks."""
    d = tmp_path / "small"
    keys = write(
        d,
        [
            make_record(f"r{i}", sized("chelsea", 120, 90), "a cat", [Obj("cat", "cat", (0.2, 0.2, 0.7, 0.9))])
            for i in range(3)
        ],
    )
    assert (
        main(
            [
                "train",
                "preview",
                "--preset",
                "paper",
                "--records",
                str(d),
                "--sample",
                "5",
                "--out",
                str(tmp_path / "pv"),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "pv" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {r["key"] for r in rows} == set(keys) and all(r["labels"] == ["cat"] for r in rows)
    assert (
        main(
            [
                "train",
                "--preset",
                "paper",
                "--arch",
                "tiny",
                "--records",
                str(d),
                "--out",
                str(tmp_path / "t"),
                "run.max_steps=2",
                "run.precision='fp32'",
                "run.progress='off'",
            ]
        )
        == 0
    )
    assert "3 records per epoch; 1 rank(s) x 3 worker(s) read 1 each" in capsys.readouterr().out
    for rank in range(4):  # 3 records, 4 ranks: each rank reads one, records repeat
        reader = RecordReader(
            d, split="balanced", multiple=8, rank=rank, world_size=4, decode_image=False, decode_masks=False
        )
        assert reader.quota(4) == 1 and [r.key for r in reader] == [keys[rank % 3]]


def test_a_catalog_alone_means_all_of_it(tmp_path):
    """Was: `--catalog DIR` without --where was refused with config keys ("set data.shards, data.selection, or
    data.where with data.catalog")."""
    d = tmp_path / "all"
    keys = write_geometry_shards(d)
    build(d)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--catalog",
                str(d / "catalog.duckdb"),
                "--out",
                str(out),
                "run.max_steps=5",
                "data.batch_size=2",
                "run.trace=true",
                "run.progress='off'",
            ]
        )
        == 0
    )
    seen = {k for line in (out / "trace-rank0.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]}
    assert seen == set(keys) and (out / "selection.parquet").is_file()


def test_ema_warms_up_instead_of_keeping_the_initial_weights():
    """Was: decay 0.9999 from step 0, so the exported EMA kept 37 % of the initial weights after 10k steps.
    With diffusers' warm-up the average follows the trained weights early on."""
    from subjectdiff.train.trainer import EMA

    def average(warmup: bool) -> float:
        p = torch.nn.Parameter(torch.zeros(3))
        ema = EMA({"w": p}, 0.9999, warmup)
        for value in [1.0] + [2.0] * 200:  # the weights move on after the first update
            with torch.no_grad():
                p.fill_(value)
            ema.update()
        assert ema.updates == 201
        return ema.shadow["w"].mean().item()

    assert average(warmup=True) > 1.9
    assert average(warmup=False) < 1.05  # a constant 0.9999 barely moves in 200 updates (optim.ema_warmup=false)


def test_paper_recipe_on_the_tiny_model():
    """`--preset paper --arch tiny`: every setting of the paper preset, on the tiny model at its 64 px."""
    paper, small = load_config("paper"), load_config("paper", arch="tiny")
    assert small.model == load_config("tiny").model and small.data.resolution == 64
    for section in ("optim", "loss", "run"):
        assert getattr(small, section) == getattr(paper, section)
    assert {k: v for k, v in vars(small.data).items() if k != "resolution"} == {
        k: v for k, v in vars(paper.data).items() if k != "resolution"
    }
    with pytest.raises(ValueError, match="--arch"):
        load_config("paper", arch="sd3")


def test_a_record_that_breaks_sample_building_is_named_in_one_line(tmp_path, capsys):
    """A background photo that cannot be decoded breaks sample building: the run stops with one line naming the
    record and its shard (was: a traceback naming neither)."""
    d = tmp_path / "shards"
    keys = write(d, [make_record("cat", sized("chelsea", 120, 90), "a cat", [Obj("cat", "cat", (0.2, 0.2, 0.7, 0.9))])])
    bg = tmp_path / "bg"
    bg.mkdir()
    (bg / "broken.jpg").write_bytes(b"not a jpeg")
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--records",
                str(d),
                "--out",
                str(tmp_path / "run"),
                "run.max_steps=1",
                f"data.backgrounds='{bg}'",
                "data.num_workers=1",
            ]
        )
        == 2
    )
    err = error_line(capsys.readouterr().err)
    assert f"record {keys[0]} (shard 00000.tar)" in err and "broken.jpg" in err
