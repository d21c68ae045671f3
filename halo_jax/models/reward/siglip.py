"""SigLIP vision and text towers in flax.nnx, numerically equal to transformers `SiglipModel`.

Layout (param paths mirror the transformers module names, so the key table in
`siglip_params.py` is one line per tensor):

    vision_model: embeddings.{patch_embedding, position_embedding}
                  encoder.layers (stacked over the `layers` axis, run by `lax.scan`)
                  post_layernorm, head (multihead-attention pooling, optional)
    text_model:   embeddings.{token_embedding, position_embedding}
                  encoder.layers (stacked), final_layer_norm, head (linear)
    logit_scale, logit_bias

Encoder layer (pre-LN):  x = x + Attn(LN1(x));  x = x + MLP(LN2(x)),
MLP(x) = fc2(act(fc1(x))) with act = GELU-tanh for SigLIP.
Pooled outputs: vision = MAP head(probe attends over the last hidden state);
text = head(last_hidden_state[:, -1]) (the last token, padding or not, as transformers).
`SiglipModel` logits: logits_per_text = exp(logit_scale) * t_hat @ v_hat^T + logit_bias with
L2-normalised pooled embeddings.

Images are channels-last: (B, H, W, C), already normalised (SigLIP: (x - 0.5) / 0.5).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from halo_jax.config import dataclass_from_dict
from halo_jax.models.attention import attention
from halo_jax.parallel.sharding import param_init

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation named by a transformers `hidden_act` string."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------- configs


def _square(value: Any, name: str) -> int:
    """transformers allows int | [h, w] for image/patch size; SigLIP's position table needs a square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value!r}: only square sizes are supported (SigLIP's position table is square)")
        value = value[0]
    return int(value)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers `SiglipVisionConfig` fields that define the network."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        activation(self.hidden_act)

    @property
    def grid(self) -> int:
        """Patch tokens per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @classmethod
    def from_transformers_config(cls, config: dict) -> SiglipVisionConfig:
        kw = dict(config)
        for key in ("image_size", "patch_size"):
            if key in kw:
                kw[key] = _square(kw[key], key)
        return dataclass_from_dict(cls, kw, unknown="ignore")  # a transformers config.json has more keys

    def to_transformers_config(self) -> dict:
        return {"model_type": "siglip_vision_model", **dataclasses.asdict(self)}

    @classmethod
    def tiny(cls, **overrides: Any) -> SiglipVisionConfig:
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=4)
        return cls(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
    """transformers `SiglipTextConfig` fields that define the network (+ token ids, kept for export)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    projection_size: int | None = None
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.projection_size is None:
            object.__setattr__(self, "projection_size", self.hidden_size)
        activation(self.hidden_act)

    @classmethod
    def from_transformers_config(cls, config: dict) -> SiglipTextConfig:
        return dataclass_from_dict(cls, config, unknown="ignore")

    def to_transformers_config(self) -> dict:
        return {"model_type": "siglip_text_model", **dataclasses.asdict(self)}

    @classmethod
    def tiny(cls, **overrides: Any) -> SiglipTextConfig:
        kw = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
        return cls(**{**kw, **overrides})


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """transformers `SiglipConfig`: both towers."""

    vision: SiglipVisionConfig = SiglipVisionConfig()
    text: SiglipTextConfig = SiglipTextConfig()

    def __post_init__(self):
        if self.text.projection_size != self.vision.hidden_size:
            raise ValueError(f"text projection_size {self.text.projection_size} must equal vision hidden_size "
                             f"{self.vision.hidden_size} (image and text embeddings are compared by a dot product)")

    @classmethod
    def from_transformers_config(cls, config: dict) -> SiglipConfig:
        kind = config.get("model_type", "siglip")
        if kind != "siglip":
            raise ValueError(f"expected a SiglipModel config (model_type 'siglip'), got model_type {kind!r}; "
                             "pass the folder of a full SigLIP checkpoint (vision and text towers)")
        return cls(vision=SiglipVisionConfig.from_transformers_config(config.get("vision_config") or {}),
                   text=SiglipTextConfig.from_transformers_config(config.get("text_config") or {}))

    def to_transformers_config(self) -> dict:
        vision = self.vision.to_transformers_config()
        text = self.text.to_transformers_config()
        return {"model_type": "siglip", "architectures": ["SiglipModel"], "initializer_factor": 1.0,
                "vision_config": vision, "text_config": text}

    @classmethod
    def tiny(cls) -> SiglipConfig:
        return cls(vision=SiglipVisionConfig.tiny(), text=SiglipTextConfig.tiny())


# ----------------------------------------------------------------------------- building blocks


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
          dtype: Dtype = None, param_dtype: Dtype = jnp.float32, use_bias: bool = True,
          kernel_init: Callable = nnx.initializers.lecun_normal()) -> nnx.Linear:
    """nnx.Linear with logical axes: kernel `names`, bias the output axis."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=param_init(kernel_init, *names), bias_init=param_init(nnx.initializers.zeros, names[1]),
                      rngs=rngs)


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32) -> nnx.LayerNorm:
    """LayerNorm with the exact two-pass variance (matches torch)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
                         scale_init=param_init(nnx.initializers.ones, "norm"),
                         bias_init=param_init(nnx.initializers.zeros, "norm"), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/out projections (SiglipAttention).

    `context` defaults to `x` (self-attention); with a context it is cross-attention. `mask`:
    (B, S_kv) key padding or broadcastable to (B, heads, S_q, S_kv), True = attend.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, rngs: nnx.Rngs,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 kernel_init: Callable = nnx.initializers.lecun_normal(), attention_impl: str = "xla"):
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.heads, self.attention_impl = heads, attention_impl
        ctx = context_dim or dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init)
        self.q_proj = dense(dim, dim, ("embed", "heads"), **kw)
        self.k_proj = dense(ctx, dim, ("embed", "heads"), **kw)
        self.v_proj = dense(ctx, dim, ("embed", "heads"), **kw)
        self.out_proj = dense(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        out = attention(split(self.q_proj(x)), split(self.k_proj(context)), split(self.v_proj(context)), mask=mask,
                        implementation=self.attention_impl)
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class MLP(nnx.Module):
    """fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32):
        self.act = activation(act)
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + Attn(LN1 x), then + MLP(LN2 x)."""

    def __init__(self, dim: int, hidden: int, heads: int, act: str, eps: float, *, rngs: nnx.Rngs,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, attention_impl: str = "xla"):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = layer_norm(dim, eps, **kw)
        self.self_attn = Attention(dim, heads, attention_impl=attention_impl, **kw)
        self.layer_norm2 = layer_norm(dim, eps, **kw)
        self.mlp = MLP(dim, hidden, act, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask)
        return x + self.mlp(self.layer_norm2(x))


def stacked(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module | None:
    """`n` independently initialised copies of `make(rngs)`, params stacked on a leading `layers` axis;
    None for n = 0 (a stack of zero layers would hold zero-size arrays, which orbax refuses to save)."""
    if n < 0:
        raise ValueError(f"a layer stack needs n >= 0 layers, got {n}")
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def scan_layers(layers: nnx.Module | None, x: jax.Array, *args: Any, frozen: int = 0, remat: bool = False) -> jax.Array:
    """x <- layer_i(x, *args) for each layer of a stacked module, by `lax.scan` (one compile per depth);
    x itself for a stack of zero layers (None).

    The first `frozen` layers run under `stop_gradient` (no backward pass through them).
    """
    if layers is None:
        return x
    graphdef, state = nnx.split(layers)
    depth = jax.tree.leaves(state)[0].shape[0]

    def body(h, layer_state):
        return nnx.merge(graphdef, layer_state)(h, *args), None

    if remat:
        body = jax.checkpoint(body, prevent_cse=False)

    def run(h, lo, hi):
        if hi <= lo:
            return h
        part = jax.tree.map(lambda a: a[lo:hi], state)
        return jax.lax.scan(body, h, part)[0]

    frozen = max(0, min(frozen, depth))
    if frozen:
        x = jax.lax.stop_gradient(run(jax.lax.stop_gradient(x), 0, frozen))
    return run(x, frozen, depth)


class Encoder(nnx.Module):
    """`num_layers` stacked `EncoderLayer`s; with 0 layers the identity (no parameters)."""

    def __init__(self, num_layers: int, dim: int, hidden: int, heads: int, act: str, eps: float, *,
                 rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, attention_impl: str = "xla"):
        def make(r: nnx.Rngs) -> EncoderLayer:
            return EncoderLayer(dim, hidden, heads, act, eps, rngs=r, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl)

        self.layers = stacked(num_layers, make, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, frozen: int = 0, remat: bool = False) -> jax.Array:
        return scan_layers(self.layers, x, mask, frozen=frozen, remat=remat)


class TowerOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, S, D) after the final layer norm
    pooled: jax.Array | None  # (B, D_out)


# ----------------------------------------------------------------------------- vision


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p)(W/p), p, p, C): the p x p squares in row-major order."""
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p, p, c)


class PatchEmbed(nnx.Module):
    """Conv2d(kernel = stride = p, 'valid') as reshape + matmul: (B, H, W, C) -> (B, (H/p)(W/p), D)."""

    def __init__(self, patch: int, channels: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32,
                 kernel_init: Callable = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)):
        self.patch, self.dtype = patch, dtype
        init = param_init(kernel_init, None, None, None, "embed")
        self.kernel = nnx.Param(init(rngs.params(), (patch, patch, channels, dim), param_dtype))
        self.bias = nnx.Param(param_init(nnx.initializers.zeros, "embed")(rngs.params(), (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = patchify(x, self.patch)
        dtype = self.dtype or x.dtype
        out = jnp.einsum("bnijc,ijcd->bnd", x.astype(dtype), self.kernel[...].astype(dtype))
        return out + self.bias[...].astype(dtype)


class VisionEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.patch_embedding = PatchEmbed(cfg.patch_size, cfg.num_channels, cfg.hidden_size, rngs=rngs, dtype=dtype,
                                          param_dtype=param_dtype)
        self.position_embedding = nnx.Embed(
            cfg.num_patches, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=param_init(nnx.initializers.normal(1.0 / math.sqrt(cfg.hidden_size)), None, "embed"))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixels)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class PackedAttention(nnx.Module):
    """torch.nn.MultiheadAttention (packed q/k/v `in_proj`), as used by SigLIP's pooling head."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.heads = heads
        self.in_proj = dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=nnx.initializers.xavier_uniform())
        self.out_proj = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, query: jax.Array, kv: jax.Array) -> jax.Array:
        dim = query.shape[-1]
        kernel, bias = self.in_proj.kernel[...], self.in_proj.bias[...]
        dtype = self.in_proj.dtype or query.dtype

        def proj(x, i):
            return (x.astype(dtype) @ kernel[:, i * dim:(i + 1) * dim].astype(dtype)
                    + bias[i * dim:(i + 1) * dim].astype(dtype))

        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        out = attention(split(proj(query, 0)), split(proj(kv, 1)), split(proj(kv, 2)))
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class PoolingHead(nnx.Module):
    """Multihead-attention pooling: a learned probe attends over the tokens, then + MLP(LN(.))."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        d = cfg.hidden_size
        self.probe = nnx.Param(param_init(nnx.initializers.xavier_uniform(), None, None, "embed")(
            rngs.params(), (1, 1, d), param_dtype))
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attention = PackedAttention(d, cfg.num_attention_heads, **kw)
        self.layernorm = layer_norm(d, cfg.layer_norm_eps, **kw)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h = self.attention(probe, x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionTower(nnx.Module):
    """transformers `SiglipVisionModel`: pixels (B, H, W, C) at the configured size -> TowerOutput."""

    def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 attention_impl: str = "xla"):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = VisionEmbeddings(cfg, **kw)
        self.encoder = Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                               cfg.hidden_act, cfg.layer_norm_eps, attention_impl=attention_impl, **kw)
        self.post_layernorm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.head = PoolingHead(cfg, **kw) if cfg.vision_use_head else None

    def __call__(self, pixels: jax.Array, *, frozen_layers: int = 0, remat: bool = False,
                 pool: bool = True) -> TowerOutput:
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(
                f"vision tower expects channels-last images (B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}), "
                f"got {pixels.shape}; resize to the configured image_size (position embeddings are not interpolated)")
        x = self.embeddings(pixels)
        x = self.encoder(x, frozen=frozen_layers, remat=remat)
        x = self.post_layernorm(x)
        pooled = self.head(x) if (pool and self.head is not None) else None
        return TowerOutput(x, pooled)


# ----------------------------------------------------------------------------- text


class TextEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         embedding_init=param_init(embed_init, "vocab", "embed"))
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs,
                                            embedding_init=param_init(embed_init, None, "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.token_embedding(ids)
        return x + self.position_embedding.embedding[...][: ids.shape[-1]].astype(x.dtype)[None]


class SiglipTextTower(nnx.Module):
    """transformers `SiglipTextModel`: token ids (B, S) -> TowerOutput (pooled = head(last token))."""

    def __init__(self, cfg: SiglipTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 attention_impl: str = "xla"):
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = TextEmbeddings(cfg, **kw)
        self.encoder = Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                               cfg.hidden_act, cfg.layer_norm_eps, attention_impl=attention_impl, **kw)
        self.final_layer_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.head = dense(cfg.hidden_size, cfg.projection_size, ("embed", None), **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, frozen_layers: int = 0,
                 remat: bool = False) -> TowerOutput:
        """`attention_mask` (B, S) 1 = token, 0 = padding (keys only, as transformers); SigLIP was
        trained on max-length padding without a mask, so the default is None."""
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"text tower expects token ids (B, S) with S <= {cfg.max_position_embeddings}, "
                             f"got shape {input_ids.shape}; pad/truncate to max_position_embeddings")
        x = self.embeddings(input_ids)
        mask = None if attention_mask is None else jnp.asarray(attention_mask) != 0
        x = self.encoder(x, mask, frozen=frozen_layers, remat=remat)
        x = self.final_layer_norm(x)
        return TowerOutput(x, self.head(x[:, -1]))


# ----------------------------------------------------------------------------- both


class SiglipModel(nnx.Module):
    """transformers `SiglipModel`: both towers + `logit_scale`, `logit_bias` (each shape (1,))."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 attention_impl: str = "xla"):
        if not cfg.vision.vision_use_head:
            raise ValueError("SiglipModel needs the vision pooling head (vision_use_head=True) to form image embeddings")
        self.config = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl)
        self.vision_model = SiglipVisionTower(cfg.vision, **kw)
        self.text_model = SiglipTextTower(cfg.text, **kw)
        self.logit_scale = nnx.Param(param_init(nnx.initializers.zeros, None)(rngs.params(), (1,), param_dtype))
        self.logit_bias = nnx.Param(param_init(nnx.initializers.zeros, None)(rngs.params(), (1,), param_dtype))

    def get_image_features(self, pixels: jax.Array) -> jax.Array:
        return self.vision_model(pixels).pooled

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.text_model(input_ids, attention_mask).pooled

    def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> dict:
        """{'logits_per_image' (Bi, Bt), 'logits_per_text' (Bt, Bi), 'image_embeds', 'text_embeds' (L2-normalised)}."""
        img = self.get_image_features(pixels).astype(jnp.float32)
        txt = self.get_text_features(input_ids, attention_mask).astype(jnp.float32)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits_per_text = txt @ img.T * jnp.exp(self.logit_scale[...].astype(jnp.float32)) + self.logit_bias[...].astype(jnp.float32)
        return {"logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text,
                "image_embeds": img, "text_embeds": txt}
