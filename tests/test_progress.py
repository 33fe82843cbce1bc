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
