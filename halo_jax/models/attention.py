"""The one attention entry point of every model (Wan DiT, umT5, SigLIP, reward towers).

    attention(q, k, v)[b, t, n] = softmax_s(q[b, t, n] . k[b, s, n] * scale + bias[b, n, t, s]
                                            masked where mask[b, n, t, s] is False) @ v[b, s, n]

with `scale = 1 / sqrt(head_dim)` unless given. Implementations:

    "xla"     `jax.nn.dot_product_attention(implementation="xla")`: every backend, every mask/bias
    "cudnn"   the same function's cuDNN flash kernel: GPU, bf16/fp16
    "splash"  the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`):
              on TPU compiled by Mosaic; elsewhere run in Pallas interpret mode (slow: tests only).
              No bias; masks only as key padding (batch, kv_seq). Sequences are zero-padded to a
              multiple of 128 and the padded keys are masked through the kernel's segment ids.
    "auto"    splash on TPU, cuDNN on GPU (bf16/fp16, head_dim <= 128 and % 8 == 0), xla otherwise;
              and xla wherever the picked kernel cannot take this call's bias or mask.

Splash and sharding: the kernel is a custom call that XLA's partitioner cannot split, so when a
mesh is set (`jax.set_mesh(mesh)` around the trace) the call runs under `jax.shard_map`: batch over
('data', 'fsdp'), heads over 'tensor' (each where the axis divides the dimension). Without a
context mesh the kernel sees whole (gathered) arrays: correct, but on a multi-chip mesh slow.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from halo_jax.parallel.logical_axes import BATCH_AXES

Implementation = Literal["xla", "cudnn", "splash", "auto"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn", "splash", "auto")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
SPLASH_LANES = 128          # splash blocks are multiples of the TPU lane width
SPLASH_MAX_BLOCK = 512      # largest block tried (a divisor of the padded length)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def resolve_implementation(implementation: str, dtype, head_dim: int, *, bias: bool = False,
                           general_mask: bool = False) -> str:
    """The concrete kernel for `implementation` (module docstring).

    `bias` / `general_mask` say whether this call has a logits bias or a mask that is not a key-padding
    mask: "auto" then avoids splash; an explicit "splash" raises.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        if _on_tpu():
            return "xla" if bias or general_mask else "splash"
        fits = jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES] and head_dim <= 128 and head_dim % 8 == 0
        return "cudnn" if _on_gpu() and fits else "xla"
    if implementation == "cudnn":
        if not _on_gpu():
            raise ValueError(f"attention implementation 'cudnn' needs a GPU backend, this one is {jax.default_backend()!r}; use 'xla' or 'auto'")
        if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
            raise ValueError(f"attention implementation 'cudnn' needs bfloat16/float16 inputs, got {jnp.dtype(dtype)}; use 'auto' to fall back to xla")
    if implementation == "splash" and (bias or general_mask):
        raise ValueError("attention implementation 'splash' takes no logits bias and only key-padding masks "
                         "(batch, kv_seq); use 'xla' or 'auto' for this call")
    return implementation


def _key_padding(mask: jax.Array, batch: int, kv_len: int) -> jax.Array | None:
    """`mask` as (batch, kv_seq) if it only masks keys (shape (b|1, 1, 1, kv)), else None."""
    if mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == kv_len:
        return jnp.broadcast_to(mask[:, 0, 0, :], (batch, kv_len))
    return None


def _block(length: int) -> int:
    """Largest block in (512, 256, 128) dividing `length` (a multiple of 128)."""
    for b in (SPLASH_MAX_BLOCK, 256, SPLASH_LANES):
        if length % b == 0:
            return b
    raise AssertionError(length)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    """A splash MHA kernel over (heads, q_len, head_dim) x (heads, kv_len, head_dim), full mask."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bkv = _block(q_len), _block(kv_len)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.FullMask((q_len, kv_len)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to cache across traces
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _pad_to(x: jax.Array, axis: int, length: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array, scale: float) -> jax.Array:
    """Splash on (b, s, n, d) arrays of one device; `keep` (b, kv) bool marks the attended keys."""
    b, sq, n, _ = q.shape
    skv = k.shape[1]
    pq, pkv = (math.ceil(x / SPLASH_LANES) * SPLASH_LANES for x in (sq, skv))
    kernel = _splash_kernel(n, pq, pkv, not _on_tpu())
    qh = _pad_to(jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2), 2, pq)   # (b, n, pq, d)
    kh = _pad_to(jnp.swapaxes(k, 1, 2), 2, pkv)
    vh = _pad_to(jnp.swapaxes(v, 1, 2), 2, pkv)
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    # Segment ids: every query is segment 0; a key attends iff its segment is 0 (padding: 1).
    kv_seg = _pad_to(jnp.where(keep, 0, 1).astype(jnp.int32), 1, pkv)
    kv_seg = jnp.where(jnp.arange(pkv)[None, :] < skv, kv_seg, 1)
    q_seg = jnp.zeros((b, pq), jnp.int32)
    out = jax.vmap(lambda a, bb, c, qs, ks: kernel(a, bb, c, segment_ids=SegmentIds(q=qs, kv=ks)))(
        qh, kh, vh, q_seg, kv_seg)
    return jnp.swapaxes(out[:, :, :sq], 1, 2).astype(q.dtype)


def _mesh_axis_fits(mesh, axes: tuple[str, ...], dim: int) -> tuple[str, ...]:
    axes = tuple(a for a in axes if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    return axes if size > 1 and dim % size == 0 else ()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None,
                     scale: float | None = None) -> jax.Array:
    """Splash attention over (batch, seq, heads, head_dim); `key_mask` (batch, kv_seq) True = attend.

    Under a context mesh (`jax.set_mesh`) it runs per shard through `jax.shard_map` (module docstring).
    """
    b, _, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    keep = jnp.ones((b, k.shape[1]), bool) if key_mask is None else key_mask
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_local(q, k, v, keep, scale)
    batch_axes = _mesh_axis_fits(mesh, BATCH_AXES, b)
    head_axes = _mesh_axis_fits(mesh, ("tensor",), n)
    if not batch_axes and not head_axes:
        return _splash_local(q, k, v, keep, scale)
    bspec = batch_axes if batch_axes else None
    hspec = head_axes[0] if head_axes else None
    qkv_spec = P(bspec, None, hspec, None)
    return jax.shard_map(functools.partial(_splash_local, scale=scale), mesh=mesh,
                         in_specs=(qkv_spec, qkv_spec, qkv_spec, P(bspec, None)), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, keep)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    implementation: str = "xla",
    scale: float | None = None,
) -> jax.Array:
    """Multi-head attention over (batch, seq, heads, head_dim) inputs; returns q's shape.

    `mask` (bool, True = attend) is either a key-padding mask (batch, kv_seq) or
    anything broadcastable to (batch, heads, q_seq, kv_seq); `bias` (float) is
    added to the logits and broadcasts the same way. A query row whose keys are
    all masked gets a uniform average over them (XLA semantics; splash: undefined),
    so callers keep at least one valid key per row.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects (batch, seq, heads, head_dim) inputs, got q {q.shape}, k {k.shape}, v {v.shape}")
    if mask is not None:
        mask = jnp.asarray(mask, dtype=bool)
        if mask.ndim == 2:
            if mask.shape != (k.shape[0], k.shape[1]):
                raise ValueError(f"key-padding mask must be (batch, kv_seq) = {(k.shape[0], k.shape[1])}, got {mask.shape}")
            mask = mask[:, None, None, :]
        elif mask.ndim != 4:
            raise ValueError(f"mask must be (batch, kv_seq) or 4-D (batch, heads, q_seq, kv_seq), got shape {mask.shape}")
    key_mask = None if mask is None else _key_padding(mask, k.shape[0], k.shape[1])
    impl = resolve_implementation(implementation, q.dtype, q.shape[-1], bias=bias is not None,
                                  general_mask=mask is not None and key_mask is None)
    if impl == "splash":
        return splash_attention(q, k, v, key_mask, scale)
    if bias is not None:
        bias = jnp.asarray(bias, dtype=q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=impl)
