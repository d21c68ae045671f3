"""Multi-host helpers: initialisation, process shares of work, barriers, global arrays.

`initialize(config)` calls `jax.distributed.initialize()` on TPU pods and when a
coordinator is configured (config or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID variables); a single process does nothing. It must run before
anything touches the devices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _on_tpu_pod() -> bool:
    """A multi-host TPU slice lists its workers in TPU_WORKER_HOSTNAMES."""
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(config: Any | None = None) -> bool:
    """Start JAX's distributed runtime when this is a multi-process run; True if it did."""
    dist = config.distributed if config is not None and "distributed" in config else None
    address = (dist.coordinator_address if dist else "") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num = (dist.num_processes if dist else 0) or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = dist.process_id if dist and dist.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if address:
        if num <= 0 or pid < 0:
            raise ValueError(
                f"coordinator address {address!r} is set but the number of processes ({num}) or this process's id "
                f"({pid}) is not; set JAX_NUM_PROCESSES and JAX_PROCESS_ID (or --config.distributed.*)")
        # Only the CPU backend reads this (tests and laptops); accelerators use their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives if dist else "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
        return True
    if _on_tpu_pod():
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    return jax.process_index() == 0


def process_share(items: Sequence, index: int | None = None, count: int | None = None) -> list:
    """This process's items: every `count`-th item starting at `index` (round robin)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return list(items[index::count])


def barrier(name: str) -> None:
    """Wait for every process (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_batch(local: Any, sharding: Any) -> Any:
    """Global arrays from each process's slice of the batch (leading axis).

    `sharding`: one sharding for every leaf, or a tree of them matching `local`.
    """
    make = lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x))  # noqa: E731
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: make(x, sharding), local)
    return jax.tree.map(make, local, sharding)


def to_host(x: Any) -> Any:
    """Fully replicated numpy copy of a (possibly multi-host) global array tree.

    Leaves that this process holds whole (numpy, process-local arrays) are copied as they are;
    only arrays spanning other processes' devices are gathered (a collective: every process calls).
    """
    if jax.process_count() == 1:
        return jax.device_get(x)
    from jax.experimental import multihost_utils

    def one(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return multihost_utils.process_allgather(leaf, tiled=True)
        return jax.device_get(leaf)  # process_allgather would concatenate every process's copy

    return jax.tree.map(one, x)


def process_local_rows(global_rows: int, sharding: NamedSharding) -> slice:
    """The contiguous rows (leading axis) of a global batch that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map((global_rows,))
    starts = [idx[0].start or 0 for idx in indices.values()]
    stops = [global_rows if idx[0].stop is None else idx[0].stop for idx in indices.values()]
    lo, hi = min(starts), max(stops)
    return slice(lo, hi)


class GlobalBatchShare:
    """This process's rows of every global batch, in an order that does not depend on the process count.

    The global record order is the source shuffled with `seed` (a fresh permutation each epoch,
    grain's index shuffle) and repeated `num_epochs` times (None: without end); global batch k is
    order[k*B : (k+1)*B] and this process holds its rows `rows` of it (`process_local_rows` of the
    batch sharding; default: the P-th share of process p). Item i of this view is local row
    i % b of local batch i // b (b = len(rows)), so batching the view unshuffled as one process
    (`data.pipeline.make_iterator(view, batch_size=b, shuffle=False, process_index=0,
    process_count=1)`) gives, on 1 x 8 devices and on 2 x 4, the same global batches. Only this
    process's records are read. `ids()` forwards the source's (the pipeline's resume check).
    """

    def __init__(self, source: Any, global_batch: int, seed: int, *, rows: slice | None = None,
                 num_epochs: int | None = None, shuffle: bool = True):
        import grain

        count = jax.process_count()
        if rows is None:
            if global_batch % count:
                raise ValueError(f"global batch {global_batch} does not split over {count} processes; use a multiple "
                                 f"of {count}")
            share = global_batch // count
            rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
        if not 0 <= rows.start < rows.stop <= global_batch:
            raise ValueError(f"rows {rows} are not inside a global batch of {global_batch}")
        n = len(source)
        if n == 0:
            raise ValueError("the source has no records")
        order = grain.MapDataset.range(n)
        order = order.shuffle(seed=int(seed) % 2**32) if shuffle else order
        self._order = order.repeat(num_epochs) if num_epochs != 1 else order
        self.source, self.global_batch, self.rows = source, int(global_batch), rows
        self.local_batch = rows.stop - rows.start
        self._len = len(self._order) // global_batch * self.local_batch  # whole global batches only

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Any:
        k, j = divmod(int(index), self.local_batch)
        return self.source[int(self._order[k * self.global_batch + self.rows.start + j])]

    def ids(self) -> list[str] | None:
        ids = getattr(self.source, "ids", None)
        return ids() if callable(ids) else list(map(str, range(len(self.source))))
