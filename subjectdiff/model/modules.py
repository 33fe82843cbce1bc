"""The new networks of Subject-Diffusion: the grounding network (dense condition) and the text-side MLP.

Both MLPs default to the reference code's form (`modules.py::MLP`, use_residual=False): LayerNorm -> Linear ->
GELU -> Linear. The input LayerNorm matters: open_clip 3.3 applies `ln_post` to the patch tokens, the open_clip
the reference trained with did not, so the tokens' scale differs between versions and the norm absorbs it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def fourier_embed_xyxy(boxes: torch.Tensor, n_freqs: int, order: str = "gligen") -> torch.Tensor:
    """boxes: (..., 4) xyxy normalized to [0, 1] -> (..., 8 * n_freqs) sin/cos features, in the boxes' dtype.

    order "gligen" (GLIGEN's FourierEmbedder and the reference code's): for each frequency f, sin(f x0..y1)
    then cos(f x0..y1), i.e. (F, 2, 4). "coord-major": for each frequency, each coordinate's sin and cos,
    (F, 4, 2), the layout of this project's first exports. Computed in float32: in bf16 / fp16, x * 100 keeps
    2-3 significant digits and its sine is noise."""
    freqs = 100 ** (torch.arange(n_freqs, device=boxes.device, dtype=torch.float32) / n_freqs)
    x = boxes.float().unsqueeze(-2) * freqs[:, None]  # (..., F, 4)
    emb = torch.stack((x.sin(), x.cos()), dim=-2)  # (..., F, 2, 4)
    if order == "coord-major":
        emb = emb.transpose(-2, -1)  # (..., F, 4, 2)
    return emb.flatten(-3).to(boxes.dtype)


def mlp(d_in: int, d_hidden: int, d_out: int, form: str = "reference") -> nn.Sequential:
    """The MLP of the grounding and text networks: "reference" LayerNorm-Linear-GELU-Linear, or "silu3"."""
    if form == "reference":
        return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))
    return nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out)
    )


class GroundingNet(ModelMixin, ConfigMixin):
    """Dense subject condition (paper, Method: dense image control): each subject's open_clip patch tokens,
    each concatenated with the Fourier embedding of the subject's box, through an MLP, give the grounding
    tokens that the gated self-attention adapters attend to. Absent (or CFG-dropped) subjects use learned
    null features: per token ([T, Dv] and [T, P], the reference's) or one shared vector each.

    It replaces diffusers' `unet.position_net`, so the UNet calls it with the `gligen` cross-attention kwargs.
    A diffusers model (ModelMixin + ConfigMixin): the `grounding` component of `SubjectDiffusionPipeline`.
    """

    @register_to_config
    def __init__(
        self,
        token_dim: int,
        out_dim: int,
        hidden: int,
        fourier_freqs: int = 8,
        n_tokens: int = 256,
        form: str = "reference",
        null_features: str = "per-token",
        fourier_order: str = "gligen",
    ):
        super().__init__()
        self.fourier_freqs, self.fourier_order = fourier_freqs, fourier_order
        pos_dim = 8 * fourier_freqs
        self.mlp = mlp(token_dim + pos_dim, hidden, out_dim, form)
        lead = (n_tokens,) if null_features == "per-token" else ()
        self.null_token_feature = nn.Parameter(torch.zeros(*lead, token_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(*lead, pos_dim))

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, T, Dv) patch tokens; boxes: (B, N, 4) xyxy in [0, 1]; mask: (B, N), 1 = subject present,
        0 = use the null features. Returns (B, N * T, out_dim)."""
        b, n, t, _ = tokens.shape
        m = mask.to(tokens.dtype)[:, :, None, None]
        tokens = tokens * m + (1 - m) * self.null_token_feature.to(tokens.dtype)
        pos = fourier_embed_xyxy(boxes, self.fourier_freqs, self.fourier_order).to(tokens.dtype)[:, :, None]
        pos = pos.expand(b, n, t, pos.shape[-1]) * m + (1 - m) * self.null_position_feature.to(tokens.dtype)
        return self.mlp(torch.cat([tokens, pos], dim=-1)).reshape(b, n * t, -1)


class TextMLP(ModelMixin, ConfigMixin):
    """Text-side condition (paper, Method: fusion of text and image semantics): the subject image's CLS
    embedding -> a word embedding that replaces the placeholder token's embedding at the text encoder's input.
    A diffusers model: the `text_mlp` component of `SubjectDiffusionPipeline`."""

    @register_to_config
    def __init__(self, cls_dim: int, word_dim: int, hidden: int, form: str = "reference"):
        super().__init__()
        self.mlp = mlp(cls_dim, hidden, word_dim, form)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """cls: (..., Dc) -> (..., word_dim)."""
        return self.mlp(cls)
