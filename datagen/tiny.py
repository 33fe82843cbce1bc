"""Tiny random models saved in the OFFICIAL checkpoint formats, for tests, benchmarks and the offline demo.

Each builder writes what a user would download for the real model, so the stages load tiny and real
checkpoints through one code path:

    BLIP            a `save_pretrained` folder (model + BlipProcessor) like Salesforce/blip-image-captioning-large
    GroundingDINO   `{"model": state_dict}` .pth + its python config file + a local BERT folder (the config's
                    `text_encoder_type` points at it; offline there is no `bert-base-uncased` to fetch)
    SAM             a plain state-dict .pth like sam_vit_h_4b8939.pth, with a small ViT image encoder
    open_clip       a model config JSON (open_clip's model_configs format) + a state-dict .bin, like the
                    open_clip_pytorch_model.bin open_clip fetches for a pretrained tag
    aesthetic head  a state dict in improved-aesthetic-predictor's MLP layout (`layers.0.weight` ...), over the
                    tiny CLIP's embedding width instead of ViT-L-14's 768
    DINOv2          a `save_pretrained` folder (Dinov2Model + BitImageProcessor) like facebook/dinov2-base

All weights come from a fixed seed. The tokenizers' vocabulary is real English words (VOCAB below), so
captions and grounding prompts tokenize without [UNK]. Three things are tuned so random models exercise
every path (see the builders): the captioner is fit for a few seeded steps to six scikit-image photos with
real captions (it then writes image-dependent sentences with nouns); GroundingDINO's decoder output norm
is scaled down so query-token probabilities spread instead of saturating; its box head gets a small
random init so boxes vary in size instead of being the anchor proposals.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from subjectdiff.datagen.stages.architectures import AestheticMLP, build_groundingdino
from subjectdiff.sam import SAM_ARCHS, build_sam
from subjectdiff.weights import resolve

SEED = 0
# Bump when a builder changes what it writes: tiny_models() rebuilds a cached set of another version.
TINY_VERSION = 3  # 3: + the curate stage's open_clip model and aesthetic head

# Real English words: articles, prepositions, adjectives, verbs, and nouns that name things in
# scikit-image's photos. "launchpad", "spaceship" and "hippopotamus" split into several WordPieces
# ("launch", "##pad"...), so multi-token nouns are exercised in the grounding positive map too.
FUNCTION_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "near", "beside", "under", "next", "to", "at"]
ADJECTIVES = ["red", "white", "black", "small", "large", "old", "young", "wooden", "blue", "green"]
VERBS = ["holding", "sitting", "standing", "wearing", "lying", "looking"]
NOUNS = [
    "astronaut",
    "helmet",
    "flag",
    "suit",
    "cat",
    "dog",
    "rug",
    "cup",
    "saucer",
    "spoon",
    "coffee",
    "table",
    "rocket",
    "sky",
    "tower",
    "man",
    "woman",
    "person",
    "car",
    "tree",
    "house",
    "road",
    "bird",
    "horse",
    "boat",
    "chair",
    "ball",
    "hat",
    "flower",
    "window",
    "bottle",
    "book",
    "clock",
    "bicycle",
    "motorcycle",
    "wheel",
    "plate",
    "bowl",
    "grass",
    "water",
    "building",
    "door",
    "street",
    "shirt",
    "camera",
    "phone",
    "coin",
]
# Pieces that make multi-token words ("launch" + "##pad"): BERT WordPiece continuation tokens.
PIECES = ["launch", "##pad", "space", "##ship", "hippo", "##pot", "##amus", "##s", "##es"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCT = [".", ",", "?", "!"]
VOCAB = SPECIAL + PUNCT + FUNCTION_WORDS + ADJECTIVES + VERBS + NOUNS + PIECES + ["[DEC]"]


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(VOCAB) + "\n")
    return path


def _bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(folder / "vocab.txt")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


# ---------------------------------------------------------------------------------------------------- BLIP


def save_tiny_blip(folder: str | os.PathLike, seed: int = SEED) -> Path:
    """A tiny BlipForConditionalGeneration + BlipProcessor in a `save_pretrained` folder."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    folder = Path(folder)
    tok = _bert_tokenizer(folder)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]", "[CLS]")}
    text = BlipTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=ids["[DEC]"],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
    )
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    _fit_captions(model, processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Captions the tiny captioner is fit to (scikit-image photo -> caption), every word in VOCAB.
FIT_CAPTIONS = {
    "astronaut": "an astronaut in a white suit holding a helmet near a flag",
    "chelsea": "a cat lying on a rug",
    "coffee": "a cup of coffee on a saucer with a spoon",
    "rocket": "a rocket on a launchpad under the sky",
    "coins": "old coins on a table",
    "hubble_deep_field": "a hippopotamus in the sky",
}
SAMPLE_IMAGES = Path(__file__).parent / "sample_images"  # the same photos as JPEGs, shipped with datagen


def fit_photos() -> list:
    """FIT_CAPTIONS' photos as (H, W, 3) uint8: datagen/sample_images/NAME.jpg, else scikit-image."""
    import numpy as np
    from PIL import Image

    out = []
    for name in FIT_CAPTIONS:
        path = SAMPLE_IMAGES / f"{name}.jpg"
        if path.exists():
            img = np.asarray(Image.open(path).convert("RGB"))
        else:
            from skimage import data

            img = getattr(data, name)()
        out.append(img if img.ndim == 3 else np.stack([img] * 3, -1))
    return out


def _fit_captions(model, processor, steps: int = 80, lr: float = 1e-2) -> None:
    """Fit the random captioner to FIT_CAPTIONS for a few steps (seeded, deterministic, ~5 s on CPU).

    A random decoder ignores its image and repeats whatever its init favours; a few steps on six photos
    make it write real, image-dependent sentences, so the nouns, grounding and segmentation stages get
    the inputs they get in production.
    """
    batch = processor(images=fit_photos(), text=list(FIT_CAPTIONS.values()), padding=True, return_tensors="pt")
    batch["input_ids"][:, 0] = model.config.text_config.bos_token_id  # generate() starts from [DEC], not [CLS]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def save_tiny_blip2(folder: str | os.PathLike, seed: int = SEED) -> Path:
    """A tiny Blip2ForConditionalGeneration (OPT language model) + processor in a `save_pretrained` folder."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    folder = Path(folder)
    tok = _bert_tokenizer(folder)
    tok.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    tok.add_tokens(["<image>"], special_tokens=True)
    num_query = 4
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        encoder_hidden_size=32,
        vocab_size=len(tok),
    )
    opt = OPTConfig(
        vocab_size=len(tok),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=opt.to_dict(),
        num_query_tokens=num_query,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=num_query
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------- GroundingDINO

# The official SwinT-OGC config with every size turned down; the backbone stays Swin-T (groundingdino-py
# only builds its named Swin variants), fed small images by the tiny preset.
TINY_GDINO_CONFIG = """\
# Tiny GroundingDINO config written by subjectdiff's datagen/tiny.py: SwinT-OGC's keys, small sizes.
batch_size = 1
modelname = "groundingdino"
backbone = "swin_T_224_1k"
position_embedding = "sine"
pe_temperatureH = 20
pe_temperatureW = 20
return_interm_indices = [1, 2, 3]
backbone_freeze_keywords = None
enc_layers = 1
dec_layers = 2
pre_norm = False
dim_feedforward = 256
hidden_dim = 256  # groundingdino hard-codes 256-d text position embeddings
dropout = 0.0
nheads = 8
num_queries = 30
query_dim = 4
num_patterns = 0
num_feature_levels = 4
enc_n_points = 2
dec_n_points = 2
two_stage_type = "standard"
two_stage_bbox_embed_share = False
two_stage_class_embed_share = False
transformer_activation = "relu"
dec_pred_bbox_embed_share = True
dn_box_noise_scale = 1.0
dn_label_noise_ratio = 0.5
dn_label_coef = 1.0
dn_bbox_coef = 1.0
embed_init_tgt = True
dn_labelbook_size = 2000
max_text_len = 256
text_encoder_type = {text_encoder!r}
use_text_enhancer = True
use_fusion_layer = True
use_checkpoint = False
use_transformer_ckpt = False
use_text_cross_attention = True
text_dropout = 0.0
fusion_dropout = 0.0
fusion_droppath = 0.0
sub_sentence_present = True
"""


def save_tiny_bert(
    folder: str | os.PathLike, seed: int = SEED, hidden: int = 32, layers: int = 2, heads: int = 2
) -> Path:
    """A BertModel + BertTokenizerFast folder (tiny by default), usable as GroundingDINO's `text_encoder_type`.

    hidden=768, layers=12, heads=12 gives bert-base-uncased's architecture (with the small vocabulary).
    """
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tok = _bert_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden if hidden >= 256 else 2 * hidden,
        max_position_embeddings=512 if hidden >= 256 else 256,
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_groundingdino(
    folder: str | os.PathLike, seed: int = SEED, logit_scale: float = 0.06, full_size: bool = False
) -> tuple[Path, Path]:
    """Write a config, `bert/` and a `{"model": state_dict}` .pth; returns (config, ckpt).

    full_size: the official SwinT-OGC config as shipped in groundingdino-py, with bert-base-uncased's
    architecture (random weights, the small real-word vocabulary) as its local text encoder.

    logit_scale scales the decoder's output LayerNorm: query-token logits are dot products of two
    LayerNormed 256-d vectors, so a random model's are +-16 and every sigmoid saturates at 0 or 1
    (every query passes every threshold). Scaled down, probabilities spread over (0, 1) and the
    thresholds select a few queries, as with a trained model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if full_size:
        bert = save_tiny_bert(folder / "bert", seed=seed, hidden=768, layers=12, heads=12)
        official = resolve("pkg://groundingdino/config/GroundingDINO_SwinT_OGC.py").read_text()
        line = 'text_encoder_type = "bert-base-uncased"'
        if line not in official:
            raise RuntimeError(f"groundingdino-py's SwinT-OGC config no longer has {line!r}")
        config = folder / "GroundingDINO_SwinT_OGC_random.py"
        config.write_text(official.replace(line, f"text_encoder_type = {str(bert)!r}"))
    else:
        bert = save_tiny_bert(folder / "bert", seed=seed)
        config = folder / "GroundingDINO_tiny.py"
        config.write_text(TINY_GDINO_CONFIG.format(text_encoder=str(bert)))
    torch.manual_seed(seed)
    model = build_groundingdino(config)
    with torch.no_grad():
        model.transformer.decoder.norm.weight.mul_(logit_scale)
        # Upstream zero-inits the last box layer, so a random model returns its anchor proposals (tiny
        # squares); a small random delta and a size bias give boxes of varied, object-like sizes.
        last = model.bbox_embed[0].layers[-1]
        last.weight.normal_(0.0, 0.05)
        last.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.5]))
    ckpt = folder / ("groundingdino_swint_ogc_random.pth" if full_size else "groundingdino_tiny.pth")
    torch.save({"model": model.state_dict()}, ckpt)
    return config, ckpt


# ------------------------------------------------------------------------------------------------- SAM

# A SAM whose ViT image encoder is small; prompt encoder and mask decoder keep SAM's fixed sizes (256-d),
# since segment-anything builds them that way for every variant. No global-attention block: at SAM's fixed
# 1024 px input one costs ~2 s per image on CPU, the rest of the tiny encoder ~0.3 s.
TINY_SAM_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=())


def save_tiny_sam(path: str | os.PathLike, seed: int = SEED) -> Path:
    """A SAM state-dict .pth (the format of sam_vit_h_4b8939.pth) with a tiny image encoder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_sam(TINY_SAM_ENCODER)
    torch.save(sam.state_dict(), path)
    return path


# ------------------------------------------------------------------------------- open_clip + aesthetic head

# A ViT CLIP small enough for milliseconds on CPU, in open_clip's model-config format. The text tower keeps
# CLIP's real 49408-token BPE vocabulary and 77-token context, so captions and label prompts tokenize as they
# do for ViT-L-14 (open_clip ships the vocabulary).
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "subjectdiff-tiny-clip"


def save_tiny_clip(folder: str | os.PathLike, seed: int = SEED) -> tuple[Path, Path]:
    """Write `subjectdiff-tiny-clip.json` (an open_clip model config) and its random weights as a state-dict
    `open_clip_pytorch_model.bin`; returns (config, checkpoint). CurateConfig(model=config, pretrained=ckpt)
    registers the config with `open_clip.add_model_config` and loads the file with `create_model`."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG, indent=1))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    ckpt = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), ckpt)
    return config, ckpt


def save_tiny_aesthetic_head(
    path: str | os.PathLike, in_features: int = TINY_CLIP_CONFIG["embed_dim"], seed: int = SEED
) -> Path:
    """A random head in improved-aesthetic-predictor's MLP format (the layout of sac+logos+ava1-l14-linearMSE.pth:
    Linear(in, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1),
    saved as the state dict of a module whose Sequential is `layers`), over the tiny CLIP's embedding width."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(AestheticMLP(in_features).state_dict(), path)
    return path


# -------------------------------------------------------------------------------------------------- DINOv2

# A DINOv2 ViT small enough for milliseconds on CPU (facebook/dinov2-base is hidden 768, 12 layers, 12 heads,
# patch 14, at 224 px): 16 patches of 8 px in its 32 px input.
TINY_DINOV2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "image_size": 32,
    "patch_size": 8,
}
# facebook/dinov2-base's architecture (its config.json; image_size 518 sizes the position table, which the
# model interpolates to the processor's 224 px crops).
DINOV2_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "image_size": 518,
    "patch_size": 14,
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DINOv2's preprocessor_config.json


def save_tiny_dinov2(folder: str | os.PathLike, arch: dict = TINY_DINOV2, side: int = 32, seed: int = SEED) -> Path:
    """A random `Dinov2Model` of ARCH (TINY_DINOV2, or DINOV2_BASE for full-size benchmarks) and a
    BitImageProcessor with DINOv2's ImageNet mean and std and SIDE px crops (the hub's is 224), in a
    `save_pretrained` folder like facebook/dinov2-base's."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**arch))
    model.eval().save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(folder)
    return folder


def _with_dinov2(models: TinyModels, folder: Path, arch: dict, side: int, seed: int) -> TinyModels:
    """MODELS with their DINOv2 folder, written first when FOLDER has none. Outside the set's version (a set
    written before the identity stage keeps its other files), and written to a temporary folder renamed into
    place, so concurrent first uses (test processes sharing a cache) never read half a folder."""
    if not (folder / "config.json").exists():
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        save_tiny_dinov2(tmp, arch, side, seed)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its identical copy first
            shutil.rmtree(tmp, ignore_errors=True)
    models.dinov2 = folder
    return models


# --------------------------------------------------------------------------------------------- all four


@dataclass
class TinyModels:
    """Paths of one set of tiny checkpoints (what `datagen.config.tiny(models)` points the stages at)."""

    blip: Path
    gdino_config: Path
    gdino_checkpoint: Path
    sam_checkpoint: Path
    # The curate stage's; None in sets that have no file for it (full-random builds its CLIP in memory).
    clip_config: Path | None = None
    clip_checkpoint: Path | None = None
    aesthetic_head: Path | None = None
    # The identity stage's DINOv2 folder; built beside a set on first use (`_with_dinov2`), not part of its version.
    dinov2: Path | None = None

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}


def _built_once(manifest: Path, version: int, seed: int, build) -> TinyModels:
    """The models MANIFEST lists when it was written for this VERSION and SEED and its files are there;
    else BUILD() them and write MANIFEST."""
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.pop("version", None) == version and saved.pop("seed", None) == seed:
            paths = TinyModels(**{k: Path(v) for k, v in saved.items()})
            if all(p is None or p.exists() for p in paths.__dict__.values()):
                return paths
    paths = build()
    manifest.write_text(json.dumps({"version": version, "seed": seed, **paths.to_json()}, indent=1))
    return paths


def tiny_models(root: str | os.PathLike, seed: int = SEED) -> TinyModels:
    """Build (or reuse, when `root/tiny.json` says they are there) the tiny checkpoints under root."""
    root = Path(root)

    def build() -> TinyModels:
        blip = save_tiny_blip(root / "blip", seed)
        cfg, ckpt = save_tiny_groundingdino(root / "groundingdino", seed)
        sam = save_tiny_sam(root / "sam" / "sam_tiny.pth", seed)
        clip_config, clip_ckpt = save_tiny_clip(root / "clip", seed)
        head = save_tiny_aesthetic_head(root / "aesthetic" / "aesthetic_mlp_tiny.pth", seed=seed)
        return TinyModels(
            blip=blip,
            gdino_config=cfg,
            gdino_checkpoint=ckpt,
            sam_checkpoint=sam,
            clip_config=clip_config,
            clip_checkpoint=clip_ckpt,
            aesthetic_head=head,
        )

    return _with_dinov2(
        _built_once(root / "tiny.json", TINY_VERSION, seed, build), root / "dinov2", TINY_DINOV2, 32, seed
    )


# ------------------------------------------------------------------- full-size architectures, random weights

# Bump when a full-size builder changes what it writes.
FULL_RANDOM_VERSION = 1


def save_random_blip_large(folder: str | os.PathLike, seed: int = SEED) -> Path:
    """Salesforce/blip-image-captioning-large's architecture with random weights, in a `save_pretrained` folder.

    ViT-L/16 at 384 px and a BERT-base decoder with the real model's 30524-entry output layer; the tokenizer
    is the small real-word one (VOCAB), and the output bias is -1e4 past it, so every decoded id is a word.
    Not fit to anything (too slow at this size on a CPU): captions are random word sequences, with nouns.
    """
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    folder = Path(folder)
    tok = _bert_tokenizer(folder)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    text = BlipTextConfig(
        vocab_size=30524,
        bos_token_id=tok.bos_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
        encoder_hidden_size=1024,
    )
    vision = BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=384,
        patch_size=16,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[len(tok) :] = -1e4
    model.eval().save_pretrained(folder)
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tok
    ).save_pretrained(folder)
    return folder


def full_random_models(root: str | os.PathLike, seed: int = SEED) -> TinyModels:
    """The default preset's architectures (BLIP-large, GroundingDINO SwinT-OGC + BERT-base, SAM ViT-H) with
    random weights, saved in the official formats under root (about 5.5 GB; reused when `root/full.json`
    says they are there). For benchmarks: the stages load them as they load the real checkpoints, and run
    them at the real checkpoints' cost."""
    root = Path(root)

    def build() -> TinyModels:
        blip = save_random_blip_large(root / "blip-large", seed)
        cfg, ckpt = save_tiny_groundingdino(root / "groundingdino", seed, full_size=True)
        sam = root / "sam" / "sam_vit_h_random.pth"
        sam.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        torch.save(build_sam(SAM_ARCHS["vit_h"]).state_dict(), sam)
        return TinyModels(blip=blip, gdino_config=cfg, gdino_checkpoint=ckpt, sam_checkpoint=sam)

    models = _built_once(root / "full.json", FULL_RANDOM_VERSION, seed, build)
    return _with_dinov2(models, root / "dinov2-base", DINOV2_BASE, 224, seed)
