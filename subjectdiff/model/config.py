"""ModelConfig: everything needed to rebuild a Subject-Diffusion model (stored next to its weights).

Presets are functions: `tiny()` (random tiny parts built from configs, offline) and `sd2_base()` (the paper's
setting: Stable Diffusion 2 base + open_clip ViT-H-14).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from subjectdiff.presets import Presets

# Parameter groups that can be trained (the paper's training setup: cross-attention K/V, the adapters, conv_in, the text
# encoder, the text-side MLP and the grounding network). See `model.trainable_parameter_names`.
TRAINABLE_GROUPS = ("conv_in", "cross_kv", "adapters", "grounding", "text_mlp", "text_encoder", "unet")
ARCHS = ("tiny", "sd2-base")
NATIVE_RESOLUTION = {"tiny": 64, "sd2-base": 512}  # image side (pixels) each architecture is built for
MLP_FORMS = ("reference", "silu3")
NULL_FEATURES = ("per-token", "shared")
FOURIER_ORDERS = ("gligen", "coord-major")
# Fields added after the first exports: an export's config.json without them was trained with these values
# (`from_dict` fills them in), so old exports keep computing what they were trained to compute.
LEGACY_DEFAULTS = {"mlp": "silu3", "null_features": "shared", "fourier_order": "coord-major"}


@dataclass
class ModelConfig:
    """arch: the base architecture ("tiny" or "sd2-base") used when `base` is None (random init).
    base: a diffusers Stable Diffusion folder or hub id (UNet, VAE, text encoder, scheduler), or None.
    image_encoder: open_clip model name; image_encoder_weights: an open_clip pretrained tag or a file,
        or None for random init.
    placeholder: the word appended per subject ("..., the {label} is {placeholder}"); must be one BPE token.
    max_subjects: N, the number of subject slots per sample (paper: 2); absent slots get null features.
    loc_layers: substrings of the cross-attention module names whose maps feed the localization loss
        (empty: all cross-attention layers). Default: the reference code's five central levels of SD 2's UNet
        (down 1-2, mid, up 1-2: 11 cross-attention layers at 32x32, 16x16 and 8x8 latents of a 512 px image).
    mlp: form of the grounding and text MLPs: "reference" (LayerNorm -> Linear -> GELU -> Linear, the reference
        code's `MLP`) or "silu3" (Linear-SiLU-Linear-SiLU-Linear, this project's first form).
    null_features: the grounding net's null image and position features: "per-token" (one per patch token,
        [T, D], the reference's) or "shared" (one vector for all tokens).
    fourier_order: layout of the box's Fourier features: "gligen" (per frequency sin of x0 y0 x1 y1, then cos:
        GLIGEN's and the reference's) or "coord-major" (per frequency, per coordinate, sin then cos: the first
        exports').
    trainable: parameter groups that receive gradients (TRAINABLE_GROUPS).
    seed: seed of the random initialisation of everything that does not come from weights.
    """

    arch: str = "sd2-base"
    base: str | None = "stabilityai/stable-diffusion-2-base"
    image_encoder: str = "ViT-H-14"
    image_encoder_weights: str | None = "laion2b_s32b_b79k"
    placeholder: str = "sks"
    max_subjects: int = 2
    fourier_freqs: int = 8
    grounding_hidden: int = 1024
    text_mlp_hidden: int = 1024
    loc_layers: tuple[str, ...] = ("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.2.")
    mlp: str = "reference"
    null_features: str = "per-token"
    fourier_order: str = "gligen"
    trainable: tuple[str, ...] = ("conv_in", "cross_kv", "adapters", "grounding", "text_mlp", "text_encoder")
    seed: int = 0

    def __post_init__(self) -> None:
        self.loc_layers = tuple(self.loc_layers)
        self.trainable = tuple(self.trainable)
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        bad = [g for g in self.trainable if g not in TRAINABLE_GROUPS]
        if bad:
            raise ValueError(f"unknown trainable group(s) {bad}; choose from {TRAINABLE_GROUPS}")
        if self.max_subjects < 1:
            raise ValueError(f"model.max_subjects must be >= 1, got {self.max_subjects}")
        for name, allowed in (("mlp", MLP_FORMS), ("null_features", NULL_FEATURES), ("fourier_order", FOURIER_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A stored config (export, checkpoint). Fields it predates take their LEGACY_DEFAULTS."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**{**LEGACY_DEFAULTS, **d})


def tiny() -> ModelConfig:
    """Random tiny UNet, VAE (64 px -> 8x8 latents), CLIP text model and open_clip ViT; builds offline."""
    return ModelConfig(
        arch="tiny",
        base=None,
        image_encoder="subjectdiff-tiny-vit",
        image_encoder_weights=None,
        grounding_hidden=32,
        text_mlp_hidden=32,
        loc_layers=("down_blocks.0.", "mid_block.", "up_blocks.1."),
    )


def sd2_base() -> ModelConfig:
    """The paper's setting: SD 2 base (512 px, epsilon) and open_clip ViT-H-14 (LAION-2B)."""
    return ModelConfig()


PRESETS = Presets("model", tiny, sd2_base)
