"""Memory levers of the Gran-DPO step, each one switch, each measured (`--config.mode=levers`).

    python -m halo_jax.bench --config=configs/bench_small.py --config.mode=levers [--out=F.json]

Every lever is the baseline with one change; the baseline is the config's model as a LoRA Gran-DPO
step (reference = adapters off, no weight copy) on `batch/2` pairs in one micro-batch, with the
model options remat="none", scan_layers=False, float32 compute and weights:

    baseline            as above
    remat_full          per-block remat, nothing saved (recompute the block in the backward)
    remat_dots          per-block remat saving matmul outputs (`dots_saveable`)
    remat_dots_nobatch  ... saving only matmuls without batch dims (`dots_with_no_batch_dims_saveable`)
    scan                blocks stacked and run by `nnx.scan` (no remat)
    scan_remat_full     scan + remat "full"
    full_ft             full fine-tuning: AdamW moments for every weight + a frozen reference copy
    grad_accum          `levers.grad_accum` micro-batches at the same global batch
    bf16_compute        bf16 compute, float32 master weights (the optimizer and adapters stay float32)
    bf16_params         bf16 compute and a bf16 frozen base (float32 LoRA adapters)

Each is compiled (and timed over `levers.steps` steps when > 0; with 0 steps compiled for memory only,
`memory.compile_for_memory`: same bytes, shorter compile); the table gives the compiled
argument / output / temp bytes per device and their total (memory.py). A last row measures what
precomputing the text embeddings saves: the umT5 encoder (`levers.text_encoder`) compiled on the
same batch's prompts (its weights are arguments the step would otherwise hold, its forward is
time the step would otherwise spend), and `setup.umt5_xxl` gives the parameter bytes of the
umT5-XXL encoder Wan uses (never materialised: shapes only).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from halo_jax.align.dpo_step import make_dpo_step
from halo_jax.benchmarks.config import (FP32_UNROLLED, bench_mesh, dpo_loss_config, latent_shape, lora_config,
                                        make_batches, model_config, num_tokens, optimizer)
from halo_jax.benchmarks.memory import compile_for_memory, compiled_memory
from halo_jax.benchmarks.model import build_model
from halo_jax.benchmarks.timing import time_program, time_steps
from halo_jax.diffusion import FlowMatching
from halo_jax.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class Lever:
    name: str
    description: str
    model: dict = dataclasses.field(default_factory=dict)  # WanTransformerConfig overrides
    mode: str = "lora"
    accumulate: bool = False


LEVERS: tuple[Lever, ...] = (
    Lever("baseline", "LoRA ref (adapters off), fp32, no remat, unrolled, 1 micro-batch"),
    Lever("remat_full", "remat='full' per block", {"remat": "full"}),
    Lever("remat_dots", "remat='dots_saveable' per block", {"remat": "dots_saveable"}),
    Lever("remat_dots_nobatch", "remat='dots_with_no_batch_dims_saveable'", {"remat": "dots_with_no_batch_dims_saveable"}),
    Lever("scan", "scan_layers=True", {"scan_layers": True}),
    Lever("scan_remat_full", "scan_layers=True + remat='full'", {"scan_layers": True, "remat": "full"}),
    Lever("full_ft", "full fine-tune + frozen reference copy", mode="full"),
    Lever("grad_accum", "gradient accumulation (levers.grad_accum micro-batches)", accumulate=True),
    Lever("bf16_compute", "bf16 compute, fp32 master weights", {"dtype": "bfloat16", "param_dtype": "float32"}),
    Lever("bf16_params", "bf16 compute + bf16 frozen base (fp32 adapters)", {"dtype": "bfloat16", "param_dtype": "bfloat16"}),
)
LEVER_NAMES = tuple(lv.name for lv in LEVERS)
BASE_OPTIONS = FP32_UNROLLED  # the baseline's model options; each lever changes some of them


def _selected(c: ConfigDict) -> list[Lever]:
    names = [n.strip() for n in str(c.levers.get("names", "") or "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(LEVER_NAMES))
    if unknown:
        raise ValueError(f"config.levers.names has unknown levers {unknown}; choose from {LEVER_NAMES}")
    return [lv for lv in LEVERS if not names or lv.name in names]


def _timed(compiled: Any, args: tuple, steps: int, warmup: int) -> float | None:
    """Median seconds of `steps` runs after `warmup`, the donated state carried along; None if steps = 0."""
    if steps <= 0:
        return None
    return float(np.median(time_program(compiled, args, lambda out, a: (out[0], *a[1:]), steps, warmup)))


def abstract_state(dpo: Any) -> Any:
    """The DPO step's state as sharded `ShapeDtypeStruct`s (lowering for the memory analysis needs no buffers)."""
    shapes = jax.eval_shape(lambda: dpo.init_state(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, dpo.shardings)


def measure_lever(c: ConfigDict, lever: Lever, mesh: jax.sharding.Mesh, dpo_np: dict,
                  log: Callable[[str], None] = print) -> dict:
    """Compile (and optionally time) the Gran-DPO step with `lever` applied; one result row."""
    cfg = model_config(c).replace(**{**BASE_OPTIONS, **lever.model})
    model = build_model(cfg, mesh)
    if lever.mode == "lora":
        lora_lib.apply_lora(model, lora_config(c), key=0)
    k = int(c.levers.grad_accum) if lever.accumulate else 1
    dpo = make_dpo_step(model, FlowMatching(), dpo_loss_config(c), optimizer(c), mesh, mode=lever.mode, grad_accum=k)
    batch = jax.device_put(dpo._check_batch(dpo_np), dpo.batch_sharding)
    steps, warmup = int(c.levers.steps), int(c.levers.warmup)
    state = dpo.init_state(0) if steps > 0 else abstract_state(dpo)
    t0 = time.perf_counter()
    # The context mesh lets shard_map kernels (splash attention) split per device. Models are built
    # outside it: nnx.eval_shape under a mesh would read the logical names as mesh axes.
    with jax.set_mesh(mesh):
        lowered = dpo.jitted.lower(state, batch, dpo.frozen, dpo.reference)
        compiled = lowered.compile() if steps > 0 else compile_for_memory(lowered)
        compile_s = time.perf_counter() - t0
        time_s = _timed(compiled, (state, batch, dpo.frozen, dpo.reference), steps, warmup)
    trainable = sum(int(x.size) for x in jax.tree.leaves(dpo.params))
    row = {"lever": lever.name, "description": lever.description, "model_options": {**BASE_OPTIONS, **lever.model},
           "mode": lever.mode, "grad_accum": k, "trainable_params": trainable,
           "memory": compiled_memory(compiled), "compile_s": compile_s, "time_s": time_s}
    log(f"  {lever.name}: total {row['memory']['total_bytes'] / 1e6:.1f} MB"
        + (f", {time_s * 1e3:.1f} ms" if time_s else "") + f" (compile {compile_s:.1f} s)")
    return row


def _umt5_config(c: ConfigDict):
    from halo_jax.models.text.umt5 import UMT5Config

    fields = dict(c.levers.text_encoder)
    return UMT5Config(**fields)


def _param_bytes(ctor: Callable[[], nnx.Module]) -> tuple[int, int]:
    """(parameter count, bytes) of a module from its shapes alone (`nnx.eval_shape`)."""
    leaves = jax.tree.leaves(nnx.state(nnx.eval_shape(ctor), nnx.Param))
    return (sum(math.prod(x.shape) for x in leaves),
            sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))


def measure_text_encoder(c: ConfigDict, mesh: jax.sharding.Mesh, prompts: int,
                         log: Callable[[str], None] = print) -> dict:
    """The umT5 encoder forward on `prompts` prompts of `text_len` tokens: compiled memory, time."""
    from halo_jax.models.text.umt5 import UMT5Encoder
    from halo_jax.parallel.sharding import create_sharded

    ucfg = _umt5_config(c)
    model = create_sharded(lambda: UMT5Encoder(ucfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, ucfg.vocab_size, size=(prompts, int(c.text_len))), jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    t0 = time.perf_counter()
    steps = int(c.levers.steps)
    with jax.set_mesh(mesh):
        lowered = fn.lower(state, ids, mask)
        compiled = lowered.compile() if steps > 0 else compile_for_memory(lowered)
        compile_s = time.perf_counter() - t0
        time_s = float(np.median(time_steps(lambda: compiled(state, ids, mask), steps, int(c.levers.warmup)))) \
            if steps > 0 else None
    n, nbytes = _param_bytes(lambda: UMT5Encoder(ucfg, rngs=nnx.Rngs(0)))
    row = {"lever": "text_encoder_in_step", "description": f"umT5 forward on {prompts} prompts (saved by precomputing)",
           "model_options": {k: (jnp.dtype(v).name if k.endswith("dtype") else v)
                             for k, v in dataclasses.asdict(ucfg).items()},
           "mode": "forward", "grad_accum": 1, "trainable_params": 0, "encoder_params": n, "encoder_param_bytes": nbytes,
           "memory": compiled_memory(compiled), "compile_s": compile_s, "time_s": time_s}
    log(f"  text encoder: {n / 1e6:.1f}M params, total {row['memory']['total_bytes'] / 1e6:.1f} MB"
        + (f", {time_s * 1e3:.1f} ms" if time_s else ""))
    return row


def run_levers(c: ConfigDict, log: Callable[[str], None] = print) -> dict:
    """Every selected lever (and the text encoder row when `levers.text_encoder_row`): {"setup", "levers"}."""
    from halo_jax.models.text.umt5 import UMT5Config, UMT5Encoder

    cfg = model_config(c)
    shape = latent_shape(c, cfg)
    levers = _selected(c)
    pairs = int(c.batch) // 2
    k = int(c.levers.grad_accum)
    if any(lv.accumulate for lv in levers) and (k < 2 or pairs % k):
        raise ValueError(f"config.levers.grad_accum={k} must be >= 2 and divide the {pairs} pairs of config.batch="
                         f"{c.batch}; use a batch of 2*k*m videos")
    mesh = bench_mesh(c)
    _, dpo_np = make_batches(c, cfg, shape)
    log(f"levers: model {c.model.preset} {dataclasses.asdict(cfg)['num_layers']} layers width {cfg.inner_dim}, "
        f"latents {shape} ({num_tokens(cfg, shape)} tokens), {pairs} pairs, mesh {dict(mesh.shape)}")
    rows = [measure_lever(c, lv, mesh, dpo_np, log) for lv in levers]
    if bool(c.levers.get("text_encoder_row", True)):
        rows.append(measure_text_encoder(c, mesh, pairs, log))
    xxl_n, xxl_bytes = _param_bytes(lambda: UMT5Encoder(UMT5Config.umt5_xxl(param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0)))
    setup = {"model": dataclasses.asdict(cfg), "latent_shape": list(shape), "tokens_per_video": num_tokens(cfg, shape),
             "pairs": pairs, "text_len": int(c.text_len), "mesh": {a: int(v) for a, v in mesh.shape.items()},
             "lora": c.lora.to_dict(), "steps": int(c.levers.steps),
             "umt5_xxl": {"params": xxl_n, "bf16_bytes": xxl_bytes}}
    return {"setup": setup, "levers": rows}


def format_levers_table(report: dict) -> str:
    """One fixed-width table: per lever the compiled MB (per device), the ratio of the total to the
    baseline's, the time (when timed) and the trainable parameters."""
    rows = [("lever", "arg MB", "out MB", "alias MB", "temp MB", "total MB", "x base", "time ms", "trainable")]
    base = next((r for r in report["levers"] if r["lever"] == "baseline"), None)
    for r in report["levers"]:
        m = r["memory"]
        ratio = m["total_bytes"] / base["memory"]["total_bytes"] if base else None
        rows.append((r["lever"], *(f"{m[k] / 1e6:.1f}" for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                                                  "temp_bytes", "total_bytes")),
                     f"{ratio:.2f}" if ratio else "-", f"{r['time_s'] * 1e3:.1f}" if r["time_s"] else "-",
                     f"{r['trainable_params']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    xxl = report["setup"].get("umt5_xxl")
    if xxl:
        lines.append(f"umT5-XXL (Wan's text encoder): {xxl['params'] / 1e9:.2f}B params, "
                     f"{xxl['bf16_bytes'] / 1e9:.2f} GB in bf16 — not held by the step when embeddings are precomputed")
    return "\n".join(lines)
