"""Orbax checkpoints of a train state, with preemption saves and restore onto any mesh.

A train state is any pytree of arrays (params, optimizer state, step, RNG key data);
alongside it a JSON dict holds what is not an array (the data iterator's state, the
phase of a multi-phase stage, ...). `restore` takes an *abstract* target
(`jax.ShapeDtypeStruct`s carrying the shardings wanted now), so a checkpoint saved
on a (2, 4) mesh restores onto (4, 2), or onto one device.

SIGTERM (preemption) sets a flag; the loop sees `preempted()`, saves and exits.

On CPU backends the state is saved without orbax's replica-parallel writes (`array_handler`): those
slice every replicated array per replica through a jitted `slice`, one XLA compile per distinct
shape (~8 s of compiles on the first save of a reward-model state); one host gains nothing from
them. On TPU (and GPU, where orbax already turns them off) orbax's default stands.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def array_handler() -> ocp.type_handlers.ArrayHandler:
    """Orbax's jax.Array handler, with replica-parallel saving off on CPU backends (module docstring)."""
    return ocp.type_handlers.ArrayHandler(use_replica_parallel=False if jax.default_backend() == "cpu" else None)


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the "state" item: orbax's standard handlers, jax.Array's from `array_handler`."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()), (jax.Array, array_handler()),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def abstract_like(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs of `tree`, with `shardings` (a matching tree) or each array's own sharding."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a train state under `directory`; saves every `every_steps`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, every_steps: int = 100, handle_sigterm: bool = True):
        self.directory = Path(directory).absolute()
        self.every_steps = max(int(every_steps), 1)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
            item_handlers={"state": state_handler(), "extra": ocp.JsonCheckpointHandler()},
        )
        self._sigterm = False
        self._previous_handler = None
        if handle_sigterm:
            self._install_sigterm()

    # -- preemption
    def _install_sigterm(self) -> None:
        try:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: the caller handles preemption
            self._previous_handler = None

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def preempted(self, step: int) -> bool:
        """True when this run was asked to stop (SIGTERM here, or orbax's multi-host preemption notice)."""
        return self._sigterm or self.manager.reached_preemption(step)

    # -- save / restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Save `state` (array pytree) and `extra` (JSON) at `step`; waits until it is on disk."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(extra or {})),
            force=True,
        )
        self.manager.wait_until_finished()

    def extra(self, step: int | None = None) -> dict | None:
        """The JSON extra saved at `step` (default: latest) without reading the state; None without a checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return dict(self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"] or {})

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, extra) at `step` (default: latest) laid out as the abstract `target` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        state = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=state, extra=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["extra"] or {})

    def close(self) -> None:
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
