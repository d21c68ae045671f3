"""Gran-DPO on the moving-shapes world: pairs from `scores/`, then LoRA DPO of the tiny Wan model.

    python -m halo_jax.main --config=configs/shapes_dpo.py --workdir=WORKDIR
    # Diffusion-DPO through the same code:  --config.dpo.loss.patch_weight=0.0

Reads WORKDIR/base_ckpt (the pretrain stage's tiny model; or --config.model.path), WORKDIR/rollouts
and WORKDIR/scores; writes WORKDIR/pairs, WORKDIR/dpo (checkpoints, metrics) and WORKDIR/dpo_ckpt,
which `generate` loads with --config.model.path=WORKDIR/dpo_ckpt. Both stages resume.

Loss: flow matching (velocity target), constant β = 500 (Flow-DPO), λ = 1, grid (2, 2, 2) shared
with the labels and the reward model. LoRA rank 8 on attention + FFN, AdamW lr 1e-4 with 10
warmup steps, clipping at 1.0, batch 8 pairs, 200 steps: sized for a CPU in minutes.
"""

from halo_jax.config import base_config, generate_config, shapes_dpo_config


def get_config():
    config = base_config()
    generate_config(config)  # model.path ("" = WORKDIR/base_ckpt), video, sampler for the aligned model
    config.stage = "pipeline"
    config.pipeline.stages = ("pairs", "train_dpo")
    shapes_dpo_config(config)  # pairs + dpo: the settings in the docstring above
    config.checkpoint.every_steps = 50
    config.log.every_steps = 10
    return config
