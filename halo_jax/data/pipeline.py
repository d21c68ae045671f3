"""Grain pipelines over any random-access source (the project's stores, rendered datasets).

    records = source[process_index::process_count]        # process p: records p, p+P, p+2P, ...
    records = shuffle(records, seed)                       # a fresh deterministic order each epoch
    records = repeat(records, num_epochs)                  # None: forever
    records = drop None (corrupt records a skipping StoreReader left out), then transform
    batches = batch(records, batch_size, drop_remainder)   # np.stack of each field

built with `grain.MapDataset` (index arithmetic only: nothing is read until asked) and
turned into an iterator whose `get_state()` is a small JSON dict; `set_state()` on a
freshly built iterator with the same arguments resumes it: it yields exactly the
batches the uninterrupted iterator would have. The training loop stores that state in
its checkpoints. The state also describes the pipeline (source size and id hash, seed,
batch size, shuffle, epochs, process count, ...): `set_state` refuses a state from a
different pipeline instead of silently yielding other batches. The process index is not
part of it: processes stepping in lockstep have the same state (unless one of them
skipped corrupt records), so the one copy a multi-host checkpoint keeps (process 0's)
restores every process.

`batch_size` is this process's share of the global batch. With `equal_shares=True` the
source is cut to a multiple of `process_count` first, so every process has the same
number of records (and of batches): multi-host loops that iterate a finite number of
epochs then never wait on a process that ran out. Records are batched across epoch
boundaries (repeat comes before batch), so only the very end can be short.

Global batches that do not depend on the process count (training): `make_global_iterator`
(over `GlobalBatchShare`) shuffles and repeats the *whole* source with one seed, cuts it into
global batches of `global_batch` records, and gives this process its rows of each (the rows its
devices hold in the batch sharding, `parallel.distributed.process_local_rows`). One process x 8
devices and two processes x 4 devices then train on the same global batches, and each process
reads only its own records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import logging


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def stack_records(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """One batch: `np.stack` of each field (strings become a numpy unicode array, JSON values an object array)."""
    out = {}
    for name in records[0]:
        values = [r[name] for r in records]
        if isinstance(values[0], (dict, list, type(None))):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
        else:
            arrays = [np.asarray(v) for v in values]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ValueError(f"field {name!r} has different shapes in one batch ({sorted(shapes)}); pad or crop "
                                 "it in `transform`, or pass a `batch_fn` that handles ragged fields")
            out[name] = np.stack(arrays)
    return out


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count), JAX's where not given."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def make_dataset(
    source: RandomAccessSource,
    *,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    equal_shares: bool = False,
) -> grain.MapDataset:
    """This process's records, shuffled and repeated, as a `grain.MapDataset` (may hold None for corrupt ones)."""
    process_index, process_count = _processes(process_index, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
    n = len(source)
    ds = grain.MapDataset.source(source)
    if equal_shares and n % process_count:
        usable = n - n % process_count
        logging.info("pipeline: %d records over %d processes; the last %d are left out (equal_shares)", n,
                     process_count, n - usable)
        ds = ds[:usable]
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no records: the source has {n}; use fewer "
                         "processes or more data")
    if shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds


def _source_digest(source: RandomAccessSource) -> str | None:
    ids = getattr(source, "ids", None)
    if not callable(ids):
        return None
    return hashlib.sha256("\n".join(map(str, ids())).encode("utf-8")).hexdigest()[:16]


class DataIterator:
    """A grain iterator of batches with a checked, JSON-serialisable `get_state`/`set_state`."""

    def __init__(self, iterator: grain.DatasetIterator, pipeline: dict):
        self._it = iterator
        self.pipeline = pipeline

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "pipeline": dict(self.pipeline)}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` of an iterator built with the same arguments (else ValueError)."""
        if not isinstance(state, dict) or "grain" not in state or "pipeline" not in state:
            raise ValueError(f"not a data iterator state (keys grain, pipeline): {state!r:.200}")
        saved = state["pipeline"]
        diff = {k: (saved.get(k), self.pipeline.get(k)) for k in set(saved) | set(self.pipeline)
                if saved.get(k) != self.pipeline.get(k)}
        if diff:
            raise ValueError("the saved data iterator state is from a different pipeline "
                             f"(saved vs now: {diff}); resume with the same data and arguments, or start the "
                             "data from its beginning")
        self._it.set_state(state["grain"])


def make_iterator(
    source: RandomAccessSource,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    transform: Callable[[Any], Any] | None = None,
    equal_shares: bool = False,
    num_threads: int = 2,
    prefetch: int = 4,
    batch_fn: Callable[[Sequence[Any]], Any] | None = None,
) -> DataIterator:
    """A checkpointable iterator of this process's batches (see the module docstring).

    `num_epochs=None` repeats forever. `process_index`/`process_count` default to JAX's.
    `transform` maps one record (never None) to what is batched. `num_threads` read and
    transform records in parallel; `prefetch` records are read ahead (keep it small for
    large records). `batch_fn` replaces `stack_records`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    process_index, process_count = _processes(process_index, process_count)
    ds = make_dataset(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                      process_count=process_count, equal_shares=equal_shares)
    if transform is not None:
        ds = ds.map(lambda r: None if r is None else transform(r))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 0)))
    it = it.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn or stack_records)
    pipeline = {"source_len": len(source), "source_ids": _source_digest(source), "batch_size": batch_size,
                "seed": int(seed), "shuffle": bool(shuffle), "num_epochs": num_epochs,
                "process_count": process_count,
                "drop_remainder": bool(drop_remainder), "equal_shares": bool(equal_shares)}
    return DataIterator(iter(it), pipeline)



class GlobalBatchShare:
    """This process's rows of every global batch, in an order that does not depend on the process count.

    The global record order is the source shuffled with `seed` (a fresh permutation each epoch,
    grain's index shuffle) and repeated `num_epochs` times (None: without end); global batch k is
    order[k*B : (k+1)*B] and this process holds its rows `rows` of it (default: the P-th share of
    process p). Item i of this view is local row i % b of local batch i // b (b = `local_batch` =
    len(rows)); only whole global batches are kept. Only this process's records are read.
    `ids()` forwards the source's (the pipeline's resume check). Batch it with
    `make_global_iterator`, or unshuffled as one process with `make_iterator(share,
    batch_size=share.local_batch, shuffle=False, process_index=0, process_count=1)`.
    """

    def __init__(self, source: RandomAccessSource, global_batch: int, seed: int, *, rows: slice | None = None,
                 num_epochs: int | None = None, shuffle: bool = True):
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
        if rows is None:
            index, count = _processes(None, None)
            if global_batch % count:
                raise ValueError(f"global batch {global_batch} does not split over {count} processes; use a multiple "
                                 f"of {count}")
            share = global_batch // count
            rows = slice(index * share, (index + 1) * share)
        if rows.start is None or rows.stop is None or not 0 <= rows.start < rows.stop <= global_batch:
            raise ValueError(f"rows {rows} are not a non-empty slice inside a global batch of {global_batch}")
        n = len(source)
        if n == 0:
            raise ValueError("the source has no records")
        order = grain.MapDataset.range(n)
        order = order.shuffle(seed=int(seed) % 2**32) if shuffle else order
        self._order = order.repeat(num_epochs) if num_epochs != 1 else order
        self.source, self.global_batch, self.rows = source, int(global_batch), rows
        self.local_batch = rows.stop - rows.start
        self._len = len(self._order) // self.global_batch * self.local_batch  # whole global batches only
        if self._len == 0:
            raise ValueError(f"the source has {n} records, fewer than one global batch of {global_batch} over "
                             f"{num_epochs} epoch(s); lower the batch size or add data")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Any:
        k, j = divmod(int(index), self.local_batch)
        return self.source[int(self._order[k * self.global_batch + self.rows.start + j])]

    def ids(self) -> list[str]:
        ids = getattr(self.source, "ids", None)
        return list(ids()) if callable(ids) else list(map(str, range(len(self.source))))


def make_global_iterator(
    source: RandomAccessSource,
    *,
    global_batch: int,
    seed: int,
    rows: slice | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    transform: Callable[[Any], Any] | None = None,
    num_threads: int = 2,
    prefetch: int = 4,
    batch_fn: Callable[[Sequence[Any]], Any] | None = None,
) -> DataIterator:
    """A checkpointable iterator of this process's rows (`rows`, default its P-th share) of every global
    batch of `global_batch` records (`GlobalBatchShare`): the same global batches on any number of processes.

    Each `next()` gives `rows.stop - rows.start` records, batched by `batch_fn` (default
    `stack_records`) after `transform`. `num_epochs=None` repeats forever (a trainer's default).
    The state refuses a resume with another global batch or rows of another size; a checkpoint
    written with one process count resumes with the same local batch only.
    """
    share = GlobalBatchShare(source, global_batch, seed, rows=rows, num_epochs=num_epochs, shuffle=shuffle)
    it = make_iterator(share, batch_size=share.local_batch, seed=seed, shuffle=False, num_epochs=1, process_index=0,
                       process_count=1, transform=transform, num_threads=num_threads, prefetch=prefetch,
                       batch_fn=batch_fn)
    it.pipeline.update(global_batch=share.global_batch, global_shuffle=bool(shuffle), global_epochs=num_epochs)
    return it
