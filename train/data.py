"""Records -> training samples (the paper's training-data preparation), and an infinite, resumable stream of batches.

A sample, all fixed shapes (N = model.max_subjects subject slots, R = data.resolution, E = subject size):
    image: (3, R, R) uint8, a square crop keeping the chosen subjects, resized to R.
    subjects: (N, 3, E, E) uint8, each subject cut out with its mask on a white/random background, augmented.
    boxes: (N, 4) float32 xyxy normalized to the crop. present: (N,) bool.
    masks: (N, R/8, R/8) float32 object masks in the crop (area-averaged), for the localization loss.
    input_ids: (77,) long, the prompt with ", the {label} is {placeholder}" per subject.
    placeholder_pos: (N,) long (-1 = none). loc_pos: (N, K) long token positions of each subject's map, -1 pad.
    key: the record key. part: the reader part (DataLoader worker) it came from; BatchStream counts and drops it.
Every random choice of a sample comes from a generator seeded by (seed, epoch, key): the same record gives the
same sample whatever the rank, worker or position, which makes resuming exact.
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
from catalogs.selection import load_selection
from catalogs.tokens import CONTEXT_LENGTH, clip_tokenizer
from subjectdiff.model.prompts import subject_prompt, tokenize
from train.config import DataConfig, TrainConfig

MAX_LOC_TOKENS = 8
WHITE = (255, 255, 255)
SELECTION_FILE = "selection.parquet"


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    h = hashlib.sha1(f"{seed}/{epoch}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def choose_subjects(rec: DecodedRecord, n: int, min_area: float, rng: np.random.Generator) -> list[int]:
    """Up to n objects, in random order, whose tokens survive CLIP truncation and whose mask is not tiny."""
    area = rec.masks.reshape(len(rec.labels), -1).mean(1) if len(rec.labels) else np.zeros(0)
    ok = [i for i in range(len(rec.labels))
          if rec.tokens[i] and max(rec.tokens[i]) < CONTEXT_LENGTH - 1 and area[i] >= min_area
          and rec.boxes[i, 2] > rec.boxes[i, 0] and rec.boxes[i, 3] > rec.boxes[i, 1]]
    rng.shuffle(ok)
    return ok[:n]


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


def perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """PIL's 8 PERSPECTIVE coefficients that map output points `dst` (4, 2) back to input points `src` (4, 2)."""
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    return np.linalg.solve(a, src.reshape(-1).astype(float))


def cut_out(image: np.ndarray, mask: np.ndarray, box: np.ndarray, cfg: DataConfig, size: int,
            rng: np.random.Generator) -> np.ndarray:
    """The subject inside its box, its mask applied on a white (or random colour) background, padded to a
    square, resized to `size`, then flipped / rotated / perspective-warped: (3, size, size) uint8.
    The box is resized before the mask is applied (cheap on large images; soft mask edges)."""
    h, w = mask.shape
    x0, y0, x1, y1 = (box * [w, h, w, h]).round().astype(int)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    bg = WHITE if cfg.background == "white" else tuple(int(c) for c in rng.integers(0, 256, 3))
    side = max(x1 - x0, y1 - y0)
    px, py = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
    rgb = Image.new("RGB", (side, side), bg)
    rgb.paste(Image.fromarray(image[y0:y1, x0:x1]), (x0 - px, y0 - py))
    alpha = Image.new("L", (side, side), 0)
    alpha.paste(Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255), (x0 - px, y0 - py))
    rgb, alpha = rgb.resize((size, size), Image.BICUBIC, reducing_gap=2.0), alpha.resize((size, size), Image.BILINEAR)
    pil = Image.composite(rgb, Image.new("RGB", (size, size), bg), alpha)
    if rng.random() < cfg.flip_p:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    if cfg.rotate_deg > 0:
        pil = pil.rotate(float(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)), Image.BILINEAR, fillcolor=bg)
    if cfg.perspective > 0:
        corners = np.array([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]], float)
        shift = rng.uniform(0, cfg.perspective * size, (4, 2)) * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
        coeffs = perspective_coeffs(corners, corners + shift)
        pil = pil.transform((size, size), Image.PERSPECTIVE, tuple(coeffs), Image.BILINEAR, fillcolor=bg)
    return np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1)


def loc_positions(rec: DecodedRecord, idx: int, placeholder_pos: int, which: tuple[str, ...]) -> list[int]:
    pos = [p for p in rec.tokens[idx] if p < CONTEXT_LENGTH - 1] if "phrase" in which else []
    if "placeholder" in which and placeholder_pos >= 0:
        pos.append(placeholder_pos)
    return pos[:MAX_LOC_TOKENS]


def make_sample(rec: DecodedRecord, cfg: TrainConfig, subject_size: int, rng: np.random.Generator) -> dict[str, Any]:
    """One training sample from one record (see the module docstring for the fields)."""
    n, r, d = cfg.model.max_subjects, cfg.data.resolution, cfg.data
    chosen = choose_subjects(rec, n, d.min_mask_area, rng)
    wh = np.array([rec.width, rec.height] * 2, np.float32)
    x0, y0, side = square_crop(rec.width, rec.height, rec.boxes[chosen] * wh, rng)
    image = crop_pad(Image.fromarray(rec.image), x0, y0, side, (127, 127, 127))
    image = image.resize((r, r), Image.BICUBIC, reducing_gap=2.0)
    sp = subject_prompt(rec.caption, [rec.labels[i] for i in chosen], cfg.model.placeholder)
    out = {
        "key": rec.key,
        "image": np.asarray(image, np.uint8).transpose(2, 0, 1).copy(),
        "subjects": np.full((n, 3, subject_size, subject_size), 255, np.uint8),
        "boxes": np.zeros((n, 4), np.float32),
        "present": np.zeros(n, bool),
        "masks": np.zeros((n, r // 8, r // 8), np.float32),
        "input_ids": np.asarray(tokenize(sp.prompt), np.int64),
        "placeholder_pos": np.full(n, -1, np.int64),
        "loc_pos": np.full((n, MAX_LOC_TOKENS), -1, np.int64),
    }
    for j, i in enumerate(chosen):
        out["subjects"][j] = cut_out(rec.image, rec.masks[i], rec.boxes[i], d, subject_size, rng)
        box = (rec.boxes[i] * wh - [x0, y0, x0, y0]) / side
        out["boxes"][j] = np.clip(box, 0, 1)
        out["present"][j] = sp.placeholder_pos[j] >= 0
        m = crop_pad(Image.fromarray(rec.masks[i].astype(np.uint8) * 255), x0, y0, side, 0)
        out["masks"][j] = np.asarray(m.resize((r // 8, r // 8), Image.BOX), np.float32) / 255
        out["placeholder_pos"][j] = sp.placeholder_pos[j]
        pos = loc_positions(rec, i, sp.placeholder_pos[j], d.loc_tokens)
        out["loc_pos"][j, : len(pos)] = pos
    return out


class TrainSamples(torch.utils.data.IterableDataset):
    """Training samples from a RecordReader (which splits records over ranks and DataLoader workers)."""

    def __init__(self, reader: RecordReader, cfg: TrainConfig, subject_size: int):
        self.reader, self.cfg, self.subject_size = reader, cfg, subject_size
        self.epoch = 0
        clip_tokenizer()  # load the BPE once here: forked DataLoader workers inherit it instead of reloading

    def set_epoch(self, epoch: int, skip: Sequence[int] = (), first_worker: int = 0) -> None:
        """Epoch `epoch`; skip and first_worker go to RecordReader.set_epoch (a resumed position)."""
        self.epoch = epoch
        self.reader.set_epoch(epoch, skip, first_worker)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        part, _ = self.reader.worker_part()
        for rec in self.reader:
            sample = make_sample(rec, self.cfg, self.subject_size, sample_rng(self.cfg.run.seed, self.epoch, rec.key))
            sample["part"] = part
            yield sample


def run_selection(cfg: DataConfig, out_dir: str, resume: bool) -> str | None:
    """The run's selection Parquet (read on rank 0): data.selection, or data.where's, which `catalog select`
    writes to out_dir/selection.parquet when the run starts. A resumed run reuses that file and never queries
    again: its saved data position counts records of that selection, and the catalog may have changed since."""
    if not cfg.where:
        return cfg.selection
    path = os.path.join(out_dir, SELECTION_FILE)
    if resume:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume with data.where: {path}, the selection this run started with, is "
                                    "missing; restore it (or pass it as data.selection) to continue the run")
        saved = json.loads(pq.read_schema(path).metadata[b"subjectdiff.selection"])["where"]
        if saved != cfg.where:
            raise ValueError(f"data.where is {cfg.where!r}, but the run started with {saved!r} ({path}): a resumed "
                             "run keeps its selection; start a new run (another run.out_dir) for a new one")
        return path
    from catalogs.selection import select

    root = cfg.catalog or cfg.shards[0]
    if select(root, cfg.where, path) == 0:
        raise ValueError(f"data.where {cfg.where!r} selects no record of the catalog in {root}")
    return path


def shared_selection(cfg: DataConfig, out_dir: str, rank: int, world: int, resume: bool) -> dict[str, set[str]] | None:
    """The run's selection as {shard path: keys} on every rank: rank 0 resolves and reads it (run_selection)
    and broadcasts it through torch.distributed, so no other rank reads rank 0's files (nodes need no shared
    filesystem for it). A failure on rank 0 reaches the other ranks instead of leaving them waiting."""
    if not (cfg.where or cfg.selection):
        return None
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = load_selection(run_selection(cfg, out_dir, resume))
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
    shards = list(cfg.shards) if cfg.shards and not (cfg.where and not cfg.catalog) else None
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
