"""The umT5 text encoder (transformers `UMT5EncoderModel`) in flax.nnx.

    h_0 = E[ids]                                   shared token embedding, no scaling
    for each layer l (every layer owns its relative-position bias table B_l):
        a   = RMSNorm(h)
        h  += O( softmax(Q(a) K(a)^T + B_l[bucket(j - i)] + mask) V(a) )     no 1/sqrt(d) scaling
        f   = RMSNorm(h)
        h  += Wo( act(Wi_0 f) * (Wi_1 f) )         gated-GELU (tanh approximation)
    out = RMSNorm(h)

RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), the mean taken in float32 (no mean subtraction,
no bias). `mask` excludes padded keys (from the padding mask); padded query positions still
get (meaningless) outputs, which `text_embeddings` zeroes the way diffusers' `WanPipeline` does.

Precision: the residual stream h is float32 whatever `dtype` is (cheap, and it keeps the
24-layer sum of a bf16 model from drifting; transformers in bf16 keeps it in bf16, so bf16
outputs differ from its bf16 run by bf16 rounding, not more); projections, attention and the
norms' outputs run in `dtype`; the output is cast to `dtype`.

The layers are stacked on a leading `layers` axis and applied with `jax.lax.scan`, so
compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from halo_jax.models.attention import IMPLEMENTATIONS, attention
from halo_jax.parallel.sharding import param_init

# transformers ACT2FN names used by T5-family configs -> jax functions
_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

# fields of a transformers UMT5Config that we model
_HF_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
    "relative_attention_num_buckets", "relative_attention_max_distance",
    "layer_norm_epsilon", "feed_forward_proj",
)


def _dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder hyper-parameters (names as in transformers' `UMT5Config`).

    `dtype` is the compute dtype, `param_dtype` the storage dtype; `remat` recomputes each
    layer in the backward pass; `attention_implementation` is one of
    `halo_jax.models.attention.IMPLEMENTATIONS` ("xla", "cudnn", "auto").
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention_implementation: str = "xla"

    def __post_init__(self):
        self.activation  # validates feed_forward_proj
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"UMT5Config.attention_implementation={self.attention_implementation!r} "
                             f"is not one of {IMPLEMENTATIONS}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"UMT5Config.{name} must be positive, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(
                f"UMT5Config.relative_attention_num_buckets={self.relative_attention_num_buckets} is too small; "
                "the bidirectional bucketing needs at least 4")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def activation(self) -> str:
        """transformers' `dense_act_fn`: 'gated-gelu' means the tanh GELU ('gelu_new')."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not of the form 'gated-ACT' or 'ACT'")
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: activation {act!r} not supported; "
                             f"choose from {sorted(_ACTIVATIONS)}")
        return act

    @classmethod
    def from_transformers_config(cls, config: dict, **overrides) -> "UMT5Config":
        """From a transformers `config.json` dict (extra keys ignored); `overrides` win."""
        if config.get("model_type") not in (None, "umt5", "t5", "mt5"):
            raise ValueError(f"expected a umT5 config.json, got model_type={config.get('model_type')!r}")
        kwargs = {k: config[k] for k in _HF_FIELDS if k in config}
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_transformers_config(self) -> dict:
        """A complete `config.json` dict that transformers' `UMT5EncoderModel` loads."""
        out = {k: getattr(self, k) for k in _HF_FIELDS}
        out.update(
            architectures=["UMT5EncoderModel"], model_type="umt5", dense_act_fn=self.activation,
            is_gated_act=self.is_gated, is_encoder_decoder=True, is_decoder=False, use_cache=True,
            num_decoder_layers=self.num_layers, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            dropout_rate=0.1, initializer_factor=1.0, classifier_dropout=0.0, tie_word_embeddings=True,
            dtype=_dtype_name(self.param_dtype),
        )
        return out

    @classmethod
    def tiny(cls, **overrides) -> "UMT5Config":
        """A few-kilobyte config for tests (2 layers, width 32, 4 heads of 8)."""
        base = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16)
        base.update(overrides)
        return cls(**base)

    # Wan2.1 (T2V 1.3B and 14B) ships umt5-xxl's encoder: the defaults above.
    @classmethod
    def umt5_xxl(cls, **overrides) -> "UMT5Config":
        return cls(**overrides)


def relative_position_bucket(relative_position: Any, num_buckets: int, max_distance: int,
                             bidirectional: bool = True) -> np.ndarray:
    """T5 bucket of `relative_position = key_pos - query_pos` (static integer array, numpy).

    Bidirectional: half the buckets for j > i. Within a half of n buckets, |r| < n/2 maps to
    itself and larger |r| to n/2 + trunc(log(|r| / (n/2)) / log(max_distance / (n/2)) * n/2),
    clipped to n - 1; computed in float32 as transformers/mesh-tensorflow do. Positions are
    static (sequence lengths), so the table is a trace-time constant.
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    # only |r| >= max_exact uses the log; max(., 1) keeps it finite where it is discarded
    ratio = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
    ratio = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + ratio.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class RMSNorm(nnx.Module):
    """T5 LayerNorm: w * x * rsqrt(mean(x^2) + eps), statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(param_init(nnx.initializers.ones, "norm")(jax.random.key(0), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight.get_value().astype(jnp.float32) * y).astype(self.dtype)


def _dense(rngs: nnx.Rngs, d_in: int, d_out: int, std: float, axes: tuple, cfg: UMT5Config) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      precision=None, kernel_init=param_init(nnx.initializers.normal(std), *axes), rngs=rngs)


class UMT5SelfAttention(nnx.Module):
    """Bidirectional self-attention with this layer's own relative-position bias table."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        # Mesh-TensorFlow initialisation (q absorbs the missing 1/sqrt(d_kv) scale)
        self.q = _dense(rngs, cfg.d_model, inner, (cfg.d_model * cfg.d_kv) ** -0.5, ("embed", "heads"), cfg)
        self.k = _dense(rngs, cfg.d_model, inner, cfg.d_model ** -0.5, ("embed", "heads"), cfg)
        self.v = _dense(rngs, cfg.d_model, inner, cfg.d_model ** -0.5, ("embed", "heads"), cfg)
        self.o = _dense(rngs, inner, cfg.d_model, inner ** -0.5, ("heads", "embed"), cfg)
        self.relative_attention_bias = nnx.Param(
            param_init(nnx.initializers.normal(cfg.d_model ** -0.5), None, None)(
                rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype))

    def position_bias(self, length: int) -> jax.Array:
        """(1, heads, length, length) additive bias B[bucket(j - i)]."""
        pos = np.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance, bidirectional=True)
        table = self.relative_attention_bias.get_value().astype(self.cfg.dtype)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        shape = (b, s, self.cfg.num_heads, self.cfg.d_kv)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, mask=key_mask, bias=self.position_bias(s), scale=1.0,
                        implementation=self.cfg.attention_implementation)
        return self.o(out.reshape(b, s, -1))


class UMT5FeedForward(nnx.Module):
    """Wo(act(Wi_0 x) * Wi_1 x) (gated) or Wo(act(Wi x))."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[cfg.activation]
        std_in = cfg.d_model ** -0.5
        if cfg.is_gated:
            self.wi_0 = _dense(rngs, cfg.d_model, cfg.d_ff, std_in, ("embed", "mlp"), cfg)
            self.wi_1 = _dense(rngs, cfg.d_model, cfg.d_ff, std_in, ("embed", "mlp"), cfg)
        else:
            self.wi = _dense(rngs, cfg.d_model, cfg.d_ff, std_in, ("embed", "mlp"), cfg)
        self.wo = _dense(rngs, cfg.d_ff, cfg.d_model, cfg.d_ff ** -0.5, ("mlp", "embed"), cfg)
        self.gated = cfg.is_gated

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class UMT5Layer(nnx.Module):
    """Pre-norm residual block: h + Attn(RMSNorm(h)), then + FF(RMSNorm(h))."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        self.attn_norm = norm()
        self.attn = UMT5SelfAttention(cfg, rngs=rngs)
        self.ff_norm = norm()
        self.ff = UMT5FeedForward(cfg, rngs=rngs)

    def __call__(self, h: jax.Array, key_mask: jax.Array) -> jax.Array:
        """`h` is the float32 residual stream."""
        h = h + self.attn(self.attn_norm(h), key_mask).astype(jnp.float32)
        return h + self.ff(self.ff_norm(h)).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
    """`UMT5EncoderModel`: (ids (B, S) int, mask (B, S) 0/1) -> last hidden state (B, S, d_model)."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = nnx.Embed(
            config.vocab_size, config.d_model, dtype=config.dtype, param_dtype=config.param_dtype,
            embedding_init=param_init(nnx.initializers.normal(1.0), "vocab", "embed"), rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> UMT5Layer:
            return UMT5Layer(config, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=config.dtype,
                                  param_dtype=config.param_dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        key_mask = attention_mask.astype(jnp.bool_)
        h = self.shared(input_ids).astype(jnp.float32)
        graphdef, stacked = nnx.split(self.layers)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, key_mask), None

        if self.config.remat:
            body = jax.checkpoint(body)
        h, _ = jax.lax.scan(body, h, stacked)
        return self.final_norm(h)


def seq_lengths(mask: jax.Array) -> jax.Array:
    """Number of valid tokens per row: sum(mask > 0), as WanPipeline's `seq_lens`."""
    return jnp.sum(jnp.asarray(mask) > 0, axis=1)


def prompt_embeddings(model: UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """`text_embeddings` inside a traced function (no checks, no jit of its own): encoder(ids, mask),
    zeroed past each row's length."""
    hidden = model(ids, mask)
    keep = jnp.arange(ids.shape[1])[None, :] < seq_lengths(mask)[:, None]
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))


@jax.jit
def _text_embeddings(graphdef, state, ids, mask):
    return prompt_embeddings(nnx.merge(graphdef, state), ids, mask)


def text_embeddings(model: UMT5Encoder, ids: Any, mask: Any) -> tuple[jax.Array, jax.Array]:
    """Prompt embeddings as diffusers' `WanPipeline._get_t5_prompt_embeds` builds them.

    With L_b = sum(mask_b > 0): out[b, :L_b] = encoder(ids, mask)[b, :L_b] and
    out[b, L_b:] = 0 (the pipeline keeps the first L_b rows and re-pads with zeros).
    Returns (embeddings (B, S, d_model) in the compute dtype, mask (B, S) int32).
    """
    ids = jnp.asarray(ids, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"ids {ids.shape} and mask {mask.shape} must both be (batch, length)")
    graphdef, state = nnx.split(model)
    return _text_embeddings(graphdef, state, ids, mask), mask
