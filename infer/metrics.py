"""Subject and prompt fidelity as the DreamBooth paper (Ruiz et al., CVPR 2023, Sec. 4.1) defines them:

    DINO    mean pairwise cosine similarity between the ViT-S/16 DINO (CLS) embeddings of generated and real images
    CLIP-I  the same with CLIP image embeddings
    CLIP-T  mean cosine similarity between the CLIP embeddings of each generated image and of its prompt
            (the prompt as a user writes it, with the class noun: "a dog on the beach")

"Pairwise" is over all (generated, real) pairs of one subject. Models are configurable: `dreambooth()` (timm's
`vit_small_patch16_224.dino`, open_clip ViT-B-32-quickgelu / openai) in normal use; `tiny()` random seeded models from
configs in tests. Images are PIL or (H, W, 3) uint8 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from subjectdiff.catalogs.images import decode as decode_image
from subjectdiff.catalogs.storage import cache_root
from subjectdiff.model import builders
from subjectdiff.presets import Presets
from subjectdiff.weights import resolve


@dataclass
class MetricsConfig:
    """clip_model / clip_weights: an open_clip model name and pretrained tag or checkpoint spec (None = random init;
    model.builders.create_open_clip). dino_model: a timm model name; dino_weights: "timm" (timm's own pretrained
    weights, fetched from its hub into $SUBJECTDIFF_CACHE/timm), a checkpoint spec (subjectdiff.weights.resolve: a
    local file such as dino_deitsmall16_pretrain.pth, a URL, s3://, hf://, with an optional #sha256=), or None
    (random init). dino_kwargs: timm model overrides (tiny configs). seed: random init of whatever has no weights."""

    clip_model: str = "ViT-B-32-quickgelu"  # OpenAI's weights were trained with QuickGELU
    clip_weights: str | None = "openai"
    dino_model: str = "vit_small_patch16_224.dino"
    dino_weights: str | None = "timm"
    dino_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 32
    seed: int = 0


def dreambooth() -> MetricsConfig:
    """DreamBooth's models: DINO ViT-S/16 and CLIP ViT-B/32."""
    return MetricsConfig()


def tiny() -> MetricsConfig:
    """Random tiny models (CPU, offline): the model package's tiny open_clip config and a 2-block ViT."""
    return MetricsConfig(
        clip_model="subjectdiff-tiny-vit",
        clip_weights=None,
        dino_model="vit_small_patch16_224",
        dino_weights=None,
        dino_kwargs=dict(embed_dim=32, depth=2, num_heads=2, img_size=32),
    )


PRESETS = Presets("metrics", dreambooth, tiny)


def to_pil(image) -> Image.Image:
    """A path, PIL image or (H, W, 3) uint8 array -> RGB PIL image. A path decodes as datagen decodes its inputs
    (catalogs.images.decode: upright, HEIC/AVIF, 16-bit, alpha over white)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = decode_image(_read(image)).pixels
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def dino_transform(image: Image.Image, size: int) -> torch.Tensor:
    """DINO's evaluation transform: resize the short side to size * 256 / 224 (bicubic), centre crop size,
    ImageNet normalization -> (3, size, size)."""
    w, h = image.size
    short = round(size * 256 / 224)
    image = image.resize((max(short, round(w * short / h)), max(short, round(h * short / w))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    x = torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((x - mean) / std).permute(2, 0, 1)


def mean_pairwise(a: torch.Tensor, b: torch.Tensor) -> float:
    """a: (K, D), b: (M, D) L2-normalized -> mean cosine similarity over all K x M pairs."""
    return float((a @ b.T).mean())


class Scorer:
    """Loads the CLIP and DINO models once; embeds images and texts (L2-normalized rows) and scores sets."""

    def __init__(self, cfg: MetricsConfig | None = None):
        import open_clip
        import timm

        self.cfg = cfg = cfg or dreambooth()
        self.device = torch.device(cfg.device)
        if cfg.clip_model not in open_clip.list_models():
            open_clip.add_model_config(builders.OPEN_CLIP_CONFIGS)  # the tiny test config lives with the model
        with builders.seeded(cfg.seed):
            clip, _, self.clip_preprocess = builders.create_open_clip(cfg.clip_model, cfg.clip_weights, transforms=True)
            if cfg.dino_weights in (None, "timm"):  # timm's own weights into our cache, not the default one
                dino = timm.create_model(
                    cfg.dino_model,
                    pretrained=cfg.dino_weights == "timm",
                    num_classes=0,
                    cache_dir=str(cache_root() / "timm"),
                    **cfg.dino_kwargs,
                )
            else:  # a checkpoint spec: a path, URL, s3:// or hf:// file, #sha256= checked (subjectdiff.weights)
                dino = timm.create_model(
                    cfg.dino_model,
                    pretrained=True,
                    num_classes=0,
                    **cfg.dino_kwargs,
                    pretrained_cfg_overlay={"file": str(resolve(cfg.dino_weights))},
                )
        self.clip = clip.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(cfg.clip_model)
        self.dino = dino.to(self.device).eval().requires_grad_(False)
        self.dino_size = int(self.dino.patch_embed.img_size[0])

    def _batched(self, items: list, fn) -> torch.Tensor:
        out = [fn(items[i : i + self.cfg.batch_size]) for i in range(0, len(items), self.cfg.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def clip_images(self, images: list) -> torch.Tensor:
        """K images -> (K, D) normalized CLIP image embeddings."""
        prep = lambda ims: torch.stack([self.clip_preprocess(to_pil(i)) for i in ims]).to(self.device)
        return self._batched(list(images), lambda ims: self.clip.encode_image(prep(ims)))

    @torch.no_grad()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        """K texts -> (K, D) normalized CLIP text embeddings."""
        return self._batched(list(texts), lambda ts: self.clip.encode_text(self.tokenizer(ts).to(self.device)))

    @torch.no_grad()
    def dino_images(self, images: list) -> torch.Tensor:
        """K images -> (K, D) normalized DINO CLS embeddings."""
        prep = lambda ims: torch.stack([dino_transform(to_pil(i), self.dino_size) for i in ims]).to(self.device)
        return self._batched(list(images), lambda ims: self.dino(prep(ims)))

    def reference(self, real_images: list) -> dict[str, torch.Tensor]:
        """Embeddings of a subject's real images (computed once per subject)."""
        return {"dino": self.dino_images(real_images), "clip": self.clip_images(real_images)}

    def score(self, generated: list, prompts: list[str], real: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Per generated image (K of them, K prompts): DINO and CLIP-I averaged over the real images, CLIP-T with
        its prompt. The set's DreamBooth scores are the means of these arrays."""
        clip = self.clip_images(generated)
        return {
            "dino": (self.dino_images(generated) @ real["dino"].T).mean(1).numpy(),
            "clip_i": (clip @ real["clip"].T).mean(1).numpy(),
            "clip_t": (clip * self.clip_texts(prompts)).sum(-1).numpy(),
        }
