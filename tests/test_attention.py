"""The attention entry point: splash (Pallas interpret mode on CPU) against the plain XLA attention,
forward and backward, unsharded and under an 8-device mesh (shard_map); the "auto" choice per platform.

Tolerances (float32, 'highest' matmul precision): outputs 2e-5 absolute on O(1) values; gradients
1e-4 relative to the largest gradient entry (splash recomputes the softmax blockwise in its backward,
the reference differentiates the materialised softmax).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from halo_jax.models import attention as attn
from halo_jax.parallel.mesh import make_mesh
from tiny_wan import tiny_wan

B, SQ, SKV, N, D = 4, 40, 24, 2, 16  # lengths not multiples of 128: exercises the padding
OUT_TOL, GRAD_TOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, SQ, N, D)).astype(np.float32)
    k = rng.normal(size=(B, SKV, N, D)).astype(np.float32)
    v = rng.normal(size=(B, SKV, N, D)).astype(np.float32)
    keep = np.ones((B, SKV), bool)
    keep[1, 17:] = False   # key padding on two rows
    keep[3, 5:] = False
    return q, k, v, keep


def _loss(impl):
    def f(q, k, v, keep):
        out = attn.attention(q, k, v, mask=keep, implementation=impl)
        return jnp.sum(out * jnp.cos(out)), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))


@pytest.fixture(scope="module")
def reference(qkv):
    (_, out), grads = _loss("xla")(*qkv)
    return np.asarray(out), [np.asarray(g) for g in grads]


def _check(got, reference):
    (_, out), grads = got
    ref_out, ref_grads = reference
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=OUT_TOL, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, atol=GRAD_TOL * np.abs(r).max(), rtol=0)


def test_splash_matches_xla(qkv, reference):
    _check(_loss("splash")(*qkv), reference)


def test_splash_sharded_matches_xla(qkv, reference):
    """Under `jax.set_mesh` the kernel runs per shard: batch over fsdp (4), heads over tensor (2)."""
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    q, k, v, keep = qkv
    with jax.set_mesh(mesh):
        x_sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        args = [jax.device_put(x, x_sh) for x in (q, k, v)] + [jax.device_put(keep, NamedSharding(mesh, P(("data", "fsdp"))))]
        fn = _loss("splash")
        text = fn.lower(*args).as_text()
        got = fn(*args)
    assert "manual_computation" in text  # the kernel ran per shard (jax.shard_map), not on gathered arrays
    _check(got, reference)


def test_splash_without_mask_and_custom_scale(qkv):
    q, k, v, _ = qkv
    got = jax.jit(lambda a, b, c: attn.attention(a, b, c, implementation="splash", scale=0.3))(q, k, v)
    want = attn.attention(q, k, v, implementation="xla", scale=0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=OUT_TOL, rtol=0)


def test_auto_per_platform(monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert attn.resolve_implementation("auto", bf16, 128) == "xla"  # this CPU
    monkeypatch.setattr(attn, "_on_tpu", lambda: True)
    assert attn.resolve_implementation("auto", f32, 128) == "splash"
    assert attn.resolve_implementation("auto", f32, 128, bias=True) == "xla"
    assert attn.resolve_implementation("auto", f32, 128, general_mask=True) == "xla"
    monkeypatch.setattr(attn, "_on_tpu", lambda: False)
    monkeypatch.setattr(attn, "_on_gpu", lambda: True)
    assert attn.resolve_implementation("auto", bf16, 128) == "cudnn"
    assert attn.resolve_implementation("auto", f32, 128) == "xla"
    assert attn.resolve_implementation("auto", bf16, 256) == "xla"
    with pytest.raises(ValueError, match="no logits bias"):
        attn.resolve_implementation("splash", f32, 64, bias=True)
    with pytest.raises(ValueError, match="not one of"):
        attn.resolve_implementation("flash", f32, 64)


def test_splash_rejects_bias_and_general_mask(qkv):
    q, k, v, _ = qkv
    with pytest.raises(ValueError, match="key-padding"):
        attn.attention(q, k, v, bias=jnp.zeros((1, N, SQ, SKV)), implementation="splash")
    causal = jnp.tril(jnp.ones((SQ, SKV), bool))[None, None]
    with pytest.raises(ValueError, match="key-padding"):
        attn.attention(q, k, v, mask=causal, implementation="splash")


def test_wan_dit_with_splash_equals_xla():
    """The tiny Wan DiT (self-attention over 16 tokens, cross-attention to 8 text tokens) is the same
    function with attention_impl='splash' (the parameters are shared)."""
    from flax import nnx

    from halo_jax.models.wan import WanTransformer3D, WanTransformerConfig

    cfg = WanTransformerConfig.tiny(num_layers=1)
    graphdef, state = nnx.split(tiny_wan(cfg))  # NumPy-random values: no per-initialiser XLA compiles
    splash_def, _ = nnx.split(nnx.eval_shape(lambda: WanTransformer3D(cfg.replace(attention_impl="splash"),
                                                                      rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 1, 8, 8)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    text = rng.normal(size=(2, 8, 24)).astype(np.float32)

    def run(gd):
        return jax.jit(lambda s: nnx.merge(gd, s)(x, t, text))(state)

    np.testing.assert_allclose(np.asarray(run(splash_def)), np.asarray(run(graphdef)), atol=1e-4, rtol=0)
