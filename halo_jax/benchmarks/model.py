"""The benchmarked DiT with cheap weights, placed on a mesh without a random-init compile."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from halo_jax.models.wan import WanTransformer3D, WanTransformerConfig
from halo_jax.parallel.sharding import state_shardings


def build_model(cfg: WanTransformerConfig, mesh: jax.sharding.Mesh, seed: int = 0,
                random_limit: int = 20_000_000) -> WanTransformer3D:
    """The DiT with cheap weights placed on `mesh`, no random-init compile.

    Up to `random_limit` parameters: NumPy random weights (kernels ~ N(0, 1/fan_in), norm scales ~ 1).
    Above: constants (kernels 1/fan_in, scales 1, the rest 0) made under one jit with the params'
    out_shardings, so a 1.3B model is never materialised on one host device first.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanTransformer3D(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, mesh)
    size = sum(math.prod(v.shape) for v in jax.tree.leaves(state))

    def kind(path, v) -> str:
        names = [getattr(k, "key", None) for k in path]
        return "scale" if "scale" in names[-2:] else ("kernel" if len(v.shape) >= 2 else "other")

    if size <= random_limit:
        rng = np.random.default_rng(seed)

        def fill(path, v):
            k = kind(path, v)
            if k == "scale":
                x = 1.0 + 0.1 * rng.normal(size=v.shape)
            elif k == "kernel":
                x = rng.normal(size=v.shape) / np.sqrt(v.shape[-2])
            else:
                x = 0.1 * rng.normal(size=v.shape)
            return np.asarray(x, v.dtype)

        filled = jax.tree_util.tree_map_with_path(fill, state)
        filled = jax.device_put(filled, shardings)
    else:
        def make():
            def one(path, v):
                k = kind(path, v)
                value = 1.0 if k == "scale" else (1.0 / v.shape[-2] if k == "kernel" else 0.0)
                return jnp.full(v.shape, value, v.dtype)
            return jax.tree_util.tree_map_with_path(one, state)

        filled = jax.jit(make, out_shardings=shardings)()
    return nnx.merge(graphdef, filled)
