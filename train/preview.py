"""`subjectdiff train preview`: exactly what the trainer would feed, for N samples, as a contact sheet.

    subjectdiff train preview --preset paper --records out/ --sample 16 --out preview/
    subjectdiff train preview --preset tiny --catalog out/catalog.duckdb --object-where reference --sample 8 \
        --out preview/

Same config and data flags as `train`. It builds no model: it needs the CLIP tokenizer and the subject-image size
(read from the image encoder's open_clip config), so it runs offline with any preset. The samples are the first N
of a one-process run (rank 0 of 1, the config's DataLoader workers and batch size, epoch 0 onwards): the same
`TrainSamples` and `BatchStream` the trainer iterates. Writes
    DIR/index.html     one self-contained page: per sample the target crop with its boxes and masks, each subject
                       image after augmentation, the prompt with each subject's placeholder and localization
                       tokens marked; with --pairs, a pair sample shows reference -> target: each subject image
                       (cut from its reference record, named) before the target crop with its boxes and masks;
    DIR/samples.jsonl  one row per sample: key, epoch, objects (the chosen objects' indices in the record), labels,
                       boxes (xyxy in [0, 1] of the crop), prompt, placeholder_pos, loc_pos; with --pairs also
                       pair (a pair sample) and refs ([reference key, reference object] per subject);
    DIR/selection.parquet  when data.where / data.object_where select the records.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from subjectdiff.catalogs.report.draw import PALETTE, object_color, overlay
from subjectdiff.catalogs.tokens import clip_tokenizer
from subjectdiff.model.builders import image_encoder_input_size
from subjectdiff.train.config import TrainConfig
from subjectdiff.train.data import batch_stream, shared_selection, skipped_line

SHOW = 256  # displayed side of the target crop, pixels

CSS = (
    """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h1 { font-size: 1.3rem; } .meta, .settings { color: #666; font-size: 12px; }
article.sample { display: flex; gap: 1rem; align-items: flex-start; background: #fff; border: 1px solid #ddd;
  border-radius: 6px; padding: .8rem; margin: 0 0 1rem; }
figure { margin: 0; text-align: center; } figcaption { font-size: 12px; color: #444; max-width: 14rem; }
img { image-rendering: auto; border: 1px solid #ccc; }
.text { flex: 1; min-width: 18rem; } .prompt { font-family: ui-monospace, monospace; word-break: break-word; }
.tok { padding: 0 1px; border-radius: 3px; } .ph { font-weight: bold; color: #fff; }
.loc { text-decoration: underline 2px; } .none { color: #999; font-style: italic; }
.arrow { font-size: 2rem; color: #888; margin: 4rem .2rem 0; }
"""
    + "\n".join(
        f".s{j}.ph {{ background: rgb{c}; }} .s{j}.loc {{ text-decoration-color: rgb{c}; }} "
        f".s{j} .swatch {{ background: rgb{c}; }}"
        for j, c in enumerate(PALETTE)
    )
    + """
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px; vertical-align: middle; }
"""
)


def png_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def target_image(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, present: np.ndarray) -> Image.Image:
    """image (3, R, R) uint8, boxes (N, 4) xyxy in [0, 1], masks (N, R/8, R/8) in [0, 1] -> the crop shown at
    SHOW px with each present subject j's mask tinted and its box outlined in object_color(j) (catalogs.report.draw)."""
    shown = np.asarray(Image.fromarray(image.transpose(1, 2, 0)).convert("RGB").resize((SHOW, SHOW), Image.BICUBIC))
    keep = np.flatnonzero(present)
    cover = [
        np.asarray(Image.fromarray((masks[j] * 255).astype(np.uint8)).resize((SHOW, SHOW), Image.BILINEAR), np.float32)
        / 255.0
        for j in keep
    ]  # (SHOW, SHOW) coverage, edges blend partially
    drawn = overlay(
        shown,
        np.stack(cover) if cover else np.zeros((0, SHOW, SHOW), np.float32),
        np.asarray(boxes, np.float32)[keep].reshape(-1, 4),
        [object_color(int(j)) for j in keep],
    )
    return Image.fromarray(drawn)


def prompt_html(ids: np.ndarray, placeholder_pos: np.ndarray, loc_pos: np.ndarray) -> str:
    """The prompt token by token (start/end tokens and padding left out): each subject's placeholder filled in
    its colour, its localization tokens underlined in it."""
    tok = clip_tokenizer()
    marks: dict[int, list[str]] = {}
    for j, p in enumerate(placeholder_pos):
        if p >= 0:
            marks.setdefault(int(p), []).append(f"ph s{j}")
    for j, row in enumerate(loc_pos):
        for p in row[row >= 0]:
            marks.setdefault(int(p), []).append(f"loc s{j}")
    out = []
    for pos, t in enumerate(ids.tolist()):
        if pos == 0 or t in (49406, 49407, 0):
            continue
        cls = " ".join(dict.fromkeys(" ".join(marks.get(pos, [])).split()))
        title = f' title="token {pos}"'
        out.append(f'<span class="tok {cls}"{title}>{html.escape(tok.decode([t]))}</span>')
    return "".join(out)


def row(batch: dict[str, Any], i: int, epoch: int, labels: list[str]) -> dict[str, Any]:
    """samples.jsonl's row of sample i of a batch."""
    present = batch["present"][i].numpy()
    keep = np.flatnonzero(present)
    return {
        "key": batch["key"][i],
        "epoch": epoch,
        "objects": [int(o) for o in batch["objects"][i].numpy()[keep]],
        "labels": [labels[j] for j in keep],
        "boxes": [[round(float(v), 6) for v in b] for b in batch["boxes"][i].numpy()[keep]],
        "prompt": batch["prompt"][i],
        "placeholder_pos": [int(p) for p in batch["placeholder_pos"][i].numpy()[keep]],
        "loc_pos": [[int(p) for p in r if p >= 0] for r in batch["loc_pos"][i].numpy()[keep]],
        **pair_fields(batch, i, keep),
    }


def pair_fields(batch: dict[str, Any], i: int, keep: np.ndarray) -> dict[str, Any]:
    """samples.jsonl's pair fields (a stream with --pairs): pair (a pair sample), refs: [ref key, ref object]
    per subject, where its subject image comes from."""
    if "pair" not in batch:
        return {}
    refs = json.loads(batch["ref_keys"][i])
    objs = batch["ref_objects"][i].numpy()[keep]
    return {"pair": bool(batch["pair"][i]), "refs": [[k, int(o)] for k, o in zip(refs, objs)]}


def card(batch: dict[str, Any], i: int, r: dict[str, Any]) -> str:
    """One sample's <article>."""
    present = batch["present"][i].numpy()
    target = target_image(batch["image"][i].numpy(), batch["boxes"][i].numpy(), batch["masks"][i].numpy(), present)
    figs = [
        f'<figure class="target"><img src="{png_uri(target)}" width="{SHOW}" height="{SHOW}" '
        f'alt="target crop"><figcaption>target crop, boxes and masks</figcaption></figure>'
    ]
    subjects = []
    for j in np.flatnonzero(present):
        sub = Image.fromarray(batch["subjects"][i, j].numpy().transpose(1, 2, 0))
        side = max(sub.width, 128)
        n = len(subjects)
        source = ""
        if r.get("pair"):
            ref_key, ref_obj = r["refs"][n]
            source = f"<br>reference: record {html.escape(ref_key)}, object {ref_obj}"
        subjects.append(
            f'<figure class="subject s{j}"><img src="{png_uri(sub)}" width="{side}" height="{side}" '
            f'alt="subject {j}"><figcaption><span class="swatch"></span> subject {j}: '
            f"{html.escape(r['labels'][n])} (object {r['objects'][n]}){source}"
            "</figcaption></figure>"
        )
    if r.get("pair"):  # reference -> target: the subject images (the reference crops) first, the target after
        figs = [*subjects, '<p class="arrow" title="reference → target">→</p>', figs[0]]
    else:
        figs += subjects
    if not subjects:
        figs.append('<p class="none">no subject: this record trains without subjects</p>')
    prompt = prompt_html(
        batch["input_ids"][i].numpy(), batch["placeholder_pos"][i].numpy(), batch["loc_pos"][i].numpy()
    )
    meta = f"key {html.escape(r['key'])} · epoch {r['epoch']} · boxes {html.escape(json.dumps(r['boxes']))}"
    kind, attrs = "sample", f'data-key="{html.escape(r["key"])}"'
    if r.get("pair"):
        refs = ", ".join(html.escape(f"{k}[{o}]") for k, o in r["refs"])
        meta = f"pair sample, reference → target: {refs} → {html.escape(r['key'])} · " + meta
        kind, attrs = "sample pair", attrs + f' data-ref="{html.escape(r["refs"][0][0])}"'
    return (
        f'<article class="{kind}" {attrs}>{"".join(figs)}'
        f'<div class="text"><p class="prompt">{prompt}</p><p class="meta">{meta}</p></div></article>'
    )


def write_preview(cfg: TrainConfig, n: int, out: str | Path) -> Path:
    """Write DIR/index.html and DIR/samples.jsonl for the first n samples the trainer would feed (module
    docstring). Returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selection, eligible = shared_selection(cfg.data, str(out), 0, 1, resume=False)
    size = cfg.data.subject_size or image_encoder_input_size(cfg.model)
    notes: list[str] = []
    stream = batch_stream(cfg, selection, eligible, 0, 1, size, notes.append)
    rows, cards = [], []
    for batch in stream:
        epoch = stream.epoch
        for i in range(len(batch["key"])):
            if len(rows) == n:
                break
            rows.append(row(batch, i, epoch, json.loads(batch["labels"][i])))
            cards.append(card(batch, i, rows[-1]))
        if len(rows) == n:
            break
    if stream.skipped:  # on the page and on the console: a preview with fewer subjects than asked says why
        notes.append(f"on the way: {skipped_line(stream.skipped)}")
        print(f"preview: {notes[-1]}", flush=True)
    with open(out / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    d = cfg.data
    settings = (
        f"resolution {d.resolution} · subject images {size} px · crop {d.crop} · pick {d.pick} · "
        f"without a subject: {d.no_subject} · bad records: {d.on_bad_record} · "
        f"object rules {'on' if d.object_rules else 'off'} · augmentation {'on' if d.augment else 'off'} · backgrounds "
        f"{html.escape(d.backgrounds or 'none')} · loc tokens {', '.join(d.loc_tokens)} · where "
        f"{html.escape(d.where or '-')} · object where {html.escape(d.object_where or '-')}"
    )
    if d.pairs:
        settings += f" · pairs {html.escape(d.pairs)} ({d.pair_fraction:g} of the slots)"
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\"><title>train preview</title>"
        f"<style>{CSS}</style></head><body><h1>What the trainer feeds: {len(rows)} samples</h1>"
        f'<p class="settings">{settings}</p>'
        + "".join(f'<p class="meta">{html.escape(note)}</p>' for note in notes)
        + f"{''.join(cards)}</body></html>",
        encoding="utf-8",
    )
    return page
