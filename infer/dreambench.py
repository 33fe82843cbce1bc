"""DreamBench evaluation (Ruiz et al., DreamBooth, CVPR 2023): 30 subjects x 25 prompts x N images, scored with
DINO, CLIP-I and CLIP-T (infer.metrics).

Layout of the data folder (google/dreambooth's `dataset/`): `<subject>/*.jpg` and `prompts_and_classes.txt`
(the "Classes" table `subject_name,class`, then "Object Prompts" and "Live Subject Prompts" lists of
`'a {0} {1} in the jungle'.format(unique_token, class_token)`). Live subjects are the cats and dogs.

Protocol (written to summary.md): the model sees one image of the subject (the first in sorted order, as in the
reference code), cut out by SAM's salient-object rule (or used whole without SAM), drawn in the default layout;
the prompt is the template with the class noun and no unique token ("a dog in the jungle"), the subject clause
", the dog is sks" appended by the pipeline; image k of every prompt uses seed + k. DINO and CLIP-I compare each
generated image with all real images of its subject; CLIP-T compares it with its prompt.
"""

from __future__ import annotations

import csv
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from subjectdiff.catalogs.images import IMAGE_SUFFIXES
from subjectdiff.infer.metrics import Scorer
from subjectdiff.infer.outputs import save
from subjectdiff.infer.pipeline import Pipeline, SamplingConfig
from subjectdiff.infer.subjects import Subject

LIVE_CLASSES = ("cat", "dog")
METRICS = ("dino", "clip_i", "clip_t")


@dataclass
class DreamBenchConfig:
    """images_per_prompt: N (DreamBooth: 4). seed: image k of each prompt uses seed + k. subjects: names to run
    (empty: all). max_prompts: the first K prompts of each list (None: all 25). pairs: None (single subjects),
    a file of `subject_a,subject_b` lines, or a number of pairs drawn (seeded) among subjects of different
    classes. reference_image: index, in sorted order, of the subject image the model sees."""

    images_per_prompt: int = 4
    seed: int = 0
    subjects: tuple[str, ...] = ()
    max_prompts: int | None = None
    pairs: str | int | None = None
    reference_image: int = 0
    save_images: bool = True

    def __post_init__(self) -> None:
        self.subjects = tuple(self.subjects)
        if self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {self.images_per_prompt}")


@dataclass
class Bench:
    """A parsed DreamBench folder: subject -> class, the two prompt lists (templates with {0} {1})."""

    root: Path
    classes: dict[str, str]
    object_prompts: list[str]
    live_prompts: list[str]

    def images(self, subject: str) -> list[Path]:
        return sorted(p for p in (self.root / subject).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def prompts(self, subject: str) -> list[str]:
        return self.live_prompts if self.classes[subject] in LIVE_CLASSES else self.object_prompts


def read_bench(data_dir: str | Path) -> Bench:
    """Parse DIR/prompts_and_classes.txt (or DIR/dataset/...). The subject folders are checked by `cases`, for
    the subjects a run evaluates only."""
    root = Path(data_dir)
    if not (root / "prompts_and_classes.txt").is_file() and (root / "dataset" / "prompts_and_classes.txt").is_file():
        root = root / "dataset"
    spec = root / "prompts_and_classes.txt"
    if not spec.is_file():
        raise FileNotFoundError(f"{data_dir}: no prompts_and_classes.txt (expected the DreamBench `dataset/` folder)")
    classes, lists, section = {}, {"object": [], "live": []}, "classes"
    for line in spec.read_text().splitlines():
        line = line.strip()
        if line.startswith("Object Prompts"):
            section = "object"
        elif line.startswith("Live Subject Prompts"):
            section = "live"
        elif line == "Prompts":
            section = "prompts"
        elif section == "classes" and "," in line and line != "subject_name,class":
            name, cls = line.split(",", 1)
            classes[name.strip()] = cls.strip()
        elif section in lists and (m := re.match(r"""^['"](.*)['"]\.format""", line)):
            lists[section].append(m.group(1))
    if not classes or not lists["object"] or not lists["live"]:
        raise ValueError(
            f"{spec}: {len(classes)} classes, {len(lists['object'])} object and {len(lists['live'])} "
            "live prompts; expected DreamBench's subject list and both prompt lists"
        )
    return Bench(root, classes, lists["object"], lists["live"])


def fill(template: str, noun: str) -> str:
    """'a {0} {1} in the jungle' -> 'a dog in the jungle' (no unique token: the subject comes from its image)."""
    return re.sub(r"\s+", " ", template.format("", noun)).strip()


def choose_pairs(bench: Bench, subjects: list[str], pairs: str | int, seed: int) -> list[tuple[str, str]]:
    """Subject pairs from a file of `a,b` lines, or `pairs` pairs drawn (seeded) among different classes."""
    if isinstance(pairs, str) and not pairs.isdigit():
        out = [
            tuple(x.strip() for x in line.split(",")) for line in Path(pairs).read_text().splitlines() if line.strip()
        ]
        bad = [p for p in out if len(p) != 2 or not set(p) <= set(bench.classes)]
        if bad:
            raise ValueError(f"{pairs}: lines must be `subject_a,subject_b` with known subjects; bad: {bad[:3]}")
        return out
    every = [(a, b) for i, a in enumerate(subjects) for b in subjects[i + 1 :] if bench.classes[a] != bench.classes[b]]
    return sorted(random.Random(seed).sample(every, min(int(pairs), len(every))))


def cases(bench: Bench, cfg: DreamBenchConfig) -> list[tuple[str, ...]]:
    """The subject tuples to evaluate: single subjects, or pairs."""
    subjects = list(cfg.subjects) or list(bench.classes)
    unknown = [s for s in subjects if s not in bench.classes]
    if unknown:
        raise ValueError(f"unknown DreamBench subject(s) {unknown}; known: {sorted(bench.classes)}")
    todo = [(s,) for s in subjects] if cfg.pairs is None else choose_pairs(bench, subjects, cfg.pairs, cfg.seed)
    used = list(dict.fromkeys(s for case in todo for s in case))
    missing = [s for s in used if not (bench.root / s).is_dir()]
    if missing:  # only the subjects evaluated need their folder (--subjects a,b: a/ and b/)
        raise FileNotFoundError(
            f"{bench.root}: no folder for DreamBench subject(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} (--subjects NAME,... evaluates only those named)"
        )
    return todo


def case_prompts(bench: Bench, case: tuple[str, ...], max_prompts: int | None) -> list[str]:
    """Prompts of a case: its subject's list filled with the class; for a pair, 'a dog and a teapot ...' from
    the live list when both are live, else the object list."""
    nouns = [bench.classes[s] for s in case]
    live = all(n in LIVE_CLASSES for n in nouns)
    templates = (bench.live_prompts if live else bench.object_prompts)[:max_prompts]
    return [fill(t, " and a ".join(nouns)) for t in templates]


def run_case(
    pipe: Pipeline,
    scorer: Scorer,
    bench: Bench,
    case: tuple[str, ...],
    refs: dict,
    cfg: DreamBenchConfig,
    sampling: SamplingConfig,
    out: Path,
    progress=None,
) -> list[dict]:
    """Generate and score every prompt of one case -> one row per generated image. progress: a tqdm bar advanced
    by one per generated image, or None."""
    name = "+".join(case)
    subjects = [Subject(bench.images(s)[cfg.reference_image], bench.classes[s]) for s in case]
    rows = []
    for p, prompt in enumerate(case_prompts(bench, case, cfg.max_prompts)):
        gens = pipe.generate(prompt, subjects, cfg.images_per_prompt, seed=cfg.seed, sampling=sampling)
        if progress is not None:
            progress.set_postfix_str(name, refresh=False)
            progress.update(len(gens))
        files = save(gens, out / "images" / name, prefix=f"p{p:02d}-") if cfg.save_images else [None] * len(gens)
        per = [scorer.score([g.image for g in gens], [prompt] * len(gens), refs[s]) for s in case]
        for k, g in enumerate(gens):
            row = {
                "subject": name,
                "classes": "+".join(bench.classes[s] for s in case),
                "prompt_index": p,
                "prompt": prompt,
                "seed": g.seed,
                "file": str(files[k].relative_to(out)) if files[k] else "",
            }
            for m in METRICS:
                row[m] = float(np.mean([d[m][k] for d in per]))  # pairs: averaged over the two subjects
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def per_case(rows: list[dict], bench: Bench) -> list[dict]:
    """Mean scores per case (a subject, or a pair named "a+b")."""
    out = []
    for name in dict.fromkeys(r["subject"] for r in rows):
        mine = [r for r in rows if r["subject"] == name]
        live = all(bench.classes[s] in LIVE_CLASSES for s in name.split("+"))
        out.append(
            {
                "subject": name,
                "classes": mine[0]["classes"],
                "live": live,
                "images": len(mine),
                **{m: round(float(np.mean([r[m] for r in mine])), 4) for m in METRICS},
            }
        )
    return out


def protocol(
    pipe: Pipeline,
    scorer: Scorer,
    cfg: DreamBenchConfig,
    sampling: SamplingConfig,
    bench: Bench,
    n_cases: int,
    sam: str | None,
) -> dict:
    m = scorer.cfg
    return {
        "benchmark": f"DreamBench ({bench.root})",
        "mode": "subject pairs" if cfg.pairs is not None else "single subject",
        "cases": n_cases,
        "prompts_per_case": cfg.max_prompts or 25,
        "images_per_prompt": cfg.images_per_prompt,
        "seeds": f"{cfg.seed}..{cfg.seed + cfg.images_per_prompt - 1} for every prompt",
        "model": pipe.model_info,
        "sampling": {**asdict(sampling), "resolution": sampling.resolution or pipe.native},
        "subject_input": f"image #{cfg.reference_image} of the sorted subject folder, "
        + (f"cut out by SAM ({sam}, salient object)" if sam else "whole image (no SAM)")
        + ", default layout",
        "dino": f"{m.dino_model} ({m.dino_weights or 'random init'}), CLS, mean pairwise cosine vs all real images",
        "clip_i": f"open_clip {m.clip_model} ({m.clip_weights or 'random init'}), "
        "mean pairwise cosine vs all real images",
        "clip_t": f"open_clip {m.clip_model}, cosine of image and prompt (class noun, no unique token)",
    }


def summary_markdown(cases_: list[dict], proto: dict) -> str:
    """The summary table (overall, objects, live subjects) and the protocol, as Markdown."""
    groups = {"all": cases_, "objects": [c for c in cases_ if not c["live"]], "live": [c for c in cases_ if c["live"]]}
    lines = [
        "# DreamBench results",
        "",
        "| set | cases | images | DINO | CLIP-I | CLIP-T |",
        "|---|---|---|---|---|---|",
    ]
    for name, cs in groups.items():
        if cs:
            means = [np.mean([c[m] for c in cs]) for m in METRICS]  # mean over cases, as DreamBooth averages subjects
            lines.append(
                f"| {name} | {len(cs)} | {sum(c['images'] for c in cs)} | "
                + " | ".join(f"{v:.4f}" for v in means)
                + " |"
            )
    lines += ["", "## Protocol", ""] + [
        f"- **{k}**: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in proto.items()
    ]
    return "\n".join(lines) + "\n"


def evaluate(
    pipe: Pipeline,
    scorer: Scorer,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: DreamBenchConfig | None = None,
    sampling: SamplingConfig | None = None,
    sam: str | None = None,
    progress: bool = False,
) -> dict:
    """Run DreamBench; write images/, images.csv (per image), per_subject.csv (per subject or pair), summary.md and
    summary.json under out_dir. Returns the summary (protocol, per-case rows, means). progress: a tqdm bar of
    the generated images (with the ETA) on stderr."""
    from tqdm.auto import tqdm

    cfg, sampling = cfg or DreamBenchConfig(), sampling or SamplingConfig()
    bench, out = read_bench(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = cases(bench, cfg)
    total = sum(len(case_prompts(bench, c, cfg.max_prompts)) for c in todo) * cfg.images_per_prompt
    bar = tqdm(total=total, unit="image", desc="dreambench", disable=not progress)
    refs, rows, t0 = {}, [], time.time()
    for case in todo:
        for s in case:
            if s not in refs:
                refs[s] = scorer.reference([str(p) for p in bench.images(s)])
        rows += run_case(pipe, scorer, bench, case, refs, cfg, sampling, out, bar)
    bar.close()
    write_csv(out / "images.csv", rows)
    per = per_case(rows, bench)
    write_csv(out / "per_subject.csv", per)
    proto = {**protocol(pipe, scorer, cfg, sampling, bench, len(todo), sam), "seconds": round(time.time() - t0, 1)}
    (out / "summary.md").write_text(summary_markdown(per, proto))
    means = {m: float(np.mean([c[m] for c in per])) for m in METRICS}
    summary = {"protocol": proto, "means": means, "per_subject": per}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
