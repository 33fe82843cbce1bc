"""SAM's image-encoder attention on `F.scaled_dot_product_attention`, with no mask (the segment stage's
`attention = "sdpa"`; benchmarks/stages.py --sam-levers times it).

segment-anything's `Attention.forward` builds the (B * heads, HW, HW) score matrix, adds the decomposed
relative-position bias (MViTv2: rel_h[q, row(k)] + rel_w[q, col(k)], `add_decomposed_rel_pos`) and softmaxes it,
so a global block of ViT-H (64 x 64 tokens) materialises 16 heads x 4096 x 4096 scores per image. Passing the
bias to SDPA as a dense additive mask still reads such a tensor and rules out the flash kernel. Here the bias is
folded into the dot product instead:

    q' = [q * scale, rel_h(q), rel_w(q)]         rel_h = q . Rh  (HW, h),  rel_w = q . Rw  (HW, w)
    k' = [k, onehot(row(k)), onehot(col(k))]     onehot rows (HW, h), onehot columns (HW, w)
    q' . k' = scale * q . k + rel_h[q, row(k)] + rel_w[q, col(k)]

which is exactly eager's pre-softmax score, so SDPA runs with scale=1 and no mask. Fused kernels want equal head
dims for q, k and v, so v is zero-padded to q' 's width (and all three to a multiple of 8) and the output sliced
back. The extra width is h + w: ViT-H's head dim 80 becomes 208 in a global block (flash's limit is 256) and 112
in a 14 x 14 window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from subjectdiff.datagen.config import SAM_ATTENTIONS


def fold_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, heads, h * w, d), tokens row-major over SIZE = (h, w) -> q', k' (B, heads, h * w, d + h + w) with
    q' . k' = scale * q . k + rel_h[q, row(k)] + rel_w[q, col(k)]: eager's score after add_decomposed_rel_pos
    (queries and keys of the same size, as in SAM's encoder). The bias comes from the unscaled q, as in eager."""
    h, w = size
    r_q = q.reshape(*q.shape[:2], h, w, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, get_rel_pos(h, h, rel_pos_h)).flatten(2, 3)  # (B, heads, hw, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, get_rel_pos(w, w, rel_pos_w)).flatten(2, 3)  # (B, heads, hw, w)
    token = torch.arange(h * w, device=k.device)
    onehots = torch.cat([F.one_hot(token // w, h), F.one_hot(token % w, w)], -1).to(k.dtype)  # (hw, h + w)
    k2 = torch.cat([k, onehots.expand(*k.shape[:2], -1, -1)], -1)
    return torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], -1), k2


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of q, k (B, heads, L, D) and v (B, heads, L, d <= D), every head dim zero-padded to max(D, d) rounded
    up to a multiple of 8 (fused kernels want equal head dims; zeros add nothing to q . k nor to the output's
    first d channels) -> (B, heads, L, d)."""
    dim = -(-max(q.shape[-1], v.shape[-1]) // 8) * 8
    q, k, v2 = (F.pad(t, (0, dim - t.shape[-1])) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v2, scale=scale)[..., : v.shape[-1]]


class SdpaAttention(Attention):
    """segment-anything's image-encoder Attention (same parameters, same state dict) whose forward runs one
    maskless `scaled_dot_product_attention`, the rel-pos bias folded into q and k. x: (B, H, W, C) -> (B, H, W, C);
    windowed blocks see (B * windows, 14, 14, C), global ones (B, 64, 64, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, H * W, head_dim): 4-d, as the fused kernels require
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rel_pos:
            q, k = fold_rel_pos(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
            out = padded_sdpa(q, k, v, scale=1.0)  # the scale is folded into q' too
        else:
            out = padded_sdpa(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def set_attention(encoder: torch.nn.Module, attention: str) -> None:
    """Every Attention block of ENCODER (a SAM ImageEncoderViT) on ATTENTION: "eager" (segment-anything's own
    forward) or "sdpa" (SdpaAttention). Swaps the blocks' class in place: parameters, state dict and outputs
    (to float rounding) are unchanged, so it can be turned on and off on a loaded model."""
    if attention not in SAM_ATTENTIONS:
        raise ValueError(f"SAM attention {attention!r}: use one of {SAM_ATTENTIONS}")
    cls = SdpaAttention if attention == "sdpa" else Attention
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = cls
