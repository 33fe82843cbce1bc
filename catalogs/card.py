"""The dataset card: DIR/README.md beside the shards, so that Hugging Face `datasets` loads a shard folder as it is.

    from datasets import load_dataset
    samples = load_dataset(OUT)["train"]                 # the ok samples: the catalog's `samples`
    objects = load_dataset(OUT, "objects")["train"]      # the catalog's `objects`
    failures = load_dataset(OUT, "failures")["train"]    # the catalog's `failures`

The card's YAML header declares three configs over the Parquet sidecars (catalogs/writer.py), with their
features (never inferred from a first file, where a column such as alt_text may be all null):

    samples (default)  the samples sidecars, rows with status "ok", SAMPLE_COLUMNS
    objects            the objects sidecars, every row, OBJECT_SCHEMA's columns
    failures           the samples sidecars, rows with status "failed", FAILURE_COLUMNS

The images stay in the tars, which `datasets` reads with its `webdataset` builder. A folder has one builder, so
the card cannot hold a config for them beside the Parquet ones; left to itself the builder infers its columns
from the first shard's first records, and fails on a later record with a field null there (alt_text) or an
image format it has not seen. `record_features()` declares them instead:

    records = load_dataset("webdataset", data_files=f"{OUT}/*.tar", features=record_features())["train"]

gives __key__, __url__, one image column per stored format (jpg, png, webp; null where a record has another)
and `json`, KEY.json as RECORD_JSON declares it (every field but the free-form `extra`).

The samples and failures configs read the same files, each its rows (the Parquet builder's `filters`) and
its columns (`columns`), which a `datasets` release whose Parquet builder takes `filters` reads (4.x and 5.x;
not 2.x, which would return every row of the samples sidecars in both). The rows are the complete shards'
rows, as the catalog's: the configs name the sidecars by glob (`*.samples.parquet`) when
every shard with sidecars in DIR is complete, written with the current names, and none is left out
(`exclude`: a catalog build's bad or incomplete shards), otherwise by their file names. The card describes the
folder when it is written: a datagen run writes it after its catalog build (none when no shard is complete),
subjectdiff.photo_records.write_photo_shards after its shards, and `subjectdiff catalog build DIR --card` on
demand (a folder written before the card existed).
"""

from __future__ import annotations

import os

import pyarrow as pa

from subjectdiff.catalogs.storage import Folder
from subjectdiff.catalogs.writer import (
    OBJECT_SCHEMA,
    OBJECTS_SUFFIX,
    SAMPLE_SCHEMA,
    SAMPLES_SUFFIX,
    listed_names,
)

CARD_FILE = "README.md"
# The catalog's samples and failures columns that the samples sidecar holds (the catalog adds `idx`).
SAMPLE_COLUMNS = [f.name for f in SAMPLE_SCHEMA if f.name not in ("status", "stage", "reason")]
FAILURE_COLUMNS = ["key", "shard", "source", "stage", "reason"]
_DTYPES = {
    pa.string(): "string",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def features(schema: pa.Schema, columns: list[str]) -> list[dict]:
    """COLUMNS of SCHEMA as a dataset card declares features ({name, dtype} or {name, sequence}), the form
    every `datasets` release reads."""
    out = []
    for name in columns:
        t = schema.field(name).type
        if pa.types.is_list(t):
            out.append({"name": name, "sequence": _DTYPES[t.value_type]})
        else:
            out.append({"name": name, "dtype": _DTYPES[t]})
    return out


def _value(dtype: str) -> dict:
    return {"dtype": dtype}


def _list(item: dict | list) -> dict:
    """A list feature of ITEM: a {"dtype"} value, or a struct given as a list of named fields."""
    return {"list": item if isinstance(item, list) else item["dtype"]}


def _fields(**kinds: dict) -> list[dict]:
    return [{"name": name, **kind} for name, kind in kinds.items()]


_S, _I32, _I64, _F32, _F64 = (_value(t) for t in ("string", "int32", "int64", "float32", "float64"))
# KEY.json (catalogs.schema.Record.meta_json) as features; `extra` is free-form, so it is left out.
RECORD_JSON = _fields(
    schema_version=_I32,
    key=_S,
    caption=_S,
    alt_text=_S,
    width=_I32,
    height=_I32,
    source=_S,
    sha256=_S,
    phash=_I64,
    clip_score=_F32,
    alt_clip_score=_F32,
    aesthetic=_F32,
    white_fraction=_F32,
    video={"struct": _fields(source=_S, shot=_I32, frame=_I64, time=_F64)},
    objects=_list(
        _fields(
            label=_S,
            phrase=_S,
            span=_list(_I32),
            tokens=_list(_I32),
            box=_list(_F32),
            score=_F32,
            mask={"struct": _fields(size=_list(_I32), counts=_S)},
            mask_score=_F32,
            area=_F32,
            aspect=_F32,
            mask_area=_F32,
            mask_fill=_F32,
            containment=_F32,
            label_score=_F32,
            label_rank=_I32,
        )
    ),
)
RECORD_FEATURES = _fields(
    __key__=_S, __url__=_S, jpg=_value("image"), png=_value("image"), webp=_value("image"), json={"struct": RECORD_JSON}
)


def record_features():
    """The `datasets.Features` of a shard folder's tars for the `webdataset` builder (module docstring)."""
    # Imported here: `datasets` is an optional dependency of the product, needed only by whoever calls this.
    import datasets

    return datasets.Features._from_yaml_list(RECORD_FEATURES)


def configs(samples: list[str] | str, objects: list[str] | str) -> list[dict]:
    """The three configs over these sidecar files (or globs), relative to the folder: samples (default),
    objects, failures, each {config_name, data_files, columns, filters, features}."""
    return [
        {
            "config_name": "samples",
            "default": True,
            "data_files": samples,
            "columns": SAMPLE_COLUMNS,
            "filters": [["status", "==", "ok"]],
            "features": features(SAMPLE_SCHEMA, SAMPLE_COLUMNS),
        },
        {
            "config_name": "objects",
            "data_files": objects,
            "columns": OBJECT_SCHEMA.names,
            "features": features(OBJECT_SCHEMA, OBJECT_SCHEMA.names),
        },
        {
            "config_name": "failures",
            "data_files": samples,
            "columns": FAILURE_COLUMNS,
            "filters": [["status", "==", "failed"]],
            "features": features(SAMPLE_SCHEMA, FAILURE_COLUMNS),
        },
    ]


def sidecar_files(listing, exclude=()) -> tuple[list[str] | str, list[str] | str]:
    """(samples, objects): the sidecars of the complete shards of LISTING (the folder's file names) but
    EXCLUDE, as two globs when they are exactly the files the globs match, else as file lists."""
    have = set(listing)
    stems = sorted(n[: -len("_stats.json")] for n in have if n.endswith("_stats.json"))
    names = {s: listed_names(s, have) for s in stems if s not in set(exclude)}
    names = {s: n for s, n in names.items() if n is not None}
    samples = [n["samples"] for n in names.values()]
    objects = [n["objects"] for n in names.values()]
    globbed = sorted(n for n in have if "/" not in n and n.endswith(SAMPLES_SUFFIX))
    globbed_objects = sorted(n for n in have if "/" not in n and n.endswith(OBJECTS_SUFFIX))
    if samples == globbed and objects == globbed_objects:
        return f"*{SAMPLES_SUFFIX}", f"*{OBJECTS_SUFFIX}"
    return samples, objects


def _feature_lines(fields: list[dict], indent: str) -> list[str]:
    """FIELDS as the card's YAML declares features: `- name` then dtype, list (of a dtype or of fields) or
    struct, nested with the indentation `datasets` reads."""
    lines = []
    for f in fields:
        lines.append(f"{indent}- name: {f['name']}")
        for kind in ("dtype", "sequence", "list", "struct"):
            if kind not in f:
                continue
            if isinstance(f[kind], list):
                lines.append(f"{indent}  {kind}:")
                lines.extend(_feature_lines(f[kind], indent + "  "))
            else:
                lines.append(f"{indent}  {kind}: {f[kind]}")
    return lines


def card_text(samples: list[str] | str, objects: list[str] | str) -> str:
    """README.md: the YAML header (configs, dataset_info) and a few lines saying what the folder holds."""
    header = ["configs:"]
    info = ["dataset_info:"]
    for c in configs(samples, objects):
        header.append(f"- config_name: {c['config_name']}")
        if c.get("default"):
            header.append("  default: true")
        header.append("  data_files:")
        header.append("  - split: train")
        files = c["data_files"]
        if isinstance(files, str):
            header.append(f"    path: {_quote(files)}")
        else:
            header.append("    path:")
            header.extend(f"    - {_quote(f)}" for f in files)
        if "columns" in c:
            header.append(f"  columns: [{', '.join(c['columns'])}]")
        if "filters" in c:
            header.append("  filters: [" + ", ".join("[" + ", ".join(map(_quote, f)) + "]" for f in c["filters"]) + "]")
        info.append(f"- config_name: {c['config_name']}")
        info.append("  features:")
        info.extend(_feature_lines(c["features"], "  "))
    body = (
        "# subjectdiff records\n\n"
        "Webdataset shards (`NNNNN.tar`: `KEY.jpg|png|webp` + `KEY.json`) written by subjectdiff, with Parquet\n"
        "sidecars per shard: `NNNNN.samples.parquet` (one row per sample, ok and failed), `NNNNN.objects.parquet`\n"
        "(one row per object), `NNNNN.clip.parquet` (image embeddings, when the curate stage ran) and\n"
        "`NNNNN_stats.json`.\n\n"
        "```python\n"
        "from datasets import load_dataset\n\n"
        'samples = load_dataset(OUT)["train"]               # the ok samples\n'
        'objects = load_dataset(OUT, "objects")["train"]    # one row per object\n'
        'failures = load_dataset(OUT, "failures")["train"]  # the samples that failed, with stage and reason\n'
        "\n# the images and their annotations (KEY.json), from the tars\n"
        "from subjectdiff.catalogs.card import record_features\n\n"
        'records = load_dataset("webdataset", data_files=f"{OUT}/*.tar", features=record_features())["train"]\n'
        "```\n\n"
        "`subjectdiff catalog build OUT` indexes the same rows in DuckDB; docs/records.md describes every column.\n"
    )
    return "---\n" + "\n".join(header + info) + "\n---\n\n" + body


def _quote(s: str) -> str:
    """S as a YAML double-quoted scalar (globs start with `*`, an alias in plain YAML; `==` reads as text)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_card(directory: str | os.PathLike, *, listing=None, exclude=()) -> str:
    """Write DIR/README.md for DIR's complete shards but EXCLUDE (shard ids); LISTING: DIR's listing when the
    caller has it (Folder.listing). Returns the card's text."""
    folder = Folder(directory)
    listing = folder.listing() if listing is None else listing
    text = card_text(*sidecar_files(listing, exclude))
    folder.write_text(CARD_FILE, text)
    return text
