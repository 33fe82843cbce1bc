"""Ground stage: GroundingDINO boxes for the caption's nouns (Subject-Diffusion's data recipe).

Adds `detections`: [{"box": [x0, y0, x1, y1] normalized xyxy, "score": float, "noun": index into
item["nouns"]}], best first, and `ground_prompt` (the text GroundingDINO saw). The prompt is the nouns
joined GroundingDINO-style ("astronaut . helmet . flag ."); each query is mapped back to the noun it
grounds through the token positive map (which prompt tokens belong to which noun, from the tokenizer's
character offsets), never by string search over decoded tokens. Then class-agnostic NMS.

groundingdino-py 0.4.0 expands the text self-attention mask head-major (`mask.repeat(nhead, 1, 1)`) where
nn.MultiheadAttention wants batch-major, so a batch of different prompts mixes masks across images. We fix
it at runtime by switching those layers of *our* model instance to `BatchMajorTextLayer` (the installed
package is never edited); batched results then equal one-image-at-a-time results.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import nms

from subjectdiff.catalogs.boxes import cxcywh_norm_to_xyxy_norm
from subjectdiff.datagen.config import GroundConfig
from subjectdiff.datagen.stages.architectures import build_groundingdino
from subjectdiff.datagen.stages.common import Item, chunks, fail, live, pick_device, pick_dtype
from subjectdiff.weights import Checkpoint, WeightsError, resolve

log = logging.getLogger(__name__)

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- model and its fix


def _batch_major_text_layer_cls():
    from groundingdino.models.GroundingDINO.transformer_vanilla import TransformerEncoderLayer

    class BatchMajorTextLayer(TransformerEncoderLayer):
        """groundingdino's text-enhancer layer with the (bs, T, T) attention mask expanded batch-major.

        nn.MultiheadAttention reads a 3-D mask as (bs * nhead, T, T) with index b * nhead + h; upstream's
        `repeat(nhead, 1, 1)` builds index h * bs + b, giving image b the mask of another image.
        """

        def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
            if src_mask is not None and src_mask.dim() == 3 and src_mask.shape[0] == src.shape[1]:
                src_mask = src_mask.repeat_interleave(self.nhead, dim=0)
            q = k = self.with_pos_embed(src, pos)
            src2 = self.self_attn(q, k, value=src, attn_mask=src_mask)[0]
            src = self.norm1(src + self.dropout1(src2))
            src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
            return self.norm2(src + self.dropout2(src2))

    return BatchMajorTextLayer


def fix_text_mask_batching(model: torch.nn.Module) -> int:
    """Switch every text self-attention layer of `model` to BatchMajorTextLayer; returns how many."""
    from groundingdino.models.GroundingDINO.transformer_vanilla import TransformerEncoderLayer

    fixed_cls = _batch_major_text_layer_cls()
    n = 0
    for m in model.modules():
        if type(m) is TransformerEncoderLayer:
            m.__class__ = fixed_cls
            n += 1
    return n


def text_encoder_spec(cfg: GroundConfig, *, download: bool = True) -> str:
    """The text encoder the grounder loads: cfg.text_encoder, else its config file's `text_encoder_type`."""
    if cfg.text_encoder:
        return cfg.text_encoder
    from groundingdino.util.slconfig import SLConfig

    return SLConfig.fromfile(str(resolve(cfg.config_file, download=download))).text_encoder_type


def checkpoints(cfg: GroundConfig, download: bool = False) -> list[Checkpoint]:
    """The config file, the `{"model": state_dict}` checkpoint and the text encoder the grounder loads (named
    in the config file unless cfg.text_encoder is set: with DOWNLOAD the file is fetched to read it); its
    registry entry's checkpoints."""
    out = [Checkpoint("ground.config_file", cfg.config_file), Checkpoint("ground.checkpoint", cfg.checkpoint)]
    try:
        text_encoder = text_encoder_spec(cfg, download=download)
    except WeightsError:  # the config file is not here (a URL never fetched): only an explicit one is known
        if download:
            raise
        text_encoder = cfg.text_encoder
    if text_encoder:
        out.append(Checkpoint("ground.text_encoder", text_encoder, text_encoder=True))
    return out


def describe(cfg: GroundConfig, entries: dict[str, dict]) -> dict:
    """The run manifest's `models.ground`, from the manifest ENTRIES of its checkpoints."""
    out = {"config": entries["ground.config_file"], "checkpoint": entries["ground.checkpoint"]}
    if "ground.text_encoder" in entries:
        out["text_encoder"] = entries["ground.text_encoder"]
    return out


def _load_checkpoint(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickles with non-tensor objects; the official files come from a trusted release
        log.warning("%s: not loadable with weights_only=True, loading it as a full pickle", path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: expected GroundingDINO's checkpoint format {{'model': state_dict}}")
    return ckpt["model"]


def load_groundingdino(cfg: GroundConfig) -> torch.nn.Module:
    """Config file + `{"model": state_dict}` checkpoint -> eval model with the batching fix installed."""
    from groundingdino.util.misc import clean_state_dict

    model = build_groundingdino(resolve(cfg.config_file), cfg.text_encoder)
    state = clean_state_dict(_load_checkpoint(resolve(cfg.checkpoint)))
    result = model.load_state_dict(state, strict=False)
    # Official checkpoints lack a few buffers (e.g. BERT position_ids); a wrong architecture misses most.
    if result.unexpected_keys or len(result.missing_keys) > 0.1 * len(model.state_dict()):
        raise ValueError(
            f"{cfg.checkpoint} does not match {cfg.config_file}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}), unexpected {result.unexpected_keys[:3]}"
        )
    if result.missing_keys:
        log.info("GroundingDINO: %d keys not in the checkpoint: %s", len(result.missing_keys), result.missing_keys)
    fix_text_mask_batching(model)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------- prompt and posmap


def build_prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """("astronaut . flag .", [(0, 9), (12, 16)]): GroundingDINO's ' . '-separated prompt and each phrase's span."""
    parts, spans, pos = [], [], 0
    for p in phrases:
        p = " ".join(p.lower().split())
        spans.append((pos, pos + len(p)))
        parts.append(p)
        pos += len(p) + 3  # " . "
    return " . ".join(parts) + " .", spans


def positive_map(tokenizer, prompt: str, spans: list[tuple[int, int]], max_len: int = 256) -> torch.Tensor:
    """(N, max_len) bool: token j of the tokenized prompt belongs to phrase i (by character offsets)."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    pm = torch.zeros(len(spans), max_len, dtype=torch.bool)
    for j, (s, e) in enumerate(enc["offset_mapping"][:max_len]):
        if e <= s:  # special tokens have (0, 0)
            continue
        for i, (ps, pe) in enumerate(spans):
            if s >= ps and e <= pe:
                pm[i, j] = True
    return pm


def select_detections(
    probs: torch.Tensor, boxes_cxcywh: torch.Tensor, posmap: torch.Tensor, cfg: GroundConfig
) -> list[dict]:
    """One image's queries -> detections.

    probs: (Q, 256) sigmoid token probabilities; boxes_cxcywh: (Q, 4) normalized; posmap: (N, 256) bool.
    A query's score is its best probability over the nouns' tokens (box threshold); it grounds the noun
    whose tokens pass the text threshold with the highest mean probability. Class-agnostic NMS follows.
    """
    n = posmap.shape[0]
    pm = posmap.to(probs.dtype)
    masked = probs[:, None, :].masked_fill(~posmap[None], 0.0)  # (Q, N, 256)
    noun_max = masked.amax(-1)  # (Q, N)
    noun_mean = (probs @ pm.T) / pm.sum(-1).clamp(min=1)  # (Q, N)
    score = noun_max.amax(-1)
    passes = noun_max > cfg.text_threshold
    noun = noun_mean.masked_fill(~passes, -1.0).argmax(-1)
    keep = (score > cfg.box_threshold) & passes.any(-1)
    if not keep.any() or n == 0:
        return []
    boxes = cxcywh_norm_to_xyxy_norm(boxes_cxcywh[keep].float())
    score, noun = score[keep].float(), noun[keep]
    order = nms(boxes, score, cfg.nms_iou)[: cfg.max_detections]
    return [{"box": [float(v) for v in boxes[k]], "score": float(score[k]), "noun": int(noun[k])} for k in order]


# ------------------------------------------------------------------------------------------------ stage


class Grounder:
    """Loads GroundingDINO once; `__call__(items)` adds `detections` to every live item."""

    stage = "ground"

    def __init__(self, cfg: GroundConfig, model: torch.nn.Module | None = None):
        """model: an already built GroundingDINO (benchmarks with random weights); else loaded from cfg."""
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        # The dtype the forward runs in: half precision is autocast, on CUDA only (CPU autocast is slow or
        # unsupported for these ops), so on CPU it is fp32 whatever cfg.dtype says.
        self.dtype = pick_dtype(cfg.dtype, self.device) if self.device.type == "cuda" else torch.float32
        if model is not None:
            fix_text_mask_batching(model)
        self.model = (model if model is not None else load_groundingdino(cfg)).eval().to(self.device)
        self.tokenizer = self.model.tokenizer
        self.max_text_len = self.model.max_text_len

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) normalized float, resized as cfg.resize says."""
        import torchvision.transforms.functional as F
        from groundingdino.datasets.transforms import resize

        pil = Image.fromarray(image)
        if self.cfg.resize == "square":
            pil = pil.resize((self.cfg.short_side, self.cfg.short_side), Image.BILINEAR)
        else:
            pil, _ = resize(pil, None, self.cfg.short_side, self.cfg.max_side)
        return F.normalize(F.to_tensor(pil), IMAGE_MEAN, IMAGE_STD)

    def prompt_for(self, nouns: list[dict]) -> tuple[str, torch.Tensor]:
        phrases = [n["phrase"] if self.cfg.prompt_from == "phrase" else n["label"] for n in nouns]
        prompt, spans = build_prompt(phrases)
        return prompt, positive_map(self.tokenizer, prompt, spans, self.max_text_len)

    @torch.inference_mode()
    def forward(self, tensors: list[torch.Tensor], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Same-shape images and their prompts -> (B, Q, 256) token probabilities, (B, Q, 4) cxcywh boxes."""
        x = torch.stack(tensors).to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(x, captions=prompts)
        return out["pred_logits"].float().sigmoid().cpu(), out["pred_boxes"].float().cpu()

    def detect(self, images: list[np.ndarray], nouns: list[list[dict]]) -> list[tuple[str, list[dict]]]:
        """(prompt, detections) per image. Images whose processed shapes match share a forward
        (batch_size at a time). Images of other shapes are not padded into one batch: GroundingDINO takes
        padded batches (a NestedTensor with a padding mask, as in training), but its Swin backbone has no
        padding mask, so the padding changes every padded image's features and detections (see GroundConfig)."""
        tensors = [self.preprocess(im) for im in images]
        prompts, posmaps = zip(*[self.prompt_for(n) for n in nouns]) if images else ((), ())
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        results: list = [None] * len(images)
        for idx in groups.values():
            for batch in chunks(idx, self.cfg.batch_size):
                probs, boxes = self.forward([tensors[i] for i in batch], [prompts[i] for i in batch])
                for b, i in enumerate(batch):
                    results[i] = (prompts[i], select_detections(probs[b], boxes[b], posmaps[i], self.cfg))
        return results

    def __call__(self, items: list[Item]) -> list[Item]:
        idx = [i for i in live(items) if items[i].get("nouns")]
        for i in live(items):
            if not items[i].get("nouns"):
                fail(items[i], "ground", "no nouns to ground")
        results = self.detect([items[i]["image"] for i in idx], [items[i]["nouns"] for i in idx])
        for i, (prompt, dets) in zip(idx, results):
            items[i]["ground_prompt"] = prompt
            items[i]["detections"] = dets
            if not dets:
                fail(items[i], "ground", f"no detection above box threshold {self.cfg.box_threshold}")
        return items
