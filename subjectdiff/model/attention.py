"""Cross-attention maps of the subject tokens, and the localization loss on them
(paper, Method: cross-attention map control).

A `CaptureProcessor` replaces the processor of each selected cross-attention layer (attn2). When the
`AttentionStore` holds per-subject token weights (B, N, L), the processor computes attention probabilities
explicitly and records, per subject, the head-averaged map over image positions weighted by the subject's
tokens: (B, N, HW). Without token weights it runs plain scaled-dot-product attention (inference speed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


class AttentionStore:
    """Shared by the capture processors of one model.

    token_weights: (B, N, L) float, each subject's weights over text tokens (rows sum to 1, or 0 when absent);
        None disables capture. It stays set until the next forward, so that gradient checkpointing recomputes
        the same graph in backward.
    recording: whether maps are appended to `maps` (on during the model's forward only).
    maps: list of (B, N, HW) tensors, one per captured layer call.
    """

    def __init__(self) -> None:
        self.token_weights: torch.Tensor | None = None
        self.recording = False
        self.maps: list[torch.Tensor] = []

    def arm(self, token_weights: torch.Tensor | None) -> None:
        self.token_weights = token_weights
        self.maps = []
        self.recording = token_weights is not None


class CaptureProcessor:
    """Cross-attention processor that records subject-token attention maps into an AttentionStore."""

    def __init__(self, store: AttentionStore):
        self.store = store
        self.fast = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        w = self.store.token_weights
        if w is None or encoder_hidden_states is None or hidden_states.ndim != 3:
            return self.fast(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        b = hidden_states.shape[0]
        if w.shape[0] != b:
            raise ValueError(f"token weights are for batch {w.shape[0]}, the UNet runs batch {b}")
        ctx = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(ctx))
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], b)
        probs = attn.get_attention_scores(q, k, mask)  # (B * heads, HW, L)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor
        heads_mean = probs.reshape(b, -1, *probs.shape[1:]).mean(1)  # (B, HW, L)
        maps = torch.einsum("bql,bnl->bnq", heads_mean, w.to(heads_mean.dtype))
        if self.store.recording:
            self.store.maps.append(maps)
        return out


def token_weights(positions: torch.Tensor, length: int) -> torch.Tensor:
    """positions: (B, N, K) long token positions per subject, -1 = padding -> (B, N, L) weights averaging them."""
    valid = positions >= 0
    onehot = F.one_hot(positions.clamp(min=0), length).float() * valid[..., None]
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    return onehot.sum(-2) / count


LOC_MASKS = ("soft", "binary")
LOC_REDUCE = ("sample", "subject")


def layer_masks(masks: torch.Tensor, hw: int, mode: str = "soft") -> torch.Tensor:
    """masks: (B, N, h, w) object masks in [0, 1] (any resolution with the image's aspect ratio) -> (B, N, hw)
    at a layer of hw positions: "soft" = bilinear with antialiasing (the reference code's), "binary" = area
    average thresholded at 0.5."""
    scale = math.sqrt(masks.shape[-2] * masks.shape[-1] / hw)
    size = (round(masks.shape[-2] / scale), round(masks.shape[-1] / scale))
    if mode == "soft":
        m = F.interpolate(masks.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    else:
        m = (F.interpolate(masks.float(), size=size, mode="area") > 0.5).float()
    return m.flatten(2)


def localization_loss(
    maps: list[torch.Tensor],
    masks: torch.Tensor,
    present: torch.Tensor,
    normalize: bool = False,
    masks_mode: str = "soft",
    reduce: str = "sample",
    eps: float = 1e-5,
) -> torch.Tensor:
    """The attention-map localization loss (paper, Method: cross-attention map control), in the reference code's
    balanced form (FastComposer's BalancedL1Loss): per subject and layer,

        mean(A over the background) - mean(A over the object)      (weighted by the mask M and by 1 - M)

    which is |A - M|'s balanced mean minus 1 for A in [0, 1]: the same gradients, small objects weighing as much
    as large ones. reduce "sample" (the reference's): averaged over each sample's present subjects, then over
    the batch (a sample without present subjects counts as 0); "subject": averaged over all present subjects
    of the batch. Then averaged over layers.

    maps: list of (B, N, HW) with HW = (h / s) * (w / s) for the layer's stride s.
    masks: (B, N, h, w) float object masks at any resolution with the image's aspect ratio.
    present: (B, N) bool/float, subjects that exist (and whose masks count).
    normalize: rescale each map to max 1 first (FastComposer's option; off in the reference).
    """
    if masks_mode not in LOC_MASKS or reduce not in LOC_REDUCE:
        raise ValueError(
            f"localization loss: masks_mode in {LOC_MASKS}, reduce in {LOC_REDUCE}; got {masks_mode!r}, {reduce!r}"
        )
    present = present.float()
    if not maps:
        return masks.new_zeros((), dtype=torch.float32)
    total = 0.0
    for a in maps:
        a = a.float()
        if normalize:
            a = a / (a.amax(-1, keepdim=True) + eps)
        m = layer_masks(masks, a.shape[-1], masks_mode)  # (B, N, HW)
        fg = (a * m).sum(-1) / (m.sum(-1) + eps)
        bg = (a * (1 - m)).sum(-1) / ((1 - m).sum(-1) + eps)
        per_subject = (bg - fg) * present  # (B, N)
        if reduce == "sample":
            total = total + (per_subject.sum(1) / (present.sum(1) + eps)).mean()
        else:
            total = total + per_subject.sum() / present.sum().clamp(min=1)
    return total / len(maps)
