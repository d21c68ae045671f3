r"""Benchmark of the Wan DiT steps: `python -m halo_jax.bench --config=configs/bench_tiny.py [--out=F.json]
[--compare_torch] [--config.a.b=value ...]`.

`--config.mode` picks what is measured: "steps" (this module, below), "levers" (the memory levers of
the DPO step, `halo_jax/benchmarks/levers.py`) or "fsdp" (per-device memory against the fsdp size,
`halo_jax/benchmarks/fsdp.py`).

Step kinds, on one batch of `config.batch` videos (latents (C, F, H, W), text (text_len, text_dim)):

    sft            flow-matching SFT step: `denoising_loss` through `make_train_step`, full FT, AdamW
    diffusion_dpo  `make_dpo_step` with patch_weight = 0 on batch/2 pairs (LoRA mode unless lora.enabled=False)
    gran_dpo       the same with patch_weight = dpo.patch_weight > 0 (patch term: pooling of the same errors)
    sample         one CFG denoiser evaluation + Euler update: `guided_prediction` on the doubled batch

Per kind: median wall time of `steps` device-synchronised steps after `warmup` (compile excluded),
tokens/s = N·batch / time (N = latent tokens after patching, batch = videos processed per step),
XLA FLOPs (`compiled.cost_analysis()["flops"]`), the analytic FLOPs (`dit_flops` below), MFU =
analytic FLOPs / (time · peak · devices), and the compiled memory (argument, output, temp bytes).

Analytic FLOPs of one DiT forward on one video (N tokens, L text tokens, width d, FFN width f):

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

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict, config_flags

from halo_jax.align.dpo_step import make_dpo_step
from halo_jax.align.gran_dpo import GranDPOConfig
from halo_jax.diffusion import FlowMatching
from halo_jax.diffusion.samplers import guided_prediction
from halo_jax.models import lora as lora_lib
from halo_jax.models.wan import WanTransformer3D, WanTransformerConfig
from halo_jax.models.wan.transformer import apply_transformer
from halo_jax.parallel.logical_axes import BATCH_AXES
from halo_jax.parallel.mesh import make_mesh
from halo_jax.parallel.sharding import state_shardings
from halo_jax.train.objectives import denoising_loss
from halo_jax.train.state import init_train_state, make_train_step, pure, split_model, train_state_shardings

KINDS = ("sft", "diffusion_dpo", "gran_dpo", "sample")
MODES = ("steps", "levers", "fsdp")  # config.mode: this module's step benchmark, or halo_jax/benchmarks/*
PRESETS = ("tiny", "wan2_1_t2v_1_3b", "wan2_1_t2v_14b", "custom")
WAN_VAE_STRIDES = (4, 8, 8)  # pixel -> latent (frames causal: F = (frames - 1)/4 + 1)
WAN_LATENT_CHANNELS = 16
# Dense bf16 peak FLOP/s per chip (vendor figures; H100/H200: SXM). Matched as substrings of
# `device.device_kind` (lower-cased), first match wins, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("tpu v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
)
FIELDS = ("time_s", "time_min_s", "tokens_per_s", "xla_flops", "analytic_flops", "xla_over_analytic",
          "mfu", "memory")
# Every WanTransformerConfig field may be overridden from config.model.fields.
_MODEL_FIELDS = {f.name for f in dataclasses.fields(WanTransformerConfig)}


# ----------------------------------------------------------------------------- config -> objects


def model_config(c: ConfigDict) -> WanTransformerConfig:
    """`c.model.preset` (one of PRESETS; "custom" = the dataclass defaults) with `c.model.fields` on top."""
    preset = c.model.preset
    if preset not in PRESETS:
        raise ValueError(f"config.model.preset={preset!r} is not one of {PRESETS}")
    fields = dict(c.model.get("fields", {}) or {})
    unknown = sorted(set(fields) - _MODEL_FIELDS)
    if unknown:
        raise ValueError(f"config.model.fields has unknown keys {unknown}; WanTransformerConfig fields are "
                         f"{sorted(_MODEL_FIELDS)}")
    if "patch_size" in fields:
        fields["patch_size"] = tuple(fields["patch_size"])
    if preset == "custom":
        return WanTransformerConfig(**fields)
    return getattr(WanTransformerConfig, preset)(**fields)


def latent_shape(c: ConfigDict, cfg: WanTransformerConfig) -> tuple[int, int, int, int]:
    """(C, F, H, W): `video.space="latent"` takes frames/height/width as latent sizes; "pixel" maps
    them through the Wan VAE strides 4x8x8 (F = (frames - 1)/4 + 1) with 16 latent channels."""
    v = c.video
    if v.space == "latent":
        return cfg.in_channels, int(v.frames), int(v.height), int(v.width)
    if v.space != "pixel":
        raise ValueError(f"config.video.space must be 'latent' or 'pixel', got {v.space!r}")
    st, sh, sw = WAN_VAE_STRIDES
    if (v.frames - 1) % st or v.height % sh or v.width % sw:
        raise ValueError(f"pixel video {v.frames}x{v.height}x{v.width} does not fit the Wan VAE strides "
                         f"{WAN_VAE_STRIDES}: frames must be 4k+1, height and width multiples of 8")
    if cfg.in_channels != WAN_LATENT_CHANNELS:
        raise ValueError(f"video.space='pixel' means Wan VAE latents ({WAN_LATENT_CHANNELS} channels), but the "
                         f"model has in_channels={cfg.in_channels}; use video.space='latent'")
    return WAN_LATENT_CHANNELS, (v.frames - 1) // st + 1, v.height // sh, v.width // sw


def num_tokens(cfg: WanTransformerConfig, shape: tuple[int, int, int, int]) -> int:
    _, f, h, w = shape
    pt, ph, pw = cfg.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent (F, H, W) = {(f, h, w)} is not divisible by patch_size {cfg.patch_size}")
    return (f // pt) * (h // ph) * (w // pw)


# ----------------------------------------------------------------------------- analytic FLOPs


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


def _lora_shapes(model: nnx.Module) -> list[tuple[str, int, int, int]]:
    out = []
    for path, m in lora_lib.lora_modules(model):
        a, b = m.lora_a.shape, m.lora_b.shape
        layers = math.prod(a[:-2])
        out += [(path, a[-2], a[-1], b[-1])] * layers
    return out


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
    """Per-chip peak FLOP/s: `override` if > 0, else the bf16 table by `device_kind`, else None (CPU)."""
    if override and override > 0:
        return float(override)
    kind = device.device_kind.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key in kind:
            return value
    return None


# ----------------------------------------------------------------------------- model building


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


# ----------------------------------------------------------------------------- timing


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {"argument_bytes": -1, "output_bytes": -1, "temp_bytes": -1, "alias_bytes": -1}
    return {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}


def _xla_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", -1.0))


def time_steps(run: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Wall seconds of `steps` calls of `run` after `warmup` calls, each ended by `block_until_ready`."""
    for _ in range(warmup):
        jax.block_until_ready(run())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return times


def _result(times: list[float], compiled: Any, analytic: float, tokens: int, peak: float | None,
            devices: int, compile_s: float) -> dict:
    med = statistics.median(times)
    xla = _xla_flops(compiled)
    return {
        "time_s": med, "time_min_s": min(times), "tokens_per_s": tokens / med, "xla_flops": xla,
        "analytic_flops": analytic, "xla_over_analytic": xla * devices / analytic if xla > 0 else None,
        "mfu": analytic / (med * peak * devices) if peak else None, "memory": _memory(compiled),
        "compile_s": compile_s, "steps": len(times),
    }


# ----------------------------------------------------------------------------- the JAX steps


def _batches(c: ConfigDict, cfg: WanTransformerConfig, shape: tuple[int, ...], seed: int = 0) -> tuple[dict, dict]:
    """(SFT batch of `batch` videos, DPO batch of `batch/2` pairs) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    b = int(c.batch)
    if b < 2 or b % 2:
        raise ValueError(f"config.batch={b} must be an even number >= 2 (the DPO steps take batch/2 pairs)")
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    sft = {"latents": f32(b, *shape), "text": f32(b, c.text_len, cfg.text_dim)}
    pairs = b // 2
    grid = tuple(c.dpo.grid)
    dpo = {"latents_w": f32(pairs, *shape), "latents_l": f32(pairs, *shape),
           "text_embeds": f32(pairs, c.text_len, cfg.text_dim),
           "s": rng.choice(np.array([-1.0, 1.0], np.float32), size=(pairs, *grid)),
           "a": np.ones((pairs, *grid), np.float32)}
    return sft, dpo


def _tx(c: ConfigDict) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(c.learning_rate, weight_decay=1e-4))


def bench_jax(c: ConfigDict, log: Callable[[str], None] = print) -> dict:
    """Run every kind of `c.kinds` on the JAX side; returns {"setup": ..., "results": {kind: fields}}."""
    cfg = model_config(c)
    shape = latent_shape(c, cfg)
    kinds = [k.strip() for k in c.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"config.kinds has unknown step kinds {bad}; choose from {KINDS}")
    mesh_sizes = {k: v for k, v in c.mesh.items() if k != "devices"}
    n_dev = int(c.mesh.get("devices", 0) or 0)
    mesh = make_mesh(mesh_sizes, devices=jax.devices()[:n_dev] if n_dev > 0 else None)
    devices = mesh.devices.size
    peak = peak_flops(jax.devices()[0], c.peak_flops)
    tokens = num_tokens(cfg, shape) * int(c.batch)
    flow = FlowMatching()
    sft_np, dpo_np = _batches(c, cfg, shape)
    bsh = NamedSharding(mesh, P(BATCH_AXES))
    results: dict[str, dict] = {}

    model = build_model(cfg, mesh)
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    fwd_plain = dit_flops(cfg, shape, c.text_len)
    log(f"model {c.model.preset}: {n_params / 1e6:.3f}M params, latents {shape}, {num_tokens(cfg, shape)} tokens "
        f"per video, batch {c.batch}, text_len {c.text_len}, dtype {cfg.dtype}, mesh {dict(mesh.shape)}")

    def measure(kind: str, jitted, args: tuple, advance: Callable[[Any, tuple], tuple], analytic: float) -> None:
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        holder = {"args": args}

        def run():
            out = compiled(*holder["args"])
            holder["args"] = advance(out, holder["args"])
            return out

        times = time_steps(run, c.steps, c.warmup)
        results[kind] = _result(times, compiled, analytic, tokens, peak, devices, compile_s)
        log(f"  {kind}: {results[kind]['time_s'] * 1e3:.1f} ms (compile {compile_s:.1f} s)")
        del compiled, holder

    with jax.set_mesh(mesh):  # explicit shardings everywhere; the context mesh is for shard_map kernels (splash)
        if "sft" in kinds:
            tx = _tx(c)
            graphdef, params, frozen = split_model(model)
            shardings = train_state_shardings(params, tx, mesh)
            loss = lambda m, batch, key: denoising_loss(m, batch, key, diffusion=flow)  # noqa: E731
            step = make_train_step(graphdef, frozen, loss, tx, shardings, bsh)
            state = jax.jit(lambda p: init_train_state(jax.tree.map(jnp.copy, p), tx, 0),
                            out_shardings=shardings)(pure(params))
            batch = jax.device_put(sft_np, bsh)
            measure("sft", step, (state, batch), lambda out, a: (out[0], a[1]),
                    step_flops("sft", fwd_plain, int(c.batch), lora=False))
            del state, step

        if "sample" in kinds:
            graphdef, params = nnx.split(model)
            b = int(c.batch)

            def sample_step(p, x, t, t_next, text, neg):
                v = guided_prediction(lambda q, xx, tt, cc: apply_transformer(graphdef, q, xx, tt, cc), p, x, t,
                                      text, neg, c.guidance_scale)
                ds = (t_next - t)[:, None, None, None, None] / flow.num_train_timesteps
                return (x.astype(jnp.float32) + ds * v).astype(x.dtype)

            x = jax.device_put(sft_np["latents"], bsh)
            text = jax.device_put(sft_np["text"], bsh)
            neg = jax.device_put(np.zeros_like(sft_np["text"]), bsh)
            t = jax.device_put(np.full((b,), 900.0, np.float32), bsh)
            t_next = jax.device_put(np.full((b,), 880.0, np.float32), bsh)
            args = (params, x, t, t_next, text, neg)
            measure("sample", jax.jit(sample_step), args, lambda out, a: (a[0], out, *a[2:]),
                    step_flops("sample", fwd_plain, b, lora=False))

        dpo_kinds = [k for k in kinds if k in ("diffusion_dpo", "gran_dpo")]
        if dpo_kinds:
            use_lora = bool(c.lora.enabled)
            if use_lora:
                lcfg = lora_lib.LoRAConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha))
                lora_lib.apply_lora(model, lcfg, key=0)
            fwd = dit_flops(cfg, shape, c.text_len, _lora_shapes(model) if use_lora else [])
            for kind in dpo_kinds:
                weight = 0.0 if kind == "diffusion_dpo" else float(c.dpo.patch_weight)
                if kind == "gran_dpo" and not weight > 0:
                    raise ValueError("config.dpo.patch_weight must be > 0 for the gran_dpo step")
                loss_cfg = GranDPOConfig(beta=float(c.dpo.beta), patch_weight=weight, grid=tuple(c.dpo.grid))
                dpo = make_dpo_step(model, flow, loss_cfg, _tx(c), mesh, mode="lora" if use_lora else "full")
                batch_np = dict(dpo_np) if weight > 0 else {k: v for k, v in dpo_np.items() if k not in ("s", "a")}
                batch = jax.device_put(dpo._check_batch(batch_np), dpo.batch_sharding)
                state = dpo.init_state(0)
                measure(kind, dpo.jitted, (state, batch, dpo.frozen, dpo.reference),
                        lambda out, a: (out[0], *a[1:]),
                        step_flops(kind, fwd, int(c.batch), lora=use_lora))
                del state, dpo

    setup = {
        "model": {"preset": c.model.preset, **dataclasses.asdict(cfg)}, "params": n_params,
        "latent_shape": list(shape), "tokens_per_video": num_tokens(cfg, shape), "batch": int(c.batch),
        "text_len": int(c.text_len), "steps": int(c.steps), "warmup": int(c.warmup),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": int(devices), "lora": c.lora.to_dict(),
        "dpo": c.dpo.to_dict(), "peak_flops_per_device": peak, "forward_flops_per_video": fwd_plain,
        # XLA's cost analysis counts a while-loop body once: with scan_layers, xla_flops covers ~1 block.
        "xla_flops_count_scan_body_once": bool(cfg.scan_layers),
    }
    return {"setup": setup, "results": results}


# ----------------------------------------------------------------------------- the PyTorch reference


def bench_torch(c: ConfigDict, threads: int, log: Callable[[str], None] = print) -> dict:
    """The SFT step and the Diffusion-DPO step in PyTorch (diffusers `WanTransformer3DModel`, same
    config, batch, AdamW); DPO with LoRA adapters on the same targets (reference = adapters off) when
    `lora.enabled`, else a frozen copy of the model as the reference."""
    import copy

    import torch
    from diffusers import WanTransformer3DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config(c)
    shape = latent_shape(c, cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    dcfg = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    model = WanTransformer3DModel(**dcfg)
    if dtype != torch.float32:
        model = model.to(dtype)
    sft_np, dpo_np = _batches(c, cfg, shape)
    T = 1000.0
    results: dict[str, dict] = {}

    def fm(x0, noise, t):
        s = (t / T).view(-1, 1, 1, 1, 1)
        return ((1 - s) * x0 + s * noise).to(dtype), noise - x0

    def forward(m, x, t, text):
        return m(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0].float()

    def sft_step(m, opt, batch):
        x0, text = batch
        b = x0.shape[0]
        t = torch.rand(b) * T
        noise = torch.randn_like(x0)
        x_t, target = fm(x0, noise, t)
        loss = ((forward(m, x_t, t, text.to(dtype)) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return loss

    def timed(step):
        for _ in range(c.warmup):
            step()
        times = []
        for _ in range(c.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times

    tokens = num_tokens(cfg, shape) * int(c.batch)
    if "sft" in c.kinds:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=c.learning_rate, weight_decay=1e-4)
        batch = (torch.from_numpy(sft_np["latents"]), torch.from_numpy(sft_np["text"]))
        times = timed(lambda: sft_step(m, opt, batch))
        results["sft"] = {"time_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times)}
        log(f"  torch sft: {results['sft']['time_s'] * 1e3:.1f} ms")
        del m, opt

    if "diffusion_dpo" in c.kinds:
        policy = copy.deepcopy(model)
        if c.lora.enabled:
            adapters = _torch_lora(policy, int(c.lora.rank), float(c.lora.alpha))
            params = [p for a in adapters for p in (a.lora_a, a.lora_b)]

            def reference(x, t, text):
                for a in adapters:
                    a.enabled = False
                try:
                    return forward(policy, x, t, text)
                finally:
                    for a in adapters:
                        a.enabled = True
        else:
            ref = copy.deepcopy(model).requires_grad_(False)
            params = list(policy.parameters())
            reference = lambda x, t, text: forward(ref, x, t, text)  # noqa: E731
        opt = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=1e-4)
        w, l = torch.from_numpy(dpo_np["latents_w"]), torch.from_numpy(dpo_np["latents_l"])
        text = torch.from_numpy(dpo_np["text_embeds"]).to(dtype)
        beta = float(c.dpo.beta)

        def dpo_step():
            pairs = w.shape[0]
            t = torch.rand(pairs) * T
            noise = torch.randn_like(w)
            x0 = torch.stack([w, l], 1).flatten(0, 1)
            t2, n2, c2 = t.repeat_interleave(2), noise.repeat_interleave(2, 0), text.repeat_interleave(2, 0)
            x_t, target = fm(x0, n2, t2)
            with torch.no_grad():
                e_ref = ((reference(x_t, t2, c2) - target) ** 2).mean(dim=(1, 2, 3, 4)).view(pairs, 2)
            e = ((forward(policy, x_t, t2, c2) - target) ** 2).mean(dim=(1, 2, 3, 4)).view(pairs, 2)
            d = (e[:, 0] - e_ref[:, 0]) - (e[:, 1] - e_ref[:, 1])
            loss = -torch.nn.functional.logsigmoid(-beta * d).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss

        times = timed(dpo_step)
        results["diffusion_dpo"] = {"time_s": statistics.median(times),
                                    "tokens_per_s": tokens / statistics.median(times)}
        log(f"  torch diffusion_dpo: {results['diffusion_dpo']['time_s'] * 1e3:.1f} ms")
    return {"threads": threads, "torch_version": torch.__version__, "results": results}


def torch_in_subprocess(c: ConfigDict, threads: int, log: Callable[[str], None] = print) -> dict:
    """`bench_torch` in a fresh Python process: torch's default CPU state, with no XLA thread pool or
    floating-point flags left over from the JAX side; its JSON comes back on the last stdout line."""
    import subprocess

    code = ("import json, sys; from ml_collections import ConfigDict; from halo_jax.bench import bench_torch; "
            "a = json.loads(sys.stdin.read()); "
            "r = bench_torch(ConfigDict(a['config']), a['threads'], log=lambda m: print(m, file=sys.stderr)); "
            "print(json.dumps(r))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps({"config": c.to_dict(), "threads": threads}),
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the PyTorch reference benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("  torch "):
            log(line)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_lora(model: Any, rank: int, alpha: float) -> list[Any]:
    """Wrap the Linear layers matching `lora.WAN_TARGETS` (diffusers names: attn1.to_out.0 ...) with
    `y = base(x) + (alpha/r)·(x A) B`, A ~ U(±1/√d_in), B = 0; freeze everything else."""
    import fnmatch

    import torch

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base, self.enabled, self.scale = base, True, alpha / rank
            bound = 1.0 / math.sqrt(base.in_features)
            self.lora_a = torch.nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))
            self.lora_b = torch.nn.Parameter(torch.zeros(rank, base.out_features))

        def forward(self, x):
            y = self.base(x)
            if not self.enabled:
                return y
            return y + ((x @ self.lora_a.to(x.dtype)) @ self.lora_b.to(x.dtype)) * self.scale

    model.requires_grad_(False)
    ours = {"to_out.0": "to_out", "ffn.net.0.proj": "ffn.proj_in", "ffn.net.2": "ffn.proj_out"}
    adapters = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not name.startswith("blocks."):
            continue
        mapped = name
        for theirs, mine in ours.items():
            mapped = mapped.replace(theirs, mine)
        if not any(fnmatch.fnmatchcase(mapped, p) for p in lora_lib.WAN_TARGETS):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = LoRA(module)
        parent._modules[attr] = adapter
        adapters.append(adapter)
    if not adapters:
        raise RuntimeError("no torch Linear matched lora.WAN_TARGETS; the diffusers module names changed")
    return adapters


# ----------------------------------------------------------------------------- report


def format_table(report: dict) -> str:
    """A fixed-width table of the JAX results (and the torch ratios when present)."""
    rows = [("step", "time ms", "tok/s", "XLA GFLOP", "anal. GFLOP", "xla/anal", "MFU", "arg MB", "out MB",
             "temp MB", "torch ms", "ours/torch")]
    torch_res = (report.get("torch") or {}).get("results", {})
    for kind, r in report["results"].items():
        m = r["memory"]
        tr = torch_res.get(kind)
        rows.append((kind, f"{r['time_s'] * 1e3:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['xla_flops'] / 1e9:.3f}",
                     f"{r['analytic_flops'] / 1e9:.3f}",
                     f"{r['xla_over_analytic']:.2f}" if r["xla_over_analytic"] else "n/a",
                     f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a",
                     f"{m['argument_bytes'] / 1e6:.2f}", f"{m['output_bytes'] / 1e6:.2f}",
                     f"{m['temp_bytes'] / 1e6:.2f}", f"{tr['time_s'] * 1e3:.2f}" if tr else "-",
                     f"{r['time_s'] / tr['time_s']:.2f}" if tr else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = -1
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
            "nproc": os.cpu_count(), "cpu": cpu, "ram_bytes": ram, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def run(c: ConfigDict, compare_torch: bool = False, out: str | None = None,
        log: Callable[[str], None] = print) -> dict:
    """The whole benchmark of `c.mode` ("steps": the JAX kinds, optionally the torch reference;
    "levers": halo_jax/benchmarks/levers.py; "fsdp": halo_jax/benchmarks/fsdp.py); writes JSON to `out`."""
    mode = str(c.get("mode", "steps"))
    if mode not in MODES:
        raise ValueError(f"config.mode={mode!r} is not one of {MODES}")
    if mode != "steps":
        from halo_jax.benchmarks import fsdp, levers

        if compare_torch:
            raise ValueError(f"--compare_torch compares the step benchmark; it does not apply to config.mode={mode!r}")
        runner, fmt = (levers.run_levers, levers.format_levers_table) if mode == "levers" else \
            (fsdp.run_fsdp, fsdp.format_fsdp_table)
        report = {"machine": machine(), "mode": mode, **runner(c, log)}
        return _finish(report, fmt(report), out, log)
    report = {"machine": machine(), "mode": mode, **bench_jax(c, log)}
    if compare_torch:
        threads = int(c.torch_threads) if c.torch_threads > 0 else os.cpu_count()
        report["torch"] = torch_in_subprocess(c, threads, log)
        report["ratio_ours_over_torch"] = {k: report["results"][k]["time_s"] / v["time_s"]
                                           for k, v in report["torch"]["results"].items() if k in report["results"]}
    return _finish(report, format_table(report), out, log)


def _finish(report: dict, table: str, out: str | None, log: Callable[[str], None]) -> dict:
    log(table)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2, default=str)
        log(f"wrote {out}")
    return report


def define_flags() -> tuple:
    """The command-line flags, defined only when run as a program (importing the module defines none,
    so it can live beside `halo_jax.main`, which owns `--config`, in one process)."""
    return (config_flags.DEFINE_config_file("config", None, "Benchmark config (configs/bench_*.py)."),
            flags.DEFINE_string("out", None, "Write the JSON report here."),
            flags.DEFINE_bool("compare_torch", False, "Also time the PyTorch reference (diffusers) and print ratios."))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/bench_tiny.py is required")
    try:
        run(_CONFIG.value, compare_torch=_TORCH.value, out=_OUT.value)
    except ValueError as e:
        print(f"halo_jax.bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _CONFIG, _OUT, _TORCH = define_flags()
    app.run(main)
