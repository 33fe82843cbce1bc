"""Caption stage: BLIP (default Salesforce/blip-image-captioning-large) or BLIP-2, batched `generate`.

Adds `caption` (str) to each item; the source's own caption stays in `alt_text`. An empty caption is a
failure at stage "caption".
"""

from __future__ import annotations

import re

import numpy as np
import torch

from subjectdiff.datagen.config import CaptionConfig
from subjectdiff.datagen.stages.common import Item, chunks, fail, live, pick_device, pick_dtype
from subjectdiff.weights import Checkpoint, cache_dir, is_hub_id, resolve


def load_captioner(cfg: CaptionConfig, device: torch.device, dtype: torch.dtype):
    """(model, processor) from a hub id or a `save_pretrained` folder, the same call for both."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration, BlipProcessor

    where = cfg.model if is_hub_id(cfg.model) else str(resolve(cfg.model))
    kw = {"cache_dir": str(cache_dir() / "hf")}
    if cfg.kind == "blip":
        model = BlipForConditionalGeneration.from_pretrained(where, dtype=dtype, **kw)
        processor = BlipProcessor.from_pretrained(where, use_fast=False, **kw)
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(where, dtype=dtype, **kw)
        processor = AutoProcessor.from_pretrained(where, use_fast=False, **kw)
    return model.to(device).eval().requires_grad_(False), processor


def checkpoints(cfg: CaptionConfig, download: bool = False) -> list[Checkpoint]:
    """The captioner's model (a hub id or a `save_pretrained` folder); its registry entry's checkpoints."""
    return [Checkpoint("caption.model", cfg.model)]


def describe(cfg: CaptionConfig, entries: dict[str, dict]) -> dict:
    """The run manifest's `models.caption`, from the manifest ENTRIES of its checkpoints."""
    return {"kind": cfg.kind, **entries["caption.model"]}


def clean_caption(text: str) -> str:
    """Collapse whitespace; drop a space before punctuation that WordPiece decoding leaves ("cat ." -> "cat.")."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([.,!?;:])", r"\1", text)


class Captioner:
    """Loads the captioner once; `__call__(items)` adds `caption` to every live item."""

    stage = "caption"

    def __init__(self, cfg: CaptionConfig, model=None, processor=None):
        """model, processor: already built (benchmarks with random weights); else loaded from cfg.model."""
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if model is None:
            self.model, self.processor = load_captioner(cfg, self.device, self.dtype)
        else:
            self.model, self.processor = model.to(self.device, self.dtype).eval().requires_grad_(False), processor

    def generate_kwargs(self) -> dict:
        c = self.cfg
        kw = dict(
            max_new_tokens=c.max_new_tokens, min_new_tokens=c.min_new_tokens, num_beams=c.num_beams, do_sample=False
        )
        if c.repetition_penalty != 1.0:
            kw["repetition_penalty"] = c.repetition_penalty
        if c.no_repeat_ngram_size:
            kw["no_repeat_ngram_size"] = c.no_repeat_ngram_size
        return kw

    @torch.inference_mode()
    def caption_images(self, images: list[np.ndarray]) -> list[str]:
        """(H, W, 3) uint8 RGB images -> one caption each, `batch_size` images per generate call."""
        out: list[str] = []
        for batch in chunks(images, self.cfg.batch_size):
            text = [self.cfg.prompt] * len(batch) if self.cfg.prompt else None
            # Items are always (H, W, 3). Without input_data_format the processor guesses the layout from the
            # first image, reads a (1, W, 3) or (3, W, 3) image as channels-first and fails the whole batch.
            inputs = self.processor(
                images=list(batch), text=text, return_tensors="pt", input_data_format="channels_last"
            ).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            ids = self.model.generate(**inputs, **self.generate_kwargs())
            out += [clean_caption(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    def __call__(self, items: list[Item]) -> list[Item]:
        idx = live(items)
        captions = self.caption_images([items[i]["image"] for i in idx]) if idx else []
        for i, caption in zip(idx, captions):
            items[i]["caption"] = caption
            items[i].setdefault("extra", {})["caption_model"] = self.cfg.model
            if not caption:
                fail(items[i], "caption", "empty caption")
        return items
