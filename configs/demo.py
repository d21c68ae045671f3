"""The whole HALO pipeline on the shipped tiny Wan model of the moving-shapes world (`make demo`).

    python -m halo_jax.main --config=configs/demo.py --workdir=workdir/demo

generate (16 training prompts x 4 seeds) -> label (the exact oracle) -> train_reward (video, then
patch phase, on the labels + rendered videos with injected defects) -> score -> pairs -> train_dpo
(Gran-DPO, LoRA) -> evaluate (base vs Gran-DPO on held-out prompts, same seeds; HTML report).
Sized for a 2-core CPU; every stage resumes, so re-running the command finishes an interrupted run.
"""

from halo_jax.assets import SHAPES_WAN
from halo_jax.config import (base_config, evaluate_config, generate_config, label_config, reward_config, score_config,
                             shapes_dpo_config)

STAGES = ("generate", "label", "train_reward", "score", "pairs", "train_dpo", "evaluate")


def get_config():
    config = base_config()
    config.stage = "pipeline"
    config.pipeline.stages = STAGES
    generate_config(config)
    config.model.path = str(SHAPES_WAN)
    config.sampler.update(num_steps=20, guidance_scale=3.0)  # held-out text alignment 2.47 at 3, 2.29 at 5
    config.generate.update(shapes_split="train", num_prompts=16, samples_per_prompt=4, batch_size=16)
    config.label = label_config()  # the oracle
    config.reward = r = reward_config()
    r.synthetic_videos = 256
    r.video.update(frames=9, height=32, width=32)
    r.model.update(num_frames=9, width=64, num_layers=1, head_hidden=64)
    r.model.vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, patch_size=8)
    r.model.text.update(hidden_size=32, intermediate_size=64)
    r.phase1.update(steps=150, batch_size=16, learning_rate=2e-3, warmup_steps=20)
    r.phase2.update(steps=150, batch_size=16, learning_rate=1e-3, warmup_steps=20)
    r.eval_batch_size = 16
    config.score = score_config()
    config.score.batch_size = 16
    shapes_dpo_config(config)  # pairs + dpo as configs/shapes_dpo.py, shorter and faster:
    config.pairs.margin_video = 0.1
    config.dpo.update(steps=100, learning_rate=2e-4)
    config.evaluate = evaluate_config()
    config.evaluate.update(num_prompts=8, prompt_selection="spread", samples_per_prompt=2, batch_size=16,
                           report_prompts=4)
    config.checkpoint.every_steps = 50
    config.log.every_steps = 10
    return config
