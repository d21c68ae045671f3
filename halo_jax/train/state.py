"""The train state and the sharded train step shared by every training stage.

    state = {"step": int32, "params": pure dict of trainable arrays,
             "opt_state": optax state over params, "rng": uint32 key data}

The model is split once: `graphdef, params, frozen = nnx.split(model, trainable, ...)`;
a step merges them inside `jax.jit`, so nothing mutable crosses the jit boundary.
Shardings come from the params' logical axis names (halo_jax/parallel/sharding.py);
the step is jitted with explicit in/out shardings and donates the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from halo_jax.parallel.sharding import DEFAULT_RULES, Rules, state_shardings
from halo_jax.train.checkpoint import Checkpointer, abstract_like

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]]


def split_model(model: nnx.Module, trainable: Any = nnx.Param) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else) of `model`."""
    return nnx.split(model, trainable, ...)


def pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def init_train_state(params: dict, tx: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def train_state_shardings(params_state: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                          rules: Rules = DEFAULT_RULES) -> dict:
    """Shardings of the train state: params by their logical names, optimizer moments like their params."""
    param_shardings = pure(state_shardings(params_state, mesh, rules))
    replicated = NamedSharding(mesh, P())
    abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), pure(params_state))
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # optax moments mirror the params tree; scalars (counts) are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": param_shardings, "opt_state": opt_shardings, "rng": replicated}


def make_train_step(graphdef: nnx.GraphDef, frozen: nnx.State, loss_fn: LossFn, tx: optax.GradientTransformation,
                    shardings: dict, batch_sharding: Any) -> Callable[[dict, Any], tuple[dict, dict]]:
    """A jitted `step(state, batch) -> (state, metrics)`: loss, gradients, optax update.

    `loss_fn(model, batch, key) -> (loss, metrics)` sees the merged model. `frozen`
    (non-trainable state) is an argument of the compiled step, bound here (not a constant
    closed over: an array sharded over several processes cannot be one, and large frozen
    weights would be baked into the executable); leaves not on the step's mesh are
    replicated onto it. The result also offers `.lower(state, batch)`.
    """

    def step(state, batch, frozen):
        key = jax.random.wrap_key_data(state["rng"])
        key, step_key = jax.random.split(key)
        step_key = jax.random.fold_in(step_key, state["step"])

        def loss_of(params):
            model = nnx.merge(graphdef, params, frozen)
            return loss_fn(model, batch, step_key)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rng": jax.random.key_data(key)}
        return new_state, metrics

    replicated = shardings["step"]
    frozen = jax.tree.map(lambda x: _on_mesh(x, replicated), pure(frozen))
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding, frozen_shardings),
                     out_shardings=(shardings, None), donate_argnums=0)
    return _BoundStep(jitted, frozen)


def _on_mesh(x: Any, replicated: NamedSharding) -> jax.Array:
    """`x` if it is an array on `replicated`'s mesh, else a copy replicated there."""
    if isinstance(x, jax.Array) and x.sharding.device_set == replicated.device_set:
        return x
    return jax.device_put(x, replicated)


class _BoundStep:
    """`jitted(state, batch, frozen)` with `frozen` bound: called (and lowered) as `step(state, batch)`."""

    def __init__(self, jitted: Callable, frozen: dict):
        self.jitted, self.frozen = jitted, frozen

    def __call__(self, state: dict, batch: Any) -> tuple[dict, dict]:
        return self.jitted(state, batch, self.frozen)

    def lower(self, state: Any, batch: Any):
        return self.jitted.lower(state, batch, self.frozen)


def restore_or_init(checkpointer: Checkpointer, init_fn: Callable[..., dict], shardings: dict,
                    *init_args: Any) -> tuple[dict, dict]:
    """The latest checkpoint laid out on `shardings`, else `init_fn(*init_args)` placed there; plus its JSON extra.

    Pass arrays (the initial params) as `init_args`, not closed over by `init_fn`: a jitted
    function cannot close over an array that spans several processes' devices.
    """
    if checkpointer.latest_step() is not None:
        target = abstract_like(jax.eval_shape(init_fn, *init_args), shardings)
        return checkpointer.restore(target)
    return jax.jit(init_fn, out_shardings=shardings)(*init_args), {}
