"""`subjectdiff datagen run`: source images -> catalogued Subject-Diffusion records, on Ray.

How a record travels (one module per role):

    datagen/plan.py         list SRC once into OUT/_plan.parquet: one row per image, shard_size rows per shard
    datagen/distributor.py  the driver: shards to committers, blocks through the stages, counts back
    datagen/decode.py       CPU tasks: each unit's bytes read and decoded once (size/aspect filters here)
    datagen/stage_pool.py   actor pools: caption (BLIP), nouns (spaCy), ground (GroundingDINO), segment (SAM),
                            curate (open_clip: hashes, CLIP and aesthetic scores, embeddings; skippable),
                            each model loaded once per actor, with its own pool size and (fractional) GPUs;
                            the detection filter runs as CPU tasks between ground and segment
    datagen/committer.py    a writer beside each last-stage actor: spools its shards' records to local disk
                            and publishes each finished shard to OUT (a folder or a bucket), stats last
    datagen/manifest.py     OUT/manifest.json: config, models and hashes, versions, every run of OUT
    catalogs/card.py        OUT/README.md, written after the run's catalog build: `load_dataset(OUT)`

OUT is a local folder or any fsspec URL (s3://bucket/prefix): shards, sidecars, the plan and the manifest
live there; the DuckDB catalog is local (catalogs.catalog.catalog_path, or `catalog=`).

Resume: rerunning the same command reuses the plan, skips complete shards and redoes the others (a shard is
complete only when its stats file is published, see catalogs/writer.py). Within one run, shards left
incomplete by a lost worker are retried up to `max_attempts` times before the run gives up.
`retry_failures=True` redoes, in complete shards, only the samples whose failure may pass on a second try
(datagen/retry.py).
"""

from __future__ import annotations

import os
import sys
import time

from subjectdiff.catalogs import card, catalog
from subjectdiff.catalogs.storage import Entry, Folder
from subjectdiff.catalogs.writer import KINDS, complete_shards, partial_files
from subjectdiff.datagen import plan, ray_setup, retry, sources
from subjectdiff.datagen.distributor import Distributor, Outcome, local_output_node
from subjectdiff.datagen.job import JobConfig, active_stages
from subjectdiff.datagen.manifest import Manifest
from subjectdiff.datagen.progress import RunSummary, describe_skipped, notice
from subjectdiff.errors import interrupts
from subjectdiff.progress import Progress


def _ray_map(fn, urls):
    """sources.write_plan's map_urls on Ray: FN over URLS as tasks, a bounded number in flight, in order."""
    import ray

    task = ray.remote(num_cpus=0.5, max_retries=3, **ray_setup.worker_options())(fn)
    window = max(4, int(ray.cluster_resources().get("CPU", 2)) * 2)
    pending = []
    for url in urls:
        pending.append(task.remote(url))
        if len(pending) >= window:
            yield ray.get(pending.pop(0))
    for ref in pending:
        yield ray.get(ref)


def _clean_partial(folder: Folder, shards: list[str], listing: dict[str, Entry]) -> None:
    """Whatever an earlier attempt left of these incomplete shards (each is redone whole): the names of
    LISTING (the run's one listing of FOLDER) that belong to them (catalogs.writer.partial_files). A fresh
    run deletes nothing, rather than one request per name a shard could have."""
    doomed = partial_files(listing, shards)
    if doomed:
        notice(f"removing {len(doomed)} file(s) left by an earlier attempt at {len(shards)} incomplete shard(s)")
        folder.remove(doomed)


def run(
    src: str,
    out: str | os.PathLike,
    cfg: JobConfig,
    *,
    ray_address: str | None = None,
    command: list[str] | None = None,
    progress_every: float = 5.0,
    stage_factory=None,
    image_column: str | None = None,
    caption_column: str | None = None,
    retry_failures: bool = False,
    catalog_file: str | os.PathLike | None = None,
) -> RunSummary:
    """Run (or resume) the pipeline from SRC into OUT; see the module docstring.

    stage_factory(name, stage_config) -> stage replaces `build_stage` (tests inject slow or failing stages).
    """
    t0 = time.time()
    folder = Folder(out)
    folder.makedirs()
    out = folder.url
    if "://" not in src:
        src = os.path.abspath(src)  # local paths (brace patterns too) are recorded absolute: any worker opens them
    # A bad SRC (or column name) is one clear error before Ray starts (planning lists shards on Ray).
    sources.detect(src, image_column=image_column, caption_column=caption_column)
    joined = ray_setup.connect(ray_address, cfg.pipeline, active_stages(cfg.stages))
    with interrupts():  # after ray.init, whose SIGTERM handler would end the run as a plain exit
        notice("planning: listing the input" if not folder.exists(plan.PLAN_FILE) else "reading the earlier plan")
        counts = plan.make_or_reuse(
            src,
            out,
            cfg.pipeline.shard_size,
            plan.stages_fingerprint(cfg.stages),
            map_urls=_ray_map,
            columns={"image_column": image_column, "caption_column": caption_column},
        )
        listing = folder.listing()  # the run's one listing: what is complete, what to clean up
        done_before = set(complete_shards(folder.url, listing)) & set(counts)
        notice(
            f"{sum(counts.values())} input(s) in {len(counts)} shard(s): {len(done_before)} complete, "
            f"{len(counts) - len(done_before)} to do"
        )
        skipped = plan.skipped_files(out)
        if skipped:  # never silently: files of the input folder that are not images are no input
            notice(f"{src}: skipped {sum(skipped.values())} file(s) that are no images: {describe_skipped(skipped)}")
        manifest = Manifest(out, src, cfg, command or sys.argv, catalog_file, skipped_files=skipped)
        try:
            ray_setup.resolve_gpus(cfg.pipeline, joined, active_stages(cfg.stages))
            todo = [s for s in counts if s not in done_before]
            _clean_partial(folder, todo, listing)
            redo = retry.redo(out, done_before, len(todo), catalog_file) if retry_failures else {}
            if retry_failures:
                manifest.run["retried"] = sum(len(v) for v in redo.values())
            summary = _run_shards(
                folder, cfg, counts, done_before, todo, redo, t0, progress_every, stage_factory, catalog_file
            )
        except BaseException as e:  # an interrupt too: the manifest says `interrupted`, not `running`
            manifest.abort(e)
            raise
        summary.skipped_files = skipped
        manifest.finish(summary)
        return summary


def _run_shards(
    folder: Folder,
    cfg: JobConfig,
    counts: dict[str, int],
    done_before: set[str],
    todo: list[str],
    redo: dict[str, set[str]],
    t0: float,
    progress_every: float,
    factory,
    catalog_file,
) -> RunSummary:
    """The run loop, plain or retrying: the incomplete shards TODO whole, and in the complete shards of REDO
    ({shard: keys}, datagen/retry.py) those samples; then the catalog, and the summary of what was done."""
    shards = retry.merges(folder.url, set(todo), redo) if redo else plan.shard_rows(folder.url, set(todo))
    # planned inputs (a video is one, done when all its frames are written), and the records they give beside them
    planned = sum(len(v) for v in redo.values()) + sum(counts[s] for s in todo)
    prog = Progress(planned, every=progress_every, unit="inputs", rate_unit="inputs/s", records="samples")
    outcome = Outcome()
    if todo or redo:
        dist = Distributor(
            folder.url,
            cfg,
            local_output_node=local_output_node(folder.url),
            progress=prog,
            extra_stats={"run_start": t0},
            factory=factory,
            catalog_file=catalog_file,
        )
        outcome = dist.run(shards)
    prog.update(0, 0, force=True)
    built = catalog.build(folder.url, catalog=catalog_file)
    print(built.summary(), file=sys.stderr)
    listing = folder.listing()
    complete = set(complete_shards(folder.url, listing))
    if complete:
        _write_card(folder, listing, [b.name for b in built.bad] + built.incomplete)
    ok, failed = sum(v[0] for v in outcome.done.values()), sum(v[1] for v in outcome.done.values())
    return RunSummary(
        len(counts),
        sum(counts.values()),
        ok,
        failed,
        time.time() - t0,
        len(done_before) - len(redo),
        [s for s in counts if s not in complete],
        outcome.why,
    )


def _write_card(folder: Folder, listing: dict[str, Entry], exclude: list[str]) -> None:
    """OUT/README.md, with which Hugging Face datasets loads the rows the catalog holds (catalogs/card.py). The
    records are complete without it: a storage failure here is a warning, and the next run writes it again."""
    try:
        card.write_card(folder.url, listing=listing, exclude=exclude)
    except OSError as e:
        print(
            f"[datagen] warning: the dataset card {folder.join(card.CARD_FILE)} was not written: {e}", file=sys.stderr
        )


__all__ = ["run", "KINDS"]
