"""The one training step of Subject-Diffusion: encode (frozen, no_grad), noise, condition (with CFG dropout),
denoise, losses (the paper's objective: denoising MSE + loc_weight x the attention-map localization loss)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from subjectdiff.model import Parts, localization_loss, location_map, token_weights, tokenize
from subjectdiff.train.config import DROPS, LossConfig

_EMPTY_IDS: dict[str, torch.Tensor] = {}


def empty_ids(device: torch.device) -> torch.Tensor:
    """(77,) token ids of the empty prompt: the text condition dropped for classifier-free guidance."""
    key = str(device)
    if key not in _EMPTY_IDS:
        _EMPTY_IDS[key] = torch.tensor(tokenize(""), dtype=torch.long, device=device)
    return _EMPTY_IDS[key]


@torch.no_grad()
def encode_inputs(
    parts: Parts, batch: dict[str, Any], device: torch.device, grad: bool = False, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Frozen encoders: image -> latents (B, 4, h, w); subjects -> cls (B, N, Dc), tokens (B, N, T, Dv).
    gen: latents drawn from the VAE posterior with this generator (the reference's `latent_dist.sample()`);
    None: the posterior mean. grad=True runs the image encoder under autograd (the reference code's way;
    benchmarks only)."""
    images = batch["image"].to(device, non_blocking=True).float() / 127.5 - 1
    latents = parts.encode_images(images, gen).float()
    subjects = batch["subjects"].to(device, non_blocking=True)
    b, n = subjects.shape[:2]
    with torch.enable_grad() if grad else contextlib.nullcontext():
        cls, tokens = parts.image_encoder(subjects.flatten(0, 1).float() / 255)
    tokens = tokens.float().reshape(b, n, *tokens.shape[1:])
    return {"latents": latents, "cls": cls.float().reshape(b, n, -1), "tokens": tokens}


def drop_events(b: int, cfg: LossConfig, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Classifier-free-guidance dropout: one uniform draw per sample falls into at most one of the disjoint
    events loss.drop_text, drop_text_location, drop_location, drop_subjects, drop_all, laid out in that order on
    [0, 1) (the reference's `train.py` for its three: text [0, .05), both [.05, .1), location [.1, .15)).
    -> {"text", "location", "subjects"}: (B,) bool, what each sample drops."""
    u = torch.rand(b, generator=gen, device=device)
    edges = torch.tensor([getattr(cfg, n) for n in DROPS], device=device).cumsum(0)
    event = torch.bucketize(u, edges, right=True)  # 0..4 = an event of DROPS, 5 = nothing dropped
    text = (event == 0) | (event == 1) | (event == 4)
    location = (event == 1) | (event == 2) | (event == 4)
    return {"text": text, "location": location, "subjects": (event == 3) | (event == 4)}


@torch.no_grad()
def condition(
    batch: dict[str, Any], enc: dict[str, torch.Tensor], cfg: LossConfig, gen: torch.Generator, device: torch.device
) -> dict[str, torch.Tensor]:
    """Model inputs with classifier-free-guidance dropout (drop_events): text -> the empty prompt without
    placeholders (so no CLS fusion either), location -> zeros, subjects -> the grounding net's learned null
    features (subject_mask 0)."""
    ids, ph = batch["input_ids"].to(device), batch["placeholder_pos"].to(device)
    present, boxes = batch["present"].to(device), batch["boxes"].to(device).float()
    drop = drop_events(ids.shape[0], cfg, gen, device)
    ids = torch.where(drop["text"][:, None], empty_ids(device), ids)
    ph = torch.where(drop["text"][:, None], torch.full_like(ph, -1), ph)
    h, w = enc["latents"].shape[-2:]
    loc_present = present & ~drop["text"][:, None]  # a dropped prompt has no subject tokens to localize
    return {
        "input_ids": ids,
        "placeholder_pos": ph,
        "subject_cls": enc["cls"],
        "subject_tokens": enc["tokens"],
        "boxes": boxes,
        "subject_mask": (present & ~drop["subjects"][:, None]).float(),
        "location": location_map(boxes, present & ~drop["location"][:, None], h, w),
        "loc_token_weights": token_weights(batch["loc_pos"].to(device), ids.shape[1]) * loc_present[..., None],
        "loc_present": loc_present,
    }


def training_step(
    model: torch.nn.Module,
    parts: Parts,
    batch: dict[str, Any],
    cfg: LossConfig,
    gen: torch.Generator,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    reference: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (call .backward() on it). `model` is the SubjectDiffusion, DDP-wrapped or not."""
    enc = encode_inputs(parts, batch, device, grad=reference, gen=gen if cfg.vae_sample else None)
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
        eps, maps = model(
            noisy,
            t,
            c["input_ids"],
            c["placeholder_pos"],
            c["subject_cls"],
            c["subject_tokens"],
            c["boxes"],
            c["subject_mask"],
            c["location"],
            weights,
        )
    mse = F.mse_loss(eps.float(), target.float())
    masks = batch["masks"].to(device)
    if weights is None:
        loc = mse * 0
    else:
        loc = localization_loss(
            maps, masks, c["loc_present"], normalize=cfg.loc_normalize, masks_mode=cfg.loc_masks, reduce=cfg.loc_reduce
        )
    loss = mse + cfg.loc_weight * loc
    return loss, {"loss": loss.detach().item(), "mse": mse.detach().item(), "loc": float(loc.detach())}
