"""The demo pipeline, reduced (tests/multihost_config.py), as 2 processes x 4 CPU devices equals 1 process x 8.

generate -> label -> train_reward -> score -> pairs -> train_dpo run once as one process with 8
devices (`python -m halo_jax.main`) and once as two processes with 4 devices each on 127.0.0.1
(`launch/local.sh 2 4`, gloo collectives), side by side. Both runs must give the same rollouts,
labels, scores (float tolerance), pairs and patch maps, and the same reward-model and DPO train
losses up to float32 reduction order. `evaluate` is left out: its multi-host path (each process
samples its share, process 0 merges) is `generate`'s, and another sampler compile per process
would double the test's cost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from halo_jax.data.label_store import read_labels
from halo_jax.data.stores import StoreReader
from halo_jax.train.metrics import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tests/multihost_config.py"
TIMEOUT_S = 1200
# Same maths on both layouts; cross-process reductions (gradients, losses) may sum in another
# order, and 2 optimiser steps carry that into the next losses: float32 tolerance.
RTOL, ATOL = 1e-4, 1e-5
TRAIN_LOGS = ("reward/phase1", "reward/phase2", "dpo")
# Not compared: wall-clock stamps, and the DPO implicit accuracies (acc_video, acc_patch), which are
# signs of d(w) - d(l) ~ 1e-9 while the LoRA adapters are still ~0 (2 warm-up steps): float noise.
# The continuous metrics (losses, d, margins, e, gaps, grad norm) are compared with RTOL/ATOL.
UNCOMPARED = ("step", "time", "wall_time", "acc_video", "acc_patch")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **extra}


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:  # own session: a timeout kills the launcher's children too
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, what: str) -> None:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        logs = [log, *sorted(log.parent.glob("logs/process_*.log"))]
        tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs
                          if p.exists())
        pytest.fail(f"{what} exited with status {proc.returncode}\n{tails}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(workdir of 1 process x 8 devices, workdir of 2 processes x 4 devices), run concurrently."""
    one, two = tmp_path_factory.mktemp("one_x8"), tmp_path_factory.mktemp("two_x4")
    args = [f"--config={CONFIG}"]
    single = _start([sys.executable, "-m", "halo_jax.main", *args, f"--workdir={one}"],
                    _env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), one / "run.log")
    multi = _start(["bash", "launch/local.sh", "2", "4", *args, f"--workdir={two}"],
                   _env(PYTHON=sys.executable, GRACE="5"), two / "run.log")
    _finish(single, one / "run.log", "1 process x 8 devices")
    _finish(multi, two / "run.log", "2 processes x 4 devices (launch/local.sh)")
    return one, two


def _records(store: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    reader = StoreReader(store)
    return {rid: {k: v for k, v in reader.get(rid).items() if k not in skip} for rid in reader.ids()}


def test_rollouts_and_labels_are_identical(runs):
    one, two = runs
    a, b = _records(one / "rollouts"), _records(two / "rollouts")
    assert len(a) == 8 and sorted(a) == sorted(b)
    for vid in a:
        for key in ("prompt", "prompt_index", "sample_index", "seed"):
            assert a[vid][key] == b[vid][key], (vid, key)
        np.testing.assert_array_equal(b[vid]["frames"], a[vid]["frames"], err_msg=vid)
        np.testing.assert_allclose(b[vid]["latents"], a[vid]["latents"], rtol=RTOL, atol=ATOL, err_msg=vid)
    la = sorted(read_labels(one / "labels"), key=lambda r: r["video_id"])
    lb = sorted(read_labels(two / "labels"), key=lambda r: r["video_id"])
    assert [r["video_id"] for r in la] == sorted(a)
    assert la == lb


def test_train_losses_match(runs):
    one, two = runs
    for log in TRAIN_LOGS:
        ma, mb = read_metrics(one / log / "metrics.jsonl"), read_metrics(two / log / "metrics.jsonl")
        assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2], log
        for ra, rb in zip(ma, mb):
            assert "loss" in ra and set(ra) == set(rb), log
            for key, value in ra.items():
                if isinstance(value, (int, float)) and key not in UNCOMPARED:
                    np.testing.assert_allclose(rb[key], value, rtol=RTOL, atol=ATOL, err_msg=f"{log} step "
                                               f"{ra['step']} {key}")


def test_scores_and_pairs_match(runs):
    one, two = runs
    sa, sb = _records(one / "scores"), _records(two / "scores")
    assert len(sa) == 8 and sorted(sa) == sorted(sb)
    for vid in sa:
        for key in ("video_scores", "patch_scores", "reward"):
            np.testing.assert_allclose(sb[vid][key], sa[vid][key], rtol=RTOL, atol=ATOL, err_msg=f"{vid} {key}")
    pa, pb = _records(one / "pairs"), _records(two / "pairs")
    assert pa and sorted(pa) == sorted(pb)
    for pid in pa:
        assert (pa[pid]["winner_id"], pa[pid]["loser_id"]) == (pb[pid]["winner_id"], pb[pid]["loser_id"])
        np.testing.assert_array_equal(pb[pid]["s"], pa[pid]["s"], err_msg=pid)
        np.testing.assert_allclose(pb[pid]["a"], pa[pid]["a"], rtol=RTOL, atol=ATOL, err_msg=pid)
    assert any(np.any(p["s"] != 0) for p in pa.values()), "no active patch: the patch maps test nothing"
    summary = [json.loads((w / "pairs" / "summary.json").read_text()) for w in runs]
    assert summary[0]["grid"] == summary[1]["grid"]
    for w in runs:
        assert (w / "dpo_ckpt" / "model_index.json").exists()
