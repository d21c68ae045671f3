r"""Analytic FLOPs of the Wan DiT steps, XLA's own count, and the per-chip peak (for MFU).

One DiT forward on one video (N tokens, L text tokens, width d, FFN width f):

    linear    = 2·[N·(p·C_in·d + L_blocks·(4d² + 2d² + 2·d·f) + d·p·C_out)     per-token projections
                   + L·(text_dim·d + d² + L_blocks·2d²)                        text MLP, cross-attn k/v
                   + freq·d + d² + 6d²]                                        timestep MLP
    attention = L_blocks·(4·N²·d + 4·N·L·d)                                    QKᵀ and AV, self + cross
    lora      = Σ_adapters 2·tokens·r·(d_in + d_out)

A backward pass costs 2x its forward for the linear maps with trainable weights (input and
weight gradients), 1x for frozen-weight linears (input gradient only) and 2x for attention:

    sft                 3·(linear + attention)                                  per video
    dpo, LoRA           ref fwd + policy fwd + bwd = 3·linear + 4·attention + 3·lora
    dpo, full           4·(linear + attention)
    sample (CFG)        2·(linear + attention)

Element-wise work (norms, RoPE, modulation, softmax, the optimizer) is not counted: XLA's count
exceeds the analytic one by that much (large on tiny models, a few % at Wan scale).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from halo_jax.benchmarks.config import KINDS, num_tokens
from halo_jax.models import lora as lora_lib
from halo_jax.models.wan import WanTransformerConfig

# Dense bf16 peak FLOP/s per chip (vendor figures; H100/H200: SXM). Matched as substrings of
# `device.device_kind` (lower-cased), first match wins, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("tpu v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
)


def dit_flops(cfg: WanTransformerConfig, shape: tuple[int, int, int, int], text_len: int,
              lora_shapes: list[tuple[str, int, int, int]] = ()) -> dict[str, float]:
    """Forward FLOPs of the DiT on ONE video (module docstring): {"linear", "attention", "lora"}.

    `lora_shapes`: (module path, d_in, rank, d_out) per adapter (stacked layers counted per layer).
    """
    n, lt, d, f = num_tokens(cfg, shape), int(text_len), cfg.inner_dim, cfg.ffn_dim
    nl, pv = cfg.num_layers, cfg.patch_volume
    per_token = pv * cfg.in_channels * d + nl * (4 * d * d + 2 * d * d + 2 * d * f) + d * pv * cfg.out_channels
    per_text = cfg.text_dim * d + d * d + nl * 2 * d * d
    per_video = cfg.freq_dim * d + d * d + 6 * d * d
    linear = 2.0 * (n * per_token + lt * per_text + per_video)
    attention = float(nl * (4 * n * n * d + 4 * n * lt * d))
    lora = 0.0
    for path, din, r, dout in lora_shapes:
        tokens = lt if path.endswith(("attn2.to_k", "attn2.to_v")) else n
        lora += 2.0 * tokens * r * (din + dout)
    return {"linear": linear, "attention": attention, "lora": lora}


def step_flops(kind: str, fwd: dict[str, float], videos: int, lora: bool, cfg_guidance: bool = True) -> float:
    """Analytic FLOPs of one step of `kind` over `videos` videos (module docstring)."""
    lin, att, lo = fwd["linear"], fwd["attention"], fwd["lora"]
    if kind == "sft":
        per = 3 * (lin + att)
    elif kind in ("diffusion_dpo", "gran_dpo"):
        per = 3 * lin + 4 * att + 3 * lo if lora else 4 * (lin + att)
    elif kind == "sample":
        per = (2 if cfg_guidance else 1) * (lin + att)
    else:
        raise ValueError(f"unknown step kind {kind!r}; one of {KINDS}")
    return videos * per


def lora_shapes(model: nnx.Module) -> list[tuple[str, int, int, int]]:
    """(module path, d_in, rank, d_out) of every LoRA adapter of `model`, once per stacked layer."""
    out = []
    for path, m in lora_lib.lora_modules(model):
        a, b = m.lora_a.shape, m.lora_b.shape
        layers = math.prod(a[:-2])
        out += [(path, a[-2], a[-1], b[-1])] * layers
    return out


def xla_flops(compiled: Any) -> float:
    """XLA's FLOP count of a compiled program (`cost_analysis()["flops"]`, per device); -1 if absent."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", -1.0))


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
    """Per-chip peak FLOP/s: `override` if > 0, else the bf16 table by `device_kind`, else None (CPU)."""
    if override and override > 0:
        return float(override)
    kind = device.device_kind.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key in kind:
            return value
    return None
