"""The demo (configs/demo.py), reduced (tests/reduced_demo.py): every HALO stage on the shipped tiny Wan
model, run once as 1 process x 8 CPU devices and once as 2 processes x 4 devices, side by side.

- The 1 x 8 run (`python -m halo_jax.main`) is the demo: generate -> label -> train_reward -> score
  -> pairs -> train_dpo (Gran-DPO) -> evaluate (base vs Gran-DPO, HTML report). The demo checks read
  its workdir: each stage's output, that Gran-DPO changed the weights, the metrics and the report.
- The 2 x 4 run (`launch/local.sh 2 4`, 127.0.0.1, gloo collectives) stops after train_dpo (the
  ":multihost" variant: evaluate's multi-host path is generate's). It must give the same rollouts,
  labels, scores (float tolerance), pairs and patch maps as the 1 x 8 run, and the same reward-model
  and DPO train losses up to float32 reduction order.
- When the demo ends, stage `compare` (configs/shapes_halo.py's last stage: Diffusion-DPO and Gran-DPO
  trained on the demo's pairs, evaluated with the base, each variant pooled) runs on one training seed,
  and tests/dpo_probe.py takes 16 Gran-DPO steps on the same pairs, measured before and after.

Both runs are subprocesses with the same environment (so the same compiled per-device programs) and
run concurrently; the full demo is `make demo`. Cross-process reductions sum in another order, so a
frame value may round to the neighbouring grey level (seen on 1 of 27648 values): frames are compared
to one grey level, the oracle's scores of them to 0.05, everything downstream to float32 tolerance.
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

from halo_jax.assets import SHAPES_WAN
from halo_jax.convert.safetensors_io import SafetensorsFolder
from halo_jax.data.label_store import read_labels
from halo_jax.data.stores import StoreReader
from halo_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tests/reduced_demo.py"
TIMEOUT_S = 900
# Same maths on both layouts; cross-process reductions (gradients, losses) may sum in another
# order, and 2 optimiser steps carry that into the next losses: float32 tolerance.
RTOL, ATOL = 1e-4, 1e-5
TRAIN_LOGS = ("reward/phase1", "reward/phase2", "dpo")
# Not compared: wall-clock stamps, and the DPO implicit accuracies (acc_video, acc_patch), which are
# signs of d(w) - d(l) ~ 1e-9 while the LoRA adapters are still ~0 (2 warm-up steps): float noise.
# The continuous metrics (losses, d, margins, e, gaps, grad norm) are compared with RTOL/ATOL.
UNCOMPARED = ("step", "time", "wall_time", "acc_video", "acc_patch")


def _env(devices: int, **extra: str) -> dict:
    """This session's environment without JAX settings; its XLA flags (tests/conftest.py) kept, `devices` last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
            "XLA_FLAGS": flags, **extra}


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:  # own session: a timeout kills the launcher's children too
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _finish(proc: subprocess.Popen, log: Path, what: str) -> None:
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill(proc)
    if proc.returncode != 0:
        logs = [log, *sorted(log.parent.glob("logs/process_*.log"))]
        tails = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]) for p in logs
                          if p.exists())
        pytest.fail(f"{what} exited with status {proc.returncode}\n{tails}")


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Workdirs of the 1 x 8 demo run, of the 2 x 4 run up to train_dpo (run concurrently), and of stage
    `compare` on the demo's pairs, which also holds tests/dpo_probe.py's output (both started when the demo
    finishes)."""
    one, two, cmp = (tmp_path_factory.mktemp(n) for n in ("one_x8", "two_x4", "compare"))
    # One persistent compilation cache: stage compare and the probe start after the demo and reuse the
    # programs it compiled for the same 8 devices (the sampler, the decoder, the reward model, the DPO step).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    # The 2 x 4 run starts first: its process 0 compiles for both processes, the longest chain.
    multi = _start(["bash", "launch/local.sh", "2", "4", f"--config={CONFIG}:multihost", f"--workdir={two}"],
                   {**_env(4, **cache), "PYTHON": sys.executable, "GRACE": "5"}, two / "run.log")
    try:
        single = _start([sys.executable, "-m", "halo_jax.main", f"--config={CONFIG}", f"--workdir={one}"],
                        _env(8, **cache), one / "run.log")
        _finish(single, one / "run.log", "1 process x 8 devices (the demo)")
        compare = _start([sys.executable, "-m", "halo_jax.main", f"--config={CONFIG}:compare", f"--workdir={cmp}",
                          f"--config.dpo.pairs_dir={one / 'pairs'}"], _env(8, **cache), cmp / "run.log")
        probe = _start([sys.executable, "tests/dpo_probe.py", str(one), str(cmp / "dpo_probe.json")], _env(8, **cache),
                       cmp / "dpo_probe.log")
    except BaseException:  # the demo failed: its log is the report; do not wait for the other run
        _kill(multi)
        raise
    try:
        _finish(multi, two / "run.log", "2 processes x 4 devices (launch/local.sh)")
    finally:
        try:
            _finish(compare, cmp / "run.log", "stage compare (reduced)")
        finally:
            _finish(probe, cmp / "dpo_probe.log", "tests/dpo_probe.py (Gran-DPO steps on the demo's pairs)")
    return one, two, cmp


@pytest.fixture(scope="module")
def runs(all_runs) -> tuple[Path, Path]:
    """(workdir of the 1 x 8 demo run, workdir of the 2 x 4 run up to train_dpo)."""
    return all_runs[:2]


# ----------------------------------------------------------------------------- the demo (1 x 8)


def test_shipped_model_is_a_diffusers_folder():
    index = json.loads((SHAPES_WAN / "model_index.json").read_text())
    assert {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    size = sum(f.stat().st_size for f in SHAPES_WAN.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"the shipped model is {size / 2**20:.1f} MiB; the budget is 20 MiB"


@pytest.mark.e2e
def test_demo_stages(runs):
    one, _ = runs
    assert len(StoreReader(one / "rollouts")) == 8
    labels = read_labels(one / "labels")
    assert sorted(r["video_id"] for r in labels) == sorted(StoreReader(one / "rollouts").ids())
    assert (one / "reward_ckpt" / "config.json").exists() and (one / "reward" / "eval_phase2.json").exists()
    assert len(StoreReader(one / "scores")) == 8
    assert len(StoreReader(one / "pairs")) >= 1
    assert (one / "dpo_ckpt" / "model_index.json").exists()
    # Gran-DPO changed the DiT (LoRA merged into the export); every other component is the base's.
    base, aligned = SafetensorsFolder(SHAPES_WAN / "transformer"), SafetensorsFolder(one / "dpo_ckpt" / "transformer")
    assert set(base) == set(aligned)
    changed = [k for k in base if not np.array_equal(base[k], aligned[k])]
    assert changed and all(np.isfinite(aligned[k]).all() for k in changed)


@pytest.mark.e2e
def test_demo_evaluate_and_report(runs):
    one, _ = runs
    metrics = json.loads((one / "evaluate" / "metrics.json").read_text())
    assert list(metrics["models"]) == ["base", "gran_dpo"] and metrics["judges_run"] == ["oracle"]
    for model in ("base", "gran_dpo"):
        records = sorted((one / "evaluate" / model / "records").glob("*.json"))
        assert len(records) == 2, model
        seeds = {json.loads(r.read_text())["seed"] for r in records}
        assert len(seeds) == 2, model
    base_seeds = [json.loads(r.read_text())["seed"] for r in sorted((one / "evaluate/base/records").glob("*.json"))]
    aligned_seeds = [json.loads(r.read_text())["seed"] for r in sorted((one / "evaluate/gran_dpo/records").glob("*.json"))]
    assert base_seeds == aligned_seeds, "base and Gran-DPO must be sampled with the same seeds"
    assert np.isfinite(metrics_value(metrics))
    assert (one / "evaluate" / "report" / "index.html").exists()
    assert "gran_dpo" in (one / "evaluate" / "table.txt").read_text()


def metrics_value(metrics) -> float:
    """Any numeric leaf of metrics.json (the structure is checked in tests/test_evaluate.py)."""
    stack = [metrics]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            return float(item)
    raise AssertionError("metrics.json has no numbers")


# ----------------------------------------------------------------------------- 2 x 4 == 1 x 8


def _records(store: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    reader = StoreReader(store)
    return {rid: {k: v for k, v in reader.get(rid).items() if k not in skip} for rid in reader.ids()}


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_multihost_rollouts_and_labels_are_identical(runs):
    one, two = runs
    a, b = _records(one / "rollouts"), _records(two / "rollouts")
    assert len(a) == 8 and sorted(a) == sorted(b)
    for vid in a:
        for key in ("prompt", "prompt_index", "sample_index", "seed"):
            assert a[vid][key] == b[vid][key], (vid, key)
        # the sampler's 10 guided steps compound reduction-order differences (seen: up to 1.5e-4 on the
        # unit-variance normalised latents): 1e-3, three orders of magnitude below their scale
        np.testing.assert_allclose(b[vid]["latents"], a[vid]["latents"], rtol=10 * RTOL, atol=1e-3, err_msg=vid)
        # latents equal to float32 tolerance decode to values that may round to the other side of a uint8 step
        diff = np.abs(b[vid]["frames"].astype(int) - a[vid]["frames"].astype(int))
        assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (vid, diff.max(), np.mean(diff > 0))
    la = sorted(read_labels(one / "labels"), key=lambda r: r["video_id"])
    lb = sorted(read_labels(two / "labels"), key=lambda r: r["video_id"])
    assert [r["video_id"] for r in la] == sorted(a)
    # so the oracle's scores of those frames agree closely, not bit for bit, and the frames' content hash
    # (and the cache key made from it) may differ; everything else is equal
    scores = ("video_scores", "patch_scores")
    not_equal = scores + ("content_hash", "cache_key")
    assert [{k: v for k, v in r.items() if k not in not_equal} for r in la] == \
        [{k: v for k, v in r.items() if k not in not_equal} for r in lb]
    for ra, rb in zip(la, lb):
        for key in scores:
            assert ra[key].keys() == rb[key].keys()
            for aspect in ra[key]:
                np.testing.assert_allclose(rb[key][aspect], ra[key][aspect], atol=0.05,
                                           err_msg=f"{ra['video_id']} {key} {aspect}")


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_multihost_train_losses_match(runs):
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


@pytest.mark.e2e
@pytest.mark.multiprocess
def test_multihost_scores_and_pairs_match(runs):
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
    assert (two / "dpo_ckpt" / "model_index.json").exists() and not (two / "evaluate").exists()


# ----------------------------------------------------------------------------- Gran-DPO on the demo's pairs


@pytest.mark.e2e
def test_gran_dpo_steps_learn_the_demo_pairs(all_runs):
    """A few Gran-DPO steps on shapes-world pairs (the demo's, from the shipped model) lower the loss
    and raise the implicit accuracy on those pairs, measured before and after with the same timesteps
    and noise (tests/dpo_probe.py, run by the fixture)."""
    probe = json.loads((all_runs[2] / "dpo_probe.json").read_text())
    before, after = probe["before"], probe["after"]
    # Zero-initialised LoRA: policy == reference up to float rounding on the 8-device mesh, so every implicit
    # margin is ~0 and the video term is log 2.
    assert abs(before["margin_video"]) < 1e-4 and abs(before["margin_patch"]) < 1e-4, before
    assert before["loss_video"] == pytest.approx(np.log(2.0), abs=1e-4), before
    # Measured (16 steps, lr 1e-3): loss 1.04 -> 0.22, acc_video 0 -> 1.0, acc_patch 0 -> 1.0 (before: ties).
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["margin_video"] > 0.0 and after["margin_patch"] > 0.0, (before, after)
    assert after["acc_video"] >= 0.75 and after["acc_patch"] > before["acc_patch"], (before, after)


# ----------------------------------------------------------------------------- stage compare (reduced)


@pytest.mark.e2e
def test_compare_trains_each_variant_and_pools_them(all_runs):
    """configs/shapes_halo.py's last stage on the demo's pairs: one run per variant (its own patch weight, the
    shared pairs and base), evaluated with the base, each variant pooled; the results table and its targets."""
    cmp = all_runs[2]
    for name, weight in (("diffusion_dpo_s0", 0.0), ("gran_dpo_s0", 1.0)):
        info = json.loads((cmp / "compare" / name / "dpo_ckpt" / "halo_dpo.json").read_text())
        assert info["loss"]["patch_weight"] == weight and info["base"] == str(SHAPES_WAN), info
    metrics = json.loads((cmp / "evaluate" / "metrics.json").read_text())
    assert metrics["groups"] == {"diffusion_dpo": ["diffusion_dpo_s0"], "gran_dpo": ["gran_dpo_s0"]}
    models = metrics["judges"]["oracle"]["models"]
    assert list(models) == ["base", "diffusion_dpo_s0", "gran_dpo_s0", "diffusion_dpo", "gran_dpo"]
    assert models["gran_dpo"]["defect_rate"] == models["gran_dpo_s0"]["defect_rate"]  # a group of one run
    results = (cmp / "compare" / "results.md").read_text()
    for row in ("| base | - |", "| diffusion_dpo | 1 |", "| gran_dpo | 1 |", "| gran_dpo_s0 | 1 |"):
        assert row in results, results
    assert results.count("| yes |") + results.count("| no |") == 3, results
    assert (cmp / "evaluate" / "report" / "index.html").exists()
