"""Generated images on disk: per image a PNG and a JSON with everything needed to reproduce it (prompt, subjects,
boxes, seed, sampling settings, model id), the subjects' cut-outs once per call, and optionally an overlay of the
layout boxes for inspection.

    out/0000-s42.png  out/0000-s42.json  [out/0000-s42-boxes.png]  out/subject-0.png ...
Boxes in the JSON are xyxy normalized to [0, 1] in the generated image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from subjectdiff.catalogs.boxes import xyxy_norm_to_xyxy_pixels
from subjectdiff.infer.pipeline import Generated

COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]


def overlay(g: Generated) -> Image.Image:
    """The image with each subject's layout box drawn and labelled."""
    im = g.image.convert("RGB").copy()
    draw = ImageDraw.Draw(im)
    w, h = im.size
    for j, s in enumerate(g.subjects):
        x0, y0, x1, y1 = xyxy_norm_to_xyxy_pixels(s["box"], w, h)[0].tolist()
        color = COLORS[j % len(COLORS)]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=max(1, w // 256))
        draw.text((x0 + 2, y0 + 1), s["label"], fill=color)
    return im


def record(g: Generated, stem: str, cutout_files: list[str] | None = None) -> dict:
    """The JSON sidecar of one image."""
    return {
        "image": f"{stem}.png", "prompt": g.prompt, "full_prompt": g.full_prompt,
        "subjects": [{**s, **({"cutout": cutout_files[j]} if cutout_files else {})} for j, s in enumerate(g.subjects)],
        "boxes": g.boxes, "seed": g.seed, "steps": g.sampling["steps"], "guidance": g.sampling["guidance"],
        "subject_guidance": g.sampling["subject_guidance"], "scheduler": g.sampling["scheduler"],
        "sampling": g.sampling, "model": g.model,
    }


def save(generated: list[Generated], out_dir: str | os.PathLike, boxes: bool = False, start: int = 0,
         prefix: str = "") -> list[Path]:
    """Write PNG + JSON per image (and the boxes overlay when `boxes`); returns the PNG paths. Images are
    numbered from `start`; the cut-outs of the first image's subjects are written once as {prefix}subject-J.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cut_files = []
    if generated:
        for j, c in enumerate(generated[0].cutouts):
            cut_files.append(f"{prefix}subject-{j}.png")
            Image.fromarray(c).save(out / cut_files[-1])
    paths = []
    for i, g in enumerate(generated):
        stem = f"{prefix}{start + i:04d}-s{g.seed}"
        g.image.save(out / f"{stem}.png")
        (out / f"{stem}.json").write_text(json.dumps(record(g, stem, cut_files), indent=2))
        if boxes:
            overlay(g).save(out / f"{stem}-boxes.png")
        paths.append(out / f"{stem}.png")
    return paths
