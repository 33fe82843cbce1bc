"""The one SAM loader, shared by datagen (the segment stage) and infer (subject cut-outs).

It lives here, in the library package both already import (datagen for `subjectdiff.overrides`, infer for
`subjectdiff.model`), because neither app may import the other and `catalogs/` holds no models. SAM is not part
of the Subject-Diffusion model, so it sits beside `subjectdiff/model/`, not in it.

    sam = load_sam("sam_vit_h_4b8939.pth")            # encoder size read off the file ("auto")
    sam = load_sam(path, "vit_b")                      # or checked against an official variant
    sam = load_sam("s3://models/sam_vit_h.pth#sha256=a7bf...")   # any subjectdiff.weights spec, cached, verified

Checkpoints are segment-anything's official state-dict files; test-size checkpoints (any encoder width and depth)
load through the same path.
"""

from __future__ import annotations

import os

from subjectdiff.weights import resolve

# segment-anything's registry, as encoder sizes (build_sam.py); prompt encoder and decoder are shared.
SAM_ARCHS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
}


def build_sam(encoder: dict):
    """A random-weight SAM with the given ViT encoder sizes (segment-anything's own assembly)."""
    from segment_anything.build_sam import _build_sam

    return _build_sam(
        encoder_embed_dim=encoder["embed_dim"],
        encoder_depth=encoder["depth"],
        encoder_num_heads=encoder["num_heads"],
        encoder_global_attn_indexes=list(encoder["global_attn_indexes"]),
        checkpoint=None,
    )


def arch_from_state_dict(state: dict) -> dict:
    """Encoder sizes read off a SAM state dict: width from the patch embedding, depth from the blocks,
    heads from the relative-position tables (head_dim wide), global blocks from their 127-row tables
    (2 * 64 - 1 positions at 1024 px; windowed blocks have 2 * 14 - 1)."""
    embed_dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    head_dim = state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    glob = [i for i in range(depth) if state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 127]
    return dict(embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim, global_attn_indexes=tuple(glob))


def load_sam(checkpoint: str | os.PathLike, model_type: str = "auto"):
    """An official SAM state-dict checkpoint -> eval Sam without gradients. checkpoint: anything
    `subjectdiff.weights.resolve` takes (a local path, an https:// or s3:// URL with an optional #sha256=, file://,
    hf://), fetched into the cache and verified. model_type "auto" reads the encoder size off the file;
    "vit_h" / "vit_l" / "vit_b" also checks that the file holds it."""
    import torch

    if model_type != "auto" and model_type not in SAM_ARCHS:
        raise ValueError(f"SAM model_type must be one of {tuple(SAM_ARCHS)} or 'auto', got {model_type!r}")
    state = torch.load(resolve(os.fspath(checkpoint)), map_location="cpu", weights_only=True)
    found = arch_from_state_dict(state)
    if model_type != "auto" and SAM_ARCHS[model_type] != found:
        raise ValueError(
            f"{checkpoint} holds a SAM image encoder {found}, not {model_type}; set the SAM "
            "model_type to match the checkpoint (or 'auto')"
        )
    sam = build_sam(found)
    sam.load_state_dict(state)
    return sam.eval().requires_grad_(False)
