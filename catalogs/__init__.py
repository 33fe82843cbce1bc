"""The data contract of subjectdiff: record schema, shard writer and reader, DuckDB catalog.

datagen writes through it; train and infer read through it. Nothing here imports models or Ray.
Import what you use from its modules (`subjectdiff.catalogs.schema`, `.writer`, `.reader`, `.catalog`, ...):
this file imports none of them, so importing one never runs the others (and none imports back through here).
"""
