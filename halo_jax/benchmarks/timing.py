"""Wall-clock timing of jitted steps: device-synchronised, compile excluded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax


def time_steps(run: Callable[[], Any], steps: int, warmup: int,
               sync: Callable[[Any], Any] = jax.block_until_ready) -> list[float]:
    """Wall seconds of `steps` calls of `run` after `warmup` calls, each ended by `sync` of its output
    (`block_until_ready`; a synchronous framework, e.g. PyTorch on the CPU, passes `lambda out: out`)."""
    for _ in range(warmup):
        sync(run())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - t0)
    return times


def time_program(compiled: Any, args: tuple, advance: Callable[[Any, tuple], tuple], steps: int,
                 warmup: int) -> list[float]:
    """`time_steps` of `compiled(*args)`, the arguments of each call being `advance(out, args)` of the
    previous one (e.g. the donated train state carried along: `lambda out, a: (out[0], *a[1:])`)."""
    holder = {"args": args}

    def run():
        out = compiled(*holder["args"])
        holder["args"] = advance(out, holder["args"])
        return out

    return time_steps(run, steps, warmup)
