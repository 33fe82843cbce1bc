"""subjectdiff: the Subject-Diffusion model library and the `subjectdiff` command.

The model lives in `subjectdiff.model` (imported by the `train` and `infer` apps); the apps and the
dataset pipeline (`datagen`) talk to each other only through `catalogs`. `subjectdiff.SubjectDiffusionPipeline`
is the model as a diffusers pipeline (`subjectdiff.model.pipeline`), imported on first use.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "SubjectDiffusionPipeline":
        # Lazily: `import subjectdiff` (the command's start) stays free of torch and diffusers.
        from subjectdiff.model.pipeline import SubjectDiffusionPipeline

        return SubjectDiffusionPipeline
    raise AttributeError(f"module 'subjectdiff' has no attribute {name!r}")
