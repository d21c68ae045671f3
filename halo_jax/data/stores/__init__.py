"""Record stores: ArrayRecord chunk files + a JSONL index per process + a schema, crash-safe.

Every pipeline stage writes its results (rollouts, scores, pairs) as a store: a folder

    store.json                              schema (name, id field, fields); written by process 0
    shard-p{process:05d}-c{chunk:05d}.array_record   one ArrayRecord file per finished chunk
    index-p{process:05d}.jsonl              one line per stored record, this process's chunks only

A record is a dict: array fields (numeric numpy arrays of a declared dtype and shape; a
`None` dimension takes any size) and small fields (str, int, float, bool, or any strict
JSON value). No pickle: a store is safe to read from any source.

One module per concept; everything is importable from here:

    schema.py    `Field`, `Schema` (what a record holds, validation), the errors
    records.py   one record <-> its `HALOREC1` bytes (`encode_record`, `decode_record`)
    files.py     the folder layout: file names, index lines, `read_schema` (atomic writes: halo_jax.io)
    writer.py    `StoreWriter`: crash-safe appends, repair on open, `done_ids()` for resuming
    reader.py    `StoreReader`: every process's records merged, ordered by id, validated on read
    rollouts.py  `RolloutRecord` and `write_rollout` (the generate stage's records + mp4 previews)
"""

from halo_jax.data.stores.files import READER_OPTIONS, SCHEMA_FILE, WRITER_OPTIONS, chunk_name, index_name, read_schema
from halo_jax.data.stores.reader import ON_CORRUPT, StoreReader
from halo_jax.data.stores.records import MAGIC, decode_record, encode_record
from halo_jax.data.stores.rollouts import RolloutRecord, write_rollout
from halo_jax.data.stores.schema import (
    SCALAR_KINDS, STORE_FORMAT, CorruptRecordError, Field, Schema, StoreError,
)
from halo_jax.data.stores.writer import StoreWriter
from halo_jax.io import fsync_dir

__all__ = [
    "MAGIC", "ON_CORRUPT", "READER_OPTIONS", "SCALAR_KINDS", "SCHEMA_FILE", "STORE_FORMAT", "WRITER_OPTIONS",
    "CorruptRecordError", "Field", "RolloutRecord", "Schema", "StoreError", "StoreReader", "StoreWriter",
    "chunk_name", "decode_record", "encode_record", "fsync_dir", "index_name", "read_schema", "write_rollout",
]
