"""Reward-model training losses (jittable; scores on the 1..5 label scale).

Per video i with predicted scores s_i (A,), labels y_i (A,), weight w_i (0 for padding) and,
where it has patch labels (h_i = 1), predicted and labelled cell scores S_i, Y_i (A, Tp, Hp, Wp):

    regression      L_reg  = sum_i w_i mean_a (s_ia - y_ia)^2 / sum_i w_i
    Bradley-Terry   L_bt   = mean over (i, j, a) with group_i = group_j, y_ia - y_ja > margin of
                             -log sigmoid((s_ia - s_ja) / tau)
                    (pairs only form among videos of the same prompt: a batch holds whole
                    prompt groups, so every batch has pairs)
    patch           L_p    = sum_i w_i h_i mean_{a,cells} (S_i - Y_i)^2 / sum_i w_i h_i
    consistency     L_c    = sum_i w_i mean_a (sg(s_ia) - mean_cells S_ia)^2 / sum_i w_i
    twins           L_tw   = L_bt over the pairs of records of one video (video_key_i = video_key_j: a
                             mismatched video and its copy labelled against the prompt it shows, so only
                             the text tells them apart), of the raw video scores and, in phase 2, of every
                             cell's raw scores (each cell and aspect a pair of its own)
    cell ranking    L_cr   = L_bt over the pairs of cells of one video (and aspect) whose labels differ by more
                             than the margin, of the raw cell scores: phase 2; a score the whole clip shares
                             cancels in every pair, so only what tells one cell from another learns from it

Phase 0 (the towers' video-text matching, SigLIP's sigmoid loss) on logits L (N, N) of every
video against every prompt of the batch, with z_ij = +1 when videos i and j share a prompt
(group) and -1 otherwise:

    matching        L_m    = sum_i w_i sum_j w_j softplus(-z_ij L_ij) / sum_i w_i
    word            L_w    = -sum_i w_i sum_s m_is log softmax_u L(v_i, t_i^(s<-u))[u = word_is] / sum_i w_i sum_s m_is

(L_ij from `models/reward/matching.py`'s cosines of the videos' and prompts' matching vectors; L_w, weight
`word`, text towers of depth 0 only: for every token s of video i's prompt, m_is its text mask (0 also at
phrase separators), the prompt's own word against every vocabulary word u put in its place, `RewardModel.word_fit`: a
softmax over the words, so a shape word must beat the other shapes for the same video, which in-batch
prompts of other colours never ask; phase 0 minimises L_m + w_word L_w.)

With a reward model that clips its scores (`clip_scores`: outputs s = clip(r, 1, 5), raw head
outputs r), the squared errors (s - y)^2 of L_reg and L_p become censored ones: a label at a bound is
met by any raw score in a band from `bound_margin` m to m + BOUND_BAND (one score unit) beyond it,

    e = r - clip(r, 5 + m, 6 + m)  where y = 5,   e = r - clip(r, -m, 1 - m)  where y = 1,   e = s - y  elsewhere,

so clean cells and videos (exactly 5) are pushed past 5 by the margin m and their clipped scores tie
there, as the labels do. The band's far side keeps raw scores finite: with a half-line (no far side,
until 2026-12-04) nothing held the raw scores of cells labelled 1, they drifted to -500, and clean
cells whose features followed them gave loss spikes (docs/architecture.md, "Keeping raw scores finite").
The consistency term of a clipping model reads the clipped cell scores with the clip's own gradient
(zero beyond a bound): through the identity gradient it kept pulling cells already at 1 further down
whenever their video's score was below the mean of its cells, which no other term opposed once a cell's
label was near 1, and the raw scores of defective cells drifted to -1000.

`sg` is stop_gradient: the consistency term pulls the patch scale onto the video scale
learnt in phase 1 and never drags the video head towards the patches (phase 2 must not
lower video accuracy). Phase 1 minimises `w_reg L_reg + w_bt L_bt + w_tw L_tw(video)`; phase 2 adds
`w_p L_p + w_c L_c + w_tw L_tw(cells) + w_cr L_cr`. Empty sums (no pair, no patch label) give 0, not NaN. L_tw shares
L_bt's margin and temperature; it reads the raw scores (a clipped score would stop at 5 whatever its twin).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from halo_jax.config import check_fields
from halo_jax.models.reward.matching import match_cosines
from halo_jax.teachers.base import SCORE_MAX, SCORE_MIN

BOUND_BAND = 1.0  # width of the band of raw scores that meets a label at a bound (module docstring)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (module docstring); `bt_margin` and `bt_temperature` shape L_bt and L_tw,
    `bound_margin` the censored errors of a clipping model."""

    regression: float = 1.0
    bradley_terry: float = 0.0
    patch: float = 1.0
    consistency: float = 0.1
    bt_margin: float = 0.0
    bt_temperature: float = 1.0
    bound_margin: float = 0.0
    word: float = 0.0
    twin: float = 0.0
    cell_ranking: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"loss weight {f.name}={getattr(self, f.name)} must be >= 0")
        if self.bt_temperature <= 0:
            raise ValueError(f"bt_temperature must be > 0, got {self.bt_temperature}")
        if self.regression == 0 and self.bradley_terry == 0:
            raise ValueError("the video loss needs regression > 0 or bradley_terry > 0 (both are 0)")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> LossWeights:
        check_fields(cls, m)
        return cls(**{k: float(v) for k, v in m.items()})


def _wmean(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-12)


def score_error(pred: jax.Array, target: jax.Array, raw: jax.Array | None = None, margin: float = 0.0) -> jax.Array:
    """pred - target, or with the raw (unclipped) scores of a clipping model the censored error
    (module docstring): at a bound label, the signed distance of `raw` from the band `margin` to
    `margin + BOUND_BAND` beyond the bound."""
    if raw is None:
        return pred - target
    above = raw - jnp.clip(raw, SCORE_MAX + margin, SCORE_MAX + margin + BOUND_BAND)
    below = raw - jnp.clip(raw, SCORE_MIN - margin - BOUND_BAND, SCORE_MIN - margin)
    return jnp.where(target >= SCORE_MAX, above, jnp.where(target <= SCORE_MIN, below, pred - target))


def regression_loss(pred: jax.Array, target: jax.Array, weight: jax.Array, raw: jax.Array | None = None,
                    margin: float = 0.0) -> jax.Array:
    """L_reg: pred/target (N, A), weight (N,); `raw`, `margin`: `score_error`."""
    return _wmean(jnp.mean(score_error(pred, target, raw, margin) ** 2, axis=-1), weight)


def bradley_terry_loss(pred: jax.Array, target: jax.Array, groups: jax.Array, weight: jax.Array,
                       margin: float = 0.0, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(L_bt, number of pairs): pred/target (N, K), groups (N,) ints, weight (N,) (pairs need both > 0)."""
    dt = target[:, None, :] - target[None, :, :]  # (N, N, K): y_i - y_j
    dp = (pred[:, None, :] - pred[None, :, :]) / temperature
    same = (groups[:, None] == groups[None, :]) & (weight[:, None] > 0) & (weight[None, :] > 0)
    valid = (same[..., None] & (dt > margin)).astype(jnp.float32)
    n = jnp.sum(valid)
    return jnp.sum(valid * jax.nn.softplus(-dp)) / jnp.maximum(n, 1.0), n


def twin_loss(pred: jax.Array, target: jax.Array, video_key: jax.Array, weight: jax.Array, weights: LossWeights
              ) -> tuple[jax.Array, jax.Array]:
    """(L_tw, number of pairs): `bradley_terry_loss` with the records of one video (`video_key` (N,)) as the groups;
    pred/target (N, K), K aspects or aspects x cells."""
    return bradley_terry_loss(pred.astype(jnp.float32), target.astype(jnp.float32), video_key, weight,
                              weights.bt_margin, weights.bt_temperature)


def cell_ranking_loss(raw: jax.Array, target: jax.Array, weight: jax.Array, weights: LossWeights
                      ) -> tuple[jax.Array, jax.Array]:
    """(L_cr, number of pairs): raw/target (N, A, Tp, Hp, Wp), weight (N,) (already times has_patch):
    `bradley_terry_loss` with the cells as the rows, one group, and every (video, aspect) a column of its own."""
    # a video without weight gets constant targets: no pair of its cells has a label difference
    target = target.astype(jnp.float32) * (weight > 0)[:, None, None, None, None]
    rows, cols = raw[0, 0].size, raw.shape[0] * raw.shape[1]
    pred, target = (x.astype(jnp.float32).reshape(cols, rows).T for x in (raw, target))  # (cells, N A)
    return bradley_terry_loss(pred, target, jnp.zeros(rows, jnp.int32), jnp.ones(rows), weights.bt_margin,
                              weights.bt_temperature)


def patch_loss(pred: jax.Array, target: jax.Array, weight: jax.Array, raw: jax.Array | None = None,
               margin: float = 0.0) -> jax.Array:
    """L_p: pred/target (N, A, Tp, Hp, Wp), weight (N,) (already times has_patch); `raw`, `margin`: `score_error`."""
    err = score_error(pred, target, raw, margin)
    return _wmean(jnp.mean(err ** 2, axis=tuple(range(1, pred.ndim))), weight)


def matching_loss(logits: jax.Array, groups: jax.Array, weight: jax.Array, col_groups: jax.Array | None = None,
                  col_weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(L_m, accuracy of sign(L_ij) = z_ij over valid pairs): logits (N, M) of N videos against M prompts,
    groups / weight (N,) of the videos, col_groups / col_weight (M,) of the prompts (default: the videos' own,
    M = N). z_ij = 1 where video i's group is prompt j's, else -1;
    L_m = sum_ij w_i w_j softplus(-z_ij L_ij) / sum_i w_i."""
    col_groups = groups if col_groups is None else col_groups
    col_weight = weight if col_weight is None else col_weight
    z = jnp.where(groups[:, None] == col_groups[None, :], 1.0, -1.0)
    pair_w = weight[:, None] * col_weight[None, :]
    loss = jnp.sum(pair_w * jax.nn.softplus(-z * logits)) / jnp.maximum(jnp.sum(weight), 1e-12)
    accuracy = jnp.sum(pair_w * (jnp.sign(logits) == z)) / jnp.maximum(jnp.sum(pair_w), 1e-12)
    return loss, accuracy


def consistency_loss(video: jax.Array, patch: jax.Array, weight: jax.Array) -> jax.Array:
    """L_c: video (N, A), patch (N, A, Tp, Hp, Wp), weight (N,)."""
    agg = jnp.mean(patch, axis=tuple(range(2, patch.ndim)))
    return _wmean(jnp.mean((jax.lax.stop_gradient(video) - agg) ** 2, axis=-1), weight)


def reward_losses(out: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], weights: LossWeights,
                  phase: int) -> tuple[jax.Array, dict]:
    """Total loss and its terms for model outputs `out` ({'video', 'patch'}) on a flat batch.

    `batch`: video_scores (N, A), patch_scores (N, A, Tp, Hp, Wp), has_patch (N,), valid (N,),
    group (N,), and with `weights.twin` video_key (N,). Phase 1: video terms; phase 2: video + patch +
    consistency terms. Raw scores in `out` ('video_raw', 'patch_raw': a clipping model) make the squared
    errors censored ones.
    """
    if phase not in (1, 2):
        raise ValueError(f"phase must be 1 or 2, got {phase}")
    video = out["video"].astype(jnp.float32)
    w = batch["valid"].astype(jnp.float32)
    y = batch["video_scores"].astype(jnp.float32)
    metrics: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    margin = weights.bound_margin
    reg = regression_loss(video, y, w, out.get("video_raw"), margin)
    metrics["video_mse"] = reg
    metrics["video_mae"] = _wmean(jnp.mean(jnp.abs(video - y), axis=-1), w)
    if weights.regression > 0:
        total = total + weights.regression * reg
    if weights.bradley_terry > 0:
        bt, pairs = bradley_terry_loss(video, y, batch["group"], w, weights.bt_margin, weights.bt_temperature)
        total = total + weights.bradley_terry * bt
        metrics["bradley_terry"], metrics["bt_pairs"] = bt, pairs
    if weights.twin > 0:
        tw, pairs = twin_loss(out.get("video_raw", video), y, batch["video_key"], w, weights)
        total = total + weights.twin * tw
        metrics["twin"], metrics["twin_pairs"] = tw, pairs
    if phase == 2:
        patch = out["patch"].astype(jnp.float32)
        wp = w * batch["has_patch"].astype(jnp.float32)
        lp = patch_loss(patch, batch["patch_scores"].astype(jnp.float32), wp, out.get("patch_raw"), margin)
        if "patch_raw" in out:  # a cell at a bound cannot move its aggregate further: no gradient there
            patch = jnp.clip(out["patch_raw"].astype(jnp.float32), SCORE_MIN, SCORE_MAX)
        lc = consistency_loss(video, patch, w)
        total = total + weights.patch * lp + weights.consistency * lc
        metrics["patch_mse"], metrics["consistency"] = lp, lc
        raw = out.get("patch_raw", out["patch"]).astype(jnp.float32)  # the ranking terms read raw cell scores
        if weights.twin > 0:
            tw, pairs = twin_loss(raw.reshape(raw.shape[0], -1), batch["patch_scores"].reshape(raw.shape[0], -1),
                                  batch["video_key"], wp, weights)
            total = total + weights.twin * tw
            metrics["patch_twin"], metrics["patch_twin_pairs"] = tw, pairs
        if weights.cell_ranking > 0:
            cr, pairs = cell_ranking_loss(raw, batch["patch_scores"], wp, weights)
            total = total + weights.cell_ranking * cr
            metrics["cell_ranking"], metrics["cell_ranking_pairs"] = cr, pairs
        metrics["patch_videos"] = jnp.sum(wp)
    return total, metrics


def matching_terms(model, batch: Mapping[str, jax.Array], word: float = 0.0) -> tuple[jax.Array, dict]:
    """Phase 0: L_m of every video against the batch's prompts and, when the batch has them, the hard
    negatives (negative_ids / negative_mask (N, K, S), negative_group / negative_valid (N, K)) as more
    prompt columns: a negative is positive only for videos of the prompt it names; plus `word` L_w."""
    valid = batch["valid"].astype(jnp.float32)
    ids, mask, col_groups, col_weight = batch["input_ids"], batch["text_mask"], batch["group"], valid
    if "negative_ids" in batch:
        n, k, s = batch["negative_ids"].shape
        ids = jnp.concatenate([ids, batch["negative_ids"].reshape(n * k, s)])
        mask = jnp.concatenate([mask, batch["negative_mask"].reshape(n * k, s)])
        col_groups = jnp.concatenate([col_groups, batch["negative_group"].reshape(n * k)])
        col_weight = jnp.concatenate([valid, (batch["negative_valid"] * valid[:, None]).reshape(n * k)])
    video = model.match_video(batch["frames"])  # one pass of the towers for both terms
    logits = model.scaled(match_cosines(video, model.match_text(ids, mask)))
    loss, accuracy = matching_loss(logits, batch["group"], valid, col_groups, col_weight)
    metrics = {"matching": loss, "match_accuracy": accuracy}
    if word > 0:
        tokens = model.text_groups(batch["input_ids"], batch["text_mask"]).sum(-1) * valid[:, None]  # m_is
        fit = model.word_fit(video, batch["input_ids"], batch["text_mask"])
        metrics["word"] = -jnp.sum(fit * tokens) / jnp.maximum(jnp.sum(tokens), 1.0)
        loss = loss + word * metrics["word"]
    return loss, metrics


def make_loss_fn(weights: LossWeights, phase: int):
    """`loss_fn(model, batch, key) -> (loss, metrics)` for `train.state.make_train_step`; phase 0 is L_m,
    phases 1 and 2 are `reward_losses`.

    `batch`: frames (N, F, H, W, 3), input_ids / text_mask (N, S) and the label fields of
    `reward_losses`; the model is a `RewardModel`.
    """

    def loss_fn(model, batch, key):
        del key  # the reward model has no dropout
        if phase == 0:
            return matching_terms(model, batch, weights.word)
        out = model(batch["frames"], batch["input_ids"], batch["text_mask"])
        return reward_losses(out, batch, weights, phase)

    return loss_fn
