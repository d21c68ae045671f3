"""`StoreWriter`: appends one process's records to a store, crash-safe and resumable.

Crash safety (a killed run loses at most its open chunk and never shows a half file):
records of the open chunk stream into a hidden `.shard-....tmp` file; when `chunk_size`
records are in (or at `close()`), the file is fsynced and renamed to its final name, and
only then are the chunk's index lines appended (one write + fsync). The index is the
source of truth for readers. When a writer opens, it repairs its own process's files:
stale temporaries are deleted, a torn or corrupt index line is dropped, and records of a
renamed chunk whose index lines never made it to disk are re-indexed from the chunk file
(each one validated). `done_ids()` lists every id in the store (all processes), so a
resumed run -- with the same or another process count -- writes each id once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import logging

from halo_jax.data.stores.files import (
    CHUNK_RE, INDEX_RE, SCHEMA_FILE, WRITER_OPTIONS, chunk_name, index_line, index_name, open_chunk_reader, read_index,
    read_schema,
)
from halo_jax.data.stores.records import decode_record, encode_record
from halo_jax.data.stores.schema import Schema, StoreError
from halo_jax.io import atomic_write_bytes, commit


class StoreWriter:
    """Appends records to `store_dir` as process `process_index`; see the module docstring.

    with StoreWriter(dir, schema, process_index=jax.process_index(), chunk_size=64) as w:
        for item in my_items:
            if item.id not in w.done_ids(): w.write(make_record(item))
    """

    def __init__(self, store_dir: str | os.PathLike, schema: Schema, process_index: int | None = None,
                 chunk_size: int = 64):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dir = Path(store_dir)
        self.schema = schema
        self.process_index = int(process_index)
        self.chunk_size = int(chunk_size)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_schema_file()
        for stale in self.dir.glob(f".shard-p{self.process_index:05d}-*"):
            logging.warning("store %s: removing %s left by a killed writer", self.dir, stale.name)
            stale.unlink(missing_ok=True)
        own_ids, self._next_chunk = self._repair_own()
        self._done: set[str] = set(own_ids)
        for path in sorted(self.dir.glob("index-p*.jsonl")):
            m = INDEX_RE.match(path.name)
            if m and int(m.group(1)) != self.process_index:
                self._done.update(e["id"] for _, e in read_index(path)[0])
        self._writer = None
        self._tmp: Path | None = None
        self._pending: list[dict] = []
        self._pending_ids: set[str] = set()

    # -- opening
    def _check_schema_file(self) -> None:
        path = self.dir / SCHEMA_FILE
        if path.is_file():
            existing = read_schema(self.dir)
            if existing != self.schema:
                raise StoreError(f"{self.dir} holds a store {existing.name!r} with schema {existing.to_json()['fields']}"
                                 f", not the schema given ({self.schema.to_json()['fields']}); write to a new folder "
                                 "or delete the old store")
        elif self.process_index == 0:
            atomic_write_bytes(path, (json.dumps(self.schema.to_json(), indent=1) + "\n").encode(), durable=True)

    def _repair_own(self) -> tuple[list[str], int]:
        """Make this process's index exactly describe its chunk files; returns (ids, next chunk number)."""
        index_path = self.dir / index_name(self.process_index)
        good, bad, torn = read_index(index_path) if index_path.exists() else ([], [], False)
        notes = [f"line {n}: {why}; dropped" for n, why in bad] + (["torn last line; dropped"] if torn else [])
        chunks = {}
        for path in self.dir.glob(f"shard-p{self.process_index:05d}-c*.array_record"):
            m = CHUNK_RE.match(path.name)
            if m:
                chunks[path.name] = int(m.group(2))
        counts: dict[str, int] = {}
        for name in chunks:
            try:
                reader = open_chunk_reader(self.dir / name)
                counts[name] = reader.num_records()
                reader.close()
            except Exception as e:  # noqa: BLE001 -- any failure to open means an unusable file
                notes.append(f"{name}: unreadable chunk file ({e}); its records will be written again")
                counts[name] = 0
        entries: list[dict] = []
        seen_pos: set[tuple[str, int]] = set()
        seen_ids: set[str] = set()
        for n, e in good:
            key = (e["file"], e["position"])
            if e["file"] not in chunks or e["position"] >= counts.get(e["file"], 0):
                notes.append(f"line {n}: id {e['id']!r} points at {e['file']}:{e['position']}, which does not exist; "
                             "dropped")
            elif key in seen_pos or e["id"] in seen_ids:
                notes.append(f"line {n}: id {e['id']!r} at {e['file']}:{e['position']} is indexed twice; dropped")
            else:
                entries.append(e)
                seen_pos.add(key)
                seen_ids.add(e["id"])
        for name in sorted(chunks):  # records of renamed chunks whose index lines never reached the disk
            missing = [p for p in range(counts[name]) if (name, p) not in seen_pos]
            if not missing:
                continue
            reader = open_chunk_reader(self.dir / name)
            try:
                for p in missing:
                    try:
                        rec = decode_record(reader.read([p])[0], self.schema)
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"{name}:{p}: unindexed record is corrupt ({e}); left out, it will be written "
                                     "again")
                        continue
                    rid = rec[self.schema.id_field]
                    if rid in seen_ids:
                        notes.append(f"{name}:{p}: unindexed record {rid!r} duplicates an indexed one; left out")
                        continue
                    entries.append(self._entry(rec, name, p, None))
                    seen_pos.add((name, p))
                    seen_ids.add(rid)
                    notes.append(f"{name}:{p}: record {rid!r} was not indexed (killed after the chunk was renamed); "
                                 "re-indexed")
            finally:
                reader.close()
        if notes:
            for note in notes:
                logging.warning("store %s, %s: %s", self.dir, index_path.name, note)
            atomic_write_bytes(index_path, b"".join(index_line(e) for e in entries), durable=True)
        next_chunk = max(chunks.values(), default=-1) + 1
        return [e["id"] for e in entries], next_chunk

    def _entry(self, rec: Mapping, file: str, position: int, extra: Mapping | None) -> dict:
        e = {"id": rec[self.schema.id_field], "file": file, "position": position,
             "fields": {f.name: rec[f.name] for f in self.schema.small_fields}}
        if extra:
            e["extra"] = dict(extra)
        return e

    # -- writing
    def done_ids(self) -> set[str]:
        """Ids already in the store (any process's committed chunks, and this writer's open chunk)."""
        return self._done | self._pending_ids

    def write(self, record: Mapping[str, Any], *, index_extra: Mapping[str, Any] | None = None) -> None:
        """Add one record (validated against the schema); `index_extra` is JSON kept only in the index line."""
        rec = self.schema.validate(record)
        rid = rec[self.schema.id_field]
        if rid in self._done or rid in self._pending_ids:
            raise StoreError(f"store {self.dir}: id {rid!r} is already stored; skip the ids in done_ids()")
        if index_extra is not None:
            json.dumps(index_extra, allow_nan=False)  # fail now, not at the commit
        payload = encode_record(rec, self.schema)
        if self._writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter

            self._tmp = self.dir / f".{chunk_name(self.process_index, self._next_chunk)}.tmp"
            self._writer = ArrayRecordWriter(str(self._tmp), WRITER_OPTIONS)
        self._writer.write(payload)
        self._pending.append(self._entry(rec, chunk_name(self.process_index, self._next_chunk),
                                         len(self._pending), index_extra))
        self._pending_ids.add(rid)
        if len(self._pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Commit the open chunk now: close, fsync, rename into place, then append its index lines."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self.dir / chunk_name(self.process_index, self._next_chunk)
        commit(self._tmp, final, durable=True)
        lines = b"".join(index_line(e) for e in self._pending)
        fd = os.open(self.dir / index_name(self.process_index), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._done |= self._pending_ids
        self._pending, self._pending_ids, self._tmp = [], set(), None
        self._next_chunk += 1

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
