"""The demo (configs/demo.py) reduced for CI: one config for the end-to-end test (tests/test_demo.py).

    python -m halo_jax.main --config=tests/reduced_demo.py --workdir=DIR              # every demo stage
    python -m halo_jax.main --config=tests/reduced_demo.py:multihost --workdir=DIR    # up to train_dpo
    python -m halo_jax.main --config=tests/reduced_demo.py:compare --workdir=DIR \
        --config.dpo.pairs_dir=DEMO_WORKDIR/pairs                                     # stage compare

2 prompts x 4 samples, 10 sampler steps (fewer give every seed nearly the conditional mean, and
no patch differs between a prompt's videos), 2 + 2 reward steps, 2 DPO steps, then evaluate (2 held-out
prompts x 1 seed, base vs Gran-DPO, report). Every size is the smallest that still runs each stage's
multi-host path (each of 2 processes gets a share of every stage's items and half of every global
batch). Batch sizes are global and split over 8 devices and 2 processes; each equals the number of
records it batches, so one compile per stage. The "multihost" variant stops after train_dpo: the
evaluate stage's multi-host path (each process samples its share, process 0 merges) is generate's.
"""

import importlib.util
from pathlib import Path

from halo_jax.config import compare_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "label", "train_reward", "score", "pairs", "train_dpo", "evaluate")
VARIANTS = {"": STAGES, "multihost": STAGES[:-1], "compare": ("compare",)}
PROBE_STEPS, PROBE_LR = 16, 1e-3  # tests/dpo_probe.py: Gran-DPO steps on the demo's pairs


def get_config(variant: str = ""):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of tests/reduced_demo.py; choose one of {sorted(VARIANTS)}")
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = reduce(module.get_config())
    config.pipeline.stages = VARIANTS[variant]
    if variant == "compare":  # configs/shapes_halo.py's last stage, one training seed, on the demo's pairs
        config.compare = compare_config()
        config.compare.seeds = (0,)
    return config


def reduce(config):
    """Every reduction of the demo config in one place (the demo's defaults stay untouched)."""
    config.sampler.num_steps = 10
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
    # the schedule of tests/dpo_probe.py's 16 steps at 1e-3: the probe's step is this stage's compiled program
    config.dpo.update(steps=2, batch_size=8, warmup_steps=1, learning_rate=PROBE_LR, schedule_steps=PROBE_STEPS)
    config.evaluate.update(num_prompts=2, samples_per_prompt=1, batch_size=2, bootstrap=50, report_prompts=2)
    config.checkpoint.every_steps = 2
    config.log.update(every_steps=1, progress=False)
    return config
