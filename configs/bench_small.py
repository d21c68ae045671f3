"""Benchmark config: a small-but-not-tiny Wan DiT for CPU measurements (4 layers, width 256,
4.91M params; latents (16, 5, 16, 16) -> 320 tokens per video), float32.

    python -m halo_jax.bench --config=configs/bench_small.py                          # step times
    python -m halo_jax.bench --config=configs/bench_small.py --config.mode=levers     # memory levers
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m halo_jax.bench --config=configs/bench_small.py --config.mode=fsdp   # FSDP 1/2/4/8
"""

from ml_collections import ConfigDict

from halo_jax.benchmarks.config import FP32_UNROLLED, bench_config


def get_config() -> ConfigDict:
    c = bench_config(
        "tiny",
        {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 128, "ffn_dim": 1024, "text_dim": 256,
         "in_channels": 16, "out_channels": 16, "freq_dim": 256, **FP32_UNROLLED},
        {"space": "latent", "frames": 5, "height": 16, "width": 16},
        # batch 16 = 8 pairs: divides over 8 fsdp devices and into 4 accumulation micro-batches
        batch=16, text_len=32, steps=9, warmup=2, lora_rank=4, lora_alpha=4.0, grid=(1, 2, 2))
    c.levers.grad_accum = 4
    # a 4-layer umT5 of the model's text width with umT5's real vocabulary (the embedding table dominates)
    c.levers.text_encoder = ConfigDict({"vocab_size": 256384, "d_model": 256, "d_kv": 64, "d_ff": 640,
                                        "num_layers": 4, "num_heads": 4, "relative_attention_num_buckets": 32,
                                        "relative_attention_max_distance": 128})
    return c
