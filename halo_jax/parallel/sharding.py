"""Logical-axis sharding: parameter names -> mesh axes -> `NamedSharding`s.

Every parameter declares *logical* axis names with `param_init(init, "embed", "mlp")`
(`nnx.with_partitioning`); a rule table (config; defaults and the vocabulary in
`logical_axes.py`) maps each name to mesh axes. Batches shard their leading axis over
('data', 'fsdp').
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from halo_jax.parallel.logical_axes import BATCH_AXES, DEFAULT_RULES

Rules = Sequence[tuple[str, Any]]


def param_init(init: Callable, *names: str | None) -> Callable:
    """`init` annotated with logical axis names, one per dimension."""
    return nnx.with_partitioning(init, tuple(names))


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
    """PartitionSpec for logical `names` under `rules`; a mesh axis is used at most once."""
    if not names:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axis = table.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        if any(a in used for a in axes):
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes that do not divide their dimension (replicate that dim instead)."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        fitted.append(axis if size > 1 and dim % size == 0 else None)
    return P(*fitted)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A pytree of `NamedSharding` matching `state` (an nnx State or pytree of Variables/arrays).

    Dimensions a mesh axis does not divide are replicated, so tiny test models
    shard on any mesh.
    """

    def one(x):
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        spec = _fit_spec(logical_to_spec(names, rules), value.shape, mesh)
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Build `ctor()` with every parameter created directly on its sharding (no host copy)."""
    abstract = nnx.eval_shape(ctor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.split(ctor())[1]

    with jax.set_mesh(mesh):
        # Runs once: LLVM's optimisation of the many small random-init kernels costs more than it saves.
        lowered = jax.jit(init, out_shardings=shardings).lower()
        state = lowered.compile({"xla_backend_optimization_level": 0})()
    return nnx.merge(graphdef, state)


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place an existing module's state onto the mesh by its logical names (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch (global, identical on every process) with its leading axis sharded."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x))), batch)
