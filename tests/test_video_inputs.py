"""Videos as datagen inputs (issue #20): shots found where they were cut, a few frames per shot, each frame a record
(or a failure) of its own, exact accounting per video and per frame, broken videos failing with a reason, resume
and --retry-failures per video.

The videos are made here with PyAV from scikit-image's photos (subjectdiff.photo_records.write_photo_video): one
shot per photo, hard cuts between them, a pan and a zoom within each shot."""

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

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.reader import RecordReader
from subjectdiff.catalogs.schema import make_key
from subjectdiff.datagen import sources
from subjectdiff.datagen.config import VideoConfig
from subjectdiff.datagen.run import run
from subjectdiff.datagen.video import (
    frame_source,
    grab,
    merge_short_shots,
    open_video,
    sample_frames,
    scan,
    video_items,
)
from subjectdiff.photo_records import write_photo_video
from tests.pipelines import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "datagen" / "sample_images"
FPS = 12


# ----------------------------------------------------------------------------------------------- sampling


@st.composite
def shot_lists(draw):
    lengths = draw(st.lists(st.integers(0, 400), min_size=0, max_size=30))
    start, shots = draw(st.integers(0, 50)), []
    for n in lengths:
        shots.append((start, start + n))
        start += n
    return shots


@settings(max_examples=300, deadline=None)
@given(
    shots=shot_lists(),
    fps=st.floats(1.0, 120.0),
    per_shot=st.integers(1, 6),
    min_gap_s=st.floats(0.0, 5.0),
    max_frames=st.integers(1, 80),
)
def test_sampled_frames_lie_in_their_shots_spaced_and_within_budget(shots, fps, per_shot, min_gap_s, max_frames):
    picks = sample_frames(shots, fps, per_shot, min_gap_s, max_frames)
    frames = [f for _, f in picks]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    assert len(picks) <= max_frames
    for shot, f in picks:
        assert shots[shot][0] <= f < shots[shot][1]
    for shot in {s for s, _ in picks}:
        mine = [f for s, f in picks if s == shot]
        assert len(mine) <= per_shot
        assert all((b - a) / fps >= min_gap_s - 1e-9 for a, b in zip(mine, mine[1:]))
    live = [i for i, (a, b) in enumerate(shots) if b > a]
    if len(live) <= max_frames:
        assert {s for s, _ in picks} == set(live)  # every shot of nonzero length has a frame
    else:
        assert len(picks) == max_frames and live[-1] in {s for s, _ in picks}  # so max shot + 1 counts the shots


def test_a_long_shot_gets_its_frames_spread_over_it():
    assert sample_frames([(0, 120)], 12.0, 3, 1.0, 64) == [(0, 20), (0, 59), (0, 99)]
    assert sample_frames([(0, 120), (120, 126)], 12.0, 3, 1.0, 64) == [(0, 20), (0, 59), (0, 99), (1, 122)]


# --------------------------------------------------------------------------------------------- one video


def _shot_of(shots: list[tuple[int, int]], frame: int) -> int:
    return next(i for i, (a, b) in enumerate(shots) if a <= frame < b)


def test_shots_are_found_where_they_were_cut_and_seeking_gives_the_same_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    made = write_photo_video(path, ["astronaut", "chelsea", "coffee", "rocket", "astronaut"], fps=FPS)
    container, stream = open_video(str(path))
    with container:
        s = scan(container, stream, 27.0, 0.5)
        assert s.shots == made and s.broke is None and s.seekable()
        wanted = [3, 17, 18, 40, 41, 89]  # across key frames and cuts, and the last frame
        sought = dict(grab(container, stream, s, wanted))
        s.pts = [None] * len(s.pts)  # a stream whose frames carry no pts: decoded forward, counting
        forward = dict(grab(container, stream, s, wanted))
    with open_video(str(path))[0] as c2:  # the same frames decoded front to back
        every = [f.to_ndarray(format="rgb24") for f in c2.decode(video=0)]
    assert len(every) == made[-1][1]
    for n in wanted:
        assert (sought[n] == every[n]).all() and (forward[n] == every[n]).all(), n


def test_a_video_gives_one_item_per_sampled_frame_with_its_place_in_the_video(tmp_path):
    path = tmp_path / "clip.mkv"
    made = write_photo_video(path, ["coffee", "chelsea", "rocket"], fps=FPS, codec="mpeg4")
    cfg = VideoConfig(frames_per_shot=2, min_gap_s=0.5)
    items = video_items(str(path), "unitkey", str(path), "alt", cfg)
    assert [(i["video"]["shot"], i["video"]["frame"]) for i in items] == sample_frames(made, FPS, 2, 0.5, 64)
    for it in items:
        n = it["video"]["frame"]
        assert it["source"] == frame_source(str(path), n) and it["key"] == make_key(f"{path}#frame={n}")
        assert it["image"].shape == (96, 128, 3) and it["image_format"] == "jpeg" and not it.get("failure")
        assert it["video"]["time"] == pytest.approx(
            n / FPS, abs=1e-3
        )  # Matroska times are in ms and it["unit_key"] == "unitkey"


def test_a_truncated_video_keeps_its_frames_before_the_break_and_fails_with_a_reason(tmp_path):
    path = tmp_path / "clip.mp4"
    made = write_photo_video(path, ["astronaut", "chelsea", "coffee"], fps=FPS)
    data = path.read_bytes()
    items = video_items("cut.mp4", "k", data[: len(data) * 6 // 10])
    *frames, broke = items
    assert broke["failure"]["stage"] == "decode" and "truncated or corrupt" in broke["failure"]["reason"]
    assert broke["key"] == "k" and broke["source"] == "cut.mp4"
    assert frames and not any(f.get("failure") for f in frames)
    assert all(f["video"]["frame"] < broke["video"]["frame"] < made[-1][1] for f in frames)
    assert all(f["video"]["shot"] == _shot_of(made, f["video"]["frame"]) for f in frames)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"this is a text file, not a video\n", "not a video"),
        (b"", "the file is empty"),
    ],
)
def test_a_file_with_a_video_suffix_that_is_no_video_is_one_failure_saying_so(data, words):
    (item,) = video_items("notes.webm", "k", data)
    assert item["failure"]["stage"] == "decode" and words in item["failure"]["reason"]
    assert item["key"] == "k" and item["video"] == {"source": "notes.webm", "shot": 0, "frame": 0, "time": 0.0}


def _write_clip(path: Path, frames: list, times: list[float] | None = None, **rotation) -> None:
    """A video of FRAMES ((H, W, 3) uint8) at FPS, or shown at TIMES (seconds: a variable frame rate, pts in ms);
    rotation: display=DEG (the display matrix, degrees counter-clockwise; with hflip=True or vflip=True, a mirror
    after the turn, as PyAV's set_display_rotation writes it) or tag=DEG (the legacy `rotate` tag, degrees
    clockwise; Matroska keeps it as a tag)."""
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4" if path.suffix == ".mkv" else "libx264", rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if times is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if "display" in rotation:
            flips = {k: rotation[k] for k in ("hflip", "vflip") if k in rotation}
            stream.set_display_rotation(rotation["display"], **flips)
        if "tag" in rotation:
            stream.metadata["rotate"] = str(rotation["tag"])
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


@pytest.mark.parametrize(
    "suffix, rotation", [(".mp4", {"display": 90}), (".mp4", {"display": -90}), (".mkv", {"tag": 90})]
)
def test_a_video_with_a_display_rotation_gives_upright_frames_and_says_so(tmp_path, suffix, rotation):
    """A phone's portrait video: stored sideways, with the rotation that players apply; the records are upright."""
    import numpy as np
    from PIL import Image

    from subjectdiff.photo_records import photo

    upright = np.asarray(Image.fromarray(photo("chelsea")).resize((128, 96), Image.BILINEAR))
    ccw = rotation.get("display", -rotation.get("tag", 0)) % 360  # what turns the stored frame upright
    stored = np.ascontiguousarray(np.rot90(upright, -ccw // 90))  # (128, 96, 3): on its side
    path = tmp_path / f"portrait{suffix}"
    _write_clip(path, [stored] * 6, **rotation)
    (item,) = video_items(str(path), "k", str(path), cfg=VideoConfig(frames_per_shot=1))
    assert not item.get("failure") and item["image"].shape == upright.shape
    err = np.abs(item["image"].astype(int) - upright).mean()
    flipped = np.abs(item["image"].astype(int) - upright[::-1, ::-1]).mean()  # the other upright-shaped guess
    assert err < 12 and flipped > 3 * err, (err, flipped)
    assert item["extra"]["decode"] == [f"rotate_{ccw}"]


@pytest.mark.parametrize(
    "mirror, words",
    [
        ({"display": 0, "hflip": True}, ["hflip"]),
        ({"display": 0, "vflip": True}, ["hflip", "rotate_180"]),
        ({"display": 90, "hflip": True}, ["hflip", "rotate_270"]),
        ({"display": 180, "vflip": True}, ["hflip"]),
        ({"display": 270, "hflip": True}, ["hflip", "rotate_90"]),
    ],
)
def test_a_mirrored_video_gives_the_frames_players_show_and_says_so(tmp_path, mirror, words):
    """A selfie camera's video: a display matrix that mirrors (a negative determinant), alone or after a turn. The
    records hold what players show: the stored frame turned, then flipped."""
    import numpy as np
    from PIL import Image

    from subjectdiff.photo_records import photo

    shown = np.asarray(Image.fromarray(photo("chelsea")).resize((128, 96), Image.BILINEAR))
    # what players show is flip(turn(stored)); so stored = turn back (flip (shown)), a flip being its own inverse
    unflipped = shown[:, ::-1] if mirror.get("hflip") else shown[::-1]
    stored = np.ascontiguousarray(np.rot90(unflipped, -mirror["display"] // 90))
    path = tmp_path / "selfie.mp4"
    _write_clip(path, [stored] * 6, **mirror)
    (item,) = video_items(str(path), "k", str(path), cfg=VideoConfig(frames_per_shot=1))
    assert not item.get("failure") and item["image"].shape == shown.shape
    err = np.abs(item["image"].astype(int) - shown).mean()
    unmirrored = np.abs(item["image"].astype(int) - unflipped).mean()  # the turn applied, the mirror not
    assert err < 12 and unmirrored > 3 * err, (err, unmirrored)
    assert item["extra"]["decode"] == words


def test_a_video_without_rotation_says_nothing_of_it(tmp_path):
    import numpy as np

    path = tmp_path / "plain.mp4"
    _write_clip(path, [np.full((48, 64, 3), 128, np.uint8)] * 4)
    (item,) = video_items(str(path), "k", str(path), cfg=VideoConfig(frames_per_shot=1))
    assert item["image"].shape == (48, 64, 3) and "decode" not in item.get("extra", {})


def test_a_variable_frame_rate_video_is_sampled_by_its_frames_own_times(tmp_path):
    """Frames 0.04 s apart, then 0.5 s apart (a phone in low light): at the average rate the frame count would say
    the first frames are far apart. Sampled frames keep min_gap_s of real time, and record their pts as time."""
    import numpy as np

    times = [i * 0.04 for i in range(40)] + [1.6 + 0.5 * i for i in range(8)]  # 48 frames over 5.1 s
    frames = [np.full((48, 64, 3), 120 + (i % 2), np.uint8) for i in range(len(times))]  # one shot, no cut
    path = tmp_path / "vfr.mkv"
    _write_clip(path, frames, times)
    cfg = VideoConfig(frames_per_shot=6, min_gap_s=1.0)
    items = video_items(str(path), "k", str(path), cfg=cfg)
    got = [i["video"]["time"] for i in items]
    assert not any(i.get("failure") for i in items) and len(got) >= 3
    assert all(b - a >= 1.0 - 1e-6 for a, b in zip(got, got[1:])), got
    for it in items:
        assert it["video"]["time"] == pytest.approx(times[it["video"]["frame"]], abs=1e-3)  # its pts, not n / fps


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0.001, 2.0), min_size=1, max_size=120),
    cuts=st.lists(st.integers(1, 119), max_size=6),
    per_shot=st.integers(1, 6),
    min_gap_s=st.floats(0.0, 3.0),
    max_frames=st.integers(1, 40),
)
def test_frames_sampled_by_their_times_keep_the_gap_in_time(gaps, cuts, per_shot, min_gap_s, max_frames):
    times = [0.0]
    for g in gaps:
        times.append(times[-1] + g)
    bounds = sorted({0, len(times), *(c for c in cuts if c < len(times))})
    shots = list(zip(bounds, bounds[1:]))
    picks = sample_frames(shots, 10.0, per_shot, min_gap_s, max_frames, times=times)
    frames = [f for _, f in picks]
    assert frames == sorted(frames) and len(set(frames)) == len(frames) and len(picks) <= max_frames
    assert {s for s, _ in picks} == set(range(len(shots))) or len(picks) == max_frames
    for shot in {s for s, _ in picks}:
        mine = [f for s, f in picks if s == shot]
        assert all(shots[shot][0] <= f < shots[shot][1] for f in mine) and len(mine) <= per_shot
        assert all(times[b] - times[a] >= min_gap_s - 1e-6 for a, b in zip(mine, mine[1:]))


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.floats(0.001, 1.0), max_size=80),
    cuts=st.lists(st.integers(1, 80), max_size=12),
    min_shot_s=st.floats(0.0, 3.0),
    last_s=st.floats(0.001, 0.1),
)
def test_short_shots_merge_until_every_shot_lasts_min_shot_s_in_time(gaps, cuts, min_shot_s, last_s):
    times = [0.0]
    for g in gaps:
        times.append(times[-1] + g)
    found = sorted({c for c in cuts if c < len(times)})
    shots = merge_short_shots(found, times, min_shot_s, last_s)
    assert shots[0][0] == 0 and shots[-1][1] == len(times) and all(a < b for a, b in shots)
    assert all(b == c for (_, b), (c, _) in zip(shots, shots[1:]))  # the frames, in order, each in one shot
    assert {a for a, _ in shots[1:]} <= set(found)  # no cut where the detector found none
    ends = [times[b] if b < len(times) else times[-1] + last_s for _, b in shots]
    if len(shots) > 1:
        assert all(e - times[a] >= min_shot_s - 1e-6 for (a, _), e in zip(shots, ends))
    kept = {a for a, _ in shots}
    for c in found:  # a cut is dropped only where it would leave a shot too short
        if c not in kept:
            before = max(a for a in kept if a < c)
            assert times[c] - times[before] < min_shot_s or times[-1] + last_s - times[c] < min_shot_s


def test_min_shot_s_holds_in_time_where_the_frame_rate_varies(tmp_path):
    """Four photos, hard cuts between them, at rates that vary 50-fold: a shot of 30 frames in 0.3 s is shorter
    than video.min_shot_s = 0.5 and merges into the next; a shot of 4 frames over 2 s is a shot. (Counted in frames
    at the average rate, about 11 a second here, it would be the other way round.)"""
    import numpy as np
    from PIL import Image

    from subjectdiff.photo_records import photo

    runs = [("astronaut", 10, 0.5), ("chelsea", 30, 0.01), ("coffee", 4, 0.5), ("rocket", 60, 0.04)]
    frames, times = [], []
    for name, count, step in runs:
        still = np.asarray(Image.fromarray(photo(name)).resize((64, 48), Image.BILINEAR).convert("RGB"))
        start = times[-1] + 0.04 if times else 0.0
        frames += [still] * count
        times += [start + i * step for i in range(count)]
    path = tmp_path / "vfr.mkv"
    _write_clip(path, frames, times)
    container, stream = open_video(str(path))
    with container:
        s = scan(container, stream, 27.0, 0.5)
    assert s.vfr_times() is not None and s.broke is None
    assert s.shots == [(0, 10), (10, 44), (44, 104)]  # chelsea's 0.3 s joined coffee's shot


# --------------------------------------------------------------------------------------- where videos come


def test_videos_are_planned_from_folders_tars_and_lists(tmp_path):
    clip = tmp_path / "in" / "clip.MOV"
    clip.parent.mkdir()
    write_photo_video(clip, ["coffee"], frames_per_shot=4, fps=FPS)
    (tmp_path / "in" / "a.jpg").write_bytes((SAMPLES / "chelsea.jpg").read_bytes())
    folder = list(sources.iter_units(str(tmp_path / "in")))
    assert [(Path(u.source).name, u.media) for u in folder] == [("a.jpg", None), ("clip.MOV", "video")]
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("s0.webm", clip.read_bytes()), ("s0.txt", b"a cup"), ("s1.jpg", b"jpeg")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    units = sources.list_tar(str(tar))
    assert [(u.source.rsplit("#", 1)[-1], u.media, u.alt_text) for u in units] == [
        ("s0.webm", "video", "a cup"),
        ("s1.jpg", None, None),
    ]
    lst = tmp_path / "list.csv"
    lst.write_text("path\nin/clip.MOV\nin/a.jpg\n")
    assert [u.media for u in sources.iter_units(str(lst))] == ["video", None]


# ---------------------------------------------------------------------------------------------- end to end


def _videos(out: Path) -> dict[str, dict]:
    rows = catalog.query(out, "SELECT * FROM videos").to_pylist()
    return {Path(r["video"]).name: r for r in rows}


def _frames(out: Path) -> list[dict]:
    """Every frame row of the catalog, sample or failure, with where it went."""
    return catalog.query(
        out,
        "SELECT key, source, video, video_shot, video_frame, 'ok' AS status FROM samples WHERE video IS NOT NULL "
        "UNION ALL SELECT key, source, video, video_shot, video_frame, 'failed' FROM failures WHERE video IS NOT NULL",
    ).to_pylist()


def _expected(made: list[tuple[int, int]], cfg: VideoConfig) -> list[tuple[int, int]]:
    return sample_frames(made, FPS, cfg.frames_per_shot, cfg.min_gap_s, cfg.max_frames)


def _assert_accounted(out: Path, videos: dict[Path, list[tuple[int, int]]], cfg: VideoConfig) -> None:
    """Each sampled frame of each (healthy) video once, in samples or failures, keyed by its frame; the videos view
    counts them."""
    rows = _frames(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    view = _videos(out)
    for path, made in videos.items():
        mine = sorted((r["video_shot"], r["video_frame"]) for r in rows if r["video"] == str(path))
        assert mine == _expected(made, cfg), path.name  # the shots found are the shots made
        for r in rows:
            if r["video"] == str(path):
                assert r["key"] == make_key(f"{path}#frame={r['video_frame']}")
        v = view[path.name]
        ok = sum(r["status"] == "ok" for r in rows if r["video"] == str(path))
        assert (v["frames"], v["frames_ok"], v["frames_failed"]) == (len(mine), ok, len(mine) - ok)
        assert (v["shots"], v["status"], v["reason"]) == (len(made), "ok", None)


class RaisingOnVideo:
    """The real stage, except that ground raises on any block holding a frame of one video."""

    def __init__(self, name, cfg, video: str):
        from subjectdiff.datagen.stage_pool import build_stage

        self.inner, self.name, self.video = build_stage(name, cfg), name, video

    def __call__(self, items):
        if self.name == "ground" and any(self.video in it["source"] for it in items):
            raise RuntimeError("out of memory")
        return self.inner(items)


def raising_on_flaky(name, cfg):
    return RaisingOnVideo(name, cfg, "flaky.mp4")


MIXED_CFG = {"shard_size": 2, "batch_size": 8}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder of two photos, two videos (an H.264 MP4, an MPEG-4 Matroska in a subfolder), a truncated MP4, a
    text file named .mov and a video whose blocks the ground stage fails on (flaky.mp4, for --retry-failures);
    run once with the tiny preset (the module's one datagen run: every test below reads it, or a copy).
    Returns src, out, the healthy videos' shots, the truncated one's, flaky's, the summary and stderr."""
    import contextlib

    src = tmp_path_factory.mktemp("mixed")
    for name in ("astronaut.jpg", "coins.jpg"):
        (src / name).write_bytes((SAMPLES / name).read_bytes())
    (src / "clips").mkdir()
    made = {
        src / "four.mp4": write_photo_video(src / "four.mp4", ["astronaut", "chelsea", "coffee", "rocket"], fps=FPS),
        src / "clips" / "two.mkv": write_photo_video(
            src / "clips" / "two.mkv", ["coffee", "astronaut"], fps=FPS, codec="mpeg4"
        ),
    }
    cut = write_photo_video(src / "cut.mp4", ["rocket", "chelsea", "coffee"], fps=FPS)
    data = (src / "cut.mp4").read_bytes()
    (src / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    (src / "notes.mov").write_text("minutes of the meeting, not a video\n")
    flaky = write_photo_video(src / "flaky.mp4", ["chelsea", "rocket"], frames_per_shot=12, fps=FPS)
    out = tmp_path_factory.mktemp("out")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = run(str(src), out, tiny_cfg(**MIXED_CFG), stage_factory=raising_on_flaky, progress_every=60)
    return src, out, made, cut, flaky, summary, err.getvalue()


@pytest.mark.slow  # the module's datagen run on Ray with the tiny models: about 90 s on a shared 2-core machine
def test_a_folder_of_photos_and_videos_accounts_for_every_frame(mixed):
    src, out, made, _, _, summary, _ = mixed
    assert summary.incomplete == []
    _assert_accounted(out, made, VideoConfig())
    photos = catalog.query(
        out, "SELECT source FROM samples WHERE video IS NULL UNION ALL SELECT source FROM failures WHERE video IS NULL"
    )
    assert sorted(photos.column("source").to_pylist()) == [str(src / "astronaut.jpg"), str(src / "coins.jpg")]
    n = catalog.query(out, "SELECT (SELECT count(*) FROM samples) + (SELECT count(*) FROM failures) AS n")
    assert summary.ok + summary.failed == n.column("n")[0].as_py()
    # the frames are records like any photo's, and say where in their video they come from
    frames = [r for r in RecordReader(out, decode_masks=False) if r.meta.get("video")]
    assert frames and all(r.image.shape == (96, 128, 3) for r in frames)
    for r in frames:
        v = r.meta["video"]
        assert r.meta["source"] == f"{v['source']}#frame={v['frame']}" and v["time"] == pytest.approx(
            v["frame"] / FPS, abs=1e-3
        )
        assert r.meta["objects"] and r.meta["caption"]


@pytest.mark.slow  # the same run as above (module-scoped)
def test_a_truncated_video_is_a_partial_video_and_a_non_video_a_failed_one(mixed):
    src, out, _, cut, *_ = mixed
    v = _videos(out)
    broken = v["cut.mp4"]
    assert broken["status"] == "partial" and "truncated or corrupt" in broken["reason"] and broken["frames"] >= 1
    (row,) = catalog.query(
        out, f"SELECT stage, video_frame, video_shot FROM failures WHERE source = '{src / 'cut.mp4'}'"
    ).to_pylist()
    assert row["stage"] == "decode" and 0 < row["video_frame"] < cut[-1][1]
    frames = [r for r in _frames(out) if r["video"] == str(src / "cut.mp4") and r["source"] != r["video"]]
    assert len(frames) == broken["frames"]
    assert all(
        r["video_frame"] < row["video_frame"] and r["video_shot"] == _shot_of(cut, r["video_frame"]) for r in frames
    )
    assert broken["shots"] == row["video_shot"] + 1
    fake = v["notes.mov"]
    assert (fake["status"], fake["frames"], fake["shots"]) == ("failed", 0, 0) and "not a video" in fake["reason"]


@pytest.mark.slow  # the same run as above
def test_the_progress_line_counts_planned_inputs_and_the_records_beside_them(mixed):
    """7 inputs (2 photos, 5 videos) give more records than inputs: the line's count ends at the inputs planned."""
    *_, summary, err = mixed
    last = [line for line in err.splitlines() if " inputs, " in line][-1]
    n = summary.ok + summary.failed
    assert n > 7 and last.startswith(f"[datagen] 7/7 inputs, {n} samples ({summary.ok} ok, {summary.failed} failed) ")


@pytest.mark.slow  # a retry run of a copy of the module's run
def test_retry_failures_redoes_a_video_whole(mixed, tmp_path):
    import shutil

    src, first, made, _, flaky, _, _ = mixed
    out = Path(shutil.copytree(first, tmp_path / "out"))
    raised = "SELECT video, stage, reason FROM failures WHERE reason LIKE 'error:%'"  # not the data's failures
    fails = catalog.query(out, raised).to_pylist()
    assert {(Path(f["video"]).name, f["stage"], f["reason"]) for f in fails} == {
        ("flaky.mp4", "ground", "error: RuntimeError: out of memory")
    }
    kept = catalog.query(out, "SELECT key FROM samples ORDER BY key").column("key").to_pylist()
    again = run(str(src), out, tiny_cfg(**MIXED_CFG), retry_failures=True, progress_every=60)
    assert again.incomplete == []
    _assert_accounted(out, {**made, src / "flaky.mp4": flaky}, VideoConfig())
    assert not catalog.query(out, raised).num_rows
    other = "SELECT key FROM samples WHERE video IS NULL OR video NOT LIKE '%flaky.mp4' ORDER BY key"
    assert catalog.query(out, other).column("key").to_pylist() == kept  # the rest carried over unchanged
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["retried"] == 1  # one video


@pytest.mark.slow  # a datagen run in a subprocess (starting Ray, loading the tiny models), killed; then resumed
def test_a_killed_run_of_videos_resumes_to_exact_accounting(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photos = ["astronaut", "chelsea", "coffee", "rocket"]
    # two one-second shots each: one frame a shot (video.min_gap_s), so the shards are small and quick
    made = {
        src / f"{i}.mp4": write_photo_video(src / f"{i}.mp4", photos[i : i + 2], frames_per_shot=FPS, fps=FPS)
        for i in range(3)
    }
    made[src / "3.mp4"] = write_photo_video(src / "3.mp4", ["rocket", "astronaut"], frames_per_shot=FPS, fps=FPS)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "subjectdiff", "datagen", "run", "--input", str(src), "--out", str(out)]
    cmd += ["--preset", "tiny", "--shard-size", "1", "--batch-size", "4"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 900  # only catches a hang on a loaded machine
        while not list(out.glob("*_stats.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed: " + log.read_text()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    assert 1 <= len(list(out.glob("*_stats.json"))) < 4
    # resumed in this process (its Ray shared with the module's other runs): the same settings as the command's,
    # the model stages in one actor (how the run executes, not what it writes: one worker loads the models)
    cfg = tiny_cfg(shard_size=1, batch_size=4)
    cfg.pipeline.fuse = True
    resumed = run(str(src), out, cfg, progress_every=60)
    assert resumed.incomplete == []
    _assert_accounted(out, made, VideoConfig())
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["running", "complete"]


def test_video_settings_load_from_overrides_check_their_values_and_count_in_the_fingerprint():
    from subjectdiff.datagen.job import load_config
    from subjectdiff.datagen.plan import stages_fingerprint

    base = load_config("default")
    assert base.stages.video == VideoConfig(frames_per_shot=3, min_gap_s=1.0, max_frames=64)
    two = load_config("default", overrides=["video.frames_per_shot=2", "video.max_frames=8"])
    assert (two.stages.video.frames_per_shot, two.stages.video.max_frames) == (2, 8)
    assert stages_fingerprint(two.stages) != stages_fingerprint(base.stages)
    with pytest.raises(ValueError, match="video.max_frames = 0 must be >= 1"):
        load_config("default", overrides=["video.max_frames=0"])


def test_a_video_in_a_bucket_is_planned_and_spooled_to_disk_never_read_whole(tmp_path, monkeypatch):
    """A URL folder (fsspec's memory filesystem standing in for a bucket): the video is planned as one; its decode
    task copies it to a local temporary file a chunk at a time (never reading it into memory: a two-hour video
    would not fit) and samples it as a local one; the temporary file is gone afterwards."""
    import tempfile

    import fsspec
    import pyarrow.parquet as pq

    from subjectdiff.datagen import units as units_module
    from subjectdiff.datagen.decode import read_and_decode

    whole_reads, real_read = [], units_module.read_unit

    def read_unit(path, offset, size, *column):
        whole_reads.append(path)
        return real_read(path, offset, size, *column)

    monkeypatch.setattr(units_module, "read_unit", read_unit)
    monkeypatch.setattr(units_module, "SPOOL_CHUNK", 4096)  # many chunks for this small clip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir()

    made = write_photo_video(tmp_path / "clip.webm", ["coffee", "rocket"], fps=FPS, codec="libvpx-vp9")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket-videos/a/clip.webm", (tmp_path / "clip.webm").read_bytes())
    fs.pipe("/bucket-videos/a/photo.jpg", (SAMPLES / "coffee.jpg").read_bytes())
    try:
        sources.write_plan("memory://bucket-videos/", tmp_path / "plan.parquet", 10)
        rows = pq.read_table(tmp_path / "plan.parquet").to_pydict()
        assert [(r.rsplit("/", 1)[-1], m) for r, m in zip(rows["source"], rows["media"])] == [
            ("clip.webm", "video"),
            ("photo.jpg", None),
        ]
        items = read_and_decode(rows)
    finally:
        fs.rm("/bucket-videos", recursive=True)
    video = "memory://bucket-videos/a/clip.webm"
    assert [(i["video"]["shot"], i["video"]["frame"]) for i in items[:-1]] == _expected(made, VideoConfig())
    assert all(i["source"] == frame_source(video, i["video"]["frame"]) and not i.get("failure") for i in items[:-1])
    assert items[-1]["source"].endswith("photo.jpg") and "video" not in items[-1]
    assert not [p for p in whole_reads if p.endswith(".webm")] and not list((tmp_path / "spool").iterdir())


def test_spooling_copies_a_tar_member_exactly_and_a_short_one_fails_with_a_reason(tmp_path, monkeypatch):
    from subjectdiff.datagen import units as units_module

    monkeypatch.setattr(units_module, "SPOOL_CHUNK", 1000)
    data = bytes(range(256)) * 40  # 10240 bytes
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("s0.mp4")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    units_module.spool_unit(str(tar), 512, len(data), str(tmp_path / "out.mp4"))
    assert (tmp_path / "out.mp4").read_bytes() == data
    with pytest.raises(units_module.UnitReadError, match="short"):
        units_module.spool_unit(str(tar), 512, 10 * len(data), str(tmp_path / "short.mp4"))
