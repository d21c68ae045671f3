"""Batched, jitted reward-model inference on this process's devices.

`Scorer(model, tokenizer, text_max_length, batch_size)` places the model on a mesh of the
local devices (parameters by their logical axes, batches over ('data', 'fsdp')) and
compiles one forward for one padded batch shape: the last, short batch is padded by
repeating its first video and the padding is dropped from the result, so a whole store is
scored with a single compile. No cross-process collective runs: every process scores its
own share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from halo_jax.parallel import mesh as mesh_lib
from halo_jax.parallel.sharding import DEFAULT_RULES, Rules, batch_sharding, state_shardings
from halo_jax.reward.model_io import tokenize


class Scorer:
    """`score(frames, prompts) -> {'video': (N, A), 'patch': (N, A, Tp, Hp, Wp)}` float32 numpy."""

    def __init__(self, model: nnx.Module, tokenizer: Any, text_max_length: int, batch_size: int = 8,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
        self.mesh = mesh or mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.local_devices())
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-max(int(batch_size), 1) // shards) * shards  # a multiple of the batch shards
        self.tokenizer, self.text_max_length = tokenizer, int(text_max_length)
        self.config = model.config
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, state_shardings(state, self.mesh, rules))
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._sharding = {nd: batch_sharding(self.mesh, nd) for nd in (2, 5)}

        def forward(state, frames, ids, mask):
            out = nnx.merge(graphdef, state)(frames, ids, mask)
            return {"video": out["video"], "patch": out["patch"]}

        self._forward = jax.jit(forward)

    def tokens(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        new = [p for p in set(prompts) if p not in self._tokens]
        if new:
            self._tokens.update(tokenize(self.tokenizer, new, self.text_max_length))
        return (np.stack([self._tokens[p][0] for p in prompts]), np.stack([self._tokens[p][1] for p in prompts]))

    def score_batch(self, frames: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """One batch of at most `batch_size` videos (uint8 (N, F, H, W, 3) or floats in [0, 1])."""
        n = len(prompts)
        if n == 0 or n > self.batch_size or len(frames) != n:
            raise ValueError(f"score_batch takes 1..{self.batch_size} videos with one prompt each, got {len(frames)} "
                             f"videos and {n} prompts")
        ids, mask = self.tokens(prompts)
        frames = np.asarray(frames)
        pad = self.batch_size - n
        if pad:
            frames = np.concatenate([frames, np.repeat(frames[:1], pad, axis=0)])
            ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
        with jax.set_mesh(self.mesh):
            out = self._forward(self._state, jax.device_put(frames, self._sharding[5]),
                                jax.device_put(ids, self._sharding[2]), jax.device_put(mask, self._sharding[2]))
        return {k: np.asarray(jax.device_get(v))[:n] for k, v in out.items()}

    def score(self, frames: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Any number of videos, in batches."""
        if len(frames) != len(prompts):
            raise ValueError(f"{len(frames)} videos but {len(prompts)} prompts")
        outs = [self.score_batch(np.stack(frames[s:s + self.batch_size]), list(prompts[s:s + self.batch_size]))
                for s in range(0, len(prompts), self.batch_size)]
        if not outs:
            a, grid = len(self.config.aspects), self.config.grid
            return {"video": np.zeros((0, a), np.float32), "patch": np.zeros((0, a, *grid), np.float32)}
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def aspect_weight_vector(weights: dict[str, float], aspects: Sequence[str]) -> np.ndarray:
    """(A,) weights of the overall reward R = sum_a w_a s_a / sum_a w_a, in the model's aspect order.

    An empty mapping weighs every aspect 1; an aspect the mapping does not name gets 0; a name
    that is not one of `aspects`, a negative or non-finite weight, or an all-zero vector is an error.
    """
    if not weights:
        return np.ones(len(aspects), np.float64)
    unknown = sorted(set(weights) - set(aspects))
    if unknown:
        raise ValueError(f"aspect weights name {unknown}, which the reward model does not score; its aspects are "
                         f"{list(aspects)}")
    w = np.array([float(weights.get(a, 0.0)) for a in aspects], np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"aspect weights {dict(weights)} must be finite, >= 0 and not all 0")
    return w


def overall_reward(video_scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N,) weighted mean of the video scores (N, A) over aspects."""
    return np.asarray(video_scores, np.float64) @ weights / weights.sum()
