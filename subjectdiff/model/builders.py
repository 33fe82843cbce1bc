"""Builders of the base parts (UNet, VAE, text encoder, scheduler, open_clip image encoder), weights optional.

`base=None` in the ModelConfig means random init from the architecture's config (tiny for tests, or the
SD 2 base architecture for benchmarks); a diffusers folder or hub id loads real weights through the same path.
Random init is seeded (ModelConfig.seed) without touching the global RNG, so every process builds the same.

Weights come through `subjectdiff.weights`, as datagen's do: a hub id `base` is its snapshot in
$SUBJECTDIFF_CACHE/hf (`resolve_folder`; a local folder is used in place, `#sha256=` checked either way), an
image_encoder_weights file spec (path, URL, s3://, hf://, with an optional `#sha256=`) is fetched into the cache and
verified, and an open_clip pretrained tag downloads into $SUBJECTDIFF_CACHE/open_clip: nothing lands in the
libraries' default caches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subjectdiff.model.config import ModelConfig
from subjectdiff.weights import DIFFUSERS_FILES, cache_dir, resolve, resolve_folder

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=0,
)
SD2_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
SD2_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD2_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
)
SD2_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)
ARCH_CONFIGS = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd2-base": (SD2_UNET, SD2_VAE, SD2_TEXT)}
OPEN_CLIP_CONFIGS = Path(__file__).parent / "configs"


@contextlib.contextmanager
def seeded(seed: int):
    """Random init under a fixed seed, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def base_folder(cfg: ModelConfig) -> Path:
    """cfg.base as a local diffusers folder: the folder itself, or the hub id's snapshot in our cache."""
    return resolve_folder(cfg.base, allow_patterns=DIFFUSERS_FILES)


def base_unet(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel

    if cfg.base:
        return UNet2DConditionModel.from_pretrained(base_folder(cfg), subfolder="unet")
    with seeded(cfg.seed):
        return UNet2DConditionModel(**ARCH_CONFIGS[cfg.arch][0])


def vae(cfg: ModelConfig):
    from diffusers import AutoencoderKL

    if cfg.base:
        return AutoencoderKL.from_pretrained(base_folder(cfg), subfolder="vae")
    with seeded(cfg.seed + 1):
        return AutoencoderKL(**ARCH_CONFIGS[cfg.arch][1])


def text_encoder(cfg: ModelConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    if cfg.base:
        return CLIPTextModel.from_pretrained(base_folder(cfg), subfolder="text_encoder")
    with seeded(cfg.seed + 2):
        return CLIPTextModel(CLIPTextConfig(**ARCH_CONFIGS[cfg.arch][2]))


def noise_scheduler(cfg: ModelConfig):
    from diffusers import DDPMScheduler

    if cfg.base:
        return DDPMScheduler.from_pretrained(base_folder(cfg), subfolder="scheduler")
    return DDPMScheduler(**SD2_SCHEDULER)


def open_clip_visual(cfg: ModelConfig) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """open_clip's vision tower (returning (pooled, tokens)), its preprocess config (mean, std, size) and the
    architecture it was built from (embed_dim, vision_cfg, quick_gelu: what rebuilds it without the registry)."""
    import open_clip

    if cfg.image_encoder not in open_clip.list_models():
        open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    with seeded(cfg.seed + 3):
        model = create_open_clip(cfg.image_encoder, cfg.image_encoder_weights)
    pre = open_clip.get_model_preprocess_cfg(model)
    arch = open_clip.get_model_config(cfg.image_encoder)
    spec = {
        "embed_dim": arch["embed_dim"],
        "vision_cfg": arch["vision_cfg"],
        "quick_gelu": bool(arch.get("quick_gelu", False)),
    }
    visual = model.visual
    visual.output_tokens = True  # (pooled, tokens); calling the whole CLIP model would then fail (STACK.md)
    del model
    return visual, pre, spec


def create_open_clip(name: str, weights: str | None, *, transforms: bool = False, **kwargs):
    """open_clip.create_model(NAME) (with `transforms`: create_model_and_transforms) with WEIGHTS: None (random
    init), one of open_clip's pretrained tags for NAME (downloaded into $SUBJECTDIFF_CACHE/open_clip), or a
    checkpoint spec (subjectdiff.weights.resolve: a path, URL, s3:// or hf:// file, with an optional #sha256=).
    The model's image encoder and the metrics' CLIP load alike."""
    import open_clip

    create = open_clip.create_model_and_transforms if transforms else open_clip.create_model
    if weights is None:
        return create(name, **kwargs)
    if weights in open_clip.list_pretrained_tags_by_model(name):
        return create(name, pretrained=weights, cache_dir=str(cache_dir() / "open_clip"), **kwargs)
    return create(name, pretrained=str(resolve(weights)), **kwargs)


def image_encoder_input_size(cfg: ModelConfig) -> int:
    """The open_clip vision tower's input side (the subject images' size), read from its model config without
    building it (`train preview` needs no weights)."""
    import open_clip

    if cfg.image_encoder not in open_clip.list_models():
        open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    size = (open_clip.get_model_config(cfg.image_encoder) or {}).get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)
