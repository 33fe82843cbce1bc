"""subjectdiff.progress: the one progress class, as the datagen run and the trainer use it."""

from __future__ import annotations

import io
import math

from subjectdiff.progress import Progress, clock, duration


def test_the_trainers_pace_counts_from_its_resumed_step():
    pace = Progress(10, None, done=4, unit="step")  # resumed at step 4: the rate counts this process's steps
    assert pace.eta() == math.inf and pace.item_rate() == 0
    pace.t0 -= 2.0
    for _ in range(6):
        pace.update(1, items=8)
    assert pace.done == 10 and pace.eta() == 0
    assert abs(pace.rate() - 3.0) < 0.1 and abs(pace.item_rate() - 24.0) < 1.0
    out = io.StringIO()
    lines = Progress(5, 0.0, out)
    lines.update(5, 0)
    assert out.getvalue().startswith("[datagen] 5/5 samples (5 ok, 0 failed) ")


def test_durations_read_as_before():
    assert clock(3 * 3600 + 4 * 60 + 5) == "03:04:05" and clock(2 * 86400 + 5) == "2d 00:00:05"
    assert duration(12) == "12s" and duration(185) == "3m05s" and duration(math.inf) == "?"


def test_a_datagen_line_counts_planned_inputs_and_the_records_beside_them():
    """2 photos and a video of 5 sampled frames: 3 inputs planned, 7 records; a redone shard never goes back."""
    out = io.StringIO()
    prog = Progress(3, 0.0, out, unit="inputs", rate_unit="inputs/s", records="samples")
    prog.update(2, 0, shard="00000", units=2)  # the photos' block
    prog.update(4, 1, shard="00001", units=1)  # the video's block: its 5 frames, written together
    prog.restart("00001")  # the video's shard was lost before its commit, and is redone: nothing counted twice
    prog.update(4, 1, shard="00001", units=1)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "[datagen] 2/3 inputs, 2 samples",
        "[datagen] 3/3 inputs, 7 samples",
        "[datagen] 3/3 inputs, 7 samples",
    ]
    assert lines[-1].startswith("[datagen] 3/3 inputs, 7 samples (6 ok, 1 failed) ") and " inputs/s, ETA " in lines[-1]
    assert prog.eta() == 0
