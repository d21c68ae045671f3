"""Stage `label`: a teacher scores every rollout, per video and per patch, into `labels/`.

Wiring over `teachers.labeling.label_videos`: the rollout store gives (video_id, prompt,
frames loader); the durable label store (`data/label_store.py`) caches by content hash,
teacher, model, prompt version, grid and aspects, so a re-run or a resumed run never asks
the teacher twice. Item i belongs to process `i % process_count`.
"""

from __future__ import annotations

from pathlib import Path

import jax
from absl import logging

from halo_jax.config import ConfigError
from halo_jax.data.label_store import LabelStore
from halo_jax.data.stores import StoreReader
from halo_jax.parallel import distributed
from halo_jax.teachers.labeling import LabelItem, label_videos, summary_lines

TEACHERS = ("oracle", "openai_vlm")


def make_teacher(config):
    """The configured teacher, with the run's aspects and grid."""
    aspects, grid = tuple(config.aspects), tuple(config.grid)
    if config.label.teacher == "oracle":
        from halo_jax.teachers.oracle import OracleTeacher

        return OracleTeacher(aspects=aspects, grid=grid)
    if config.label.teacher == "openai_vlm":
        return vlm_teacher(config)
    raise ConfigError(f"label.teacher={config.label.teacher!r}; choose one of {TEACHERS}")


def vlm_teacher(config):
    """The OpenAI-compatible VLM teacher of `config.label.openai` (GPT-4o by default) with the run's aspects and grid;
    stage `evaluate` judges with it too (`evaluate.vlm_judge`)."""
    from halo_jax.teachers.openai_vlm import OpenAIVLMConfig, OpenAIVLMTeacher

    return OpenAIVLMTeacher(OpenAIVLMConfig.from_mapping({**config.label.openai.to_dict(),
                                                          "aspects": tuple(config.aspects), "grid": tuple(config.grid)}))


def run(config, workdir: str, rollouts: Path | None = None, out: Path | None = None) -> dict:
    rollouts = rollouts or Path(workdir) / "rollouts"
    out = out or Path(workdir) / "labels"
    if not (rollouts / "store.json").exists():
        raise ConfigError(f"no rollout store at {rollouts}; run the generate stage first")
    reader = StoreReader(rollouts, on_corrupt=config.label.on_corrupt)
    items = []
    for i in range(len(reader)):
        small = reader.fields(i)
        items.append(LabelItem(small["video_id"], small["prompt"], lambda i=i: reader[i]["frames"]))
    store = LabelStore(out, process_index=jax.process_index(), on_corrupt=config.label.on_corrupt)
    try:
        summary = label_videos(items, make_teacher(config), store, aspects=tuple(config.aspects),
                               grid=tuple(config.grid), concurrency=config.label.concurrency,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               retry_failures=config.label.retry_failures, dry_run=config.label.dry_run)
    finally:
        store.close()
    for line in summary_lines(summary):
        print(line)
    if reader.problems:
        logging.warning("label: %d rollout records were skipped: %s", len(reader.problems), reader.problems[:5])
    distributed.barrier("label")
    return summary
