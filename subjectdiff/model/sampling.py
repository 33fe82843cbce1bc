"""The one sampler: three-branch classifier-free guidance over a diffusers scheduler. `SubjectDiffusionPipeline`
(model/pipeline.py; `infer.Pipeline`, what `subjectdiff generate` runs, samples through it) and the trainer's
validation grid (train/validate.py) both sample through `sample_latents`.

With e(text, subjects) the UNet's noise prediction, "null" text = the empty prompt, null subjects = the
grounding net's learned null features (subject_mask 0) and no location (location channel all zeros):

    e_u = e(null, null)     e_s = e(null, subjects + location)     e_f = e(prompt + subject words, subjects + location)
    eps = e_u + subject_guidance * (e_s - e_u) + guidance * (e_f - e_s)                        (order "subject-first")

the reference code's order (`test.py`: the batch is [text + subjects, subjects only, unconditional], scales 7.5 and
1.5; InstructPix2Pix's form with the subject as the image condition). `order="text-first"` uses the plain prompt
without subjects as the middle branch, e_t = e(prompt, null): eps = e_u + guidance * (e_t - e_u) +
subject_guidance * (e_f - e_t). With equal scales both are ordinary classifier-free guidance towards e_f.

The reference's unconditional branch zeroes the grounding net's output tokens, an input its training never shows
(it never drops subjects); ours uses the learned null features, which training shows in every empty subject slot
and every dropped-subject sample (docs/model.md).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from subjectdiff.model.location import location_map

ORDERS = ("subject-first", "text-first")
# Settings Stable Diffusion's own scheduler configs carry (PLMS = PNDM without Runge-Kutta warm-up steps).
SCHEDULER_DEFAULTS = {
    "PNDMScheduler": {"skip_prk_steps": True, "set_alpha_to_one": False},
    "DDIMScheduler": {"set_alpha_to_one": False},
}


def scheduler_class(name: str):
    """The diffusers scheduler class of that name; a ValueError a user can act on for an unknown one."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(
            f"unknown diffusers scheduler {name!r} (e.g. PNDMScheduler, DDIMScheduler, "
            "DPMSolverMultistepScheduler, EulerDiscreteScheduler)"
        )
    return cls


@dataclass
class SamplingConfig:
    """steps: denoising steps. guidance: text scale s_T; subject_guidance: subject/location scale s_S (reference
    code: 7.5 and 1.5, 50 PNDM steps). scheduler: a diffusers scheduler class name, built from the model's noise
    schedule (reference code: PNDMScheduler). eta: DDIM-style stochasticity, where the scheduler takes it.
    order: which single-condition branch sits in the middle (module docstring). resolution: image side in pixels
    (None: the UNet's native size). batch_size: images per UNet call (x3 branches)."""

    steps: int = 50
    guidance: float = 7.5
    subject_guidance: float = 1.5
    scheduler: str = "PNDMScheduler"
    eta: float = 0.0
    order: str = "subject-first"
    resolution: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"sampling order must be one of {ORDERS}, got {self.order!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.resolution is not None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's stride), got {self.resolution}")

    def make_scheduler(self, base_config: dict[str, Any]):
        cls = scheduler_class(self.scheduler)
        return cls.from_config({**dict(base_config), **SCHEDULER_DEFAULTS.get(self.scheduler, {})})


def guide(eps: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """eps: (3B, 4, h, w) = [full, middle, unconditional] -> (B, 4, h, w), the three-branch guidance (module
    docstring)."""
    full, mid, uncond = eps.chunk(3)
    if s.order == "subject-first":
        return uncond + s.subject_guidance * (mid - uncond) + s.guidance * (full - mid)
    return uncond + s.guidance * (mid - uncond) + s.subject_guidance * (full - mid)


def three_branches(
    text_full: torch.Tensor,
    null_text: torch.Tensor,
    tokens: torch.Tensor,
    boxes: torch.Tensor,
    present: torch.Tensor,
    h: int,
    w: int,
    order: str = "subject-first",
    text_plain: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """UNet inputs of the branches [full, middle, unconditional], each of batch B: (3B, ...).

    text_full: (B, L, D) prompt + subject words; null_text: (B, L, D) the empty prompt; tokens: (B, N, T, Dv);
    boxes: (B, N, 4) xyxy normalized; present: (B, N) bool; text_plain: (B, L, D) the prompt alone (text-first)."""
    dtype = text_full.dtype
    loc = location_map(boxes, present, h, w).to(dtype)
    mask, none = present.to(dtype), torch.zeros(present.shape, dtype=dtype, device=present.device)
    if order == "subject-first":  # middle: subjects + location, no text
        mid = (null_text, mask, loc)
    else:  # middle: the plain prompt, no subjects, no location
        if text_plain is None:
            raise ValueError("order 'text-first' needs the plain prompt's encoding (text_plain)")
        mid = (text_plain, none, torch.zeros_like(loc))
    return {
        "text": torch.cat([text_full, mid[0], null_text]),
        "subject_tokens": torch.cat([tokens.to(dtype)] * 3),
        "boxes": torch.cat([boxes.to(dtype)] * 3),
        "subject_mask": torch.cat([mask, mid[1], none]),
        "location": torch.cat([loc, mid[2], torch.zeros_like(loc)]),
    }


@torch.no_grad()
def sample_latents(
    model,
    scheduler,
    branches: dict[str, torch.Tensor],
    noise: torch.Tensor,
    s: SamplingConfig,
    generators: list[torch.Generator] | None = None,
    progress=None,
) -> torch.Tensor:
    """Denoise `noise` (B, 4, h, w) with three-branch guidance -> latents (B, 4, h, w). The one sampling loop:
    `subjectdiff generate`, `SubjectDiffusionPipeline.__call__` and the trainer's validation grid run it.

    model: anything with `denoise(latents, t, **branches)` (a SubjectDiffusion, a SubjectDiffusionPipeline);
    scheduler: a diffusers scheduler (`SamplingConfig.make_scheduler`, or the pipeline's), set to s.steps here;
    branches: `three_branches(...)` for this batch; generators: per-image generators for stochastic schedulers
    (eta > 0, ancestral); progress: a tqdm bar advanced once per step, or None."""
    scheduler.set_timesteps(s.steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    params = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("eta", s.eta), ("generator", generators)) if k in params and v is not None}
    b, dtype = noise.shape[0], branches["text"].dtype
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t).to(dtype)
        eps = model.denoise(torch.cat([x_in] * 3), t.expand(3 * b), **branches).float()
        x = scheduler.step(guide(eps, s), t, x, **extra).prev_sample
        if progress is not None:
            progress.update(1)
    return x
