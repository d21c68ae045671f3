"""Compiled memory of a jitted step (XLA's `memory_analysis()` of the executable, per device).

    argument  bytes of the inputs (params, optimizer state, frozen weights, batch) on one device
    output    bytes of the outputs; with the state donated, most of them alias arguments (alias)
    temp      scratch: activations kept for the backward pass, gradients, fusion buffers
    total     argument + output - alias + temp: the live bytes the program needs at its peak
"""

from __future__ import annotations

from typing import Any


def compile_for_memory(lowered: Any) -> Any:
    """`lowered.compile()` for a program that is measured, not run: without the backend's (LLVM) optimisation,
    which changes no buffer of the memory analysis (same figures, measured) and halves a CPU compile."""
    return lowered.compile({"xla_backend_optimization_level": 0})


def compiled_memory(compiled: Any) -> dict[str, int]:
    """{"argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes"} of a compiled program
    (-1 everywhere when the backend gives no analysis)."""
    m = compiled.memory_analysis()
    if m is None:
        return dict.fromkeys(("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes"), -1)
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}
    out["total_bytes"] = total_bytes(out)
    return out


def total_bytes(m: dict[str, int]) -> int:
    return m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
