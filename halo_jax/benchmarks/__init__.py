"""Benchmark modes beside the step benchmark of `halo_jax.bench` (`--config.mode=...`):

    levers   `levers.py`: the memory levers of the DPO step, each a switch, each measured
    fsdp     `fsdp.py`:   per-device compiled argument bytes of the SFT/DPO steps vs the fsdp size

Both read the compiled executable's memory analysis (`compiled_memory`); nothing here asserts speed.
"""

from halo_jax.benchmarks.memory import compiled_memory, total_bytes

__all__ = ["compiled_memory", "total_bytes"]
