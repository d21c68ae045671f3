"""The demo (configs/demo.py) reduced further, for the multi-host pipeline test (tests/test_multihost_pipeline.py).

    python -m halo_jax.main --config=tests/multihost_config.py --workdir=DIR

2 prompts x 4 samples, 2 sampler steps, 2 + 2 reward steps, 2 DPO steps, no evaluate: every size is the
smallest that still runs each stage's multi-host path (each of 2 processes gets a share of every
stage's items and half of every global batch). Batch sizes are global and split over 8 devices and
2 processes; each equals the number of records it batches, so one compile per stage.
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "label", "train_reward", "score", "pairs", "train_dpo")


def get_config():
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return reduce(module.get_config())


def reduce(config):
    """Every reduction of the demo config in one place (the demo's defaults stay untouched)."""
    config.pipeline.stages = STAGES
    config.sampler.num_steps = 2
    config.generate.update(num_prompts=2, samples_per_prompt=4, batch_size=8)
    r = config.reward
    r.synthetic_videos = 8  # + the 8 labelled rollouts: 4 prompt groups of 4 (2 per process)
    r.synthetic.chunk_size = 4
    r.heldout_fraction = 0.0  # no held-out evaluation (a process-0-only forward, not multi-host)
    r.model.vision.num_hidden_layers = 1
    r.phase1.update(steps=2, batch_size=8, warmup_steps=1)  # 2 groups of 4: one per process
    r.phase2.update(steps=2, batch_size=8, warmup_steps=1)
    r.eval_batch_size = 4
    config.score.batch_size = 8
    config.pairs.update(margin_video=0.0, margin_patch=0.01)  # a margin: no sign flips on float noise
    config.dpo.update(steps=2, batch_size=8, warmup_steps=1)
    config.checkpoint.every_steps = 2
    config.log.update(every_steps=1, progress=False)
    return config
