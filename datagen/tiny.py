"""Tiny random models saved in the OFFICIAL checkpoint formats, for tests, benchmarks and the offline demo.

Each builder writes what a user would download for the real model, so the stages load tiny and real
checkpoints through one code path:

    BLIP            a `save_pretrained` folder (model + BlipProcessor) like Salesforce/blip-image-captioning-large
    GroundingDINO   `{"model": state_dict}` .pth + its python config file + a local BERT folder (the config's
                    `text_encoder_type` points at it; offline there is no `bert-base-uncased` to fetch)
    SAM             a plain state-dict .pth like sam_vit_h_4b8939.pth, with a small ViT image encoder

All weights come from a fixed seed. The tokenizers' vocabulary is real English words (VOCAB below), so a
random captioner still writes words that spaCy tags as nouns, and the grounding prompt built from them
tokenizes without [UNK]. Two inits are tuned so random models exercise every path (see `tiny_models`):
the captioner's output bias favours nouns and articles, and GroundingDINO's text projection is scaled up
so some query-token logits clear the tiny preset's thresholds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SEED = 0

# Real English words: articles, prepositions, adjectives, verbs, and nouns that name things in
# scikit-image's photos. "launchpad", "spaceship" and "hippopotamus" split into several WordPieces
# ("launch", "##pad"...), so multi-token nouns are exercised in the grounding positive map too.
FUNCTION_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "near", "beside", "under", "next", "to", "at"]
ADJECTIVES = ["red", "white", "black", "small", "large", "old", "young", "wooden", "blue", "green"]
VERBS = ["holding", "sitting", "standing", "wearing", "lying", "looking"]
NOUNS = [
    "astronaut", "helmet", "flag", "suit", "cat", "dog", "rug", "cup", "saucer", "spoon", "coffee", "table",
    "rocket", "sky", "tower", "man", "woman", "person", "car", "tree", "house", "road", "bird", "horse",
    "boat", "chair", "ball", "hat", "flower", "window", "bottle", "book", "clock", "bicycle", "motorcycle",
    "wheel", "plate", "bowl", "grass", "water", "building", "door", "street", "shirt", "camera", "phone",
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
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    folder = Path(folder)
    tok = _bert_tokenizer(folder / "_tok")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]", "[CLS]")}
    text = BlipTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=ids["[DEC]"],
        eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"],
    )
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16)
    config = BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    _bias_towards_words(model, tok)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _bias_towards_words(model, tok) -> None:
    """Make a random captioner write noun-rich phrases: raise the output bias of nouns and articles.

    Without it a random decoder repeats whichever token its init favours; with it, captions read like
    "the cup rocket a helmet", which spaCy parses into nouns, so grounding and segmentation have work.
    """
    bias = model.text_decoder.cls.predictions.bias
    with torch.no_grad():
        bias.zero_()
        for word, boost in [(w, 3.0) for w in NOUNS] + [(w, 2.0) for w in ("a", "the", "and", "with")]:
            bias[tok.convert_tokens_to_ids(word)] = boost
        for t in SPECIAL + ["[DEC]"] + PIECES:
            bias[tok.convert_tokens_to_ids(t)] = -10.0
        # Let [SEP] (end of caption) come, but not before a few words: min_new_tokens handles that.
        bias[tok.convert_tokens_to_ids("[SEP]")] = 1.0


def save_tiny_blip2(folder: str | os.PathLike, seed: int = SEED) -> Path:
    """A tiny Blip2ForConditionalGeneration (OPT language model) + processor in a `save_pretrained` folder."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    folder = Path(folder)
    tok = _bert_tokenizer(folder / "_tok")
    tok.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    tok.add_tokens(["<image>"], special_tokens=True)
    num_query = 4
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, encoder_hidden_size=32, vocab_size=len(tok))
    opt = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                    word_embed_proj_dim=32, max_position_embeddings=64,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=opt.to_dict(), num_query_tokens=num_query,
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tok, num_query_tokens=num_query)
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
dim_feedforward = 64
hidden_dim = 32
dropout = 0.0
nheads = 4
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


def save_tiny_bert(folder: str | os.PathLike, seed: int = SEED, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny BertModel + BertTokenizerFast folder, usable as GroundingDINO's `text_encoder_type`."""
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tok = _bert_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=256)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_groundingdino(folder: str | os.PathLike, seed: int = SEED, logit_gain: float = 8.0) -> tuple[Path, Path]:
    """Write `config.py`, `bert/` and `groundingdino_tiny.pth` ({"model": state_dict}); returns (config, ckpt).

    logit_gain scales the text projection (`feat_map`): a random model's query-token dot products are
    near zero (sigmoid 0.5 everywhere, nothing separates); scaled, they spread over (0, 1) so some
    queries clear the box threshold and others do not, as with a trained model.
    """
    from datagen.stages.ground import build_groundingdino  # the same builder the Grounder uses

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bert = save_tiny_bert(folder / "bert", seed=seed)
    config = folder / "GroundingDINO_tiny.py"
    config.write_text(TINY_GDINO_CONFIG.format(text_encoder=str(bert)))
    torch.manual_seed(seed)
    model = build_groundingdino(config)
    with torch.no_grad():
        model.feat_map.weight.mul_(logit_gain)
    ckpt = folder / "groundingdino_tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return config, ckpt


# ------------------------------------------------------------------------------------------------- SAM

# A SAM whose ViT image encoder is small; prompt encoder and mask decoder keep SAM's fixed sizes (256-d),
# since segment-anything builds them that way for every variant.
TINY_SAM_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,))


def save_tiny_sam(path: str | os.PathLike, seed: int = SEED) -> Path:
    """A SAM state-dict .pth (the format of sam_vit_h_4b8939.pth) with a tiny image encoder."""
    from datagen.stages.segment import build_sam

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_sam(TINY_SAM_ENCODER)
    torch.save(sam.state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------- all four


@dataclass
class TinyModels:
    """Paths of one set of tiny checkpoints (what `datagen.config.tiny(models)` points the stages at)."""

    blip: Path
    gdino_config: Path
    gdino_checkpoint: Path
    sam_checkpoint: Path

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


def tiny_models(root: str | os.PathLike, seed: int = SEED) -> TinyModels:
    """Build (or reuse, when `root/tiny.json` says they are there) the tiny checkpoints under root."""
    root = Path(root)
    manifest = root / "tiny.json"
    if manifest.exists():
        paths = TinyModels(**{k: Path(v) for k, v in json.loads(manifest.read_text()).items()})
        if all(p.exists() for p in paths.__dict__.values()):
            return paths
    blip = save_tiny_blip(root / "blip", seed)
    cfg, ckpt = save_tiny_groundingdino(root / "groundingdino", seed)
    sam = save_tiny_sam(root / "sam" / "sam_tiny.pth", seed)
    paths = TinyModels(blip=blip, gdino_config=cfg, gdino_checkpoint=ckpt, sam_checkpoint=sam)
    manifest.write_text(json.dumps(paths.to_json(), indent=1))
    return paths
