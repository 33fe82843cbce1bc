"""SubjectDiffusionPipeline: the model as a diffusers pipeline, and the diffusers export.

    pipe = SubjectDiffusionPipeline.from_pretrained("runs/a/diffusers", torch_dtype=torch.float16).to("cuda")
    image = pipe("a dog on the beach", [Image.open("dog.png")], boxes=[(0.2, 0.3, 0.7, 0.9)], labels=["dog"],
                 generator=torch.Generator().manual_seed(0)).images[0]

Components: `unet` a plain `UNet2DConditionModel` (in_channels 5: the latents and the location channel;
attention_type "gated": diffusers' GatedSelfAttentionDense adapters), `vae`, `text_encoder` (CLIPTextModel),
`tokenizer` (CLIPTokenizer, optional: the pipeline tokenizes with the model library's open_clip BPE, the same
vocabulary, because the placeholder positions are defined by it), `scheduler` (the sampler: PNDM as in the
reference code; swap it as in any diffusers pipeline), and the model's own networks as diffusers models:
`image_encoder` (SubjectImageEncoder), `text_mlp` (TextMLP) and `grounding` (GroundingNet). diffusers' GLIGEN
position net computes another function (one token per box, no patch tokens), so the grounding network is its own
component; the pipeline sets it as `unet.position_net`, and a saved `unet/` holds a zero GLIGEN position net in
its place, so that `UNet2DConditionModel.from_pretrained(DIR, subfolder="unet")` loads it alone.

The pipeline is the one generation path: `subjectdiff generate` (infer.Pipeline) encodes, samples and decodes
through it, and samples with `model.sampling.sample_latents`, the loop the trainer's validation runs too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from subjectdiff.catalogs.tokens import clip_tokenizer
from subjectdiff.model import builders
from subjectdiff.model.config import ModelConfig
from subjectdiff.model.prompts import subject_prompt, tokenize
from subjectdiff.model.sampling import SamplingConfig, sample_latents, three_branches
from subjectdiff.model.subject_diffusion import Parts, SubjectDiffusion, denoise, encode_text
from subjectdiff.model.subject_image import mask_array, rgb_array, subject_image

log = logging.getLogger(__name__)
DIFFUSERS_INDEX = "model_index.json"  # what marks a folder as a diffusers export


@dataclass
class Condition:
    """The conditioning of one prompt with its subjects, batch 1 (N = max_subjects slots).
    text_full: (1, L, D) prompt + subject words; text_plain: (1, L, D) the prompt alone; null_text: (1, L, D) the
    empty prompt; tokens: (1, N, T, Dv); boxes: (1, N, 4) xyxy normalized; present: (1, N) bool."""

    prompt: str
    full_prompt: str
    boxes: torch.Tensor
    present: torch.Tensor
    text_full: torch.Tensor
    text_plain: torch.Tensor
    null_text: torch.Tensor
    tokens: torch.Tensor


def is_diffusers_export(path: str | os.PathLike) -> bool:
    return (Path(path) / DIFFUSERS_INDEX).is_file()


class SubjectDiffusionPipeline(DiffusionPipeline):
    """Subject-Diffusion generation: a prompt, subject images and their boxes -> images (module docstring)."""

    model_cpu_offload_seq = "text_encoder->image_encoder->text_mlp->unet->vae"
    _optional_components = ["tokenizer"]
    # The grounding net runs inside the UNet (its position_net): it moves with the UNet's offload hook.
    _exclude_from_cpu_offload = ["grounding"]

    def __init__(
        self,
        vae,
        text_encoder,
        unet,
        scheduler,
        image_encoder,
        text_mlp,
        grounding,
        tokenizer=None,
        model_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if model_config is None:
            raise ValueError("model_config: the ModelConfig (as a dict) the networks were built with is needed")
        unet.position_net = grounding  # the UNet's gligen kwargs go through the model's grounding network
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            text_mlp=text_mlp,
            grounding=grounding,
        )
        self.register_to_config(model_config=ModelConfig.from_dict(model_config).to_dict())
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # -- conversions ------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, parts: Parts, tokenizer=None, scheduler=None) -> SubjectDiffusionPipeline:
        """The pipeline around built `Parts`, sharing their modules (no copy). scheduler: the sampler (default:
        SamplingConfig's, PNDM, built from the model's noise schedule)."""
        parts.model.store.arm(None)  # plain SDPA in the capture layers: no attention maps while sampling
        return cls(
            vae=parts.vae,
            text_encoder=parts.model.text_encoder,
            unet=parts.model.unet,
            scheduler=scheduler or SamplingConfig().make_scheduler(parts.scheduler.config),
            image_encoder=parts.image_encoder,
            text_mlp=parts.model.text_mlp,
            grounding=parts.model.unet.position_net,
            tokenizer=tokenizer,
            model_config=parts.config.to_dict(),
        )

    def to_parts(self) -> Parts:
        """The product's `Parts` on these modules (shared): what training and `subjectdiff generate` hold. The
        noise scheduler is a DDPMScheduler on the sampler's schedule (diffusers keeps the training config's
        fields in a scheduler's config)."""
        cfg = self.model_config
        model = SubjectDiffusion(cfg, self.unet, self.text_encoder, self.text_mlp)
        return Parts(model, self.vae, self.image_encoder, DDPMScheduler.from_config(self.scheduler.config), cfg)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config.model_config)

    @property
    def native_resolution(self) -> int:
        """The image side (pixels) the UNet was built for."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """diffusers' save (safetensors), with `unet/` as diffusers builds the UNet: a zero GLIGEN position net
        where this pipeline runs the grounding component."""
        with self.plain_unet():
            super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)

    @contextlib.contextmanager
    def plain_unet(self):
        """Within: `unet.position_net` is diffusers' own (attention_type "gated", all zeros), never run here."""
        unet, grounding = self.unet, self.unet.position_net
        dim = unet.config.cross_attention_dim
        positive = dim if isinstance(dim, int) else dim[0]
        with builders.seeded(0):  # its random init (zeroed next) leaves the caller's RNG as it was
            zero = GLIGENTextBoundingboxProjection(positive_len=positive, out_dim=dim, feature_type="text-only")
        with torch.no_grad():
            for p in zero.parameters():
                p.zero_()
        unet.position_net = zero.to(unet.device, unet.dtype)
        try:
            yield unet
        finally:
            unet.position_net = grounding

    # -- the steps of a call ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_condition(
        self,
        prompt: str,
        cutouts: list[np.ndarray],
        labels: list[str],
        boxes: list[tuple[float, float, float, float]],
    ) -> Condition:
        """cutouts: per subject the image encoder's input, (E, E, 3) uint8 (`subject_image`); labels: class words
        (", the {label} is sks"); boxes: xyxy normalized, where each subject goes in the image."""
        cfg = self.model_config
        n, k = cfg.max_subjects, len(cutouts)
        if k > n:
            raise ValueError(f"{k} subjects given; this model has {n} subject slots")
        if not len(labels) == len(boxes) == k:
            raise ValueError(f"{k} subject images, {len(labels)} labels and {len(boxes)} boxes: give one of each")
        device, dtype = self._execution_device, self.unet.dtype
        box = torch.zeros(1, n, 4)
        for j, b in enumerate(boxes):
            box[0, j] = torch.tensor([float(v) for v in b])
        sp = subject_prompt(prompt, list(labels), cfg.placeholder)
        ph = torch.full((1, n), -1, dtype=torch.long)
        ph[0, :k] = torch.tensor(sp.placeholder_pos, dtype=torch.long)
        if (ph[0, :k] < 0).any():
            log.warning("prompt too long: some subject words fell past CLIP's 77 tokens; those subjects are dropped")
        enc = self.image_encoder
        images = torch.full((n, 3, enc.image_size, enc.image_size), 1.0)
        for j, cut in enumerate(cutouts):
            images[j] = torch.from_numpy(np.array(cut)).permute(2, 0, 1).float() / 255
        cls, tokens = enc(images.to(device, dtype))
        text = lambda s, *subjects: encode_text(
            self.text_encoder, self.text_mlp, torch.tensor([tokenize(s)], device=device), *subjects
        )
        return Condition(
            prompt,
            sp.prompt,
            box.to(device),
            (ph >= 0).to(device),
            text(sp.prompt, ph.to(device), cls[None].to(dtype)),
            text(prompt),
            text(""),
            tokens[None].to(dtype),
        )

    def denoise(self, latents, timesteps, text, subject_tokens, boxes, subject_mask, location) -> torch.Tensor:
        """The UNet given all conditions (subject_diffusion.denoise): what `sample_latents` calls."""
        return denoise(self.unet, latents, timesteps, text, subject_tokens, boxes, subject_mask, location)

    @torch.no_grad()
    def sample(
        self,
        c: Condition,
        generators: list[torch.Generator | None],
        s: SamplingConfig,
        scheduler=None,
        progress=None,
    ) -> torch.Tensor:
        """Latents (B, 4, h, w) for one condition, one image per generator: image i starts from noise drawn from
        generators[i] alone (on its device, the CPU for a CPU generator), so an image does not depend on its batch.
        scheduler: the sampler (default: the pipeline's)."""
        device, b = self._execution_device, len(generators)
        res = s.resolution or self.native_resolution
        h = w = res // self.vae_scale_factor
        noise = torch.cat([randn_tensor((1, 4, h, w), generator=g, device=device) for g in generators])
        rep = lambda x: x.expand(b, *x.shape[1:])
        cond = three_branches(
            rep(c.text_full),
            rep(c.null_text),
            rep(c.tokens),
            rep(c.boxes),
            rep(c.present),
            h,
            w,
            s.order,
            text_plain=rep(c.text_plain),
        )
        gens = None if any(g is None for g in generators) else list(generators)
        return sample_latents(self, scheduler or self.scheduler, cond, noise, s, gens, progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, 4, h, w) scaled latents -> (B, H, W, 3) uint8 RGB."""
        vae = self.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        return ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def cutouts(self, images: list, masks: list | None = None) -> list[np.ndarray]:
        """Subject images (PIL or uint8 arrays) and optional masks (nonzero = subject, or the alpha of an RGBA
        one; None = the whole image) -> the image encoder's inputs: the mask's box, on white, padded square,
        resized (`subject_image`)."""
        masks = list(masks) if masks is not None else [None] * len(images)
        if len(masks) != len(images):
            raise ValueError(f"{len(images)} subject images and {len(masks)} masks: give one mask per image")
        out = []
        for image, mask in zip(images, masks):
            image = rgb_array(image)
            m = np.ones(image.shape[:2], bool) if mask is None else mask_array(mask)
            if m.shape != image.shape[:2]:
                raise ValueError(f"a subject mask of {m.shape} for an image of {image.shape[:2]}")
            out.append(subject_image(image, m, self.image_encoder.image_size))
        return out

    # -- the call ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        subject_images: list,
        boxes: list[tuple[float, float, float, float]],
        labels: list[str] | None = None,
        subject_masks: list | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        subject_guidance_scale: float = 1.5,
        guidance_order: str = "subject-first",
        eta: float = 0.0,
        resolution: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """prompt: the caption; subject_images: per subject a photo (PIL or (H, W, 3) uint8), cut out on white
        or with `subject_masks`; boxes: per subject where it goes, xyxy normalized to [0, 1]; labels: per subject
        its class word (default "object"). guidance_scale / subject_guidance_scale: the text and subject scales
        of three-branch guidance (guidance_order: "subject-first", the reference's, or "text-first").
        generator: one per image (image i's noise comes from generator i alone: `subjectdiff generate --seed S`
        is generator i = torch.Generator().manual_seed(S + i)), or one for all. output_type: "pil", "np" (floats
        in [0, 1]) or "latent". Returns ImagePipelineOutput(images) (a tuple without return_dict)."""
        k = len(subject_images)
        labels = list(labels) if labels is not None else ["object"] * k
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * num_images_per_prompt
        if len(gens) != num_images_per_prompt:
            raise ValueError(f"{len(gens)} generators for {num_images_per_prompt} images: give one, or one per image")
        s = SamplingConfig(
            steps=num_inference_steps,
            guidance=guidance_scale,
            subject_guidance=subject_guidance_scale,
            scheduler=type(self.scheduler).__name__,
            eta=eta,
            order=guidance_order,
            resolution=resolution,
            batch_size=num_images_per_prompt,
        )
        c = self.encode_condition(prompt, self.cutouts(subject_images, subject_masks), labels, list(boxes))
        self.scheduler.set_timesteps(s.steps)  # its number of timesteps (PNDM's PLMS: steps + 1) sizes the bar
        with self.progress_bar(total=len(self.scheduler.timesteps)) as bar:
            latents = self.sample(c, list(gens), s, progress=bar)
        if output_type == "latent":
            images = latents
        else:
            pixels = self.decode(latents)
            images = [Image.fromarray(a) for a in pixels] if output_type == "pil" else pixels.astype(np.float32) / 255
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def transformers_tokenizer(cfg: ModelConfig):
    """The text encoder's tokenizer as transformers' CLIPTokenizer: the base's (a Stable Diffusion folder's
    tokenizer/), or built from open_clip's BPE vocabulary (a random base; the same vocabulary as SD 2's)."""
    from transformers import CLIPTokenizer

    if cfg.base:
        folder = builders.base_folder(cfg) / "tokenizer"
        if folder.is_dir():
            return CLIPTokenizer.from_pretrained(folder)
    bpe = clip_tokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(t, t): i for t, i in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), pad_token="!")


def save_diffusers(parts: Parts, out: str | os.PathLike) -> Path:
    """Write `parts` as a diffusers folder (model_index.json, one subfolder per component, safetensors) that
    `SubjectDiffusionPipeline.from_pretrained(out)` loads with nothing else."""
    pipe = SubjectDiffusionPipeline.from_parts(parts, tokenizer=transformers_tokenizer(parts.config))
    pipe.save_pretrained(out)
    return Path(out)


def load_parts(path: str | os.PathLike, **kwargs: Any) -> Parts:
    """`Parts` from a diffusers export (kwargs: from_pretrained's, e.g. torch_dtype)."""
    return SubjectDiffusionPipeline.from_pretrained(path, **kwargs).to_parts()
