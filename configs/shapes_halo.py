"""The README's results table: base vs Diffusion-DPO vs Gran-DPO on the moving-shapes world.

    python -m halo_jax.main --config=configs/shapes_halo.py --workdir=workdir/shapes_halo

The demo's pipeline (configs/demo.py: shipped tiny Wan model, oracle labels, reward model, pairs) on
64 training prompts x 4 samples, then stage `compare`: Diffusion-DPO (`patch_weight = 0`) and Gran-DPO
(`patch_weight = 1`) trained on the same pairs for 200 steps each with training seeds 0, 1, 2, evaluated on 24
held-out prompts x 4 sampling seeds (the same for every model) by the oracle. Prints and writes
WORKDIR/compare/results.md (the table and whether its targets are met) and the HTML report under
WORKDIR/evaluate/report/. Resumable.
"""

import importlib.util
from pathlib import Path

from halo_jax.config import compare_config

STAGES = ("generate", "label", "train_reward", "score", "pairs", "compare")


def get_config():
    spec = importlib.util.spec_from_file_location("demo_config", Path(__file__).resolve().parent / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.pipeline.stages = STAGES
    config.generate.update(num_prompts=64, samples_per_prompt=4)  # 256 rollouts -> up to 128 pairs
    config.dpo.steps = 200
    config.compare = compare_config()  # diffusion_dpo (patch_weight 0) and gran_dpo (1), seeds 0, 1, 2
    config.evaluate.update(num_prompts=24, samples_per_prompt=4)
    return config
