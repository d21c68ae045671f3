"""Benchmark config: the tiny Wan DiT (tests, CI). `python -m halo_jax.bench --config=configs/bench_tiny.py`.

Every WanTransformerConfig field can go into `model.fields` (they override `model.preset`);
`video` is in latent units (`space="latent"`) or pixels through the Wan VAE strides 4x8x8 (`"pixel"`).
The other sections and their defaults: `halo_jax/benchmarks/config.py` (`bench_config`).
"""

from ml_collections import ConfigDict

from halo_jax.benchmarks.config import FP32_UNROLLED, bench_config


def get_config() -> ConfigDict:
    return bench_config(
        "tiny",
        {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 48, "text_dim": 24,
         "in_channels": 4, "out_channels": 4, "freq_dim": 16, **FP32_UNROLLED},
        {"space": "latent", "frames": 2, "height": 4, "width": 4},
        batch=4, text_len=8, steps=5, warmup=2, lora_rank=4, lora_alpha=4.0, grid=(1, 2, 2))
