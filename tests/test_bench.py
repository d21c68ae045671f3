"""The benchmark command on the tiny config: every field of every step kind, FLOPs against the
analytic count, the PyTorch comparison, config errors. No wall-clock assertions.

One run (JAX in-process on a 2-device fsdp mesh, 4 step programs; torch in its subprocess; under a minute on a
loaded 2-core CPU) shared by the tests through a module fixture. XLA FLOPs must lie within [0.5, 3] x the analytic count: the
analytic count leaves out element-wise work (norms, RoPE, modulation, softmax, AdamW), which is
~45% of the total on this tiny model (measured, one layer: SFT 1.45x, DPO 1.04x, sampling 1.25x) and a few %
at Wan scale; the scanned layout is not used here because XLA counts a while-loop body once.
"""

import json
import subprocess
import sys

import jax
import pytest

from halo_jax import bench
from halo_jax.benchmarks import config as bench_config, flops, steps
from halo_jax.models.wan import WanTransformerConfig

FACTOR = (0.5, 3.0)


def _config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tiny", "configs/bench_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.steps, c.warmup = 2, 1
    c.model.fields["num_layers"] = 1  # each layer is unrolled (see above): one compiles in 2/3 of the time
    c.mesh.devices = 2
    c.torch_threads = 1  # torch's OpenMP threads stall badly on a loaded 2-core machine
    return c


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    bench.run(_config(), compare_torch=True, out=str(out), log=lambda _: None)
    return json.loads(out.read_text())


def test_every_kind_has_every_field(report):
    assert sorted(report["results"]) == sorted(bench_config.KINDS)
    for kind, r in report["results"].items():
        for field in steps.FIELDS:
            assert field in r, (kind, field)
        assert r["time_s"] > 0 and r["tokens_per_s"] > 0, kind
        assert r["xla_flops"] > 0 and r["analytic_flops"] > 0, kind
        assert FACTOR[0] < r["xla_over_analytic"] < FACTOR[1], (kind, r["xla_over_analytic"])
        assert r["mfu"] is None  # CPU: no peak in the table and no override
        for key in ("argument_bytes", "output_bytes", "temp_bytes"):
            assert r["memory"][key] > 0, (kind, key)
    assert report["setup"]["mesh"]["fsdp"] == 2 and report["setup"]["devices"] == 2
    assert report["setup"]["xla_flops_count_whole_program"]
    assert report["machine"]["nproc"] >= 1 and report["machine"]["date"]


def test_flops_relations(report):
    """Analytic FLOPs: DPO (LoRA) = 3 lin + 4 attn + 3 lora per video; SFT 3 (lin + attn); CFG sample 2x fwd."""
    res, setup = report["results"], report["setup"]
    fwd, b = setup["forward_flops_per_video"], setup["batch"]
    assert res["sft"]["analytic_flops"] == pytest.approx(3 * b * (fwd["linear"] + fwd["attention"]))
    assert res["sample"]["analytic_flops"] == pytest.approx(2 * b * (fwd["linear"] + fwd["attention"]))
    assert res["gran_dpo"]["analytic_flops"] == res["diffusion_dpo"]["analytic_flops"]
    assert res["diffusion_dpo"]["analytic_flops"] > b * (3 * fwd["linear"] + 4 * fwd["attention"])  # + LoRA
    # LoRA: no optimizer state for the base weights, so the DPO state is smaller than SFT's.
    assert res["diffusion_dpo"]["memory"]["argument_bytes"] < res["sft"]["memory"]["argument_bytes"]


def test_torch_comparison(report):
    t = report["torch"]
    assert t["threads"] >= 1
    for kind in ("sft", "diffusion_dpo"):
        assert t["results"][kind]["time_s"] > 0
        assert report["ratio_ours_over_torch"][kind] > 0


def test_dit_flops_by_hand():
    """One layer, no text beyond 1 token: count every matmul of the forward by hand."""
    cfg = WanTransformerConfig.tiny(num_layers=1)
    d, f, n, lt = 32, 48, 2 * 2 * 2, 1   # latents (4, 2, 4, 4), patch (1, 2, 2): 8 tokens
    got = flops.dit_flops(cfg, (4, 2, 4, 4), lt)
    linear = 2 * (n * (16 * d + 6 * d * d + 2 * d * f + d * 16) + lt * (24 * d + d * d + 2 * d * d)
                  + 16 * d + d * d + 6 * d * d)
    assert got["linear"] == linear
    assert got["attention"] == 4 * n * n * d + 4 * n * lt * d
    assert got["lora"] == 0


def test_config_mapping_and_errors():
    c = _config()
    c.model.preset, c.model.fields = "wan2_1_t2v_1_3b", {"num_layers": 2}
    c.video.space, c.video.frames, c.video.height, c.video.width = "pixel", 33, 480, 832
    cfg = bench_config.model_config(c)
    assert cfg.num_layers == 2 and cfg.inner_dim == 1536
    assert bench_config.latent_shape(c, cfg) == (16, 9, 60, 104)
    assert bench_config.num_tokens(cfg, (16, 9, 60, 104)) == 9 * 30 * 52
    c.video.frames = 32
    with pytest.raises(ValueError, match="4k\\+1"):
        bench_config.latent_shape(c, cfg)
    c.model.fields = {"layers": 2}
    with pytest.raises(ValueError, match=r"unknown WanTransformerConfig field\(s\) \['layers'\] in config.model.fields"):
        bench_config.model_config(c)


def test_peak_table():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert flops.peak_flops(Dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops(Dev("TPU v5 lite")) == 197e12
    assert flops.peak_flops(Dev("TPU v6 lite")) == 918e12
    assert flops.peak_flops(Dev("NVIDIA A100-SXM4-40GB")) == 312e12
    assert flops.peak_flops(Dev("cpu")) is None
    assert flops.peak_flops(Dev("cpu"), 1e12) == 1e12


def test_xla_ratio_only_where_xla_counts_the_whole_program():
    class Compiled:  # XLA says 10 FLOPs, no memory analysis
        def cost_analysis(self):
            return {"flops": 10.0}

        def memory_analysis(self):
            return None

    assert steps.xla_counts_whole_program(scan_layers=False, platform="cpu")
    assert not steps.xla_counts_whole_program(scan_layers=True, platform="cpu")
    assert not steps.xla_counts_whole_program(scan_layers=False, platform="gpu")
    counted = steps._result([2.0, 1.0, 3.0], Compiled(), 40.0, 8, 10.0, 2, 0.5, xla_counts_all=True)
    assert counted["xla_over_analytic"] == 0.5 and counted["time_s"] == 2.0 and counted["mfu"] == 1.0
    assert steps._result([1.0], Compiled(), 40.0, 8, None, 2, 0.5, xla_counts_all=False)["xla_over_analytic"] is None


def test_cli_usage_error():
    """A bad config value exits with status 2 and one line naming the problem (no compile happens)."""
    proc = subprocess.run([sys.executable, "-m", "halo_jax.bench", "--config=configs/bench_tiny.py",
                           "--config.kinds=sft,bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unknown step kinds ['bogus']" in proc.stderr


# ----------------------------------------------------------------------------- levers and fsdp modes


def _shardable(c):
    """The tiny model with every width divisible by 8 (width 32, FFN 64, text 32), one layer."""
    c.model.fields.update(num_layers=1, ffn_dim=64, text_dim=32, freq_dim=32)
    return c


def test_fsdp_argument_bytes_shrink():
    """Memory analysis only (no step runs): per-device arguments of the SFT step (params, AdamW moments,
    batch) at fsdp=8 are <= 0.25x those at fsdp=1 (measured 0.149; ideal 0.125, the rest is replicated
    norms/biases and step counters). The DPO steps shard the same way (BENCHMARKS.md, `--config.mode=fsdp`)."""
    from halo_jax.benchmarks import fsdp

    c = _shardable(_config())
    c.batch, c.video.frames = 16, 1
    one = fsdp.step_memory(c, "sft", 1, log=lambda _: None)
    eight = fsdp.step_memory(c, "sft", 8, log=lambda _: None)
    assert one["params"] == eight["params"] > 0
    ratio = eight["memory"]["argument_bytes"] / one["memory"]["argument_bytes"]
    assert 0.125 <= ratio <= 0.25, ratio
    assert eight["memory"]["total_bytes"] < one["memory"]["total_bytes"]


def test_levers_mode(tmp_path):
    """`--config.mode=levers` on two levers, compile only: the table's rows and fields, and the structural
    fact that full fine-tuning carries more argument bytes (AdamW moments + reference copy) than LoRA."""
    from halo_jax.benchmarks import levers

    c = _shardable(_config())
    c.mode, c.mesh.devices = "levers", 1
    c.levers.names = "baseline,full_ft"
    out = tmp_path / "levers.json"
    bench.run(c, out=str(out), log=lambda _: None)
    report = json.loads(out.read_text())
    rows = {r["lever"]: r for r in report["levers"]}
    assert sorted(rows) == ["baseline", "full_ft", "text_encoder_in_step"]
    for r in rows.values():
        assert r["memory"]["argument_bytes"] > 0 and r["memory"]["total_bytes"] > 0, r["lever"]
        assert r["time_s"] is None  # levers.steps = 0: compile only
    assert rows["full_ft"]["memory"]["argument_bytes"] > 2 * rows["baseline"]["memory"]["argument_bytes"]
    assert rows["full_ft"]["trainable_params"] > rows["baseline"]["trainable_params"]
    assert rows["text_encoder_in_step"]["encoder_params"] > 0
    assert report["setup"]["umt5_xxl"]["params"] > 5e9  # shapes only
    table = levers.format_levers_table(report)
    assert "full_ft" in table and "umT5-XXL" in table
    c.levers.names = "bogus"
    with pytest.raises(ValueError, match="unknown levers"):
        bench.run(c, log=lambda _: None)
    c.mode = "nope"
    with pytest.raises(ValueError, match="config.mode"):
        bench.run(c, log=lambda _: None)
