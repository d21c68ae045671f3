"""The stage registry: `config.stage` -> a `run(config, workdir)` function.

Stages are imported lazily (by module path) so that `--help`, config errors and
light stages stay fast. `pipeline` runs `config.pipeline.stages` in order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES: dict[str, str] = {
    "describe": "halo_jax.stages.describe",
    "pretrain": "halo_jax.stages.pretrain",
    "generate": "halo_jax.stages.generate",
    "label": "halo_jax.stages.label",
    "train_reward": "halo_jax.stages.train_reward",
    "score": "halo_jax.stages.score",
    "pairs": "halo_jax.stages.pairs",
    "train_dpo": "halo_jax.stages.train_dpo",
    "evaluate": "halo_jax.stages.evaluate",
    "compare": "halo_jax.stages.compare",
}
PIPELINE = "pipeline"


def stage_names() -> list[str]:
    return sorted(STAGES) + [PIPELINE]


def get_stage(name: str) -> Callable:
    """The `run(config, workdir)` of stage `name`; `ValueError` lists the valid names."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of: {', '.join(stage_names())}")
    return importlib.import_module(STAGES[name]).run
