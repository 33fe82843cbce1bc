"""train --pairs: pair samples (subject from the reference record, target from the other), the seeded mixer,
two-subject pair samples, exact resume of the mixed stream, preview --pairs, bad pairs files, and training
without pairs exactly as before. Tiny, CPU, offline: records are flat colours, one per object, so a subject image
or a target crop can be traced to the record and object it came from."""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from subjectdiff.catalogs.catalog import build
from subjectdiff.catalogs.pairs import PAIR_SCHEMA
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import Record, make_key, object_from_arrays
from subjectdiff.catalogs.storage import open_url
from subjectdiff.catalogs.tokens import clip_token_positions
from subjectdiff.catalogs.writer import ShardWriter
from subjectdiff.photo_records import ellipse_mask
from subjectdiff.train.cli import main
from subjectdiff.train.config import load_config
from subjectdiff.train.data import BatchStream, TrainSamples, batch_stream, make_reader, pair_index, shared_selection
from subjectdiff.train.pairs import PairIndex, PairMixer

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 96
BOXES = ([0.08, 0.1, 0.48, 0.5], [0.52, 0.5, 0.92, 0.9])  # object 0 and 1: disjoint, each 0.16 of the image
GREY = (128, 128, 128)
N_RECORDS = 6


def colour(r: int, i: int) -> tuple[int, int, int]:
    """Record r's object i's flat colour: distinct for every (record, object)."""
    rng = np.random.default_rng(1000 + 2 * r + i)
    return tuple(int(c) for c in rng.integers(0, 200, 3))


def coloured_record(r: int) -> Record:
    """A 96 x 96 grey PNG with a ball (object 0) and a box (object 1), elliptic, each in its own flat colour."""
    caption = f"a ball and a box in room {r}"
    img = np.full((SIDE, SIDE, 3), GREY, np.uint8)
    objects = []
    for i, (label, box) in enumerate(zip(("ball", "box"), BOXES)):
        m = ellipse_mask(SIDE, SIDE, box)
        img[m] = colour(r, i)
        start = caption.index(label)
        span = [start, start + len(label)]
        objects.append(
            object_from_arrays(
                label=label,
                phrase=label,
                span=span,
                tokens=clip_token_positions(caption, span),
                box=box,
                score=0.9 - 0.1 * i,
                mask=m,
                mask_score=0.9,
            )
        )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    source = f"colour://{r}"
    return Record(
        key=make_key(source),
        image=buf.getvalue(),
        image_ext="png",
        caption=caption,
        width=SIDE,
        height=SIDE,
        source=source,
        objects=objects,
    )


def write_records(d: Path | str) -> list[str]:
    """2 shards x 3 coloured records in D (a folder or a bucket's URL); returns the keys in record order."""
    keys = []
    for s in range(2):
        with ShardWriter(d, f"{s:05d}") as w:
            for r in range(3 * s, 3 * s + 3):
                rec = coloured_record(r)
                w.write(rec)
                keys.append(rec.key)
    return keys


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> tuple[Path, list[str]]:
    """2 shards x 3 coloured records, with a catalog; returns (folder, keys in record order)."""
    d = tmp_path_factory.mktemp("colours")
    keys = write_records(d)
    build(d)
    return d, keys


def write_pairs(path: Path | str, rows: list[tuple[str, int, str, int]], schema: pa.Schema = PAIR_SCHEMA) -> Path:
    """pairs.parquet with these (ref_key, ref_index, target_key, target_index) rows, the other columns filled."""
    n = len(rows)
    cols = {
        "ref_key": [r[0] for r in rows],
        "ref_index": [r[1] for r in rows],
        "target_key": [r[2] for r in rows],
        "target_index": [r[3] for r in rows],
        "label": ["ball" if r[3] == 0 else "box" for r in rows],
        "method": ["retrieval"] * n,
        "similarity": [0.9] * n,
        "frame_gap": [None] * n,
        "change": [0.5] * n,
        "phash_distance": [20] * n,
    }
    table = pa.table({f.name: cols[f.name] for f in schema}, schema=schema)
    with open_url(path, "wb") as f:  # a local path or a bucket's URL
        pq.write_table(table, f)
    return path


def both_ways(keys: list[str]) -> list[tuple[str, int, str, int]]:
    """Record r's object i paired with record r + 1's same object, both directions (ring over the records)."""
    rows = []
    for r in range(len(keys)):
        for i in (0, 1):
            a, b = keys[r], keys[(r + 1) % len(keys)]
            rows += [(a, i, b, i), (b, i, a, i)]
    return rows


def cfg_for(d: Path | str, out: Path, *overrides: str):
    return load_config(
        "tiny",
        [f"data.shards=['{d}']", f"run.out_dir='{out}'", "data.augment=false", "data.object_rules=true", *overrides],
    )


def samples_of(cfg, keys_by_shard=None) -> TrainSamples:
    reader = make_reader(cfg.data, keys_by_shard, 0, 1, cfg.run.seed)
    return TrainSamples(reader, cfg, 32, None, pair_index(cfg.data, reader, keys_by_shard, None))


def dominant(pixels: np.ndarray) -> tuple[int, int, int]:
    """(3, H, W) uint8 -> its most frequent colour other than white and grey (a flat object's colour)."""
    flat = pixels.reshape(3, -1).T
    keep = ~((flat == 255).all(1) | (flat == GREY).all(1))
    values, counts = np.unique(flat[keep], axis=0, return_counts=True)
    return tuple(int(v) for v in values[counts.argmax()])


def test_pair_samples_take_the_subject_from_the_reference_and_the_target_from_the_other(records, tmp_path):
    d, keys = records
    record_of = {k: r for r, k in enumerate(keys)}
    rows = [(keys[0], 0, keys[1], 1), (keys[2], 1, keys[4], 0), (keys[5], 0, keys[3], 0)]
    pairs = write_pairs(tmp_path / "pairs.parquet", rows)
    cfg = cfg_for(d, tmp_path, f"data.pairs='{pairs}'", "data.pair_ratio=1.0", "model.max_subjects=1")
    got = list(samples_of(cfg))
    assert got and all(s["pair"] for s in got)
    seen = set()
    for s in got:
        ref, target = json.loads(s["ref_keys"])[0], s["key"]
        t_obj, r_obj = int(s["objects"][0]), int(s["ref_objects"][0])
        assert (ref, r_obj, target, t_obj) in rows
        seen.add((ref, r_obj, target, t_obj))
        assert s["present"].tolist() == [True]
        # the subject image's pixels are the reference object's colour, the target crop holds the target's objects
        assert dominant(s["subjects"][0]) == colour(record_of[ref], r_obj)
        target_colours = {colour(record_of[target], i) for i in (0, 1)}
        assert dominant(s["image"]) in target_colours and colour(record_of[ref], r_obj) not in target_colours
        # box and localization mask are the target object's; the prompt is the target's caption
        assert np.allclose(s["boxes"][0], BOXES[t_obj], atol=0.02)
        assert s["masks"][0].sum() > 0 and f"room {record_of[target]}" in s["prompt"]
        label = "ball" if t_obj == 0 else "box"
        assert f"the {label} is" in s["prompt"] and json.loads(s["labels"]) == [label]
    assert seen == set(rows)


def test_pairs_and_records_in_a_bucket(bucket, tmp_path):
    url = f"{bucket}/records"
    keys = write_records(url)
    rows = [(keys[0], 0, keys[4], 1), (keys[4], 1, keys[0], 0)]
    pairs = write_pairs(f"{bucket}/pairs.parquet", rows)
    cfg = cfg_for(url, tmp_path, f"data.pairs='{pairs}'", "data.pair_ratio=1.0", "model.max_subjects=1")
    got = list(samples_of(cfg))
    assert sorted((json.loads(s["ref_keys"])[0], s["key"]) for s in got) == sorted((r[0], r[2]) for r in rows)
    for s in got:
        ref = json.loads(s["ref_keys"])[0]
        assert dominant(s["subjects"][0]) == colour(keys.index(ref), int(s["ref_objects"][0]))


def test_pairs_outside_the_selection_are_dropped_and_counted_once(records, tmp_path):
    d, keys = records
    rows = [(keys[0], 0, keys[1], 0), ("not-a-key", 0, keys[1], 0), (keys[2], 0, keys[5], 1)]
    pairs = write_pairs(tmp_path / "pairs.parquet", rows)
    cfg = cfg_for(d, tmp_path, f"data.pairs='{pairs}'")
    shard0 = RecordReader(d).urls[0]
    selection = {shard0: set(keys[:3])}  # keys[5] (shard 1) left out
    notes: list[str] = []
    reader = make_reader(cfg.data, selection, 0, 1, 0)
    index = pair_index(cfg.data, reader, selection, notes.append)
    assert index.rows == 1 and index.dropped == 2
    assert [n for n in notes if "dropped" in n] == [
        f"data: --pairs {pairs}: 2 of 3 pairs dropped (their reference or target record is not in the selection "
        "or the shards, or its object is not eligible in it)"
    ]


def test_object_where_keeps_only_pairs_of_eligible_objects(records, tmp_path):
    """--object-where "score > 0.85" keeps each record's ball (score 0.9), not its box (0.8): a pair is usable only
    when both its objects are balls, as a single-image sample's subject is always its ball."""
    d, keys = records
    balls = [(keys[0], 0, keys[1], 0), (keys[4], 0, keys[2], 0)]
    boxes = [(keys[0], 1, keys[1], 1), (keys[2], 0, keys[3], 1), (keys[5], 1, keys[4], 0)]  # a box at either end
    pairs = write_pairs(tmp_path / "pairs.parquet", balls + boxes)
    cfg = cfg_for(
        d, tmp_path, f"data.pairs='{pairs}'", "data.object_where='score > 0.85'", "data.pair_ratio=0.5",
        "model.max_subjects=1",
    )  # fmt: skip
    selection, eligible = shared_selection(cfg.data, str(tmp_path / "run"), 0, 1, resume=False)
    assert eligible == {k: [0] for k in keys}
    notes: list[str] = []
    stream = batch_stream(cfg, selection, eligible, 0, 1, 32, notes.append)
    got = list(stream.dataset)
    pair_samples = [
        (json.loads(s["ref_keys"])[0], int(s["ref_objects"][0]), s["key"], int(s["objects"][0]))
        for s in got
        if s["pair"]
    ]
    assert pair_samples and set(pair_samples) == set(balls)
    assert all(int(s["objects"][0]) == 0 for s in got)  # single-image samples: the ball too
    assert any("3 of 5 pairs dropped" in n for n in notes)
    # the same pairs without --object-where: every one of them usable
    plain = cfg_for(d, tmp_path, f"data.pairs='{pairs}'")
    reader = make_reader(plain.data, None, 0, 1, 0)
    assert pair_index(plain.data, reader, None, None).rows == 5


def test_the_mixer_gives_the_exact_ratio_of_pair_samples(records, tmp_path):
    d, keys = records
    pairs = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))
    cfg = cfg_for(d, tmp_path, f"data.pairs='{pairs}'", "data.pair_ratio=0.3", "data.batch_size=1")
    samples = samples_of(cfg)
    mixer, phase = samples.mixer, samples.mixer.phase(0, 0)
    got = list(samples)
    singles = sum(not s["pair"] for s in got)
    assert singles == N_RECORDS  # every record once per epoch, as without pairs
    # the epoch ends at the slot after the last record's: its pair slots are those before it
    slots = len(got)
    assert sum(s["pair"] for s in got) == mixer.pairs_before(slots, phase) == math.floor(slots * 0.3 + phase)
    assert [bool(s["pair"]) for s in got] == [mixer.is_pair(j, phase) for j in range(slots)]
    assert list(samples_of(cfg))[5]["subjects"].tobytes() == got[5]["subjects"].tobytes()  # deterministic


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.floats(0, 1),
    pairs=st.integers(1, 50),
    seed=st.integers(0, 2**31),
    readers=st.integers(1, 4),
    epoch=st.integers(0, 3),
    slots=st.integers(0, 300),
)
def test_the_mixed_stream_is_well_formed_for_any_ratio_pairs_and_seed(ratio, pairs, seed, readers, epoch, slots):
    mixer = PairMixer(ratio, seed)
    for reader in range(readers):
        phase = mixer.phase(epoch, reader)
        assert 0 <= phase < 1
        kinds = [mixer.is_pair(j, phase) for j in range(slots)]
        n_pairs = sum(kinds)
        assert n_pairs == mixer.pairs_before(slots, phase)
        assert abs(n_pairs - ratio * slots) < 1  # the pair slots are spread evenly: never off by a whole slot
        rows = [mixer.pair_row(k, epoch, reader, readers, pairs) for k in range(n_pairs)]
        assert all(0 <= p < pairs for p in rows)
        assert rows == [PairMixer(ratio, seed).pair_row(k, epoch, reader, readers, pairs) for k in range(n_pairs)]
        q = mixer.quota(pairs, readers)
        assert len(set(rows[:q])) == len(rows[:q])  # a reader's range has no repeat
    if pairs >= readers:  # the readers' ranges of an epoch are disjoint
        q = mixer.quota(pairs, readers)
        ranges = [{mixer.pair_row(k, epoch, r, readers, pairs) for k in range(q)} for r in range(readers)]
        assert sum(map(len, ranges)) == len(set().union(*ranges)) == q * readers


def test_ranks_take_disjoint_pairs(records, tmp_path):
    """Two ranks, pairs only: each rank's epoch is its own range of the epoch's pair order, none shared."""
    d, keys = records
    pairs = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))  # 24 pairs: 12 per rank
    cfg = cfg_for(d, tmp_path, f"data.pairs='{pairs}'", "data.pair_ratio=1.0", "model.max_subjects=1")
    per_rank = []
    for rank in (0, 1):
        reader = make_reader(cfg.data, None, rank, 2, cfg.run.seed)
        got = list(TrainSamples(reader, cfg, 32, None, pair_index(cfg.data, reader, None, None)))
        per_rank.append({(json.loads(s["ref_keys"])[0], int(s["ref_objects"][0]), s["key"]) for s in got})
        assert len(got) == len(per_rank[-1]) == 12
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {(a, i, b) for a, i, b, _ in both_ways(keys)}


INDEX_ARRAYS = ("ref_rec", "ref_obj", "tgt_rec", "tgt_obj", "starts")
LOCATION_ARRAYS = ("keys", "url", "json_at", "json_size", "image_at", "image_size", "ext")


def same_index(a: PairIndex, b: PairIndex) -> bool:
    return (
        (a.path, a.total, a.records.urls) == (b.path, b.total, b.records.urls)
        and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in INDEX_ARRAYS)
        and all(np.array_equal(getattr(a.records, f), getattr(b.records, f)) for f in LOCATION_ARRAYS)
    )


def index_on_rank(rank: int, world: int, init: str, d: str, runs: dict[str, str], out: str) -> None:
    """One of WORLD gloo ranks (torch.multiprocessing.spawn): batch_stream with each pairs file of RUNS ({name:
    path}), counting the tar header walks of train/pairs.py; writes OUT/rank{RANK}.pkl: {name: (index or the error
    in words, the shards whose headers it walked, the key of the first pair's reference record read with it)}."""
    import pickle

    import torch.distributed as dist

    from subjectdiff.train import pairs as pairs_module

    walked: list[str] = []
    real = pairs_module.member_index

    def counted(f, url):
        walked.append(url)
        yield from real(f, url)

    pairs_module.member_index = counted
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    got = {}
    try:
        for name, pairs in runs.items():
            walked.clear()
            cfg = cfg_for(d, Path(out), f"data.pairs='{pairs}'")
            try:
                index = batch_stream(cfg, None, None, rank, world, 32).dataset.pairs
                ref = index.records.read(int(index.ref_rec[0])).key  # the index works where it was received
                got[name] = (index, list(walked), ref)
            except Exception as e:
                got[name] = (f"{type(e).__name__}: {e}", list(walked), None)
    finally:
        dist.destroy_process_group()
    with open(f"{out}/rank{rank}.pkl", "wb") as f:
        pickle.dump(got, f)


def test_under_two_ranks_rank_0_alone_locates_the_paired_records(records, tmp_path):
    """Locating the paired records walks the tar headers of every shard holding one (a request each on an object
    store): rank 0 does it once and sends the index; the other rank walks none and gets the very same index, the one
    a single process builds. A pairs file rank 0 cannot index stops the other rank too, saying so."""
    import pickle

    import torch.multiprocessing as mp

    d, keys = records
    good = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))
    bad = tmp_path / "bad.parquet"
    schema = pa.schema([f for f in PAIR_SCHEMA if f.name != "target_index"])
    pq.write_table(pa.table({f.name: pa.array([None], f.type) for f in schema}, schema=schema), bad)
    runs = {"good": str(good), "bad": str(bad)}
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(index_on_rank, args=(2, init, str(d), runs, str(tmp_path)), nprocs=2, join=True)
    (index0, walked0, ref0), (index1, walked1, ref1) = (
        pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())["good"] for r in (0, 1)
    )
    assert sorted(walked0) == sorted(RecordReader(d).urls) and walked1 == []
    cfg = cfg_for(d, tmp_path, f"data.pairs='{good}'")
    alone = pair_index(cfg.data, make_reader(cfg.data, None, 0, 1, 0), None, None)
    assert same_index(index0, alone) and same_index(index1, alone) and alone.rows == len(both_ways(keys))
    assert ref0 == ref1 == alone.records.keys[alone.ref_rec[0]]
    (error0, _, _), (error1, walked1, _) = (
        pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())["bad"] for r in (0, 1)
    )
    assert error0.startswith("UsageError: --pairs") and "'target_index' is missing" in error0
    assert error1.startswith(f"UsageError: rank 1: stopping, rank 0 could not index --pairs {bad}") and not walked1


def test_two_subject_samples_take_each_subject_from_its_own_pair(records, tmp_path):
    d, keys = records
    record_of = {k: r for r, k in enumerate(keys)}
    rows = [(keys[0], 1, keys[3], 0), (keys[5], 0, keys[3], 1)]  # record 3's two objects, each paired elsewhere
    pairs = write_pairs(tmp_path / "pairs.parquet", rows)
    cfg = cfg_for(d, tmp_path, f"data.pairs='{pairs}'", "data.pair_ratio=1.0")
    got = [s for s in samples_of(cfg) if s["key"] == keys[3]]
    assert got
    for s in got:
        assert s["present"].tolist() == [True, True]
        refs = json.loads(s["ref_keys"])
        subjects = {
            (int(s["objects"][j]), refs[j], int(s["ref_objects"][j])): dominant(s["subjects"][j]) for j in (0, 1)
        }
        assert set(subjects) == {(0, keys[0], 1), (1, keys[5], 0)}
        for (_, ref, r_obj), c in subjects.items():
            assert c == colour(record_of[ref], r_obj)


def take(stream: BatchStream, n: int) -> list[tuple[str, str, bytes]]:
    it = iter(stream)
    out = []
    for _ in range(n):
        b = next(it)
        out.append((json.dumps(list(b["key"])), json.dumps(list(b["ref_keys"])), b["subjects"].numpy().tobytes()))
    return out


def test_a_resumed_mixed_stream_continues_exactly(records, tmp_path):
    d, keys = records
    pairs = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))
    cfg = cfg_for(d, tmp_path, f"data.pairs='{pairs}'", "data.pair_ratio=0.4", "data.augment=true")

    def stream() -> BatchStream:
        return BatchStream(samples_of(cfg), 2, 2)

    straight = take(stream(), 12)  # several epochs, both DataLoader workers
    for stop in (3, 7):
        first = stream()
        head = take(first, stop)
        resumed = stream()
        resumed.load_state(json.loads(json.dumps(first.state())))
        assert head + take(resumed, 12 - stop) == straight
    assert any(k != r for k, r, _ in straight)  # pair samples: some subjects came from other records


def test_training_with_pairs_resumes_exactly(records, tmp_path):
    d, keys = records
    pairs = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))
    common = ["--preset", "tiny", "--records", str(d), "--pairs", str(pairs), "data.pair_ratio=0.5"]
    common += ["run.trace=true", "run.ckpt_every=2", "run.val_every=0", "run.tensorboard=false", "run.progress=off"]
    assert main([*common, "--out", str(tmp_path / "a"), "run.max_steps=4"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "run.max_steps=2"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "run.max_steps=4", "--resume", "latest"]) == 0

    def losses(run: str) -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows]

    assert losses("a") == losses("b")
    digest = [json.loads((tmp_path / r / "digest-rank0.json").read_text())["digest"] for r in ("a", "b")]
    assert digest[0] == digest[1]


def test_without_pairs_training_is_exactly_as_before(records, tmp_path):
    d, keys = records
    pairs = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))
    common = ["--preset", "tiny", "--records", str(d), "run.max_steps=3", "run.val_every=0", "run.progress=off"]
    common += ["run.tensorboard=false"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "zero"), "--pairs", str(pairs), "data.pair_ratio=0"]) == 0
    rows = {
        run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("plain", "zero")
    }
    terms = [{k: v for k, v in r.items() if "per_s" not in k and k != "eta_s"} for r in rows["plain"]]
    assert terms == [{k: v for k, v in r.items() if "per_s" not in k and k != "eta_s"} for r in rows["zero"]]


def test_preview_shows_reference_to_target(records, tmp_path):
    d, keys = records
    pairs = write_pairs(tmp_path / "pairs.parquet", both_ways(keys))
    out = tmp_path / "preview"
    argv = ["preview", "--preset", "tiny", "--records", str(d), "--pairs", str(pairs), "--sample", "8"]
    assert main([*argv, "--out", str(out), "data.pair_ratio=0.5"]) == 0
    page = (out / "index.html").read_text()
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    paired = [r for r in rows if r["pair"]]
    assert len(paired) == page.count('<article class="sample pair"') >= 3
    assert page.count('class="arrow"') == len(paired)
    for r in paired:
        assert all(ref[0] != r["key"] for ref in r["refs"])  # the subjects came from the other records
        assert f'data-ref="{html.escape(r["refs"][0][0])}"' in page


@pytest.mark.parametrize(
    "bad, column",
    [
        (pa.schema([f for f in PAIR_SCHEMA if f.name != "target_index"]), "target_index"),
        (
            pa.schema([pa.field("ref_index", pa.string()) if f.name == "ref_index" else f for f in PAIR_SCHEMA]),
            "ref_index",
        ),
    ],
)
def test_a_pairs_file_that_is_not_pair_schema_is_one_line_exit_2(records, tmp_path, capsys, bad, column):
    d, keys = records
    path = tmp_path / "bad.parquet"
    cols = {f.name: pa.array([None], f.type) for f in bad}
    pq.write_table(pa.table(cols, schema=bad), path)
    argv = ["--preset", "tiny", "--records", str(d), "--pairs", str(path), "--out", str(tmp_path / "o")]
    assert main([*argv, "run.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("subjectdiff train")]
    assert len(lines) == 1 and str(path) in lines[0] and repr(column) in lines[0], err
