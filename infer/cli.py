"""`subjectdiff generate` and `subjectdiff eval dreambench`: inference from the command line.

    subjectdiff generate --model runs/a/export --prompt "a dog on the beach" \\
        --subject dog.jpg:0.1,0.3,0.6,0.95 --label dog --subject cup.png --label cup --sam sam_vit_h_4b8939.pth \\
        --num-images 4 --seed 0 --out out/
    subjectdiff eval dreambench --model runs/a/export --data dreambooth/dataset --out eval/ --sam sam_vit_h.pth \\
        --preset dreambooth
    subjectdiff export --model runs/a --format diffusers --out runs/a/diffusers   # SubjectDiffusionPipeline's folder

--model takes either export (ours, or a diffusers folder), a trainer checkpoint or a run folder.

Boxes after IMAGE: are where the subject goes in the generated image (xyxy normalized to [0, 1]); --region and
--point are SAM prompts in the SUBJECT image (normalized); --mask gives the subject's mask instead of SAM. These
per-subject options follow the order of --subject ('-' skips one). torch is imported only when a command runs;
a bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from subjectdiff.cli_words import renamed
from subjectdiff.errors import UsageError


def floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise UsageError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return values


def split_subject(spec: str) -> tuple[str, tuple[float, ...] | None]:
    """'dog.jpg:0.1,0.2,0.6,0.9' -> ('dog.jpg', box); 'dog.jpg' -> ('dog.jpg', None). A spec whose part after
    its last ':' is no path (no '/') and that names no file is IMAGE:BOX: a malformed box is said to be one,
    not taken for a file name."""
    path, sep, box = spec.rpartition(":")
    if not sep or "/" in box or "\\" in box or Path(spec).is_file():
        return spec, None
    try:
        values = tuple(float(v) for v in box.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:  # the numbers' range is Subject's check
        raise UsageError(
            f"--subject {spec}: malformed box {box!r}; expected IMAGE:x0,y0,x1,y1, four comma-separated numbers "
            "(where the subject goes, xyxy normalized to [0, 1])"
        )
    return path, values


def label_from(path: str) -> str:
    """A default class word from a file name: 'red_dog-02.jpg' -> 'red dog'; 'object' when none."""
    words = re.sub(r"[^A-Za-z]+", " ", Path(path).stem).strip().lower()
    return words or "object"


def per_subject(values: list[str] | None, n: int, flag: str) -> list[str | None]:
    if not values:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"{flag} given {len(values)} times for {n} --subject; give it once per subject ('-' = none)")
    return [None if v == "-" else v for v in values]


def subjects_from(args: argparse.Namespace) -> list:
    from subjectdiff.infer.subjects import Subject

    specs = [split_subject(s) for s in args.subject or []]
    n = len(specs)
    labels, masks = per_subject(args.label, n, "--label"), per_subject(args.mask, n, "--mask")
    regions, points = per_subject(args.region, n, "--region"), per_subject(args.point, n, "--point")
    out = []
    for (path, box), label, mask, region, point in zip(specs, labels, masks, regions, points):
        for f in (path, mask):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"{'--subject' if f == path else '--mask'} {f}: no such file")
        out.append(
            Subject(
                path,
                label or label_from(path),
                box,
                mask,
                region and floats(region, 4, "--region"),
                point and floats(point, 2, "--point"),
            )
        )
    return out


def add_source_args(p: argparse.ArgumentParser) -> None:
    """Which model: --model, --weights, --base (generate, eval and export alike)."""
    p.add_argument(
        "--model",
        required=True,
        help="an export folder (ours or a diffusers folder), a trainer checkpoint (step-N/) or a run folder",
    )
    p.add_argument(
        "--weights",
        choices=["auto", "ema", "raw"],
        default="auto",
        help="checkpoint weights (default: EMA when present)",
    )
    p.add_argument("--base", default=None, help="override the model's base (a local Stable Diffusion 2 folder)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_source_args(p)
    p.add_argument(
        "--sam",
        default=None,
        help="SAM checkpoint for the subject cut-outs: a path, URL (with "
        "#sha256=...), file://, s3:// or hf:// spec, as datagen's segment.checkpoint (sam_vit_h_4b8939.pth)",
    )
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5, help="text guidance scale (reference: 7.5)")
    p.add_argument(
        "--subject-guidance", type=float, default=1.5, help="subject/location guidance scale (reference: 1.5)"
    )
    p.add_argument("--scheduler", default="PNDMScheduler", help="a diffusers scheduler class name")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--order", choices=["subject-first", "text-first"], default="subject-first")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per UNet call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate images of a prompt with subject photos (and their boxes)")
    add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--subject",
        action="append",
        metavar="IMAGE[:x0,y0,x1,y1]",
        help="a subject photo and where to draw it (normalized); repeatable",
    )
    g.add_argument("--label", action="append", help="class word per subject (default: from the file name)")
    g.add_argument("--mask", action="append", help="mask image per subject instead of SAM ('-' = none)")
    g.add_argument("--region", action="append", metavar="x0,y0,x1,y1", help="SAM box in the subject photo, per subject")
    g.add_argument("--point", action="append", metavar="x,y", help="SAM point in the subject photo, per subject")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--boxes", action="store_true", help="also write the images with their boxes drawn")
    g.add_argument("--out", required=True)
    g.set_defaults(func=_generate)

    e = sub.add_parser("eval", help="evaluate a model (DreamBench: DINO, CLIP-I, CLIP-T)")
    esub = e.add_subparsers(dest="eval_command", metavar="BENCHMARK", required=True)
    d = esub.add_parser("dreambench", help="N images per prompt per DreamBench subject, scored as DreamBooth does")
    add_model_args(d)
    d.add_argument("--data", required=True, help="the DreamBench dataset/ folder")
    d.add_argument("--out", required=True)
    d.add_argument("--num-images", type=int, default=4, help="images per prompt per subject (DreamBooth: 4)")
    d.add_argument("--subjects", default=None, help="comma-separated subject names (default: all)")
    d.add_argument("--max-prompts", type=int, default=None, help="first K prompts of each list (default: all 25)")
    d.add_argument("--pairs", default=None, help="multi-subject: a file of `a,b` lines, or a number of pairs")
    preset = d.add_argument(
        "--preset",
        metavar="NAME",
        default="dreambooth",
        help="the metric models: dreambooth (DINO ViT-S/16, CLIP ViT-B/32; default) or tiny",
    )
    renamed(d, "--metrics", preset)
    d.add_argument("--clip-model", default=None, help="open_clip model name (preset's: ViT-B-32-quickgelu)")
    d.add_argument("--clip-weights", default=None, help="open_clip pretrained tag or file ('none' = random)")
    d.add_argument("--dino-model", default=None, help="timm model name (preset's: vit_small_patch16_224.dino)")
    d.add_argument("--dino-weights", default=None, help="'timm', a file (dino_deitsmall16_pretrain.pth), or 'none'")
    d.add_argument("--no-images", action="store_true", help="score without keeping the generated images")
    d.set_defaults(func=_dreambench, command_name="subjectdiff eval dreambench")

    x = sub.add_parser("export", help="write a model as a diffusers folder (SubjectDiffusionPipeline) or as ours")
    add_source_args(x)
    x.add_argument(
        "--format",
        choices=["diffusers", "subjectdiff"],
        default="diffusers",
        help="diffusers: a folder SubjectDiffusionPipeline.from_pretrained loads (default); subjectdiff: ours",
    )
    x.add_argument("--out", required=True, help="a new or empty folder")
    x.set_defaults(func=_export, command_name="subjectdiff export")


def _pipeline(args: argparse.Namespace):
    import torch

    from subjectdiff.infer.pipeline import Pipeline, SamplingConfig
    from subjectdiff.model.sampling import scheduler_class

    scheduler_class(args.scheduler)  # an unknown scheduler fails here, before any model loads or bar starts
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sampling = SamplingConfig(
        steps=args.steps,
        guidance=args.guidance,
        subject_guidance=args.subject_guidance,
        scheduler=args.scheduler,
        eta=args.eta,
        order=args.order,
        resolution=args.resolution,
        batch_size=args.batch_size,
    )
    overrides = {"base": args.base} if args.base else {}
    if args.sam:  # fetched (URLs) and verified (#sha256=) before any model loads; an error is one line
        from subjectdiff.weights import resolve

        args.sam = str(resolve(args.sam))
    return Pipeline.load(args.model, args.weights, device=device, sam=args.sam, **overrides), sampling


def _generate(args: argparse.Namespace) -> int:
    from subjectdiff.infer.outputs import save

    if args.num_images < 1:
        raise ValueError("--num-images must be >= 1")
    from tqdm.auto import tqdm

    subjects = subjects_from(args)
    pipe, sampling = _pipeline(args)
    batches = -(-args.num_images // sampling.batch_size)
    with tqdm(total=batches * sampling.steps, unit="step", desc="generate", disable=args.no_progress) as bar:
        gens = pipe.generate(args.prompt, subjects, args.num_images, seed=args.seed, sampling=sampling, progress=bar)
    for p in save(gens, args.out, boxes=args.boxes):
        print(p)
    return 0


def _export(args: argparse.Namespace) -> int:
    from subjectdiff.infer.pipeline import load_parts
    from subjectdiff.model.pipeline import save_diffusers

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: not an empty folder; give a new one")
    parts, _ = load_parts(args.model, args.weights, **({"base": args.base} if args.base else {}))
    if args.format == "diffusers":
        save_diffusers(parts, out)
    else:
        parts.save_pretrained(out)
    print(out)
    return 0


def _dreambench(args: argparse.Namespace) -> int:
    from subjectdiff.infer import metrics
    from subjectdiff.infer.dreambench import DreamBenchConfig, cases, evaluate, read_bench

    mcfg = metrics.PRESETS[args.preset]()
    for flag, name in (
        ("clip_model", "clip_model"),
        ("clip_weights", "clip_weights"),
        ("dino_model", "dino_model"),
        ("dino_weights", "dino_weights"),
    ):
        value = getattr(args, flag)
        if value is not None:
            setattr(mcfg, name, None if value.lower() == "none" else value)
    cfg = DreamBenchConfig(
        images_per_prompt=args.num_images,
        seed=args.seed,
        max_prompts=args.max_prompts,
        subjects=tuple(s for s in (args.subjects or "").split(",") if s),
        pairs=args.pairs,
        save_images=not args.no_images,
    )
    cases(read_bench(args.data), cfg)  # a bad folder or subject fails here, before any model loads
    pipe, sampling = _pipeline(args)
    mcfg.device = str(pipe.device)
    summary = evaluate(
        pipe, metrics.Scorer(mcfg), args.data, args.out, cfg, sampling, sam=args.sam, progress=not args.no_progress
    )
    print(Path(args.out, "summary.md").read_text())
    return 0 if summary["per_subject"] else 1
