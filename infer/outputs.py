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

import numpy as np
from PIL import Image

from subjectdiff.catalogs.report.draw import object_color, overlay
from subjectdiff.infer.pipeline import Generated


def layout_image(g: Generated) -> Image.Image:
    """The image with each subject's layout box drawn and labelled, subject j in the report's object_color(j)."""
    im = np.asarray(g.image.convert("RGB"))
    boxes = np.asarray([s["box"] for s in g.subjects], np.float32).reshape(-1, 4)  # xyxy normalized
    colors = [object_color(j) for j in range(len(g.subjects))]
    drawn = overlay(
        im, None, boxes, colors, thickness=max(1, im.shape[1] // 256), labels=[s["label"] for s in g.subjects]
    )
    return Image.fromarray(drawn)


def record(g: Generated, stem: str, cutout_files: list[str] | None = None) -> dict:
    """The JSON sidecar of one image."""
    return {
        "image": f"{stem}.png",
        "prompt": g.prompt,
        "full_prompt": g.full_prompt,
        "subjects": [{**s, **({"cutout": cutout_files[j]} if cutout_files else {})} for j, s in enumerate(g.subjects)],
        "boxes": g.boxes,
        "seed": g.seed,
        "steps": g.sampling["steps"],
        "guidance": g.sampling["guidance"],
        "subject_guidance": g.sampling["subject_guidance"],
        "scheduler": g.sampling["scheduler"],
        "sampling": g.sampling,
        "model": g.model,
    }


def save(
    generated: list[Generated], out_dir: str | os.PathLike, boxes: bool = False, start: int = 0, prefix: str = ""
) -> list[Path]:
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
            layout_image(g).save(out / f"{stem}-boxes.png")
        paths.append(out / f"{stem}.png")
    return paths
