"""Subject-Diffusion: the model's one home (imported by train/ and infer/; imports neither).

Public API:
    ModelConfig, tiny(), sd2_base()          configuration and presets (model.config)
    build(cfg) -> Parts                      build every part (weights from cfg, or seeded random init)
    load_pretrained(dir, **overrides)        rebuild from an export written by Parts/SubjectDiffusion.save_pretrained
    SubjectDiffusion                         encode_text(...), denoise(...), null_subjects(...), forward(...)
    subject_prompt, tokenize                 prompts with placeholders, token ids (model.prompts)
    localization_loss, token_weights         the cross-attention localization loss (model.attention)
    location_map                             the location channel: the union of the boxes (model.location)
    subject_image, SubjectAugment            photo + mask -> the image encoder's input (model.subject_image)
    SamplingConfig, sample_latents, ...      the three-branch sampler (model.sampling)
    SubjectDiffusionPipeline, save_diffusers the model as a diffusers pipeline, its export (model.pipeline;
                                             imported on first use: diffusers' pipelines are slow to import)
"""

from subjectdiff.model.attention import localization_loss, token_weights
from subjectdiff.model.config import PRESETS, TRAINABLE_GROUPS, ModelConfig, sd2_base, tiny
from subjectdiff.model.location import location_map
from subjectdiff.model.prompts import SubjectPrompt, subject_prompt, tokenize
from subjectdiff.model.sampling import SamplingConfig, guide, sample_latents, three_branches
from subjectdiff.model.subject_diffusion import (
    Parts,
    SubjectDiffusion,
    SubjectImageEncoder,
    build,
    load_pretrained,
    read_export_config,
)
from subjectdiff.model.subject_image import SubjectAugment, subject_image

__all__ = [
    "ModelConfig",
    "PRESETS",
    "TRAINABLE_GROUPS",
    "tiny",
    "sd2_base",
    "build",
    "load_pretrained",
    "read_export_config",
    "Parts",
    "SubjectDiffusion",
    "SubjectImageEncoder",
    "SubjectPrompt",
    "subject_prompt",
    "tokenize",
    "localization_loss",
    "token_weights",
    "location_map",
    "subject_image",
    "SubjectAugment",
    "SamplingConfig",
    "guide",
    "sample_latents",
    "three_branches",
    "SubjectDiffusionPipeline",
    "save_diffusers",
]


def __getattr__(name: str):
    if name in ("SubjectDiffusionPipeline", "save_diffusers"):
        # Lazily: diffusers' pipeline machinery costs seconds to import, and training never needs it.
        from subjectdiff.model import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'subjectdiff.model' has no attribute {name!r}")
