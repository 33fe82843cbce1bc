"""subjectdiff: the Subject-Diffusion model library and the `subjectdiff` command.

The model lives in `subjectdiff.model` (imported by the `train` and `infer` apps); the apps and the
dataset pipeline (`datagen`) talk to each other only through `catalogs`.
"""

__version__ = "0.1.0"
