"""The retrieval reduce's reads (issue #21): what every reduce task pays to find its bucket in every map file, for
the bucket layout of `catalogs.pairs` as it is (labels packed into about REDUCE_TASKS buckets) against a bucket per
faiss label (before), over map files of a real run.

    python benchmarks/pairs_reads.py MAP_DIR --maps 358 [--old-buckets 1000] [--sample 100]

MAP_DIR holds some map files a `catalog pairs` run wrote (map-GGGGGG.parquet, copied from OUT.parts/ while it ran:
the run deletes them after the reduce); --maps is how many that run had. Each file is read as it is (its buckets:
today's layout) and rewritten with a bucket per label, its rows in label order (the layout before, where each
label of more than brute_force_max objects was a bucket alone). For each layout, `_bucket_rows` (the reduce's read:
open the map, its footer, the row groups of the bucket) runs for every bucket of each file (--sample buckets
spread over the range when there are more); the figure is the mean CPU time of one (bucket, map) read, and the
reduce's total for the run, mean x buckets x --maps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from subjectdiff.catalogs.pairs import _bucket_rows, _label_codes
from subjectdiff.catalogs.storage import Folder


def per_label(src: Path, dest: Path) -> int:
    """SRC's rows rewritten with bucket = the label's number (label0042 -> 42) in label then row order, a row group a
    label, into DEST. Returns the buckets."""
    t = pq.read_table(src)
    names, code = _label_codes(t["label"])
    bucket = np.asarray([int(x.removeprefix("label")) for x in names], np.int32)[code]
    order = np.lexsort((t["row"].to_numpy(), bucket))
    t = t.take(pa.array(order)).set_column(0, "bucket", pa.array(bucket[order]))
    ends = [0, *(np.flatnonzero(np.diff(bucket[order])) + 1), len(order)]
    with pq.ParquetWriter(dest, t.schema) as w:
        for s, e in zip(ends, ends[1:]):
            w.write_table(t.slice(s, e - s))
    return len(ends) - 1


def buckets_of(path: Path) -> list[int]:
    md = pq.read_metadata(path)
    return sorted({md.row_group(i).column(0).statistics.min for i in range(md.num_row_groups)})


def mean_read(folder: Path, maps: list[str], sample: int) -> tuple[float, int, int]:
    """(mean CPU seconds of one (bucket, map) read, the buckets, the reads timed)."""
    buckets = sorted(set().union(*(buckets_of(folder / m) for m in maps)))
    picked = [buckets[i] for i in np.linspace(0, len(buckets) - 1, min(sample, len(buckets))).astype(int)]
    reads, t0 = 0, time.process_time()
    for b in picked:
        for m in maps:
            _bucket_rows(Folder(str(folder)), [m], b)
            reads += 1
    return (time.process_time() - t0) / reads, len(buckets), reads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("maps_dir", type=Path)
    p.add_argument("--maps", type=int, required=True, help="how many map files the run had")
    p.add_argument("--sample", type=int, default=100, help="buckets timed per layout")
    a = p.parse_args()
    maps = sorted(x.name for x in a.maps_dir.glob("map-*.parquet"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in maps:
            per_label(a.maps_dir / m, Path(tmp) / m)
        for name, folder in (("labels packed into buckets (today)", a.maps_dir), ("a bucket per label (before)", tmp)):
            mean, buckets, reads = mean_read(Path(folder), maps, a.sample)
            rows.append((name, buckets, mean, reads, mean * buckets * a.maps))
    print(f"| layout | buckets | CPU ms per (bucket, map) read | reads timed | the reduce's reads at {a.maps} maps |")
    print("|---|---|---|---|---|")
    for name, buckets, mean, reads, total in rows:
        print(f"| {name} | {buckets} | {mean * 1e3:.2f} | {reads} | {total:.0f} CPU s |")
    print(f"\n{len(maps)} map files of {a.maps_dir}; {os.cpu_count()} cores ({platform.machine()}), load "
          f"{os.getloadavg()[0]:.1f}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")  # fmt: skip


if __name__ == "__main__":
    main()
