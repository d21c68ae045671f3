"""Per-device memory of the train steps under FSDP (`--config.mode=fsdp`): compile only, nothing runs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m halo_jax.bench --config=configs/bench_small.py --config.mode=fsdp [--out=F.json]

For each size N of `fsdp.sizes` (mesh data=1, fsdp=N, tensor=1 on the first N devices) and each
step of `fsdp.kinds`:

    sft       flow-matching SFT, full fine-tuning: params + AdamW moments (3 copies) + batch
    dpo_full  Gran-DPO, full fine-tuning: params + AdamW moments + the frozen reference copy + batch
    dpo_lora  Gran-DPO, LoRA: adapters + their moments + the frozen base + batch

the compiled program's memory analysis gives the bytes ONE device holds. Parameters shard their
`embed` dimension over fsdp (logical rules), the batch its leading axis over ('data', 'fsdp'), so
argument bytes fall ~1/N; what stays replicated (1-D norms and biases, dimensions the axis does
not divide) sets the floor. `config.batch` must divide by 2·max(N) (the DPO batch is batch/2 pairs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from halo_jax.align.dpo_step import make_dpo_step
from halo_jax.benchmarks.config import dpo_loss_config, latent_shape, lora_config, make_batches, model_config, optimizer
from halo_jax.benchmarks.levers import abstract_state
from halo_jax.benchmarks.memory import compile_for_memory, compiled_memory
from halo_jax.benchmarks.model import build_model
from halo_jax.benchmarks.steps import make_sft_step
from halo_jax.diffusion import FlowMatching
from halo_jax.models import lora as lora_lib
from halo_jax.parallel.logical_axes import BATCH_AXES
from halo_jax.parallel.mesh import make_mesh
from halo_jax.train.state import init_train_state, pure

FSDP_KINDS = ("sft", "dpo_full", "dpo_lora")


def _abstract_batch(batch_np: dict, sharding) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch_np.items()}


def _compile(c: ConfigDict, kind: str, mesh, model, tx, sft_np: dict, dpo_np: dict) -> tuple:
    """(compiled step program of `kind`, parameter count) from abstract state and batch."""
    if kind == "sft":
        step, params, shardings = make_sft_step(model, tx, mesh, FlowMatching())
        bsh = NamedSharding(mesh, P(BATCH_AXES))
        shapes = jax.eval_shape(lambda p: init_train_state(p, tx, 0), pure(params))
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
        compiled = compile_for_memory(step.lower(state, _abstract_batch(sft_np, bsh)))
        return compiled, sum(int(x.size) for x in jax.tree.leaves(params))
    mode = "lora" if kind == "dpo_lora" else "full"
    if mode == "lora":
        lora_lib.apply_lora(model, lora_config(c), key=0)
    dpo = make_dpo_step(model, FlowMatching(), dpo_loss_config(c), tx, mesh, mode=mode)
    batch = _abstract_batch(dpo._check_batch(dpo_np), dpo.batch_sharding)
    compiled = compile_for_memory(dpo.jitted.lower(abstract_state(dpo), batch, dpo.frozen, dpo.reference))
    return compiled, sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def step_memory(c: ConfigDict, kind: str, size: int, log: Callable[[str], None] = print) -> dict:
    """Compiled memory (per device) of step `kind` on a data=1, fsdp=`size`, tensor=1 mesh."""
    if kind not in FSDP_KINDS:
        raise ValueError(f"config.fsdp.kinds has unknown step kind {kind!r}; choose from {FSDP_KINDS}")
    if size > jax.device_count():
        raise ValueError(f"fsdp size {size} needs {size} devices, {jax.device_count()} available; on CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={size}")
    cfg = model_config(c)
    shape = latent_shape(c, cfg)
    mesh = make_mesh({"data": 1, "fsdp": size, "tensor": 1}, devices=jax.devices()[:size])
    sft_np, dpo_np = make_batches(c, cfg, shape)
    model = build_model(cfg, mesh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled, n_params = _compile(c, kind, mesh, model, optimizer(c), sft_np, dpo_np)
    row = {"kind": kind, "fsdp": size, "params": n_params, "memory": compiled_memory(compiled),
           "compile_s": time.perf_counter() - t0}
    log(f"  {kind} fsdp={size}: argument {row['memory']['argument_bytes'] / 1e6:.2f} MB per device")
    return row


def run_fsdp(c: ConfigDict, log: Callable[[str], None] = print) -> dict:
    """Every (kind, size) of `c.fsdp`; each row gains `argument_vs_first` (its argument bytes / the first size's)."""
    sizes: Sequence[int] = tuple(int(s) for s in c.fsdp.sizes)
    kinds = [k.strip() for k in str(c.fsdp.kinds).split(",") if k.strip()]
    b = int(c.batch)
    if b % (2 * max(sizes)):
        raise ValueError(f"config.batch={b} must divide by 2*max(fsdp.sizes)={2 * max(sizes)} (the DPO steps shard "
                         f"batch/2 pairs over the fsdp devices)")
    rows = []
    for kind in kinds:
        first = None
        for size in sizes:
            row = step_memory(c, kind, size, log)
            first = first or row
            row["argument_vs_first"] = row["memory"]["argument_bytes"] / first["memory"]["argument_bytes"]
            rows.append(row)
    return {"setup": {"sizes": list(sizes), "kinds": kinds, "batch": b, "dtype": str(jnp.dtype(c.model.fields.get(
        "param_dtype", "float32")))}, "fsdp": rows}


def format_fsdp_table(report: dict) -> str:
    rows = [("step", "fsdp", "arg MB/device", "x first", "ideal 1/N", "out MB", "temp MB", "total MB")]
    first = report["setup"]["sizes"][0]
    for r in report["fsdp"]:
        m = r["memory"]
        rows.append((r["kind"], str(r["fsdp"]), f"{m['argument_bytes'] / 1e6:.3f}", f"{r['argument_vs_first']:.3f}",
                     f"{first / r['fsdp']:.3f}", f"{m['output_bytes'] / 1e6:.3f}", f"{m['temp_bytes'] / 1e6:.3f}",
                     f"{m['total_bytes'] / 1e6:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
