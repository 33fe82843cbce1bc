"""Inputs of a datagen run: list them once into a plan, then read any unit of the plan on demand.

SRC may be:
    - a folder of images, searched recursively (files with an image extension; other files are ignored);
    - webdataset shards: one .tar, a brace pattern like `data/{00000..00099}.tar`, local or any fsspec URL;
    - an img2dataset output folder (its tars with jpg/txt/json, beside its Parquet and `_stats.json`):
      a folder holding .tar files is read as shards, and each sample's `txt` becomes the record's alt_text
      and its `json` "url" the record's source;
    - a Parquet or CSV list of image paths or URLs (column `path`, `url`, `image_path`, `filepath` or
      `image`; an optional `caption`, `text` or `alt_text` column becomes alt_text).

The plan is a Parquet file with one row per input unit, in a deterministic order, streamed to disk in
chunks (a 10M-image folder never sits in memory). A unit is read either as a whole file (`offset` -1) or as
`size` bytes at `offset` inside a tar, so any unit can be read alone, in any order, by any worker.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from catalogs.schema import make_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PATH_COLUMNS = ("path", "url", "image_path", "filepath", "image")
_TEXT_COLUMNS = ("caption", "text", "alt_text")

PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("idx", pa.int64()),  # position of the unit in the whole plan
        ("key", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),  # file or tar URL
        ("offset", pa.int64()),  # -1: the whole file; else the member's data offset in the tar
        ("size", pa.int64()),
        ("alt_text", pa.string()),
        ("error", pa.string()),  # set when the unit could not even be listed (bad tar member)
    ]
)


class SourceError(ValueError):
    """SRC cannot be used as input; the message says why and what is accepted."""


@dataclass
class Unit:
    source: str
    path: str
    offset: int = -1
    size: int = -1
    alt_text: str | None = None
    error: str | None = None


def detect(src: str) -> str:
    """'folder', 'shards' or 'list' for SRC; SourceError when it is none of them."""
    low = src.lower()
    if low.endswith((".parquet", ".csv")):
        return "list"
    if "{" in src or low.endswith(".tar"):
        return "shards"
    if os.path.isdir(src):
        return "shards" if any(Path(src).glob("*.tar")) else "folder"
    raise SourceError(
        f"input {src!r} is not a folder, a .tar / brace pattern of shards, or a .parquet/.csv list of images"
    )


def iter_units(src: str) -> Iterator[Unit]:
    kind = detect(src)
    if kind == "folder":
        yield from _folder_units(src)
    elif kind == "shards":
        if os.path.isdir(src):
            urls = sorted(str(p) for p in Path(src).glob("*.tar"))
        else:
            urls = list(braceexpand.braceexpand(src))
        for url in urls:
            yield from _tar_units(url)
    else:
        yield from _list_units(src)


def _folder_units(root: str) -> Iterator[Unit]:
    root_path = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames.sort()  # deterministic walk order
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                p = os.path.join(dirpath, name)
                yield Unit(source=p, path=p)


def _tar_units(url: str) -> Iterator[Unit]:
    """One unit per sample (members grouped by key, as webdataset groups them) that has an image."""
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            bad: list[tuple[str, str]] = []
            while True:
                try:
                    m = tf.next()
                except tarfile.TarError as e:  # a corrupt header ends what can be listed
                    # A tar cut short inside its last member: that member fails on read and accounts for
                    # it. Anything else unlistable is one failure of its own.
                    if not (order and "unexpected end" in str(e)):
                        bad.append((f"{url}#<after {len(order)} samples>", f"unreadable tar member: {e}"))
                    break
                if m is None:
                    break
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(m.name), stem)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = m
            texts = {}
            for key in order:
                g = groups[key]
                for ext in ("txt", "json"):
                    if ext in g:
                        texts[(key, ext)] = tf.extractfile(g[ext]).read()
    except (OSError, tarfile.TarError) as e:
        yield Unit(source=url, path=url, error=f"unreadable tar: {e}")
        return
    for key in order:
        g = groups[key]
        ext = next((e for e in _TAR_IMAGE_EXTS if e in g), None)
        if ext is None:
            continue
        m = g[ext]
        source = f"{url}#{m.name}"
        meta_raw = texts.get((key, "json"))
        if meta_raw:
            try:
                source = json.loads(meta_raw).get("url") or source
            except (ValueError, AttributeError):
                pass
        txt = texts.get((key, "txt"))
        alt = txt.decode("utf-8", "replace").strip() if txt else None
        yield Unit(source=source, path=url, offset=m.offset_data, size=m.size, alt_text=alt or None)
    for source, reason in bad:
        yield Unit(source=source, path=url, error=reason)


def _list_units(src: str) -> Iterator[Unit]:
    if src.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(src)
    else:
        table = pq.read_table(src)
    col = next((c for c in _PATH_COLUMNS if c in table.column_names), None)
    if col is None:
        raise SourceError(f"{src}: no image column; expected one of {_PATH_COLUMNS}, found {table.column_names}")
    text_col = next((c for c in _TEXT_COLUMNS if c in table.column_names), None)
    base = os.path.dirname(os.path.abspath(src))
    for batch in table.to_batches(10_000):
        paths = batch.column(col).to_pylist()
        texts = batch.column(text_col).to_pylist() if text_col else [None] * len(paths)
        for p, t in zip(paths, texts):
            if p is None:
                continue
            p = str(p)
            if "://" not in p and not os.path.isabs(p):
                p = os.path.join(base, p)  # relative paths are relative to the list file
            yield Unit(source=p, path=p, alt_text=str(t) if t else None)


def write_plan(src: str, plan_path: str | os.PathLike, shard_size: int, *, chunk: int = 50_000) -> dict[str, int]:
    """List SRC's units into a Parquet plan, shard_size units per shard; returns {shard: unit count}.

    Duplicate sources (the same file listed twice) are planned once: one source, one key, one record.
    """
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    counts: dict[str, int] = {}
    seen: set[str] = set()
    rows: list[dict] = []
    n = 0
    with pq.ParquetWriter(tmp, PLAN_SCHEMA) as w:
        for u in iter_units(src):
            key = make_key(u.source)
            if key in seen:
                continue
            seen.add(key)
            shard = f"{n // shard_size:05d}"
            counts[shard] = counts.get(shard, 0) + 1
            rows.append({"shard": shard, "idx": n, "key": key, "source": u.source, "path": u.path,
                         "offset": u.offset, "size": u.size, "alt_text": u.alt_text, "error": u.error})
            n += 1
            if len(rows) >= chunk:
                w.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
                rows = []
        if rows:
            w.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
    os.replace(tmp, plan_path)
    return counts


def read_unit(path: str, offset: int, size: int) -> bytes:
    """The bytes of one unit: a whole file, or `size` bytes at `offset` of a tar (local or fsspec URL)."""
    with fsspec.open(path, "rb") as f:
        if offset < 0:
            return f.read()
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"truncated tar member: read {len(data)} of {size} bytes")
    return data
