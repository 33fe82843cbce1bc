"""Curate stage: the signals a data team filters on, from one open_clip model (default ViT-L-14, OpenAI weights,
as DataComp's CLIP-score filter and LAION's aesthetic predictor use).

Adds to every live item (failed items pass through untouched; a signal that cannot be measured is None,
never a made-up number, and no item fails here):

    sha256          str, hex SHA-256 of item["image_bytes"] (the record's bytes: the source's, unless decode
                    re-encoded them, see datagen.stages.common.decode_item)
    phash           int, imagehash's 64-bit perceptual hash of the decoded image as a signed int64
                    (`catalogs.hashing.phash_int64`: row-major bits, hash[0, 0] the sign bit)
    clip_embedding  (D,) float16 numpy: the L2-normalized image embedding (D = 768 for ViT-L-14)
    clip_score      float | None: cosine of the image and caption embeddings (None without a caption)
    alt_clip_score  float | None: the same for item["alt_text"] (None without one)
    aesthetic       float | None: the LAION aesthetic head over the normalized image embedding (None
                    without a configured head)

and to each entry of item["detections"] (the objects, in detection order):

    label_score     float | None: cosine of the object's masked crop and `label_prompt` ("a photo of a
                    {label}"), label = item["nouns"][det["noun"]]["label"]; None when the item has no masks
                    or the mask is empty
    label_rank      int | None: 1 + the number of the image's other distinct labels whose prompt the same
                    crop matches strictly better (1 = its own label is the best match)

The crop (`masked_crop`): the mask's bounding box, every pixel outside the mask set to CLIP's normalization
mean (NEUTRAL_RGB, which normalizes to ~0, so the background carries no signal), padded with the same colour
to a centred square (CLIP's centre crop then keeps the whole subject). Scores are computed from the fp32
normalized embeddings; the stored embedding is their float16 rounding.

Batching: images, then every crop of the batch, go through `encode_image` `batch_size` at a time; captions,
alt texts and label prompts through `encode_text` (label prompts cached across batches). Each input is
preprocessed on its own with open_clip's own eval transform, so batched results equal one-at-a-time results
up to float rounding.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.catalogs.hashing import phash_int64
from subjectdiff.datagen.config import CurateConfig
from subjectdiff.datagen.stages.architectures import AestheticMLP
from subjectdiff.datagen.stages.common import Item, chunks, live, pick_device, pick_dtype
from subjectdiff.weights import Checkpoint, WeightsError, resolve

log = logging.getLogger(__name__)

# OpenAI CLIP's normalization mean (open_clip.constants.OPENAI_DATASET_MEAN) in 0-255 RGB.
NEUTRAL_RGB = (123, 117, 104)
_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TEXT_CACHE = 4096  # label prompts kept between batches


# ------------------------------------------------------------------------------------------ aesthetic head


# The two official MLP layouts, by the indices of their Linear layers in `layers`.
_MLP_LAYOUTS = {(0, 2, 4, 6, 7): False, (0, 3, 6, 9, 11): True}


def aesthetic_head_from_state_dict(state: dict) -> torch.nn.Module:
    """A LAION aesthetic head from its state dict, recognised by its keys:

    {"weight", "bias"}          LAION-AI/aesthetic-predictor's linear head (sa_0_4_vit_l_14_linear.pth:
                                torch.nn.Linear(768, 1))
    {"layers.N.weight", ...}    improved-aesthetic-predictor's MLP (AestheticMLP), either layout
    A Lightning checkpoint ({"state_dict": ...}, what its train_predictor.py saves) is unwrapped first.
    Returns an eval module mapping (N, D) normalized embeddings to (N, 1) scores.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    keys = set(state)
    if keys == {"weight", "bias"}:
        w = state["weight"]
        if w.ndim != 2 or w.shape[0] != 1:
            raise ValueError(f"a linear aesthetic head is Linear(D, 1); this weight is {tuple(w.shape)}")
        head = torch.nn.Linear(w.shape[1], 1)
    elif keys and all(k.startswith("layers.") for k in keys):
        linear = tuple(sorted({int(k.split(".")[1]) for k in keys}))
        if linear not in _MLP_LAYOUTS:
            raise ValueError(
                f"an MLP aesthetic head with Linear layers at {list(linear)}: neither of the "
                f"improved-aesthetic-predictor layouts ({[list(k) for k in _MLP_LAYOUTS]})"
            )
        head = AestheticMLP(state[f"layers.{linear[0]}.weight"].shape[1], relu=_MLP_LAYOUTS[linear])
    else:
        raise ValueError(
            "not a LAION aesthetic head: expected a Linear state dict (weight, bias) or "
            f"improved-aesthetic-predictor's MLP (layers.0.weight, ...), got keys {sorted(keys)[:6]}"
        )
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def load_aesthetic_head(spec: str) -> torch.nn.Module:
    """An aesthetic head from a path, URL or hf:// spec (subjectdiff.weights.resolve; cached, hashed in the
    manifest)."""
    path = resolve(spec)
    return aesthetic_head_from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def head_in_features(head: torch.nn.Module) -> int:
    first = head if isinstance(head, torch.nn.Linear) else head.layers[0]
    return first.in_features


# ------------------------------------------------------------------------------------------------ open_clip


def model_name(cfg: CurateConfig) -> str:
    """The open_clip model name of cfg.model; a config JSON is registered first (named by its file stem).
    Registration is per process, so every Ray actor does it when it builds its stage."""
    import open_clip

    if cfg.model.endswith(".json"):
        path = resolve(cfg.model)
        open_clip.add_model_config(path)
        return path.stem
    return cfg.model


def _tag_cfg(cfg: CurateConfig, name: str) -> dict | None:
    """open_clip's pretrained config when cfg.pretrained is a tag of the model, else None."""
    import open_clip

    if cfg.pretrained is None:
        return None
    return open_clip.get_pretrained_cfg(name, cfg.pretrained) or None


def clip_checkpoint_specs(cfg: CurateConfig) -> list[str]:
    """The checkpoint spec(s) cfg.pretrained stands for, most preferred first (empty for random weights).

    A tag becomes the hf:// file open_clip downloads for it: its `hf_hub` repo and file, or, with no file
    named, open_clip_model.safetensors then open_clip_pytorch_model.bin (open_clip's own order). A spec is
    itself. Downloads then go through subjectdiff.weights, into the subjectdiff cache, hashed in the manifest.
    """
    if cfg.pretrained is None:
        return []
    tag = _tag_cfg(cfg, model_name(cfg))
    if tag is None:
        return [cfg.pretrained]
    hub = tag.get("hf_hub", "")
    if not hub:
        raise WeightsError(
            f"open_clip tag {cfg.pretrained!r} of {cfg.model} has no Hugging Face file "
            f"(only {tag.get('url')}); download it and set curate.pretrained to its path"
        )
    repo, filename = posixpath.split(hub)  # open_clip's convention: "org/repo/" names no file
    if filename:
        return [f"hf://{repo}/{filename}"]
    return [f"hf://{repo}/open_clip_model.safetensors", f"hf://{repo}/open_clip_pytorch_model.bin"]


def resolve_clip_checkpoint(cfg: CurateConfig, *, download: bool = True) -> tuple[str, str] | None:
    """(spec, local path) of the weights cfg.pretrained names: the first of `clip_checkpoint_specs` that
    resolves; None for random weights. WeightsError naming every spec tried when none does."""
    specs = clip_checkpoint_specs(cfg)
    if not specs:
        return None
    errors = []
    for spec in specs:
        try:
            return spec, str(resolve(spec, download=download))
        except WeightsError as e:
            errors.append(str(e))
    raise WeightsError(f"curate.pretrained {cfg.pretrained!r}: " + "; ".join(errors))


def manifest_specs(cfg: CurateConfig) -> dict[str, str]:
    """Checkpoint specs of the curate stage for the run manifest (name -> spec, for weights.manifest_entry):
    "curate.model" when it is a config file, "curate.pretrained" (the resolved file of a tag, when cached;
    else its first spec) and "curate.aesthetic". Empty when the stage is disabled; random weights are
    recorded by the config alone."""
    if not cfg.enabled:
        return {}
    out = {"curate.model": cfg.model} if cfg.model.endswith(".json") else {}
    specs = clip_checkpoint_specs(cfg)
    if specs:
        try:
            out["curate.pretrained"] = resolve_clip_checkpoint(cfg, download=False)[0]
        except WeightsError:
            out["curate.pretrained"] = specs[0]
    if cfg.aesthetic:
        out["curate.aesthetic"] = cfg.aesthetic
    return out


def checkpoints(cfg: CurateConfig, download: bool = False) -> list[Checkpoint]:
    """`manifest_specs` as checkpoints (its registry entry's); with DOWNLOAD, the weights a tag stands for are
    fetched first (the first of its files that downloads), so the list names the file that did."""
    if download and cfg.enabled:
        resolve_clip_checkpoint(cfg, download=True)
    return [Checkpoint(name, spec) for name, spec in manifest_specs(cfg).items()]


def describe(cfg: CurateConfig, entries: dict[str, dict]) -> dict:
    """The run manifest's `models.curate`: the open_clip model (a name, or its config file with hash), its
    weights (the file a tag stands for, with hash; "random" without) and the aesthetic head (None without)."""
    return {
        "model": entries.get("curate.model", cfg.model),
        "pretrained": cfg.pretrained,
        "label_prompt": cfg.label_prompt,
        "weights": entries.get("curate.pretrained", "random"),
        "aesthetic": entries.get("curate.aesthetic"),
    }


def load_clip(cfg: CurateConfig, device: torch.device, dtype: torch.dtype):
    """(model, preprocess, tokenizer) for cfg: open_clip's own builder, eval transform and tokenizer.

    QuickGELU follows cfg.quick_gelu, else the tag's setting; a tag's preprocessing (mean, std,
    interpolation, resize mode) is applied as open_clip applies it when it loads the tag itself.
    """
    import open_clip

    name = model_name(cfg)
    tag = _tag_cfg(cfg, name)
    quick_gelu = cfg.quick_gelu if cfg.quick_gelu is not None else bool(tag and tag.get("quick_gelu"))
    found = resolve_clip_checkpoint(cfg)
    pp = {f"image_{k}": tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if tag and k in tag}
    if found is None:
        log.warning("curate: %s with RANDOM weights (curate.pretrained is None): scores measure nothing", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights (benchmarks) are the same in every actor
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=found[1] if found else None,
            precision=_PRECISION[dtype],
            device=device,
            force_quick_gelu=quick_gelu,
            **pp,
        )
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name)


def masked_crop(
    image: np.ndarray, mask: np.ndarray, fill: tuple[int, int, int] = NEUTRAL_RGB, margin: float = 0.0
) -> np.ndarray | None:
    """image (H, W, 3) uint8 RGB, mask (H, W) bool -> (S, S, 3) uint8, S = the longer side L of the mask's
    bounding box plus 2 * round(margin * L): the box, pixels outside the mask FILL (default NEUTRAL_RGB), centred
    on a FILL square. None when the mask is empty. (The curate stage's crop, margin 0; the identity stage's,
    with its model's mean colour and a margin.)"""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    neutral = np.array(fill, np.uint8)
    sub = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], neutral)
    longest = max(x1 - x0, y1 - y0)
    side = longest + 2 * round(margin * longest)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = neutral
    oy, ox = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    out[oy : oy + y1 - y0, ox : ox + x1 - x0] = sub
    return out


# ---------------------------------------------------------------------------------------------------- stage


class Curator:
    """Loads open_clip (and the aesthetic head, when configured) once; `__call__(items)` adds the curation
    signals (module docstring) to every live item."""

    stage = "curate"

    def __init__(self, cfg: CurateConfig, model=None, preprocess=None, tokenizer=None, aesthetic_head=None):
        """model, preprocess, tokenizer: an already built open_clip model, its eval transform and tokenizer
        (benchmarks at full size with random weights); else loaded from cfg. aesthetic_head: a built head,
        else cfg.aesthetic (None: no head)."""
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if model is None:
            self.model, self.preprocess, self.tokenizer = load_clip(cfg, self.device, self.dtype)
        else:
            self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
            self.preprocess = preprocess or image_transform_v2(
                PreprocessCfg(**model.visual.preprocess_cfg), is_train=False
            )
            self.tokenizer = tokenizer or open_clip.get_tokenizer(model_name(cfg))
        if aesthetic_head is None and cfg.aesthetic:
            aesthetic_head = load_aesthetic_head(cfg.aesthetic)
        self.aesthetic_head = aesthetic_head.float().to(self.device).eval() if aesthetic_head is not None else None
        self._label_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # -- embeddings ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        """(H, W, 3) uint8 RGB images -> (N, D) float32 L2-normalized embeddings, batch_size per forward."""
        out = []
        for batch in chunks(images, self.cfg.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(im)) for im in batch]).to(self.device, self.dtype)
            feats = self.model.encode_image(x)
            if isinstance(feats, tuple):  # configs with output_tokens return (pooled, tokens)
                feats = feats[0]
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> (N, D) float32 L2-normalized text embeddings (open_clip's tokenizer truncates at 77 tokens)."""
        out = []
        for batch in chunks(texts, self.cfg.batch_size):
            feats = self.model.encode_text(self.tokenizer(list(batch)).to(self.device))
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def label_embeddings(self, labels: list[str]) -> dict[str, np.ndarray]:
        """label -> embedding of cfg.label_prompt for it; prompts are cached between batches."""
        missing = [lb for lb in dict.fromkeys(labels) if lb not in self._label_cache]
        if missing:
            feats = self.encode_texts([self.cfg.label_prompt.format(label=lb) for lb in missing])
            for lb, f in zip(missing, feats):
                self._label_cache[lb] = f
            while len(self._label_cache) > _TEXT_CACHE:
                self._label_cache.popitem(last=False)
        return {lb: self._label_cache[lb] for lb in labels}

    @torch.inference_mode()
    def aesthetic_scores(self, feats: np.ndarray) -> list[float | None]:
        """(N, D) normalized image embeddings -> N aesthetic scores; None each without a head."""
        if self.aesthetic_head is None:
            return [None] * len(feats)
        if len(feats) and feats.shape[1] != head_in_features(self.aesthetic_head):
            raise ValueError(
                f"the aesthetic head takes {head_in_features(self.aesthetic_head)}-d embeddings, the "
                f"CLIP model gives {feats.shape[1]}-d (LAION's heads are for ViT-L-14, 768-d)"
            )
        scores = self.aesthetic_head(torch.from_numpy(feats).to(self.device)).float().cpu().numpy()
        return [float(s) for s in scores[:, 0]]

    # -- items -----------------------------------------------------------------------------------------

    def _crops(self, items: list[Item], idx: list[int]) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Every object's masked crop in the live items, with (item index, detection index)."""
        crops, owners = [], []
        for i in idx:
            it = items[i]
            masks = it.get("masks") or []
            for j, _ in enumerate(it.get("detections") or []):
                if j >= len(masks):
                    continue
                crop = masked_crop(it["image"], mask_codec.decode(masks[j]))
                if crop is not None:
                    crops.append(crop)
                    owners.append((i, j))
        return crops, owners

    def __call__(self, items: list[Item]) -> list[Item]:
        """The signals of every live item. Curation never fails a sample: when the batch raises (a GPU out of
        memory on a huge batch of crops, a model error on odd input) it is redone one item at a time, and an
        item that still raises keeps its hashes with every other signal None (logged)."""
        try:
            return self._curate(items)
        except Exception as e:
            idx = live(items)
            log.warning(
                "curate raised on a batch of %d (%s: %s); redoing it one item at a time", len(idx), type(e).__name__, e
            )
            for i in idx:
                try:
                    self._curate([items[i]])
                except Exception as e1:
                    self._unmeasured(items[i], e1)
            return items

    def _unmeasured(self, it: Item, e: Exception) -> None:
        log.warning("curate: %s left unmeasured (%s: %s)", it.get("source"), type(e).__name__, e)
        it["sha256"] = hashlib.sha256(it["image_bytes"]).hexdigest()
        try:
            it["phash"] = phash_int64(it["image"])
        except Exception:
            it["phash"] = None
        for k in ("clip_embedding", "clip_score", "alt_clip_score", "aesthetic"):
            it[k] = None
        for det in it.get("detections") or []:
            det["label_score"], det["label_rank"] = None, None

    def _curate(self, items: list[Item]) -> list[Item]:
        idx = live(items)
        if not idx:
            return items
        feats = self.encode_images([items[i]["image"] for i in idx])
        texts = list(dict.fromkeys(t for i in idx for t in (items[i].get("caption"), items[i].get("alt_text")) if t))
        text_feats = dict(zip(texts, self.encode_texts(texts)))
        for i, f, aes in zip(idx, feats, self.aesthetic_scores(feats)):
            it = items[i]
            it["sha256"] = hashlib.sha256(it["image_bytes"]).hexdigest()
            it["phash"] = phash_int64(it["image"])
            it["clip_embedding"] = f.astype(np.float16)
            it["clip_score"] = float(f @ text_feats[it["caption"]]) if it.get("caption") else None
            it["alt_clip_score"] = float(f @ text_feats[it["alt_text"]]) if it.get("alt_text") else None
            it["aesthetic"] = aes
            for det in it.get("detections") or []:
                det["label_score"], det["label_rank"] = None, None
        self._score_labels(items, idx)
        return items

    def _score_labels(self, items: list[Item], idx: list[int]) -> None:
        """label_score and label_rank of every object with a non-empty mask (module docstring)."""
        crops, owners = self._crops(items, idx)
        if not crops:
            return
        crop_feats = self.encode_images(crops)
        labels_of = {
            i: [items[i]["nouns"][d["noun"]]["label"] for d in items[i]["detections"]]
            for i in idx
            if items[i].get("detections")
        }
        prompts = self.label_embeddings([lb for ls in labels_of.values() for lb in ls])
        for (i, j), f in zip(owners, crop_feats):
            distinct = list(dict.fromkeys(labels_of[i]))
            sims = np.array([float(f @ prompts[lb]) for lb in distinct])
            own = sims[distinct.index(labels_of[i][j])]
            det = items[i]["detections"][j]
            det["label_score"] = float(own)
            det["label_rank"] = int(1 + (sims > own).sum())
