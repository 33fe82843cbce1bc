"""The data contract of subjectdiff: record schema, shard writer and reader, DuckDB catalog.

datagen writes through it; train and infer read through it. Nothing here imports models or Ray.
"""

from subjectdiff.catalogs.schema import SCHEMA_VERSION, Failure, ObjectAnn, Record, RecordError, make_key

__all__ = ["SCHEMA_VERSION", "Failure", "ObjectAnn", "Record", "RecordError", "make_key"]
