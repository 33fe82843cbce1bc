"""The Subject-Diffusion model (Ma et al., SIGGRAPH 2024) on a Stable Diffusion 2 base.

    parts = build(tiny())                          # or build(sd2_base()), or load_pretrained("export/")
    model = parts.model                            # SubjectDiffusion: the trainable nn.Module
    cls, tokens = parts.image_encoder(subject_images)           # frozen, under no_grad
    text = model.encode_text(input_ids, placeholder_pos, cls)    # (B, L, D)
    eps = model.denoise(latents, t, text, tokens, boxes, subject_mask, location)

Conditioning conventions (batch first; N subject slots, T patch tokens per subject):
    latents: (B, 4, h, w) scaled VAE latents; timesteps: (B,) long.
    input_ids: (B, 77) open_clip token ids of the prompt with placeholders (`prompts.subject_prompt`).
    placeholder_pos: (B, N) long token position of each subject's placeholder, -1 = none.
    subject_cls: (B, N, Dc) open_clip pooled (CLS, projected) embeddings of the segmented subject images.
    subject_tokens: (B, N, T, Dv) open_clip patch tokens of the same images.
    boxes: (B, N, 4) xyxy normalized to [0, 1] in the generated image.
    subject_mask: (B, N) 1 = subject present, 0 = learned null features (absent, or dropped for CFG).
    location: (B, 1, h, w) binary union of the subjects' boxes at latent size; zeros = no location.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from subjectdiff.model import builders
from subjectdiff.model.attention import AttentionStore, CaptureProcessor
from subjectdiff.model.config import ModelConfig
from subjectdiff.model.modules import GroundingNet, TextMLP
from subjectdiff.model.prompts import check_placeholder

EXPORT_FORMAT = "subjectdiff.model/1"


def _trainable_group(name: str) -> set[str]:
    """The TRAINABLE_GROUPS a SubjectDiffusion parameter name belongs to."""
    groups = set()
    if name.startswith("unet."):
        groups.add("unet")
        if name.startswith("unet.conv_in."):
            groups.add("conv_in")
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            groups.add("cross_kv")
        if ".fuser." in name:
            groups.add("adapters")
        if name.startswith("unet.position_net."):
            groups.add("grounding")
    if name.startswith("text_encoder."):
        groups.add("text_encoder")
    if name.startswith("text_mlp."):
        groups.add("text_mlp")
    return groups


def widen_unet(base: nn.Module, cfg: ModelConfig, token_dim: int, n_tokens: int = 256) -> nn.Module:
    """The base UNet with a location input channel (zero-init, paper, Method: location control), gated
    self-attention adapters in every transformer block (tanh gates at zero: diffusers attention_type="gated")
    and our grounding network as `position_net`. At initialization it computes exactly what the base computes.

    The widened UNet is laid out on the meta device and takes the base's tensors (assign=True): only the new
    parts (conv_in, the adapters, the grounding net) are initialized, which keeps loading SD 2 fast.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import GatedSelfAttentionDense

    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config.update(in_channels=base.config.in_channels + 1, attention_type="gated")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    with builders.seeded(cfg.seed + 4):
        for block in [m for m in unet.modules() if hasattr(m, "fuser")]:
            f = block.fuser
            block.fuser = GatedSelfAttentionDense(
                f.linear.out_features, f.linear.in_features, f.attn.heads, f.attn.inner_dim // f.attn.heads
            )
        unet.position_net = GroundingNet(
            token_dim,
            unet.config.cross_attention_dim,
            cfg.grounding_hidden,
            cfg.fourier_freqs,
            n_tokens,
            cfg.mlp,
            cfg.null_features,
            cfg.fourier_order,
        )
        old = base.conv_in
        unet.conv_in = nn.Conv2d(old.in_channels + 1, old.out_channels, old.kernel_size, old.stride, old.padding)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("conv_in.")}
    missing, unexpected = unet.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, f"base UNet weights without a place in the subject UNet: {unexpected[:5]}"
    meta = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    assert not meta, f"subject UNet tensors neither new nor from the base: {meta[:5]}"
    with torch.no_grad():
        unet.conv_in.weight.zero_()
        unet.conv_in.weight[:, : old.in_channels] = old.weight
        unet.conv_in.bias.copy_(old.bias)
    return unet


class SubjectImageEncoder(ModelMixin, ConfigMixin):
    """Frozen open_clip vision tower. images: (B, 3, S, S) float RGB in [0, 1] at S = image_size (any other size
    is resized) -> (cls (B, Dc), tokens (B, T, Dv)): the projected pooled embedding and the patch tokens.

    A diffusers model (the `image_encoder` component of `SubjectDiffusionPipeline`): its config is the open_clip
    vision tower's (embed_dim, vision_cfg, quick_gelu) and preprocessing, so a saved encoder rebuilds without
    open_clip's model registry. `visual`: an already built tower (`build`), else one is built from the config."""

    ignore_for_config = ["visual"]

    @register_to_config
    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict[str, Any],
        quick_gelu: bool = False,
        image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
        image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
        image_size: int = 224,
        visual: nn.Module | None = None,
    ):
        super().__init__()
        if visual is None:
            from open_clip.model import _build_vision_tower

            visual = _build_vision_tower(embed_dim, dict(vision_cfg), quick_gelu)
            visual.output_tokens = True  # (pooled, tokens), as builders.open_clip_visual sets it
        self.visual = visual
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.cls_dim = int(visual.output_dim)
        self.token_dim = int(visual.conv1.out_channels)
        self.n_tokens = (self.image_size // visual.patch_size[0]) ** 2
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bicubic", align_corners=False)
        dtype = self.visual.conv1.weight.dtype
        x = ((images - self.mean) / self.std).to(dtype)
        cls, tokens = self.visual(x)
        return cls, tokens


def encode_text(
    text_encoder: nn.Module,
    text_mlp: nn.Module,
    input_ids: torch.Tensor,
    placeholder_pos: torch.Tensor | None = None,
    subject_cls: torch.Tensor | None = None,
) -> torch.Tensor:
    """input_ids: (B, L); placeholder_pos: (B, N) (-1 = none); subject_cls: (B, N, Dc) -> (B, L, D).

    The placeholder tokens' input embeddings are replaced by text_mlp(subject_cls)
    (paper, Method: text-image fusion). The one text path of training, `generate` and the diffusers pipeline.
    The text encoder runs through its own forward (the replacement is a hook on its token embedding), so that
    diffusers' model offload, which hooks each component's forward, moves it.
    """
    if subject_cls is None:
        return text_encoder(input_ids).last_hidden_state
    words = text_mlp(subject_cls.to(text_encoder.dtype))  # (B, N, D)

    def replace(module, args, emb):  # (B, L, D) token embeddings -> the placeholders' replaced
        valid = (placeholder_pos >= 0).to(emb.dtype)
        onehot = F.one_hot(placeholder_pos.clamp(min=0), input_ids.shape[1]).to(emb.dtype) * valid[..., None]
        keep = 1 - onehot.sum(1).clamp(max=1)  # (B, L)
        return emb * keep[..., None] + torch.einsum("bnl,bnd->bld", onehot, words.to(emb.device, emb.dtype))

    hook = text_encoder.text_model.embeddings.token_embedding.register_forward_hook(replace)
    try:
        return text_encoder(input_ids).last_hidden_state
    finally:
        hook.remove()


def denoise(
    unet: nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    subject_tokens: torch.Tensor,
    boxes: torch.Tensor,
    subject_mask: torch.Tensor,
    location: torch.Tensor,
) -> torch.Tensor:
    """The widened UNet (its `position_net` the grounding net) given all conditions (module docstring) -> eps
    (B, 4, h, w): the location channel joins the latents, the subjects go through the `gligen` kwargs."""
    x = torch.cat([latents, location.to(latents.dtype)], dim=1)
    gligen = {"tokens": subject_tokens, "boxes": boxes, "mask": subject_mask}
    return unet(x, timesteps, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample


class SubjectDiffusion(nn.Module):
    """The trainable model: the widened UNet (with the grounding network as `unet.position_net`), the text
    encoder and the text-side MLP. The VAE and image encoder are frozen and live outside (see `Parts`)."""

    def __init__(self, cfg: ModelConfig, unet: nn.Module, text_encoder: nn.Module, text_mlp: nn.Module):
        super().__init__()
        check_placeholder(cfg.placeholder)
        self.config = cfg
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_mlp = text_mlp
        self.store = AttentionStore()
        self._install_capture()
        self.set_trainable(cfg.trainable)

    # -- parameters ---------------------------------------------------------------------------------
    def trainable_names(self, groups: tuple[str, ...] | None = None) -> list[str]:
        groups = set(self.config.trainable if groups is None else groups)
        return [n for n, _ in self.named_parameters() if _trainable_group(n) & groups]

    def set_trainable(self, groups: tuple[str, ...]) -> None:
        names = set(self.trainable_names(groups))
        for n, p in self.named_parameters():
            p.requires_grad_(n in names)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = set(self.trainable_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    def _install_capture(self) -> None:
        layers = self.config.loc_layers
        procs = dict(self.unet.attn_processors)
        chosen = [n for n in procs if n.endswith(".attn2.processor") and (not layers or any(s in n for s in layers))]
        if not chosen:
            raise ValueError(f"model.loc_layers {layers} match no cross-attention layer of the UNet")
        for n in chosen:
            procs[n] = CaptureProcessor(self.store)
        self.unet.set_attn_processor(procs)
        self.captured_layers = chosen

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- conditioning -------------------------------------------------------------------------------
    def encode_text(
        self,
        input_ids: torch.Tensor,
        placeholder_pos: torch.Tensor | None = None,
        subject_cls: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, L); placeholder_pos: (B, N) (-1 = none); subject_cls: (B, N, Dc) -> (B, L, D)
        (`encode_text`)."""
        return encode_text(self.text_encoder, self.text_mlp, input_ids, placeholder_pos, subject_cls)

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        subject_tokens: torch.Tensor,
        boxes: torch.Tensor,
        subject_mask: torch.Tensor,
        location: torch.Tensor,
    ) -> torch.Tensor:
        """The denoising UNet given all conditions (shapes in the module docstring) -> eps (B, 4, h, w)."""
        if not self.store.recording:
            self.store.arm(None)  # called directly (inference): no attention capture, plain SDPA
        return denoise(self.unet, latents, timesteps, text, subject_tokens, boxes, subject_mask, location)

    def null_subjects(self, batch: int, n_tokens: int, token_dim: int, device=None, dtype=None):
        """(subject_tokens, boxes, subject_mask) meaning "no subject": the grounding net uses its null features."""
        n = self.config.max_subjects
        return (
            torch.zeros(batch, n, n_tokens, token_dim, device=device, dtype=dtype),
            torch.zeros(batch, n, 4, device=device, dtype=dtype),
            torch.zeros(batch, n, device=device, dtype=dtype),
        )

    def forward(
        self,
        latents,
        timesteps,
        input_ids,
        placeholder_pos,
        subject_cls,
        subject_tokens,
        boxes,
        subject_mask,
        location,
        loc_token_weights: torch.Tensor | None = None,
    ):
        """Training entry (what DDP wraps): encode_text + denoise. loc_token_weights (B, N, L) turns on the
        capture of subject-token attention maps. Returns (eps, maps: list of (B, N, HW))."""
        self.store.arm(loc_token_weights)
        try:
            text = self.encode_text(input_ids, placeholder_pos, subject_cls)
            eps = self.denoise(latents, timesteps, text, subject_tokens, boxes, subject_mask, location)
            return eps, list(self.store.maps)
        finally:
            self.store.recording = False

    # -- export ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, full: bool | None = None) -> Path:
        """Write config.json and model.safetensors (the trainable parameters; every parameter when `full`,
        the default when the base is random and could not be rebuilt from `config.base`)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        full = self.config.base is None if full is None else full
        state = self.state_dict() if full else self.trainable_state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(d / "model.safetensors"))
        meta = {"format": EXPORT_FORMAT, "full": full, "model": self.config.to_dict()}
        (d / "config.json").write_text(json.dumps(meta, indent=2))
        return d


@dataclass
class Parts:
    """A built model: the trainable `model`, the frozen `vae` and `image_encoder`, the noise `scheduler`."""

    model: SubjectDiffusion
    vae: nn.Module
    image_encoder: SubjectImageEncoder
    scheduler: Any
    config: ModelConfig

    def to(self, device, frozen_dtype: torch.dtype | None = None) -> Parts:
        self.model.to(device)
        for frozen in (self.vae, self.image_encoder):
            frozen.to(device)
            if frozen_dtype is not None and frozen_dtype != torch.float32:
                frozen.to(dtype=frozen_dtype)
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images: (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8): the posterior mean, or a draw from
        the posterior with `generator` (what the reference code trains on)."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        return z * self.vae.config.scaling_factor

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """The model's export; with a random base, the frozen parts' weights too (frozen.safetensors)."""
        from safetensors.torch import save_file

        d = self.model.save_pretrained(directory)
        if self.config.base is None or self.config.image_encoder_weights is None:
            state = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
            state.update({f"image_encoder.{k}": v for k, v in self.image_encoder.state_dict().items()})
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(d / "frozen.safetensors"))
        return d


def build(cfg: ModelConfig) -> Parts:
    """Build every part from the config: weights from cfg.base / cfg.image_encoder_weights, or seeded random."""
    visual, pre, spec = builders.open_clip_visual(cfg)
    size = pre.get("size", 224)
    image_encoder = SubjectImageEncoder(
        **spec,
        image_mean=tuple(pre["mean"]),
        image_std=tuple(pre["std"]),
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        visual=visual,
    )
    text_encoder = builders.text_encoder(cfg)
    unet = widen_unet(builders.base_unet(cfg), cfg, image_encoder.token_dim, image_encoder.n_tokens)
    with builders.seeded(cfg.seed + 5):
        text_mlp = TextMLP(image_encoder.cls_dim, text_encoder.config.hidden_size, cfg.text_mlp_hidden, cfg.mlp)
    model = SubjectDiffusion(cfg, unet, text_encoder, text_mlp)
    vae = builders.vae(cfg).requires_grad_(False).eval()
    return Parts(model, vae, image_encoder, builders.noise_scheduler(cfg), cfg)


def read_export_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    meta = json.loads((Path(directory) / "config.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{directory}: not a {EXPORT_FORMAT} export (format={meta.get('format')!r})")
    return ModelConfig.from_dict(meta["model"]), meta


def load_pretrained(directory: str | os.PathLike, **overrides: Any) -> Parts:
    """Rebuild the parts from an export folder (`save_pretrained`). overrides replace ModelConfig fields, e.g.
    base="/models/sd2-base" when the base checkpoint lives elsewhere on this machine."""
    from safetensors.torch import load_file

    cfg, _ = read_export_config(directory)
    cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    parts = build(cfg)
    state = load_file(str(Path(directory) / "model.safetensors"))
    missing, unexpected = parts.model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{directory}: weights the model does not have: {unexpected[:5]}")
    frozen = Path(directory) / "frozen.safetensors"
    if frozen.exists():
        fz = load_file(str(frozen))
        parts.vae.load_state_dict({k[4:]: v for k, v in fz.items() if k.startswith("vae.")})
        parts.image_encoder.load_state_dict({k[14:]: v for k, v in fz.items() if k.startswith("image_encoder.")})
    return parts
