"""Stage `score`: the reward model over every rollout -> the score store `scores/`.

Each process scores its share of the rollout records (round robin) on its own devices,
batched and jitted (`halo_jax.reward.scorer.Scorer`: one compile for the whole store), and
appends to `scores/` (`data/stores/`); ids already stored are skipped, so a killed run
resumes where it stopped. Schema (one record per rollout, id `video_id`):

    video_id (str), prompt (str), prompt_index, sample_index, seed (int),
    aspects (json: the model's aspect names, the order of the arrays),
    video_scores float32 (A,), patch_scores float32 (A, Tp, Hp, Wp),
    reward (float) = sum_a w_a video_scores[a] / sum_a w_a, w = `score.aspect_weights`

Clips are fitted to the shape the reward model was trained on (its export's `info.clip`)
before scoring. The `pairs` stage reads this store.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import logging

from halo_jax.config import ConfigError
from halo_jax.data.stores import Field, Schema, StoreReader, StoreWriter
from halo_jax.parallel import distributed, mesh as mesh_lib
from halo_jax.reward.data import fit_clip
from halo_jax.reward.model_io import load_reward_model
from halo_jax.reward.scorer import Scorer, aspect_weight_vector, overall_reward
from halo_jax.train.metrics import Progress

STORE_NAME = "scores"


def score_schema(num_aspects: int, grid: tuple[int, int, int]) -> Schema:
    """The schema of the `scores/` store (module docstring)."""
    return Schema(STORE_NAME, "video_id", (
        Field("video_id", "str"), Field("prompt", "str"), Field("prompt_index", "int"), Field("sample_index", "int"),
        Field("seed", "int"), Field("aspects", "json"),
        Field.array("video_scores", np.float32, (num_aspects,)),
        Field.array("patch_scores", np.float32, (num_aspects, *grid)),
        Field("reward", "float")))


def model_path(config, workdir: str) -> Path:
    path = Path(config.score.model_path) if config.score.model_path else Path(workdir) / "reward_ckpt"
    if not (path / "config.json").exists():
        raise ConfigError(f"no reward model at {path}; run the train_reward stage first or set "
                          "--config.score.model_path to a reward-model export")
    return path


def config_aspect_weights(config, aspects) -> np.ndarray:
    """(A,) weights of the overall reward from `score.aspect_weights` (every aspect 1 without a `score`
    section), checked against the reward model's `aspects` (a ConfigError names the setting)."""
    try:
        return aspect_weight_vector(dict(config.score.aspect_weights) if "score" in config else {}, aspects)
    except ValueError as e:
        raise ConfigError(f"score.aspect_weights: {e}") from None


def run(config, workdir: str, out: Path | None = None) -> Path:
    s = config.score
    rollouts = Path(workdir) / "rollouts"
    out = out or Path(workdir) / STORE_NAME
    if not (rollouts / "store.json").exists():
        raise ConfigError(f"no rollout store at {rollouts}; run the generate stage first")
    local = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())
    loaded = load_reward_model(model_path(config, workdir), local, config.sharding.rules)
    cfg = loaded.model.config
    aspects = list(cfg.aspects)
    weights = config_aspect_weights(config, aspects)
    clip = loaded.info.get("info", {}).get("clip")
    scorer = Scorer(loaded.model, loaded.tokenizer, loaded.text_max_length, s.batch_size, mesh=local,
                    rules=config.sharding.rules)
    reader = StoreReader(rollouts, on_corrupt=s.on_corrupt)
    mine = distributed.process_share(range(len(reader)))
    scored = []
    with StoreWriter(out, score_schema(len(aspects), cfg.grid), chunk_size=s.chunk_size) as writer:
        done = writer.done_ids()
        todo = [i for i in mine if reader.fields(i)["video_id"] not in done]
        progress = Progress(len(mine), "score", start=len(mine) - len(todo), unit="video")
        for start in range(0, len(todo), scorer.batch_size):
            recs = [r for r in (reader[i] for i in todo[start:start + scorer.batch_size]) if r is not None]
            if recs:
                frames = np.stack([fit_clip(r["frames"], clip) if clip else r["frames"] for r in recs])
                res = scorer.score_batch(frames, [r["prompt"] for r in recs])
                rewards = overall_reward(res["video"], weights)
                for r, v, p, rew in zip(recs, res["video"], res["patch"], rewards):
                    writer.write({"video_id": r["video_id"], "prompt": r["prompt"], "prompt_index": r["prompt_index"],
                                  "sample_index": r["sample_index"], "seed": r["seed"], "aspects": aspects,
                                  "video_scores": v.astype(np.float32), "patch_scores": p.astype(np.float32),
                                  "reward": float(rew)})
                    scored.append(float(rew))
            progress.update(min(scorer.batch_size, len(todo) - start))
    if reader.problems:
        logging.warning("score: %d rollout records were skipped: %s", len(reader.problems), reader.problems[:5])
    distributed.barrier("score")
    if scored:
        print(f"score: {len(scored)} videos scored now (mean reward {np.mean(scored):.3f}); store {out}")
    else:
        print(f"score: nothing to do, every rollout of this process is already in {out}")
    return out
