"""Records -> training samples (the paper's training-data preparation), and an infinite, resumable stream of batches.

A sample, all fixed shapes (N = model.max_subjects subject slots, R = data.resolution, E = subject size):
    image: (3, R, R) uint8, a square crop keeping the chosen subjects, resized to R.
    subjects: (N, 3, E, E) uint8, each subject image (subjectdiff.model.subject_image), augmented.
    boxes: (N, 4) float32 xyxy normalized to the crop. present: (N,) bool. objects: (N,) long, the chosen
        objects' indices in the record (-1 = empty slot).
    masks: (N, R/8, R/8) float32 object masks in the crop (area-averaged), for the localization loss.
    prompt: the prompt text; input_ids: (77,) long, its tokens: the caption with ", the {label} is {placeholder}" per subject.
    placeholder_pos: (N,) long (-1 = none). loc_pos: (N, K) long token positions of each subject's map, -1 pad.
    key: the record key. part: the reader part (DataLoader worker) it came from; BatchStream counts and drops it.
Every random choice of a sample comes from a generator seeded by (seed, epoch, key): the same record gives the
same sample whatever the rank, worker or position, which makes resuming exact.

Object selection follows the reference code (`custom_dataset.py::verify_keys`, `is_valid_bbox`, `is_contained`,
`post_bbox_filter`): `object_ok` holds the per-object rules, `choose_subjects` walks the candidates in
descending score (or random order) and skips one contained in an already chosen box.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from PIL import Image

from catalogs.reader import DecodedRecord, RecordReader
from catalogs.schema import box_pixels_xyxy
from catalogs.selection import load_eligible_objects, load_selection
from catalogs.tokens import CONTEXT_LENGTH, clip_tokenizer
from subjectdiff.model.prompts import SubjectPrompt, subject_prompt, tokenize
from subjectdiff.model.subject_image import (SubjectAugment, background_files, background_photo, fill_holes,
                                             subject_image)
from train.config import DataConfig, TrainConfig

MAX_LOC_TOKENS = 8
WHITE = (255, 255, 255)
SELECTION_FILE = "selection.parquet"
NEAR_WHITE = 229  # a channel above 0.9 of 255 (the reference's `image > 0.9` on [0, 1] tensors)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    h = hashlib.sha1(f"{seed}/{epoch}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def white_fraction(image: np.ndarray) -> float:
    """(H, W, 3) uint8 -> the fraction of pixels whose three channels all exceed 0.9 (near-white)."""
    darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])  # 10x faster than .all(-1)
    return np.count_nonzero(darkest > NEAR_WHITE) / darkest.size


def box_segments(rec: DecodedRecord, i: int) -> int:
    """Distinct values of the record's label map inside object i's box: the objects' masks painted in record
    order (a later one covers an earlier one, as the reference's PNG does), 0 where none; background included."""
    x0, y0, x1, y1 = box_pixels_xyxy(list(rec.boxes[i]), rec.width, rec.height)
    later = np.zeros((y1 - y0, x1 - x0), bool)  # pixels painted by an object after the current one
    n = 0
    for m in rec.masks[::-1, y0:y1, x0:x1]:
        n += bool((m & ~later).any())  # object visible somewhere in the box
        later |= m
    return n + (not later.all())  # + the background


def object_ok(rec: DecodedRecord, i: int, cfg: DataConfig) -> bool:
    """Whether object i passes the per-object rules of `cfg` (DataConfig's docstring). The quality fields are
    the catalog's (computed when the shard was written), so `catalog select --object-where` with the same
    thresholds (catalogs.selection.REFERENCE_OBJECT_WHERE) agrees with these rules."""
    o, box = rec.objects[i], rec.boxes[i]
    if not (box[2] > box[0] and box[3] > box[1]) or not rec.masks[i].any():
        return False
    if "phrase" in cfg.loc_tokens and not (rec.tokens[i] and max(rec.tokens[i]) < CONTEXT_LENGTH - 1):
        return False
    if cfg.min_mask_area > 0 and o.mask_area < cfg.min_mask_area:
        return False
    if not cfg.object_rules:
        return True
    label = rec.labels[i]
    return bool(
        cfg.box_area[0] < o.area < cfg.box_area[1] and cfg.box_aspect[0] < o.aspect < cfg.box_aspect[1]
        and o.score > cfg.min_score and (not cfg.single_word_label or " " not in label.strip())
        and (not cfg.label_in_caption or label in rec.caption) and o.mask_fill >= cfg.min_mask_fill
        and (not cfg.mask_within_box or o.mask_area <= o.area)
        and cfg.box_segments[0] <= box_segments(rec, i) <= cfg.box_segments[1]
    )


def contained(a: np.ndarray, b: np.ndarray, ratio: float) -> bool:
    """Boxes a, b (xyxy): their intersection covers more than `ratio` of the smaller one (`is_contained`)."""
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return False
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller > ratio


def choose_subjects(rec: DecodedRecord, n: int, cfg: DataConfig, rng: np.random.Generator,
                    allowed: Sequence[int] | None = None) -> list[int]:
    """Up to n object indices: the candidates (among `allowed`, the selection's eligible objects, when given) in
    descending detection score (cfg.pick "score", ties in record order) or in random order, each kept when it
    passes `object_ok` and no chosen box contains it. An image with more than cfg.max_white near-white pixels
    gets none (the reference skips it; here it trains as a sample without subjects)."""
    if cfg.object_rules and white_fraction(rec.image) > cfg.max_white:
        return []
    order = [i for i in (range(len(rec.labels)) if allowed is None else allowed) if 0 <= i < len(rec.labels)]
    if cfg.pick == "score":
        order.sort(key=lambda i: -float(rec.scores[i]))
    else:
        order = [order[j] for j in rng.permutation(len(order))]
    chosen: list[int] = []
    for i in order:
        if len(chosen) == n:
            break
        if cfg.object_rules and any(contained(rec.boxes[c], rec.boxes[i], cfg.max_containment) for c in chosen):
            continue
        if object_ok(rec, i, cfg):
            chosen.append(i)
    return chosen


def crop_box_ok(box: np.ndarray, cfg: DataConfig) -> bool:
    """After the crop: the box (xyxy in [0, 1] of the crop) covers more than min_crop_box_area with height /
    width inside crop_aspect (the reference's `post_bbox_filter`)."""
    w, h = box[2] - box[0], box[3] - box[1]
    return bool(w > 0 and h > 0 and w * h > cfg.min_crop_box_area and cfg.crop_aspect[0] < h / w < cfg.crop_aspect[1])


def square_crop(w: int, h: int, boxes_px: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """(x0, y0, side) of a random square crop containing every box (xyxy pixels); it may reach outside the
    image (padded) only when the boxes' union is wider or taller than the image's short side."""
    short = min(w, h)
    if len(boxes_px):
        ux0, uy0 = boxes_px[:, 0].min(), boxes_px[:, 1].min()
        ux1, uy1 = boxes_px[:, 2].max(), boxes_px[:, 3].max()
        need = int(max(np.ceil(ux1) - np.floor(ux0), np.ceil(uy1) - np.floor(uy0)))  # whole pixels
    else:
        ux0, uy0, ux1, uy1, need = 0, 0, w, h, 1
    side = int(rng.integers(need, short + 1)) if need <= short else need

    def start(u0: float, u1: float, extent: int) -> int:
        # the crop [x, x + side) must cover [u0, u1]; inside the image when it fits
        lo, hi = int(np.ceil(u1)) - side, int(np.floor(u0))
        if side <= extent:
            lo, hi = max(lo, 0), min(hi, extent - side)
        return int(rng.integers(lo, hi + 1))

    return start(ux0, ux1, w), start(uy0, uy1, h), side


def crop_pad(img: Image.Image, x0: int, y0: int, side: int, fill) -> Image.Image:
    """A side x side crop at (x0, y0), padded with `fill` where it leaves the image."""
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img.crop((max(x0, 0), max(y0, 0), min(x0 + side, img.width), min(y0 + side, img.height))),
              (max(-x0, 0), max(-y0, 0)))
    return out


def filled_mask(mask: np.ndarray) -> np.ndarray:
    """The mask with its enclosed holes filled, computed inside its bounding box only (holes lie within it)."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(ys):
        return mask
    out = mask.copy()
    box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    out[box] = fill_holes(mask[box])
    return out


def loc_positions(rec: DecodedRecord, idx: int, sp: SubjectPrompt, j: int, which: tuple[str, ...]) -> list[int]:
    """Token positions whose attention maps localize subject j (object idx): its own clause's label word and
    placeholder (the reference's `image_token_idx` and `image_token_idx - 2`), and/or the caption phrase."""
    pos: list[int] = []
    if "phrase" in which:
        pos += [p for p in rec.tokens[idx] if p < CONTEXT_LENGTH - 1]
    if "label" in which and sp.placeholder_pos[j] >= 0:
        pos += sp.label_pos[j]
    if "placeholder" in which and sp.placeholder_pos[j] >= 0:
        pos.append(sp.placeholder_pos[j])
    return list(dict.fromkeys(pos))[:MAX_LOC_TOKENS]


def augmentation(cfg: DataConfig) -> SubjectAugment | None:
    if not cfg.augment:
        return None
    return SubjectAugment(cfg.flip_p, cfg.rotate_deg, cfg.perspective, cfg.perspective_p, cfg.background_area)


def make_sample(rec: DecodedRecord, cfg: TrainConfig, subject_size: int, rng: np.random.Generator,
                allowed: Sequence[int] | None = None) -> dict[str, Any]:
    """One training sample from one record (see the module docstring for the fields). allowed: the selection's
    eligible objects of this record (None: all)."""
    n, r, d = cfg.model.max_subjects, cfg.data.resolution, cfg.data
    chosen = choose_subjects(rec, n, d, rng, allowed)
    wh = np.array([rec.width, rec.height] * 2, np.float32)
    x0, y0, side = square_crop(rec.width, rec.height, rec.boxes[chosen] * wh, rng)
    boxes = [np.clip((rec.boxes[i] * wh - [x0, y0, x0, y0]) / side, 0, 1).astype(np.float32) for i in chosen]
    if d.object_rules:
        kept = [k for k, b in enumerate(boxes) if crop_box_ok(b, d)]
        chosen, boxes = [chosen[k] for k in kept], [boxes[k] for k in kept]
    image = crop_pad(Image.fromarray(rec.image), x0, y0, side, (127, 127, 127))
    image = image.resize((r, r), Image.BICUBIC, reducing_gap=2.0)
    sp = subject_prompt(rec.caption, [rec.labels[i] for i in chosen], cfg.model.placeholder)
    out = {
        "key": rec.key,
        "image": np.asarray(image, np.uint8).transpose(2, 0, 1).copy(),
        "subjects": np.full((n, 3, subject_size, subject_size), 255, np.uint8),
        "boxes": np.zeros((n, 4), np.float32),
        "present": np.zeros(n, bool),
        "objects": np.full(n, -1, np.int64),
        "masks": np.zeros((n, r // 8, r // 8), np.float32),
        "prompt": sp.prompt,
        "labels": json.dumps([rec.labels[i] for i in chosen]),  # JSON text: batches of strings collate
        "input_ids": np.asarray(tokenize(sp.prompt), np.int64),
        "placeholder_pos": np.full(n, -1, np.int64),
        "loc_pos": np.full((n, MAX_LOC_TOKENS), -1, np.int64),
    }
    aug = augmentation(d)
    files = background_files(d.backgrounds) if d.backgrounds and aug is not None else ()
    for j, i in enumerate(chosen):
        mask = filled_mask(rec.masks[i]) if d.fill_holes else rec.masks[i]
        bg = background_photo(files[int(rng.integers(len(files)))], subject_size, rng) if files else None
        fill = WHITE if d.background == "white" else tuple(int(c) for c in rng.integers(0, 256, 3))
        out["subjects"][j] = subject_image(rec.image, mask, subject_size, augment=aug, rng=rng, background=bg,
                                           fill=fill).transpose(2, 0, 1)
        out["boxes"][j] = boxes[j]
        out["present"][j] = sp.placeholder_pos[j] >= 0
        out["objects"][j] = i
        m = crop_pad(Image.fromarray(mask.astype(np.uint8) * 255), x0, y0, side, 0)
        out["masks"][j] = np.asarray(m.resize((r // 8, r // 8), Image.BOX), np.float32) / 255
        out["placeholder_pos"][j] = sp.placeholder_pos[j]
        pos = loc_positions(rec, i, sp, j, d.loc_tokens)
        out["loc_pos"][j, : len(pos)] = pos
    return out


class TrainSamples(torch.utils.data.IterableDataset):
    """Training samples from a RecordReader (which splits records over ranks and DataLoader workers).
    eligible: {record key: object indices} from a selection made with an object predicate; a record's
    subjects are chosen among its eligible objects only (None: among all)."""

    def __init__(self, reader: RecordReader, cfg: TrainConfig, subject_size: int,
                 eligible: dict[str, list[int]] | None = None):
        self.reader, self.cfg, self.subject_size, self.eligible = reader, cfg, subject_size, eligible
        self.epoch = 0
        clip_tokenizer()  # load the BPE once here: forked DataLoader workers inherit it instead of reloading
        if cfg.data.backgrounds and cfg.data.augment:
            background_files(cfg.data.backgrounds)  # list the folder once, before the workers fork

    def set_epoch(self, epoch: int, skip: Sequence[int] = (), first_worker: int = 0) -> None:
        """Epoch `epoch`; skip and first_worker go to RecordReader.set_epoch (a resumed position)."""
        self.epoch = epoch
        self.reader.set_epoch(epoch, skip, first_worker)

    def sample(self, rec: DecodedRecord) -> dict[str, Any]:
        """The training sample of one record in the current epoch."""
        allowed = None if self.eligible is None else self.eligible.get(rec.key, [])
        rng = sample_rng(self.cfg.run.seed, self.epoch, rec.key)
        return make_sample(rec, self.cfg, self.subject_size, rng, allowed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        part, _ = self.reader.worker_part()
        for rec in self.reader:
            sample = self.sample(rec)
            sample["part"] = part
            yield sample


def run_selection(cfg: DataConfig, out_dir: str, resume: bool) -> str | None:
    """The run's selection Parquet (read on rank 0): data.selection, or data.where's and data.object_where's,
    which `catalog select` writes to out_dir/selection.parquet when the run starts. A resumed run reuses that
    file and never queries again: its saved data position counts records of that selection, and the catalog may
    have changed since."""
    if not (cfg.where or cfg.object_where):
        return cfg.selection
    path = os.path.join(out_dir, SELECTION_FILE)
    if resume:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume with data.where: {path}, the selection this run started with, is "
                                    "missing; restore it (or pass it as data.selection) to continue the run")
        saved = json.loads(pq.read_schema(path).metadata[b"subjectdiff.selection"])
        for name in ("where", "object_where"):
            if saved.get(name) != getattr(cfg, name):
                raise ValueError(f"data.{name} is {getattr(cfg, name)!r}, but the run started with "
                                 f"{saved.get(name)!r} ({path}): a resumed run keeps its selection; start a new run "
                                 "(another run.out_dir) for a new one")
        return path
    from catalogs.selection import REFERENCE_OBJECT_WHERE, select

    from catalogs import catalog

    root = cfg.catalog or cfg.shards[0]
    if not catalog.catalog_path(root).exists():  # a bucket's catalog is a local file: made here on first use
        catalog.build(root)
    objects = REFERENCE_OBJECT_WHERE if cfg.object_where == "reference" else cfg.object_where
    if select(root, cfg.where, path, object_where=objects) == 0:
        raise ValueError(f"data.where {cfg.where!r} / data.object_where {cfg.object_where!r} select no record of "
                         f"the catalog in {root}")
    return path


def shared_selection(cfg: DataConfig, out_dir: str, rank: int, world: int, resume: bool
                     ) -> tuple[dict[str, set[str]] | None, dict[str, list[int]] | None]:
    """The run's selection on every rank: ({shard path: keys}, {key: eligible object indices} or None). Rank 0
    resolves and reads it (run_selection) and broadcasts it through torch.distributed, so no other rank reads
    rank 0's files (nodes need no shared filesystem for it). A failure on rank 0 reaches the other ranks instead
    of leaving them waiting."""
    if not (cfg.where or cfg.object_where or cfg.selection):
        return None, None
    box: list[Any] = [None]
    if rank == 0:
        try:
            path = run_selection(cfg, out_dir, resume)
            box[0] = (load_selection(path), load_eligible_objects(path))
        except Exception as e:
            if world > 1:
                dist.broadcast_object_list([f"{type(e).__name__}: {e}"], src=0)
            raise
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise RuntimeError(f"rank 0 could not resolve the run's selection: {box[0]}")
    return box[0]


def make_reader(cfg: DataConfig, selection: dict[str, set[str]] | None, rank: int, world: int,
                seed: int) -> RecordReader:
    """The balanced reader of this rank: every rank and worker yields the same number of full batches per epoch."""
    queried = (cfg.where or cfg.object_where) and not cfg.catalog
    shards = list(cfg.shards) if cfg.shards and not queried else None
    if shards is None and selection is None:
        raise ValueError("no training data: set data.shards, data.selection, or data.where with data.catalog")
    return RecordReader(shards, selection=selection, split="balanced", multiple=cfg.batch_size, rank=rank,
                        world_size=world, shuffle_seed=seed)


class BatchStream:
    """Infinite batches over epochs, with an exact position that resumes without re-reading the data.

    The balanced reader gives every DataLoader worker of every rank the same number of full batches per epoch,
    and the DataLoader takes them round robin (worker 0, 1, ..., 0, 1, ...). The position is (epoch, batches
    taken, records taken from each worker's part). A resumed stream has each part skip its taken records inside
    the reader (no decoding) and starts the round robin at the part whose batch was due next: it yields exactly
    the batches the interrupted stream would have.
    """

    def __init__(self, dataset: TrainSamples, batch_size: int, num_workers: int):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.parts = max(num_workers, 1)
        self.epoch, self.batches, self.samples = 0, 0, [0] * self.parts

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "samples": list(self.samples)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`. One without per-part counts (older checkpoints) continues where replaying
        its batches would: the parts' counts follow from the round robin."""
        b = state["batches"]
        samples = state["samples"] if "samples" in state else [
            self.batch_size * len(range(p, b, self.parts)) for p in range(self.parts)]
        if len(samples) != self.parts:
            raise ValueError(f"the data position is for {len(samples)} DataLoader workers per rank, this run has "
                             f"{self.parts} (data.num_workers): the records split differently")
        self.epoch, self.batches, self.samples = state["epoch"], b, list(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            self.dataset.set_epoch(self.epoch, self.samples, self.batches % self.parts)
            loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                                 num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                                 persistent_workers=False)
            for batch in loader:
                self.samples[int(batch.pop("part")[0])] += len(batch["key"])
                self.batches += 1
                yield batch
            if self.batches == 0:
                raise RuntimeError(f"epoch {self.epoch} gave this rank no batch: fewer records than ranks x workers "
                                   "x batch size?")
            self.epoch, self.batches, self.samples = self.epoch + 1, 0, [0] * self.parts
