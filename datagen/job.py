"""What a datagen job is: the stage settings (datagen/config.py) plus how the job runs on Ray, and its presets.

cfg = load_config("default", "datagen.toml", ["pipeline.pools.segment.concurrency=16"])
cfg.stages    # DatagenConfig: models, thresholds, filters (these shape the records)
cfg.pipeline  # PipelineConfig: shard size, blocks, pools of actors per stage (these only shape the run)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from subjectdiff.datagen import config as stage_config
from subjectdiff.datagen.stages import registry
from subjectdiff.overrides import apply, merge_dicts, parse_override, read_toml, to_toml


def active_stages(stages: stage_config.DatagenConfig) -> tuple[str, ...]:
    """The names of the chain a job runs, in order (registry.active: less a stage switched off, such as curate
    with `curate.enabled = false`)."""
    return tuple(s.name for s in registry.active(stages))


@dataclass
class PoolConfig:
    """Ray resources of one stage. concurrency: actors in the pool; num_gpus may be fractional (0.25:
    four actors share a GPU); on a Ray started here without GPUs it is set to 0 with a warning.
    resources: custom Ray resources each actor needs ({"A10G": 1}, or a benchmark's stand-in for a GPU)."""

    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"pool: concurrency >= 1, num_gpus >= 0, num_cpus >= 0 (got {self})")


@dataclass
class PipelineConfig:
    """How the job runs (none of it changes what the records hold; see docs/pipeline.md).

    blocks_in_flight: blocks (of batch_size samples) between decoding and writing at once, over the whole
        cluster; 0 = twice the number of stage actors, plus two (enough to keep every actor fed, and a bound
        on the decoded images held in Ray's object store).
    shards_per_writer: shards a writer assembles at once (the next one starts while the last finishes).
    spool_dir: the local folder where writers assemble shards of a remote output before uploading them
        (default: the system's temporary folder on each node).
    """

    shard_size: int = 1000
    batch_size: int = 8  # items per block sent to a stage (each stage may split it further)
    read_num_cpus: float = 1.0
    writer_num_cpus: float = 1.0
    catalog_refresh_s: float = 30.0  # a running job's catalog is at most this stale
    max_attempts: int = 3
    blocks_in_flight: int = 0
    shards_per_writer: int = 2
    spool_dir: str = ""
    # fuse: one actor pool runs all the model stages in turn (one process and one model load per actor,
    # no hand-over between stages); its size is the largest stage pool's, its GPU share their sum (at
    # most 1). For machines with few cores, or one GPU per node where the stages would share it anyway.
    fuse: bool = False
    pools: dict[str, PoolConfig] = field(default_factory=lambda: {s: PoolConfig() for s in registry.names(model=True)})

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("pipeline: shard_size, batch_size and max_attempts must be >= 1")
        if self.blocks_in_flight < 0 or self.shards_per_writer < 1:
            raise ValueError("pipeline: blocks_in_flight must be >= 0 (0: automatic), shards_per_writer >= 1")
        self.pools = {k: v if isinstance(v, PoolConfig) else PoolConfig(**v) for k, v in self.pools.items()}
        known = registry.names(model=True)
        unknown = set(self.pools) - set(known)
        if unknown:
            raise ValueError(f"pipeline.pools: unknown stage(s) {sorted(unknown)}; stages with a model are {known}")
        for s in known:
            self.pools.setdefault(s, PoolConfig())

    def stage_pools(self, stages: tuple[str, ...] | None = None) -> dict[str, PoolConfig]:
        """The actor pools the job starts, in chain order: one per model stage among STAGES (default: every
        registered stage; `active_stages`: no curate pool when that stage is off), or one `fused` pool for them
        all."""
        with_model = registry.names(model=True)
        names = [s for s in (registry.names() if stages is None else stages) if s in with_model]
        if not self.fuse:
            return {s: self.pools.get(s) or PoolConfig() for s in names}  # a stage registered after this config
        pools = [self.pools.get(s) or PoolConfig() for s in names]
        resources: dict[str, float] = {}
        for p in pools:
            for k, v in p.resources.items():
                resources[k] = max(resources.get(k, 0.0), v)
        return {
            "fused": PoolConfig(
                concurrency=max(p.concurrency for p in pools),
                num_gpus=min(1.0, sum(p.num_gpus for p in pools)),
                num_cpus=max(p.num_cpus for p in pools),
                resources=resources,
            )
        }


@dataclass
class JobConfig:
    stages: stage_config.DatagenConfig
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    @property
    def name(self) -> str:
        return self.stages.name

    def stage_pools(self) -> dict[str, PoolConfig]:
        """The actor pools this job starts (PipelineConfig.stage_pools over its active stages)."""
        return self.pipeline.stage_pools(active_stages(self.stages))

    def to_toml(self) -> str:
        """The job's settings as the TOML `--config` reads (the stage tables, `[pipeline]`), every one written
        (an unset one as "none", subjectdiff.overrides): `load_config(config_file=...)` gives this job again."""
        header = (
            "the resolved datagen config: `subjectdiff datagen run --config THIS_FILE` runs with it\n"
            'unset options are "none" (TOML has no null)'
        )
        return to_toml({**asdict(self.stages), "pipeline": asdict(self.pipeline)}, header)


def preset(name: str) -> JobConfig:
    """`default`: the paper's models on GPUs (fractional GPUs so the four GPU stages share one: each registry
    entry's `num_gpus`, caption 0.2, ground 0.2, segment 0.5, curate 0.05, identity 0.05);
    `tiny`: tiny random models on CPU, small shards, light actors (tests and the offline demo);
    `paper`: `default` with the data recipe of the authors' data_process.py (docs/datagen.md);
    `full-random`: `default`'s pipeline with its architectures at random weights (benchmarks; the models
    are written to this machine's cache, so run it on one node)."""
    stages = stage_config.PRESETS[name]()  # the one list of datagen presets; an unknown name stops here
    if name == "tiny":
        pools = {s: PoolConfig(1, 0.0, 0.25) for s in registry.names(model=True)}
        return JobConfig(
            stages,
            PipelineConfig(
                shard_size=100,
                batch_size=4,
                read_num_cpus=0.25,
                writer_num_cpus=0.25,
                catalog_refresh_s=5.0,
                pools=pools,
            ),
        )
    pools = {s.name: PoolConfig(1, s.num_gpus) for s in registry.STAGES if s.model}
    return JobConfig(stages, PipelineConfig(pools=pools))


def load_config(
    preset_name: str = "default", config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> JobConfig:
    """A preset, with a TOML file's `[decode]`, `[caption]`, `[nouns]`, `[ground]`, `[segment]`, `[filters]`,
    `[curate]` and `[pipeline]` (with `[pipeline.pools.STAGE]`) tables laid over it, then `key=value` overrides in
    order (`ground.box_threshold=0.3`, `decode.max_pixels=50000000`, `pipeline.pools.segment.num_gpus=1`):
    subjectdiff.overrides, as for training."""
    cfg = preset(preset_name)
    values: dict[str, Any] = {}
    if config_file:
        values = read_toml(config_file)
    for o in overrides:
        values = merge_dicts(values, parse_override(o))
    pipe = values.pop("pipeline", {})
    return JobConfig(apply(cfg.stages, values), apply(cfg.pipeline, pipe, "pipeline."))
