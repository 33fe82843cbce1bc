"""Helpers shared by the tests that run datagen's pipeline: the tiny preset sized for a test, and comparing
records and manifests read back from two runs."""

from __future__ import annotations

import pytest

from subjectdiff.datagen.job import JobConfig, preset


def tiny_cfg(shard_size: int = 3, batch_size: int = 8) -> JobConfig:
    """The tiny preset with shards of SHARD_SIZE images and every batch (pipeline and model stages) BATCH_SIZE."""
    cfg = preset("tiny")
    cfg.pipeline.shard_size = shard_size
    cfg.pipeline.batch_size = batch_size
    for stage in (cfg.stages.caption, cfg.stages.ground, cfg.stages.segment, cfg.stages.curate):
        stage.batch_size = batch_size
    return cfg


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
