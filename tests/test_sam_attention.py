"""segment.attention = "sdpa": SAM's encoder attention as one maskless SDPA, the rel-pos bias folded into q and k
(datagen/stages/sam_attention.py). It must compute what segment-anything's Attention.forward computes, keep the
flash kernel eligible, and leave the segment stage's masks as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from torch.nn.attention import SDPBackend, sdpa_kernel

from subjectdiff.catalogs import masks as mask_codec
from subjectdiff.datagen.config import SegmentConfig
from subjectdiff.datagen.stages.sam_attention import SdpaAttention, set_attention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def attention(heads: int, head_dim: int, size: tuple[int, int], rel_pos: bool, seed: int = 0) -> Attention:
    """A segment-anything Attention block with random weights, relative positions random too (they start at
    zero, where the bias would not matter)."""
    torch.manual_seed(seed)
    attn = Attention(heads * head_dim, heads, use_rel_pos=rel_pos, input_size=size).eval()
    if rel_pos:
        torch.nn.init.normal_(attn.rel_pos_h)
        torch.nn.init.normal_(attn.rel_pos_w)
    return attn


def both(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eager, sdpa) outputs of ATTN on x (B, h, w, C); ATTN is left eager."""
    with torch.no_grad():
        set_attention(attn, "eager")
        eager = attn(x)
        set_attention(attn, "sdpa")
        sdpa = attn(x)
        set_attention(attn, "eager")
    return eager, sdpa


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8, 13, 16]),  # 13: no multiple of 8, so the padding is exercised
    rel_pos=st.booleans(),
    batch=st.integers(1, 2),
)
def test_sdpa_equals_segment_anything_attention(h, w, heads, head_dim, rel_pos, batch):
    attn = attention(heads, head_dim, (h, w), rel_pos)
    eager, sdpa = both(attn, torch.randn(batch, h, w, heads * head_dim))
    assert type(attn) is Attention  # switched back to segment-anything's own forward
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(14, 14), (64, 64)], ids=["window-14x14", "global-64x64"])
def test_sdpa_equals_eager_at_sam_sizes(size):
    """ViT-H's head dim (80) at its window (14 x 14) and global (64 x 64) token grids."""
    attn = attention(2, 80, size, rel_pos=True)
    eager, sdpa = both(attn, torch.randn(1, *size, 160))
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)


def test_a_whole_encoder_switches_and_switches_back():
    """Windowed (padded windows) and global blocks of one ImageEncoderViT, rel-pos on; "eager" restores
    segment-anything's forward bit for bit, and the state dict is the same either way."""
    torch.manual_seed(0)
    enc = ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=16,
        use_rel_pos=True,
        window_size=3,  # 8 x 8 tokens: padded windows in block 0, global attention in block 1
        global_attn_indexes=(1,),
    ).eval()
    for blk in enc.blocks:
        torch.nn.init.normal_(blk.attn.rel_pos_h)
        torch.nn.init.normal_(blk.attn.rel_pos_w)
    keys = set(enc.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        eager = enc(x)
        set_attention(enc, "sdpa")
        assert all(type(b.attn) is SdpaAttention for b in enc.blocks) and set(enc.state_dict()) == keys
        sdpa = enc(x)
        set_attention(enc, "eager")
        again = enc(x)
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, eager)


@pytest.mark.parametrize("rel_pos", [True, False])
def test_the_flash_kernel_takes_it(rel_pos):
    """With only flash allowed, the folded path runs and computes eager's output. PyTorch ships a CPU flash
    kernel (fp32 too), so no GPU is needed; on CPU it refuses unequal head dims (what the v padding is for) but
    takes masks and 3-d inputs, which CUDA's flash refuses: test_sdpa_calls_meet_cuda_flash_rules checks those."""
    attn = attention(2, 80, (14, 14), rel_pos)
    x = torch.randn(2, 14, 14, 160)
    eager, _ = both(attn, x)
    set_attention(attn, "sdpa")
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = attn(x)
    torch.testing.assert_close(flash, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(14, 14), (64, 64)], ids=["window-14x14", "global-64x64"])
def test_sdpa_calls_meet_cuda_flash_rules(monkeypatch, size):
    """CUDA's flash kernel wants 4-d (B, heads, L, D) inputs, no mask, one head dim for q, k and v, a multiple
    of 8 and at most 256: what every SDPA call makes at ViT-H's head dim (80) in windowed and global blocks."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.shape, v.shape, attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    attn = attention(2, 80, size, rel_pos=True)
    set_attention(attn, "sdpa")
    with torch.no_grad():
        attn(torch.randn(1, *size, 160))
    [(q, k, v, mask)] = calls
    assert mask is None and len(q) == 4 and q == k == v
    assert q[-1] % 8 == 0 and q[-1] <= 256


def test_segment_masks_are_the_same_with_sdpa(tmp_path):
    """The tiny SAM (windowed blocks, rel-pos randomized so the bias counts) through the segment stage:
    "sdpa" gives eager's masks (IoU ~1) and predicted IoUs."""
    from skimage import data

    from subjectdiff.datagen.stages.segment import Segmenter, load_sam
    from subjectdiff.datagen.tiny import save_tiny_sam

    cfg = SegmentConfig(checkpoint=str(save_tiny_sam(tmp_path / "sam.pth")), model_type="auto", device="cpu")
    sam = load_sam(cfg)
    torch.manual_seed(0)
    for blk in sam.image_encoder.blocks:
        torch.nn.init.normal_(blk.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(blk.attn.rel_pos_w, std=0.5)

    def run(attention: str) -> list[dict]:
        items = [
            {"image": data.astronaut(), "detections": [{"box": [0.1, 0.05, 0.9, 1.0]}, {"box": [0.5, 0.6, 0.9, 1]}]},
            {"image": data.chelsea(), "detections": [{"box": [0.05, 0.0, 0.95, 1.0]}]},
        ]
        return Segmenter(SegmentConfig(**{**vars(cfg), "attention": attention}), sam=sam)(items)

    eager, sdpa = run("eager"), run("sdpa")
    assert type(sam.image_encoder.blocks[0].attn) is SdpaAttention
    for e, s in zip(eager, sdpa):
        for me, ms in zip(e["masks"], s["masks"]):
            a, b = mask_codec.decode(me).astype(bool), mask_codec.decode(ms).astype(bool)
            assert a.any() and (a & b).sum() / (a | b).sum() > 0.999
        np.testing.assert_allclose(s["mask_scores"], e["mask_scores"], atol=1e-4)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("attention", "flash", "segment.attention 'flash': use one of ('eager', 'sdpa')"),
        ("compile", "yes", "segment.compile 'yes': use true or false"),
    ],
)
def test_bad_settings_say_what_to_use(field, value, words):
    with pytest.raises(ValueError) as e:
        SegmentConfig(**{field: value})
    assert str(e.value) == words


def test_bad_settings_from_the_command_line_say_what_to_use():
    from subjectdiff.datagen import config
    from subjectdiff.overrides import apply, parse_override

    with pytest.raises(ValueError, match=r"segment.attention 'math': use one of \('eager', 'sdpa'\)"):
        apply(config.DatagenConfig(), parse_override("segment.attention='math'"))
    with pytest.raises(ValueError, match="segment.compile"):
        apply(config.DatagenConfig(), parse_override("segment.compile=1"))


def test_set_attention_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="use one of"):
        set_attention(attention(1, 8, (2, 2), True), "flash")


def test_sdpa_attention_compiles_as_one_graph():
    """segment.compile: torch.compile traces the folded attention without a graph break (fullgraph raises on
    one), so the compiled encoder runs it as one graph."""
    attn = attention(2, 8, (5, 4), rel_pos=True)
    x = torch.randn(2, 5, 4, 16)
    eager, _ = both(attn, x)
    set_attention(attn, "sdpa")
    with torch.no_grad():
        compiled = torch.compile(attn, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_the_run_manifest_says_how_the_encoder_ran():
    from subjectdiff.datagen.stages.segment import describe

    cfg = SegmentConfig(attention="eager", compile=True)
    entry = describe(cfg, {"segment.checkpoint": {"spec": "sam_vit_h", "sha256": "ab"}})
    assert entry == {"model_type": "vit_h", "attention": "eager", "compile": True, "spec": "sam_vit_h", "sha256": "ab"}
