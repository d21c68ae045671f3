"""Test-wide setup: 8 forced CPU devices (set before JAX is imported), float32, few threads."""

import os

# XLA:CPU aborts a process whose devices reach a collective more than 60 s apart (a 20 s warning, then
# 40 s more). The suite runs several 8-device JAX processes at once on 2 cores, where one device's
# threads can be starved that long: wait up to 10 minutes (the tests' own timeouts catch a real hang).
# Flags already in XLA_FLAGS come after these defaults, so they win. Test subprocesses inherit them
# (tests/test_demo.py, launch/local.sh and tests/toy_train.py add their own device count last).
PATIENT_COLLECTIVES = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
                       "--xla_cpu_collective_call_terminate_timeout_seconds=600")
_flags = os.environ.get("XLA_FLAGS", "")
if PATIENT_COLLECTIVES not in _flags:  # pytest-xdist workers inherit the controller's, already set
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {PATIENT_COLLECTIVES} {_flags}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(2)
except ImportError:  # parity tests skip themselves without torch
    pass


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one test module: a stage run again in the same process (a resumed
    run) builds new jitted functions, and their programs come from the cache instead of the compiler."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    old_dir = jax.config.jax_compilation_cache_dir
    old_min = jax.config.jax_persistent_cache_min_compile_time_secs
    cc.reset_cache()
    cc.set_cache_dir(str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    cc.set_cache_dir(old_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    cc.reset_cache()
