"""The datagen model stages. Each is a class that loads its model once in `__init__(cfg)` and maps a batch
of items in `__call__(items) -> items`, so Ray can host it as an actor and a test can call it directly.
Each is described once in `registry.STAGES` (datagen/stages/registry.py), which names its class by path
("subjectdiff.datagen.stages.ground:Grounder"): a stage's module, and its model package, are imported only
where the stage runs.

An item is a dict: `key`, `source`, `image_bytes` (original encoding), `image` ((H, W, 3) uint8 RGB),
optional `alt_text`; each stage adds its fields. A failed item carries `failure = {"stage", "reason"}`
and every later stage passes it through untouched. See docs/datagen.md.
"""
