"""The one training step of Subject-Diffusion: encode (frozen, no_grad), noise, condition (with CFG dropout),
denoise, losses (the paper's objective: denoising MSE + loc_weight x the attention-map localization loss)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from subjectdiff.model import Parts, localization_loss, token_weights, tokenize
from train.config import LossConfig

_EMPTY_IDS: dict[str, torch.Tensor] = {}


def empty_ids(device: torch.device) -> torch.Tensor:
    """(77,) token ids of the empty prompt: the text condition dropped for classifier-free guidance."""
    key = str(device)
    if key not in _EMPTY_IDS:
        _EMPTY_IDS[key] = torch.tensor(tokenize(""), dtype=torch.long, device=device)
    return _EMPTY_IDS[key]


def box_union_map(boxes: torch.Tensor, keep: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """boxes: (B, N, 4) xyxy in [0, 1]; keep: (B, N) bool -> (B, 1, h, w) float, 1 inside any kept box
    (the location channel, paper, Method: location control). A cell is inside when its centre is."""
    ys = (torch.arange(h, device=boxes.device) + 0.5) / h
    xs = (torch.arange(w, device=boxes.device) + 0.5) / w
    b = boxes[..., None, None]  # (B, N, 4, 1, 1)
    inside = (xs >= b[:, :, 0]) & (xs <= b[:, :, 2]) & (ys[:, None] >= b[:, :, 1]) & (ys[:, None] <= b[:, :, 3])
    return (inside & keep[..., None, None]).any(1, keepdim=True).float()


@torch.no_grad()
def encode_inputs(parts: Parts, batch: dict[str, Any], device: torch.device,
                  grad: bool = False) -> dict[str, torch.Tensor]:
    """Frozen encoders: image -> latents (B, 4, h, w); subjects -> cls (B, N, Dc), tokens (B, N, T, Dv).
    grad=True runs the image encoder under autograd (the reference code's way; benchmarks only)."""
    images = batch["image"].to(device, non_blocking=True).float() / 127.5 - 1
    latents = parts.encode_images(images).float()
    subjects = batch["subjects"].to(device, non_blocking=True)
    b, n = subjects.shape[:2]
    with torch.enable_grad() if grad else contextlib.nullcontext():
        cls, tokens = parts.image_encoder(subjects.flatten(0, 1).float() / 255)
    tokens = tokens.float().reshape(b, n, *tokens.shape[1:])
    return {"latents": latents, "cls": cls.float().reshape(b, n, -1), "tokens": tokens}


@torch.no_grad()
def condition(batch: dict[str, Any], enc: dict[str, torch.Tensor], cfg: LossConfig, gen: torch.Generator,
              device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs with classifier-free-guidance dropout: text -> empty prompt, location -> zeros,
    subjects -> the grounding net's learned null features (subject_mask 0)."""
    ids, ph = batch["input_ids"].to(device), batch["placeholder_pos"].to(device)
    present, boxes = batch["present"].to(device), batch["boxes"].to(device).float()
    b = ids.shape[0]
    u = torch.rand(b, 4, generator=gen, device=device)
    all_ = u[:, 0] < cfg.drop_all
    drop_text = all_ | (u[:, 1] < cfg.drop_text)
    drop_loc = all_ | (u[:, 2] < cfg.drop_location)
    drop_subj = all_ | (u[:, 3] < cfg.drop_subjects)
    ids = torch.where(drop_text[:, None], empty_ids(device), ids)
    ph = torch.where(drop_text[:, None], torch.full_like(ph, -1), ph)
    h, w = enc["latents"].shape[-2:]
    loc_present = present & ~drop_text[:, None]  # a dropped prompt has no subject tokens to localize
    return {
        "input_ids": ids, "placeholder_pos": ph, "subject_cls": enc["cls"], "subject_tokens": enc["tokens"],
        "boxes": boxes, "subject_mask": (present & ~drop_subj[:, None]).float(),
        "location": box_union_map(boxes, present & ~drop_loc[:, None], h, w),
        "loc_token_weights": token_weights(batch["loc_pos"].to(device), ids.shape[1]) * loc_present[..., None],
        "loc_present": loc_present,
    }


def training_step(model: torch.nn.Module, parts: Parts, batch: dict[str, Any], cfg: LossConfig,
                  gen: torch.Generator, device: torch.device, autocast: contextlib.AbstractContextManager,
                  reference: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (call .backward() on it). `model` is the SubjectDiffusion, DDP-wrapped or not."""
    enc = encode_inputs(parts, batch, device, grad=reference)
    latents = enc["latents"]
    sched = parts.scheduler
    with torch.no_grad():
        noise = torch.randn(latents.shape, generator=gen, device=device)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen, device=device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    c = condition(batch, enc, cfg, gen, device)
    weights = c["loc_token_weights"] if cfg.loc_weight > 0 else None
    with autocast:
        eps, maps = model(noisy, t, c["input_ids"], c["placeholder_pos"], c["subject_cls"], c["subject_tokens"],
                          c["boxes"], c["subject_mask"], c["location"], weights)
    mse = F.mse_loss(eps.float(), target.float())
    masks = batch["masks"].to(device)
    if weights is None:
        loc = mse * 0
    else:
        loc = localization_loss(maps, masks, c["loc_present"], normalize=cfg.loc_normalize)
    loss = mse + cfg.loc_weight * loc
    return loss, {"loss": loss.detach().item(), "mse": mse.detach().item(), "loc": float(loc.detach())}
