"""What a datagen run tells its user: what it is doing while it starts (`notice`), and at the end its summary.
(The progress line every few seconds is subjectdiff.progress.Progress, the trainer's too.)"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

SHOWN_INCOMPLETE = 20  # incomplete shards listed one per line at the end of a run; the rest are counted


def notice(text: str) -> None:
    """One `[datagen] ...` line on stderr, now: what the run does (start-up steps, clean-ups, retries)."""
    print(f"[datagen] {text}", file=sys.stderr, flush=True)


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
        return (
            f"datagen: {self.ok} records, {self.failed} failures in {self.shards} shard(s) "
            f"({self.skipped_shards} already complete), {self.seconds:.1f} s, {rate:.3g} images/s{skipped}"
        )

    def incomplete_lines(self) -> list[str]:
        """One line per incomplete shard and why (the first SHOWN_INCOMPLETE), then how to go on."""
        lines = [f"  shard {s}: {self.why.get(s, 'not finished')}" for s in self.incomplete[:SHOWN_INCOMPLETE]]
        if len(self.incomplete) > SHOWN_INCOMPLETE:
            lines.append(
                f"  ... and {len(self.incomplete) - SHOWN_INCOMPLETE} more (each named in a 'giving up' line above)"
            )
        return lines


def describe_skipped(skipped: dict[str, int]) -> str:
    """{".txt": 3, "hidden": 1} -> "3 .txt, 1 hidden" (most first): the files an input folder had that are
    no images (datagen.sources.skip_kind)."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
