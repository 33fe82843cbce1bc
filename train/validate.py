"""A grid of validation samples: per row, the training image, its subject images and a generated image, for a
fixed batch kept for the run. Sampled as users sample: the model library's three-branch sampler
(`subjectdiff.model.sampling`, what `infer.Pipeline` runs), with run.val_steps, run.val_guidance,
run.val_subject_guidance and run.val_scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from subjectdiff.model.sampling import SamplingConfig, sample_latents, three_branches
from subjectdiff.train.step import empty_ids, encode_inputs


@torch.no_grad()
def sample(parts, batch, device, s: SamplingConfig, seed: int = 0) -> torch.Tensor:
    """Images (B, 3, R, R) in [0, 1] generated for the batch's prompts, subjects and boxes (subject-first
    three-branch guidance; the batch holds no plain prompt for the text-first order)."""
    model, enc = parts.model, encode_inputs(parts, batch, device)
    model.store.arm(None)  # no attention capture while sampling (training leaves it armed for recompute)
    ids, ph = batch["input_ids"].to(device), batch["placeholder_pos"].to(device)
    boxes, present = batch["boxes"].to(device).float(), batch["present"].to(device)
    b, (h, w) = ids.shape[0], enc["latents"].shape[-2:]
    text = model.encode_text(ids, ph, enc["cls"])
    null_text = model.encode_text(empty_ids(device).expand(b, -1))
    cond = three_branches(text, null_text, enc["tokens"], boxes, present, h, w, s.order)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(b)]
    noise = torch.cat([torch.randn((1, 4, h, w), generator=g) for g in gens]).to(device)
    x = sample_latents(model, s.make_scheduler(parts.scheduler.config), cond, noise, s, gens)
    vae = parts.vae
    images = vae.decode((x / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


def validation_grid(trainer, path: Path) -> Path:
    """Write the grid for the trainer's validation batch (the run's first micro-batch, kept fixed)."""
    batch = trainer.val_batch
    cfg = trainer.cfg.run
    model = trainer.model
    was_training = model.training
    model.eval()
    s = SamplingConfig(
        steps=cfg.val_steps,
        guidance=cfg.val_guidance,
        subject_guidance=cfg.val_subject_guidance,
        scheduler=cfg.val_scheduler,
    )
    gen = sample(trainer.parts, batch, trainer.d.device, s, seed=cfg.seed)
    model.train(was_training)
    r = gen.shape[-1]
    rows = []
    for i in range(gen.shape[0]):
        cells = [batch["image"][i].numpy().transpose(1, 2, 0)]
        for s_img in batch["subjects"][i]:
            cells.append(np.asarray(Image.fromarray(s_img.numpy().transpose(1, 2, 0)).resize((r, r))))
        cells.append((gen[i].cpu().numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
        rows.append(np.concatenate(cells, axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
