"""benchmarks/gpu.sh, the one command that takes the GPU figures: its dry run (the same sections at tiny sizes on
the CPU) must keep working between GPU runs. (The SAM SDPA lever is the segment stage's own setting, tested in
tests/test_sam_attention.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["models", "stages", "sam", "train", "infer", "pipeline"]


# Six subprocesses, each importing torch and the model packages, and one starting Ray: about 2 CPU-minutes.
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dry_run_writes_every_section_with_its_baselines(tmp_path):
    out = tmp_path / "gpu"
    # a budget no loaded CI machine reaches: the test is about what gets written, never about time
    r = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--python", sys.executable, "--dry-run"]
        + ["--out", str(out), "--budget-s", "1500"],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "gpu-results.json").read_text())
    assert result["meta"]["dry_run"] is True
    assert [s["key"] for s in result["sections"]] == SECTIONS
    log = (out / "gpu.log").read_text()
    for s in result["sections"]:
        assert s["status"].startswith(("measured", "ready")), (s["key"], s["status"], log[-3000:])
        if s["key"] == "models":
            continue
        assert s["rows"], s["key"]
        for row in s["rows"]:
            if row["value"] is None:  # the hook: reported, not measured, until the identity stage is registered
                assert (row["what"], row["notes"]) == ("identity", "no identity stage in the datagen registry")
                continue
            # every figure beside its baseline of the same run
            assert row["value"] > 0 and row["baseline_value"] > 0 and row["baseline"], (s["key"], row)
            assert row["speedup"] > 0
    rows = {s["key"]: s["rows"] for s in result["sections"]}
    assert {r["what"].split(",")[0] for r in rows["stages"]} >= {"caption", "nouns", "ground", "segment", "curate"}
    assert len(rows["sam"]) == 5 and all(0 <= r["value"] for r in rows["sam"])
    assert any("data loader" in r["what"] for r in rows["train"])
    md = (out / "gpu-results.md").read_text()
    assert "DRY RUN" in md
    for s in result["sections"]:
        assert f"## {s['title']}" in md
    # every measured row of the JSON is a row of the Markdown table
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| what ")]
    assert len(table_rows) == sum(len(s["rows"]) for s in result["sections"])


def test_a_section_past_its_time_is_reported_and_the_rest_still_written(tmp_path):
    """A budget too small to start anything: every section is in the results, marked as not run."""
    gpu = load_benchmark("gpu")
    out = tmp_path / "gpu"
    gpu.main(["--dry-run", "--out", str(out), "--budget-s", "1"])
    result = json.loads((out / "gpu-results.json").read_text())
    assert [s["key"] for s in result["sections"]] == SECTIONS
    assert all(s["status"].startswith("not run: no time left") for s in result["sections"])
    md = (out / "gpu-results.md").read_text()
    assert md.count("not measured") == len(SECTIONS) - 1  # one row per section but the model files


def test_a_section_stopped_at_its_limit_keeps_the_rows_it_wrote(tmp_path):
    """A script that wrote a row, then hangs: stopped at the limit (its process group killed), its row kept."""
    gpu = load_benchmark("gpu")
    row = {"lever": "fp32", "img_s": 2.0, "miou_vs_fp32": 1.0, "peak_gib": None, "warmup_s": 0.1}
    script = (
        "import json, sys, time; p = sys.argv[sys.argv.index('--json') + 1]; "
        f"open(p, 'w').write(json.dumps({{'rows': [{row!r}]}})); time.sleep(300)"
    )
    with open(tmp_path / "gpu.log", "w") as log:
        status, raw, seconds = gpu.run_section(gpu.Section("sam", "SAM", ["-c", script]), 5, log, tmp_path, True)
    assert status.startswith("stopped at its time limit") and "rows measured before it" in status
    assert seconds < 60
    [kept] = gpu.sam_rows(raw)
    assert kept["value"] == 2.0 and kept["baseline_value"] == 2.0


def test_mask_iou():
    stages = load_benchmark("stages")
    a = [torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool).numpy()]
    b = [torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool).numpy()]
    assert stages.mask_iou(a, b) == pytest.approx((0.5 + 1.0) / 2)  # two empty masks agree
