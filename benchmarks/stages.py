"""Images per second of each datagen stage, batched against one image at a time, in the same run.

    python benchmarks/stages.py --size tiny                 # tiny preset models (datagen/tiny.py)
    python benchmarks/stages.py --size full --images 2      # real architectures, random weights:
                                                            # BLIP-large, GroundingDINO SwinT-OGC + BERT-base, SAM ViT-H
    python benchmarks/stages.py --size full --images 16 --device cuda --dtype bfloat16   # on a GPU

At full size the models are `datagen.config.full_random()`'s: built once into the cache (about 5.5 GB),
then loaded by the stages from the official checkpoint formats, the way real checkpoints load.

Each stage gets fixed inputs (scikit-image photos; fixed captions, nouns and boxes), so a stage's speed
does not depend on what a random upstream model wrote. "batched" is one call with every image
(batch_size = --images); "single" is one call per image. Each is timed after one warm-up call.
GroundingDINO runs with resize="square" so all images share one forward (keep_ratio groups by shape).
Appends a markdown table to --out (default benchmarks/results/stages.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subjectdiff.datagen import config
from subjectdiff.datagen.stages.common import decode_item

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "coins", "immunohistochemistry")
CAPTIONS = {
    "astronaut": "an astronaut in a white suit holding a helmet near a flag",
    "chelsea": "a cat lying on a rug",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "rocket": "a rocket on a launchpad under the sky",
}
BOXES = [[0.1, 0.05, 0.9, 1.0], [0.55, 0.6, 0.95, 0.98], [0.0, 0.0, 0.35, 0.45]]


def photo_item(i: int, **fields) -> dict:
    """The i-th of PHOTOS (cycling) as the decode task makes it: encoded as JPEG, then decoded into an item
    (key from `skimage/NAME/i.jpg`; FIELDS such as alt_text go to decode_item)."""
    import io

    from PIL import Image
    from skimage import data

    name = PHOTOS[i % len(PHOTOS)]
    img = getattr(data, name)()
    img = img if img.ndim == 3 else np.stack([img] * 3, -1)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG")
    return decode_item(f"skimage/{name}/{i}.jpg", buf.getvalue(), **fields)


def items_for(n: int) -> list[dict]:
    out = []
    for i in range(n):
        it = photo_item(i)
        caps = list(CAPTIONS.values())
        it["caption"] = caps[i % len(caps)]
        out.append(it)
    return out


def time_stage(stage, make_inputs, n: int, batch_attr_owner, repeats: int) -> tuple[float, float]:
    """(images/s batched, images/s one at a time), after one warm-up call on one image.

    The two modes alternate `repeats` times and each keeps its best time: the CPU here is shared, and
    the best of several runs is the least disturbed one.
    """
    stage(make_inputs()[:1])
    best_b = best_s = float("inf")
    for _ in range(repeats):
        batch_attr_owner.batch_size = n
        items = make_inputs()
        t = time.perf_counter()
        stage(items)
        best_b = min(best_b, time.perf_counter() - t)
        batch_attr_owner.batch_size = 1
        items = make_inputs()
        t = time.perf_counter()
        for it in items:
            stage([it])
        best_s = min(best_s, time.perf_counter() - t)
    return n / best_b, n / best_s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="alternating timed runs per mode; the best counts")
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default=None,
        help="dtype of all three model stages (default: the preset's: caption auto, others float32); "
        "ground and segment autocast on CUDA only, and the table says what each ran in",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stages.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from subjectdiff.datagen.stages.caption import Captioner
    from subjectdiff.datagen.stages.ground import Grounder
    from subjectdiff.datagen.stages.nouns import NounExtractor
    from subjectdiff.datagen.stages.segment import Segmenter

    n = args.images
    t0 = time.perf_counter()
    # full: the real architectures with random weights, saved in the official formats and loaded by the
    # stages as real checkpoints are (datagen.tiny.full_random_models; built into the cache once)
    cfg = config.tiny() if args.size == "tiny" else config.full_random()
    cfg.ground = replace(cfg.ground, resize="square")
    for c in (cfg.caption, cfg.ground, cfg.segment):
        c.device = args.device
        c.dtype = args.dtype or c.dtype
    cap, gd, seg = Captioner(cfg.caption), Grounder(cfg.ground), Segmenter(cfg.segment)
    # fixed-length captions so batched and single generate the same number of tokens
    cap.cfg.min_new_tokens = cap.cfg.max_new_tokens = 20
    nouns = NounExtractor(cfg.nouns)
    build_s = time.perf_counter() - t0

    base = items_for(n)
    noun_items = nouns([dict(it) for it in base])

    def with_nouns():
        return [dict(it) for it in noun_items]

    def with_boxes():
        out = with_nouns()
        for it in out:
            it["detections"] = [{"box": b, "score": 0.9, "noun": 0} for b in BOXES]
        return out

    rows = []
    for name, stage, make, owner in [
        ("caption", cap, lambda: [dict(it) for it in base], cap.cfg),
        ("nouns", nouns, lambda: [dict(it) for it in base], argparse.Namespace()),
        ("ground", gd, with_nouns, gd.cfg),
        ("segment", seg, with_boxes, seg.cfg),
    ]:
        b, s = time_stage(stage, make, n, owner, args.repeats)
        rows.append((name, b, s))
        print(f"{name:8s} batched {b:8.3g} img/s   single {s:8.3g} img/s   x{b / s:.2f}", flush=True)

    device = gd.device
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    # what each stage runs in, not what was asked: ground and segment autocast on CUDA only (fp32 on CPU)
    dtype = {k: str(v.dtype).replace("torch.", "") for k, v in (("caption", cap), ("ground", gd), ("segment", seg))}
    lines = [
        f"\n## datagen stages, size={args.size}, {n} images, {dev_name}\n",
        f"- command: `python benchmarks/stages.py --size {args.size} --images {n} --device {args.device} "
        f"--repeats {args.repeats}{f' --dtype {args.dtype}' if args.dtype else ''}` "
        f"(best of {args.repeats} alternating runs per mode)",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (the CPU is shared); "
        f"torch threads {torch.get_num_threads()}; model build {build_s:.0f} s",
        f"- dtypes run in: {dtype}; captions fixed at 20 new tokens, num_beams={cap.cfg.num_beams}; "
        f"GroundingDINO {gd.cfg.short_side}px square; SAM {len(BOXES)} boxes/image",
        "",
        "| stage | batched img/s | one-at-a-time img/s | batched s/img | speed-up |",
        "|---|---|---|---|---|",
    ] + [f"| {name} | {b:.3g} | {s:.3g} | {1 / b:.3g} | {b / s:.2f}x |" for name, b, s in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
