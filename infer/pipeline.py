"""Generation with a trained Subject-Diffusion model: a prompt, subject photos and where to put them -> images.

    pipe = Pipeline.load("runs/a/export", device="cuda", sam="sam_vit_h_4b8939.pth")
    images = pipe.generate("a dog on the beach", [Subject("dog.jpg", "dog", box=(0.2, 0.3, 0.7, 0.9))],
                           num_images=4, seed=0)

Guidance: three branches (the reference code's order, cf. InstructPix2Pix), sampled by the model library's one
sampler, `subjectdiff.model.sampling` (its docstring has the formulas), which the trainer's validation uses too.
Encoding, sampling and decoding are `subjectdiff.model.pipeline.SubjectDiffusionPipeline`'s: the diffusers pipeline
gives the same image as `subjectdiff generate` for the same seed.

Conventions: layout boxes are xyxy normalized to [0, 1] in the generated image; the location channel is 1 on the
latent cells whose centres lie in any box (`subjectdiff.model.location_map`, the trainer's too). Seeds are per
image: image i starts from `torch.randn` of a CPU generator seeded with seeds[i], so an image does not depend on
its batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from subjectdiff.infer.subjects import Prepared, Subject, SubjectCutter
from subjectdiff.model import Parts, load_pretrained
from subjectdiff.model import pipeline as model_pipeline
from subjectdiff.model.location import location_map  # noqa: F401  (re-exported: the one location channel)
from subjectdiff.model.pipeline import SubjectDiffusionPipeline, is_diffusers_export
from subjectdiff.model.sampling import ORDERS, SamplingConfig, guide, sample_latents, three_branches  # noqa: F401

log = logging.getLogger(__name__)
WEIGHTS = ("auto", "ema", "raw")


@dataclass
class Generated:
    """One generated image and everything needed to reproduce it (outputs.py writes it as PNG + JSON)."""

    image: Image.Image
    prompt: str
    full_prompt: str
    subjects: list[dict[str, Any]]
    boxes: list[list[float]]
    seed: int
    sampling: dict[str, Any]
    model: dict[str, Any]
    cutouts: list[np.ndarray] = field(default_factory=list, repr=False)


def default_layout(n: int) -> list[tuple[float, float, float, float]]:
    """Boxes (xyxy normalized) for n subjects given none: one subject centred; two side by side as in the
    reference code ([50, 100, 200, 400] and [300, 100, 500, 400] of 512); more in equal columns."""
    if n == 1:
        return [(0.25, 0.2, 0.75, 0.8)]
    if n == 2:
        return [tuple(v / 512 for v in b) for b in ((50, 100, 200, 400), (300, 100, 500, 400))]
    w = 1.0 / n
    return [(i * w + 0.05 * w, 0.2, (i + 1) * w - 0.05 * w, 0.8) for i in range(n)]


def resolve_model(path: str | os.PathLike, weights: str = "auto") -> tuple[Path, str]:
    """A run folder, a trainer checkpoint (step-N/) or an export -> (the model's folder, which weights).

    A run folder gives its `export/` (EMA weights, written at the end of training; returned as "export") or, with
    weights="raw" or without an export, its newest checkpoint. In a checkpoint, "auto" takes ema.safetensors when
    present. An export folder holds one set of weights ("raw"); a diffusers export (model_index.json, `subjectdiff
    export --format diffusers`) too ("diffusers")."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such model folder (an export, a trainer checkpoint or a run folder)")
    if is_diffusers_export(p):
        if weights == "ema":
            raise FileNotFoundError(f"{p}: weights='ema' but a diffusers export holds one set of weights")
        return p, "diffusers"
    if not (p / "config.json").is_file():
        steps = (
            sorted(
                (c for c in (p / "checkpoints").glob("step-*") if c.name[5:].isdigit()), key=lambda c: int(c.name[5:])
            )
            if (p / "checkpoints").is_dir()
            else []
        )
        if (p / "export" / "config.json").is_file() and weights != "raw":
            return p / "export", "export"
        if not steps:
            raise FileNotFoundError(f"{p}: no config.json, export/ or checkpoints/step-*/: not a model")
        p = steps[-1]
    has_ema = (p / "ema.safetensors").is_file()
    if weights == "ema" and not has_ema:
        raise FileNotFoundError(f"{p}: weights='ema' but there is no ema.safetensors (an export holds one set)")
    return p, "ema" if has_ema and weights != "raw" else "raw"


def load_parts(path: str | os.PathLike, weights: str = "auto", **overrides: Any) -> tuple[Parts, dict[str, Any]]:
    """Parts from an export (ours or diffusers') / checkpoint / run folder (see resolve_model), and a description
    for the outputs."""
    from safetensors.torch import load_file

    folder, which = resolve_model(path, weights)
    if which == "diffusers":  # complete: every weight is in the folder, the base is not read (overrides unused)
        parts = model_pipeline.load_parts(folder)
    else:
        parts = load_pretrained(folder, **overrides)
    if which == "ema":
        ema = load_file(str(folder / "ema.safetensors"))
        unknown = set(ema) - set(parts.model.state_dict())
        if unknown:
            raise ValueError(f"{folder}/ema.safetensors: weights the model does not have: {sorted(unknown)[:5]}")
        parts.model.load_state_dict(ema, strict=False)
    return parts, {
        "id": str(folder),
        "weights": which,
        "base": parts.config.base,
        "image_encoder": parts.config.image_encoder,
    }


@dataclass
class Condition(model_pipeline.Condition):
    """The model pipeline's Condition (text, subject tokens, boxes; batch 1) and the cut-outs it came from."""

    prepared: list[Prepared] = field(default_factory=list)


class Pipeline:
    """`subjectdiff generate` around built `Parts`: SAM cut-outs, the default layout and the outputs' records here;
    encoding, sampling and decoding are `SubjectDiffusionPipeline`'s (the model library's one generation path),
    so the diffusers pipeline and this command give the same image for the same seed."""

    def __init__(
        self,
        parts: Parts,
        model_info: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        sam=None,
    ):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.parts = parts.to(self.device, frozen_dtype=self.dtype)
        self.model = parts.model.to(dtype=self.dtype).eval().requires_grad_(False)
        self.sd = SubjectDiffusionPipeline.from_parts(parts)  # shares the modules; disarms attention capture
        self.sd.set_progress_bar_config(disable=True)  # the command's own bar counts every batch's steps
        self.model_info = model_info or {"id": "<in-memory>", "weights": "raw", "base": parts.config.base}
        self.cutter = SubjectCutter(sam, size=parts.image_encoder.image_size, device=str(self.device))
        self.native = self.sd.native_resolution

    @classmethod
    def load(
        cls, path: str | os.PathLike, weights: str = "auto", device: str = "cpu", dtype=None, sam=None, **overrides: Any
    ) -> Pipeline:
        """From an export (ours or diffusers'), a trainer checkpoint (raw or EMA weights) or a run folder
        (`resolve_model`)."""
        parts, info = load_parts(path, weights, **overrides)
        return cls(parts, info, device, dtype, sam)

    # -- conditioning ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str, subjects: list[Subject]) -> Condition:
        """Cut the subjects out, encode them and the prompt (with ", the {label} is sks" per subject)."""
        n = self.model.config.max_subjects
        if len(subjects) > n:
            raise ValueError(f"{len(subjects)} subjects given; this model has {n} subject slots")
        prepared = [self.cutter(s) for s in subjects]
        layout = default_layout(len(subjects)) if subjects else []
        boxes = [s.box if s.box is not None else layout[j] for j, s in enumerate(subjects)]
        c = self.sd.encode_condition(prompt, [p.cutout for p in prepared], [s.label for s in subjects], boxes)
        return Condition(**vars(c), prepared=prepared)

    def null_text(self) -> torch.Tensor:
        """(1, L, D): the empty prompt, the text condition dropped in training."""
        return self.sd.encode_condition("", [], [], []).null_text

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, c: Condition, seeds: list[int], s: SamplingConfig, progress=None) -> list[Image.Image]:
        """Images for one condition, one per seed (one UNet batch of 3 x len(seeds)): image i starts from the noise
        of a CPU generator seeded with seeds[i]. progress: a tqdm bar advanced once per denoising step, or None."""
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        x = self.sd.sample(c, gens, s, s.make_scheduler(self.parts.scheduler.config), progress)
        return self.decode(x)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """(B, 4, h, w) scaled latents -> B RGB images."""
        return [Image.fromarray(a) for a in self.sd.decode(latents)]

    def generate(
        self,
        prompt: str,
        subjects: list[Subject] | None = None,
        num_images: int = 1,
        seed: int | list[int] = 0,
        sampling: SamplingConfig | None = None,
        progress=None,
    ) -> list[Generated]:
        """num_images images of `prompt` with `subjects`; seed: the first seed (images get seed, seed + 1, ...) or
        one seed per image. Batches of sampling.batch_size images. progress: a tqdm bar advanced once per
        denoising step of every batch (steps x batches in all), or None."""
        s = sampling or SamplingConfig()
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(num_images)]
        if len(seeds) != num_images:
            raise ValueError(f"{len(seeds)} seeds for {num_images} images: give one seed, or one per image")
        c = self.encode_prompt(prompt, list(subjects or []))
        images = []
        for i in range(0, num_images, s.batch_size):
            images += self.sample(c, seeds[i : i + s.batch_size], s, progress)
        return [self.describe(c, im, sd, s) for im, sd in zip(images, seeds)]

    def describe(self, c: Condition, image: Image.Image, seed: int, s: SamplingConfig) -> Generated:
        subjects = [
            {
                "source": p.subject.source(),
                "label": p.subject.label,
                "box": [round(v, 6) for v in c.boxes[0, j].tolist()],
                "box_given": p.subject.box is not None,
                "segmentation": p.method,
                "region": p.subject.region,
                "point": p.subject.point,
                "present": bool(c.present[0, j]),
            }
            for j, p in enumerate(c.prepared)
        ]
        sampling = {**asdict(s), "resolution": s.resolution or self.native, "dtype": str(self.dtype)}
        return Generated(
            image,
            c.prompt,
            c.full_prompt,
            subjects,
            [d["box"] for d in subjects],
            int(seed),
            sampling,
            dict(self.model_info),
            [p.cutout for p in c.prepared],
        )
