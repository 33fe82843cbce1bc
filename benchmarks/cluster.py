"""Datagen on a multi-node Ray cluster with stand-in models: this pipeline against the one-writer design.

    .venv/bin/python benchmarks/cluster.py --seconds 60   # the full benchmark (over an hour here: the baseline is slow)
    .venv/bin/python benchmarks/cluster.py --actors 1,2 --seconds 20 --no-second-size   # a quick check

A `ray.cluster_utils.Cluster` on this machine: a head node (the driver's; 2 CPU slots) and 4 worker nodes,
each with 2 CPU slots and 2 units of a custom resource `fake_gpu` standing in for GPUs (the baseline, whose
PoolConfig has no custom resources, asks for the nodes' `num_gpus` instead). The four model stages are
stand-ins (`StandIn`): they fill every field the real stage fills (captions, nouns with CLIP token positions,
boxes, COCO RLE masks) and hold the actor for a fixed time per image, one block at a time, without using
CPU. Everything else is real: JPEG photos of 512-1024 px read and decoded, the real filter, record assembly
(mask quality from the RLEs), the shard writers, and the upload to moto's S3 server in its own process.
This pipeline writes to `s3://`; the baseline (the one-writer design, commit BASELINE_COMMIT, run from
`git archive` of it) can only write to a local folder.

Stand-in costs (COSTS): segment 0.60 s per image (the slowest stage, as SAM ViT-H is), ground 0.45, caption
0.30, nouns 0.06. The ideal rate is then actors / 0.60 images/s: 13.3 images/s at 8 actors per stage. The
measured CPU cost per image of everything but the models (`measure_cpu`, printed first: read, decode,
filter, assembly, writer, upload, and the pickling Ray does between processes) is about 8 ms, so 13.3
images/s need about 0.1 of this machine's two cores, plus Ray's own processes (5 raylets, GCS): the cores are
not the bottleneck at the largest configuration, the stand-ins are.

Measured per run (each run in a fresh process with a fresh cluster): images/s between 20 % and 80 % of the
driver's count of finished samples, against the ideal; the CPU used by every process of the run; peak RSS of
the driver and of each node (raylet and everything under it; PSS too, where shared pages count once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# benchmarks/datagen.py would shadow the package: keep `import datagen` pointing at the package (this tree's,
# or the baseline's through PYTHONPATH)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
BASELINE_COMMIT = "2a59254"  # the last commit with the one-writer design (datagen/pipeline.py, Ray Data)

# ------------------------------------------------------------------------------------------- the cluster

WORKER_NODES = 4  # nodes with "GPUs", besides the head node (the driver's)
GPUS_PER_NODE = 2  # fake_gpu (and, for the baseline, GPU) units per worker node
GPU_SHARE = 0.25  # each stand-in actor's share of one: the four model stages share a GPU (as `default` does)
NODE_CPUS = 2  # logical CPU slots per node (decode and filter tasks, committers); the machine has 2 cores
HEAD_CPUS = 2
OBJECT_STORE = 768 * 2**20  # per node

# Stand-in cost per image, seconds, one batch at a time per actor (see "Stand-in costs" in the docstring).
COSTS = {"caption": 0.30, "nouns": 0.06, "ground": 0.45, "segment": 0.60}
# --ceiling: stand-ins that cost nothing, so that what is measured is the driver; small actors' shares, so that
# 16 actors per stage fit the 8 stand-in GPUs
CEILING_COSTS = dict.fromkeys(COSTS, 0.0)
CEILING_GPU_SHARE = 0.05
CEILING_SIZE = (128, 96)  # small inputs: decode is not the driver's cost

# ------------------------------------------------------------------------------------------- stand-ins

# Captions with their nouns (label, phrase): what the stand-in captioner and noun extractor put on items.
CAPTIONS = [
    (
        "a woman in a space suit holding a flag in front of a rocket",
        [("woman", "woman"), ("suit", "space suit"), ("flag", "flag"), ("rocket", "rocket")],
    ),
    (
        "a cat lying on a wooden table next to a coffee cup",
        [("cat", "cat"), ("table", "wooden table"), ("cup", "coffee cup")],
    ),
    (
        "a cup of coffee on a saucer with a spoon and a plate of cookies",
        [("cup", "cup"), ("coffee", "coffee"), ("saucer", "saucer"), ("spoon", "spoon"), ("plate", "plate")],
    ),
    ("a pile of old coins on a dark cloth", [("pile", "pile"), ("coin", "coins"), ("cloth", "dark cloth")]),
    (
        "a man with a camera standing on a field under a cloudy sky",
        [("man", "man"), ("camera", "camera"), ("field", "field"), ("sky", "sky")],
    ),
    (
        "a rocket on a launch pad next to a tall tower",
        [("rocket", "rocket"), ("pad", "launch pad"), ("tower", "tall tower")],
    ),
    (
        "a brick wall behind a bench and a small tree",
        [("wall", "brick wall"), ("bench", "bench"), ("tree", "small tree")],
    ),
    (
        "a dog and a cat sitting on a sofa near a window",
        [("dog", "dog"), ("cat", "cat"), ("sofa", "sofa"), ("window", "window")],
    ),
]
BOXES = [(0.08, 0.12, 0.55, 0.92), (0.48, 0.18, 0.94, 0.70), (0.28, 0.52, 0.72, 0.96)]  # normalized xyxy


def nouns_table() -> dict[str, list[dict]]:
    """caption -> the `nouns` field the real NounExtractor gives it (spans and open_clip token positions),
    computed once here so that the stand-ins import no tokenizer."""
    from subjectdiff.catalogs.tokens import clip_token_positions

    table = {}
    for caption, nouns in CAPTIONS:
        out = []
        for label, phrase in nouns:
            start = caption.index(phrase)
            span = [start, start + len(phrase)]
            out.append({"label": label, "phrase": phrase, "span": span, "tokens": clip_token_positions(caption, span)})
        table[caption] = out
    return table


class StandIn:
    """A model stage without a model: fills the fields the real stage fills (caption; nouns with label,
    phrase, span, tokens; detections with box, score, noun and ground_prompt; COCO RLE masks and
    mask_scores) and holds the actor for COST seconds per live image, one block at a time (a lock: a Ray
    Data actor may be handed several blocks at once). The filling itself is counted in that time; the
    masks are ellipses in the boxes, encoded once per image size, so the stand-in uses almost no CPU."""

    def __init__(self, name: str, cost: float, table: dict[str, list[dict]]):
        self.name, self.cost, self.table = name, cost, table
        self.lock = threading.Lock()
        self.masks: dict[tuple[int, int], list[dict]] = {}
        self.fill = getattr(self, "_" + name)

    def __call__(self, items: list[dict]) -> list[dict]:
        live = [it for it in items if not it.get("failure")]
        with self.lock:
            t0 = time.perf_counter()
            for it in live:
                self.fill(it)
            rest = self.cost * len(live) - (time.perf_counter() - t0)
            if rest > 0:
                time.sleep(rest)
        return items

    def _caption(self, it: dict) -> None:
        it["caption"] = CAPTIONS[zlib.crc32(it["key"].encode()) % len(CAPTIONS)][0]
        it.setdefault("extra", {})["caption_model"] = "stand-in"

    def _nouns(self, it: dict) -> None:
        it["nouns"] = [dict(n, span=list(n["span"]), tokens=list(n["tokens"])) for n in self.table[it["caption"]]]

    def _ground(self, it: dict) -> None:
        nouns = it["nouns"]
        it["ground_prompt"] = " . ".join(" ".join(n["phrase"].lower().split()) for n in nouns) + " ."
        h = zlib.crc32(it["key"].encode())
        it["detections"] = [
            {"box": list(b), "score": round(0.9 - 0.12 * j - (h % 7) / 100, 4), "noun": j % len(nouns)}
            for j, b in enumerate(BOXES)
        ]

    def _segment(self, it: dict) -> None:
        import numpy as np

        from subjectdiff.catalogs import masks as mask_codec

        h, w = it["image"].shape[:2]
        if (h, w) not in self.masks:
            yy, xx = np.ogrid[:h, :w]
            rles = []
            for x0, y0, x1, y1 in BOXES:
                cx, cy, rx, ry = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h, (x1 - x0) / 2 * w, (y1 - y0) / 2 * h
                rles.append(mask_codec.encode(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0))
            self.masks[(h, w)] = rles
        it["masks"] = [dict(m) for m in self.masks[(h, w)][: len(it["detections"])]]
        it["mask_scores"] = [0.95 - 0.05 * j for j in range(len(it["detections"]))]


def make_factory(costs: dict[str, float], table: dict[str, list[dict]]):
    """stage_factory for both pipelines: stand-ins for the model stages, the real filter."""

    def factory(name, cfg):
        if name == "filter":
            from subjectdiff.datagen.stages.filters import ImageFilter

            return ImageFilter(cfg.filters)
        return StandIn(name, costs[name], table)

    return factory


def stub_models():
    """What tiny_models returns, for checkpoints that are never loaded: preset("tiny") without building (or
    importing) the tiny models; the run manifest records these paths with empty hashes."""
    from types import SimpleNamespace

    p = Path("/nonexistent-stand-in-models")
    return SimpleNamespace(
        blip=p / "blip",
        gdino_config=p / "gdino.py",
        gdino_checkpoint=p / "gdino.pth",
        sam_checkpoint=p / "sam.pth",
        clip_config=None,
    )


# ---------------------------------------------------------------------------------------------- inputs


def photos():
    """Real photographs: scikit-image's (full size) and the bundled samples, as RGB arrays."""
    import numpy as np
    import skimage.data
    from PIL import Image

    out = {}
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "retina",
        "immunohistochemistry",
        "camera",
        "moon",
        "grass",
        "gravel",
        "brick",
        "coins",
    ):
        a = getattr(skimage.data, name)()
        out[name] = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
    for p in sorted((REPO / "datagen" / "sample_images").glob("*.jpg")):
        out.setdefault(p.stem, np.asarray(Image.open(p).convert("RGB")))
    return out


SIZES = [(long, long * 3 // 4) for long in range(512, 1025, 64)]  # (long side, short side): 9 size classes


def make_inputs(d: Path, n: int) -> list[Path]:
    """N distinct JPEGs (quality 90) with the long side in 512-1024 px, landscape and portrait: each a crop
    of a real photo (a different window for every file) resized to one of 18 sizes."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    ims = photos()
    names = sorted(ims)
    out = []
    for i in range(n):
        p = d / f"{i:05d}.jpg"
        out.append(p)
        if p.exists():
            continue
        name = names[i % len(names)]
        a = ims[name]
        h, w = a.shape[:2]
        long, short = SIZES[(i // len(names)) % len(SIZES)]
        portrait = (i // (len(names) * len(SIZES))) % 2 == 1
        tw, th = (short, long) if portrait else (long, short)
        # the largest window of the target aspect, shrunk by up to 12 % and moved, different for every i
        scale = min(w / tw, h / th) * (0.88 + 0.12 * ((i * 7919) % 97) / 96)
        cw, ch = max(1, int(tw * scale)), max(1, int(th * scale))
        x0 = (i * 104729) % max(1, w - cw + 1)
        y0 = (i * 15485863) % max(1, h - ch + 1)
        crop = Image.fromarray(np.ascontiguousarray(a[y0 : y0 + ch, x0 : x0 + cw]))
        crop.resize((tw, th), Image.LANCZOS).save(p, quality=90)
    return out


# -------------------------------------------------------------------------------- CPU cost per image


def measure_cpu(paths: list[Path], table, bucket: str, moto_pid: int, spool: Path) -> dict[str, float]:
    """CPU seconds per image of everything but the models, in this process, with this tree's code:
    read + decode + prefilter (the decode task), the stand-ins' own filling, the real filter, assembly
    (to_record: quality from the RLE masks) and the shard writer (tar members, sidecars), and the upload
    of the shard to the S3 server (this process and the server's CPU), plus one pickle round trip of a
    block (Ray moves each block between processes about six times: decode, 4 stages, filter, writer)."""
    import pickle

    import psutil

    import subjectdiff.datagen.tiny
    from subjectdiff.catalogs.writer import ShardWriter
    from subjectdiff.datagen.committer import _write
    from subjectdiff.datagen.job import preset
    from subjectdiff.datagen.stages.common import decode_item
    from subjectdiff.datagen.stages.filters import ImageFilter, prefilter

    subjectdiff.datagen.tiny.tiny_models = lambda *a, **k: stub_models()
    cfg = preset("tiny")
    stands = {n: StandIn(n, 0.0, table) for n in COSTS}
    filt = ImageFilter(cfg.stages.filters)
    moto = psutil.Process(moto_pid)
    cpu = time.process_time
    t = dict.fromkeys(
        ("decode", "stand-ins", "filter", "assemble+write", "publish", "publish (S3 server)", "pickle round trip"), 0.0
    )
    # warm-up: imports, the mask cache of every size
    warm = [prefilter(decode_item(str(p), p.read_bytes()), cfg.stages.filters) for p in paths[:36]]
    for n in COSTS:
        stands[n](warm)
    n_img = 0
    for rep in range(2):
        w = ShardWriter(f"{bucket}/cpu-measure", f"{rep:05d}", spool=str(spool))
        for b in range(0, len(paths), 8):
            block = paths[b : b + 8]
            c0 = cpu()
            items = [prefilter(decode_item(str(p), p.read_bytes()), cfg.stages.filters) for p in block]
            c1 = cpu()
            for n in ("caption", "nouns", "ground"):
                items = stands[n](items)
            c2 = cpu()
            items = filt(items)
            c3 = cpu()
            items = stands["segment"](items)
            c4 = cpu()
            bufs = []
            data = pickle.dumps(items, protocol=5, buffer_callback=bufs.append)
            items = pickle.loads(data, buffers=[bytes(b.raw()) for b in bufs])
            c5 = cpu()
            for it in items:
                assert _write(w, it, b // 8), it.get("failure")
            c6 = cpu()
            t["decode"] += c1 - c0
            t["stand-ins"] += (c2 - c1) + (c4 - c3)
            t["filter"] += c3 - c2
            t["pickle round trip"] += c5 - c4
            t["assemble+write"] += c6 - c5
            n_img += len(block)
        m0, c0 = sum(moto.cpu_times()[:2]), cpu()
        w.close()
        time.sleep(0.2)
        t["publish"] += cpu() - c0
        t["publish (S3 server)"] += sum(moto.cpu_times()[:2]) - m0
    per = {k: v / n_img for k, v in t.items()}
    per["total (one pickle round trip)"] = sum(per.values())
    per["total with six pickle round trips"] = per["total (one pickle round trip)"] + 5 * per["pickle round trip"]
    per["images"] = n_img
    return per


# ------------------------------------------------------------------------------------------ the driver


class Sampler(threading.Thread):
    """Every `every` s: RSS of this process (the driver) and of each node (its raylet and every process
    under it; the head node also its GCS and other head processes), and CPU seconds of every process of the
    run (driver, nodes, workers, S3 server) and of the whole machine (other people's jobs included)."""

    def __init__(self, cluster, extra_pids: list[int], every: float = 1.0, pss_every: int = 3):
        import psutil

        super().__init__(daemon=True)
        self.psutil, self.every, self.pss_every, self.stop = psutil, every, pss_every, threading.Event()
        self.cost = 0.0  # seconds spent sampling
        self.me = psutil.Process()
        self.nodes = []  # (node id, [root processes])
        for node in cluster.list_all_nodes():
            pids = [pi.process.pid for infos in node.all_processes.values() for pi in infos if pi.process]
            self.nodes.append((node.node_id, [psutil.Process(p) for p in pids]))
        self.extra = [psutil.Process(p) for p in extra_pids]
        self.samples: list[dict] = []
        self.cpu_seen: dict[int, float] = {}  # pid -> last CPU seconds (processes that exit keep their count)

    @staticmethod
    def _tree(procs) -> list:
        out = {}
        for p in procs:
            try:
                out[p.pid] = p
                for c in p.children(recursive=True):
                    out[c.pid] = c
            except Exception:
                pass
        return list(out.values())

    def _rss(self, procs, pss: bool = False) -> int:
        """Summed RSS (shared pages, the object store's included, count once per process that maps them),
        or summed PSS (shared pages split between the processes sharing them: sums are real memory)."""
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss if pss else p.memory_info().rss
            except Exception:
                pass
        return total

    def sample(self) -> dict:
        ps = self.psutil
        per_node, per_node_pss = [], []
        pss = len(self.samples) % self.pss_every == 0
        every = {self.me.pid: self.me, **{p.pid: p for p in self.extra}}
        for _, roots in self.nodes:
            procs = self._tree(roots)
            per_node.append(self._rss(procs))
            per_node_pss.append(self._rss(procs, pss=True) if pss else None)
            every.update({p.pid: p for p in procs})
        for p in self._tree([self.me]):  # anything else the driver started
            every.setdefault(p.pid, p)
        for pid, p in every.items():
            try:
                t = p.cpu_times()
                self.cpu_seen[pid] = t.user + t.system
            except Exception:
                pass
        m = ps.cpu_times()
        return {
            "t": time.monotonic(),
            "driver_rss": self.me.memory_info().rss,
            "node_rss": per_node,
            "node_pss": per_node_pss,
            "cpu": sum(self.cpu_seen.values()),
            "machine_busy": sum(m) - m.idle - getattr(m, "iowait", 0.0),
            "procs": len(every),
        }

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                t = time.perf_counter()
                self.samples.append(self.sample())
                self.cost += time.perf_counter() - t
            except Exception as e:
                print(f"[bench] sampler: {e}", file=sys.stderr)
            self.stop.wait(self.every)


def _at(samples: list[dict], t: float, key: str) -> float:
    """KEY interpolated at time T from the samples."""
    prev = samples[0]
    for s in samples:
        if s["t"] >= t:
            if s is prev or s["t"] == prev["t"]:
                return s[key]
            f = (t - prev["t"]) / (s["t"] - prev["t"])
            return prev[key] + f * (s[key] - prev[key])
        prev = s
    return samples[-1][key]


def crossing(timeline: list[tuple[float, int]], t0: float, count: float) -> float:
    """When the driver's count reached COUNT, on the piecewise-linear curve through (t0, 0) and each of the
    driver's updates (time, samples finished so far): where counts arrive in bursts, the time is spread
    over the wait before the burst instead of counting the burst as instantaneous."""
    pt, pd = t0, 0
    for t, d in timeline:
        if d >= count:
            return pt + (t - pt) * (count - pd) / (d - pd) if d > pd else t
        if d > pd:
            pt, pd = t, d
    raise ValueError(f"the count never reached {count}")


def drive(spec: dict) -> dict:
    """One run in this (fresh) process: start the cluster, run one pipeline over spec's images, measure."""
    import ray
    from ray.cluster_utils import Cluster

    import subjectdiff.datagen.tiny

    subjectdiff.datagen.tiny.tiny_models = lambda *a, **k: stub_models()
    new = spec["pipeline"] == "new"
    if new:
        from subjectdiff.datagen.job import PoolConfig, preset
        from subjectdiff.datagen.run import run
        from subjectdiff.progress import Progress
    else:
        from subjectdiff.datagen.pipeline import PoolConfig, Progress, preset, run

    n = spec["actors"]
    ceiling = spec.get("ceiling", False)
    share = CEILING_GPU_SHARE if ceiling else GPU_SHARE
    cfg = preset("tiny")
    p = cfg.pipeline
    p.shard_size, p.batch_size = spec["shard_size"], spec["batch_size"]
    p.read_num_cpus, p.writer_num_cpus = 1.0, spec["writer_cpus"]
    p.catalog_refresh_s = 30.0  # PipelineConfig's default (tiny's 5 s is for tests)
    for stage in ("caption", "nouns", "ground", "segment"):
        if new:
            p.pools[stage] = PoolConfig(concurrency=n, num_gpus=0.0, num_cpus=0.0, resources={"fake_gpu": share})
        else:  # the old PoolConfig has no custom resources: the nodes' GPUs are the stand-in there
            p.pools[stage] = PoolConfig(concurrency=n, num_gpus=share, num_cpus=0.0)
    for key, value in spec.get("pipeline_overrides", {}).items():
        setattr(p, key, value)
    if new:
        p.spool_dir = spec["spool"]
    for st in (cfg.stages.caption, cfg.stages.ground, cfg.stages.segment):
        st.batch_size = p.batch_size

    t_start = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": HEAD_CPUS, "object_store_memory": OBJECT_STORE, "include_dashboard": False},
    )
    for _ in range(WORKER_NODES):
        cluster.add_node(
            num_cpus=NODE_CPUS,
            num_gpus=GPUS_PER_NODE,
            resources={"fake_gpu": GPUS_PER_NODE},
            object_store_memory=OBJECT_STORE,
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    head = cluster.head_node.node_id
    assert ray.get_runtime_context().get_node_id() == head, "the driver is not on the head node"
    t_cluster = time.monotonic() - t_start

    timeline: list[tuple[float, int]] = []
    cpu_line: list[tuple[int, float]] = []  # (samples done, the driver's CPU seconds) at each count update
    orig = Progress.update

    def update(self, ok, failed, *args, **kwargs):
        orig(self, ok, failed, *args, **kwargs)
        timeline.append((time.monotonic(), self.ok + self.failed))
        if ceiling:
            cpu_line.append((self.ok + self.failed, driver_cpu_s()))

    Progress.update = update
    if ceiling:
        factory = make_factory(spec["costs"], spec["table"])
        result = driver_ceiling(spec, cfg, run, factory, cpu_line, t_cluster)
        cluster.shutdown()
        return result
    sampler = Sampler(cluster, spec["extra_pids"])
    sampler.samples.append(sampler.sample())
    rss_before = sampler.samples[-1]["driver_rss"]
    sampler.start()
    factory = make_factory(spec["costs"], spec["table"])
    t0 = time.monotonic()
    summary = run(spec["src"], spec["out"], cfg, stage_factory=factory, progress_every=30.0)
    t1 = time.monotonic()
    sampler.stop.set()
    sampler.join()
    samples = sampler.samples
    total = spec["images"]
    assert summary.ok + summary.failed == total, summary
    assert not summary.incomplete, summary.incomplete

    ta, tb = crossing(timeline, t0, 0.2 * total), crossing(timeline, t0, 0.8 * total)
    rate = 0.6 * total / (tb - ta)
    cpu = (_at(samples, tb, "cpu") - _at(samples, ta, "cpu")) / (tb - ta)
    busy = (_at(samples, tb, "machine_busy") - _at(samples, ta, "machine_busy")) / (tb - ta)
    mid = [s for s in samples if ta <= s["t"] <= tb]
    nodes = sampler.nodes
    result = {
        **{k: v for k, v in spec.items() if k not in ("table", "extra_pids")},
        "ok": summary.ok,
        "failed": summary.failed,
        "wall_s": t1 - t0,
        "cluster_start_s": t_cluster,
        "first_sample_s": next((t - t0 for t, d in timeline if d > 0), None),
        "window_s": [ta - t0, tb - t0],
        "rate": rate,
        "ideal": n / max(spec["costs"].values()),
        "cpu_cores_run": cpu,
        "cpu_cores_machine": busy,
        "load_avg": os.getloadavg(),
        "driver_rss_before": rss_before,
        "driver_rss_peak": max(s["driver_rss"] for s in samples),
        "driver_rss_end": samples[-1]["driver_rss"],
        "driver_rss_window_peak": max((s["driver_rss"] for s in mid), default=None),
        "node_ids": [nid for nid, _ in nodes],
        "head": head,
        "node_rss_peak": [max(s["node_rss"][i] for s in samples) for i in range(len(nodes))],
        "node_pss_peak": [
            max(s["node_pss"][i] for s in samples if s["node_pss"][i] is not None) for i in range(len(nodes))
        ],
        "procs_peak": max(s["procs"] for s in samples),
        "sampler_s_per_sample": sampler.cost / len(samples),
        "timeline": timeline[:: max(1, len(timeline) // 400)],
    }
    ray.shutdown()
    cluster.shutdown()
    return result


def driver_cpu_s() -> float:
    """CPU seconds (user + system) of this process so far, every thread: Ray's core worker threads included."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def vm_kib(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def driver_ceiling(spec: dict, cfg, run, factory, cpu_line: list, t_cluster: float) -> dict:
    """The driver's own cost (the --ceiling runs): its CPU seconds per image in the steady part of the run
    (between 20 % and 80 % of the samples counted: dispatch and counting, what grows with the images) and over
    the whole run (with the fixed costs: plan, pools, manifest, the catalog build and card at the end), and its
    resident memory before and at the peak. No sampler thread runs in this process: every CPU second counted
    is the driver's. The stand-ins cost nothing."""
    import ray

    rss0 = vm_kib("VmRSS")
    cpu0, t0 = driver_cpu_s(), time.monotonic()
    summary = run(spec["src"], spec["out"], cfg, stage_factory=factory, progress_every=30.0)
    cpu1, t1 = driver_cpu_s(), time.monotonic()
    total = spec["images"]
    assert summary.ok + summary.failed == total and not summary.incomplete, summary
    lo = next((d, c) for d, c in cpu_line if d >= 0.2 * total)
    hi = next((d, c) for d, c in cpu_line if d >= 0.8 * total)
    result = {
        **{k: v for k, v in spec.items() if k not in ("table", "extra_pids")},
        "ok": summary.ok,
        "failed": summary.failed,
        "wall_s": t1 - t0,
        "cluster_start_s": t_cluster,
        "rate": total / (t1 - t0),
        "driver_cpu_s": cpu1 - cpu0,
        "driver_cpu_ms_per_image": 1e3 * (hi[1] - lo[1]) / max(hi[0] - lo[0], 1),
        "driver_cpu_ms_per_image_whole_run": 1e3 * (cpu1 - cpu0) / total,
        "driver_rss_before": rss0 * 1024,
        "driver_rss_peak": vm_kib("VmHWM") * 1024,
        "blocks_in_flight": cfg.pipeline.blocks_in_flight,
        "load_avg": os.getloadavg(),
    }
    ray.shutdown()
    return result


def ceiling_table(results: list[dict]) -> str:
    """One row per --ceiling run."""
    out = [
        "| actors per stage | images | shard | block | blocks in flight | driver CPU, ms per image (20-80 %) "
        "| one core's ceiling, images/s | driver CPU, ms per image, whole run | images/s of the run (2 cores, "
        "everything) | driver RSS GiB: start -> peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = r["driver_cpu_ms_per_image"]
        out.append(
            f"| {r['actors']} | {r['images']} | {r['shard_size']} | {r['batch_size']} "
            f"| {r['blocks_in_flight'] or 'auto'} | {ms:.2f} | {1e3 / ms:,.0f} "
            f"| {r['driver_cpu_ms_per_image_whole_run']:.2f} | {r['rate']:.1f} "
            f"| {gib(r['driver_rss_before'])} -> {gib(r['driver_rss_peak'])} |"
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ the report


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


NAMES = {"new": "this pipeline", "baseline": f"baseline ({BASELINE_COMMIT})"}


def _nodes(r: dict, key: str) -> tuple[str, str]:
    head = next(v for nid, v in zip(r["node_ids"], r[key]) if nid == r["head"])
    return gib(head), " / ".join(gib(v) for nid, v in zip(r["node_ids"], r[key]) if nid != r["head"])


def tables(results: list[dict]) -> str:
    """Throughput (first size of every actor count), memory of every run, driver memory at two sizes."""
    first = {}
    for r in results:
        first.setdefault((r["pipeline"], r["actors"]), r)
    one = {pl: r["rate"] for (pl, a), r in first.items() if a == 1}
    out = [
        "| pipeline | actors per stage | images | images/s (20-80 %) | ideal | % of ideal | vs 1 actor "
        "| CPU of the run, cores (ms per image) | whole machine, cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (pl, a), r in sorted(first.items(), key=lambda kv: (kv[0][1], kv[0][0] != "new")):
        vs = f"{r['rate'] / one[pl]:.2f}x" if pl in one else "-"
        out.append(
            f"| {NAMES[pl]} | {a} | {r['images']} | {r['rate']:.2f} | {r['ideal']:.2f} "
            f"| {100 * r['rate'] / r['ideal']:.0f} % | {vs} "
            f"| {r['cpu_cores_run']:.2f} ({1e3 * r['cpu_cores_run'] / r['rate']:.0f}) "
            f"| {r['cpu_cores_machine']:.2f} |"
        )
    out += [
        "",
        "| pipeline | actors per stage | images | driver RSS GiB: start -> peak | head node peak RSS (PSS) GiB "
        "| worker nodes peak RSS GiB | worker nodes peak PSS GiB | processes | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["actors"], r["pipeline"] != "new", r["images"])):
        h_rss, w_rss = _nodes(r, "node_rss_peak")
        h_pss, w_pss = _nodes(r, "node_pss_peak")
        out.append(
            f"| {NAMES[r['pipeline']]} | {r['actors']} | {r['images']} "
            f"| {gib(r['driver_rss_before'])} -> {gib(r['driver_rss_peak'])} | {h_rss} ({h_pss}) | {w_rss} "
            f"| {w_pss} | {r['procs_peak']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (its in-memory store must not count as the driver's memory)."""
    port = _free_port()
    code = (
        "import logging, time; logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
        "from moto.server import ThreadedMotoServer\n"
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
        "while True: time.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    return proc, endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", default="1,2,4,8", help="stand-in actors per model stage, comma-separated")
    ap.add_argument(
        "--seconds",
        type=float,
        default=75.0,
        help="aimed length of each run at the ideal rate (images = seconds x ideal)",
    )
    ap.add_argument("--min-images", type=int, default=192)
    ap.add_argument("--shard-size", default="64", help="samples per shard (--ceiling: a comma-separated list)")
    ap.add_argument("--batch-size", default="8", help="samples per block (--ceiling: one per --shard-size)")
    ap.add_argument("--writer-cpus", type=float, default=0.25)
    ap.add_argument("--pipelines", default="new,baseline")
    ap.add_argument("--no-second-size", action="store_true", help="skip the driver-memory run at twice the images")
    ap.add_argument("--override", action="append", default=[], help="PipelineConfig KEY=VALUE for the new pipeline")
    ap.add_argument("--json", default="", help="write every result here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="the driver's ceiling: stand-ins that cost nothing, --ceiling-images small images per run, the "
        "driver's CPU ms per image at each --actors (default 1,4,16) and each --shard-size/--batch-size pair",
    )
    ap.add_argument("--ceiling-images", type=int, default=1024)
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "drive":
        spec = json.loads(Path(args.spec).read_text())
        result = drive(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return

    root = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(root / "ray0")  # this process never starts Ray; set for anything it spawns
    os.environ["SUBJECTDIFF_CACHE"] = str(root / "cache")
    moto, endpoint = start_moto(root / "moto.log")
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    try:
        _main(args, root, moto)
    finally:
        moto.send_signal(signal.SIGTERM)
        moto.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def small_inputs(d: Path, n: int) -> list[Path]:
    """N distinct small JPEGs (CEILING_SIZE) cut from real photos: the --ceiling runs' inputs."""
    import numpy as np
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    ims = photos()
    names = sorted(ims)
    w, h = CEILING_SIZE
    out = []
    for i in range(n):
        a = ims[names[i % len(names)]]
        y, x = (i * 7919) % max(1, a.shape[0] - h), (i * 104729) % max(1, a.shape[1] - w)
        p = d / f"{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(a[y : y + h, x : x + w])).save(p, quality=90)
        out.append(p)
    return out


def ceiling_runs(args, root: Path, moto: subprocess.Popen) -> None:
    """The --ceiling benchmark: one run per (actors, shard size, batch size), and at the middle actor count a
    run with twice the images (the driver's memory must not grow with them)."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    actors = [int(a) for a in (args.actors if args.actors != "1,2,4,8" else "1,4,16").split(",")]
    shapes = list(zip(map(int, str(args.shard_size).split(",")), map(int, str(args.batch_size).split(","))))
    n = args.ceiling_images
    runs = [(a, n, sh, b) for sh, b in shapes for a in actors]
    runs.append((actors[len(actors) // 2], 2 * n, *shapes[-1]))
    paths = small_inputs(root / "inputs" / "all", 2 * n)
    table_ = nouns_table()
    results = []
    for i, (a, images, shard, batch) in enumerate(runs):
        src = root / "inputs" / f"n{images}"
        if not src.exists():
            src.mkdir(parents=True)
            for p in paths[:images]:
                os.link(p, src / p.name)
        spec = {
            "pipeline": "new",
            "ceiling": True,
            "actors": a,
            "images": images,
            "src": str(src),
            "costs": CEILING_COSTS,
            "table": table_,
            "shard_size": shard,
            "batch_size": batch,
            "writer_cpus": args.writer_cpus,
            "out": f"s3://bench/ceiling{i}",
            "spool": str(root / "spool"),
            "extra_pids": [moto.pid],
            "result": str(root / f"result{i}.json"),
            "pipeline_overrides": dict(_kv(o) for o in args.override),
        }
        results.append(drive_in_child(spec, root, i, f"ceiling: {a} actors, {images} images, shard {shard}"))
        r = results[-1]
        print(f"[bench]   driver {r['driver_cpu_ms_per_image']:.2f} ms CPU per image", file=sys.stderr, flush=True)
    import ray

    print(
        f"# the driver's ceiling: datagen with stand-ins that cost nothing on a {WORKER_NODES + 1}-node Ray cluster "
        f"({platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"ray {ray.__version__}; {CEILING_SIZE[0]}x{CEILING_SIZE[1]} JPEGs, to s3:// on moto)\n"
    )
    print(ceiling_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling": results}, indent=1))


def drive_in_child(spec: dict, root: Path, i: int, what: str, pythonpath: str | None = None) -> dict:
    """Run `drive(spec)` in a fresh process (a fresh cluster; PYTHONPATH: another tree's code, the baseline's)
    and return its result."""
    spec_path = root / f"spec{i}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, RAY_TMPDIR=str(root / f"r{i}"))
    env.pop("RAY_ADDRESS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    print(f"[bench] run {i + 1}: {what}", file=sys.stderr, flush=True)
    with (root / f"run{i}.log").open("w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--role", "drive", "--spec", str(spec_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(root),
        )
    if proc.returncode != 0:
        print((root / f"run{i}.log").read_text()[-6000:], file=sys.stderr)
        raise SystemExit(f"run {i} failed ({proc.returncode})")
    return json.loads(Path(spec["result"]).read_text())


def _main(args, root: Path, moto: subprocess.Popen) -> None:
    if args.ceiling:
        return ceiling_runs(args, root, moto)
    import fsspec

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    fs = fsspec.filesystem("s3")
    fs.mkdir("bench")
    base = root / "baseline"
    base.mkdir()
    subprocess.run(f"git archive {BASELINE_COMMIT} | tar -x -C {base}", shell=True, cwd=REPO, check=True)

    actors = [int(a) for a in args.actors.split(",")]
    pipelines = args.pipelines.split(",")
    cap = max(COSTS.values())
    args.shard_size, args.batch_size = int(args.shard_size), int(args.batch_size)
    sizes = {a: max(args.min_images, int(args.seconds * a / cap) // args.shard_size * args.shard_size) for a in actors}
    runs = [(a, sizes[a], pl) for a in actors for pl in pipelines]
    if not args.no_second_size:
        runs += [(max(actors), 2 * sizes[max(actors)], pl) for pl in pipelines]
    biggest = max(n for _, n, _ in runs)
    t = time.monotonic()
    paths = make_inputs(root / "inputs" / "all", biggest)
    print(
        f"[bench] {biggest} input photos in {time.monotonic() - t:.0f} s "
        f"({sum(p.stat().st_size for p in paths) / len(paths) / 1e3:.0f} kB each on average)",
        file=sys.stderr,
    )
    table_ = nouns_table()

    cpu = measure_cpu(paths[:96], table_, "s3://bench", moto.pid, root / "spool-measure")
    print(
        "[bench] CPU s per image, in one process: "
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in cpu.items() if k != "images"),
        file=sys.stderr,
    )

    results = []
    for i, (a, n, pl) in enumerate(runs):
        src = root / "inputs" / f"n{n}"
        if not src.exists():
            src.mkdir(parents=True)
            for p in paths[:n]:
                os.link(p, src / p.name)
        spec = {
            "pipeline": pl,
            "actors": a,
            "images": n,
            "src": str(src),
            "costs": COSTS,
            "table": table_,
            "shard_size": args.shard_size,
            "batch_size": args.batch_size,
            "writer_cpus": args.writer_cpus,
            "out": f"s3://bench/run{i}-{pl}-{a}-{n}" if pl == "new" else str(root / "out" / f"run{i}-{pl}-{a}-{n}"),
            "spool": str(root / "spool"),
            "extra_pids": [moto.pid],
            "result": str(root / f"result{i}.json"),
            "pipeline_overrides": dict(_kv(o) for o in args.override) if pl == "new" else {},
        }
        t = time.monotonic()
        what = f"{pl}, {a} actors per stage, {n} images (of {len(runs)} runs)"
        r = drive_in_child(spec, root, i, what, str(base) if pl == "baseline" else None)
        results.append(r)
        print(
            f"[bench]   {r['rate']:.2f} images/s (ideal {r['ideal']:.2f}), run CPU {r['cpu_cores_run']:.2f} cores, "
            f"machine {r['cpu_cores_machine']:.2f}, driver RSS {gib(r['driver_rss_before'])} -> "
            f"{gib(r['driver_rss_peak'])} GiB, {time.monotonic() - t:.0f} s with start-up",
            file=sys.stderr,
            flush=True,
        )

    import ray

    print(
        f"# datagen on a {WORKER_NODES + 1}-node Ray cluster, stand-in models ({platform.machine()}, "
        f"{os.cpu_count()} cores, {started}; ray {ray.__version__})\n"
    )
    print(
        "Stand-in cost per image (s): "
        + ", ".join(f"{k} {v}" for k, v in COSTS.items())
        + f"; actors take {GPU_SHARE} of a stand-in GPU; {WORKER_NODES} worker nodes x {GPUS_PER_NODE} GPUs, "
        f"{NODE_CPUS} CPU slots each; head {HEAD_CPUS} CPU slots; batch {args.batch_size}, shard {args.shard_size}\n"
    )
    print(
        "CPU per image outside the models (one process, ms): "
        + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in cpu.items() if k != "images")
        + "\n"
    )
    print(tables(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "results": results, "costs": COSTS}, indent=1))


def _kv(text: str):
    k, v = text.split("=", 1)
    return k, json.loads(v)


if __name__ == "__main__":
    main()
