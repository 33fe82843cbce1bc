"""Video input benchmark: what datagen's decode task does with one video (datagen/video.py), in frames per second of
video per CPU core.

    python benchmarks/video_decode.py [--seconds 20] [--fps 24] [--size 640x360] [--shots 10]

A clip is made from scikit-image's photos (subjectdiff.photo_records.write_photo_video: one shot per photo, hard
cuts, a pan and zoom in each shot), then, pinned to one core:

    decode all (baseline)   every frame decoded at full size to RGB, as a reader without seeking would
    scan                    pass 1: every frame decoded, downscaled to 256 wide, through the content detector
    grab                    pass 2: only the sampled frames, by seeking
    video_items             the whole decode task: scan, sampling, grab, and each frame stored as JPEG and decoded

Rates are frames of video per second (the whole clip's frames / the time), so they compare directly. Appends a
Markdown table to --out (default benchmarks/results/video_decode.md) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from subjectdiff.datagen.config import VideoConfig
from subjectdiff.datagen.video import grab, open_video, sample_frames, scan, video_items
from subjectdiff.photo_records import PHOTOS, write_photo_video


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def decode_all(path: str) -> int:
    container, stream = open_video(path)
    with container:
        return sum(1 for f in container.decode(stream) if f.to_ndarray(format="rgb24") is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs of each")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "video_decode.md"))
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core: FFmpeg's threads share it
    names = [list(PHOTOS)[i % len(PHOTOS)] for i in range(args.shots)]
    per_shot = round(args.seconds * args.fps / args.shots)
    cfg = VideoConfig()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        made = write_photo_video(path, names, frames_per_shot=per_shot, fps=args.fps, size=(w, h))
        n = made[-1][1]
        picks = sample_frames(made, args.fps, cfg.frames_per_shot, cfg.min_gap_s, cfg.max_frames)

        def do_scan():
            c, s = open_video(path)
            with c:
                return scan(c, s, cfg.shot_threshold, cfg.min_shot_s)

        def do_grab():
            c, s = open_video(path)
            with c:
                found = scan(c, s, cfg.shot_threshold, cfg.min_shot_s)
                t0 = time.perf_counter()
                got = list(grab(c, s, found, [f for _, f in picks]))
                return time.perf_counter() - t0, got

        rows = []
        for name, fn in (
            ("decode all (baseline)", lambda: decode_all(path)),
            ("scan", do_scan),
            ("video_items", lambda: video_items(path, "k", path, cfg=cfg)),
        ):
            best = min(timed(fn)[0] for _ in range(args.repeat))
            rows.append((name, best, n / best))
        grab_s = min(do_grab()[0] for _ in range(args.repeat))
        rows.insert(2, (f"grab ({len(picks)} frames)", grab_s, n / grab_s))
        found = do_scan()
    assert found.shots == made, (found.shots, made)
    lines = [
        f"\n## {time.strftime('%Y-%m-%d')} {platform.node()} ({platform.processor() or platform.machine()}), one core, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        f"\nclip: {n} frames, {w}x{h}, {args.fps} fps, H.264, {args.shots} shots (all found); "
        f"{len(picks)} frames sampled (video defaults: {cfg.frames_per_shot} per shot, {cfg.min_gap_s} s apart)\n",
        "| step | seconds | video frames / s / core |",
        "|---|---|---|",
        *[f"| {name} | {s:.3f} | {rate:.0f} |" for name, s, rate in rows],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
