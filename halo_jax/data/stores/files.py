"""The files of a store folder: names, index lines, the schema file, chunk readers.

    store.json                                        the schema (`SCHEMA_FILE`)
    shard-p{process:05d}-c{chunk:05d}.array_record    one ArrayRecord file per finished chunk
    index-p{process:05d}.jsonl                        one JSON line per stored record:
                                                      {"id", "file", "position", "fields"[, "extra"]}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from halo_jax.data.stores.schema import Schema, StoreError

SCHEMA_FILE = "store.json"
# group_size:1 puts every record in its own chunk: random access reads one record, and
# a damaged record does not take its neighbours with it.
WRITER_OPTIONS = "group_size:1,zstd:1"
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
CHUNK_RE = re.compile(r"^shard-p(\d{5})-c(\d{5})\.array_record$")
INDEX_RE = re.compile(r"^index-p(\d{5})\.jsonl$")


def chunk_name(process_index: int, chunk: int) -> str:
    return f"shard-p{process_index:05d}-c{chunk:05d}.array_record"


def index_name(process_index: int) -> str:
    return f"index-p{process_index:05d}.jsonl"


def index_line(entry: Mapping) -> bytes:
    return json.dumps(entry, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_index_line(raw: bytes) -> tuple[dict | None, str]:
    try:
        e = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return None, f"not JSON ({err.__class__.__name__})"
    if (not isinstance(e, dict) or not isinstance(e.get("id"), str) or not isinstance(e.get("file"), str)
            or not CHUNK_RE.match(e["file"]) or not isinstance(e.get("position"), int) or e["position"] < 0
            or not isinstance(e.get("fields"), dict)):
        return None, "not an index entry (id, file, position, fields)"
    return e, ""


def read_index(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]], bool]:
    """(valid (line number, entry)s, bad (line number, reason)s, torn tail?) of one index file."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()
    good, bad = [], []
    for number, raw in enumerate(lines, start=1):
        e, why = parse_index_line(raw)
        (good.append((number, e)) if e is not None else bad.append((number, why)))
    return good, bad, bool(tail)


def read_schema(store_dir: str | os.PathLike) -> Schema:
    path = Path(store_dir) / SCHEMA_FILE
    if not path.is_file():
        raise StoreError(f"no {SCHEMA_FILE} in {store_dir}: not a store, or its process-0 writer never opened; "
                         "run the stage that writes it")
    try:
        return Schema.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is not a valid store schema ({e}); delete the store and re-run its stage") from None


def open_chunk_reader(path: Path):
    from array_record.python.array_record_module import ArrayRecordReader

    return ArrayRecordReader(str(path), READER_OPTIONS)
