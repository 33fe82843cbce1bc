"""The new networks of Subject-Diffusion: the grounding network (dense condition) and the text-side MLP."""

from __future__ import annotations

import torch
from torch import nn


def fourier_embed_xyxy(boxes: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """boxes: (..., 4) xyxy normalized to [0, 1] -> (..., 8 * n_freqs) sin/cos features (GLIGEN's embedding),
    in the boxes' dtype. Computed in float32: in bf16 / fp16, x * 100 keeps 2-3 significant digits and its sine
    is noise."""
    freqs = 100 ** (torch.arange(n_freqs, device=boxes.device, dtype=torch.float32) / n_freqs)
    x = boxes.float().unsqueeze(-1) * freqs  # (..., 4, F)
    emb = torch.stack((x.sin(), x.cos()), dim=-1)  # (..., 4, F, 2)
    return emb.transpose(-3, -2).flatten(-3).to(boxes.dtype)  # (..., F, 4, 2) -> (..., 8F), GLIGEN's order


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_hidden), nn.SiLU(),
                         nn.Linear(d_hidden, d_out))


class GroundingNet(nn.Module):
    """Dense subject condition (paper, Method: dense image control): each subject's open_clip patch tokens,
    each concatenated with the Fourier embedding of the subject's box, through an MLP, give the grounding
    tokens that the gated self-attention adapters attend to. Absent (or CFG-dropped) subjects use learned
    null features.

    It replaces diffusers' `unet.position_net`, so the UNet calls it with the `gligen` cross-attention kwargs.
    """

    def __init__(self, token_dim: int, out_dim: int, hidden: int, fourier_freqs: int = 8):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        pos_dim = 8 * fourier_freqs
        self.mlp = mlp(token_dim + pos_dim, hidden, out_dim)
        self.null_token_feature = nn.Parameter(torch.zeros(token_dim))
        self.null_position_feature = nn.Parameter(torch.zeros(pos_dim))

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens: (B, N, T, Dv) patch tokens; boxes: (B, N, 4) xyxy in [0, 1]; mask: (B, N), 1 = subject present,
        0 = use the null features. Returns (B, N * T, out_dim)."""
        b, n, t, _ = tokens.shape
        m = mask.to(tokens.dtype)[:, :, None, None]
        tokens = tokens * m + (1 - m) * self.null_token_feature.to(tokens.dtype)
        pos = fourier_embed_xyxy(boxes, self.fourier_freqs).to(tokens.dtype)[:, :, None]  # (B, N, 1, P)
        pos = pos * m + (1 - m) * self.null_position_feature.to(tokens.dtype)
        x = torch.cat([tokens, pos.expand(b, n, t, pos.shape[-1])], dim=-1)
        return self.mlp(x).reshape(b, n * t, -1)


class TextMLP(nn.Module):
    """Text-side condition (paper, Method: fusion of text and image semantics): the subject image's CLS
    embedding -> a word embedding that replaces the placeholder token's embedding at the text encoder's input."""

    def __init__(self, cls_dim: int, word_dim: int, hidden: int):
        super().__init__()
        self.mlp = mlp(cls_dim, hidden, word_dim)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """cls: (..., Dc) -> (..., word_dim)."""
        return self.mlp(cls)
