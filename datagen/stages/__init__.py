"""The datagen model stages. Each is a class that loads its model once in `__init__(cfg)` and maps a batch
of items in `__call__(items) -> items`, so Ray can host it as an actor and a test can call it directly.

An item is a dict: `key`, `source`, `image_bytes` (original encoding), `image` ((H, W, 3) uint8 RGB),
optional `alt_text`; each stage adds its fields. A failed item carries `failure = {"stage", "reason"}`
and every later stage passes it through untouched. See docs/datagen.md.

Names are imported lazily: `from subjectdiff.datagen.stages import Grounder` imports groundingdino, nothing else does.
"""

from importlib import import_module

_WHERE = {
    "decode_item": "common", "fail": "common", "failed": "common",
    "Captioner": "caption", "NounExtractor": "nouns", "Grounder": "ground", "Segmenter": "segment",
    "ImageFilter": "filters", "prefilter": "filters", "build_stages": "chain", "run_stages": "chain",
    "Curator": "curate",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'subjectdiff.datagen.stages' has no attribute {name!r}")
    return getattr(import_module(f"subjectdiff.datagen.stages.{_WHERE[name]}"), name)
