"""Records -> training samples (the paper's training-data preparation), and an infinite, resumable stream of batches.

A sample, all fixed shapes (N = model.max_subjects subject slots, R = data.resolution, E = subject size):
    image: (3, R, R) uint8, a square crop of the image (inside it: never padded), resized to R.
    subjects: (N, 3, E, E) uint8, each subject image (subjectdiff.model.subject_image), augmented.
    boxes: (N, 4) float32 xyxy normalized to the crop. present: (N,) bool. objects: (N,) long, the chosen
        objects' indices in the record (-1 = empty slot). Present slots come first.
    masks: (N, R/8, R/8) float32 object masks (within their boxes) in the crop, area-averaged, for the
        localization loss.
    crop: (3,) long, (x0, y0, side) of the crop in the record's pixels.
    prompt: the prompt text; input_ids: (77,) long, its tokens: the caption with ", the {label} is {placeholder}"
        per subject.
    placeholder_pos: (N,) long (-1 = none). loc_pos: (N, K) long token positions of each subject's map, -1 pad.
    key: the record key (a pair sample's: its target record). part, taken, paired, skipped: the reader part
        (DataLoader worker) it came from, the records and the pairs (train --pairs) that part has consumed with
        it, and the records skipped since its previous sample ({reason: count} as JSON; a part's last sample
        also carries those skipped after it); BatchStream keeps and drops them.
    With --pairs (train/pairs.py) the samples also carry pair (bool), ref_keys (JSON: each subject image's
        record) and ref_objects (N,) long (its object there, -1 = empty slot). A pair sample (make_pair_sample)
        is its target record's crop, boxes, masks, prompt and tokens with each subject image cut from its
        reference object, seeded by (seed, epoch, pair row, slot).
Every random choice of a sample comes from a generator seeded by (seed, epoch, key): the same record gives the
same sample whatever the rank, worker or position, which makes resuming exact.

Object selection follows the reference code (`custom_dataset.py::verify_keys`, `is_valid_bbox`, `is_contained`,
`post_bbox_filter`): `object_fault` holds the per-object rules, `choose_subjects` walks the candidates in
descending score (or random order) and skips one contained in an already chosen box; `square_crop` crops the
image's short side around them (data.crop), and `subjects_in_crop` drops what the crop cuts. A record left
without a subject is skipped (data.no_subject="skip", the reference's way, counted by reason) or trains text
only (data.no_subject="text"). A record the reader refuses (catalogs.reader.BadRecordError: a link member, a
missing member, malformed JSON) stops the run naming its shard and key (data.on_bad_record="raise") or is skipped
and counted as "bad record" with them (data.on_bad_record="skip").
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from PIL import Image

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.boxes import xyxy_norm_to_crop_norm, xyxy_norm_to_pixel_rect, xyxy_pixels_union_rect
from subjectdiff.catalogs.reader import BadRecord, BadRecordError, DecodedRecord, RecordReader
from subjectdiff.catalogs.schema import white_fraction
from subjectdiff.catalogs.selection import REFERENCE_OBJECT_WHERE, load_eligible_objects, load_selection, select
from subjectdiff.catalogs.tokens import CONTEXT_LENGTH, clip_tokenizer
from subjectdiff.errors import UsageError, say_now
from subjectdiff.model.prompts import SubjectPrompt, subject_prompt, tokenize
from subjectdiff.model.subject_image import (
    SubjectAugment,
    background_files,
    background_photo,
    fill_holes,
    subject_image,
)
from subjectdiff.train.config import DataConfig, TrainConfig
from subjectdiff.train.pairs import PairIndex, PairMixer

MAX_LOC_TOKENS = 8
SHOW_BAD = 3  # bad records named on stderr in a row of skipped ones (data.on_bad_record="skip")
WHITE = (255, 255, 255)
SELECTION_FILE = "selection.parquet"
T = TypeVar("T")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    h = hashlib.sha1(f"{seed}/{epoch}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


class NoSubject(NamedTuple):
    """A record that gives no training sample under data.no_subject="skip". code: a short reason to count
    (SKIP_CODES); detail: one line a user can act on."""

    code: str
    detail: str


BAD_RECORD = "bad record"  # the skip code of a record the reader refuses (data.on_bad_record="skip")
SKIP_CODES = (
    "no objects",
    "no eligible object",
    "near-white image",
    "object rules",
    "cut by the crop",
    "prompt too long",
    "pair object rules",
    "pair cut by the crop",
    BAD_RECORD,
)


def box_rect(rec: DecodedRecord, i: int) -> tuple[int, int, int, int]:
    """Object i's box in whole pixels (x0, y0, x1, y1), x1 and y1 exclusive (catalogs.boxes.xyxy_norm_to_pixel_rect)."""
    return xyxy_norm_to_pixel_rect(list(rec.boxes[i]), rec.width, rec.height)


def boxed_mask(rec: DecodedRecord, i: int) -> np.ndarray:
    """(H, W) bool: object i's mask inside its box. A subject is the mask within its detection box, as the
    reference cuts it (`image_seg(bbox, ...)`): SAM may spill past the box, the subject and its localization
    mask never do."""
    x0, y0, x1, y1 = box_rect(rec, i)
    out = np.zeros_like(rec.masks[i])
    out[y0:y1, x0:x1] = rec.masks[i][y0:y1, x0:x1]
    return out


def box_segments(rec: DecodedRecord, i: int) -> int:
    """Distinct values of the record's label map inside object i's box: the objects' masks painted in record
    order (a later one covers an earlier one, as the reference's PNG does), 0 where none; background included."""
    x0, y0, x1, y1 = box_rect(rec, i)
    later = np.zeros((y1 - y0, x1 - x0), bool)  # pixels painted by an object after the current one
    n = 0
    for m in rec.masks[::-1, y0:y1, x0:x1]:
        n += bool((m & ~later).any())  # object visible somewhere in the box
        later |= m
    return n + (not later.all())  # + the background


def label_named(rec: DecodedRecord, i: int) -> bool:
    """The caption names object i: its label occurs in it, or its own phrase does (the caption's words for it:
    "two people" names a `person`, "knives" a `knife`)."""
    phrase = rec.phrases[i] if i < len(rec.phrases) else ""
    return rec.labels[i] in rec.caption or bool(phrase and phrase in rec.caption)


def _outside(name: str, value: float, bounds: tuple[float, float]) -> str | None:
    """None when bounds[0] < value < bounds[1], else why not (the open intervals of the rules)."""
    return None if bounds[0] < value < bounds[1] else f"{name} {value:.3g} not in ({bounds[0]:g}, {bounds[1]:g})"


def object_fault(rec: DecodedRecord, i: int, cfg: DataConfig) -> str | None:
    """The first per-object rule of `cfg` (DataConfig's docstring) that object i fails, as `data.<option>` words;
    None when it passes them all. Whatever the rules, a subject needs a box with area, mask pixels inside it
    and (with "phrase" localization tokens) caption tokens within the context. The quality fields are the
    catalog's (computed when the shard was written), so `catalog select --object-where` with the same thresholds
    (catalogs.selection.REFERENCE_OBJECT_WHERE) agrees with these rules."""
    o, box = rec.objects[i], rec.boxes[i]
    if not (box[2] > box[0] and box[3] > box[1]):
        return f"box {np.round(box, 4).tolist()} has no area"
    x0, y0, x1, y1 = box_rect(rec, i)
    if not rec.masks[i][y0:y1, x0:x1].any():
        return "its mask has no pixel inside its box"
    if "phrase" in cfg.loc_tokens and not (rec.tokens[i] and max(rec.tokens[i]) < CONTEXT_LENGTH - 1):
        return "data.loc_tokens 'phrase': its caption words lie beyond the 77-token context"
    if cfg.min_mask_area > 0 and o.mask_area < cfg.min_mask_area:
        return f"data.min_mask_area: {o.mask_area:.3g} < {cfg.min_mask_area:g}"
    if not cfg.object_rules:
        return None
    label = rec.labels[i]
    faults = (
        lambda: _outside("data.box_area", o.area, cfg.box_area),
        lambda: _outside("data.box_aspect", o.aspect, cfg.box_aspect),
        lambda: None if o.score > cfg.min_score else f"data.min_score: score {o.score:.3g} <= {cfg.min_score:g}",
        lambda: (
            None
            if not cfg.single_word_label or " " not in label.strip()
            else f"data.single_word_label: label {label!r} has several words"
        ),
        lambda: (
            None
            if not cfg.label_in_caption or label_named(rec, i)
            else f"data.label_in_caption: neither label {label!r} nor its phrase is in the caption"
        ),
        lambda: (
            None
            if o.mask_fill >= cfg.min_mask_fill
            else f"data.min_mask_fill: mask fills {o.mask_fill:.3g} of its box < {cfg.min_mask_fill:g}"
        ),
        lambda: (
            None
            if not cfg.mask_within_box or o.mask_area <= o.area
            else "data.mask_within_box: the mask has more pixels than its box"
        ),
        lambda: _segments_fault(rec, i, cfg),
    )
    return next((f for f in (check() for check in faults) if f), None)


def _segments_fault(rec: DecodedRecord, i: int, cfg: DataConfig) -> str | None:
    n, (lo, hi) = box_segments(rec, i), cfg.box_segments
    return None if lo <= n <= hi else f"data.box_segments: {n} segments in the box, not in [{lo}, {hi}]"


def object_ok(rec: DecodedRecord, i: int, cfg: DataConfig) -> bool:
    """Whether object i passes the per-object rules of `cfg` (object_fault)."""
    return object_fault(rec, i, cfg) is None


def contained(a: np.ndarray, b: np.ndarray, ratio: float) -> bool:
    """Boxes a, b (xyxy): their intersection covers more than `ratio` of the smaller one (`is_contained`)."""
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return False
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller > ratio


def candidates(
    rec: DecodedRecord, cfg: DataConfig, rng: np.random.Generator, allowed: Sequence[int] | None = None
) -> list[int]:
    """The record's objects (among `allowed`, the selection's eligible objects, when given) in the order
    subjects are chosen: descending detection score (cfg.pick "score", ties in record order) or random."""
    order = [i for i in (range(len(rec.labels)) if allowed is None else allowed) if 0 <= i < len(rec.labels)]
    if cfg.pick == "score":
        order.sort(key=lambda i: -float(rec.scores[i]))
    else:
        order = [order[j] for j in rng.permutation(len(order))]
    return order


def too_white(rec: DecodedRecord, cfg: DataConfig) -> float | None:
    """The image's near-white fraction when the object rules refuse it subjects (more than cfg.max_white)."""
    if not cfg.object_rules:
        return None
    wf = white_fraction(rec.image)
    return wf if wf > cfg.max_white else None


def choose_subjects(
    rec: DecodedRecord, n: int, cfg: DataConfig, rng: np.random.Generator, allowed: Sequence[int] | None = None
) -> list[int]:
    """Up to n object indices: the candidates in order, each kept when it passes `object_ok` and no chosen box
    contains it. An image with more than cfg.max_white near-white pixels gets none (the reference skips it)."""
    if too_white(rec, cfg) is not None:
        return []
    chosen: list[int] = []
    for i in candidates(rec, cfg, rng, allowed):
        if len(chosen) == n:
            break
        if cfg.object_rules and any(contained(rec.boxes[c], rec.boxes[i], cfg.max_containment) for c in chosen):
            continue
        if object_ok(rec, i, cfg):
            chosen.append(i)
    return chosen


def no_subject(rec: DecodedRecord, cfg: DataConfig, allowed: Sequence[int] | None) -> NoSubject:
    """Why choose_subjects found no subject in rec, for counting and for messages."""
    if not rec.labels:
        return NoSubject("no objects", "the record has no objects")
    wf = too_white(rec, cfg)
    if wf is not None:
        return NoSubject(
            "near-white image", f"near-white image: {wf:.0%} of its pixels above 0.9 > data.max_white {cfg.max_white:g}"
        )
    order = candidates(rec, cfg, np.random.default_rng(0), allowed)
    if not order:
        return NoSubject("no eligible object", "none of its objects is eligible in the selection (--object-where)")
    i = order[0]
    return NoSubject(
        "object rules",
        f"no object passes the object rules; the best candidate, object {i} "
        f"({rec.labels[i]!r}): {object_fault(rec, i, cfg)}",
    )


def crop_box_ok(box: np.ndarray, cfg: DataConfig) -> bool:
    """After the crop: the box (xyxy in [0, 1] of the crop) covers more than min_crop_box_area with height /
    width inside crop_aspect (the reference's `post_bbox_filter`)."""
    w, h = box[2] - box[0], box[3] - box[1]
    return bool(w > 0 and h > 0 and w * h > cfg.min_crop_box_area and cfg.crop_aspect[0] < h / w < cfg.crop_aspect[1])


def _union_side(boxes_px: np.ndarray) -> int:
    """(K, 4) xyxy pixel boxes, K >= 1 -> the longer side of their union's pixel rect."""
    x0, y0, x1, y1 = xyxy_pixels_union_rect(boxes_px)
    return max(x1 - x0, y1 - y0)


def _crop_offset(u0: int, u1: int, extent: int, side: int, rng: np.random.Generator) -> int:
    """A random start x of [x, x + side) inside [0, extent) that covers [u0, u1) when it fits in side, and
    lies inside [u0, u1) when it does not."""
    if u1 - u0 <= side:
        lo, hi = max(u1 - side, 0), min(u0, extent - side)
    else:
        lo, hi = u0, min(u1 - side, extent - side)
    return int(rng.integers(lo, hi + 1))


def square_crop(
    w: int, h: int, boxes_px: np.ndarray, rng: np.random.Generator, policy: str = "short-side"
) -> tuple[int, int, int]:
    """(x0, y0, side) of a random square crop, always inside the image (never padded). boxes_px: (K, 4) xyxy
    pixels, the chosen subjects in pick order. The crop contains the union of as many of them, in order, as fit
    in the image's short side (all of them unless their union is wider or taller than it); when not even the
    first fits, it lies inside the first box on the axis that box overflows. Boxes it cuts are clipped by the
    caller. policy: "short-side" (the reference's: side = the short side), or "zoom" (a side drawn between the
    contained boxes' extent and the short side: a closer view). Without boxes: the short side at a random
    offset."""
    short = max(min(w, h), 1)
    k = len(boxes_px)
    while k and _union_side(boxes_px[:k]) > short:
        k -= 1
    if len(boxes_px) == 0:
        ux0, uy0, ux1, uy1 = 0, 0, w, h
    else:
        ux0, uy0, ux1, uy1 = xyxy_pixels_union_rect(boxes_px[: max(k, 1)])
    side = short
    if policy == "zoom" and k:
        side = int(rng.integers(max(ux1 - ux0, uy1 - uy0, 1), short + 1))
    return _crop_offset(ux0, ux1, w, side, rng), _crop_offset(uy0, uy1, h, side, rng), side


def crop_box(box: np.ndarray, rec: DecodedRecord, x0: int, y0: int, side: int) -> np.ndarray:
    """A record box (xyxy in [0, 1] of the image) -> xyxy in [0, 1] of the crop, clipped to it. (4,) float32."""
    return xyxy_norm_to_crop_norm(box, rec.width, rec.height, x0, y0, side)


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


def subjects_in_crop(
    rec: DecodedRecord, chosen: list[int], crop: tuple[int, int, int], cfg: DataConfig
) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """The chosen objects that stay subjects in the crop (x0, y0, side), with their boxes in the crop and their
    boxed masks: an object stays when part of its boxed mask lies in the crop and, with the object rules, its
    clipped box passes the reference's post-crop rule (crop_box_ok)."""
    x0, y0, side = crop
    kept, boxes, masks = [], [], []
    for i in chosen:
        box, mask = crop_box(rec.boxes[i], rec, x0, y0, side), boxed_mask(rec, i)
        if not (box[2] > box[0] and box[3] > box[1] and mask[y0 : y0 + side, x0 : x0 + side].any()):
            continue
        if cfg.object_rules and not crop_box_ok(box, cfg):
            continue
        kept.append(i)
        boxes.append(box)
        masks.append(mask)
    return kept, boxes, masks


def make_sample(
    rec: DecodedRecord,
    cfg: TrainConfig,
    subject_size: int,
    rng: np.random.Generator,
    allowed: Sequence[int] | None = None,
) -> dict[str, Any] | NoSubject:
    """One training sample from one record (see the module docstring for the fields), or NoSubject when the
    record yields no subject and cfg.data.no_subject is "skip". allowed: the selection's eligible objects of
    this record (None: all)."""
    d = cfg.data
    chosen = choose_subjects(rec, cfg.model.max_subjects, d, rng, allowed)
    wh = np.array([rec.width, rec.height] * 2, np.float32)
    crop = square_crop(rec.width, rec.height, rec.boxes[chosen] * wh, rng, d.crop)
    kept, boxes, masks = subjects_in_crop(rec, chosen, crop, d)
    kept, boxes, masks, sp, truncated = fitting_prompt(rec, kept, boxes, masks, cfg.model.placeholder)
    if not kept and d.no_subject == "skip":
        if not chosen:
            return no_subject(rec, d, allowed)
        if truncated:
            return NoSubject("prompt too long", "the caption fills the 77-token context: no subject clause fits")
        return NoSubject(
            "cut by the crop", "the crop leaves no chosen subject in view (data.min_crop_box_area, data.crop_aspect)"
        )
    return sample_fields(rec, crop, kept, boxes, masks, sp, cfg, subject_size, rng)


def fitting_prompt(
    rec: DecodedRecord, kept: list[int], boxes: list[np.ndarray], masks: list[np.ndarray], placeholder: str
) -> tuple[list[int], list[np.ndarray], list[np.ndarray], SubjectPrompt, bool]:
    """(kept, boxes, masks, prompt, truncated): the subjects whose clauses fit the 77-token context (the last
    clauses are the ones cut) and the prompt of the caption with their clauses."""
    sp = subject_prompt(rec.caption, [rec.labels[i] for i in kept], placeholder)
    fit = sum(p >= 0 for p in sp.placeholder_pos)  # clauses past the 77 tokens (the last ones) are no subjects
    truncated = fit < len(kept)
    if truncated:
        kept, boxes, masks = kept[:fit], boxes[:fit], masks[:fit]
        sp = subject_prompt(rec.caption, [rec.labels[i] for i in kept], placeholder)
    return kept, boxes, masks, sp, truncated


def subject_mask(rec: DecodedRecord, i: int, cfg: DataConfig) -> np.ndarray:
    """(H, W) bool: object i as a subject, its mask within its box, holes filled with data.fill_holes."""
    mask = boxed_mask(rec, i)
    return filled_mask(mask) if cfg.fill_holes else mask


def sample_fields(
    rec: DecodedRecord,
    crop: tuple[int, int, int],
    kept: list[int],
    boxes: list[np.ndarray],
    masks: list[np.ndarray],
    sp: SubjectPrompt,
    cfg: TrainConfig,
    subject_size: int,
    rng: np.random.Generator,
    refs: Sequence[tuple[DecodedRecord, int]] | None = None,
) -> dict[str, Any]:
    """The sample (module docstring) of record rec's crop (x0, y0, side) with subjects `kept` (their boxes in the
    crop and boxed masks, subjects_in_crop) and prompt sp. refs: per subject, the (record, object) whose pixels
    make its subject image (a pair's reference object); None: the subject's own pixels in rec."""
    n, r, d = cfg.model.max_subjects, cfg.data.resolution, cfg.data
    x0, y0, side = crop
    image = Image.fromarray(rec.image).crop((x0, y0, x0 + side, y0 + side))
    image = image.resize((r, r), Image.BICUBIC, reducing_gap=2.0)
    out = {
        "key": rec.key,
        "image": np.asarray(image, np.uint8).transpose(2, 0, 1).copy(),
        "subjects": np.full((n, 3, subject_size, subject_size), 255, np.uint8),
        "boxes": np.zeros((n, 4), np.float32),
        "present": np.zeros(n, bool),
        "objects": np.full(n, -1, np.int64),
        "masks": np.zeros((n, r // 8, r // 8), np.float32),
        "crop": np.array(crop, np.int64),
        "prompt": sp.prompt,
        "labels": json.dumps([rec.labels[i] for i in kept]),  # JSON text: batches of strings collate
        "input_ids": np.asarray(tokenize(sp.prompt), np.int64),
        "placeholder_pos": np.full(n, -1, np.int64),
        "loc_pos": np.full((n, MAX_LOC_TOKENS), -1, np.int64),
    }
    aug = augmentation(d)
    files = background_files(d.backgrounds) if d.backgrounds and aug is not None else ()
    for j, i in enumerate(kept):
        mask = filled_mask(masks[j]) if d.fill_holes else masks[j]
        bg = background_photo(files[int(rng.integers(len(files)))], subject_size, rng) if files else None
        fill = WHITE if d.background == "white" else tuple(int(c) for c in rng.integers(0, 256, 3))
        source, source_mask = (rec.image, mask) if refs is None else (refs[j][0].image, subject_mask(*refs[j], d))
        out["subjects"][j] = subject_image(
            source, source_mask, subject_size, augment=aug, rng=rng, background=bg, fill=fill
        ).transpose(2, 0, 1)
        out["boxes"][j] = boxes[j]
        out["present"][j] = True
        out["objects"][j] = i
        m = Image.fromarray(mask[y0 : y0 + side, x0 : x0 + side].astype(np.uint8) * 255)
        out["masks"][j] = np.asarray(m.resize((r // 8, r // 8), Image.BOX), np.float32) / 255
        out["placeholder_pos"][j] = sp.placeholder_pos[j]
        pos = loc_positions(rec, i, sp, j, d.loc_tokens)
        out["loc_pos"][j, : len(pos)] = pos
    return out


class PairSubject(NamedTuple):
    """One subject of a pair sample: its reference (record, object) and its object in the target record."""

    ref: DecodedRecord
    ref_obj: int
    target_obj: int


def pair_fault(target: DecodedRecord, s: PairSubject, cfg: DataConfig) -> str | None:
    """Why subject s cannot be one (an object position past its record's objects, or the object rules that a
    single-image subject obeys, object_fault, on either object); None when it can."""
    for name, rec, i in (("reference", s.ref, s.ref_obj), ("target", target, s.target_obj)):
        if not 0 <= i < len(rec.labels):
            return f"{name} record {rec.key} has no object {i} ({len(rec.labels)} objects)"
        fault = object_fault(rec, i, cfg)
        if fault is not None:
            return f"{name} object {i} of {rec.key} ({rec.labels[i]!r}): {fault}"
    return None


def make_pair_sample(
    target: DecodedRecord,
    subjects: Sequence[PairSubject],
    cfg: TrainConfig,
    subject_size: int,
    rng: np.random.Generator,
) -> dict[str, Any] | NoSubject:
    """A pair sample: the target record's crop, boxes, masks, prompt and localization tokens, each subject image
    from its reference object (sample_fields' refs). subjects[0] is the pair's own; the others (other pairs with
    the same target record, other target objects) fill the remaining slots when they pass the rules. NoSubject
    (codes "pair ...") when the pair's own subject fails the rules, is cut by the crop or its clause does not fit."""
    d = cfg.data
    fault = pair_fault(target, subjects[0], d)
    if fault is not None:
        return NoSubject("pair object rules", fault)
    chosen = [subjects[0]]
    for s in subjects[1:]:  # as choose_subjects: within the rules, not contained in a chosen subject's box
        if len(chosen) == cfg.model.max_subjects or pair_fault(target, s, d) is not None:
            continue
        boxes = [target.boxes[c.target_obj] for c in chosen]
        if not (d.object_rules and any(contained(b, target.boxes[s.target_obj], d.max_containment) for b in boxes)):
            chosen.append(s)
    by_target = {s.target_obj: s for s in chosen}
    wh = np.array([target.width, target.height] * 2, np.float32)
    crop = square_crop(target.width, target.height, target.boxes[list(by_target)] * wh, rng, d.crop)
    kept, boxes, masks = subjects_in_crop(target, list(by_target), crop, d)
    kept, boxes, masks, sp, _ = fitting_prompt(target, kept, boxes, masks, cfg.model.placeholder)
    if subjects[0].target_obj not in kept:
        return NoSubject("pair cut by the crop", "the crop or the 77-token context leaves the pair's target object out")
    refs = [(by_target[i].ref, by_target[i].ref_obj) for i in kept]
    out = sample_fields(target, crop, kept, boxes, masks, sp, cfg, subject_size, rng, refs)
    out["ref_keys"] = json.dumps([ref.key for ref, _ in refs])
    out["ref_objects"] = np.full(cfg.model.max_subjects, -1, np.int64)
    out["ref_objects"][: len(refs)] = [i for _, i in refs]
    out["pair"] = True
    return out


def as_single(sample: dict[str, Any]) -> dict[str, Any]:
    """A single-image sample with the pair fields a mixed batch collates (its subjects are their own references)."""
    n = int(sample["present"].sum())
    return {
        **sample,
        "ref_keys": json.dumps([sample["key"]] * n),
        "ref_objects": sample["objects"].copy(),
        "pair": False,
    }


class SampleError(ValueError):
    """A record the trainer cannot turn into a sample; the message is one line naming the record and shard."""


class TrainSamples(torch.utils.data.IterableDataset):
    """Training samples from a RecordReader (which splits records over ranks and DataLoader workers).
    eligible: {record key: object indices} from a selection made with an object predicate; a record's
    subjects are chosen among its eligible objects only (None: among all). Records without a subject under
    data.no_subject="skip", and the reader's bad records under data.on_bad_record="skip", yield nothing; the next
    sample carries their count (module docstring).
    pairs: the indexed pairs file (train/pairs.py); with data.pair_fraction > 0 a worker's slots mix its records
    with pair samples (PairMixer): each slot consumes one record or one pair, and a sample carries how many of
    each its worker part has consumed ("taken", "paired"), so a resumed stream starts at the same slot. Samples
    of a stream with pairs also carry "pair", "ref_keys" (JSON) and "ref_objects" (N,): where each subject
    image comes from."""

    def __init__(
        self,
        reader: RecordReader,
        cfg: TrainConfig,
        subject_size: int,
        eligible: dict[str, list[int]] | None = None,
        pairs: PairIndex | None = None,
    ):
        self.reader, self.cfg, self.subject_size, self.eligible = reader, cfg, subject_size, eligible
        self.epoch, self.pair_skip = 0, ()
        self.pairs = pairs
        self.mixer = PairMixer(cfg.data.pair_fraction, cfg.run.seed) if pairs is not None else None
        clip_tokenizer()  # load the BPE once here: forked DataLoader workers inherit it instead of reloading
        if cfg.data.backgrounds and cfg.data.augment:
            background_files(cfg.data.backgrounds)  # list the folder once, before the workers fork

    def set_epoch(
        self, epoch: int, skip: Sequence[int] = (), first_worker: int = 0, pair_skip: Sequence[int] = ()
    ) -> None:
        """Epoch `epoch`; skip and first_worker go to RecordReader.set_epoch (a resumed position), pair_skip: the
        pairs each worker part has consumed in it."""
        self.epoch, self.pair_skip = epoch, tuple(pair_skip)
        self.reader.set_epoch(epoch, skip, first_worker)

    def sample(self, rec: DecodedRecord) -> dict[str, Any] | NoSubject:
        """The training sample of one record in the current epoch (NoSubject: skipped). A record that breaks
        sample building raises SampleError naming it."""
        allowed = None if self.eligible is None else self.eligible.get(rec.key, [])
        rng = sample_rng(self.cfg.run.seed, self.epoch, rec.key)
        try:
            sample = make_sample(rec, self.cfg, self.subject_size, rng, allowed)
        except Exception as e:
            raise SampleError(f"record {rec.key} (shard {rec.shard or '?'}): {type(e).__name__}: {e}") from e
        return sample if self.pairs is None or isinstance(sample, NoSubject) else as_single(sample)

    def pair_sample(self, p: int, k: int) -> dict[str, Any] | NoSubject:
        """The sample of valid pair p, the part's k-th pair slot of the epoch: its target record with, besides
        the pair's own subject, the other pairs of the same target record (one per target object, in a seeded
        order). A record that breaks the contract raises BadRecordError; anything else SampleError naming the pair."""
        ix = self.pairs
        rng = sample_rng(self.cfg.run.seed, self.epoch, f"pair/{p}/{k}")
        group = ix.same_target(p)
        rows = [p, *(int(q) for q in group[rng.permutation(len(group))] if q != p)]
        cache: dict[int, DecodedRecord] = {}

        def record(r: int) -> DecodedRecord:
            if r not in cache:
                cache[r] = ix.records.read(r)
            return cache[r]

        target, seen, subjects = record(int(ix.tgt_rec[p])), set(), []
        for q in rows:
            t = int(ix.tgt_obj[q])
            if t in seen or len(subjects) == self.cfg.model.max_subjects + 1:  # one spare: a subject may fail
                continue
            seen.add(t)
            subjects.append(PairSubject(record(int(ix.ref_rec[q])), int(ix.ref_obj[q]), t))
        try:
            return make_pair_sample(target, subjects, self.cfg, self.subject_size, rng)
        except Exception as e:
            ref = subjects[0].ref
            raise SampleError(
                f"pair {ref.key}[{subjects[0].ref_obj}] -> {target.key}[{subjects[0].target_obj}] "
                f"({ix.path}): {type(e).__name__}: {e}"
            ) from e

    def slots(self, taken: int, paired: int) -> Iterator[tuple[str, Any]]:
        """This worker part's slots of the epoch past (taken records, paired pairs): ("record", a record or
        BadRecord) or ("pair", (valid pair row, k)). Without pairs: its records, as always."""
        records = iter(self.reader)
        if self.mixer is None or self.mixer.ratio == 0:
            yield from (("record", rec) for rec in records)
            return
        reader, readers = self.reader.reader_index()
        phase, n = self.mixer.phase(self.epoch, reader), self.pairs.rows
        quota = self.mixer.quota(n, readers)
        j, k = taken + paired, paired
        while True:
            if self.mixer.is_pair(j, phase):
                if self.mixer.ratio == 1 and k >= quota:  # pairs only: a part's epoch is its range of pairs
                    return
                yield "pair", (self.mixer.pair_row(k, self.epoch, reader, readers, n), k)
                k += 1
            else:
                rec = next(records, None)
                if rec is None:
                    return
                yield "record", rec
            j += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        part, _ = self.reader.worker_part()
        taken = self.reader.skip[part] if self.reader.skip else 0
        paired = self.pair_skip[part] if self.pair_skip else 0
        skipped: Counter[str] = Counter()
        held = None  # the latest sample, held until the next: the records skipped after a part's last are its to count
        for kind, item in self.slots(taken, paired):
            if kind == "pair":
                paired += 1  # a skipped pair is consumed too
                sample = self._pair_or_skip(*item, skipped)
            else:
                taken += 1  # a skipped record is consumed too: a resumed run starts after it
                sample = self._sample_or_skip(item, skipped)
            if sample is None:
                continue
            if held is not None:
                yield held
            held = {**sample, "part": part, "taken": taken, "paired": paired, "skipped": json.dumps(skipped)}
            skipped = Counter()
        if held is not None:
            if skipped:
                counts = Counter(json.loads(held["skipped"])) + skipped
                held.update(taken=taken, paired=paired, skipped=json.dumps(counts))
            yield held

    def _pair_or_skip(self, p: int, k: int, skipped: Counter[str]) -> dict[str, Any] | None:
        """Pair p's sample, or None with it counted in `skipped` (a bad record under data.on_bad_record="skip")."""
        try:
            sample = self.pair_sample(p, k)
        except BadRecordError as e:
            if self.cfg.data.on_bad_record != "skip":
                raise
            skipped[BAD_RECORD] += 1
            if skipped[BAD_RECORD] <= SHOW_BAD:
                print(f"data: skipped bad {e} (a record of --pairs)", file=sys.stderr, flush=True)
            return None
        if isinstance(sample, NoSubject):
            skipped[sample.code] += 1
            return None
        return sample

    def _sample_or_skip(self, rec: DecodedRecord | BadRecord, skipped: Counter[str]) -> dict[str, Any] | None:
        """rec's sample, or None with rec counted in `skipped` by reason (a bad record: the first few named on
        stderr, the epoch's log line counts them all)."""
        if isinstance(rec, BadRecord):
            skipped[BAD_RECORD] += 1
            if skipped[BAD_RECORD] <= SHOW_BAD:
                print(f"data: skipped bad {rec}", file=sys.stderr, flush=True)
            return None
        sample = self.sample(rec)
        if isinstance(sample, NoSubject):
            skipped[sample.code] += 1
            return None
        return sample


def run_selection(cfg: DataConfig, out_dir: str, resume: bool) -> str | None:
    """The run's selection Parquet (read on rank 0): data.selection, or the catalog's records that data.where and
    data.object_where select (all of them when neither is set), which `catalog select` writes to
    out_dir/selection.parquet when the run starts. A resumed run reuses that file and never queries again: its
    saved data position counts records of that selection, and the catalog may have changed since."""
    if not cfg.queries_catalog:
        return cfg.selection
    path = os.path.join(out_dir, SELECTION_FILE)
    if resume:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--resume with a catalog selection: {path}, the selection this run started "
                "with, is missing; restore it (or pass it as --selection) to continue the run"
            )
        saved = json.loads(pq.read_schema(path).metadata[b"subjectdiff.selection"])
        for name in ("where", "object_where"):
            if saved.get(name) != getattr(cfg, name):
                raise ValueError(
                    f"data.{name} is {getattr(cfg, name)!r}, but the run started with "
                    f"{saved.get(name)!r} ({path}): a resumed run keeps its selection; start a new run "
                    "(another --out) for a new one"
                )
        return path
    root, catalog_file = catalog_source(cfg)
    if not catalog.catalog_path(root, catalog_file).exists():  # a bucket's catalog is a local file: made on first use
        for bad in catalog.build(root, catalog=catalog_file).bad:  # their records are not in the selection: say so
            print(f"data: {bad.line()}", file=sys.stderr, flush=True)
    objects = REFERENCE_OBJECT_WHERE if cfg.object_where == "reference" else cfg.object_where
    if select(root, cfg.where, path, catalog=catalog_file, object_where=objects) == 0:
        raise ValueError(
            f"--where {cfg.where!r} / --object-where {cfg.object_where!r} select no record of the catalog of {root}"
        )
    return path


def catalog_source(cfg: DataConfig) -> tuple[str, str | None]:
    """(the shard folder or URL, its catalog file or None for catalog_path's) that a catalog selection reads.
    data.catalog is the DuckDB file: its records are data.shards' folder when given, else the folder the catalog
    was built from; a shard folder or URL there (the deprecated form) means that folder's own catalog."""
    if cfg.catalog is None:
        return cfg.shards[0], None
    if not catalog.is_catalog_file(cfg.catalog):
        return cfg.catalog, None
    return (cfg.shards[0] if cfg.shards else catalog.catalog_root(cfg.catalog)), cfg.catalog


class RankZeroFailed(NamedTuple):
    """What rank 0 sends the other ranks in place of a result it could not make: its error, in one line."""

    error: str


def from_rank0(make: Callable[[], T], rank: int, world: int, what: str) -> T:
    """MAKE()'s result on every rank, made once: rank 0 calls it and broadcasts the result through
    torch.distributed (world > 1: the trainer's process group, NCCL or gloo), so the other ranks neither repeat its
    reads nor read rank 0's files (nodes need no shared filesystem for it). A failure on rank 0 reaches the other
    ranks instead of leaving them waiting: rank 0 raises it, the others stop with a one-line UsageError saying
    rank 0 could not WHAT."""
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = make()
        except Exception as e:
            if world > 1:  # said before the others hear it: the first rank to exit ends the rest (torchrun)
                say_now(e)
                dist.broadcast_object_list([RankZeroFailed(f"{type(e).__name__}: {e}")], src=0)
            raise
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], RankZeroFailed):  # rank 0 shows the error (one line, or its traceback for a bug)
        raise UsageError(f"rank {rank}: stopping, rank 0 could not {what} ({box[0].error})")
    return box[0]


def shared_selection(
    cfg: DataConfig, out_dir: str, rank: int, world: int, resume: bool
) -> tuple[dict[str, set[str]] | None, dict[str, list[int]] | None]:
    """The run's selection on every rank: ({shard path: keys}, {key: eligible object indices} or None). Rank 0
    resolves and reads it (run_selection) and sends it to the others (from_rank0)."""
    if not (cfg.queries_catalog or cfg.selection):
        return None, None

    def read() -> tuple[dict[str, set[str]], dict[str, list[int]] | None]:
        path = run_selection(cfg, out_dir, resume)
        return load_selection(path), load_eligible_objects(path)

    return from_rank0(read, rank, world, "resolve the run's selection")


def make_reader(
    cfg: DataConfig, selection: dict[str, set[str]] | None, rank: int, world: int, seed: int
) -> RecordReader:
    """The balanced reader of this rank: every rank and worker reads as many records per epoch."""
    shards = list(cfg.shards) if cfg.shards and not cfg.queries_catalog else None
    if shards is None and selection is None:
        raise ValueError(
            "no training data: give --records DIR, --selection FILE, or --catalog FILE.duckdb (all "
            "its records, or those --where / --object-where select)"
        )
    on_error = "yield" if cfg.on_bad_record == "skip" else "raise"  # "yield": TrainSamples counts them
    try:
        return RecordReader(
            shards,
            selection=selection,
            split="balanced",
            multiple=cfg.batch_size,
            rank=rank,
            world_size=world,
            shuffle_seed=seed,
            on_error=on_error,
        )
    except FileNotFoundError as e:
        if shards is None:
            raise
        raise FileNotFoundError(f"--records (data.shards) {e}") from None


def loader_workers(num_workers: int, records: int, world: int) -> int:
    """DataLoader workers per rank: data.num_workers, fewer when the epoch has fewer records than ranks x
    workers (every worker then still reads at least one record)."""
    if num_workers == 0:
        return 0
    return max(1, min(num_workers, records // max(world, 1)))


def epoch_plan(reader: RecordReader, world: int, workers: int, batch: int) -> str:
    """One line: how the epoch's records split over ranks and workers, and what the split drops or repeats."""
    total, parts = reader.epoch_size(), world * max(workers, 1)
    each = reader.quota(parts)
    line = (
        f"data: {total} records per epoch; {world} rank(s) x {max(workers, 1)} worker(s) read {each} each "
        f"({-(-each // batch)} batches of up to {batch} per worker)"
    )
    if total < parts:
        return line + "; fewer records than ranks x workers: records repeat within the epoch"
    return line + f", {total - each * parts} dropped per epoch so that every rank runs alike"


def batch_stream(
    cfg: TrainConfig,
    selection: dict[str, set[str]] | None,
    eligible: dict[str, list[int]] | None,
    rank: int,
    world: int,
    subject_size: int,
    log: Callable[[str], None] | None = None,
) -> BatchStream:
    """This rank's infinite batches (the trainer's and `train preview`'s): the balanced reader, the samples, and
    the DataLoader workers the epoch can feed. log (rank 0): where the epoch plan and skipped records go."""
    reader = make_reader(cfg.data, selection, rank, world, cfg.run.seed)
    if reader.epoch_size() == 0:
        raise ValueError("no training data: the shards or the selection hold no record")
    workers = loader_workers(cfg.data.num_workers, reader.epoch_size(), world)
    if log is not None:
        log(epoch_plan(reader, world, workers, cfg.data.batch_size))
    pairs = None
    if cfg.data.pairs:  # rank 0 locates the paired records (a request per shard) and sends the index to the others
        pairs = from_rank0(
            lambda: pair_index(cfg.data, reader, selection, log, eligible),
            rank,
            world,
            f"index --pairs {cfg.data.pairs}",
        )
    samples = TrainSamples(reader, cfg, subject_size, eligible, pairs)
    return BatchStream(samples, cfg.data.batch_size, workers, log)


def pair_index(
    cfg: DataConfig,
    reader: RecordReader,
    selection: dict[str, set[str]] | None,
    log: Callable[[str], None] | None,
    eligible: dict[str, list[int]] | None = None,
) -> PairIndex | None:
    """The indexed pairs file of data.pairs over the reader's records (None without pairs), keeping the pairs whose
    two objects are both eligible (eligible: the selection's objects that --object-where kept; None: all); log
    (rank 0) says once how many pairs the selection drops. A pairs file with no pair left is a one-line error.
    batch_stream calls it on rank 0 alone and sends the index to the other ranks (from_rank0)."""
    if not cfg.pairs:
        return None
    index = PairIndex.build(cfg.pairs, reader.urls, selection, eligible)
    if log is not None and index.dropped:
        log(index.dropped_line())
    if index.rows == 0 and cfg.pair_fraction > 0:
        raise ValueError(
            f"--pairs {cfg.pairs}: none of its {index.total} pairs has both records in the selection or the shards "
            "(and both objects eligible)"
        )
    if log is not None:
        log(f"data: {index.rows} pairs over {len(index.records)} records; {cfg.pair_fraction:g} of the slots are pairs")
    return index


class NoBatchError(ValueError):
    """An epoch gave this rank no batch: every record it read was skipped (the message says why, in one line, and
    which records or setting to change: a user error, exit 2)."""


class BatchStream:
    """Infinite batches over epochs, with an exact position that resumes without re-reading the data.

    The balanced reader gives every DataLoader worker of every rank a range of the same number of records per
    epoch; each worker batches the samples of its range (the last batch may be partial, and records without a
    subject under data.no_subject="skip" give none), and the DataLoader takes the workers' batches round robin,
    passing over a worker once its range is done. The position is (epoch, batches taken, records and pairs
    consumed from each worker's part, the part whose batch is due next). A resumed stream has each part skip its
    consumed records inside the reader (no decoding) and start its pair slots after its consumed pairs, and starts
    the round robin at the part due next: it yields exactly the batches the interrupted stream would have.
    `skipped` counts the skipped records by reason.
    """

    def __init__(
        self, dataset: TrainSamples, batch_size: int, num_workers: int, log: Callable[[str], None] | None = None
    ):
        self.dataset, self.batch_size, self.num_workers, self.log = dataset, batch_size, num_workers, log
        self.parts = max(num_workers, 1)
        self.epoch, self.batches, self.samples, self.next_part = 0, 0, [0] * self.parts, 0
        self.pairs = [0] * self.parts  # the pairs each part has consumed this epoch (a stream with pairs)
        self.skipped: Counter[str] = Counter()

    def state(self) -> dict[str, Any]:
        """The position (class docstring); "pairs" only in a stream with pairs (a run without is as it was)."""
        state = {"epoch": self.epoch, "batches": self.batches, "samples": list(self.samples)}
        if self.dataset.pairs is not None:
            state["pairs"] = list(self.pairs)
        return {**state, "next_part": self.next_part}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`. One without per-part counts (older checkpoints) continues where replaying
        its batches would: the parts' counts follow from the round robin of full batches."""
        b = state["batches"]
        samples = (
            state["samples"]
            if "samples" in state
            else [self.batch_size * len(range(p, b, self.parts)) for p in range(self.parts)]
        )
        if len(samples) != self.parts:
            raise ValueError(
                f"the data position is for {len(samples)} DataLoader workers per rank, this run has "
                f"{self.parts} (data.num_workers): the records split differently"
            )
        self.epoch, self.batches, self.samples = state["epoch"], b, list(samples)
        self.pairs = list(state.get("pairs", [0] * self.parts))  # a position saved before pairs: none consumed
        self.next_part = state.get("next_part", b % self.parts)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            self.dataset.set_epoch(self.epoch, self.samples, self.next_part, self.pairs)
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=False,
            )
            skipped: Counter[str] = Counter()
            for batch in loader:
                part = int(batch.pop("part")[0])
                self.samples[part] = int(batch.pop("taken").max())
                self.pairs[part] = int(batch.pop("paired").max())
                for counts in batch.pop("skipped"):
                    skipped.update(json.loads(counts))
                    self.skipped.update(json.loads(counts))
                self.batches += 1
                self.next_part = (part + 1) % self.parts
                yield batch
            if self.batches == 0:
                raise NoBatchError(self._why_no_batch())
            if skipped and self.log is not None:
                self.log(f"data: epoch {self.epoch}: {skipped_line(skipped)}")
            self.epoch, self.batches, self.samples, self.next_part = self.epoch + 1, 0, [0] * self.parts, 0
            self.pairs = [0] * self.parts

    def _why_no_batch(self) -> str:
        """Why an epoch gave no batch, with a record of this rank as the example (read here, in-process)."""
        self.dataset.set_epoch(self.epoch)
        example, bad = "this rank read no record", None
        for rec in self.dataset.reader:
            if isinstance(rec, BadRecord):
                bad = bad or rec
                continue
            s = self.dataset.sample(rec)
            if isinstance(s, NoSubject):
                example = f"e.g. record {rec.key} (shard {rec.shard or '?'}): {s.detail}"
                break
        if bad is not None and example == "this rank read no record":
            return (
                f"epoch {self.epoch} gave this rank no sample: every record it read is bad and "
                f"data.on_bad_record is 'skip'; e.g. {bad}"
            )
        return (
            f"epoch {self.epoch} gave this rank no sample: every record it read has no subject and "
            f"data.no_subject is 'skip'{' (or is bad)' if bad else ''}; {example}. Select records with subjects "
            "(e.g. --object-where reference) or set data.no_subject=text to train them text-only"
        )


def skipped_line(counts: Counter[str]) -> str:
    """'5 records without a subject skipped (object rules 3, no objects 2)', and the bad records apart."""
    bad = counts.get(BAD_RECORD, 0)
    rest = Counter({code: n for code, n in counts.items() if code != BAD_RECORD})
    parts = [f"{sum(rest.values())} records without a subject skipped ({reasons(rest)})"] if rest else []
    if bad:
        parts.append(f"{bad} bad record{'s' if bad != 1 else ''} skipped (data.on_bad_record=skip)")
    return "; ".join(parts)


def reasons(counts: Counter[str]) -> str:
    """'near-white image 3, object rules 2': skip reasons by count."""
    return ", ".join(f"{code} {n}" for code, n in counts.most_common())
