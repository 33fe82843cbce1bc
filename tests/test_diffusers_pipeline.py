"""The diffusers pipeline and export (issue #19): `subjectdiff export --format diffusers` writes a folder that
`SubjectDiffusionPipeline.from_pretrained` loads alone and that gives `subjectdiff generate`'s images for the same
seed; its `unet/` loads alone as a plain UNet2DConditionModel; `generate` and `eval` take the folder as --model.
A tiny seeded model with its adapters opened (so subjects, boxes and the grounding net change the image), 64 px,
2 steps, CPU, offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from subjectdiff.cli import main
from subjectdiff.model import build, tiny
from subjectdiff.photo_records import photo

pytestmark = pytest.mark.usefixtures("one_thread")
BOX = (0.05, 0.2, 0.55, 0.9)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """Our export of a tiny model whose gates are open and whose new networks are not at their init."""
    parts = build(tiny())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in parts.model.named_parameters():
            if n.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(1.0)
            elif ".fuser." in n or n.startswith(("unet.position_net.", "text_mlp.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        parts.model.unet.conv_in.weight[:, 4:] = torch.randn(parts.model.unet.conv_in.weight[:, 4:].shape, generator=g)
    return parts.save_pretrained(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def diffusers_dir(export, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diffusers") / "model"
    assert main(["export", "--model", str(export), "--format", "diffusers", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("subject")
    Image.fromarray(photo("chelsea")).resize((96, 64)).save(d / "cat.png")
    mask = np.zeros((64, 96), np.uint8)
    mask[10:50, 20:70] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return {"image": d / "cat.png", "mask": d / "mask.png"}


def generate(model: Path, subject: dict[str, Path], out: Path) -> np.ndarray:
    """`subjectdiff generate` of 2 images, seeds 7 and 8 -> (2, 64, 64, 3) uint8."""
    argv = ["generate", "--model", str(model), "--prompt", "a cat on a rug", "--seed", "7", "--num-images", "2"]
    argv += ["--subject", f"{subject['image']}:{','.join(map(str, BOX))}", "--label", "cat"]
    argv += ["--mask", str(subject["mask"]), "--steps", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    return np.stack([np.asarray(Image.open(out / f"{i:04d}-s{7 + i}.png")) for i in range(2)])


def test_pipeline_from_the_diffusers_folder_gives_generates_images(export, diffusers_dir, subject, tmp_path):
    from subjectdiff import SubjectDiffusionPipeline

    want = generate(export, subject, tmp_path / "ours")
    pipe = SubjectDiffusionPipeline.from_pretrained(diffusers_dir)
    images = pipe(
        "a cat on a rug",
        [Image.open(subject["image"])],
        boxes=[BOX],
        labels=["cat"],
        subject_masks=[Image.open(subject["mask"])],
        num_images_per_prompt=2,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
    ).images
    got = np.stack([np.asarray(im) for im in images])
    assert got.shape == (2, 64, 64, 3) and (got == want).all()
    assert np.abs(want[0].astype(int) - want[1]).mean() > 1  # two seeds, two images
    # the subject and its box reach the image: another box gives another image
    moved = pipe(
        "a cat on a rug",
        [Image.open(subject["image"])],
        boxes=[(0.5, 0.0, 1.0, 0.5)],
        labels=["cat"],
        subject_masks=[Image.open(subject["mask"])],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images
    assert np.abs(moved[0] * 255 - want[0]).mean() > 1
    # and `generate` reads the diffusers folder as --model, to the same pixels
    assert (generate(diffusers_dir, subject, tmp_path / "diffusers") == want).all()
    meta = json.loads((tmp_path / "diffusers" / "0000-s7.json").read_text())
    assert meta["model"]["id"] == str(diffusers_dir) and meta["model"]["weights"] == "diffusers"


def test_unet_loads_alone_as_a_plain_diffusers_unet(export, diffusers_dir):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet, info = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet", output_loading_info=True)
    assert type(unet) is UNet2DConditionModel and unet.config.in_channels == 5
    assert unet.config.attention_type == "gated"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_file(export / "model.safetensors")
    assert torch.equal(unet.conv_in.weight, ours["unet.conv_in.weight"])  # the location channel's weights too
    fuser = next(k for k in ours if ".fuser." in k and k.startswith("unet."))
    assert torch.equal(unet.state_dict()[fuser[len("unet.") :]], ours[fuser])
    assert list((diffusers_dir / "unet").glob("*.safetensors")) and not list(diffusers_dir.rglob("*.bin"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_dtype_loads_every_module_in_that_dtype(diffusers_dir, dtype):
    from subjectdiff import SubjectDiffusionPipeline

    pipe = SubjectDiffusionPipeline.from_pretrained(diffusers_dir, torch_dtype=dtype)
    modules = {k: m for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(modules) == {"vae", "text_encoder", "unet", "image_encoder", "text_mlp", "grounding"}
    for name, m in modules.items():
        assert {p.dtype for p in m.parameters()} == {dtype}, name
    assert pipe.unet.position_net is pipe.grounding  # the grounding net runs inside the UNet, in its dtype


def test_every_module_is_offloaded_with_model_cpu_offload(diffusers_dir):
    """enable_model_cpu_offload (an accelerator is needed to run it) moves each registered module: the ones in the
    offload sequence by their own hooks, the grounding net with the UNet it runs in."""
    from subjectdiff import SubjectDiffusionPipeline

    cls = SubjectDiffusionPipeline
    index = json.loads((diffusers_dir / "model_index.json").read_text())
    modules = {k for k, v in index.items() if isinstance(v, list) and k not in ("tokenizer", "scheduler")}
    assert modules == set(cls.model_cpu_offload_seq.split("->")) | set(cls._exclude_from_cpu_offload)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="enable_model_cpu_offload needs a CUDA device (diffusers)")
def test_model_cpu_offload_gives_the_images_of_the_pipeline_on_the_gpu(diffusers_dir, subject):
    """On a GPU machine: with enable_model_cpu_offload() the pipeline gives the images it gives when moved to
    the GPU whole, and its modules wait on the CPU between calls."""
    from subjectdiff import SubjectDiffusionPipeline

    def run(pipe) -> np.ndarray:
        return pipe(
            "a cat on a rug",
            [Image.open(subject["image"])],
            boxes=[BOX],
            labels=["cat"],
            subject_masks=[Image.open(subject["mask"])],
            num_inference_steps=2,
            generator=torch.Generator("cuda").manual_seed(7),
            output_type="np",
        ).images

    whole = run(SubjectDiffusionPipeline.from_pretrained(diffusers_dir).to("cuda"))
    offloaded = SubjectDiffusionPipeline.from_pretrained(diffusers_dir)
    offloaded.enable_model_cpu_offload()
    got = run(offloaded)
    assert np.abs(got - whole).max() < 1e-3
    assert offloaded.unet.device.type == "cpu" and offloaded.vae.device.type == "cpu"


def test_eval_dreambench_takes_the_diffusers_folder(diffusers_dir, tmp_path):
    data = tmp_path / "dataset"
    (data / "cat").mkdir(parents=True)
    Image.fromarray(photo("chelsea")).resize((48, 48)).save(data / "cat" / "00.jpg")
    (data / "prompts_and_classes.txt").write_text(
        "Classes\n\nsubject_name,class\ncat,cat\n\nPrompts\n\nObject Prompts\n\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token)\n]\n\nLive Subject Prompts\n\n"
        "prompt_list = [\n'a {0} {1} in the snow'.format(unique_token, class_token)\n]\n"
    )
    out = tmp_path / "eval"
    argv = ["eval", "dreambench", "--model", str(diffusers_dir), "--data", str(tmp_path), "--out", str(out)]
    argv += ["--num-images", "1", "--steps", "1", "--preset", "tiny", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    with open(out / "per_subject.csv") as f:
        assert [r["subject"] for r in csv.DictReader(f)] == ["cat"]


def test_export_refuses_a_folder_with_files(export, tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    assert main(["export", "--model", str(export), "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_training_writes_the_diffusers_folder_of_its_export(tmp_path):
    """run.export_diffusers=true: the run's final export (EMA weights) is also a diffusers folder."""
    from safetensors.torch import load_file

    from subjectdiff import SubjectDiffusionPipeline
    from subjectdiff.photo_records import write_photo_shards

    shards, run = tmp_path / "shards", tmp_path / "run"
    write_photo_shards(shards, n_shards=1, per_shard=2)
    argv = ["train", "--preset", "tiny", "--records", str(shards), "--out", str(run), "run.max_steps=2"]
    assert main([*argv, "optim.lr=1e-2", "optim.ema_decay=0.5", "run.export_diffusers=true"]) == 0
    pipe = SubjectDiffusionPipeline.from_pretrained(run / "diffusers")
    ours = load_file(run / "export" / "model.safetensors")
    state = {
        **{f"text_mlp.{k}": v for k, v in pipe.text_mlp.state_dict().items()},
        **{f"unet.{k}": v for k, v in pipe.unet.state_dict().items()},
        **{f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
    }
    assert any(k.startswith("unet.position_net.") for k in ours)  # the grounding net: unet.position_net here too
    for k, v in ours.items():
        assert torch.equal(state[k], v), k


def test_the_folders_tokenizer_gives_the_models_token_ids(diffusers_dir):
    """tokenizer/ (transformers' CLIPTokenizer, for tools that read a Stable Diffusion folder) holds the model's
    vocabulary: it gives the ids the pipeline encodes (open_clip's BPE, which places the placeholders)."""
    from transformers import CLIPTokenizer

    from subjectdiff.model import subject_prompt, tokenize

    tok = CLIPTokenizer.from_pretrained(diffusers_dir, subfolder="tokenizer")
    texts = ["", subject_prompt("a cat on a rug", ["cat", "tea pot"]).prompt, "Two DOGS & a tea-pot's lid, 42 " * 9]
    for text in texts:
        assert tok(text, padding="max_length", max_length=77, truncation=True).input_ids == tokenize(text), text
