"""The visual report of a shard folder: one self-contained HTML page to judge a dataset by looking at it.

    build_report("out/", "report.html", where="n_objects >= 2", sample=24, seed=0)
    subjectdiff catalog report out/ --where "n_objects >= 2" --sample 24 --out report.html

The page shows
    records        a grid of sampled records: the image with each object's mask tinted and its box drawn in
                   the object's own color, tagged with its noun and detection score; the caption underneath
                   with each grounded phrase (its span) highlighted in the same color (records.py);
    distributions  label frequency, detection score, mask score and box area histograms, objects per image
                   (distributions.py);
    curation       CLIP, aesthetic and label score histograms, the largest duplicate groups as thumbnails, the
                   objects with the lowest label score (curation.py);
    pairs          the catalog's cross-image pairs by method, and a seeded sample of them: the reference and
                   the target object side by side, each with its mask and box (pairs.py);
    run            throughput over the run (samples per minute, from the shards' start and end times);
    failures       counts by stage and by (stage, reason), with example keys and sources;
    manifest       DIR/manifest.json of the datagen run (model ids, thresholds, versions), rendered as is
                   (these three: run.py).
`where` (a SQL predicate over `samples`, as in `catalog select`) narrows the records and distributions;
the run, failures and manifest sections always describe the whole catalog.

The parts: page.py assembles the page (build_report); sql.py holds the queries every section shares;
charts.py draws the SVG plots; thumbnails.py reads the shown records from their tars; draw.py holds the one
palette and the one overlay of masks and boxes, which `train preview` and `infer generate --boxes` use too.

Scale: everything but the sampled records is aggregated in DuckDB. The sample is the N selected keys with
the smallest hash(key, seed): a top-N in one scan, deterministic, and stable as shards are added (a key
shown stays shown unless a smaller hash arrives). Only those records are read, by walking the tar headers
of the shards that hold them (seeking over member data) and reading just their members.

Self-contained: images are base64 JPEG data URIs, plots inline SVG, no script at all; a
Content-Security-Policy forbids loading anything else, so user text (captions, sources, reasons) is
escaped and, even if escaping failed, could not load or run anything.
"""

from subjectdiff.catalogs.report.page import DEFAULT_SAMPLE, build_report

__all__ = ["DEFAULT_SAMPLE", "build_report"]
