"""Two tiny random Wan pipelines for the evaluate / report tests (NumPy-filled: no initialiser compiles).

Both share the VAE, text encoder and tokenizer; they differ in the DiT's random values, so
the same seeds give different videos. Video size: the shapes world's 9 frames x 32 x 32.
"""

from pathlib import Path

from flax import nnx

from dpo_world import random_module
from halo_jax.data import shapes
from halo_jax.diffusion import SamplerConfig
from halo_jax.models.text import UMT5Config, UMT5Encoder, build_word_tokenizer, load_tokenizer
from halo_jax.models.wan.pipeline import WanPipeline, save_pipeline
from halo_jax.models.wan.transformer import WanTransformer3D, WanTransformerConfig
from halo_jax.models.wan.vae import WanVAE, WanVAEConfig

PROMPTS = list(shapes.heldout_prompts()[:2])
VIDEO = {"frames": 9, "height": 32, "width": 32}


def make_pipelines(root: Path) -> tuple[Path, Path]:
    """(base folder, other folder): two diffusers Wan folders that differ only in the DiT."""
    tok_dir = root / "tokenizer_src"
    build_word_tokenizer(PROMPTS, tok_dir, model_max_length=8)
    tok = load_tokenizer(tok_dir)
    tcfg = UMT5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    vcfg = WanVAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    dcfg = WanTransformerConfig(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=8, ffn_dim=16,
                                freq_dim=16, num_layers=1, in_channels=4, out_channels=4, text_dim=16)

    def dit(seed):
        return random_module(lambda: WanTransformer3D(dcfg, rngs=nnx.Rngs(0)), seed)

    pipe = WanPipeline(transformer=dit(1), vae=random_module(lambda: WanVAE(vcfg, rngs=nnx.Rngs(0)), 2),
                       text_encoder=random_module(lambda: UMT5Encoder(tcfg, rngs=nnx.Rngs(0)), 3),
                       tokenizer=tok, max_text_length=8,
                       scheduler_config=SamplerConfig(name="unipc", shift=3.0).to_diffusers_config())
    return save_pipeline(pipe, root / "base"), save_pipeline(pipe, root / "other", transformer=dit(7))
