"""Progress reporting, one home for every app: work done against a total, its rate and ETA since this process
started, and how they are shown.

    prog = Progress(inputs, unit="inputs", rate_unit="inputs/s", records="samples")   # a datagen run
    prog.update(ok, failed, shard="00003", units=3)         #   [datagen] 30/100 inputs, 34 samples (29 ok, ...
    pace = Progress(max_steps, None, done=step, bar=True, unit="step")  # the trainer: a tqdm bar on rank 0
    pace.update(1, items=samples); pace.rate(), pace.item_rate(), pace.eta()

The count that moves is of UNITS: ok + failed unless `update` says otherwise (the trainer's steps are all "ok"; a
datagen run counts its planned inputs, and its records as ok and failed beside them: a video is one input of a few
frames' records). A piece of work that is redone (a datagen shard whose attempt was lost: `restart`) counts again
from zero, but what it had counted stays counted until the new attempt passes it, so the number done never goes
back. (The ok/failed split follows the attempt that got furthest.)
"""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """TOTAL units of work, DONE of them before this process started. Shown as a line on STREAM (default stderr)
    at most every EVERY seconds (None: no lines; the rate named RATE_UNIT there), and/or as a tqdm bar (BAR) of
    UNIT. `items` is a second count that moves with the units (the trainer's samples per step), shown on the bar
    as a rate of ITEM_UNIT. RECORDS: the ok and failed counts are of something else than the units, shown as
    "N RECORDS (ok, failed)" after them (None: they are the units)."""

    def __init__(
        self,
        total: int,
        every: float | None = 5.0,
        stream=None,
        *,
        done: int = 0,
        bar: bool = False,
        unit: str = "samples",
        rate_unit: str = "img/s",
        item_unit: str = "samples",
        label: str = "datagen",
        records: str | None = None,
    ):
        self.total, self.every, self.stream, self.first = total, every, stream, done
        self.unit, self.rate_unit, self.item_unit, self.label = unit, rate_unit, item_unit, label
        self.records = records
        self.units, self.ok, self.failed, self.items = done, done, 0, 0
        self.t0 = time.monotonic()
        self.last = -math.inf  # the first update shows its line at once
        self.shown = -1
        self._current: dict[str, list[int]] = {}  # shard -> [units, ok, failed] of its current attempt
        self._counted: dict[str, list[int]] = {}  # shard -> [units, ok, failed] counted in the totals
        self.bar = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True)

    @property
    def done(self) -> int:
        return self.units

    def elapsed(self) -> float:
        """Seconds since this process started counting (never 0)."""
        return max(time.monotonic() - self.t0, 1e-9)

    def rate(self) -> float:
        """Units per second since this process started (the units done before it left out)."""
        return (self.done - self.first) / self.elapsed()

    def item_rate(self) -> float:
        """Items per second since this process started."""
        return self.items / self.elapsed()

    def eta(self) -> float:
        """Seconds left to the total at the current rate; inf while nothing has moved."""
        rate = self.rate()
        return max(0, self.total - self.done) / rate if rate > 0 else math.inf

    def update(
        self,
        ok: int,
        failed: int = 0,
        force: bool = False,
        shard: str | None = None,
        items: int = 0,
        units: int | None = None,
    ) -> None:
        """OK and FAILED more, and UNITS more done (None: ok + failed), of SHARD's current attempt when given, and
        ITEMS more; then the line (every EVERY seconds, or now with FORCE) and the bar (the item rate after it)."""
        before = self.done
        self.items += items
        step = [ok + failed if units is None else units, ok, failed]
        if shard is None:
            self.units, self.ok, self.failed = (a + b for a, b in zip((self.units, self.ok, self.failed), step))
        else:
            cur = self._current.setdefault(shard, [0, 0, 0])
            cur[:] = [a + b for a, b in zip(cur, step)]
            counted = self._counted.setdefault(shard, [0, 0, 0])
            if cur[0] >= counted[0]:
                self.units += cur[0] - counted[0]
                self.ok += cur[1] - counted[1]
                self.failed += cur[2] - counted[2]
                counted[:] = cur
        if self.bar is not None:
            if self.items:
                self.bar.set_postfix_str(f"{self.item_rate():.3g} {self.item_unit}/s", refresh=False)
            self.bar.update(self.done - before)
        if self.every is not None:
            self._show(force)

    def restart(self, shard: str) -> None:
        """SHARD is redone from its first unit."""
        self._current[shard] = [0, 0, 0]

    def echo(self, text: str) -> None:
        """A log line: above the bar when one is shown, else on stdout."""
        if self.bar is None:
            print(text, flush=True)
        else:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def _show(self, force: bool) -> None:
        now = time.monotonic()
        if (not force and now - self.last < self.every) or (force and self.done == self.shown):
            return
        self.shown, self.last = self.done, now
        print(self.line(), file=self.stream or sys.stderr, flush=True)

    def line(self) -> str:
        """The progress line: `[datagen] 3/3 inputs, 7 samples (6 ok, 1 failed) 0.5 inputs/s, ETA 00:00:00`, or
        without RECORDS `[datagen] 5/5 samples (5 ok, 0 failed) 2.1 img/s, ETA 00:00:00`."""
        eta = self.eta()
        records = f", {self.ok + self.failed} {self.records}" if self.records else ""
        return (
            f"[{self.label}] {self.done}/{self.total} {self.unit}{records} ({self.ok} ok, {self.failed} failed) "
            f"{self.rate():.3g} {self.rate_unit}, ETA {clock(eta) if eta != math.inf else '?'}"
        )


def clock(seconds: float) -> str:
    """'05:04:03', or '2d 05:04:03' past a day (a large run's ETA)."""
    days, rest = divmod(int(seconds), 86400)
    hms = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {hms}" if days else hms


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m, 3d04h; '?' when not finite."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit}{(s % size) // sub_size:02d}{sub}"
    return f"{s}s"
