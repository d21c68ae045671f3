"""Benchmark config: the Wan2.1-T2V-1.3B architecture (random constant weights), bf16 compute with
float32 master weights, LoRA Gran-DPO, 33x480x832 pixels (9x60x104 latents, 14040 tokens per video),
the blocks scanned with full remat (on an H200: 2-6% slower than remat=dots_with_no_batch_dims_saveable
at 33 frames, 0.18x its memory for the DPO step, and the latter does not fit at 81 frames; BENCHMARKS.md).

    python -m halo_jax.bench --config=configs/bench_wan2_1_1_3b.py --out=bench_1_3b_33f.json
    python -m halo_jax.bench --config=configs/bench_wan2_1_1_3b.py --config.video.frames=81 --out=bench_1_3b_81f.json

Meant for an accelerator (H100/H200/TPU); weights are made as constants under one jit on the mesh.
launch/bench_gpu.sh runs every row of BENCHMARKS.md's GPU section.
"""

from ml_collections import ConfigDict

from halo_jax.benchmarks.config import bench_config


def get_config() -> ConfigDict:
    c = bench_config(
        "wan2_1_t2v_1_3b",
        {"num_layers": 30, "dtype": "bfloat16", "param_dtype": "float32",
         "remat": "full", "scan_layers": True, "attention_impl": "auto"},
        {"space": "pixel", "frames": 33, "height": 480, "width": 832},
        # one DPO pair a step; Wan pads umT5 embeddings to 512 tokens
        batch=2, text_len=512, steps=10, warmup=3, lora_rank=32, lora_alpha=32.0, grid=(3, 4, 4))
    # --config.mode=levers: umT5-XXL is what precomputed embeddings save (5.7B params; needs the memory)
    c.levers.text_encoder = ConfigDict({"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                                        "num_layers": 24, "num_heads": 64, "param_dtype": "bfloat16",
                                        "dtype": "bfloat16"})
    c.levers.grad_accum = 1  # one pair per step: the grad_accum lever needs --config.batch=4 or more
    c.levers.names = "baseline,remat_full,remat_dots_nobatch,scan_remat_full,bf16_params"
    return c
