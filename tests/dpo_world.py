"""A tiny HALO workdir for the pairs / train_dpo stage tests: base_ckpt, rollouts/ and scores/.

The Wan pipeline (word tokenizer, umT5, VAE, DiT; all tiny) is filled with NumPy random
values (no XLA initialiser compiles). Two prompts x three samples; scores are hand-made so
that prompt 0 gives two pairs under `pairs_settings()` and prompt 1 none.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from halo_jax.config import base_config, dpo_config, generate_config, pairs_config
from halo_jax.data.stores import RolloutRecord, StoreWriter
from halo_jax.diffusion import SamplerConfig
from halo_jax.models.text import UMT5Config, UMT5Encoder, build_word_tokenizer, load_tokenizer
from halo_jax.models.wan.pipeline import WanPipeline, save_pipeline
from halo_jax.models.wan.transformer import WanTransformer3D, WanTransformerConfig
from halo_jax.models.wan.vae import WanVAE, WanVAEConfig
from halo_jax.stages.score import score_schema

PROMPTS = ["a red circle moving right on a black background", "a blue square moving up on a black background"]
ASPECTS = ["visual_quality", "temporal_consistency"]
GRID = (2, 2, 2)
LATENT = (4, 2, 2, 2)  # 5 frames of 16x16 through the Wan strides, z_dim 4
# video_scores per (prompt, sample): prompt 0 has gaps 2.0, 0.9, 1.1; prompt 1 only 0.2.
VIDEO_SCORES = {(0, 0): [4.0, 4.0], (0, 1): [2.0, 2.0], (0, 2): [3.0, 3.2],
                (1, 0): [3.0, 3.0], (1, 1): [3.2, 3.0], (1, 2): [3.1, 3.1]}


def random_module(ctor, seed: int):
    """`ctor()`'s structure with NumPy random values (kernels ~ N(0, 1/fan_in), scales ~ 1)."""
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, v):
        names = [str(getattr(k, "key", "")) for k in path]
        if any("scale" in n or "gamma" in n or n == "weight" for n in names[-2:]) and len(v.shape) <= 1:
            x = 1.0 + 0.1 * rng.normal(size=v.shape)
        elif len(v.shape) >= 2:
            x = rng.normal(size=v.shape) / np.sqrt(np.prod(v.shape[:-1]))
        else:
            x = 0.1 * rng.normal(size=v.shape)
        return jnp.asarray(x, v.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def tiny_pipeline(prompts, tok_dir: Path, dit_seed: int = 1) -> WanPipeline:
    """A tiny random Wan pipeline (NumPy-filled modules, no initialiser compiles) whose tokenizer knows `prompts`."""
    build_word_tokenizer(prompts, tok_dir, model_max_length=8)
    tok = load_tokenizer(tok_dir)
    tcfg = UMT5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    vcfg = WanVAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    return WanPipeline(transformer=tiny_dit(dit_seed), vae=random_module(lambda: WanVAE(vcfg, rngs=nnx.Rngs(0)), 2),
                       text_encoder=random_module(lambda: UMT5Encoder(tcfg, rngs=nnx.Rngs(0)), 3),
                       tokenizer=tok, max_text_length=8,
                       scheduler_config=SamplerConfig(name="unipc", shift=3.0).to_diffusers_config())


def tiny_dit(seed: int) -> WanTransformer3D:
    """The DiT of `tiny_pipeline`, filled from `seed`."""
    dcfg = WanTransformerConfig(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=8, ffn_dim=16,
                                freq_dim=16, num_layers=1, in_channels=4, out_channels=4, text_dim=16)
    return random_module(lambda: WanTransformer3D(dcfg, rngs=nnx.Rngs(0)), seed)


def make_base(folder: Path) -> Path:
    return save_pipeline(tiny_pipeline(PROMPTS, folder.parent / (folder.name + "_tokenizer")), folder)


def patch_scores(p: int, k: int) -> np.ndarray:
    return np.random.default_rng(100 * p + k).uniform(1.0, 5.0, size=(len(ASPECTS), *GRID)).astype(np.float32)


def latents(p: int, k: int, shape=LATENT) -> np.ndarray:
    return np.random.default_rng(1000 + 100 * p + k).normal(size=shape).astype(np.float32)


def make_stores(workdir: Path, bad_shape: tuple | None = None) -> None:
    """rollouts/ and scores/; with `bad_shape`, video (0, 1)'s latents have that shape."""
    with StoreWriter(workdir / "rollouts", RolloutRecord.schema(), chunk_size=4) as w:
        for (p, k) in VIDEO_SCORES:
            shape = bad_shape if bad_shape and (p, k) == (0, 1) else LATENT
            w.write(RolloutRecord(RolloutRecord.make_id(p, k), PROMPTS[p], p, k, k, latents(p, k, shape),
                                  np.zeros((5, 16, 16, 3), np.uint8)).to_record())
    with StoreWriter(workdir / "scores", score_schema(len(ASPECTS), GRID), chunk_size=4) as w:
        for (p, k), vs in VIDEO_SCORES.items():
            w.write({"video_id": RolloutRecord.make_id(p, k), "prompt": PROMPTS[p], "prompt_index": p,
                     "sample_index": k, "seed": k, "aspects": ASPECTS,
                     "video_scores": np.asarray(vs, np.float32), "patch_scores": patch_scores(p, k),
                     "reward": float(np.mean(vs))})


def make_config(base: Path):
    config = base_config()
    generate_config(config)
    config.model.path = str(base)
    config.grid = GRID
    config.aspects = tuple(ASPECTS)
    config.pairs = pairs_config()
    config.pairs.update(strategy="all", max_pairs_per_prompt=2, margin_video=0.5, margin_patch=0.25,
                        text_batch_size=2, chunk_size=1)
    config.dpo = dpo_config()
    config.dpo.lora.update(rank=2, alpha=2.0)
    config.dpo.update(steps=4, batch_size=2, learning_rate=1e-2, warmup_steps=1)
    config.mesh.update(data=1, fsdp=2, tensor=4)
    config.checkpoint.every_steps = 100
    config.log.every_steps = 1
    config.log.progress = False
    return config
