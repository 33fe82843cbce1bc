"""`subjectdiff datagen run`: source images -> catalogued Subject-Diffusion records, on Ray Data.

    plan (driver)     list SRC once into OUT/_plan.parquet: one row per image, shard_size rows per shard
                      (tar shards are listed by Ray tasks; duplicates removed on disk)
    read + decode     CPU tasks: bytes of each unit, decoded once (undecodable -> a 'decode' failure);
                      images too small or too elongated fail the size/aspect filter here, before any model
    caption           actor pool (BLIP)           \
    nouns             actor pool (spaCy)           | each model stage loads its model once per actor,
    ground            actor pool (GroundingDINO)   | with its own pool size and (fractional) GPUs
    filter            CPU tasks (image filters)    |
    segment           actor pool (SAM)            /
    write             one writer actor on the driver's node: streams each record into its shard's tar,
                      commits the shard when its last sample arrives, refreshes the catalog

Everything streams: blocks flow through the stages as they are ready, and no stage holds a whole shard.
Order is preserved, so a shard's records are written in plan order and a rerun writes the same bytes.

Resume: rerunning the same command reuses the plan, skips complete shards and redoes the others (a
shard is complete only when all its files are committed, see catalogs/writer.py). Within one run, shards
left incomplete by a lost worker are retried up to `max_attempts` times before the run gives up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import platform
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from catalogs import catalog
from catalogs.schema import Failure
from catalogs.writer import TMP_SUFFIX, ShardWriter, is_complete, shard_files
from datagen import config as stage_config
from datagen import sources
from subjectdiff.overrides import apply, merge_dicts, parse_override

log = logging.getLogger(__name__)

STAGES = ("caption", "nouns", "ground", "filter", "segment")
_MODEL_STAGES = ("caption", "nouns", "ground", "segment")


@dataclass
class PoolConfig:
    """Ray resources of one stage. concurrency: actors in the pool; num_gpus may be fractional (0.25:
    four actors share a GPU); on a cluster without GPUs it is set to 0 with a warning."""

    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"pool: concurrency >= 1, num_gpus >= 0, num_cpus >= 0 (got {self})")


@dataclass
class PipelineConfig:
    shard_size: int = 1000
    batch_size: int = 8  # items per block sent to a stage (each stage may split it further)
    read_num_cpus: float = 1.0
    writer_num_cpus: float = 1.0
    catalog_refresh_s: float = 30.0  # a running job's catalog is at most this stale
    max_attempts: int = 3
    # fuse: one actor pool runs all five model stages in turn (one process and one model load per actor,
    # no hand-over between stages); its size is the largest stage pool's, its GPU share their sum (at
    # most 1). For machines with few cores, or one GPU per node where the stages would share it anyway.
    fuse: bool = False
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {s: PoolConfig() for s in _MODEL_STAGES})

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("pipeline: shard_size, batch_size and max_attempts must be >= 1")
        self.pools = {k: v if isinstance(v, PoolConfig) else PoolConfig(**v) for k, v in self.pools.items()}
        unknown = set(self.pools) - set(_MODEL_STAGES)
        if unknown:
            raise ValueError(f"pipeline.pools: unknown stage(s) {sorted(unknown)}; stages are {_MODEL_STAGES}")
        for s in _MODEL_STAGES:
            self.pools.setdefault(s, PoolConfig())


@dataclass
class RunConfig:
    stages: stage_config.DatagenConfig
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    @property
    def name(self) -> str:
        return self.stages.name


def preset(name: str) -> RunConfig:
    """`default`: the paper's models on GPUs (fractional GPUs so the four stages share one);
    `tiny`: tiny random models on CPU, small shards, light actors (tests and the offline demo);
    `full-random`: `default`'s pipeline with its architectures at random weights (benchmarks; the models
    are written to this machine's cache, so run it on one node)."""
    if name in ("default", "full-random"):
        pools = {"caption": PoolConfig(1, 0.25), "nouns": PoolConfig(1, 0.0), "ground": PoolConfig(1, 0.25),
                 "segment": PoolConfig(1, 0.5)}
        stages = stage_config.default() if name == "default" else stage_config.full_random()
        return RunConfig(stages, PipelineConfig(pools=pools))
    if name == "tiny":
        pools = {s: PoolConfig(1, 0.0, 0.25) for s in _MODEL_STAGES}
        return RunConfig(stage_config.tiny(), PipelineConfig(shard_size=100, batch_size=4, read_num_cpus=0.25,
                                                              writer_num_cpus=0.25, catalog_refresh_s=5.0,
                                                              pools=pools))
    raise ValueError(f"unknown preset {name!r}; presets: default, tiny, full-random")


def load_config(preset_name: str = "default", config_file: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A preset, with a TOML file's `[caption]`, `[nouns]`, `[ground]`, `[segment]`, `[filters]` and
    `[pipeline]` (with `[pipeline.pools.STAGE]`) tables laid over it, then `key=value` overrides in order
    (`ground.box_threshold=0.3`, `pipeline.pools.segment.num_gpus=1`): subjectdiff.overrides, as for training."""
    cfg = preset(preset_name)
    values: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as f:
            values = tomllib.load(f)
    for o in overrides:
        values = merge_dicts(values, parse_override(o))
    pipe = values.pop("pipeline", {})
    return RunConfig(apply(cfg.stages, values), apply(cfg.pipeline, pipe, "pipeline."))


# ---------------------------------------------------------------------------------------------- stages

def _pack(shards: list[str], items: list[dict]) -> dict[str, np.ndarray]:
    # Items carry ragged images and nested lists: one pickled column moves them between stages intact.
    return {"shard": np.asarray(shards, dtype=object),
            "item": np.asarray([pickle.dumps(i, protocol=5) for i in items], dtype=object)}


def _unpack(batch: dict[str, np.ndarray]) -> tuple[list[str], list[dict]]:
    return list(batch["shard"]), [pickle.loads(b) for b in batch["item"]]


def read_and_decode(batch: dict[str, np.ndarray], filters: stage_config.FilterConfig | None = None
                    ) -> dict[str, np.ndarray]:
    """Plan rows -> decoded items (a read or decode problem becomes the item's failure). With FILTERS, an
    image too small or too elongated fails its size/aspect filter here, before any model sees it."""
    from datagen.stages.common import decode_item, fail, failed
    from datagen.stages.filters import prefilter

    items, shards = [], []
    for i in range(len(batch["key"])):
        source, key = str(batch["source"][i]), str(batch["key"][i])
        alt = batch["alt_text"][i]
        alt = None if alt is None or (isinstance(alt, float) and np.isnan(alt)) else str(alt)
        err = batch["error"][i]
        if isinstance(err, str) and err:
            item = fail({"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read", err)
        else:
            try:
                column = batch["column"][i] if "column" in batch else None
                data = sources.read_unit(str(batch["path"][i]), int(batch["offset"][i]), int(batch["size"][i]),
                                         *([str(column)] if isinstance(column, str) and column else []))
                item = decode_item(source, data, alt_text=alt, key=key)
            except OSError as e:
                item = fail({"key": key, "source": source, "image_bytes": b"", "alt_text": alt}, "read",
                            f"unreadable input: {type(e).__name__}")
        if filters is not None and not failed(item):
            item = prefilter(item, filters)
        items.append(item)
        shards.append(str(batch["shard"][i]))
    return _pack(shards, items)


def build_stage(name: str, cfg: stage_config.DatagenConfig):
    """The stage object for NAME, loading its model (once)."""
    from datagen import stages

    if name == "caption":
        return stages.Captioner(cfg.caption)
    if name == "nouns":
        return stages.NounExtractor(cfg.nouns)
    if name == "ground":
        return stages.Grounder(cfg.ground)
    if name == "filter":
        return stages.ImageFilter(cfg.filters)
    if name == "segment":
        return stages.Segmenter(cfg.segment)
    if name == "fused":
        from datagen.stages.chain import build_stages, run_stages

        chain = build_stages(cfg)
        return lambda items: run_stages(chain, items)
    raise ValueError(f"unknown stage {name!r}")


class StageActor:
    """Hosts one stage in a Ray actor: the model loads in __init__, each call maps one block."""

    def __init__(self, name: str, cfg: stage_config.DatagenConfig, factory=None):
        self.name = name
        self.stage = (factory or build_stage)(name, cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, items = _unpack(batch)
        return _pack(shards, self.map(items))

    def map(self, items: list[dict]) -> list[dict]:
        """The stage over a block. An exception the stage does not turn into failures itself (a GPU out of
        memory on one huge image, a model bug on odd input) does not stop the run: the block is redone one
        item at a time, and each item that still raises becomes a failure of this stage with its error."""
        try:
            out = self.stage(items)
        except Exception as e:  # noqa: BLE001 - any stage error is recorded per sample below
            if len(items) == 1:
                return [self._failed(items[0], e)]
            log.warning("stage %s raised on a block of %d (%s); redoing it one item at a time",
                        self.name, len(items), _reason(e))
            out = []
            for item in items:
                try:
                    out.extend(self.stage([item]))
                except Exception as e1:  # noqa: BLE001
                    out.append(self._failed(item, e1))
        if len(out) != len(items):  # a stage must account for every item it was given
            raise RuntimeError(f"stage {self.name} returned {len(out)} items for {len(items)}")
        return out

    def _failed(self, item: dict, e: Exception) -> dict:
        from datagen.stages.common import fail

        if self.name == "fused":  # the item records which of the chained stages it reached
            stage = next((s for s in ("segment", "ground", "nouns", "caption") if _reached(item, s)), "caption")
        else:
            stage = self.name
        return fail(item, stage, f"error: {_reason(e)}")


def _reason(e: BaseException) -> str:
    """One line for a failure or a manifest: the innermost cause (Ray wraps a stage's error in its own)."""
    seen = {id(e)}
    while (inner := getattr(e, "cause", None) or e.__cause__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        e = inner
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _reached(item: dict, stage: str) -> bool:
    """Whether ITEM got as far as STAGE in a fused chain (its inputs are there)."""
    need = {"caption": "image", "nouns": "caption", "ground": "nouns", "segment": "detections"}[stage]
    return item.get(need) is not None


def filter_block(batch: dict[str, np.ndarray], cfg: stage_config.DatagenConfig, factory=None) -> dict[str, np.ndarray]:
    """The image filter over one block, as a Ray task (it holds no model)."""
    return StageActor("filter", cfg, factory)(batch)


class ShardWriterActor:
    """The last stage: streams items into their shards' writers and commits each complete shard."""

    def __init__(self, out: str, expected: dict[str, int], refresh_s: float, extra: dict[str, Any]):
        self.out = Path(out)
        self.expected = expected
        self.refresh_s = refresh_s
        self.extra = extra
        self.open: dict[str, ShardWriter] = {}
        self.closed: set[str] = set()
        self.last_refresh = time.monotonic()

    def _writer(self, shard: str) -> ShardWriter:
        if shard not in self.open:
            self.open[shard] = ShardWriter(self.out, shard, extra_stats=self.extra)
        return self.open[shard]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, items = _unpack(batch)
        ok, stage, completed = [], [], []
        for shard, item in zip(shards, items):
            w = None if shard in self.closed else self._writer(shard)
            if w is None or item["key"] in w:  # a retried block delivered twice: write once
                ok.append(True)
                stage.append("duplicate")
                completed.append("")
                continue
            written, failed_stage = self._write(w, item)
            ok.append(written)
            stage.append(failed_stage)
            done = w.stats.n_ok + w.stats.n_failed >= self.expected[shard]
            completed.append(shard if done else "")
            if done:
                self.open.pop(shard).close()
                self.closed.add(shard)
                if time.monotonic() - self.last_refresh > self.refresh_s:
                    self._refresh()
        return {"shard": np.asarray(shards, dtype=object), "ok": np.asarray(ok),
                "stage": np.asarray(stage, dtype=object), "completed": np.asarray(completed, dtype=object)}

    @staticmethod
    def _write(w: ShardWriter, item: dict) -> tuple[bool, str]:
        """Append one item to its shard: (written as a record, failure stage or "")."""
        from datagen.assemble import to_record

        rec = to_record(item)
        if isinstance(rec, Failure):
            w.fail(rec)
            return False, rec.stage
        try:
            w.write(rec)
            return True, ""
        except ValueError as e:  # a record that breaks the contract is a failure, not a crash
            w.fail(Failure(rec.key, rec.source, "write", f"invalid record: {str(e).split(': ', 1)[-1]}"))
            return False, "write"

    def _refresh(self) -> None:
        try:
            catalog.build(self.out, timeout=5.0)
        except catalog.CatalogError:
            pass  # someone holds the catalog; the next shard or the driver's final build refreshes it
        self.last_refresh = time.monotonic()

    def __del__(self) -> None:
        for w in self.open.values():  # incomplete shards: nothing may stay under a final name
            try:
                w.abort()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------- run

@dataclass
class RunSummary:
    shards: int
    samples: int
    ok: int
    failed: int
    seconds: float
    skipped_shards: int
    incomplete: list[str]

    def line(self) -> str:
        rate = (self.ok + self.failed) / self.seconds if self.seconds else 0.0
        return (f"datagen: {self.ok} records, {self.failed} failures in {self.shards} shard(s) "
                f"({self.skipped_shards} already complete), {self.seconds:.1f} s, {rate:.3g} images/s")


class Progress:
    """Samples done / failed / rate / ETA on stderr, at most every `every` seconds."""

    def __init__(self, total: int, every: float = 5.0, stream=sys.stderr):
        self.total, self.every, self.stream = total, every, stream
        self.ok = self.failed = 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.shown = -1

    def update(self, ok: int, failed: int, force: bool = False) -> None:
        self.ok += ok
        self.failed += failed
        now = time.monotonic()
        done = self.ok + self.failed
        if (not force and now - self.last < self.every) or (force and done == self.shown):
            return
        self.shown = done
        self.last = now
        done = self.ok + self.failed
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = _duration(eta) if eta != float("inf") else "?"
        print(f"[datagen] {done}/{self.total} samples ({self.ok} ok, {self.failed} failed) "
              f"{rate:.3g} img/s, ETA {eta_s}", file=self.stream, flush=True)


# Stage settings that change how fast records are made, not what they hold: a resume may change them.
_OPERATIONAL = ("device", "batch_size")


def stages_fingerprint(cfg: stage_config.DatagenConfig) -> str:
    """A hash of every stage setting that shapes the records (models, thresholds, filters, dtypes)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in sorted(x.items()) if k not in _OPERATIONAL}
        return list(x) if isinstance(x, tuple) else x

    blob = json.dumps(strip({k: v for k, v in cfg.to_json().items() if k != "name"}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _duration(seconds: float) -> str:
    """'05:04:03', or '2d 05:04:03' past a day (a large run's ETA)."""
    days, rest = divmod(int(seconds), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock


def _plan(src: str, out: Path, shard_size: int, fingerprint: str, map_urls=None,
          columns: dict[str, str | None] | None = None) -> dict[str, int]:
    """Reuse OUT's plan when it was made for the same input, shard size and stage settings; else make it.
    COLUMNS: {"image_column": ..., "caption_column": ...} naming a list's columns (None: the defaults)."""
    plan, meta_path = out / "_plan.parquet", out / "_plan.json"
    columns = {k: v for k, v in (columns or {}).items() if v}
    want = {"input": src, "shard_size": shard_size, "stages": fingerprint, **columns}
    if plan.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("input") != src or meta.get("shard_size") != shard_size:
            raise sources.SourceError(
                f"{out} holds a run of input {meta.get('input')!r} with shard_size {meta.get('shard_size')}; "
                "use another --output (or the same input and settings to resume)"
            )
        if meta.get("stages", fingerprint) != fingerprint:
            raise sources.SourceError(
                f"{out} holds records made with other stage settings (models, thresholds or filters; "
                f"fingerprint {meta['stages']}, now {fingerprint}): resuming would mix them. Use another "
                "--output, or the config of that run (its manifest.json has it)"
            )
        if any(meta.get(k) != v for k, v in columns.items()):
            raise sources.SourceError(f"{out} holds a run with other input columns "
                                      f"({ {k: meta.get(k) for k in columns} }); use another --output")
        return meta["shards"]
    counts = sources.write_plan(src, plan, shard_size, map_urls=map_urls, **columns)
    meta_path.write_text(json.dumps({**want, "shards": counts, "created": time.time()}))
    return counts


def _ray_map(fn, urls):
    """sources.write_plan's map_urls on Ray: FN over URLS as tasks, a bounded number in flight, in order."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=3)(fn)
    window = max(4, int(ray.cluster_resources().get("CPU", 2)) * 2)
    pending = []
    for url in urls:
        pending.append(task.remote(url))
        if len(pending) >= window:
            yield ray.get(pending.pop(0))
    for ref in pending:
        yield ray.get(ref)


def _clean_partial(out: Path, shards: list[str]) -> None:
    for s in shards:
        for p in shard_files(out, s).values():
            p.with_name(p.name + TMP_SUFFIX).unlink(missing_ok=True)
            p.unlink(missing_ok=True)  # a shard that is not complete is redone whole


def _cpu_slots(cfg: PipelineConfig) -> float:
    """Logical CPUs the pipeline reserves at once: actor pools, the writer, a read task and Ray Data's own
    file-listing task (which takes a whole CPU)."""
    pools = sum(p.concurrency * p.num_cpus for p in cfg.pools.values())
    return pools + cfg.read_num_cpus * 2 + cfg.writer_num_cpus + 1.0


def _init_ray(address: str | None, cfg: PipelineConfig) -> None:
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # A local Ray, quiet (the pipeline reports its own progress). Ray's CPUs are scheduling slots,
            # not cores: on a small machine, offer enough slots for every stage to hold its actor, or
            # Ray Data would wait forever for a slot that an actor keeps.
            slots = max(os.cpu_count() or 1, int(_cpu_slots(cfg) + 0.999))
            ray.init(num_cpus=slots, include_dashboard=False, log_to_driver=False)


def _resolve_gpus(cfg: PipelineConfig, local: bool) -> None:
    """A Ray started here that has no GPU never will: its GPU stages run on CPU. On a cluster, GPU nodes
    may not exist yet (an autoscaler starts them when the GPU actors ask): the requests stay."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        return
    wanted = [name for name, pool in cfg.pools.items() if pool.num_gpus > 0]
    if not wanted:
        return
    if not local:
        print(f"[datagen] no GPU node in the Ray cluster yet: stages {', '.join(wanted)} wait for the "
              "autoscaler to add one (set their pipeline.pools.STAGE.num_gpus = 0 to run them on CPU)",
              file=sys.stderr)
        return
    for name in wanted:
        print(f"[datagen] no GPU on this machine: stage {name} runs on CPU", file=sys.stderr)
        cfg.pools[name].num_gpus = 0.0


def _build_dataset(out: Path, todo: list[str], counts: dict[str, int], cfg: RunConfig, extra: dict[str, Any],
                   factory=None):
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.expressions import col

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards are written in plan order: reruns are identical
    ctx.enable_progress_bars = False  # our own progress line replaces Ray Data's per-operator bars
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its full logs stay in the Ray session folder
    p = cfg.pipeline
    ds = ray.data.read_parquet(str(out / "_plan.parquet"))
    if len(todo) < len(counts):  # a resumed run: only the shards still to do
        ds = ds.filter(expr=col("shard").is_in(todo))
    ds = ds.map_batches(read_and_decode, fn_kwargs={"filters": cfg.stages.filters}, batch_size=p.batch_size,
                        num_cpus=p.read_num_cpus)
    if p.fuse:
        pools = [p.pools[n] for n in _MODEL_STAGES]
        ds = ds.map_batches(StageActor, fn_constructor_args=("fused", cfg.stages, factory), batch_size=p.batch_size,
                            compute=ActorPoolStrategy(size=max(x.concurrency for x in pools)),
                            num_gpus=min(1.0, sum(x.num_gpus for x in pools)),
                            num_cpus=max(x.num_cpus for x in pools))
    for name in STAGES if not p.fuse else ():
        if name == "filter":  # no model: plain tasks, as many as there are free CPUs
            ds = ds.map_batches(filter_block, fn_kwargs={"cfg": cfg.stages, "factory": factory},
                                batch_size=p.batch_size, num_cpus=p.read_num_cpus)
            continue
        pool = p.pools[name]
        ds = ds.map_batches(StageActor, fn_constructor_args=(name, cfg.stages, factory), batch_size=p.batch_size,
                            compute=ActorPoolStrategy(size=pool.concurrency), num_gpus=pool.num_gpus,
                            num_cpus=pool.num_cpus)
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # the label every Ray node carries
    return ds.map_batches(ShardWriterActor, fn_constructor_args=(str(out), {s: counts[s] for s in todo},
                                                                 p.catalog_refresh_s, extra),
                          batch_size=p.batch_size, compute=ActorPoolStrategy(size=1), num_cpus=p.writer_num_cpus,
                          label_selector=here)


def run(src: str, out: str | os.PathLike, cfg: RunConfig, *, ray_address: str | None = None,
        command: list[str] | None = None, progress_every: float = 5.0, stage_factory=None,
        image_column: str | None = None, caption_column: str | None = None) -> RunSummary:
    """Run (or resume) the pipeline from SRC into OUT; see the module docstring.

    stage_factory(name, stage_config) -> stage replaces `build_stage` (tests inject slow or failing stages).
    """
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "://" not in src:
        src = os.path.abspath(src)  # local paths (brace patterns too) are recorded absolute: any worker opens them
    sources.detect(src)  # a bad SRC is one clear error before Ray starts (planning lists shards on Ray)
    _init_ray(ray_address, cfg.pipeline)
    counts = _plan(src, out, cfg.pipeline.shard_size, stages_fingerprint(cfg.stages), map_urls=_ray_map,
                   columns={"image_column": image_column, "caption_column": caption_column})
    total = sum(counts.values())
    done_before = [s for s in counts if is_complete(out, s)]
    manifest = Manifest(out, src, cfg, command or sys.argv)
    try:
        _resolve_gpus(cfg.pipeline, local=not ray_address)  # no address: Ray on this machine
        prog = Progress(total - sum(counts[s] for s in done_before), every=progress_every)
        per_shard: dict[str, list[int]] = {}  # shard -> [ok, failed] written by this run
        todo: list[str] = []
        for _attempt in range(cfg.pipeline.max_attempts):
            todo = [s for s in counts if not is_complete(out, s)]
            if not todo:
                break
            _clean_partial(out, todo)
            for s in todo:  # redone whole: what an earlier attempt wrote to it is gone
                prev_ok, prev_failed = per_shard.get(s, (0, 0))
                prog.update(-prev_ok, -prev_failed)
                per_shard[s] = [0, 0]
            ds = _build_dataset(out, todo, counts, cfg, {"run_start": t0}, stage_factory)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                real = batch["stage"] != "duplicate"
                for shard, is_ok, is_real in zip(batch["shard"], batch["ok"], real):
                    per_shard[shard][0 if is_ok else 1] += int(bool(is_real))
                n_ok, n_failed = int((batch["ok"] & real).sum()), int((~batch["ok"]).sum())
                prog.update(n_ok, n_failed)
        prog.update(0, 0, force=True)
        incomplete = [s for s in counts if not is_complete(out, s)]
        print(catalog.build(out).summary(), file=sys.stderr)
        ok, failed = sum(v[0] for v in per_shard.values()), sum(v[1] for v in per_shard.values())
        summary = RunSummary(len(counts), total, ok, failed, time.time() - t0, len(done_before), incomplete)
    except BaseException as e:
        manifest.abort(e)
        raise
    manifest.finish(summary)
    return summary


# ---------------------------------------------------------------------------------------------- manifest

def _versions() -> dict[str, str]:
    names = ["subjectdiff", "torch", "torchvision", "transformers", "groundingdino-py", "segment-anything",
             "open_clip_torch", "spacy", "ray", "webdataset", "duckdb", "pyarrow", "numpy", "pillow"]
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
    """Each stage's model, with its checkpoints' paths and hashes as `weights.run_manifest` resolves them."""
    from datagen import weights

    ck = weights.run_manifest(cfg)["checkpoints"]
    ground = {"config": ck["ground.config_file"], "checkpoint": ck["ground.checkpoint"]}
    if "ground.text_encoder" in ck:
        ground["text_encoder"] = ck["ground.text_encoder"]
    return {
        "caption": {"kind": cfg.caption.kind, **ck["caption.model"]},
        "nouns": {"spacy_model": cfg.nouns.spacy_model, "mode": cfg.nouns.mode, **_spacy_version(cfg.nouns)},
        "ground": ground,
        "segment": {"model_type": cfg.segment.model_type, **ck["segment.checkpoint"]},
    }


def _spacy_version(cfg: stage_config.NounsConfig) -> dict[str, str]:
    """The spaCy pipeline "auto" picks (the first installed), with its version, without loading it."""
    from datagen.stages.nouns import SPACY_MODELS

    for name in SPACY_MODELS if cfg.spacy_model == "auto" else (cfg.spacy_model,):
        try:
            return {"spacy_pipeline": name, "spacy_pipeline_version": metadata.version(name.replace("_", "-"))}
        except metadata.PackageNotFoundError:
            continue
    return {}


class Manifest:
    """OUT/manifest.json: what produced OUT. Each run (first or resumed) appends itself to `runs`."""

    def __init__(self, out: Path, src: str, cfg: RunConfig, command: list[str]):
        self.path = out / "manifest.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        s = cfg.stages
        self.data = {
            "input": src,
            "output": str(out.resolve()),
            "preset": cfg.name,
            "config": {"stages": asdict(s), "pipeline": asdict(cfg.pipeline)},
            "models": _models(s),
            "thresholds": {"box_threshold": s.ground.box_threshold, "text_threshold": s.ground.text_threshold,
                           "nms_iou": s.ground.nms_iou, "detections": [s.filters.min_detections,
                                                                       s.filters.max_detections]},
            "versions": _versions(),
            "code_revision": _revision(),
            "runs": old.get("runs", []),
        }
        self.run = {"command": command, "start": time.time(), "end": None, "status": "running",
                    "host": platform.node()}
        self.data["runs"].append(self.run)
        self._write()

    def finish(self, summary: RunSummary) -> None:
        self.run.update(end=time.time(), status="complete" if not summary.incomplete else "incomplete",
                        records=summary.ok, failures=summary.failed, seconds=summary.seconds)
        st = catalog.query(self.path.parent, "SELECT (SELECT count(*) FROM samples) AS samples, "
                                             "(SELECT count(*) FROM failures) AS failures, "
                                             "(SELECT count(*) FROM objects) AS objects, "
                                             "(SELECT count(*) FROM shards) AS shards").to_pylist()[0]
        self.data["counts"] = st
        self.data["start"] = self.data["runs"][0]["start"]
        self.data["end"] = self.run["end"]
        self._write()

    def abort(self, e: BaseException) -> None:
        """The run stopped on an error (or was interrupted): say so, and why, instead of 'running'."""
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        self.run.update(end=time.time(), status=status, error=_reason(e) if isinstance(e, Exception) else status)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)

