"""Benchmark config: the tiny Wan DiT (tests, CI). `python -m halo_jax.bench --config=configs/bench_tiny.py`.

Every WanTransformerConfig field can go into `model.fields` (they override `model.preset`);
`video` is in latent units (`space="latent"`) or pixels through the Wan VAE strides 4x8x8 (`"pixel"`).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict({"preset": "tiny", "fields": ConfigDict({
        "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 48, "text_dim": 24,
        "in_channels": 4, "out_channels": 4, "freq_dim": 16, "dtype": "float32", "param_dtype": "float32", "remat": "none",
        "scan_layers": False})})
    c.video = ConfigDict({"space": "latent", "frames": 2, "height": 4, "width": 4})
    c.batch = 4              # videos per step; the DPO steps take batch/2 pairs
    c.text_len = 8
    c.kinds = "sft,diffusion_dpo,gran_dpo,sample"
    c.steps = 5
    c.warmup = 2
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "devices": 0})  # devices: 0 = all
    c.lora = ConfigDict({"enabled": True, "rank": 4, "alpha": 4.0})
    c.dpo = ConfigDict({"beta": 500.0, "patch_weight": 1.0, "grid": (1, 2, 2)})
    c.guidance_scale = 5.0
    c.learning_rate = 1e-4
    c.peak_flops = 0.0       # FLOP/s per device; 0 = the bf16 table by device kind (CPU: n/a)
    c.torch_threads = 0      # --compare_torch: torch.set_num_threads; 0 = os.cpu_count()
    add_modes(c)
    return c


def add_modes(c: ConfigDict) -> None:
    """`mode` and the sections of the "levers" and "fsdp" modes (halo_jax/benchmarks/)."""
    c.mode = "steps"         # steps | levers | fsdp
    c.levers = ConfigDict({
        "names": "",         # comma-separated subset of halo_jax.benchmarks.levers.LEVER_NAMES; "" = all
        "grad_accum": 2,     # micro-batches of the grad_accum lever (must divide batch/2)
        "steps": 0,          # timed steps per lever after `warmup`; 0 = compile (memory) only
        "warmup": 1,
        "text_encoder_row": True,
        # the umT5 encoder the "text embeddings precomputed" row measures (UMT5Config fields)
        "text_encoder": ConfigDict({"vocab_size": 64, "d_model": 24, "d_kv": 8, "d_ff": 48, "num_layers": 2,
                                    "num_heads": 3, "relative_attention_num_buckets": 8,
                                    "relative_attention_max_distance": 16}),
    })
    c.fsdp = ConfigDict({"sizes": (1, 2, 4, 8), "kinds": "sft,dpo_full,dpo_lora"})
