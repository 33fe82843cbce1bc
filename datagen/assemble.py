"""Finished items -> the catalogs contract: `to_record(item)` gives a Record, or a Failure to record.

The image bytes pass through unchanged; the key is `make_key(source)`; each detection becomes an
ObjectAnn joining its noun (label, phrase, span, CLIP tokens), box, score and SAM mask, and the quality
fields come from `catalogs.schema.compute_quality`, the near-white fraction from the decoded pixels. The curate
stage's signals (sha256, phash, CLIP and aesthetic scores, the image embedding; each object's label_score and
label_rank) are copied as they are, None where the stage did not run or could not measure them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subjectdiff.catalogs.schema import (
    Failure,
    ObjectAnn,
    Record,
    RecordError,
    VideoFrame,
    compute_quality,
    image_extension,
    make_key,
    validate,
    white_fraction,
)
from subjectdiff.weights import Checkpoint

Item = dict[str, Any]


def _failure(item: Item, stage: str, reason: str) -> Failure:
    key = item.get("key") or make_key(item["source"])
    return Failure(key=key, source=item["source"], stage=stage, reason=reason, video=video_frame(item))


def video_frame(item: Item) -> VideoFrame | None:
    """The VideoFrame of an item made from a video (datagen/video.py's `video` dict), None for a photo."""
    v = item.get("video")
    return None if v is None else VideoFrame(str(v["source"]), int(v["shot"]), int(v["frame"]), float(v["time"]))


def objects_of(item: Item) -> list[ObjectAnn]:
    """One ObjectAnn per detection, in detection order (best score first)."""
    nouns, masks, mask_scores = item["nouns"], item["masks"], item["mask_scores"]
    out = []
    for det, mask, ms in zip(item["detections"], masks, mask_scores, strict=True):
        n = nouns[det["noun"]]
        out.append(
            ObjectAnn(
                label=n["label"],
                phrase=n["phrase"],
                span=list(n["span"]),
                tokens=list(n["tokens"]),
                box=[float(v) for v in det["box"]],
                score=float(det["score"]),
                mask=mask,
                mask_score=float(ms),
                label_score=det.get("label_score"),
                label_rank=det.get("label_rank"),
            )
        )
    return out


def embedding_meta(cfg) -> dict[str, Any]:
    """What a shard's embedding sidecar says of the model that made its embeddings, from a CurateConfig:
    {"model": open_clip name (a config file's stem), "pretrained": tag or checkpoint spec, None for random}."""
    model = Path(cfg.model).stem if cfg.model.endswith(".json") else cfg.model
    return {"model": model, "pretrained": cfg.pretrained}


def identity_meta(cfg) -> dict[str, Any]:
    """What a shard's identity sidecar says of the model that made its embeddings, from an IdentityConfig:
    {"model": its spec, "sha256" (a file or folder's; "" for a hub id, whose "revision" is its cached snapshot's
    commit), "pooling", "margin"}; {} when the stage is off. Never downloads (the run manifest's entry)."""
    if not cfg.enabled:
        return {}
    entry = Checkpoint("identity.model", cfg.model).entry()
    meta = {"model": cfg.model, "sha256": entry.get("sha256", ""), "pooling": cfg.pooling, "margin": cfg.margin}
    return {**meta, **({"revision": entry["revision"]} if entry.get("revision") else {})}


def to_record(item: Item) -> Record | Failure:
    """A Record for a finished item; a Failure for a failed one, or one that breaks the contract."""
    if item.get("failure"):
        return _failure(item, item["failure"]["stage"], item["failure"]["reason"])
    try:
        h, w = item["image"].shape[:2]
        objects = objects_of(item)
        compute_quality(objects, w, h)
        extra = dict(item.get("extra") or {})
        if item.get("ground_prompt"):
            extra["ground_prompt"] = item["ground_prompt"]
        record = Record(
            key=make_key(item["source"]),
            image=item["image_bytes"],
            image_ext=image_extension(item["image_format"]),
            caption=item["caption"],
            width=w,
            height=h,
            source=item["source"],
            objects=objects,
            alt_text=item.get("alt_text"),
            extra=extra,
            sha256=item.get("sha256"),
            phash=item.get("phash"),
            clip_score=item.get("clip_score"),
            alt_clip_score=item.get("alt_clip_score"),
            aesthetic=item.get("aesthetic"),
            clip_embedding=item.get("clip_embedding"),
            identity_embeddings=item.get("identity_embeddings"),
            white_fraction=white_fraction(item["image"]),
            video=video_frame(item),
        )
        validate(record)
    except (RecordError, KeyError, ValueError) as e:
        return _failure(item, "write", f"{type(e).__name__}: {e}")
    return record
