"""infer/: generation (seeds, three-branch guidance, subjects and boxes, outputs), loading trainer checkpoints and
exports, metrics and the DreamBench runner. Tiny seeded models, 64 px, 2-3 steps, CPU, offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from subjectdiff.infer.pipeline import Pipeline, SamplingConfig, default_layout, location_map, resolve_model
from subjectdiff.infer.subjects import Subject, SubjectCutter
from subjectdiff.model import build, tiny
from subjectdiff.photo_records import photo

FAST = SamplingConfig(steps=2, batch_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(build(tiny()))


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny model's save_pretrained export folder."""
    return build(tiny()).save_pretrained(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee", "astronaut"):
        out[name] = d / f"{name}.jpg"
        Image.fromarray(photo(name)).resize((96, 64)).save(out[name])
    mask = np.zeros((64, 96), np.uint8)
    mask[10:50, 20:70] = 255
    Image.fromarray(mask).save(d / "mask.png")
    out["mask"] = d / "mask.png"
    return out


def pixels(gens) -> np.ndarray:
    return np.stack([np.asarray(g.image, np.int16) for g in gens])


def test_same_seed_same_images_other_seeds_differ(pipe, photos):
    subjects = [Subject(photos["chelsea"], "cat", mask=photos["mask"])]
    a = pixels(pipe.generate("a cat on a rug", subjects, 3, seed=[5, 6, 5], sampling=FAST))
    b = pixels(pipe.generate("a cat on a rug", subjects, 1, seed=6, sampling=SamplingConfig(steps=2, batch_size=1)))
    # same seed in another batch (of another size): the same image up to the batched kernels' rounding
    assert np.abs(a[0] - a[2]).max() <= 1 and np.abs(a[1] - b[0]).max() <= 1
    assert np.abs(a[0] - a[1]).mean() > 1  # different seeds
    c = pixels(pipe.generate("a cat on a rug", subjects, 3, seed=[5, 6, 5], sampling=FAST))
    assert (a == c).all()  # fully reproducible


def test_zero_gates_and_location_channel_equal_the_base_model(photos):
    """With the adapters' tanh gates and the location channel's input weights at zero, three-branch sampling is
    exactly Stable Diffusion's CFG sampling with the base UNet (diffusers' own pipeline), whatever the subjects,
    boxes, grounding network and subject_guidance."""
    from diffusers import StableDiffusionPipeline

    from subjectdiff.model import builders

    cfg = tiny()
    parts = build(cfg)
    base = builders.base_unet(cfg)  # same seed: the UNet the subject UNet was widened from
    unet = parts.model.unet
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".fuser." in n or n.startswith("position_net."):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))  # a "trained" adapter
            if n.endswith(("alpha_attn", "alpha_dense")):
                p.zero_()
        unet.conv_in.weight[:, 4:] = 0
    pipe = Pipeline(parts)
    s = SamplingConfig(steps=3, guidance=5.0, subject_guidance=2.0)
    subjects = [
        Subject(photos["chelsea"], "cat", box=(0.1, 0.1, 0.6, 0.9), mask=photos["mask"]),
        Subject(photos["coffee"], "cup", box=(0.5, 0.4, 1.0, 1.0)),
    ]
    ours = pixels(pipe.generate("a cat and a cup", subjects, 2, seed=[3, 4], sampling=s))

    c = pipe.encode_prompt("a cat and a cup", subjects)
    sd = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.model.text_encoder,
        tokenizer=None,
        unet=base,
        scheduler=s.make_scheduler(parts.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(k)) for k in (3, 4)])
    ref = sd(
        prompt_embeds=c.text_full.expand(2, -1, -1),
        negative_prompt_embeds=pipe.null_text().expand(2, -1, -1),
        latents=noise,
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="np",
    ).images
    ref = np.round(ref * 255).astype(np.int16)
    assert np.abs(ours - ref).max() <= 1

    with torch.no_grad():  # open the gates: now the subjects change the images
        for n, p in unet.named_parameters():
            if n.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(1.0)
    opened = pixels(pipe.generate("a cat and a cup", subjects, 2, seed=[3, 4], sampling=s))
    assert np.abs(opened - ref).mean() > 1


def test_location_map_is_the_one_training_uses():
    import subjectdiff.model
    import subjectdiff.train.step

    assert (
        location_map is subjectdiff.train.step.location_map is subjectdiff.model.location_map
    )  # one function, not two
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    m = location_map(boxes, torch.tensor([[True, False]]), 4, 4)[0, 0]
    assert m[:2, :2].all() and m.sum() == 4  # 1 on the cells whose centres lie in a present box, 0 elsewhere
    assert location_map(boxes, torch.tensor([[False, False]]), 4, 4).sum() == 0  # no subject: the null map
    assert default_layout(2)[0] == pytest.approx((50 / 512, 100 / 512, 200 / 512, 400 / 512))
    for n in (1, 2, 3):
        assert all(0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in default_layout(n))


def save_tiny_sam(path: Path) -> Path:
    """A SAM state-dict checkpoint (the official files' format) with a 2-block, 32-wide image encoder."""
    from segment_anything.build_sam import _build_sam

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = _build_sam(
            encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[], checkpoint=None
        )
    torch.save(sam.state_dict(), path)
    return path


def test_cutouts_mask_on_white_and_sam(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[..., 0] = 200
    mask = np.zeros((40, 60), bool)
    mask[5:35, 10:30] = True  # 20 wide, 30 tall: padded white left and right to a square
    p = SubjectCutter(size=30)(Subject(image, "thing", mask=mask))
    assert p.method == "mask" and p.cutout.shape == (30, 30, 3)
    assert (p.cutout[:, :3] == 255).all() and (p.cutout[:, -3:] == 255).all()
    assert (p.cutout[:, 12:18] == (200, 0, 0)).all()

    cutter = SubjectCutter(sam=save_tiny_sam(tmp_path / "sam.pth"), size=32)
    chelsea = photo("chelsea")
    for subject, method in (
        (Subject(chelsea, "cat"), "sam-salient"),
        (Subject(chelsea, "cat", region=(0.1, 0.1, 0.8, 0.9)), "sam-box"),
        (Subject(chelsea, "cat", point=(0.4, 0.5)), "sam-point"),
    ):
        p = cutter(subject)
        assert p.method == method and p.cutout.shape == (32, 32, 3) and p.cutout.dtype == np.uint8
    assert SubjectCutter(size=32)(Subject(chelsea, "cat")).method == "none"  # no SAM, no mask: the whole image


def test_fill_holes_with_and_without_scipy():
    from subjectdiff.infer.subjects import fill_holes, fill_holes_pil

    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    assert fill_holes(ring)[4, 4] and fill_holes_pil(ring)[4, 4] and not fill_holes_pil(ring)[0, 0]
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = rng.random((30, 40)) < 0.6
        assert (fill_holes(m) == fill_holes_pil(m)).all()


def test_generate_cli_multi_subject_with_boxes_records_inputs(export, photos, tmp_path):
    from subjectdiff.cli import main

    out = tmp_path / "out"
    argv = [
        "generate",
        "--model",
        str(export),
        "--prompt",
        "a cat next to a cup",
        "--subject",
        f"{photos['chelsea']}:0.05,0.2,0.5,0.9",
        "--label",
        "cat",
        "--mask",
        str(photos["mask"]),
        "--subject",
        str(photos["coffee"]),
        "--label",
        "cup",
        "--mask",
        "-",
        "--num-images",
        "3",
        "--seed",
        "7",
        "--steps",
        "2",
        "--guidance",
        "4",
        "--subject-guidance",
        "2",
        "--scheduler",
        "DDIMScheduler",
        "--batch-size",
        "2",
        "--boxes",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    metas = sorted(out.glob("*-s*.json"))
    assert [m.name for m in metas] == ["0000-s7.json", "0001-s8.json", "0002-s9.json"]
    meta = json.loads(metas[1].read_text())
    assert meta["prompt"] == "a cat next to a cup" and meta["seed"] == 8
    assert meta["full_prompt"] == "a cat next to a cup, the cat is sks, the cup is sks"
    assert meta["boxes"][0] == pytest.approx([0.05, 0.2, 0.5, 0.9])
    assert meta["boxes"][1] == pytest.approx(list(default_layout(2)[1]), abs=1e-6)  # no box: the default layout
    assert [s["label"] for s in meta["subjects"]] == ["cat", "cup"]
    assert [s["segmentation"] for s in meta["subjects"]] == ["mask", "none"]
    assert meta["subjects"][0]["source"] == str(photos["chelsea"]) and meta["subjects"][0]["box_given"]
    assert (meta["guidance"], meta["subject_guidance"], meta["steps"], meta["scheduler"]) == (4, 2, 2, "DDIMScheduler")
    assert meta["model"]["id"] == str(export)
    for name in (meta["image"], "0001-s8-boxes.png", "subject-0.png", "subject-1.png"):
        assert (out / name).is_file()
    assert Image.open(out / meta["image"]).size == (64, 64)


def test_generate_sam_takes_checkpoint_urls_with_digests(export, photos, tmp_path, capsys, monkeypatch):
    """--sam takes what datagen's segment.checkpoint takes (subjectdiff.weights.resolve): here a file:// URL with
    its #sha256=, copied into the cache and verified; a wrong digest is one line, before any model loads."""
    import hashlib

    from subjectdiff import weights
    from subjectdiff.cli import main

    monkeypatch.setenv("SUBJECTDIFF_CACHE", str(tmp_path / "cache"))
    sam = save_tiny_sam(tmp_path / "sam.pth")
    url = f"file://{sam}"
    digest = hashlib.sha256(sam.read_bytes()).hexdigest()
    argv = [
        "generate",
        "--model",
        str(export),
        "--prompt",
        "a cat",
        "--subject",
        str(photos["chelsea"]),
        "--label",
        "cat",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*argv, "--sam", f"{url}#sha256={digest}"]) == 0
    meta = json.loads(next((tmp_path / "out").glob("*-s*.json")).read_text())
    assert [s["segmentation"] for s in meta["subjects"]] == ["sam-salient"]
    assert weights.cache_path(url).read_bytes() == sam.read_bytes()
    capsys.readouterr()
    assert main([*argv, "--sam", f"{url}#sha256={'0' * 64}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sha256 mismatch" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--subject", "nope.jpg"], "no such file"),
        (["--subject", "{chelsea}:0.5,0.5,0.2,0.9"], "xyxy normalized"),
        (["--subject", "{chelsea}", "--label", "a", "--label", "b"], "--label given 2 times"),
        (["--scheduler", "NoScheduler"], "unknown diffusers scheduler"),
    ],
)
def test_generate_cli_bad_input_one_line(export, photos, tmp_path, capsys, argv, message):
    from subjectdiff.cli import main

    argv = [a.format(chelsea=photos["chelsea"]) for a in argv]
    rc = main(["generate", "--model", str(export), "--prompt", "x", "--steps", "1", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1


def test_identical_image_sets_score_one():
    from subjectdiff.infer.metrics import Scorer, mean_pairwise
    from subjectdiff.infer.metrics import tiny as tiny_metrics

    scorer = Scorer(tiny_metrics())
    cat, cup = photo("chelsea"), photo("coffee")
    # DreamBooth averages over all (generated, real) pairs: a set of one image against itself scores 1 ...
    s = scorer.score([cat, cat], ["a cat"] * 2, scorer.reference([cat, cat, cat]))
    assert s["dino"] == pytest.approx(1.0, abs=1e-5) and s["clip_i"] == pytest.approx(1.0, abs=1e-5)
    # ... and every image of an identical set matches itself exactly (the diagonal), other photos less
    for embed in (scorer.dino_images, scorer.clip_images):
        e = embed([cat, cup])
        assert torch.diagonal(e @ e.T) == pytest.approx([1.0, 1.0], abs=1e-5)
        assert mean_pairwise(e[:1], e[1:]) < 0.9999
    assert (-1 <= s["clip_t"]).all() and (s["clip_t"] <= 1).all()


SPEC = """Classes

subject_name,class
cat,cat
cup,cup

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


@pytest.fixture(scope="module")
def dreambench(tmp_path_factory) -> Path:
    """A tiny DreamBench layout: dataset/{cat,cup}/0?.jpg (crops of real photos) + prompts_and_classes.txt."""
    d = tmp_path_factory.mktemp("dreambench") / "dataset"
    for subject, name in (("cat", "chelsea"), ("cup", "coffee")):
        (d / subject).mkdir(parents=True)
        img = photo(name)
        h, w = img.shape[:2]
        for k, (x0, y0) in enumerate(((0, 0), (w // 8, h // 8))):
            Image.fromarray(img[y0 : y0 + 3 * h // 4, x0 : x0 + 3 * w // 4]).resize((48, 48)).save(
                d / subject / f"{k:02d}.jpg"
            )
    (d / "prompts_and_classes.txt").write_text(SPEC)
    return d


def test_dreambench_cli_writes_csv_and_summary(export, dreambench, tmp_path):
    from subjectdiff.cli import main

    out = tmp_path / "eval"
    argv = [
        "eval",
        "dreambench",
        "--model",
        str(export),
        "--data",
        str(dreambench.parent),
        "--out",
        str(out),
        "--num-images",
        "2",
        "--seed",
        "3",
        "--steps",
        "2",
        "--preset",
        "tiny",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    with open(out / "per_subject.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["subject"], r["live"], r["images"]) for r in rows] == [("cat", "True", "4"), ("cup", "False", "4")]
    for r in rows:
        assert all(-1 <= float(r[m]) <= 1 for m in ("dino", "clip_i", "clip_t"))
    with open(out / "images.csv") as f:
        images = list(csv.DictReader(f))
    assert len(images) == 8 and {i["seed"] for i in images} == {"3", "4"}
    assert images[0]["prompt"] == "a cat in the snow" and images[-1]["prompt"] == "a red cup"
    assert all((out / i["file"]).is_file() for i in images)
    summary = (out / "summary.md").read_text()
    for needed in (
        "| all | 2 | 8 |",
        "| objects | 1 | 4 |",
        "| live | 1 | 4 |",
        "subjectdiff-tiny-vit",
        "vit_small_patch16_224",
        "images_per_prompt**: 2",
        "3..4 for every prompt",
        "PNDMScheduler",
    ):
        assert needed in summary, needed
    assert json.loads((out / "summary.json").read_text())["means"].keys() == {"dino", "clip_i", "clip_t"}


def test_dreambench_subject_pairs(pipe, dreambench, tmp_path):
    from subjectdiff.infer.dreambench import DreamBenchConfig, evaluate
    from subjectdiff.infer.metrics import Scorer
    from subjectdiff.infer.metrics import tiny as tiny_metrics

    cfg = DreamBenchConfig(images_per_prompt=1, pairs=1, max_prompts=1, save_images=False)
    summary = evaluate(pipe, Scorer(tiny_metrics()), dreambench, tmp_path, cfg, FAST)
    assert [c["subject"] for c in summary["per_subject"]] == ["cat+cup"]
    assert summary["protocol"]["mode"] == "subject pairs"
    with open(tmp_path / "images.csv") as f:
        assert [r["prompt"] for r in csv.DictReader(f)] == ["a cat and a cup in the jungle"]


def test_trained_tiny_model_loads_from_export_and_checkpoints(photos, tmp_path):
    """The trainer's real entry point trains a tiny model for 2 steps; its export, its checkpoint's raw and EMA
    weights and the run folder all load here and generate."""
    from safetensors.torch import load_file

    from subjectdiff.photo_records import write_photo_shards
    from subjectdiff.train.cli import main as train_main

    shards, run = tmp_path / "shards", tmp_path / "run"
    write_photo_shards(shards, n_shards=1, per_shard=2)
    assert (
        train_main(
            [
                "--preset",
                "tiny",
                "--records",
                str(shards),
                "--out",
                str(run),
                "run.max_steps=2",
                "run.ckpt_every=2",
                "optim.ema_decay=0.5",
                "optim.lr=1e-2",
            ]
        )
        == 0
    )
    ckpt = run / "checkpoints" / "step-0000002"
    assert resolve_model(run) == (run / "export", "export")
    assert resolve_model(run, "raw") == (ckpt, "raw") and resolve_model(ckpt) == (ckpt, "ema")
    subjects = [Subject(photos["astronaut"], "astronaut", box=(0.2, 0.1, 0.8, 1.0), mask=photos["mask"])]
    images = {}
    for path, weights in ((run, "auto"), (ckpt, "raw"), (ckpt, "ema")):
        pipe = Pipeline.load(path, weights)
        name = next(n for n in load_file(ckpt / "ema.safetensors") if n.startswith("text_mlp."))
        want = load_file(ckpt / ("model.safetensors" if weights == "raw" else "ema.safetensors"))[name]
        assert torch.equal(pipe.model.state_dict()[name], want)
        gens = pipe.generate("an astronaut on the moon", subjects, 2, seed=0, sampling=FAST)
        assert (
            len(gens) == 2
            and gens[0].image.size == (64, 64)
            and gens[0].model["id"] == str(resolve_model(path, weights)[0])
        )
        images[str(path), weights] = pixels(gens)
    assert (images[str(run), "auto"] == images[str(ckpt), "ema"]).all()  # the export holds the EMA weights
    assert not (images[str(ckpt), "raw"] == images[str(ckpt), "ema"]).all()


def test_guidance_orders():
    """Both orders are classifier-free guidance towards e_f when the two scales are equal; they differ otherwise."""
    from subjectdiff.infer.pipeline import guide

    full, mid, uncond = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.cat([full, mid, uncond])
    for order in ("subject-first", "text-first"):
        cfg = guide(eps, SamplingConfig(guidance=3.0, subject_guidance=3.0, order=order))
        torch.testing.assert_close(cfg, uncond + 3.0 * (full - uncond))
    paper = guide(eps, SamplingConfig(guidance=7.0, subject_guidance=1.5))
    torch.testing.assert_close(paper, uncond + 1.5 * (mid - uncond) + 7.0 * (full - mid))
    with pytest.raises(ValueError, match="order"):
        SamplingConfig(order="both")


def test_one_sam_loader_for_datagen_and_infer(tmp_path):
    """datagen's segment stage and infer's cut-outs load SAM through the same function (subjectdiff.sam)."""
    import subjectdiff.datagen.stages.segment
    import subjectdiff.infer.subjects
    import subjectdiff.sam

    assert (
        subjectdiff.infer.subjects.load_sam
        is subjectdiff.datagen.stages.segment.load_sam_file
        is subjectdiff.sam.load_sam
    )
    sam = subjectdiff.sam.load_sam(save_tiny_sam(tmp_path / "sam.pth"))
    assert sam.image_encoder.patch_embed.proj.out_channels == 32 and not sam.training
    with pytest.raises(ValueError, match="model_type"):
        subjectdiff.sam.load_sam(tmp_path / "sam.pth", "vit_b")


def test_subject_and_reference_photos_decode_upright_as_datagen_decodes_them(tmp_path):
    """A phone photo stored sideways with an EXIF orientation, and a PNG with transparency, given as a subject
    (`generate --subject`) or as a DreamBench reference image: both read as datagen reads its inputs."""
    from subjectdiff.infer.metrics import to_pil
    from subjectdiff.infer.subjects import load_image

    stored = Image.fromarray(photo("astronaut")[:, :384])  # 512 high, 384 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view: upright it is 512 wide, 384 high
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "phone.jpg").shape == (384, 512, 3)
    assert to_pil(tmp_path / "phone.jpg").size == (512, 384)

    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black: alpha over white is white, not black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    assert load_image(tmp_path / "cutout.png").min() == 255
    assert np.asarray(to_pil(str(tmp_path / "cutout.png"))).min() == 255


def test_subject_mask_files_read_upright_and_by_their_alpha(tmp_path):
    """`generate --subject photo.jpg:mask.png`: a mask stored sideways with an EXIF orientation is turned upright
    like its photo, and a transparent cut-out PNG given as the mask is the subject where it is opaque (its
    colours are the subject's, so its grey levels would give a wrong mask)."""
    from subjectdiff.infer.subjects import load_mask

    upright = np.zeros((384, 512), bool)
    upright[:100, :200] = True  # top-left block of the upright view
    stored = Image.fromarray(np.rot90(upright, 1).astype(np.uint8) * 255)  # stored 90 degrees anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate it 90 degrees clockwise: back to `upright`
    stored.save(tmp_path / "mask.jpg", exif=exif.tobytes(), quality=100)
    assert np.array_equal(load_mask(tmp_path / "mask.jpg", (384, 512)), upright)

    cutout = np.zeros((64, 64, 4), np.uint8)
    cutout[..., :3] = 30  # a dark subject: its grey level is near 0 everywhere
    cutout[16:48, 8:40, 3] = 255  # opaque only here
    Image.fromarray(cutout, "RGBA").save(tmp_path / "cutout.png")
    expected = cutout[..., 3] > 0
    assert np.array_equal(load_mask(tmp_path / "cutout.png", (64, 64)), expected)
    assert np.array_equal(load_mask(cutout, (64, 64)), expected)


def test_diffusers_pipeline_masks_read_as_generate_reads_them():
    """SubjectDiffusionPipeline(subject_masks=...) takes bool masks and RGBA cut-outs as `generate` does: the same
    subject image comes out of both for the same mask (one mask_array)."""
    from subjectdiff.infer.subjects import load_mask
    from subjectdiff.model.subject_image import mask_array, subject_image

    img = photo("coffee")[:96, :128]
    cutout = np.zeros((96, 128, 4), np.uint8)
    cutout[..., :3] = 40
    cutout[20:70, 30:90, 3] = 255
    want = np.zeros((96, 128), bool)
    want[20:70, 30:90] = True
    for given in (want, want.astype(np.uint8) * 255, cutout, Image.fromarray(cutout, "RGBA")):
        assert np.array_equal(mask_array(given), want)
        assert np.array_equal(load_mask(given, (96, 128)), want)
    assert np.array_equal(subject_image(img, mask_array(cutout), 32), subject_image(img, want, 32))
    with pytest.raises(ValueError, match="subject mask"):
        mask_array(np.zeros((4, 4, 2), np.uint8))
