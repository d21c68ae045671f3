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
    """The contiguous rows (leading axis) of a global batch that this process's devices hold
    (the `rows` of `data.pipeline.make_global_iterator`)."""
    indices = sharding.addressable_devices_indices_map((global_rows,))
    spans = sorted({(idx[0].start or 0, global_rows if idx[0].stop is None else idx[0].stop)
                    for idx in indices.values()})
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    covered = lo
    for start, stop in spans:
        if start > covered:
            raise ValueError(f"this process's devices hold rows {spans} of a global batch of {global_rows}: not one "
                             "contiguous block; order the mesh's batch axes so that each process's devices are "
                             "adjacent (jax.make_mesh does)")
        covered = max(covered, stop)
    return slice(lo, hi)

