"""The location channel (paper, Method: location control): the one box-union map, for training and inference.

Polarity: this project's map is 1 inside the boxes and 0 elsewhere; "no location" (dropped for classifier-free
guidance, and the unconditional branch) is all zeros. The reference code's map is the opposite (0 inside the
boxes, 1 outside, `custom_dataset.py` / `train.py::mask_font`), and its dropped map is also all zeros, which
there means "a box over the whole image": the null location is indistinguishable from a full-frame subject.
With 1 inside, the null input (zeros) is exactly "no box anywhere". Reference checkpoints therefore do not run
unchanged in this convention.
"""

from __future__ import annotations

import torch


def location_map(boxes: torch.Tensor, present: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """boxes: (B, N, 4) xyxy normalized to [0, 1]; present: (B, N) bool -> (B, 1, h, w) float, 1 on the cells
    whose centres lie inside a present box, 0 elsewhere."""
    ys = (torch.arange(h, device=boxes.device) + 0.5) / h
    xs = (torch.arange(w, device=boxes.device) + 0.5) / w
    b = boxes[..., None, None]  # (B, N, 4, 1, 1)
    inside = (xs >= b[:, :, 0]) & (xs <= b[:, :, 2]) & (ys[:, None] >= b[:, :, 1]) & (ys[:, None] <= b[:, :, 3])
    return (inside & present.bool()[..., None, None]).any(1, keepdim=True).float()
