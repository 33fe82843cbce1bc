"""Model architectures the stages load, built without any stage's settings: GroundingDINO from its python
config file, and the LAION aesthetic head's MLP. The stages load checkpoints into them; datagen/tiny.py saves
random ones in the official formats. They live below both, so that tiny.py (which config.py's tiny preset
calls) never imports a stage module, and no stage module imports tiny.py.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from subjectdiff.weights import resolve_text_encoder


def build_groundingdino(config_file: str | Path, text_encoder: str | None = None) -> torch.nn.Module:
    """A random-weight GroundingDINO from its python config (what the official `load_model` builds).

    text_encoder overrides the config's `text_encoder_type`. Either is a BERT folder or a hub id; an id is
    resolved to its snapshot in our cache first (`weights.resolve_text_encoder`), because groundingdino-py
    would hand it to `from_pretrained`, which downloads into the default Hugging Face cache.
    """
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config_file))
    args.device = "cpu"
    args.text_encoder_type = str(resolve_text_encoder(text_encoder or args.text_encoder_type))
    with contextlib.redirect_stdout(io.StringIO()):  # groundingdino prints the text encoder it loads
        model = build_model(args)
    return model.eval()


class AestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (christophschuhmann/improved-aesthetic-predictor, `MLP` in
    simple_inference.py), the layout of sac+logos+ava1-l14-linearMSE.pth: no activations, dropouts at
    indices 1, 3, 5. relu=True is the layout of its ReLU variant (ava+logos-l14-reluMSE.pth: a ReLU after
    every hidden layer, the Linear layers at 0, 3, 6, 9, 11). Input (N, in_features) normalized embeddings,
    output (N, 1) scores."""

    def __init__(self, in_features: int = 768, relu: bool = False):
        super().__init__()
        act = [torch.nn.ReLU()] if relu else []
        L = torch.nn.Linear
        self.layers = torch.nn.Sequential(
            L(in_features, 1024),
            *act,
            torch.nn.Dropout(0.2),
            L(1024, 128),
            *act,
            torch.nn.Dropout(0.2),
            L(128, 64),
            *act,
            torch.nn.Dropout(0.1),
            L(64, 16),
            *act,
            L(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
