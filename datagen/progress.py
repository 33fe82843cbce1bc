"""What a datagen run tells its user: a progress line every few seconds, and a summary at the end."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

SHOWN_INCOMPLETE = 20  # incomplete shards listed one per line at the end of a run; the rest are counted


@dataclass
class RunSummary:
    shards: int
    samples: int
    ok: int
    failed: int
    seconds: float
    skipped_shards: int
    incomplete: list[str]
    why: dict[str, str] = field(default_factory=dict)  # incomplete shard -> the error of its last attempt
    skipped_files: dict[str, int] = field(default_factory=dict)  # files a folder input does not take, by kind

    def line(self) -> str:
        rate = (self.ok + self.failed) / self.seconds if self.seconds else 0.0
        skipped = f"; skipped (no image files): {describe_skipped(self.skipped_files)}" if self.skipped_files else ""
        return (f"datagen: {self.ok} records, {self.failed} failures in {self.shards} shard(s) "
                f"({self.skipped_shards} already complete), {self.seconds:.1f} s, {rate:.3g} images/s{skipped}")

    def incomplete_lines(self) -> list[str]:
        """One line per incomplete shard and why (the first SHOWN_INCOMPLETE), then how to go on."""
        lines = [f"  shard {s}: {self.why.get(s, 'not finished')}" for s in self.incomplete[:SHOWN_INCOMPLETE]]
        if len(self.incomplete) > SHOWN_INCOMPLETE:
            lines.append(f"  ... and {len(self.incomplete) - SHOWN_INCOMPLETE} more (each named in a "
                         "'giving up' line above)")
        return lines


def describe_skipped(skipped: dict[str, int]) -> str:
    """{".txt": 3, "hidden": 1} -> "3 .txt, 1 hidden" (most first): the files an input folder had that are
    no images (datagen.sources.skip_kind)."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


class Progress:
    """Samples done / failed / rate / ETA on stderr, at most every `every` seconds.

    Counts come per shard attempt (`update(..., shard=)`); a shard that is redone (`restart`) counts again
    from zero, but what it had counted stays counted until the new attempt passes it, so the number of
    samples done never goes back. (The ok/failed split follows the attempt that got furthest.)"""

    def __init__(self, total: int, every: float = 5.0, stream=None):
        self.total, self.every, self.stream = total, every, stream
        self.ok = self.failed = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = -1
        self._current: dict[str, list[int]] = {}  # shard -> [ok, failed] of its current attempt
        self._counted: dict[str, list[int]] = {}  # shard -> [ok, failed] counted in the totals

    def update(self, ok: int, failed: int, force: bool = False, shard: str | None = None) -> None:
        """OK records and FAILED failures more (of SHARD's current attempt, when given); then the line."""
        if shard is None:
            self.ok += ok
            self.failed += failed
        else:
            cur = self._current.setdefault(shard, [0, 0])
            cur[0] += ok
            cur[1] += failed
            counted = self._counted.setdefault(shard, [0, 0])
            if sum(cur) >= sum(counted):
                self.ok += cur[0] - counted[0]
                self.failed += cur[1] - counted[1]
                counted[:] = cur
        self._show(force)

    def restart(self, shard: str) -> None:
        """SHARD is redone from its first sample."""
        self._current[shard] = [0, 0]

    def _show(self, force: bool) -> None:
        now = time.monotonic()
        done = self.ok + self.failed
        if (not force and now - self.last < self.every) or (force and done == self.shown):
            return
        self.shown = done
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = _duration(eta) if eta != float("inf") else "?"
        print(f"[datagen] {done}/{self.total} samples ({self.ok} ok, {self.failed} failed) "
              f"{rate:.3g} img/s, ETA {eta_s}", file=self.stream or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    """'05:04:03', or '2d 05:04:03' past a day (a large run's ETA)."""
    days, rest = divmod(int(seconds), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock
