"""OUT/manifest.json: what produced a datagen output (input, config, models and their hashes, versions, code
revision) and the runs that made it, each with its command, host, status and counts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from subjectdiff.catalogs import catalog
from subjectdiff.catalogs.storage import Folder, detail, transient
from subjectdiff.datagen import config as stage_config
from subjectdiff.datagen.job import JobConfig
from subjectdiff.datagen.progress import RunSummary
from subjectdiff.datagen.stage_pool import reason
from subjectdiff.datagen.stages import registry
from subjectdiff.errors import signal_name

MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    names = [
        "subjectdiff",
        "torch",
        "torchvision",
        "transformers",
        "groundingdino-py",
        "segment-anything",
        "open_clip_torch",
        "spacy",
        "ray",
        "webdataset",
        "duckdb",
        "pyarrow",
        "numpy",
        "pillow",
    ]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def _revision() -> str | None:
    """The git commit of this code (+dirty), or $SUBJECTDIFF_REVISION where the checkout has no .git
    (cluster nodes get the code without it: docs/cluster.md passes the revision in the job's env)."""
    env = os.environ.get("SUBJECTDIFF_REVISION")
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return env
    if rev.returncode != 0:
        return env
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _models(cfg: stage_config.DatagenConfig) -> dict[str, Any]:
    """Each active stage's model (its registry entry's `describe`), with its checkpoints' paths and hashes as
    `run_manifest` resolves them."""
    ck = run_manifest(cfg)["checkpoints"]
    return {s.name: registry.load(s.describe)(s.settings(cfg), ck) for s in registry.active(cfg) if s.describe}


class Manifest:
    """OUT/manifest.json: what produced OUT. Each run (first or resumed) appends itself to `runs`.
    catalog: the catalog file the run keeps (None: the default place for OUT, catalogs.catalog.catalog_path).
    skipped_files: the files of a folder input that are not taken, by kind ({".txt": 3}; plan.skipped_files)."""

    def __init__(
        self,
        out: str | os.PathLike,
        src: str,
        cfg: JobConfig,
        command: list[str],
        catalog_file: str | os.PathLike | None = None,
        skipped_files: dict[str, int] | None = None,
    ):
        self.folder = Folder(out)
        self.catalog_file = catalog_file
        old = json.loads(self.folder.read_text(MANIFEST)) if self.folder.exists(MANIFEST) else {}
        s = cfg.stages
        self.data = {
            "input": src,
            "skipped_files": skipped_files or {},  # files of a folder input that are no image, by extension
            "output": self.folder.url,
            "preset": cfg.name,
            "config": {"stages": asdict(s), "pipeline": asdict(cfg.pipeline)},
            "models": _models(s),
            "thresholds": {
                "box_threshold": s.ground.box_threshold,
                "text_threshold": s.ground.text_threshold,
                "nms_iou": s.ground.nms_iou,
                "detections": [s.filters.min_detections, s.filters.max_detections],
            },
            "versions": _versions(),
            "code_revision": _revision(),
            "runs": old.get("runs", []),
        }
        self.run = {"command": command, "start": time.time(), "end": None, "status": "running", "host": platform.node()}
        self.data["runs"].append(self.run)
        self._write()

    def finish(self, summary: RunSummary, **extra: Any) -> None:
        self.run.update(
            end=time.time(),
            status="complete" if not summary.incomplete else "incomplete",
            records=summary.ok,
            failures=summary.failed,
            seconds=summary.seconds,
            **extra,
        )
        st = catalog.query(
            self.folder.url,
            "SELECT (SELECT count(*) FROM samples) AS samples, "
            "(SELECT count(*) FROM failures) AS failures, "
            "(SELECT count(*) FROM objects) AS objects, "
            "(SELECT count(*) FROM shards) AS shards",
            catalog=self.catalog_file,
        ).to_pylist()[0]
        self.data["counts"] = st
        self.data["start"] = self.data["runs"][0]["start"]
        self.data["end"] = self.run["end"]
        self._write()

    def abort(self, e: BaseException) -> None:
        """The run stopped on an error, or was interrupted (SIGINT, SIGTERM: subjectdiff.errors.Interrupted): say
        so, and why, instead of 'running'."""
        if isinstance(e, KeyboardInterrupt):
            status, error = "interrupted", f"interrupted by {signal_name(e)}"
        else:
            status, error = "failed", reason(e) if isinstance(e, Exception) else f"{type(e).__name__}: {e}"
        self.run.update(end=time.time(), status=status, error=error)
        try:
            self._write()
        except Exception as w:
            if not (isinstance(w, OSError) or transient(w)):
                raise
            print(f"[datagen] manifest.json could not record the failure ({detail(w)})", file=sys.stderr)

    def _write(self) -> None:
        self.folder.write_text(MANIFEST, json.dumps(self.data, indent=2, default=str))


def run_manifest(cfg: stage_config.DatagenConfig) -> dict:
    """What a run used: the full config and, per checkpoint of the active stages (each registry entry's
    `checkpoints`: GroundingDINO's text encoder and the curate stage's open_clip config, weights and aesthetic
    head included), its resolved path and SHA-256. Specs not yet resolved locally (e.g. a URL never
    downloaded) are recorded with an empty hash rather than fetched."""
    entries = {c.name: c.entry() for s in registry.active(cfg) for c in s.checkpoint_list(cfg)}
    return {"config": cfg.to_json(), "checkpoints": entries}
