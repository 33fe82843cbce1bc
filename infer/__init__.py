"""infer app: generation and evaluation with a trained Subject-Diffusion model (docs/inference.md).

    pipeline.Pipeline.load(path, weights) / .generate(prompt, [subjects.Subject(...)], num_images, seed, sampling)
    subjects.SubjectCutter       SAM or user-mask cut-outs on white (training's convention)
    outputs.save                 PNG + JSON per image, optional box overlay
    metrics.Scorer               DINO, CLIP-I, CLIP-T (DreamBooth's definitions)
    dreambench.evaluate          the DreamBench protocol -> CSVs + summary
    cli.register                 `subjectdiff generate`, `subjectdiff eval dreambench`, `subjectdiff export`

Imports the model package only (never train/ or datagen/); torch loads when a command runs.
"""
