"""Images per second of each datagen stage, batched against one image at a time, in the same run.

    python benchmarks/stages.py --size tiny                 # tiny preset models (datagen/tiny.py)
    python benchmarks/stages.py --size full --images 2      # real architectures, random weights:
                                                            # BLIP-large, GroundingDINO SwinT-OGC + BERT-base, SAM ViT-H
    python benchmarks/stages.py --size full --images 16 --device cuda --dtype bfloat16   # on a GPU
    python benchmarks/stages.py --stages curate,identity    # any registered model stages (--stages, by name)
    python benchmarks/stages.py --sam-levers --size full --images 16 --device cuda    # SAM's speed levers

At full size the models are `datagen.config.full_random()`'s: built once into the cache (about 5.5 GB),
then loaded by the stages from the official checkpoint formats, the way real checkpoints load.

Each stage gets fixed inputs (scikit-image photos; fixed captions, nouns and boxes), so a stage's speed
does not depend on what a random upstream model wrote. "batched" is one call with every image
(batch_size = --images); "single" is one call per image. Each is timed after one warm-up call.
GroundingDINO runs with resize="square" so all images share one forward (keep_ratio groups by shape).
Each stage is built from its registry entry, timed and freed before the next, so on a GPU each mode's peak memory
is its own stage's; a stage the registry lacks (identity, until it is registered) is a "not measured" row.

--sam-levers: the segment stage's SAM with segment-anything-fast's levers turned on one after another (LEVERS:
bf16 autocast, SDPA attention, torch.compile of the image encoder, every box of an image in one decoder call),
images/s of each against the row before, and the masks' mean IoU against the first (fp32) row's.
Appends a markdown table to --out (default benchmarks/results/stages.md); --json writes the rows as JSON.
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
# The nouns of CAPTIONS, for a machine without spaCy (the GPU machines carry wheels, and spaCy's do not fit).
CAPTION_NOUNS = {
    "astronaut": ("astronaut", "suit", "helmet", "flag"),
    "chelsea": ("cat", "rug"),
    "coffee": ("cup", "coffee", "saucer", "spoon"),
    "rocket": ("rocket", "launchpad", "sky"),
}


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
    item = decode_item(f"skimage/{name}/{i}.jpg", buf.getvalue(), **fields)
    if "image" not in item:  # a failed decode would make every stage skip the item (and look infinitely fast)
        raise RuntimeError(f"the benchmark photo {name} did not decode: {item.get('failure')}")
    return item


def items_for(n: int) -> list[dict]:
    out = []
    for i in range(n):
        it = photo_item(i)
        caps = list(CAPTIONS.values())
        it["caption"] = caps[i % len(caps)]
        out.append(it)
    return out


def noun_items(cfg, base: list[dict]) -> list[dict]:
    """BASE with `nouns`, from the nouns stage; where spaCy (or its English pipeline) is not installed, from
    CAPTION_NOUNS (the same entry format: label, phrase, span, CLIP tokens), so the model stages still run."""
    from subjectdiff.datagen.stages.nouns import NounExtractor

    try:
        return NounExtractor(cfg.nouns)([dict(it) for it in base])
    except (ImportError, OSError) as e:
        print(f"nouns from CAPTION_NOUNS (no spaCy here: {type(e).__name__})", flush=True)
    from subjectdiff.catalogs.tokens import clip_token_positions

    words = {CAPTIONS[k]: v for k, v in CAPTION_NOUNS.items()}
    out = []
    for it in base:
        caption, nouns = it["caption"], []
        for w in words[caption]:
            start = caption.index(w)
            span = [start, start + len(w)]
            nouns.append({"label": w, "phrase": w, "span": span, "tokens": clip_token_positions(caption, span)})
        out.append({**it, "nouns": nouns})
    return out


def time_stage(stage, make_inputs, n: int, batch_attr_owner, repeats: int) -> dict:
    """images/s batched ("batched") and one at a time ("single"), after one warm-up call on one image; on CUDA
    also each mode's peak GPU memory in GiB ("peak_gib_batched", "peak_gib_single": every model resident then).

    The two modes alternate `repeats` times and each keeps its best time: the CPU here is shared, and
    the best of several runs is the least disturbed one.
    """
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    stage(make_inputs()[:1])
    best = {"batched": float("inf"), "single": float("inf")}
    peak = {"batched": 0.0, "single": 0.0}
    for _ in range(repeats):
        for mode, size in (("batched", n), ("single", 1)):
            batch_attr_owner.batch_size = size
            items = make_inputs()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for chunk in [items] if size == n else [[it] for it in items]:
                stage(chunk)
            if cuda:
                torch.cuda.synchronize()
                peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated() / 2**30)
            best[mode] = min(best[mode], time.perf_counter() - t)
    out = {"batched": n / best["batched"], "single": n / best["single"]}
    if cuda:
        out.update(peak_gib_batched=peak["batched"], peak_gib_single=peak["single"])
    return out


# The input each stage reads (its registry entry's `needs`) -> which fixed inputs it gets.
INPUTS_FOR_NEED = {"image": "base", "caption": "base", "nouns": "with_nouns", "detections": "with_boxes"}


def fixed_inputs(base: list[dict], noun_items: list[dict]) -> dict:
    """{name: () -> fresh items}: the photos with captions ("base"), + nouns, + 3 boxes, + their box masks."""
    from subjectdiff.catalogs import masks as mask_codec

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
            it["masks"] = []
            for x0, y0, x1, y1 in BOXES:
                m = np.zeros((h, w), bool)
                m[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)] = True
                it["masks"].append(mask_codec.encode(m))
            it["mask_scores"] = [0.9] * len(BOXES)
        return out

    return {
        "base": lambda: [dict(it) for it in base],
        "with_nouns": with_nouns,
        "with_boxes": with_boxes,
        "with_masks": with_masks,
    }


def set_run_options(settings, device: str, dtype: str | None) -> None:
    """--device and --dtype onto a stage's settings (those that have such fields)."""
    if hasattr(settings, "device"):
        settings.device = device
    if dtype and hasattr(settings, "dtype"):
        settings.dtype = dtype


def measure_stage(name: str, cfg, inputs: dict, args) -> dict:
    """One stage built from its registry entry (alone on the device, so its peak memory is its own), timed by
    time_stage, freed. A stage the registry lacks, or that fails to build, is a row with `skipped` (the reason):
    the identity stage is picked up here as soon as it is registered."""
    import gc

    from subjectdiff.datagen.stages import registry

    if name not in registry.names():
        return {"stage": name, "skipped": f"no {name} stage in the datagen registry"}
    entry = registry.get(name)
    settings = entry.settings(cfg)
    set_run_options(settings, args.device, args.dtype)
    if name == "caption":  # fixed-length captions so batched and single generate the same number of tokens
        settings.min_new_tokens = settings.max_new_tokens = 20
    t0 = time.perf_counter()
    try:
        stage = entry.build(cfg)
    except Exception as e:  # a stage that cannot build here (a missing package, a file) is a row, not fatal
        return {"stage": name, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    build_s = time.perf_counter() - t0
    owner = argparse.Namespace() if name == "nouns" else getattr(stage, "cfg", settings)
    make = inputs[INPUTS_FOR_NEED.get(entry.needs, "with_masks")]
    row = {"stage": name, **time_stage(stage, make, args.images, owner, args.repeats), "build_s": build_s}
    row["dtype"] = str(getattr(stage, "dtype", "-")).replace("torch.", "")
    del stage
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def write_json(args, payload: dict) -> None:
    """PAYLOAD to --json (when given), replaced whole: also after each row, so that a run stopped part-way (by
    benchmarks/gpu.py's time limit) leaves the rows it measured."""
    import json

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.json)


def write_outputs(args, lines: list[str], payload: dict) -> None:
    """Append LINES (Markdown) to --out and print them; PAYLOAD as JSON to --json when given."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    write_json(args, payload)


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
        help="dtype of the model stages (default: the preset's: caption auto, others float32); "
        "ground and segment autocast on CUDA only, and the table says what each ran in",
    )
    ap.add_argument(
        "--stages",
        default="caption,nouns,ground,segment",
        help="registered stages to time, in order (curate, identity, ...: any model stage of the registry; "
        "one the registry lacks is reported as skipped)",
    )
    ap.add_argument(
        "--sam-levers",
        action="store_true",
        help="instead: SAM's speed levers (bf16, SDPA, torch.compile, batched prompts), each turned on in turn, "
        "with the masks' IoU against fp32 (sam_levers)",
    )
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --sam-levers")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stages.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.sam_levers:
        return sam_levers(args)
    n = args.images
    t0 = time.perf_counter()
    # full: the real architectures with random weights, saved in the official formats and loaded by the
    # stages as real checkpoints are (datagen.tiny.full_random_models; built into the cache once)
    cfg = config.tiny() if args.size == "tiny" else config.full_random()
    cfg.ground = replace(cfg.ground, resize="square")
    cache_s = time.perf_counter() - t0
    base = items_for(n)
    inputs = fixed_inputs(base, noun_items(cfg, base))
    rows = []
    for name in [s.strip() for s in args.stages.split(",") if s.strip()]:
        row = measure_stage(name, cfg, inputs, args)
        rows.append(row)
        write_json(args, {"size": args.size, "images": n, "rows": rows, "partial": True})
        if "skipped" in row:
            print(f"{name:8s} skipped: {row['skipped']}", flush=True)
        else:
            b, s = row["batched"], row["single"]
            print(f"{name:8s} batched {b:8.3g} img/s   single {s:8.3g} img/s   x{b / s:.2f}", flush=True)

    cuda = torch.cuda.is_available()
    gd = cfg.ground
    lines = [
        f"\n## datagen stages, size={args.size}, {n} images, {device_name()}\n",
        f"- command: `python benchmarks/stages.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"(best of {args.repeats} alternating runs per mode)",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (the CPU is shared); "
        f"torch threads {torch.get_num_threads()}; model files ready in {cache_s:.0f} s; each stage built, "
        "timed and freed in turn",
        f"- dtypes run in: { {r['stage']: r['dtype'] for r in rows if 'dtype' in r} }; captions fixed at 20 new "
        f"tokens, num_beams={cfg.caption.num_beams}; GroundingDINO {gd.short_side}px square; "
        f"SAM {len(BOXES)} boxes/image",
        "",
        "| stage | batched img/s | one-at-a-time img/s | batched s/img | speed-up |"
        + (" peak GPU GiB batched | peak GPU GiB one at a time |" if cuda else ""),
        "|---|---|---|---|---|" + ("---|---|" if cuda else ""),
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['stage']} | not measured: {r['skipped']} | | | |" + (" | |" if cuda else ""))
            continue
        b, s = r["batched"], r["single"]
        peaks = f" {r['peak_gib_batched']:.2f} | {r['peak_gib_single']:.2f} |" if cuda else ""
        lines.append(f"| {r['stage']} | {b:.3g} | {s:.3g} | {1 / b:.3g} | {b / s:.2f}x |{peaks}")
    payload = {"size": args.size, "images": n, "device": device_name(), "torch": torch.__version__, "rows": rows}
    write_outputs(args, lines, payload)


# ----------------------------------------------------------------------------------------------- SAM levers

# segment-anything-fast's levers (pytorch-labs, "Accelerating Generative AI" part 1), turned on one after another;
# each row's "off" is the row before it. SDPA comes before compile so that one compile covers both. The attention
# and compile levers are the segment stage's own settings (segment.attention, segment.compile; sam_attention.py).
LEVERS = [
    ("fp32, eager attention, no compile, one box per decoder call", {}),
    ("+ bf16 autocast", {"bf16": True}),
    ("+ SDPA attention (maskless, rel-pos bias folded into q and k: flash-eligible)", {"sdpa": True}),
    ("+ torch.compile of the image encoder", {"compile": True}),
    ("+ batched prompts (every box of an image in one decoder call)", {"batched": True}),
]


def mask_iou(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean IoU of corresponding masks: lists of (N, H, W) bool per image; two empty masks agree (1.0)."""
    ious = []
    for x, y in zip(a, b):
        inter = (x & y).reshape(len(x), -1).sum(1)
        union = (x | y).reshape(len(x), -1).sum(1)
        ious += np.where(union == 0, 1.0, inter / np.maximum(union, 1)).tolist()
    return float(np.mean(ious))


def sam_levers(args) -> None:
    """Images/s of the segment stage's SAM (encode + decode of 3 boxes per image) with each lever of LEVERS
    turned on in turn, the masks' mean IoU against the first (fp32) row's, and peak GPU memory."""
    from subjectdiff.datagen.stages.sam_attention import set_attention
    from subjectdiff.datagen.stages.segment import Segmenter

    cfg = (config.tiny() if args.size == "tiny" else config.full_random()).segment
    # at most 8 images per encoder forward: ViT-H's fp32 global attention holds (8 x 16 heads, 4096, 4096) maps
    cfg = replace(cfg, device=args.device, dtype="float32", batch_size=min(args.images, 8), attention="eager")
    seg = Segmenter(cfg)  # weights in fp32; the bf16 lever is the stage's own autocast
    encoder = seg.encoder
    images = [it["image"] for it in items_for(args.images)]
    boxes = np.asarray(BOXES, dtype=np.float64)
    cuda = seg.device.type == "cuda"

    def run(batched: bool) -> list[np.ndarray]:
        out = []
        for feat, in_size, orig in seg.encode(images):
            if batched:
                out.append(seg.decode(feat, in_size, orig, boxes)[0])
            else:
                out.append(np.concatenate([seg.decode(feat, in_size, orig, boxes[j : j + 1])[0] for j in range(3)]))
        return out

    on: dict = {}
    compiled = None
    rows, reference = [], None
    for name, lever in LEVERS:
        on.update(lever)
        seg.dtype = torch.bfloat16 if on.get("bf16") else torch.float32
        set_attention(encoder, "sdpa" if on.get("sdpa") else "eager")
        if on.get("compile") and compiled is None:
            # what segment.compile does (Segmenter), with the backend a choice here
            compiled = torch.compile(encoder, backend=args.compile_backend)
        seg.encoder = compiled if on.get("compile") else encoder
        t0 = time.perf_counter()
        masks = run(on.get("batched", False))  # warm-up (and the compile)
        warm_s = time.perf_counter() - t0
        reference = reference or masks
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            masks = run(on.get("batched", False))
            best = min(best, time.perf_counter() - t0)
        rows.append(
            {
                "lever": name,
                "img_s": args.images / best,
                "miou_vs_fp32": mask_iou(masks, reference),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "warmup_s": warm_s,
            }
        )
        print(f"{name}: {rows[-1]['img_s']:.3g} img/s, mIoU {rows[-1]['miou_vs_fp32']:.4f}", flush=True)
        write_json(args, {"size": args.size, "images": args.images, "rows": rows, "partial": True})
    lines = [
        f"\n## SAM speed levers, size={args.size}, {args.images} images x {len(BOXES)} boxes, {device_name()}\n",
        f"- command: `python benchmarks/stages.py {' '.join(sys.argv[1:])}`; best of {args.repeats} after a warm-up "
        f"(which includes the compile, backend {args.compile_backend}); encoder batch {cfg.batch_size}",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        "",
        "| levers on | img/s | vs the row before (lever off) | vs fp32 | masks' mean IoU vs fp32 | peak GPU GiB |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        prev = rows[max(i - 1, 0)]["img_s"]
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {r['lever']} | {r['img_s']:.3g} | {r['img_s'] / prev:.2f}x | {r['img_s'] / rows[0]['img_s']:.2f}x "
            f"| {r['miou_vs_fp32']:.4f} | {peak} |"
        )
    payload = {"size": args.size, "images": args.images, "boxes": len(BOXES), "device": device_name(), "rows": rows}
    write_outputs(args, lines, payload)


if __name__ == "__main__":
    main()
