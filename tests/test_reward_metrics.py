"""Reward metrics and losses against brute-force NumPy definitions (ties included), and the report."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from halo_jax.reward import losses, metrics


def ref_ranks(x):
    """rank_i = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2 (the average-rank definition)."""
    x = np.asarray(x, float)
    return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])


def ref_pearson(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    num = sum((a - mx) * (b - my) for a, b in zip(x, y))
    den = math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    return num / den


def ref_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def ref_pairwise(pred, target, groups):
    total = count = 0
    for i, j in itertools.combinations(range(len(pred)), 2):
        if groups[i] != groups[j] or target[i] == target[j]:
            continue
        count += 1
        dp = pred[i] - pred[j]
        total += 0.5 if dp == 0 else float(np.sign(dp) == np.sign(target[i] - target[j]))
    return total / count, count


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 41
    target = np.round(rng.uniform(1, 5, n) * 2) / 2  # many ties
    pred = np.round(target + rng.normal(0, 1.0, n), 1)  # some ties too
    groups = rng.integers(0, 6, n)
    np.testing.assert_allclose(metrics.rankdata(target), ref_ranks(target))
    assert metrics.pearson(pred, target) == pytest.approx(ref_pearson(pred, target), abs=1e-12)
    assert metrics.spearman(pred, target) == pytest.approx(ref_pearson(ref_ranks(pred), ref_ranks(target)), abs=1e-12)
    acc, count = metrics.pairwise_accuracy(pred, target, groups)
    ref_acc, ref_count = ref_pairwise(pred, target, groups)
    assert count == ref_count and acc == pytest.approx(ref_acc, abs=1e-12)
    defect = target < 3.0
    assert metrics.auroc(-pred, defect) == pytest.approx(ref_auroc(-pred, defect), abs=1e-12)


def test_metric_edge_cases():
    assert metrics.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.spearman([1, 1, 2, 2], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))  # constant input: undefined
    assert metrics.auroc([0.5, 0.5, 0.5], [True, False, True]) == 0.5  # all tied
    assert metrics.auroc([3, 1, 2], [True, False, False]) == 1.0
    assert math.isnan(metrics.auroc([1, 2], [True, True]))  # one class only
    acc, count = metrics.pairwise_accuracy([1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 1, 1])
    assert (acc, count) == (1.0, 2)  # (0,1) and (2,3) only: pairs never cross groups
    assert math.isnan(metrics.pairwise_accuracy([1, 2], [3, 3])[0])
    with pytest.raises(ValueError, match="finite"):
        metrics.spearman([1, np.nan], [1, 2])


def test_spearman_ceiling_is_the_best_any_tie_free_prediction_reaches():
    y = np.array([5.0, 5.0, 5.0, 5.0, 2.0, 3.5, 2.0])  # a tied mass at 5, as the oracle's clean cells
    best = max(metrics.spearman(np.array(order, float), y) for order in itertools.permutations(range(len(y))))
    assert metrics.spearman_ceiling(y) == pytest.approx(best, abs=1e-12) and best < 0.95
    # closed form for m of n values tied, the rest distinct: 1 - (m / n)^3 (1 - 1 / m^2) / (1 - 1 / n^2)
    m, n = 4, 7
    expected = math.sqrt(1 - (m / n) ** 3 * (1 - 1 / m**2) / (1 - 1 / n**2))
    assert metrics.spearman_ceiling([5.0] * m + [1.0, 2.0, 3.0]) == pytest.approx(expected, abs=1e-12)
    assert metrics.spearman_ceiling([1.0, 3.0, 2.0]) == pytest.approx(1.0)  # no ties
    assert math.isnan(metrics.spearman_ceiling([4.0, 4.0]))


def test_report_and_table():
    rng = np.random.default_rng(0)
    n, a, grid = 12, 2, (2, 1, 2)
    vt = rng.uniform(1, 5, (n, a))
    pt = rng.uniform(1, 5, (n, a, *grid))
    has = np.arange(n) % 3 != 0
    rep = metrics.evaluate_predictions(("x", "y"), vt + 0.1, vt, np.arange(n) // 4, pt * 2, pt, has, 3.0)
    assert rep["aspects"]["x"]["video_spearman"] == pytest.approx(1.0)
    assert rep["aspects"]["y"]["patch_spearman"] == pytest.approx(1.0)
    assert rep["aspects"]["x"]["patch_defect_auroc"] == pytest.approx(1.0)  # lower prediction = defect, perfectly
    assert rep["aspects"]["x"]["patch_spearman_ceiling"] == pytest.approx(1.0)  # uniform labels: no ties
    assert rep["counts"]["patch_videos"] == int(has.sum())
    assert rep["aspects"]["x"]["patch_cells"] == int(has.sum()) * 4
    assert rep["mean"]["video_pairwise_accuracy"] == pytest.approx(1.0)
    table = metrics.format_report(rep, "title")
    assert table.splitlines()[0] == "title" and "v.spearman" in table and "mean" in table
    assert "overall" not in rep and "overall" not in table
    reading = {"accuracy": 0.75, "videos": 8, "by_attribute": {"colour": 1.0, "motion": 0.5}}
    assert metrics.format_report({**rep, "text_reading": reading}).splitlines()[-1] == (
        "text reading: 0.750 of 8 videos labelled against an altered prompt score higher text alignment with the "
        "prompt they show (chance 0.5); colour changed 1.000; motion changed 0.500")
    reading["cells"] = {"accuracy": 0.5, "cells": 12, "by_attribute": {"shape": 0.25}}
    assert metrics.format_report({**rep, "text_reading": reading}).splitlines()[-1] == (
        "cell text reading: 0.500 of their 12 cells labelled below the threshold; shape changed 0.250")
    # the overall reward R = sum_a w_a s_a / sum_a w_a of prediction and label: y predicted backwards
    mixed = np.stack([vt[:, 0], -vt[:, 1]], 1)
    for w, expected in (((1.0, 0.0), 1.0), ((0.0, 2.0), -1.0)):
        over = metrics.evaluate_predictions(("x", "y"), mixed, vt, np.arange(n) // 4, weights=np.array(w))["overall"]
        assert over["video_spearman"] == pytest.approx(expected) and over["weights"] == {"x": w[0], "y": w[1]}
    both = metrics.evaluate_predictions(("x", "y"), mixed, vt, np.arange(n) // 4, weights=np.array([1.0, 1.0]))
    assert both["overall"]["video_pearson"] == pytest.approx(metrics.pearson(mixed.sum(1), vt.sum(1)))
    assert "overall" in metrics.format_report(both)
    with pytest.raises(ValueError, match="aspect weights"):
        metrics.evaluate_predictions(("x", "y"), mixed, vt, np.arange(n) // 4, weights=np.array([1.0]))
    flat = metrics.evaluate_predictions(("x",), np.ones((3, 1)), np.array([[1.0], [2.0], [3.0]]), np.zeros(3))
    assert flat["aspects"]["x"]["video_spearman"] is None and "-" in metrics.format_report(flat)  # NaN -> None


def test_losses_match_their_definitions():
    rng = np.random.default_rng(3)
    n, a = 6, 2
    pred, target = rng.normal(3, 1, (n, a)), np.round(rng.uniform(1, 5, (n, a)))
    groups = np.array([0, 0, 0, 1, 1, 2])
    w = np.array([1, 1, 0, 1, 1, 1], float)
    reg = np.sum(w * np.mean((pred - target) ** 2, -1)) / w.sum()
    assert float(losses.regression_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(w))) == pytest.approx(reg,
                                                                                                               rel=1e-5)
    terms = []
    for i, j in itertools.permutations(range(n), 2):
        for k in range(a):
            if groups[i] == groups[j] and w[i] > 0 and w[j] > 0 and target[i, k] - target[j, k] > 0.5:
                terms.append(math.log1p(math.exp(-(pred[i, k] - pred[j, k]) / 2.0)))
    bt, count = losses.bradley_terry_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(groups), jnp.asarray(w),
                                          margin=0.5, temperature=2.0)
    assert int(count) == len(terms) > 0 and float(bt) == pytest.approx(np.mean(terms), rel=1e-5)

    logits = rng.normal(0, 3, (n, n))
    match = [w[i] * w[j] * math.log1p(math.exp(-(1 if groups[i] == groups[j] else -1) * logits[i, j]))
             for i in range(n) for j in range(n)]
    right = [w[i] * w[j] * (np.sign(logits[i, j]) == (1 if groups[i] == groups[j] else -1))
             for i in range(n) for j in range(n)]
    lm, accuracy = losses.matching_loss(jnp.asarray(logits), jnp.asarray(groups), jnp.asarray(w))
    assert float(lm) == pytest.approx(sum(match) / w.sum(), rel=1e-5)
    assert float(accuracy) == pytest.approx(sum(right) / np.sum(np.outer(w, w)), rel=1e-6)
    # more prompt columns (phase 0's hard negatives): their own groups and weights
    cols, col_w = np.array([0, 1, 2, 7, 1]), np.array([1, 1, 1, 1, 0], float)
    logits = rng.normal(0, 3, (n, len(cols)))
    match = [w[i] * col_w[j] * math.log1p(math.exp(-(1 if groups[i] == cols[j] else -1) * logits[i, j]))
             for i in range(n) for j in range(len(cols))]
    lm, _ = losses.matching_loss(jnp.asarray(logits), jnp.asarray(groups), jnp.asarray(w), jnp.asarray(cols),
                                 jnp.asarray(col_w))
    assert float(lm) == pytest.approx(sum(match) / w.sum(), rel=1e-5)

    patch = rng.normal(3, 1, (n, a, 2, 2, 1))
    cons = np.sum(w * np.mean((pred - patch.mean(axis=(2, 3, 4))) ** 2, -1)) / w.sum()
    assert float(losses.consistency_loss(jnp.asarray(pred), jnp.asarray(patch), jnp.asarray(w))) == pytest.approx(
        cons, rel=1e-5)
    # the consistency term never moves the video scores
    g = jax.grad(lambda v: losses.consistency_loss(v, jnp.asarray(patch), jnp.asarray(w)))(jnp.asarray(pred))
    assert np.all(np.asarray(g) == 0)

    batch = {"video_scores": jnp.asarray(target), "patch_scores": jnp.asarray(patch + 1), "has_patch": jnp.zeros(n),
             "valid": jnp.asarray(w), "group": jnp.asarray(groups)}
    out = {"video": jnp.asarray(pred), "patch": jnp.asarray(patch)}
    total, m = losses.reward_losses(out, batch, losses.LossWeights(), phase=2)
    assert float(m["patch_mse"]) == 0.0 and float(m["patch_videos"]) == 0.0  # no patch labels: no patch loss, no NaN
    assert float(total) == pytest.approx(reg + 0.1 * cons, rel=1e-5)
    with pytest.raises(ValueError, match="regression"):
        losses.LossWeights(regression=0.0, bradley_terry=0.0)


def test_censored_errors_ask_bound_labels_for_a_band_beyond_the_bound():
    raw = jnp.asarray([6.0, 5.1, 4.9, 7.0, 0.5, 1.2, -3.0, 3.5, 6.0])
    target = jnp.asarray([5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 3.0, 3.0])
    pred = jnp.clip(raw, 1.0, 5.0)
    err = losses.score_error(pred, target, raw, margin=0.2)
    # a label 5 is met by raw scores in [5.2, 6.2], a label 1 by [-0.2, 0.8]; inside the range: the clipped error
    np.testing.assert_allclose(err, [0.0, -0.1, -0.3, 0.8, 0.0, 0.4, -2.8, 0.5, 2.0], atol=1e-6)
    np.testing.assert_array_equal(losses.score_error(pred, target), pred - target)  # no raw scores: plain error
    # margin 0, raw scores below the band's far side: the squared error of the clipped score
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.uniform(1.0, 6.0, (50,)))
    fives, clipped = jnp.full((50,), 5.0), jnp.clip(raw, 1.0, 5.0)
    np.testing.assert_allclose(losses.score_error(clipped, fives, raw), clipped - fives, atol=1e-6)
    # reward_losses uses the raw scores when the model returns them
    n, a = 4, 2
    y = np.where(rng.uniform(size=(n, a)) < 0.5, 5.0, rng.uniform(1.5, 4.5, (n, a)))
    r = rng.normal(4.5, 1.0, (n, a))
    batch = {"video_scores": jnp.asarray(y), "patch_scores": jnp.zeros((n, a, 1, 1, 1)), "has_patch": jnp.zeros(n),
             "valid": jnp.ones(n), "group": jnp.arange(n)}
    out = {"video": jnp.clip(jnp.asarray(r), 1, 5), "patch": jnp.zeros((n, a, 1, 1, 1)), "video_raw": jnp.asarray(r)}
    weights = losses.LossWeights(bradley_terry=0.0, bound_margin=0.3)
    _, m = losses.reward_losses(out, batch, weights, phase=1)
    expected = np.where(y == 5.0, r - np.clip(r, 5.3, 6.3), np.clip(r, 1, 5) - y)
    assert float(m["video_mse"]) == pytest.approx(np.mean(expected ** 2), rel=1e-5)


def test_consistency_does_not_push_cells_beyond_a_bound():
    """A clipping model's consistency term reads the clipped cell scores with the clip's own gradient: a cell
    at 1 cannot lower its video's aggregate, so it gets no gradient (through the straight-through clip it
    would, without end)."""
    from halo_jax.models.reward.reward_model import clip_to_label_range

    raw = jnp.asarray([[[[[-3.0]], [[0.5]], [[2.0]], [[4.0]], [[5.5]], [[9.0]]]]])  # (1, 1, 6, 1, 1)
    video = jnp.asarray([[2.0]])
    batch = {"video_scores": video, "patch_scores": jnp.full(raw.shape, 3.0), "has_patch": jnp.ones(1),
             "valid": jnp.ones(1), "group": jnp.zeros(1, jnp.int32)}
    weights = losses.LossWeights(patch=0.0, consistency=1.0)

    def total(r):
        out = {"video": video, "video_raw": video, "patch": clip_to_label_range(r), "patch_raw": r}
        return losses.reward_losses(out, batch, weights, phase=2)[0]

    grad = np.asarray(jax.grad(total)(raw)).ravel()
    np.testing.assert_array_equal(grad[[0, 1, 4, 5]], 0.0)
    assert np.all(grad[2:4] > 0)  # the cells inside the range are pulled down towards the video score
    lc = losses.reward_losses({"video": video, "video_raw": video, "patch": clip_to_label_range(raw), "patch_raw": raw},
                              batch, weights, phase=2)[1]["consistency"]
    assert float(lc) == pytest.approx((np.mean([1, 1, 2, 4, 5, 5]) - 2.0) ** 2)


def test_twin_loss_ranks_the_records_of_one_video_on_raw_scores():
    """L_tw: Bradley-Terry over the records of one video (video_key), of the raw video scores and, in phase 2, of
    every cell and aspect; pairs of other videos or padding do not count."""
    rng = np.random.default_rng(5)
    n, a = 6, 2
    raw = rng.normal(3, 2, (n, a))
    patch_raw = rng.normal(3, 2, (n, a, 1, 2, 1))
    target = np.round(rng.uniform(1, 5, (n, a)))
    patch_target = np.round(rng.uniform(1, 5, (n, a, 1, 2, 1)))
    keys, w = np.array([0, 0, 1, 1, 2, 3]), np.array([1, 1, 1, 0, 1, 1], float)
    weights = losses.LossWeights(bradley_terry=0.0, consistency=0.0, twin=2.0, bt_margin=0.5, bt_temperature=2.0)

    def expected(pred, y):
        pred, y = pred.reshape(n, -1), y.reshape(n, -1)
        terms = [math.log1p(math.exp(-(pred[i, k] - pred[j, k]) / 2.0))
                 for i, j in itertools.permutations(range(n), 2) for k in range(pred.shape[1])
                 if keys[i] == keys[j] and w[i] * w[j] > 0 and y[i, k] - y[j, k] > 0.5]
        return np.mean(terms), len(terms)

    batch = {"video_scores": jnp.asarray(target), "patch_scores": jnp.asarray(patch_target), "has_patch": jnp.ones(n),
             "valid": jnp.asarray(w), "group": jnp.arange(n), "video_key": jnp.asarray(keys)}
    clipped = {"video": jnp.clip(jnp.asarray(raw), 1, 5), "patch": jnp.clip(jnp.asarray(patch_raw), 1, 5),
               "video_raw": jnp.asarray(raw), "patch_raw": jnp.asarray(patch_raw)}
    _, m = losses.reward_losses(clipped, batch, weights, phase=2)
    for name, pred, y in (("twin", raw, target), ("patch_twin", patch_raw, patch_target)):
        value, count = expected(pred, y)
        assert int(m[f"{name}_pairs"]) == count > 0 and float(m[name]) == pytest.approx(value, rel=1e-5)
    total, _ = losses.reward_losses(clipped, batch, weights, phase=2)
    off, _ = losses.reward_losses(clipped, batch, dataclasses.replace(weights, twin=0.0), phase=2)
    assert float(total - off) == pytest.approx(2.0 * (float(m["twin"]) + float(m["patch_twin"])), rel=1e-5)
    _, m1 = losses.reward_losses(clipped, batch, weights, phase=1)
    assert "patch_twin" not in m1 and float(m1["twin"]) == pytest.approx(float(m["twin"]))


def test_cell_ranking_loss_ranks_the_cells_of_one_video_on_raw_scores():
    """L_cr (phase 2): Bradley-Terry over pairs of cells of one video and aspect whose labels differ by more than
    the margin, on the raw cell scores; cells of different videos, and videos without patch labels, form no pair."""
    rng = np.random.default_rng(6)
    n, a = 4, 2
    patch_raw = rng.normal(3, 2, (n, a, 2, 2, 1))
    patch_target = np.round(rng.uniform(1, 5, (n, a, 2, 2, 1)))
    w, has_patch = np.array([1, 1, 0, 1], float), np.array([1, 1, 1, 0], float)
    weights = losses.LossWeights(bradley_terry=0.0, consistency=0.0, cell_ranking=3.0, bt_margin=0.5,
                                 bt_temperature=2.0)
    pred, y = patch_raw.reshape(n, a, -1), patch_target.reshape(n, a, -1)
    terms = [math.log1p(math.exp(-(pred[v, k, i] - pred[v, k, j]) / 2.0))
             for v in range(n) for k in range(a) for i, j in itertools.permutations(range(4), 2)
             if w[v] * has_patch[v] > 0 and y[v, k, i] - y[v, k, j] > 0.5]
    batch = {"video_scores": jnp.full((n, a), 3.0), "patch_scores": jnp.asarray(patch_target),
             "has_patch": jnp.asarray(has_patch), "valid": jnp.asarray(w), "group": jnp.arange(n)}
    out = {"video": jnp.full((n, a), 3.0), "patch": jnp.clip(jnp.asarray(patch_raw), 1, 5),
           "video_raw": jnp.full((n, a), 3.0), "patch_raw": jnp.asarray(patch_raw)}
    total, m = losses.reward_losses(out, batch, weights, phase=2)
    assert int(m["cell_ranking_pairs"]) == len(terms) > 0
    assert float(m["cell_ranking"]) == pytest.approx(np.mean(terms), rel=1e-5)
    off, _ = losses.reward_losses(out, batch, dataclasses.replace(weights, cell_ranking=0.0), phase=2)
    assert float(total - off) == pytest.approx(3.0 * np.mean(terms), rel=1e-5)
    _, m1 = losses.reward_losses(out, batch, weights, phase=1)
    assert "cell_ranking" not in m1
