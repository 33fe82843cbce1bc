"""A grid of validation samples: per row, the training image, its subject cut-outs and a generated image
(DDIM with classifier-free guidance against the null conditions), from a fixed batch kept for the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.step import box_union_map, empty_ids, encode_inputs


@torch.no_grad()
def sample(parts, batch, device, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
    """Images (B, 3, R, R) in [0, 1] generated for the batch's prompts, subjects and boxes."""
    from diffusers import DDIMScheduler

    model, enc = parts.model, encode_inputs(parts, batch, device)
    model.store.arm(None)  # no attention capture while sampling (training leaves it armed for recompute)
    ids, ph = batch["input_ids"].to(device), batch["placeholder_pos"].to(device)
    boxes, present = batch["boxes"].to(device).float(), batch["present"].to(device)
    b, (h, w) = ids.shape[0], enc["latents"].shape[-2:]
    text = model.encode_text(ids, ph, enc["cls"])
    null_text = model.encode_text(empty_ids(device).expand(b, -1))
    loc = box_union_map(boxes, present, h, w)
    tokens = torch.cat([enc["tokens"], torch.zeros_like(enc["tokens"])])
    mask = torch.cat([present.float(), torch.zeros_like(present, dtype=torch.float)])
    sched = DDIMScheduler.from_config(parts.scheduler.config)
    sched.set_timesteps(steps)
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(enc["latents"].shape, generator=g, device=device)
    for t in sched.timesteps:
        tt = t.expand(2 * b).to(device)
        eps = model.denoise(torch.cat([x, x]), tt, torch.cat([text, null_text]), tokens, torch.cat([boxes, boxes]),
                            mask, torch.cat([loc, torch.zeros_like(loc)]))
        cond, uncond = eps.float().chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
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
    gen = sample(trainer.parts, batch, trainer.d.device, cfg.val_steps, cfg.val_guidance, seed=cfg.seed)
    model.train(was_training)
    r = gen.shape[-1]
    rows = []
    for i in range(gen.shape[0]):
        cells = [batch["image"][i].numpy().transpose(1, 2, 0)]
        for s in batch["subjects"][i]:
            cells.append(np.asarray(Image.fromarray(s.numpy().transpose(1, 2, 0)).resize((r, r))))
        cells.append((gen[i].cpu().numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
        rows.append(np.concatenate(cells, axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
