"""Inputs of a datagen run: list them once into a plan, then read any unit of the plan on demand.

SRC may be:
    - a folder of images, local or an fsspec URL (`s3://bucket/photos/`, `memory://imgs/`), searched
      recursively: files with an image extension (IMAGE_SUFFIXES, in any case: jpg, png, webp, gif, bmp,
      tiff, heic/heif, avif ...); every other file, and every dotfile, is no input but is counted by
      extension (`skip_kind`), and the run reports the counts ("skipped: 3 .txt"). A local folder is walked in
      sorted order, files before subfolders; a URL folder is listed with `fs.find`, in sorted path order;
    - webdataset shards: one .tar, a brace pattern like `data/{00000..00099}.tar`, local or any fsspec URL
      (`file://`, `s3://`, ...), or a folder (local or URL) holding .tar files (a local folder's top-level
      tars; a URL folder's tars at any depth). Members are grouped into samples by key, as webdataset
      groups them; a sample's image member (one of IMAGE_SUFFIXES, the first of them present) is the unit, its
      `txt` becomes the record's alt_text and its `json` "url" the record's source. A sample with no image
      member is planned as a failed unit ("no image member in sample (members: txt, json)");
    - an img2dataset output folder (its tars with jpg/txt/json, beside its Parquet and `_stats.json`): read
      as shards, and each row of a tar's `NNNNN.parquet` whose `status` is not "success" (a failed download
      or resize, which never reached the tar) is planned as a failed unit, source its `url`, error
      "img2dataset <status>: <error_message>", so every URL of the original list is accounted for;
    - a Parquet or CSV list, local or an fsspec URL (`hf://datasets/...` through huggingface_hub's
      filesystem), streamed, never loaded whole. Its image column is `image_column` or else the first of
      `path`, `url`, `image_path`, `filepath`, `image` (names match in any case; among these a column
      holding image bytes comes first, and without any of them the one struct column with a `bytes` field,
      as Hugging Face datasets writes an Image feature under any name). Its caption column, which becomes
      alt_text, is `caption_column` or else the first of `caption`, `text`, `alt_text`. A string column
      holds paths or URLs, relative ones relative to the list's folder; a row without a path is planned as
      a failed unit. A binary column, or a struct column `{bytes: binary, path: string}` (the Parquet
      storage of a Hugging Face datasets Image feature), holds the images themselves: each row is a unit
      read from the Parquet (`column` set in the plan), its source `<list>#row=<index>`. Rows are counted
      from 0 (the index pyarrow, pandas and datasets use), in sources and in messages ("row index 7").

Nothing is dropped silently: a tar that cannot be opened is one failed unit; a tar that breaks partway
(a corrupt header, a read error) keeps the units listed before the break and adds one failed unit for the
rest; a tar cut short inside a member that is not an image adds one failed unit too (a cut image member
fails when it is read).

The plan is a Parquet file with one row per input unit, in a deterministic order. The units are streamed
to a temporary Parquet in chunks, then DuckDB (memory-limited, spilling next to the plan) keeps the first
unit of each key, numbers and shards them and writes the plan, so a 10M-image input never sits in the
driver's memory. Tar shards can be listed in parallel (`write_plan(..., map_urls=...)`). A unit is read
as a whole file (`offset` -1), as `size` bytes at `offset` inside a tar, or as the cell at row `offset`
of a Parquet's `column`, so any unit can be read alone, in any order, by any worker (datagen/units.py's
`read_unit`, which retries transient errors and says in words why a unit cannot be read).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from subjectdiff.catalogs import storage
from subjectdiff.catalogs.images import IMAGE_SUFFIXES
from subjectdiff.catalogs.schema import make_key
from subjectdiff.catalogs.storage import describe, detail
from subjectdiff.datagen.units import is_url as _is_url
from subjectdiff.datagen.video import VIDEO_SUFFIXES, is_video

_TAR_IMAGE_EXTS = tuple(s[1:] for s in IMAGE_SUFFIXES)  # preference order in a sample
_TAR_VIDEO_EXTS = tuple(s[1:] for s in VIDEO_SUFFIXES)  # a sample without an image member may hold a video
_PATH_COLUMNS = ("path", "url", "image_path", "filepath", "image")
_TEXT_COLUMNS = ("caption", "text", "alt_text")
_LIST_BATCH = 10_000

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
        ("error", pa.string()),  # set when the unit could not even be listed (bad tar member, failed download)
        ("column", pa.string()),  # set: `path` is a Parquet, `offset` a row index, the image is in this column
        ("media", pa.string()),  # "video": the unit is a video (datagen/video.py); null: an image
    ]
)
# The units as listed, before de-duplication: `seq` is the listing order.
_RAW_SCHEMA = pa.schema([("seq", pa.int64())] + [f for f in PLAN_SCHEMA if f.name not in ("shard", "idx")])


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
    column: str | None = None  # see PLAN_SCHEMA
    media: str | None = None  # "video" for a video (datagen/video.py), None for an image


def _url_fs(src: str):
    """(filesystem, path) of a URL (catalogs.storage.filesystem, storage options included); SourceError when
    fsspec cannot serve it."""
    try:
        return storage.filesystem(src)
    except storage.StorageError as e:
        raise SourceError(f"input {src!r}: {e}") from e


def _url_isdir(src: str) -> bool:
    fs, path = _url_fs(src)
    try:
        return bool(fs.isdir(path))
    except OSError as e:  # no access, no network: say so rather than "not a folder"
        raise SourceError(f"input {src!r} cannot be listed: {type(e).__name__}: {e}") from e


def _find(src: str) -> list[str]:
    """Every file under the URL folder SRC, recursively, as URLs spelled like SRC, in sorted order."""
    fs, root = _url_fs(src)
    root = root.rstrip("/")
    prefix = src if src.endswith("/") else src + "/"
    urls = []
    for p in sorted(fs.find(root)):
        if p.startswith(root + "/"):
            urls.append(prefix + p[len(root) + 1 :])
        else:  # a filesystem that spells paths otherwise: its own full URL
            urls.append(fs.unstrip_protocol(p))
    return urls


def _takes(name: str, skipped: Counter | None) -> bool:
    """Whether a folder source takes the file NAME (a visible file with an image extension); one it does not
    take is counted in SKIPPED by `skip_kind`."""
    name = posixpath.basename(name)
    if name.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES) and not name.startswith("."):
        return True
    if skipped is not None:
        skipped[skip_kind(name)] += 1
    return False


def skip_kind(name: str) -> str:
    """How a file a folder source does not take is counted: its extension in lower case (".txt"), "hidden"
    for a dotfile (.DS_Store, ._IMG_0001.jpg: macOS metadata), "no extension" for a name without a dot."""
    if name.startswith("."):
        return "hidden"
    ext = posixpath.splitext(name)[1].lower()
    return ext or "no extension"


def detect(src: str, *, image_column: str | None = None, caption_column: str | None = None) -> str:
    """'folder', 'shards' or 'list' for SRC; SourceError when it is none of them or cannot be reached.

    A list is opened (its Parquet footer or CSV header only), so a list that cannot be read fails here;
    IMAGE_COLUMN / CAPTION_COLUMN, when either is given, are looked up in its columns too (without them,
    the default names are looked up when the list is planned)."""
    kind = _kind(src)
    if kind == "list":
        with _open_list(src) as f:
            schema = _list_schema(f, src)
            if image_column or caption_column:
                _pick_columns(src, schema, image_column, caption_column)
    return kind


def _kind(src: str) -> str:
    low = src.lower()
    if low.endswith((".parquet", ".csv")):
        return "list"
    if "{" in src or low.endswith(".tar"):
        return "shards"
    if _is_url(src):
        if _url_isdir(src):
            return "shards" if any(u.lower().endswith(".tar") for u in _find(src)) else "folder"
        _reachable(src)
    elif os.path.isdir(src):
        return "shards" if any(Path(src).glob("*.tar")) else "folder"
    raise SourceError(
        f"input {src!r} is not a folder, a .tar / brace pattern of shards, or a .parquet/.csv list of images"
    )


def _reachable(src: str) -> None:
    """SourceError when the URL SRC cannot be reached at all (no network, offline hub, no access): some
    filesystems (huggingface_hub's) answer isdir with False then, which would read as "not a folder"."""
    fs, path = _url_fs(src)
    try:
        fs.info(path)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise SourceError(f"input {src!r} cannot be reached: {detail(e)}") from e


def _shard_urls(src: str) -> list[str]:
    if not _is_url(src) and os.path.isdir(src):
        return sorted(str(p) for p in Path(src).glob("*.tar"))
    if "{" in src or src.lower().endswith(".tar"):
        return list(braceexpand.braceexpand(src))
    return [u for u in _find(src) if u.lower().endswith(".tar")]


def iter_units(
    src: str,
    map_urls: Callable[[Callable, Iterable[str]], Iterable] | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    skipped: Counter | None = None,
) -> Iterator[Unit]:
    """SRC's units in plan order (before de-duplication). MAP_URLS, the columns and SKIPPED: see write_plan."""
    kind = _kind(src)
    if kind == "folder":
        if _is_url(src):
            yield from (_file_unit(u) for u in _find(src) if _takes(u, skipped))
        else:
            yield from _folder_units(src, skipped)
    elif kind == "shards":
        for units in (map_urls or map)(list_tar, _shard_urls(src)):
            yield from units
    else:
        yield from _list_units(src, image_column, caption_column)


def _folder_units(root: str, skipped: Counter | None = None) -> Iterator[Unit]:
    root_path = Path(root).resolve()
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames.sort()  # deterministic walk order
        for name in sorted(filenames):
            if _takes(name, skipped):
                yield _file_unit(os.path.join(dirpath, name))


def _file_unit(p: str) -> Unit:
    """The unit of a whole file (a folder's, or a list's path): a video when its extension says so."""
    return Unit(source=p, path=p, media="video" if is_video(p) else None)


def list_tar(url: str) -> list[Unit]:
    """The units of one shard: its samples, in tar order, then the failed downloads of its img2dataset
    Parquet (if any). Module-level and picklable: write_plan's map_urls may run it as a remote task."""
    return _tar_units(url) + _img2dataset_failures(url)


def _tar_units(url: str) -> list[Unit]:
    """One unit per sample (members grouped by key, as webdataset groups them); see the module docstring
    for what becomes of a sample without an image and of a tar that cannot be fully listed."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}  # key -> ext -> member, both in tar order
    texts: dict[tuple[str, str], bytes] = {}
    rest: str | None = None  # why the tar could not be listed to its end
    try:
        with storage.open_url(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            last: tarfile.TarInfo | None = None
            while True:
                try:
                    m = tf.next()
                    if m is None:
                        rest = _early_end(f, tf.offset)
                        break
                    last = m
                    if not m.isfile():
                        continue
                    base = posixpath.basename(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key, ext = posixpath.join(posixpath.dirname(m.name), stem), ext.lower()
                    groups.setdefault(key, {})[ext] = m
                    if ext in ("txt", "json"):
                        texts[(key, ext)] = tf.extractfile(m).read()
                except (OSError, tarfile.TarError) as e:
                    rest = _listing_break(e, f, last)
                    break
    except (OSError, tarfile.TarError) as e:  # not even a tar header could be read
        return [Unit(source=url, path=url, error=f"unreadable tar: {_tar_error(e)}")]
    units = []
    for key, g in groups.items():
        meta_url = _json_url(texts.get((key, "json")))
        ext = next((e for e in _TAR_IMAGE_EXTS + _TAR_VIDEO_EXTS if e in g), None)
        if ext is None:
            units.append(
                Unit(
                    source=meta_url or f"{url}#{key}",
                    path=url,
                    error=f"no image member in sample (members: {', '.join(g)})",
                )
            )
            continue
        m = g[ext]
        txt = texts.get((key, "txt"))
        alt = txt.decode("utf-8", "replace").strip() if txt else None
        units.append(
            Unit(
                source=meta_url or f"{url}#{m.name}",
                path=url,
                offset=m.offset_data,
                size=m.size,
                alt_text=alt or None,
                media="video" if ext in _TAR_VIDEO_EXTS else None,
            )
        )
    if rest is not None:
        units.append(Unit(source=f"{url}#<after {len(groups)} samples>", path=url, error=rest))
    return units


def _json_url(raw: bytes | None) -> str | None:
    """The "url" of a sample's json member (img2dataset writes the image's URL there), if any."""
    if not raw:
        return None
    try:
        url = json.loads(raw).get("url")
    except (ValueError, AttributeError):
        return None
    return str(url) if url else None


def _early_end(f, offset: int) -> str | None:
    """tarfile ends a listing silently at an invalid header; None when OFFSET holds a real end of archive
    (a zero block, or the end of the file), else why the rest of the tar is lost."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if not block.strip(tarfile.NUL):
        return None
    return f"unreadable tar member: invalid tar header at byte {offset}; the rest of the tar is not listed"


def _listing_break(e: Exception, f, last: tarfile.TarInfo | None) -> str | None:
    """Why the rest of a tar is lost after E, or None when a unit already accounts for the loss: a tar
    cut short inside an image member's data, which then fails when it is read."""
    if "unexpected end" in str(e) and last is not None and last.isfile():
        ext = posixpath.basename(last.name).partition(".")[2].lower()
        try:
            cut = _file_size(f) < last.offset_data + last.size
        except (OSError, ValueError):
            cut = False
        if cut and ext in _TAR_IMAGE_EXTS:
            return None
    return f"unreadable tar member: {_tar_error(e)}; the rest of the tar is not listed"


def _tar_error(e: Exception) -> str:
    """A tar listing's error in words that group: tarfile's own ("unexpected end of data"), or the storage
    error in stable words (catalogs.storage.describe)."""
    return str(e) if isinstance(e, tarfile.TarError) else describe(e)


def _file_size(f) -> int:
    pos = f.tell()
    try:
        return f.seek(0, 2)
    finally:
        f.seek(pos)


def _img2dataset_failures(url: str) -> list[Unit]:
    """The rows of the img2dataset Parquet beside a NNNNN.tar whose status is not "success"."""
    if not url.lower().endswith(".tar"):
        return []
    pq_url = url[:-4] + ".parquet"
    try:
        fs, path = storage.filesystem(pq_url)
        if not fs.isfile(path):
            return []
    except Exception:
        return []
    units = []
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "url" not in names or "status" not in names:
                return []  # not img2dataset's Parquet
            cols = [c for c in ("key", "url", "status", "error_message") if c in names]
            for batch in storage.row_group_batches(pf, _LIST_BATCH, cols):
                d = batch.to_pydict()
                for i, status in enumerate(d["status"]):
                    if status == "success":
                        continue
                    msg = d["error_message"][i] if "error_message" in d else None
                    src = d["url"][i] or f"{pq_url}#{d['key'][i] if 'key' in d else i}"
                    units.append(
                        Unit(
                            source=str(src),
                            path=pq_url,
                            error=f"img2dataset {status}: {msg if msg is not None else 'no error message'}",
                        )
                    )
    except (OSError, pa.ArrowException, ValueError) as e:
        return [Unit(source=pq_url, path=pq_url, error=f"unreadable img2dataset parquet: {e}")]
    return units


@dataclass
class _ListColumns:
    image: str  # as the list spells it
    text: str | None
    holds_bytes: bool  # the images themselves (binary, or a struct with `bytes`), not their paths or URLs


def _binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _column_kind(t: pa.DataType) -> str | None:
    """'bytes' for image bytes (binary, or a struct whose `bytes` field is binary: a Hugging Face datasets
    Image feature is stored as {bytes: binary, path: string}), 'paths' for strings, None otherwise."""
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return "bytes" if i >= 0 and _binary(t.field(i).type) else None
    if pa.types.is_dictionary(t):
        t = t.value_type
    if _binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "paths"
    return None


def _find_column(names: list[str], name: str) -> str | None:
    """NAME as the list spells it: the exact name, else the first that matches it in any case."""
    if name in names:
        return name
    return next((n for n in names if n.lower() == name.lower()), None)


def _pick_columns(src: str, schema: pa.Schema, image_column: str | None, caption_column: str | None) -> _ListColumns:
    """The list's image and caption columns (see the module docstring); SourceError naming what is missing
    and the columns there are. A CSV's columns are all read as strings: paths or URLs."""
    names = schema.names

    def kind(name: str) -> str | None:
        return _column_kind(schema.field(name).type)

    if image_column:
        image = _find_column(names, image_column)
        if image is None:
            raise SourceError(f"{src}: no column {image_column!r} (--image-column); its columns are {names}")
    else:
        named = list(dict.fromkeys(c for c in (_find_column(names, n) for n in _PATH_COLUMNS) if c))
        image = next((c for c in named if kind(c) == "bytes"), None) or next(iter(named), None)
        if image is None:  # a Hugging Face Image feature under another name ("png_image", "photo")
            structs = [n for n in names if pa.types.is_struct(schema.field(n).type) and kind(n) == "bytes"]
            image = structs[0] if len(structs) == 1 else None
        if image is None:
            raise SourceError(
                f"{src}: no image column; expected one of {', '.join(_PATH_COLUMNS)} (in any case), "
                f"or name it with --image-column; its columns are {names}"
            )
    if kind(image) is None:
        raise SourceError(
            f"{src}: column {image!r} holds {schema.field(image).type}; an image column holds paths "
            "or URLs (strings), image bytes (binary), or structs with a binary `bytes` field (as "
            "Hugging Face datasets stores images)"
        )
    if caption_column:
        text = _find_column(names, caption_column)
        if text is None:
            raise SourceError(f"{src}: no column {caption_column!r} (--caption-column); its columns are {names}")
    else:
        text = next((c for c in (_find_column(names, n) for n in _TEXT_COLUMNS) if c), None)
    return _ListColumns(image=image, text=text if text != image else None, holds_bytes=kind(image) == "bytes")


def _open_list(src: str):
    """The list file, open for reading; SourceError when it does not exist or cannot be reached."""
    try:
        return storage.open_url(src, "rb")
    except FileNotFoundError as e:
        raise SourceError(f"input list {src!r} does not exist") from e
    except Exception as e:
        raise SourceError(f"input list {src!r} cannot be read: {detail(e)}") from e


def _is_csv(src: str) -> bool:
    return src.lower().endswith(".csv")


def _list_schema(f, src: str) -> pa.Schema:
    """The list's columns, from the Parquet footer or the CSV header (a CSV's as strings)."""
    try:
        if _is_csv(src):
            import pyarrow.csv as pacsv

            names = pacsv.open_csv(f).schema.names
            f.seek(0)
            return pa.schema([(n, pa.string()) for n in names])
        return pq.ParquetFile(f).schema_arrow
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"input list {src!r} cannot be read: {detail(e)}") from e


def _list_batches(f, src: str, cols: _ListColumns) -> Iterator[pa.RecordBatch]:
    """The list's batches, streamed, with the image column (when it holds paths) and the caption column;
    a column of image bytes is not read here, only its rows are counted."""
    wanted = [c for c in ([] if cols.holds_bytes else [cols.image]) + [cols.text] if c]
    if _is_csv(src):
        import pyarrow.csv as pacsv

        yield from pacsv.open_csv(
            f,
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types={c: pa.string() for c in wanted}),
        )
    else:
        yield from storage.row_group_batches(pq.ParquetFile(f), _LIST_BATCH, wanted)


def _list_units(src: str, image_column: str | None = None, caption_column: str | None = None) -> Iterator[Unit]:
    if _is_url(src):
        where, base, join = src, src.rsplit("/", 1)[0], lambda b, p: f"{b}/{p}"
    else:
        where = os.path.abspath(src)
        base, join = os.path.dirname(where), os.path.join
    row = 0  # row index in the list, from 0
    with _open_list(src) as f:
        cols = _pick_columns(src, _list_schema(f, src), image_column, caption_column)
        try:
            for batch in _list_batches(f, src, cols):
                texts = batch.column(cols.text).to_pylist() if cols.text else [None] * batch.num_rows
                texts = [str(t) if t else None for t in texts]
                if cols.holds_bytes:
                    for t in texts:
                        yield Unit(source=f"{where}#row={row}", path=where, offset=row, alt_text=t, column=cols.image)
                        row += 1
                    continue
                for p, t in zip(batch.column(cols.image).to_pylist(), texts):
                    if p is None or not str(p).strip():
                        yield Unit(
                            source=f"{where}#row={row}",
                            path=where,
                            alt_text=t,
                            error=f"the list row has no image path (column {cols.image!r})",
                        )
                    else:
                        p = str(p)
                        if not _is_url(p) and not os.path.isabs(p):
                            p = join(base, p)  # relative paths are relative to the list file
                        yield Unit(source=p, path=p, alt_text=t, media="video" if is_video(p) else None)
                    row += 1
        except (pa.ArrowInvalid, OSError) as e:
            raise SourceError(f"input list {src!r} cannot be read after row index {row}: {detail(e)}") from e


def _sql_str(s: str | os.PathLike) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def write_plan(
    src: str,
    plan_path: str | os.PathLike,
    shard_size: int,
    *,
    chunk: int = 50_000,
    map_urls: Callable[[Callable, Iterable[str]], Iterable] | None = None,
    memory_limit: str = "1GB",
    image_column: str | None = None,
    caption_column: str | None = None,
    skipped: Counter | None = None,
) -> dict[str, int]:
    """List SRC's units into a Parquet plan, shard_size units per shard; returns {shard: unit count}.

    Duplicate sources (the same file listed twice) are planned once, at their first place: one source, one
    key, one record. MAP_URLS, when given, is `map_urls(fn, urls) -> results of fn(url), in order` (e.g.
    Ray tasks, a bounded number in flight): each tar shard is listed through it with fn = `list_tar`.
    The default is the built-in `map`, in this process. MEMORY_LIMIT bounds DuckDB's de-duplication, which
    spills to a folder next to the plan beyond it. IMAGE_COLUMN / CAPTION_COLUMN name a list's columns, in
    any case (None: the default names, see the module docstring); a name the list lacks is a SourceError
    that lists its columns. SKIPPED, when given, counts the files a folder source does not take, by
    `skip_kind` ({".txt": 3}), so a run can report them.
    """
    import duckdb

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    raw = plan_path.with_name(plan_path.name + ".raw.parquet")
    spill = plan_path.with_name(plan_path.name + ".spill")
    names = _RAW_SCHEMA.names
    try:
        with pq.ParquetWriter(raw, _RAW_SCHEMA) as w:
            cols: dict[str, list] = {n: [] for n in names}
            units = iter_units(src, map_urls, image_column=image_column, caption_column=caption_column, skipped=skipped)
            for seq, u in enumerate(units):
                for n, v in zip(
                    names,
                    (
                        seq,
                        make_key(u.source),
                        u.source,
                        u.path,
                        u.offset,
                        u.size,
                        u.alt_text,
                        u.error,
                        u.column,
                        u.media,
                    ),
                    strict=True,
                ):
                    cols[n].append(v)
                if len(cols["seq"]) >= chunk:
                    w.write_table(pa.table(cols, schema=_RAW_SCHEMA))
                    cols = {n: [] for n in names}
            if cols["seq"]:
                w.write_table(pa.table(cols, schema=_RAW_SCHEMA))
        spill.mkdir(exist_ok=True)
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(spill)})
        try:
            # The units to drop: every unit of a key after its first. The aggregate and the join read only
            # (key, seq) and spill beyond memory_limit; the join's build side holds only duplicated keys.
            r = f"read_parquet({_sql_str(raw)})"
            dups = con.sql(f"""
                WITH dupkeys AS (SELECT key, min(seq) AS first FROM {r} GROUP BY key HAVING count(*) > 1)
                SELECT u.seq FROM {r} AS u JOIN dupkeys AS d ON u.key = d.key WHERE u.seq > d.first ORDER BY u.seq
            """).to_arrow_reader(chunk)
            counts = _write_kept(raw, tmp, (b.column(0).to_numpy() for b in dups), shard_size, chunk)
        finally:
            con.close()
        os.replace(tmp, plan_path)
    finally:
        raw.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        shutil.rmtree(spill, ignore_errors=True)
    return counts


def _write_kept(raw: Path, out: Path, dups: Iterator[np.ndarray], shard_size: int, chunk: int) -> dict[str, int]:
    """Stream RAW (in listing order) into the plan OUT without the units whose seq is in DUPS (ascending),
    numbering the rest 0..n-1 and cutting them into shards; returns {shard: count}."""
    counts: dict[str, int] = {}
    pending = np.empty(0, np.int64)
    more, n = True, 0
    with pq.ParquetWriter(out, PLAN_SCHEMA) as w:
        for batch in storage.row_group_batches(pq.ParquetFile(raw), chunk):
            seq = batch.column("seq").to_numpy()
            if not len(seq):
                continue
            while more and (not len(pending) or pending[-1] <= seq[-1]):
                nxt = next(dups, None)
                if nxt is None:
                    more = False
                else:
                    pending = np.concatenate([pending, nxt])
            cut = int(np.searchsorted(pending, seq[-1], side="right"))
            kept = pa.Table.from_batches([batch]).filter(pa.array(~np.isin(seq, pending[:cut])))
            pending = pending[cut:]
            if not kept.num_rows:
                continue
            idx = np.arange(n, n + kept.num_rows, dtype=np.int64)
            n += kept.num_rows
            shards, sizes = np.unique(idx // shard_size, return_counts=True)
            labels = [f"{s:05d}" for s in shards]
            for label, size in zip(labels, sizes):
                counts[label] = counts.get(label, 0) + int(size)
            cols = {"shard": pa.array(np.repeat(np.array(labels, dtype=object), sizes), pa.string()), "idx": idx}
            w.write_table(pa.table({**cols, **{c: kept[c] for c in PLAN_SCHEMA.names[2:]}}, schema=PLAN_SCHEMA))
    return counts
