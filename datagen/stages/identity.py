"""Identity stage: one embedding per object that says *which instance* it is (DINOv2, default
facebook/dinov2-base through transformers' `Dinov2Model`), for pairing the same subject across images. CLIP's
label score (the curate stage) says what an object shows; DINOv2's self-supervised features tell two mugs of
the same kind apart.

Adds to every live item (failed items pass through; no item fails here):

    identity_embeddings   (n_objects, D) float16 numpy, row j for item["detections"][j] (the record's
                          objects[j]), each L2-normalized; D = the model's hidden size (768 for dinov2-base).
                          None when the model raised on the item even alone (logged): the record then has no rows
                          in the identity sidecar.

The crop: the object's SAM mask through the curate stage's `masked_crop` (its bounding box, every pixel outside
the mask set to the model's mean colour, which normalizes to 0 so the background carries no signal), centred on
a square of that colour with `margin` of the box's longer side added on every side, resized (bicubic) to the
model's input size, normalized with its mean and std. Cropping to the box makes the embedding nearly invariant
to the subject's position and scale in the image. An object whose mask is empty is embedded from its box crop
(the box unmasked, the same square, margin and fill), so the sidecar keeps exactly one row per object.

The embedding is, by `identity.pooling`, `Dinov2Model`'s `pooler_output` ("cls": the CLS token of the last hidden
state after the final layer norm, DINOv2's image-level feature), the mean of its patch tokens ("mean"), or both
concatenated ("cls+mean", twice the hidden size), L2-normalized in float32 and stored as float16. Crops of all
live items of a batch go through the model `batch_size` at a time, on the GPU when there is one, in float16 there.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.boxes import xyxy_norm_to_xyxy_pixels
from subjectdiff.datagen.config import IdentityConfig
from subjectdiff.datagen.stages.common import Item, chunks, live, pick_device
from subjectdiff.datagen.stages.curate import masked_crop
from subjectdiff.weights import Checkpoint, cache_dir, is_hub_id, resolve

log = logging.getLogger(__name__)

_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 224)  # DINOv2's mean, std and crop, without a processor


def checkpoints(cfg: IdentityConfig, download: bool = False) -> list[Checkpoint]:
    """The DINOv2 model (a hub id or a `save_pretrained` folder); its registry entry's checkpoints."""
    return [Checkpoint("identity.model", cfg.model)]


def describe(cfg: IdentityConfig, entries: dict[str, dict]) -> dict:
    """The run manifest's `models.identity`, from the manifest ENTRIES of its checkpoints."""
    return {"pooling": cfg.pooling, "margin": cfg.margin, **entries["identity.model"]}


def pool(out, pooling: str) -> torch.Tensor:
    """A Dinov2Model output -> (N, D) features by POOLING (IdentityConfig.pooling): the CLS token after the final
    norm, the mean patch token, or both concatenated."""
    cls = out.pooler_output
    if pooling == "cls":
        return cls
    mean = out.last_hidden_state[:, 1:].mean(1)  # the patch tokens (DINOv2-base has no register tokens)
    return mean if pooling == "mean" else torch.cat([cls, mean], -1)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto': float16 on a GPU (not common.pick_dtype's bf16: DINOv2 ran in fp16), float32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def load_dinov2(cfg: IdentityConfig, device: torch.device, dtype: torch.dtype):
    """(model, (mean, std, input side)) from a hub id or a `save_pretrained` folder, the same call for both. The
    preprocessing comes from its image processor's config (ImageNet's mean and std at 224 px without one)."""
    from transformers import AutoImageProcessor, Dinov2Model

    where = cfg.model if is_hub_id(cfg.model) else str(resolve(cfg.model))
    kw = {"cache_dir": str(cache_dir() / "hf")}
    model = Dinov2Model.from_pretrained(where, dtype=dtype, **kw)
    try:
        processor = AutoImageProcessor.from_pretrained(where, use_fast=False, **kw)
    except OSError:  # a folder with the model alone
        processor = None
    return model.to(device).eval().requires_grad_(False), preprocessing(processor)


def preprocessing(processor) -> tuple[list[float], list[float], int]:
    """(mean, std, input side) of a transformers image processor (None: DINOv2's own, _IMAGENET)."""
    if processor is None:
        return _IMAGENET
    crop = getattr(processor, "crop_size", None) or {}
    side = crop.get("height") or (getattr(processor, "size", None) or {}).get("shortest_edge") or _IMAGENET[2]
    return list(processor.image_mean), list(processor.image_std), int(side)


def object_crops(item: Item, fill: tuple[int, int, int], margin: float) -> list[np.ndarray]:
    """One (S, S, 3) uint8 crop per detection of ITEM, in detection order: its masked crop, or for an empty (or
    missing) mask its box crop, unmasked (module docstring)."""
    image, masks = item["image"], item.get("masks") or []
    h, w = image.shape[:2]
    crops = []
    for j, det in enumerate(item.get("detections") or []):
        mask = mask_codec.decode(masks[j]) if j < len(masks) else None
        crop = masked_crop(image, mask, fill, margin) if mask is not None else None
        if crop is None:
            crop = masked_crop(image, box_mask(det["box"], w, h), fill, margin)
        crops.append(crop)
    return crops


def box_mask(box, width: int, height: int) -> np.ndarray:
    """(H, W) bool, True inside BOX (xyxy normalized), at least one pixel (a degenerate box keeps its corner)."""
    x0, y0, x1, y1 = xyxy_norm_to_xyxy_pixels(box, width, height)[0]
    x0, y0 = min(int(x0), width - 1), min(int(y0), height - 1)
    x1, y1 = max(int(np.ceil(x1)), x0 + 1), max(int(np.ceil(y1)), y0 + 1)
    m = np.zeros((height, width), bool)
    m[y0:y1, x0:x1] = True
    return m


class Identifier:
    """Loads DINOv2 once; `__call__(items)` adds `identity_embeddings` to every live item."""

    stage = "identity"

    def __init__(self, cfg: IdentityConfig, model=None, processor=None):
        """model, processor: an already built Dinov2Model and its image processor (benchmarks with random
        weights at full size); else loaded from cfg.model."""
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if model is None:
            self.model, (mean, std, self.side) = load_dinov2(cfg, self.device, self.dtype)
        else:
            self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
            mean, std, self.side = preprocessing(processor)
        self.dim = int(self.model.config.hidden_size) * (2 if cfg.pooling == "cls+mean" else 1)
        # the mean colour fills the background: it normalizes to 0, so what is not the subject says nothing
        self.fill = tuple(int(round(255 * m)) for m in mean)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """(S, S, 3) uint8 crops -> (N, D) float32 L2-normalized embeddings (pooled by identity.pooling),
        batch_size crops per forward."""
        out = []
        for batch in chunks(crops, self.cfg.batch_size):
            resized = [np.asarray(Image.fromarray(c).resize((self.side, self.side), Image.BICUBIC)) for c in batch]
            x = torch.from_numpy(np.stack(resized)).to(self.device).permute(0, 3, 1, 2).float() / 255
            x = ((x - self.mean) / self.std).to(self.dtype)
            feats = pool(self.model(pixel_values=x), self.cfg.pooling)
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_objects(self, image: np.ndarray, masks: list[np.ndarray], boxes: list) -> np.ndarray:
        """One image's objects outside the pipeline: image (H, W, 3) uint8, masks [(H, W) bool], boxes [xyxy
        normalized] -> (n_objects, D) float16, as the stage gives them (photo_records.write_photo_shards'
        `identity`)."""
        item = {
            "image": image,
            "masks": [mask_codec.encode(m) for m in masks],
            "detections": [{"box": b} for b in boxes],
        }
        return self._identify([item], [0])[0]["identity_embeddings"]

    def __call__(self, items: list[Item]) -> list[Item]:
        """Every live item's embeddings. The stage never fails a sample: when a batch raises (a GPU out of memory
        on a crowded batch, a model error) it is redone one item at a time, and an item that still raises keeps
        `identity_embeddings` None (logged)."""
        try:
            return self._identify(items, live(items))
        except Exception as e:
            idx = live(items)
            log.warning(
                "identity raised on a batch of %d (%s: %s); redoing it item by item", len(idx), type(e).__name__, e
            )
            for i in idx:
                try:
                    self._identify(items, [i])
                except Exception as e1:
                    log.warning(
                        "identity: %s left without embeddings (%s: %s)", items[i].get("source"), type(e1).__name__, e1
                    )
                    items[i]["identity_embeddings"] = None
            return items

    def _identify(self, items: list[Item], idx: list[int]) -> list[Item]:
        crops = {i: object_crops(items[i], self.fill, self.cfg.margin) for i in idx}
        feats = self.embed([c for i in idx for c in crops[i]])
        at = 0
        for i in idx:
            n = len(crops[i])
            items[i]["identity_embeddings"] = feats[at : at + n].astype(np.float16)
            at += n
        return items
