"""Benchmark config: the Wan2.1-T2V-1.3B architecture (random constant weights), bf16 compute with
float32 master weights, LoRA Gran-DPO, 33x480x832 pixels (9x60x104 latents, 14040 tokens per video).

    python -m halo_jax.bench --config=configs/bench_wan2_1_1_3b.py --out=bench_1_3b_33f.json
    python -m halo_jax.bench --config=configs/bench_wan2_1_1_3b.py --config.video.frames=81 --out=bench_1_3b_81f.json

Meant for an accelerator (H100/H200/TPU); weights are made as constants under one jit on the mesh.
"""

import importlib.util
import os

from ml_collections import ConfigDict

_spec = importlib.util.spec_from_file_location("bench_tiny", os.path.join(os.path.dirname(__file__), "bench_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
add_modes = _tiny.add_modes


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict({"preset": "wan2_1_t2v_1_3b", "fields": ConfigDict({
        "num_layers": 30, "dtype": "bfloat16", "param_dtype": "float32",
        "remat": "dots_with_no_batch_dims_saveable", "scan_layers": False, "attention_impl": "auto"})})
    c.video = ConfigDict({"space": "pixel", "frames": 33, "height": 480, "width": 832})
    c.batch = 2              # videos per step: one DPO pair
    c.text_len = 512         # Wan pads umT5 embeddings to 512 tokens
    c.kinds = "sft,diffusion_dpo,gran_dpo,sample"
    c.steps = 10
    c.warmup = 3
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "devices": 0})  # devices: 0 = all
    c.lora = ConfigDict({"enabled": True, "rank": 32, "alpha": 32.0})
    c.dpo = ConfigDict({"beta": 500.0, "patch_weight": 1.0, "grid": (3, 4, 4)})
    c.guidance_scale = 5.0
    c.learning_rate = 1e-4
    c.peak_flops = 0.0       # FLOP/s per device; 0 = the bf16 table by device kind
    c.torch_threads = 0
    add_modes(c)
    # --config.mode=levers: umT5-XXL is what precomputed embeddings save (5.7B params; needs the memory)
    c.levers.text_encoder = ConfigDict({"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                                        "num_layers": 24, "num_heads": 64, "param_dtype": "bfloat16",
                                        "dtype": "bfloat16"})
    c.levers.grad_accum = 1  # one pair per step: the grad_accum lever needs --config.batch=4 or more
    c.levers.names = "baseline,remat_full,remat_dots_nobatch,scan_remat_full,bf16_params"
    return c
