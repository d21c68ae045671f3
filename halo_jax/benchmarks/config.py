"""The benchmark config (`configs/bench_*.py`) and the objects every mode builds from it.

`bench_config(...)` is the one schema: the model (`model.preset` plus WanTransformerConfig
`model.fields` on top), the batch (`video` in latent units, `space="latent"`, or pixels through
the Wan VAE strides 4x8x8, `"pixel"`), the step kinds, mesh, LoRA and DPO loss, and the sections
of the "levers" and "fsdp" modes. A config file passes what its experiment sets and overrides the
rest after the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from ml_collections import ConfigDict

from halo_jax.align.gran_dpo import GranDPOConfig
from halo_jax.config import check_fields
from halo_jax.models import lora as lora_lib
from halo_jax.models.wan import WanTransformerConfig
from halo_jax.parallel.mesh import make_mesh

PRESETS = ("tiny", "wan2_1_t2v_1_3b", "wan2_1_t2v_14b", "custom")
KINDS = ("sft", "diffusion_dpo", "gran_dpo", "sample")  # config.kinds: the step kinds of mode "steps"
MODES = ("steps", "levers", "fsdp")  # config.mode: halo_jax/benchmarks/steps.py, levers.py, fsdp.py
WAN_VAE_STRIDES = (4, 8, 8)  # pixel -> latent (frames causal: F = (frames - 1)/4 + 1)
WAN_LATENT_CHANNELS = 16
# WanTransformerConfig run options of the plain layout: float32 weights and compute, no remat, unrolled blocks
FP32_UNROLLED = {"dtype": "float32", "param_dtype": "float32", "remat": "none", "scan_layers": False}


def bench_config(preset: str, fields: Mapping[str, Any], video: Mapping[str, Any], *, batch: int, text_len: int,
                 steps: int, warmup: int, lora_rank: int, lora_alpha: float, grid: tuple[int, int, int]) -> ConfigDict:
    """A benchmark config: the given model, batch, timing and LoRA/grid, the shared defaults for the rest."""
    c = ConfigDict()
    c.model = ConfigDict({"preset": preset, "fields": ConfigDict(dict(fields))})
    c.video = ConfigDict(dict(video))
    c.batch = batch          # videos per step; the DPO steps take batch/2 pairs
    c.text_len = text_len
    c.kinds = ",".join(KINDS)
    c.steps = steps
    c.warmup = warmup
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "devices": 0})  # devices: 0 = all
    c.lora = ConfigDict({"enabled": True, "rank": lora_rank, "alpha": lora_alpha})
    c.dpo = ConfigDict({"beta": 500.0, "patch_weight": 1.0, "grid": tuple(grid)})
    c.guidance_scale = 5.0
    c.learning_rate = 1e-4
    c.peak_flops = 0.0       # FLOP/s per device; 0 = the bf16 table by device kind (CPU: n/a)
    c.torch_threads = 0      # --compare_torch: torch.set_num_threads; 0 = os.cpu_count()
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
    return c


def model_config(c: ConfigDict) -> WanTransformerConfig:
    """`c.model.preset` (one of PRESETS; "custom" = the dataclass defaults) with `c.model.fields` on top."""
    preset = c.model.preset
    if preset not in PRESETS:
        raise ValueError(f"config.model.preset={preset!r} is not one of {PRESETS}")
    fields = dict(c.model.get("fields", {}) or {})
    check_fields(WanTransformerConfig, fields, "config.model.fields")
    if "patch_size" in fields:
        fields["patch_size"] = tuple(fields["patch_size"])
    if preset == "custom":
        return WanTransformerConfig(**fields)
    return getattr(WanTransformerConfig, preset)(**fields)


def latent_shape(c: ConfigDict, cfg: WanTransformerConfig) -> tuple[int, int, int, int]:
    """(C, F, H, W): `video.space="latent"` takes frames/height/width as latent sizes; "pixel" maps
    them through the Wan VAE strides 4x8x8 (F = (frames - 1)/4 + 1) with 16 latent channels."""
    v = c.video
    if v.space == "latent":
        return cfg.in_channels, int(v.frames), int(v.height), int(v.width)
    if v.space != "pixel":
        raise ValueError(f"config.video.space must be 'latent' or 'pixel', got {v.space!r}")
    st, sh, sw = WAN_VAE_STRIDES
    if (v.frames - 1) % st or v.height % sh or v.width % sw:
        raise ValueError(f"pixel video {v.frames}x{v.height}x{v.width} does not fit the Wan VAE strides "
                         f"{WAN_VAE_STRIDES}: frames must be 4k+1, height and width multiples of 8")
    if cfg.in_channels != WAN_LATENT_CHANNELS:
        raise ValueError(f"video.space='pixel' means Wan VAE latents ({WAN_LATENT_CHANNELS} channels), but the "
                         f"model has in_channels={cfg.in_channels}; use video.space='latent'")
    return WAN_LATENT_CHANNELS, (v.frames - 1) // st + 1, v.height // sh, v.width // sw


def num_tokens(cfg: WanTransformerConfig, shape: tuple[int, int, int, int]) -> int:
    """Latent tokens of one video after patching: (F/pt)·(H/ph)·(W/pw)."""
    _, f, h, w = shape
    pt, ph, pw = cfg.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent (F, H, W) = {(f, h, w)} is not divisible by patch_size {cfg.patch_size}")
    return (f // pt) * (h // ph) * (w // pw)


def bench_mesh(c: ConfigDict) -> jax.sharding.Mesh:
    """The mesh of `c.mesh` (axis sizes) on its first `c.mesh.devices` devices (0: all)."""
    sizes = {k: v for k, v in c.mesh.items() if k != "devices"}
    n_dev = int(c.mesh.get("devices", 0) or 0)
    return make_mesh(sizes, devices=jax.devices()[:n_dev] if n_dev > 0 else None)


def make_batches(c: ConfigDict, cfg: WanTransformerConfig, shape: tuple[int, ...],
                 seed: int = 0) -> tuple[dict, dict]:
    """(SFT batch of `batch` videos, DPO batch of `batch/2` pairs) as NumPy arrays."""
    rng = np.random.default_rng(seed)
    b = int(c.batch)
    if b < 2 or b % 2:
        raise ValueError(f"config.batch={b} must be an even number >= 2 (the DPO steps take batch/2 pairs)")
    f32 = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    sft = {"latents": f32(b, *shape), "text": f32(b, c.text_len, cfg.text_dim)}
    pairs = b // 2
    grid = tuple(c.dpo.grid)
    dpo = {"latents_w": f32(pairs, *shape), "latents_l": f32(pairs, *shape),
           "text_embeds": f32(pairs, c.text_len, cfg.text_dim),
           "s": rng.choice(np.array([-1.0, 1.0], np.float32), size=(pairs, *grid)),
           "a": np.ones((pairs, *grid), np.float32)}
    return sft, dpo


def optimizer(c: ConfigDict) -> optax.GradientTransformation:
    """Every benchmarked step's optimizer: clipping at 1.0, AdamW(`learning_rate`, weight decay 1e-4)."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(c.learning_rate, weight_decay=1e-4))


def lora_config(c: ConfigDict) -> lora_lib.LoRAConfig:
    """The adapters of `c.lora` (rank, alpha) on the default Wan targets."""
    return lora_lib.LoRAConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha))


def dpo_loss_config(c: ConfigDict, patch_weight: float | None = None) -> GranDPOConfig:
    """The Gran-DPO loss of `c.dpo` (beta, grid); `patch_weight` None: `c.dpo.patch_weight`."""
    weight = float(c.dpo.patch_weight) if patch_weight is None else float(patch_weight)
    return GranDPOConfig(beta=float(c.dpo.beta), patch_weight=weight, grid=tuple(c.dpo.grid))
