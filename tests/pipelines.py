"""Helpers shared by the tests that run datagen's pipeline: the tiny preset sized for a test, comparing
records and manifests read back from two runs, and reading a run's output with Hugging Face `datasets`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.writer import OBJECT_SCHEMA, SAMPLE_SCHEMA
from subjectdiff.datagen.job import JobConfig, preset


def tiny_cfg(shard_size: int = 3, batch_size: int = 8) -> JobConfig:
    """The tiny preset with shards of SHARD_SIZE images and every batch (pipeline and model stages) BATCH_SIZE."""
    cfg = preset("tiny")
    cfg.pipeline.shard_size = shard_size
    cfg.pipeline.batch_size = batch_size
    for stage in (cfg.stages.caption, cfg.stages.ground, cfg.stages.segment, cfg.stages.curate, cfg.stages.identity):
        stage.batch_size = batch_size
    return cfg


def fresh_cache(folder: Path) -> Path:
    """FOLDER as a new, empty $SUBJECTDIFF_CACHE (its own catalogs of remote outputs) whose `tiny` models are
    those of the default cache, linked: building them is about 40 s on a 2-core machine, and they are the same
    files wherever they are built (fixed seed). Built there first, through their real path, when they are not
    (a run records its models' paths). Call it before pointing $SUBJECTDIFF_CACHE at FOLDER."""
    from subjectdiff.datagen.tiny import tiny_models
    from subjectdiff.weights import cache_dir

    shared = (cache_dir() / "tiny").resolve()
    tiny_models(shared)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny").symlink_to(shared, target_is_directory=True)
    return folder


def assert_close(a, b, path="", atol=1e-5):
    """Equal structure, strings, ints and bytes; floats within atol. Batched and one-at-a-time model calls
    differ in the last bits of float32 (a batch of 8 takes other matmul kernels than a batch of 1)."""
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, abs=atol, nan_ok=True), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]", atol)
    else:
        assert a == b, f"{path}: {str(a)[:80]} != {str(b)[:80]}"


def datasets():
    """The `datasets` module (pinned in the test extra), offline: the tests read local folders only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets as hf  # a function-level import: setting the offline variables first is the point

    return hf


def load(out: Path, config: str | None, cache: Path) -> list[dict]:
    """load_dataset(OUT[, CONFIG])["train"] as rows, cached under CACHE (never the user's cache)."""
    args = (str(out),) if config is None else (str(out), config)
    return datasets().load_dataset(*args, cache_dir=str(cache))["train"].to_list()


def catalog_rows(out: Path, table: str, columns: list[str]) -> list[dict]:
    cols = ", ".join(f'"{c}"' for c in columns)
    return catalog.query(out, f"SELECT {cols} FROM {table}").to_pylist()


def by_key(rows: list[dict], *extra: str) -> list[dict]:
    return sorted(rows, key=lambda r: (r["key"], *(r[e] for e in extra)))


def assert_loads_the_catalog(out: Path, cache: Path) -> None:
    """The three configs give the catalog's samples, objects and failures: the same rows, column for column."""
    samples = load(out, None, cache)
    assert samples and samples[0].keys() == {f.name for f in SAMPLE_SCHEMA} - {"status", "stage", "reason"}
    assert by_key(samples) == by_key(catalog_rows(out, "samples", list(samples[0])))
    objects = load(out, "objects", cache)
    assert objects and list(objects[0]) == OBJECT_SCHEMA.names
    assert by_key(objects, "index") == by_key(catalog_rows(out, "objects", OBJECT_SCHEMA.names), "index")
    failures = load(out, "failures", cache)
    cols = ["key", "shard", "source", "stage", "reason"]
    assert by_key(failures) == by_key(catalog_rows(out, "failures", cols))
    assert len(failures) == catalog.query(out, "SELECT count(*) n FROM failures").column("n")[0].as_py()
