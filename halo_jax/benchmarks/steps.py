"""The step benchmark (`--config.mode=steps`): time, FLOPs, MFU and compiled memory per step kind.

Step kinds (`config.kinds`), on one batch of `config.batch` videos (latents (C, F, H, W), text
(text_len, text_dim)):

    sft            flow-matching SFT step: `denoising_loss` through `make_train_step`, full FT, AdamW
    diffusion_dpo  `make_dpo_step` with patch_weight = 0 on batch/2 pairs (LoRA mode unless lora.enabled=False)
    gran_dpo       the same with patch_weight = dpo.patch_weight > 0 (patch term: pooling of the same errors)
    sample         one CFG denoiser evaluation + Euler update: `guided_prediction` on the doubled batch

Per kind: median wall time of `steps` device-synchronised steps after `warmup` (compile excluded),
tokens/s = N·batch / time (N = latent tokens after patching, batch = videos processed per step),
XLA FLOPs (`compiled.cost_analysis()["flops"]`), the analytic FLOPs (flops.py), MFU =
analytic FLOPs / (time · peak · devices), and the compiled memory (memory.py).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from halo_jax.align.dpo_step import make_dpo_step
from halo_jax.benchmarks.config import (KINDS, bench_mesh, dpo_loss_config, latent_shape, lora_config, make_batches,
                                        model_config, num_tokens, optimizer)
from halo_jax.benchmarks.flops import dit_flops, lora_shapes, peak_flops, step_flops, xla_flops
from halo_jax.benchmarks.memory import compiled_memory
from halo_jax.benchmarks.model import build_model
from halo_jax.benchmarks.timing import time_program
from halo_jax.diffusion import FlowMatching
from halo_jax.diffusion.samplers import guided_prediction
from halo_jax.models import lora as lora_lib
from halo_jax.models.wan.transformer import apply_transformer
from halo_jax.parallel.logical_axes import BATCH_AXES
from halo_jax.train.objectives import denoising_loss
from halo_jax.train.state import init_train_state, make_train_step, pure, split_model, train_state_shardings

FIELDS = ("time_s", "time_min_s", "tokens_per_s", "xla_flops", "analytic_flops", "xla_over_analytic",
          "mfu", "memory")


def make_sft_step(model: nnx.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                  flow: FlowMatching) -> tuple[Callable, Any, Any]:
    """The benchmarked SFT step: `denoising_loss` through `make_train_step`, full fine-tuning, the batch
    sharded over `BATCH_AXES`. Returns (jitted step, trainable params, train-state shardings)."""
    graphdef, params, frozen = split_model(model)
    shardings = train_state_shardings(params, tx, mesh)
    loss = lambda m, batch, key: denoising_loss(m, batch, key, diffusion=flow)  # noqa: E731
    step = make_train_step(graphdef, frozen, loss, tx, shardings, NamedSharding(mesh, P(BATCH_AXES)))
    return step, params, shardings


def _result(times: list[float], compiled: Any, analytic: float, tokens: int, peak: float | None,
            devices: int, compile_s: float, xla_counts_all: bool) -> dict:
    """One kind's FIELDS. `xla_counts_all`: XLA's count covers the whole program (not so under scan_layers or on
    GPU, see `xla_counts_whole_program`); otherwise xla_over_analytic is None."""
    med = statistics.median(times)
    xla = xla_flops(compiled)
    return {
        "time_s": med, "time_min_s": min(times), "tokens_per_s": tokens / med, "xla_flops": xla,
        "analytic_flops": analytic,
        "xla_over_analytic": xla * devices / analytic if xla > 0 and xla_counts_all else None,
        "mfu": analytic / (med * peak * devices) if peak else None, "memory": compiled_memory(compiled),
        "compile_s": compile_s, "steps": len(times),
    }


def xla_counts_whole_program(scan_layers: bool, platform: str) -> bool:
    """Whether `compiled.cost_analysis()` counts every FLOP of a step: not with scan_layers (a while-loop body is
    counted once) and not on GPU (the cuBLAS GEMMs and cuDNN attention are library calls it does not count:
    measured on an H200, 3.1 of 519 TFLOP for the unrolled Wan-1.3B Gran-DPO step)."""
    return not scan_layers and platform != "gpu"


def run_steps(c: ConfigDict, log: Callable[[str], None] = print) -> dict:
    """Run every kind of `c.kinds` on the JAX side; returns {"setup": ..., "results": {kind: fields}}."""
    cfg = model_config(c)
    shape = latent_shape(c, cfg)
    kinds = [k.strip() for k in c.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"config.kinds has unknown step kinds {bad}; choose from {KINDS}")
    mesh = bench_mesh(c)
    devices = mesh.devices.size
    peak = peak_flops(jax.devices()[0], c.peak_flops)
    counts_all = xla_counts_whole_program(cfg.scan_layers, jax.devices()[0].platform)
    tokens = num_tokens(cfg, shape) * int(c.batch)
    flow = FlowMatching()
    sft_np, dpo_np = make_batches(c, cfg, shape)
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
        times = time_program(compiled, args, advance, c.steps, c.warmup)
        results[kind] = _result(times, compiled, analytic, tokens, peak, devices, compile_s, counts_all)
        log(f"  {kind}: {results[kind]['time_s'] * 1e3:.1f} ms (compile {compile_s:.1f} s)")
        del compiled

    with jax.set_mesh(mesh):  # explicit shardings everywhere; the context mesh is for shard_map kernels (splash)
        if "sft" in kinds:
            tx = optimizer(c)
            step, params, shardings = make_sft_step(model, tx, mesh, flow)
            state = jax.jit(lambda p: init_train_state(jax.tree.map(jnp.copy, p), tx, 0),
                            out_shardings=shardings)(pure(params))
            batch = jax.device_put(sft_np, bsh)
            # The compiled program takes the frozen weights as its third argument (`make_train_step`).
            measure("sft", step.jitted, (state, batch, step.frozen), lambda out, a: (out[0], *a[1:]),
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
                lora_lib.apply_lora(model, lora_config(c), key=0)
            fwd = dit_flops(cfg, shape, c.text_len, lora_shapes(model) if use_lora else [])
            for kind in dpo_kinds:
                weight = 0.0 if kind == "diffusion_dpo" else float(c.dpo.patch_weight)
                if kind == "gran_dpo" and not weight > 0:
                    raise ValueError("config.dpo.patch_weight must be > 0 for the gran_dpo step")
                dpo = make_dpo_step(model, flow, dpo_loss_config(c, weight), optimizer(c), mesh,
                                    mode="lora" if use_lora else "full")
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
        # False under scan_layers (xla_flops covers ~1 block) and on GPU (library calls uncounted)
        "xla_flops_count_whole_program": counts_all,
    }
    return {"setup": setup, "results": results}
