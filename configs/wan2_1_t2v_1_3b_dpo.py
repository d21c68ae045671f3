"""Gran-DPO of Wan2.1-T2V-1.3B (a local diffusers folder) on GPT-4o-labelled, reward-scored rollouts.

    python -m halo_jax.main --config=configs/wan2_1_t2v_1_3b_dpo.py --workdir=runs/wan13b \
        --config.model.path=/data/Wan2.1-T2V-1.3B-Diffusers
    # Diffusion-DPO baseline: --config.dpo.loss.patch_weight=0.0

Expects WORKDIR/rollouts (configs/wan2_1_t2v_1_3b_generate.py), its labels, a reward model and
WORKDIR/scores. Runs `pairs` then `train_dpo`; the aligned pipeline lands in WORKDIR/dpo_ckpt.

Hyper-parameters. The HALO paper's body (and so its exact settings) is not available to us;
these are our choices, taken from the common Diffusion-DPO / Flow-DPO practice for LoRA
fine-tuning of video DiTs, and should be tuned:
  - LoRA rank 64, alpha 64 (scale 1) on q/k/v/out of self- and cross-attention and both FFN
    projections; adapters float32, the frozen base bfloat16, bfloat16 compute.
  - Flow matching (velocity target) with constant β = 500 (Flow-DPO's choice for rectified-flow
    models; Diffusion-DPO's β = 5000 applies to epsilon models through β·T·ω(t)); patch β = β,
    λ = 1 (Gran-DPO; 0 gives Diffusion-DPO). Training timesteps: uniform σ with shift 3.0,
    Wan's 480p flow shift.
  - AdamW lr 1e-5, weight decay 0, 50 warmup steps then cosine to 10%, clipping at 1.0,
    64 pairs per step (16 per micro-batch, 4 accumulation steps), 1000 steps.
  - Pairs: every qualifying pair per prompt up to 2, video margin 0.5 and patch margin 0.5
    in score units (1-5 scale).
  - Parameters and the batch sharded FSDP over all devices; the blocks scanned with per-block remat
    "full" (the benchmark of this architecture on one H200: one pair at 81 frames in 22.8 GB at 44.6%
    MFU; at 33 frames 2-6% slower than saving the projections, which do not fit at 81; BENCHMARKS.md).
"""

from halo_jax.config import base_config, dpo_config, generate_config, pairs_config


def get_config():
    config = base_config()
    generate_config(config)
    config.stage = "pipeline"
    config.pipeline.stages = ("pairs", "train_dpo")
    config.model.path = ""  # required: --config.model.path=/path/to/Wan2.1-T2V-1.3B-Diffusers
    config.model.options.update(dtype="bfloat16", param_dtype="bfloat16", remat="full", scan_layers=True)
    config.video.update(frames=81, height=480, width=832)
    config.sampler.update(num_steps=50, guidance_scale=5.0)
    config.pairs = pairs_config()
    config.pairs.update(strategy="all", max_pairs_per_prompt=2, margin_video=0.5, margin_patch=0.5,
                        text_batch_size=4, chunk_size=8)
    config.dpo = dpo_config()
    config.dpo.lora.update(rank=64, alpha=64.0, dropout=0.0, param_dtype="float32")
    config.dpo.loss.update(beta=500.0, beta_patch=0.0, patch_weight=1.0, beta_schedule="constant")
    config.dpo.diffusion.update(shift=3.0, timestep_sampling="uniform")
    config.dpo.update(steps=1000, batch_size=64, grad_accum=4, learning_rate=1e-5, warmup_steps=50,
                      grad_clip=1.0, weight_decay=0.0, max_skipped=20)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.checkpoint.update(every_steps=100, keep=3)
    config.log.every_steps = 1
    return config
