"""`StoreReader`: random access to every record of a store, merged over processes, ordered by id.

It merges every process's index, orders records by id (the order does not depend on how
many processes wrote the store or where runs were resumed) and gives random access. Each
record is validated when read (the CRC, the header, the schema, the id against the index);
a corrupt record, a broken index line, a missing chunk file or a duplicated id is reported
with its index, file and position, then skipped (counted in `problems`; `__getitem__`
returns None, which the grain pipeline drops) or raised as `CorruptRecordError`, as
`on_corrupt="skip"|"fail"` says. Nothing is silently changed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from absl import logging

from halo_jax.data.stores.files import INDEX_RE, open_chunk_reader, read_index, read_schema
from halo_jax.data.stores.records import decode_record
from halo_jax.data.stores.schema import CorruptRecordError

ON_CORRUPT = ("skip", "fail")


class StoreReader:
    """Random access to every record of a store, merged over processes and ordered by id.

    `len(r)`, `r[i]` (a dict, or None for a skipped corrupt record), `r.ids()`,
    `r.fields(i)` (the small fields from the index, no chunk read), `r.entry(i)`,
    `r.get(id)`. `problems` lists every reported issue; `verify()` reads every record.
    With `verify=True` the constructor verifies and corrupt records are left out of the
    order (so `len` counts only good ones).
    """

    def __init__(self, store_dir: str | os.PathLike, *, on_corrupt: str = "fail", verify: bool = False):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.dir = Path(store_dir)
        self.on_corrupt = on_corrupt
        self.schema = read_schema(self.dir)
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._readers: dict[str, Any] = {}
        entries: dict[str, dict] = {}
        for path in sorted(self.dir.glob("index-p*.jsonl")):
            if not INDEX_RE.match(path.name):
                continue
            good, bad, torn = read_index(path)
            if torn:  # possibly a writer appending right now: not a record yet
                logging.warning("store %s: %s has a partial last line (a writer is appending, or was killed); "
                                "ignored", self.dir, path.name)
            if bad and not torn and bad[-1][0] == len(good) + len(bad):
                logging.warning("store %s: %s: last line %d is unreadable (a torn append); ignored", self.dir,
                                path.name, bad[-1][0])
                bad = bad[:-1]
            for n, why in bad:
                self._report(f"{path.name}:{n}: corrupt index line ({why})")
            for n, e in good:
                if e["id"] in entries:
                    first = entries[e["id"]]
                    self._report(f"{path.name}:{n}: id {e['id']!r} at {e['file']}:{e['position']} duplicates the "
                                 f"record at {first['file']}:{first['position']}")
                    continue
                if not (self.dir / e["file"]).is_file():
                    self._report(f"{path.name}:{n}: record {e['id']!r} is in {e['file']}, which is missing")
                    continue
                entries[e["id"]] = e
        self._ids = sorted(entries)
        self._entries = [entries[i] for i in self._ids]
        self._pos = {rid: i for i, rid in enumerate(self._ids)}
        if verify:
            bad_ids = set(self.verify())
            if bad_ids:
                self._ids = [i for i in self._ids if i not in bad_ids]
                self._entries = [entries[i] for i in self._ids]
                self._pos = {rid: i for i, rid in enumerate(self._ids)}

    def _report(self, message: str) -> None:
        if self.on_corrupt == "fail":
            raise CorruptRecordError(f"store {self.dir}: {message}; fix or delete the damaged file, or read the "
                                     "store with on_corrupt='skip' to leave such records out")
        self.problems.append(message)
        logging.warning("store %s: %s; skipped (%d skipped so far)", self.dir, message, len(self.problems))

    # -- index-only access
    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> list[str]:
        return list(self._ids)

    def index_of(self, record_id: str) -> int:
        try:
            return self._pos[record_id]
        except KeyError:
            raise KeyError(f"no record {record_id!r} in store {self.dir}") from None

    def entry(self, index: int) -> dict:
        """The index line of record `index`: id, file, position, fields (and extra, if written)."""
        return self._entries[index]

    def fields(self, index: int) -> dict:
        """The small fields of record `index` (prompt, seed, ...) from the index, without reading data."""
        return dict(self._entries[index]["fields"])

    # -- data access
    def _reader(self, file: str):
        reader = self._readers.get(file)
        if reader is None:
            with self._lock:
                reader = self._readers.get(file)
                if reader is None:
                    reader = self._readers[file] = open_chunk_reader(self.dir / file)
        return reader

    def _read(self, index: int) -> dict:
        """Record `index`, validated; raises CorruptRecordError (without reporting) when it is bad."""
        e = self._entries[index]
        try:
            reader = self._reader(e["file"])
            if e["position"] >= reader.num_records():
                raise CorruptRecordError(f"position beyond the file's {reader.num_records()} records")
            data = reader.read([e["position"]])[0]
        except CorruptRecordError:
            raise
        except Exception as err:  # noqa: BLE001 -- ArrayRecord/Riegeli raise plain errors on damaged files
            raise CorruptRecordError(f"unreadable ({err.__class__.__name__}: {str(err)[:200]})") from None
        rec = decode_record(data, self.schema)
        if rec[self.schema.id_field] != e["id"]:
            raise CorruptRecordError(f"holds id {rec[self.schema.id_field]!r}, the index says {e['id']!r}")
        return rec

    def _where(self, index: int) -> str:
        e = self._entries[index]
        return f"record {index} (id {e['id']!r}, {e['file']} position {e['position']})"

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for store {self.dir} with {len(self)} records")
        try:
            return self._read(index)
        except CorruptRecordError as err:
            self._report(f"{self._where(index)}: {err}")
            return None

    def get(self, record_id: str) -> dict | None:
        return self[self.index_of(record_id)]

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            rec = self[i]
            if rec is not None:
                yield rec

    def verify(self) -> list[str]:
        """Read and validate every record; reports each bad one (per on_corrupt); returns their ids."""
        bad = []
        for i in range(len(self)):
            try:
                self._read(i)
            except CorruptRecordError as err:
                self._report(f"{self._where(i)}: {err}")
                bad.append(self._ids[i])
        return bad

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def __getstate__(self) -> dict:  # picklable for grain worker processes: readers reopen lazily
        state = self.__dict__.copy()
        state["_readers"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
