"""Reward-model evaluation: correlation, ranking and detection metrics in NumPy, and the report.

    rankdata(x)        average ranks 1..n (tied values share the mean of their ranks)
    pearson(x, y)      sum((x - mx)(y - my)) / sqrt(sum((x - mx)^2) sum((y - my)^2));  NaN if x or y is constant
    spearman(x, y)     pearson(rankdata(x), rankdata(y))                                (ties: average ranks)
    spearman_ceiling(y)  sd(rankdata(y)) / sd(1..n): the largest Spearman with y that a prediction
                       without ties can reach (its ranks are a permutation r of 1..n, and
                       cov(rankdata(y), r) <= var(rankdata(y)) with equality when r orders y's
                       tie groups correctly, whatever the order inside each group); 1 when y has
                       no ties, ~ sqrt(1 - q^3) when a share q of y is one tied value
    pairwise_accuracy  over pairs (i, j) of the same group whose targets differ:
                       mean of [sign(p_i - p_j) = sign(t_i - t_j)], a tied prediction counts 1/2
    auroc(s, y)        P(s_pos > s_neg) + P(s_pos = s_neg) / 2 over positive/negative pairs
                       (the Mann-Whitney U statistic / (n_pos n_neg), from average ranks); NaN
                       when a class is empty

`evaluate_predictions` turns held-out predictions and teacher labels into the per-aspect
report of the `train_reward` stage: video Pearson, Spearman and within-prompt pairwise
accuracy; patch Spearman (over every cell of every video with patch labels), its ceiling
(`spearman_ceiling` of the labels: where most cells are tied at 5 no continuous prediction
can reach 1) and the AUROC of detecting defects (a cell whose teacher score is below
`defect_threshold`) from the negated predicted patch score (a low predicted score flags a
defect). The video Spearman's ceiling is reported the same way. Given aspect weights w, the
report's `overall` entry gives the same video metrics for the overall reward
R = sum_a w_a s_a / sum_a w_a of prediction and teacher alike: the score the `pairs` stage ranks by.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from halo_jax.reward.scorer import overall_reward


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) of a 1-D array; ties share the mean of the ranks they span."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # starts of runs of equal values in sorted order
    new_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [len(x)]])
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def _pair(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{what}: the two inputs differ in size ({x.size} vs {y.size})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{what}: inputs must be finite (got NaN or inf)")
    return x, y


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when fewer than 2 values or either input is constant."""
    x, y = _pair(x, y, "pearson")
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.sum(dx * dy) / den) if den > 0 else math.nan


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties; NaN when either input is constant."""
    x, y = _pair(x, y, "spearman")
    if x.size < 2:
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def spearman_ceiling(y: np.ndarray) -> float:
    """The largest Spearman with `y` of any prediction without ties (module docstring); NaN if y is constant."""
    ranks = rankdata(y)
    if ranks.size < 2 or np.ptp(ranks) == 0:
        return math.nan
    n = ranks.size
    return float(np.std(ranks) / math.sqrt((n * n - 1) / 12.0))


def pairwise_accuracy(pred: np.ndarray, target: np.ndarray, groups: Sequence | np.ndarray | None = None
                      ) -> tuple[float, int]:
    """(accuracy, number of pairs) over pairs of the same group (all pairs if `groups` is None)
    whose targets differ; a pair the prediction ties scores 1/2. NaN accuracy when no pair qualifies."""
    pred, target = _pair(pred, target, "pairwise_accuracy")
    groups = np.zeros(pred.size, np.int64) if groups is None else np.asarray(groups).ravel()
    if groups.size != pred.size:
        raise ValueError(f"pairwise_accuracy: {groups.size} groups for {pred.size} predictions")
    total, count = 0.0, 0
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if idx.size < 2:
            continue
        p, t = pred[idx], target[idx]
        dt = np.sign(t[:, None] - t[None, :])
        dp = np.sign(p[:, None] - p[None, :])
        upper = np.triu(np.ones_like(dt, bool), k=1) & (dt != 0)
        count += int(upper.sum())
        total += float(np.sum(np.where(dp == 0, 0.5, (dp == dt).astype(np.float64))[upper]))
    return (total / count if count else math.nan), count


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean `positive`; ties count 1/2; NaN if a class is empty."""
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    if scores.size != positive.size:
        raise ValueError(f"auroc: {scores.size} scores for {positive.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("auroc: scores must be finite (got NaN or inf)")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    u = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


VIDEO_METRICS = ("video_pearson", "video_spearman", "video_spearman_ceiling", "video_pairwise_accuracy")
PATCH_METRICS = ("patch_spearman", "patch_spearman_ceiling", "patch_defect_auroc")


def evaluate_predictions(aspects: Sequence[str], video_pred: np.ndarray, video_true: np.ndarray,
                         groups: np.ndarray, patch_pred: np.ndarray | None = None,
                         patch_true: np.ndarray | None = None, has_patch: np.ndarray | None = None,
                         defect_threshold: float = 3.0, weights: np.ndarray | None = None) -> dict:
    """The per-aspect report (module docstring).

    video_pred/true (N, A); groups (N,) prompt ids (pairs are formed within a group);
    patch_pred/true (N, A, Tp, Hp, Wp) and has_patch (N,) bool (videos with patch labels);
    weights (A,) aspect weights of the overall reward (None: no `overall` entry).
    Returns {"aspects": {aspect: {metric: value}}, "mean": {metric: mean over aspects},
    ["overall": {video metric: value, "weights": {aspect: w}},] "counts": {...}}; NaN values
    (undefined metrics) become None so the report is strict JSON.
    """
    video_pred, video_true = np.asarray(video_pred, np.float64), np.asarray(video_true, np.float64)
    n, a = video_true.shape
    if video_pred.shape != (n, a) or a != len(aspects):
        raise ValueError(f"video predictions {video_pred.shape} and labels {video_true.shape} must both be "
                         f"(N, {len(aspects)}) for aspects {list(aspects)}")
    per: dict[str, dict] = {}
    defects = 0
    patch_videos = 0
    for k, name in enumerate(aspects):
        m = _video_metrics(video_pred[:, k], video_true[:, k], groups)
        if patch_pred is not None and has_patch is not None and np.any(has_patch):
            sel = np.asarray(has_patch, bool)
            patch_videos = int(sel.sum())
            pp = np.asarray(patch_pred, np.float64)[sel, k].ravel()
            pt = np.asarray(patch_true, np.float64)[sel, k].ravel()
            is_defect = pt < defect_threshold
            m["patch_spearman"] = spearman(pp, pt)
            m["patch_spearman_ceiling"] = spearman_ceiling(pt)
            m["patch_defect_auroc"] = auroc(-pp, is_defect)
            m["patch_defects"] = int(is_defect.sum())
            m["patch_cells"] = int(pt.size)
            defects += int(is_defect.sum())
        else:
            for metric in PATCH_METRICS:
                m[metric] = math.nan
        per[name] = m
    mean = {}
    for metric in VIDEO_METRICS + PATCH_METRICS:
        vals = [per[name][metric] for name in aspects if not math.isnan(per[name][metric])]
        mean[metric] = float(np.mean(vals)) if vals else math.nan
    report = {"aspects": per, "mean": mean}
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != (a,) or w.sum() <= 0:
            raise ValueError(f"aspect weights {w.tolist()} must be {a} values for aspects {list(aspects)}, "
                             f"summing to more than 0")
        report["overall"] = {**_video_metrics(overall_reward(video_pred, w), overall_reward(video_true, w), groups),
                             "weights": dict(zip(aspects, w.tolist()))}
    report |= {"counts": {"videos": int(n), "patch_videos": patch_videos, "defect_cells": defects,
                         "defect_threshold": float(defect_threshold)}}
    return _json_safe(report)


def _video_metrics(pred: np.ndarray, true: np.ndarray, groups: np.ndarray) -> dict:
    acc, pairs = pairwise_accuracy(pred, true, groups)
    return {"video_pearson": pearson(pred, true), "video_spearman": spearman(pred, true),
            "video_spearman_ceiling": spearman_ceiling(true), "video_pairwise_accuracy": acc, "video_pairs": pairs}


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def format_report(report: dict, title: str = "") -> str:
    """A plain-text table: one row per aspect (then the mean, and the overall reward when the report
    has it: video columns only), one column per metric."""
    cols = [("video_pearson", "v.pearson"), ("video_spearman", "v.spearman"), ("video_spearman_ceiling", "v.sp.ceil"),
            ("video_pairwise_accuracy", "v.pair_acc"), ("patch_spearman", "p.spearman"),
            ("patch_spearman_ceiling", "p.sp.ceil"), ("patch_defect_auroc", "p.auroc")]
    rows = [(name, m) for name, m in report["aspects"].items()] + [("mean", report["mean"])]
    if "overall" in report:
        rows.append(("overall", report["overall"]))
    width = max(len(r[0]) for r in rows) + 2

    def cell(v) -> str:
        return f"{'-':>11}" if v is None else f"{v:>11.4f}"

    lines = [title] if title else []
    lines.append(f"{'aspect':<{width}}" + "".join(f"{c[1]:>11}" for c in cols))
    for name, m in rows:
        lines.append(f"{name:<{width}}" + "".join(cell(m.get(c[0])) for c in cols))
    c = report["counts"]
    lines.append(f"held-out videos: {c['videos']} ({c['patch_videos']} with patch labels, "
                 f"{c['defect_cells']} defect cells at threshold {c['defect_threshold']:g})")
    if "text_reading" in report:
        t = report["text_reading"]
        lines.append(f"text reading: {t['accuracy']:.3f} of {t['videos']} videos labelled against an altered prompt "
                     "score higher text alignment with the prompt they show (chance 0.5)"
                     + "".join(f"; {a} changed {v:.3f}" for a, v in t.get("by_attribute", {}).items()))
        if "cells" in t:
            c = t["cells"]
            lines.append(f"cell text reading: {c['accuracy']:.3f} of their {c['cells']} cells labelled below the "
                         "threshold" + "".join(f"; {a} changed {v:.3f}" for a, v in c.get("by_attribute", {}).items()))
    return "\n".join(lines)
