"""subjectdiff.model: tiny seeded models built from configs, no downloads."""

from __future__ import annotations

import pytest
import torch

from subjectdiff.catalogs.tokens import clip_token_positions
from subjectdiff.model import (
    TRAINABLE_GROUPS,
    ModelConfig,
    build,
    builders,
    load_pretrained,
    localization_loss,
    subject_prompt,
    tiny,
    token_weights,
    tokenize,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    return build(tiny())


def conditions(parts, b=2, seed=0):
    """Random but valid conditions for a batch of b, two subjects each."""
    g = torch.Generator().manual_seed(seed)
    enc = parts.image_encoder
    sp = subject_prompt("an astronaut holding a hippopotamus", ["astronaut", "hippopotamus"])
    n = parts.config.max_subjects
    with torch.no_grad():
        cls, tokens = enc(torch.rand(b * n, 3, enc.image_size, enc.image_size, generator=g))
    return dict(
        latents=torch.randn(b, 4, 8, 8, generator=g),
        timesteps=torch.tensor([10, 700][:b]),
        input_ids=torch.tensor([tokenize(sp.prompt)] * b),
        placeholder_pos=torch.tensor([sp.placeholder_pos] * b),
        subject_cls=cls.view(b, n, -1),
        subject_tokens=tokens.view(b, n, *tokens.shape[1:]),
        boxes=torch.tensor([[[0.1, 0.1, 0.6, 0.9], [0.5, 0.2, 1.0, 0.7]]] * b),
        subject_mask=torch.ones(b, n),
        location=(torch.rand(b, 1, 8, 8, generator=g) > 0.5).float(),
    )


def test_init_output_equals_base_unet(parts):
    """Zero-init location channel and tanh gates: with subjects, boxes and a location map, the widened UNet
    computes what the base UNet computes on the same latents and text (capture path on and off)."""
    base = builders.base_unet(parts.config).eval()
    model = parts.model.eval()
    c = conditions(parts)
    with torch.no_grad():
        text = model.encode_text(c["input_ids"], c["placeholder_pos"], c["subject_cls"])
        ref = base(c["latents"], c["timesteps"], encoder_hidden_states=text).sample
        model.store.arm(None)
        out = model.denoise(
            c["latents"], c["timesteps"], text, c["subject_tokens"], c["boxes"], c["subject_mask"], c["location"]
        )
        tw = token_weights(torch.tensor([[[2, -1], [5, 6]]] * 2), 77)
        out_capture, maps = model(**c, loc_token_weights=tw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_capture, ref, atol=1e-5, rtol=1e-5)
    assert len(maps) == len(model.captured_layers) and maps[0].shape[:2] == (2, 2)


def test_trainable_groups_select_parameters(parts):
    model = parts.model
    names = model.trainable_names()
    assert any(".attn2.to_k." in n for n in names) and not any(".attn1." in n for n in names)
    assert any(".fuser." in n for n in names) and "unet.conv_in.weight" in names
    assert any(n.startswith("unet.position_net.") for n in names) and any(n.startswith("text_mlp.") for n in names)
    assert not any(".attn2.to_q." in n or ".resnets." in n for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert not any(p.requires_grad for p in parts.vae.parameters())
    assert not any(p.requires_grad for p in parts.image_encoder.parameters())
    with pytest.raises(ValueError, match="unknown trainable group"):
        ModelConfig(**{**tiny().to_dict(), "trainable": ["everything"]})
    assert set(TRAINABLE_GROUPS) >= set(tiny().trainable)


def test_fourier_box_embedding_is_exact_in_bf16():
    """bf16 boxes get the float32 embedding (rounded to bf16), not sin(100 x) of a 3-digit x."""
    from subjectdiff.model.modules import fourier_embed_xyxy

    boxes = torch.rand(256, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    low = fourier_embed_xyxy(boxes, 8)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), fourier_embed_xyxy(boxes.float(), 8), atol=4e-3, rtol=0)


def test_localization_loss_lower_inside_mask():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :4, :4] = 1
    masks[0, 1, 4:, 2:6] = 1
    inside = masks.flatten(2) / masks.flatten(2).sum(-1, keepdim=True)  # attention mass on the object
    outside = (1 - masks.flatten(2)) / (1 - masks.flatten(2)).sum(-1, keepdim=True)
    present = torch.ones(1, 2, dtype=torch.bool)
    lo, hi = localization_loss([inside], masks, present), localization_loss([outside], masks, present)
    assert lo < hi
    # Multi-resolution layers: a 4x4 map against 8x8 masks is resized to the layer.
    small = torch.nn.functional.avg_pool2d(masks, 2).flatten(2)
    assert localization_loss([small], masks, present) < localization_loss([1 - small], masks, present)
    # Absent subjects do not count.
    only_first = torch.tensor([[True, False]])
    alone = localization_loss([inside[:, :1]], masks[:, :1], present[:, :1]).item()
    assert localization_loss([inside], masks, only_first).item() == pytest.approx(alone)


def test_localization_gradient_moves_attention_into_mask(parts):
    """End to end: one gradient step on the localization loss alone lowers it (K/V of captured layers)."""
    model = parts.model
    c = conditions(parts, seed=1)
    masks = torch.zeros(2, 2, 8, 8)
    masks[:, 0, :, :4] = 1
    masks[:, 1, :, 4:] = 1
    tw = token_weights(torch.tensor([[[2, 3], [5, 6]]] * 2), 77)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        _, maps = model(**c, loc_token_weights=tw)
        loss = localization_loss(maps, masks, torch.ones(2, 2), normalize=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])
    assert losses[-1] < losses[0]


def test_prompt_placeholders_use_token_positions():
    caption = "galaxies and a hippopotamus shaped nebula"
    sp = subject_prompt(caption, ["hippopotamus", "galaxy"], "sks")
    assert sp.prompt == caption + ", the hippopotamus is sks, the galaxy is sks"
    ids = tokenize(sp.prompt)
    sks = tokenize("sks")[1]
    assert [ids[p] for p in sp.placeholder_pos] == [sks, sks]
    hippo = clip_token_positions(caption, [15, 27])
    assert len(hippo) > 1  # the BPE splits it: several positions, not one per word
    assert [ids[p] for p in hippo] == [ids[p] for p in sp.label_pos[0]]
    long = subject_prompt("word " * 80, ["cat"], "sks")
    assert long.placeholder_pos == [-1]  # fell past the 77-token context
    with pytest.raises(ValueError, match="one CLIP BPE token"):
        build(ModelConfig(**{**tiny().to_dict(), "placeholder": "hippopotamus"}))


def test_placeholder_embedding_replaced_by_subject(parts):
    model = parts.model
    c = conditions(parts)
    first = int(c["placeholder_pos"][0, 0])
    with torch.no_grad():
        a = model.encode_text(c["input_ids"], c["placeholder_pos"], c["subject_cls"])
        b = model.encode_text(c["input_ids"], c["placeholder_pos"], c["subject_cls"].flip(1))
        plain = model.encode_text(c["input_ids"], torch.full_like(c["placeholder_pos"], -1), c["subject_cls"])
    # causal text encoder: positions before the first placeholder are untouched, the placeholder changes
    torch.testing.assert_close(a[:, :first], b[:, :first])
    assert not torch.allclose(a[:, first], b[:, first])
    assert not torch.allclose(a[:, first], plain[:, first])


def test_export_round_trip(parts, tmp_path):
    model = parts.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.unet.position_net.parameters():
            p.add_(0.01)
        model.unet.down_blocks[0].attentions[0].transformer_blocks[0].fuser.alpha_attn.fill_(0.3)
    parts.save_pretrained(tmp_path / "export")
    loaded = load_pretrained(tmp_path / "export")
    c = conditions(parts)
    with torch.no_grad():
        a, _ = model(**c)
        b, _ = loaded.model(**c)
        enc_a = parts.encode_images(torch.zeros(1, 3, 64, 64))
        enc_b = loaded.encode_images(torch.zeros(1, 3, 64, 64))
    model.load_state_dict(saved)  # the module-scoped fixture stays at its initialization
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(enc_a, enc_b)
    assert loaded.config == parts.config
    assert not torch.allclose(a, model(**c)[0])


def test_build_from_a_diffusers_folder(parts, tmp_path):
    """Real checkpoints go through the same path: a diffusers SD folder (here the tiny parts saved as one)."""
    cfg = parts.config
    builders.base_unet(cfg).save_pretrained(tmp_path / "sd" / "unet")
    builders.vae(cfg).save_pretrained(tmp_path / "sd" / "vae")
    builders.text_encoder(cfg).save_pretrained(tmp_path / "sd" / "text_encoder")
    builders.noise_scheduler(cfg).save_pretrained(tmp_path / "sd" / "scheduler")
    loaded = build(ModelConfig(**{**cfg.to_dict(), "base": str(tmp_path / "sd"), "seed": 7}))
    c = {**conditions(parts), "placeholder_pos": torch.full((2, 2), -1)}  # other seed: other text MLP
    with torch.no_grad():
        a, _ = parts.model(**c)
        b, _ = loaded.model(**c)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # same base weights, zero-init additions
    assert loaded.scheduler.config.prediction_type == "epsilon"


def test_hub_ids_and_weight_urls_load_through_the_subjectdiff_cache(parts, tmp_path, monkeypatch):
    """A hub id `base` loads from its snapshot in $SUBJECTDIFF_CACHE/hf (what huggingface_hub leaves there: the
    path a real hub id takes, offline here), not from the default Hugging Face cache; image_encoder_weights given
    as a file:// URL with #sha256= is copied into the cache, verified and loaded; a wrong digest fails first."""
    import hashlib

    import huggingface_hub.constants

    from subjectdiff import weights

    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = parts.config
    commit = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "cache" / "hf" / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    builders.base_unet(cfg).save_pretrained(snap / "unet")
    builders.vae(cfg).save_pretrained(snap / "vae")
    builders.text_encoder(cfg).save_pretrained(snap / "text_encoder")
    builders.noise_scheduler(cfg).save_pretrained(snap / "scheduler")
    with builders.seeded(123):  # image encoder weights other than the random init's
        clip = builders.create_open_clip(cfg.image_encoder, None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    url = f"file://{tmp_path / 'clip.pt'}"
    digest = hashlib.sha256((tmp_path / "clip.pt").read_bytes()).hexdigest()

    hub = ModelConfig(**{**cfg.to_dict(), "base": "someone/tiny-sd", "image_encoder_weights": f"{url}#sha256={digest}"})
    assert builders.base_folder(hub) == snap
    loaded = build(hub)
    assert weights.cache_path(url).is_file()
    for a, b in zip(loaded.image_encoder.visual.state_dict().values(), clip.visual.state_dict().values()):
        assert torch.equal(a, b)
    c = {**conditions(parts), "placeholder_pos": torch.full((2, 2), -1)}
    with torch.no_grad():
        torch.testing.assert_close(parts.model(**c)[0], loaded.model(**c)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(weights.WeightsError, match="sha256 mismatch"):
        builders.base_folder(ModelConfig(**{**cfg.to_dict(), "base": f"someone/tiny-sd#sha256={'0' * 64}"}))
    with pytest.raises(weights.WeightsError, match="not in the cache"):
        builders.base_unet(ModelConfig(**{**cfg.to_dict(), "base": "someone/not-cached"}))


def test_localization_loss_is_the_references_form_computed_by_hand():
    """mean(A over the background) - mean(A over the object), per subject; "sample": mean over a sample's present
    subjects, then over the batch (a sample without subjects counts 0); "subject": over all present subjects."""
    a = torch.tensor(
        [[[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]], [[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]]]
    )  # (B=2, N=2, HW=4): 2x2 layer maps
    m = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]).view(
        2, 2, 2, 2
    )
    present = torch.tensor([[True, True], [True, False]])
    # by hand: sample 0: (0.15 - 0.35) and (0.1 - 0.7); sample 1: (0.25 - 0.25); sample 1's second is absent
    per = [[0.15 - 0.35, 0.1 - 0.7], [0.25 - 0.25]]
    sample = (sum(per[0]) / 2 + sum(per[1]) / 1) / 2
    subject = (sum(per[0]) + sum(per[1])) / 3
    got = localization_loss([a], m, present)
    assert got.item() == pytest.approx(sample, abs=1e-4)
    assert localization_loss([a], m, present, reduce="subject").item() == pytest.approx(subject, abs=1e-4)
    none = torch.zeros(2, 2, dtype=torch.bool)
    assert localization_loss([a], m, none).item() == 0.0  # nothing to localize
    # soft masks: a layer smaller than the masks sees the antialiased (fractional) mask, binary a thresholded one
    big = torch.zeros(1, 1, 4, 4)
    big[0, 0, :3, :3] = 1
    amap = torch.tensor([[[0.7, 0.1, 0.1, 0.1]]])
    soft = localization_loss([amap], big, torch.ones(1, 1), masks_mode="soft")
    binary = localization_loss([amap], big, torch.ones(1, 1), masks_mode="binary")
    assert binary.item() == pytest.approx(0.1 - 0.7, abs=1e-4) and soft.item() != pytest.approx(binary.item(), abs=1e-3)


def test_mlp_forms_null_features_and_fourier_order():
    """The reference's MLP (LayerNorm -> Linear -> GELU -> Linear) and per-token null features by default; the
    first exports' forms for configs that predate the fields; the box features in GLIGEN's order."""
    from subjectdiff.model.config import LEGACY_DEFAULTS
    from subjectdiff.model.modules import GroundingNet, TextMLP, fourier_embed_xyxy

    g = GroundingNet(16, 8, 12, fourier_freqs=2, n_tokens=5)
    assert [type(m).__name__ for m in g.mlp] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert g.null_token_feature.shape == (5, 16) and g.null_position_feature.shape == (5, 16)
    assert [type(m).__name__ for m in TextMLP(4, 6, 8).mlp] == ["LayerNorm", "Linear", "GELU", "Linear"]
    old = GroundingNet(16, 8, 12, fourier_freqs=2, n_tokens=5, form="silu3", null_features="shared")
    assert len(old.mlp) == 5 and old.null_token_feature.shape == (16,)
    stored = {k: v for k, v in tiny().to_dict().items() if k not in LEGACY_DEFAULTS}
    assert {k: getattr(ModelConfig.from_dict(stored), k) for k in LEGACY_DEFAULTS} == LEGACY_DEFAULTS
    box = torch.tensor([0.1, 0.2, 0.6, 0.9])
    emb = fourier_embed_xyxy(box, 2)
    freqs = [100 ** (k / 2) for k in range(2)]
    want = torch.cat([torch.cat([torch.sin(f * box), torch.cos(f * box)]) for f in freqs])  # GLIGEN's embedder
    torch.testing.assert_close(emb, want)
    coord = fourier_embed_xyxy(box, 2, "coord-major")
    torch.testing.assert_close(coord[:2], torch.stack([torch.sin(box[0]), torch.cos(box[0])]))
    # a null slot's grounding tokens are the learned per-token features, whatever its patch tokens
    mask = torch.tensor([[1.0, 0.0]])
    t1, t2 = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    t2[:, 0] = t1[:, 0]
    out1, out2 = g(t1, torch.rand(1, 2, 4), mask), g(t2, torch.rand(1, 2, 4), mask)
    torch.testing.assert_close(out1[:, 5:], out2[:, 5:])


def test_an_export_from_before_the_new_fields_loads_as_it_was_trained(tmp_path):
    """An export whose config.json predates mlp / null_features / fourier_order rebuilds the first forms."""
    import json

    from subjectdiff.model.config import LEGACY_DEFAULTS

    cfg = ModelConfig(**{**tiny().to_dict(), **LEGACY_DEFAULTS})
    parts = build(cfg)
    d = parts.save_pretrained(tmp_path / "old")
    meta = json.loads((d / "config.json").read_text())
    meta["model"] = {k: v for k, v in meta["model"].items() if k not in LEGACY_DEFAULTS}
    (d / "config.json").write_text(json.dumps(meta))
    loaded = load_pretrained(d)
    assert loaded.config == cfg
    c = conditions(parts)
    with torch.no_grad():
        torch.testing.assert_close(parts.model(**c)[0], loaded.model(**c)[0])


def test_the_localization_layers_include_the_mid_block(parts):
    """The reference's five central levels: SD 2's preset captures 11 cross-attention layers."""
    from diffusers import UNet2DConditionModel

    from subjectdiff.model import sd2_base

    with torch.device("meta"):  # the SD 2 architecture without memory
        unet = UNet2DConditionModel(**builders.SD2_UNET)
    layers = sd2_base().loc_layers
    chosen = [n for n in unet.attn_processors if n.endswith(".attn2.processor") and any(s in n for s in layers)]
    assert len(chosen) == 11 and sum(n.startswith("mid_block.") for n in chosen) == 1
    assert any(n.startswith("mid_block.") for n in parts.model.captured_layers)
