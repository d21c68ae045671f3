"""Benchmark of the Wan DiT steps: `python -m halo_jax.bench --config=configs/bench_tiny.py [--out=F.json]
[--compare_torch] [--config.a.b=value ...]`.

This module is the entry point: flags, dispatch on `--config.mode`, the table and the JSON report.
What each mode measures lives in `halo_jax/benchmarks/`:

    steps    `steps.py`: time, tokens/s, XLA and analytic FLOPs (`flops.py`, with the formulas), MFU and
             compiled memory of the SFT, Diffusion-DPO, Gran-DPO and CFG-sampling steps;
             `--compare_torch` adds the PyTorch reference (`torch_ref.py`)
    levers   `levers.py`: the memory levers of the DPO step
    fsdp     `fsdp.py`: per-device memory against the fsdp size

The config schema (`configs/bench_*.py`) is `halo_jax/benchmarks/config.py`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from halo_jax.benchmarks import fsdp, levers
from halo_jax.benchmarks.config import MODES
from halo_jax.benchmarks.steps import run_steps
from halo_jax.benchmarks.torch_ref import torch_in_subprocess
from halo_jax.io import atomic_write_text


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
        if compare_torch:
            raise ValueError(f"--compare_torch compares the step benchmark; it does not apply to config.mode={mode!r}")
        runner, fmt = (levers.run_levers, levers.format_levers_table) if mode == "levers" else \
            (fsdp.run_fsdp, fsdp.format_fsdp_table)
        report = {"machine": machine(), "mode": mode, **runner(c, log)}
        return _finish(report, fmt(report), out, log)
    report = {"machine": machine(), "mode": mode, **run_steps(c, log)}
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
        atomic_write_text(out, json.dumps(report, indent=2, default=str))
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
