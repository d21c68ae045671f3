"""What `python -m halo_jax.bench` measures (`bench.py` is the entry point: flags, dispatch, report).

    config.py     the benchmark config schema (`bench_config`) and what it builds: model config,
                  latent shape, mesh, batches, optimizer, LoRA and DPO loss configs
    model.py      the DiT with cheap weights on a mesh (no random-init compile)
    steps.py      mode "steps": time, FLOPs, MFU and memory of the SFT / DPO / sampling steps
    flops.py      the analytic FLOP count (formulas), XLA's count, the per-chip peak table
    torch_ref.py  the PyTorch reference of mode "steps" (`--compare_torch`)
    levers.py     mode "levers": the memory levers of the DPO step, each a switch, each measured
    fsdp.py       mode "fsdp": per-device compiled argument bytes of the SFT/DPO steps vs the fsdp size
    memory.py     the compiled executable's memory analysis (`compiled_memory`)
    timing.py     device-synchronised wall-clock timing (`time_steps`, `time_program`)

Nothing here asserts speed.
"""

from halo_jax.benchmarks.memory import compiled_memory, total_bytes

__all__ = ["compiled_memory", "total_bytes"]
