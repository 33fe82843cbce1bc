"""Segment stage: SAM masks from the grounded boxes (Subject-Diffusion's data recipe: SAM ViT-H).

Adds `masks` (COCO RLE dicts, one per detection, same order) and `mask_scores` (SAM's predicted IoU).
Image encoding runs `batch_size` images per forward; all boxes of one image are decoded in one
`SamPredictor.predict_torch` call. Boxes arrive normalized xyxy and cross to SAM's pixel xyxy through
`xyxy_norm_to_xyxy_pixels`. An image whose masks are all empty fails at stage "segment".
The image encoder runs on `cfg.attention` (sam_attention.py: "sdpa" folds the rel-pos bias into a maskless
SDPA, "eager" is segment-anything's own) and, with `cfg.compile`, under torch.compile.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.boxes import xyxy_norm_to_xyxy_pixels
from subjectdiff.datagen.config import SegmentConfig
from subjectdiff.datagen.stages.common import Item, chunks, fail, live, pick_device, pick_dtype
from subjectdiff.datagen.stages.sam_attention import set_attention
from subjectdiff.sam import SAM_ARCHS, arch_from_state_dict, build_sam  # noqa: F401  (re-exported)
from subjectdiff.sam import load_sam as load_sam_file
from subjectdiff.weights import Checkpoint

log = logging.getLogger(__name__)


def load_sam(cfg: SegmentConfig) -> torch.nn.Module:
    """The segment stage's SAM: cfg.checkpoint resolved (cache, URLs, digests) and loaded by the one shared SAM
    loader (`subjectdiff.sam.load_sam`, which infer uses too); model_type "auto" reads the encoder size off the
    file."""
    return load_sam_file(cfg.checkpoint, cfg.model_type)


def checkpoints(cfg: SegmentConfig, download: bool = False) -> list[Checkpoint]:
    """SAM's state dict; its registry entry's checkpoints."""
    return [Checkpoint("segment.checkpoint", cfg.checkpoint)]


def describe(cfg: SegmentConfig, entries: dict[str, dict]) -> dict:
    """The run manifest's `models.segment`, from the manifest ENTRIES of its checkpoints; the encoder's
    attention and compile settings, since they change the masks by float rounding."""
    return {
        "model_type": cfg.model_type,
        "attention": cfg.attention,
        "compile": cfg.compile,
        **entries["segment.checkpoint"],
    }


class Segmenter:
    """Loads SAM once; `__call__(items)` adds `masks` and `mask_scores` to every live item."""

    stage = "segment"

    def __init__(self, cfg: SegmentConfig, sam: torch.nn.Module | None = None):
        """sam: an already built model (benchmarks at full size with random weights); else cfg.checkpoint.
        Either way its encoder's attention blocks are set to cfg.attention."""
        from segment_anything import SamPredictor
        from segment_anything.utils.transforms import ResizeLongestSide

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        # The dtype SAM runs in: half precision is autocast, on CUDA only, so on CPU it is fp32 whatever
        # cfg.dtype says.
        self.dtype = pick_dtype(cfg.dtype, self.device) if self.device.type == "cuda" else torch.float32
        self.sam = (sam if sam is not None else load_sam(cfg)).eval().to(self.device)
        set_attention(self.sam.image_encoder, cfg.attention)
        # the module encode() calls; the compiled wrapper shares the encoder's parameters, and sam keeps the
        # plain one (SamPredictor, img_size)
        self.encoder = torch.compile(self.sam.image_encoder) if cfg.compile else self.sam.image_encoder
        self.predictor = SamPredictor(self.sam)
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> list[tuple[torch.Tensor, tuple, tuple]]:
        """(H, W, 3) uint8 images -> [(features (256, 64, 64), input_size, original_size)], batched."""
        out = []
        for batch in chunks(images, self.cfg.batch_size):
            xs, sizes = [], []
            for im in batch:
                x = torch.as_tensor(self.transform.apply_image(im), device=self.device).permute(2, 0, 1)
                sizes.append((tuple(x.shape[-2:]), tuple(im.shape[:2])))
                xs.append(self.sam.preprocess(x[None].float())[0])  # normalize, pad to 1024 x 1024
            with self._autocast():
                feats = self.encoder(torch.stack(xs)).float()
            out += [(f, s[0], s[1]) for f, s in zip(feats, sizes)]
        return out

    @torch.inference_mode()
    def decode(
        self, features: torch.Tensor, input_size: tuple, original_size: tuple, boxes_xyxy_norm: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """All boxes of one image in one predict_torch call -> ((N, H, W) bool masks, (N,) predicted IoU)."""
        p = self.predictor
        p.features, p.input_size, p.original_size, p.is_image_set = features[None], input_size, original_size, True
        h, w = original_size
        boxes = torch.as_tensor(
            xyxy_norm_to_xyxy_pixels(boxes_xyxy_norm, w, h), dtype=torch.float32, device=self.device
        )
        with self._autocast():
            masks, iou, _ = p.predict_torch(
                None,
                None,
                boxes=self.transform.apply_boxes_torch(boxes, original_size),
                multimask_output=self.cfg.multimask,
            )
        best = iou.float().argmax(1)  # (N,): index 0 when multimask is off
        rows = torch.arange(len(best), device=best.device)
        masks, iou = masks[rows, best], iou.float()[rows, best]
        p.reset_image()
        return masks.cpu().numpy(), iou.cpu().numpy()

    def __call__(self, items: list[Item]) -> list[Item]:
        idx = []
        for i in live(items):
            if items[i].get("detections"):
                idx.append(i)
            else:
                fail(items[i], "segment", "no boxes to segment")
        encoded = self.encode([items[i]["image"] for i in idx]) if idx else []
        for i, (feat, in_size, orig) in zip(idx, encoded):
            boxes = np.asarray([d["box"] for d in items[i]["detections"]], dtype=np.float64)
            masks, scores = self.decode(feat, in_size, orig, boxes)
            items[i]["masks"] = [mask_codec.encode(m) for m in masks]
            items[i]["mask_scores"] = [float(s) for s in scores]
            if not masks.any():
                fail(items[i], "segment", "every SAM mask is empty")
        return items
