"""Hugging Face `datasets` and a shard folder (issue #19): `load_dataset(OUT)` reads what the catalog holds, through
the dataset card (catalogs/card.py) and sidecars of fixed schemas with one suffix per kind; shards written before
the card and the names still index and read; Parquet that `datasets` writes is a datagen input.

`datasets` is pinned in the test extra (5.0.1: pyproject says why that release)."""

from __future__ import annotations

import fnmatch
import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.card import CARD_FILE, record_features, sidecar_files, write_card
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import Failure, VideoFrame
from subjectdiff.catalogs.writer import OBJECT_SCHEMA, SAMPLE_SCHEMA, ShardWriter, complete_shards
from subjectdiff.cli import main
from subjectdiff.datagen.sources import write_plan
from subjectdiff.datagen.units import read_unit
from subjectdiff.photo_records import photo, photo_record, write_photo_shards
from tests.pipelines import assert_loads_the_catalog, datasets, load


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small shard set as a run leaves it (ok samples and failures, several shards), its catalog built."""
    out = tmp_path_factory.mktemp("hf") / "out"
    write_photo_shards(out, n_shards=3, per_shard=3, failures_per_shard=1)
    catalog.build(out)
    return out


def test_load_dataset_reads_the_catalogs_samples_objects_and_failures(shards, tmp_path):
    """Was: `load_dataset(OUT)` failed (four sidecar kinds under `*.parquet`) and duckdb's `OUT/*.parquet` mixed
    four schemas. Now the card's configs give the catalog's rows, and each glob names one kind."""
    assert_loads_the_catalog(shards, tmp_path / "cache")
    assert sorted(p.name for p in shards.glob("*.samples.parquet")) == [f"0000{i}.samples.parquet" for i in range(3)]
    assert {pq.read_schema(p) == SAMPLE_SCHEMA for p in shards.glob("*.samples.parquet")} == {True}
    assert {pq.read_schema(p) == OBJECT_SCHEMA for p in shards.glob("*.objects.parquet")} == {True}


def record_with_alt_text(name: str, source: str, alt_text: str | None):
    rec = photo_record(name, source=source)[0]
    rec.alt_text = alt_text
    return rec


def test_a_first_shard_whose_alt_text_is_all_null_loads(tmp_path):
    """Was: a reader that infers the schema from the first shard typed alt_text null there, and failed on the
    later shard that has one. Every sidecar now carries the writer's schema, and the card declares it."""
    out = tmp_path / "out"
    with ShardWriter(out, "00000") as w:
        w.write(record_with_alt_text("astronaut", "a/1", None))
        w.fail(Failure("broken0000000000", "a/2", "decode", "cannot identify image file"))
    with ShardWriter(out, "00001") as w:
        w.write(record_with_alt_text("rocket", "b/1", "a rocket on its launch pad"))
    write_card(out)
    first = pq.read_schema(out / "00000.samples.parquet")
    assert first == SAMPLE_SCHEMA and str(first.field("alt_text").type) == "string"  # typed though all null
    catalog.build(out)
    assert_loads_the_catalog(out, tmp_path / "cache")
    alt = {r["source"]: r["alt_text"] for r in load(out, None, tmp_path / "cache")}
    assert alt == {"a/1": None, "b/1": "a rocket on its launch pad"}


def test_the_tars_load_with_declared_features_whatever_the_first_shard_holds(tmp_path):
    """Was: `load_dataset("webdataset", data_files=...)` inferred the JSON's types and the image columns from the
    first shard, and failed on a later record whose alt_text is set (null there) or whose image is a JPEG (PNGs
    there). record_features() declares them: every record loads, with its image and annotations."""
    out = tmp_path / "out"
    with ShardWriter(out, "00000") as w:
        first, _ = photo_record("astronaut", source="a/1", fmt="PNG")
        w.write(first)
    with ShardWriter(out, "00001") as w:
        later = record_with_alt_text("rocket", "b/1", "a rocket on its launch pad")
        later.video = VideoFrame("clips/launch.mp4", shot=2, frame=48, time=1.6)
        w.write(later)
    catalog.build(out)
    rows = datasets().load_dataset(
        "webdataset", data_files=str(out / "*.tar"), features=record_features(), cache_dir=str(tmp_path / "cache")
    )["train"]
    by_source = {r["json"]["source"]: r for r in rows}
    assert len(rows) == catalog.query(out, "select count(*) as n from samples")["n"][0].as_py() == 2
    png, jpg = by_source["a/1"], by_source["b/1"]
    assert png["jpg"] is None and png["png"].size == (first.width, first.height)
    assert jpg["png"] is None and jpg["jpg"].size == (later.width, later.height)
    assert png["json"]["alt_text"] is None and jpg["json"]["alt_text"] == "a rocket on its launch pad"
    assert png["json"]["video"] is None and jpg["json"]["video"] == later.video.to_json()
    objects = jpg["json"]["objects"]
    assert [o["label"] for o in objects] == [o.label for o in later.objects]
    assert objects[0]["mask"]["size"] == [later.height, later.width] and len(objects[0]["box"]) == 4


def to_old_layout(out: Path) -> None:
    """OUT as the writer before issue #19 left it: samples sidecars named NAME.parquet, no dataset card."""
    for p in out.glob("*.samples.parquet"):
        p.rename(p.with_name(p.name.removesuffix(".samples.parquet") + ".parquet"))
    (out / CARD_FILE).unlink()


def test_shards_written_with_the_old_names_still_index_read_and_load(tmp_path):
    """Folders written before the new names: complete, catalogued, read by key (the reader counts from the
    samples sidecar), and `catalog build --card` makes them loadable, the legacy files named one by one."""
    out = tmp_path / "old"
    keys = write_photo_shards(out, n_shards=2, per_shard=2, failures_per_shard=1)
    to_old_layout(out)
    assert complete_shards(out) == ["00000", "00001"]
    assert main(["catalog", "build", str(out), "--card"]) == 0
    assert catalog.stats(out)["samples"] == len(keys) and catalog.stats(out)["failed"] == 2
    wanted = set(keys[1:3])
    got = {r.key for r in RecordReader(out, keys=wanted, decode_masks=False, split="balanced")}
    assert got == wanted
    card = (out / CARD_FILE).read_text()
    assert '"00000.parquet"' in card and "*.samples.parquet" not in card
    assert_loads_the_catalog(out, tmp_path / "cache")


def test_the_card_leaves_out_the_shards_the_catalog_leaves_out(tmp_path):
    """A bad shard (a corrupt sidecar) is not in the catalog, so not in the card: the counts still agree."""
    out = tmp_path / "out"
    write_photo_shards(out, n_shards=3, per_shard=2, failures_per_shard=1)
    bad = out / "00001.objects.parquet"
    bad.write_bytes(b"\0" * bad.stat().st_size)
    assert main(["catalog", "build", str(out), "--card"]) == 1  # 1: loaded, but some shards are bad
    card = (out / CARD_FILE).read_text()
    assert '"00000.samples.parquet"' in card and "00001" not in card
    assert_loads_the_catalog(out, tmp_path / "cache")


# Each shard of a listing: complete (current or legacy names), cut short (no stats), or left out by the catalog.
_STATES = st.sampled_from(["complete", "legacy", "partial", "excluded"])


@settings(max_examples=60, deadline=None)
@given(st.lists(_STATES, max_size=6), st.booleans())
def test_the_card_names_exactly_the_complete_shards_sidecars(states, in_subfolder):
    """Whatever a folder holds, the card's data files (globs or names) are the sidecars of its complete shards
    that the catalog holds, each once."""
    names, want = [], []
    for i, state in enumerate(states):
        sid = f"part/{i:05d}" if in_subfolder and i == 0 else f"{i:05d}"
        samples = f"{sid}.parquet" if state == "legacy" else f"{sid}.samples.parquet"
        names += [f"{sid}.tar", samples, f"{sid}.objects.parquet", "_plan.parquet", "manifest.json"]
        if state != "partial":
            names.append(f"{sid}_stats.json")
        if state in ("complete", "legacy"):
            want.append((samples, f"{sid}.objects.parquet"))
    excluded = [f"{i:05d}" for i, s in enumerate(states) if s == "excluded"]
    excluded += [f"part/{i:05d}" for i, s in enumerate(states) if s == "excluded"]
    samples, objects = sidecar_files(names, exclude=excluded)

    def files(spec) -> list[str]:
        return sorted(n for n in names if "/" not in n and fnmatch.fnmatch(n, spec)) if isinstance(spec, str) else spec

    assert files(samples) == sorted(s for s, _ in want)
    assert files(objects) == sorted(o for _, o in want)


def test_parquet_written_by_datasets_with_relative_image_paths_is_a_datagen_input(tmp_path, monkeypatch):
    """Was: an Image column holding a relative `path` and no bytes (what `Dataset.to_parquet` writes for files it
    does not embed) failed on every row. Now each path is read relative to the Parquet's folder, which is where
    `datasets` finds it when the file is written and read from that folder; a missing file fails its row only."""
    hf = datasets()
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    files = {}
    for name in ("astronaut", "coffee"):
        buf = io.BytesIO()
        Image.fromarray(photo(name)).resize((64, 48)).save(buf, "PNG")
        files[f"images/{name}.png"] = buf.getvalue()
        (data / f"images/{name}.png").write_bytes(buf.getvalue())
    paths = [*files, "images/gone.png"]
    (data / "images/gone.png").write_bytes(files["images/coffee.png"])  # there while `datasets` writes the file
    features = hf.Features({"image": hf.Image(), "text": hf.Value("string")})
    ds = hf.Dataset.from_dict(
        {"image": [{"path": p, "bytes": None} for p in paths], "text": ["a", "b", None]}, features
    )
    monkeypatch.chdir(data)  # `datasets` resolves a relative path against the working directory
    ds.to_parquet("train.parquet")
    stored = pq.read_table(data / "train.parquet").column("image").to_pylist()
    assert [c["path"] for c in stored] == paths and all(c["bytes"] is None for c in stored)
    by_datasets = hf.load_dataset("parquet", data_files="train.parquet", cache_dir=str(tmp_path / "cache"))["train"]
    assert by_datasets[0]["image"].size == (64, 48)
    (data / "images/gone.png").unlink()

    monkeypatch.chdir(tmp_path)  # datagen reads the rows from anywhere: relative to the Parquet, not the cwd
    counts = write_plan(str(data / "train.parquet"), tmp_path / "plan.parquet", shard_size=10)
    plan = pq.read_table(tmp_path / "plan.parquet").to_pylist()
    assert sum(counts.values()) == 3 and [r["alt_text"] for r in plan] == ["a", "b", None]
    for row, path in zip(plan[:2], paths):
        assert read_unit(row["path"], row["offset"], row["size"], row["column"]) == files[path]
    with pytest.raises(OSError, match="its path 'images/gone.png' cannot be read"):
        read_unit(plan[2]["path"], plan[2]["offset"], plan[2]["size"], plan[2]["column"])
