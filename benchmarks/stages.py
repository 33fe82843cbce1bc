"""Images per second of each datagen stage, batched against one image at a time, in the same run.

    python benchmarks/stages.py --size tiny                 # tiny preset models (datagen/tiny.py)
    python benchmarks/stages.py --size full --images 2      # real architectures, random weights:
                                                            # BLIP-large, GroundingDINO SwinT-OGC + BERT-base, SAM ViT-H
    python benchmarks/stages.py --size full --images 16 --device cuda --dtype bfloat16   # on a GPU
    python benchmarks/stages.py --size full --images 64 --device cuda --stages identity  # DINOv2-base alone

At full size the models are `datagen.config.full_random()`'s: built once into the cache (about 5.5 GB),
then loaded by the stages from the official checkpoint formats, the way real checkpoints load.

Each stage gets fixed inputs (scikit-image photos; fixed captions, nouns and boxes), so a stage's speed
does not depend on what a random upstream model wrote. "batched" is one call with every image
(batch_size = --images); "single" is one call per image. Each is timed after one warm-up call.
GroundingDINO runs with resize="square" so all images share one forward (keep_ratio groups by shape).
The identity stage embeds the masked crops of three objects per image (ellipses in BOXES); at full size it is
dinov2-base's architecture at random weights, built in memory (no file), in float16 on a GPU as the stage runs.
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

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.datagen import config
from subjectdiff.datagen.stages.common import decode_item
from subjectdiff.photo_records import ellipse_mask

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


STAGES = ("caption", "nouns", "ground", "segment", "identity")


def build(args, wanted: list[str]) -> dict:
    """The stages to time, by name, on args.device in args.dtype (the preset's without one).

    full: the real architectures with random weights, saved in the official formats and loaded by the stages
    as real checkpoints are (datagen.tiny.full_random_models; built into the cache once, about 5.5 GB), except
    identity's dinov2-base, built in memory (so `--stages identity` writes nothing)."""
    from subjectdiff.datagen.stages.caption import Captioner
    from subjectdiff.datagen.stages.ground import Grounder
    from subjectdiff.datagen.stages.identity import Identifier
    from subjectdiff.datagen.stages.nouns import NounExtractor
    from subjectdiff.datagen.stages.segment import Segmenter

    files = {"caption", "ground", "segment"} & set(wanted)
    cfg = config.tiny() if args.size == "tiny" else config.full_random() if files else config.default()
    cfg.ground = replace(cfg.ground, resize="square")
    for c in (cfg.caption, cfg.ground, cfg.segment, cfg.identity):
        c.device = args.device
        c.dtype = args.dtype or c.dtype
    make = {
        "caption": lambda: Captioner(cfg.caption),
        "nouns": lambda: NounExtractor(cfg.nouns),
        "ground": lambda: Grounder(cfg.ground),
        "segment": lambda: Segmenter(cfg.segment),
        "identity": lambda: (
            Identifier(cfg.identity) if args.size == "tiny" else Identifier(cfg.identity, *dinov2_base())
        ),
    }
    built = {name: make[name]() for name in wanted}
    if "caption" in built:  # fixed-length captions so batched and single generate the same number of tokens
        built["caption"].cfg.min_new_tokens = built["caption"].cfg.max_new_tokens = 20
    return built


def dinov2_base():
    """(model, processor): facebook/dinov2-base's architecture at seeded random weights and its preprocessing."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from subjectdiff.datagen.tiny import DINOV2_BASE, IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    side = {"height": 224, "width": 224}
    return Dinov2Model(Dinov2Config(**DINOV2_BASE)), BitImageProcessor(
        crop_size=side, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )


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
    ap.add_argument("--stages", default=",".join(STAGES), help=f"which of {','.join(STAGES)} to time")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    asked = set(args.stages.split(",")) | ({"nouns"} if "ground" in args.stages.split(",") else set())
    wanted = [s for s in STAGES if s in asked]  # ground's input is the nouns stage's output
    n = args.images
    t0 = time.perf_counter()
    built = build(args, wanted)
    build_s = time.perf_counter() - t0

    base = items_for(n)
    nouns = built.get("nouns")
    noun_items = nouns([dict(it) for it in base]) if nouns else [dict(it, nouns=[]) for it in base]

    def with_nouns():
        return [dict(it) for it in noun_items]

    def with_boxes():
        out = with_nouns()
        for it in out:
            it["detections"] = [{"box": b, "score": 0.9, "noun": 0} for b in BOXES]
        return out

    def with_masks():
        out = with_boxes()
        for it in out:
            h, w = it["image"].shape[:2]
            it["masks"] = [mask_codec.encode(ellipse_mask(h, w, b)) for b in BOXES]
        return out

    inputs = {
        "caption": lambda: [dict(it) for it in base],
        "nouns": lambda: [dict(it) for it in base],
        "ground": with_nouns,
        "segment": with_boxes,
        "identity": with_masks,
    }
    rows = []
    for name in wanted:
        stage = built[name]
        owner = getattr(stage, "cfg", argparse.Namespace())
        b, s = time_stage(stage, inputs[name], n, owner, args.repeats)
        rows.append((name, b, s))
        print(f"{name:8s} batched {b:8.3g} img/s   single {s:8.3g} img/s   x{b / s:.2f}", flush=True)

    device = next((st.device for st in built.values() if hasattr(st, "device")), None)
    dev_name = (
        torch.cuda.get_device_name(device)
        if device is not None and device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    # what each stage runs in, not what was asked: ground and segment autocast on CUDA only (fp32 on CPU)
    dtype = {k: str(v.dtype).replace("torch.", "") for k, v in built.items() if hasattr(v, "dtype")}
    cap, gd = built.get("caption"), built.get("ground")
    lines = [
        f"\n## datagen stages, size={args.size}, {n} images, {dev_name}\n",
        f"- command: `python benchmarks/stages.py --size {args.size} --images {n} --device {args.device} "
        f"--repeats {args.repeats}{f' --dtype {args.dtype}' if args.dtype else ''} --stages {','.join(wanted)}` "
        f"(best of {args.repeats} alternating runs per mode)",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (the CPU is shared); "
        f"torch threads {torch.get_num_threads()}; model build {build_s:.0f} s",
        f"- dtypes run in: {dtype}; captions fixed at 20 new tokens, num_beams={cap.cfg.num_beams if cap else '-'}; "
        f"GroundingDINO {gd.cfg.short_side if gd else '-'}px square; SAM and identity {len(BOXES)} objects/image",
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
