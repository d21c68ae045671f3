"""Paired bootstrap statistics over evaluation units.

A unit is one (prompt, seed) pair: every model generates a video for it from the same
initial noise, so per-unit values of different models are paired. A statistic is the mean
of a per-unit value x_u (a video score, a defect fraction, a win indicator). Its 95% CI is
the percentile bootstrap:

    idx[b] ~ Uniform{0..n-1}^n  (b = 1..B, drawn once from `numpy.random.default_rng(seed)`)
    m_b    = mean_u x[idx[b, u]]
    CI     = (quantile(m, 0.025), quantile(m, 0.975))   (numpy's default linear interpolation)

The same index matrix serves every model and metric of one evaluation, so the resamples of
two models are paired too.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over n units and its bootstrap CI [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi


def bootstrap_indices(num_units: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, num_units) int64 unit indices drawn with replacement (module docstring)."""
    if num_units < 1:
        raise ValueError(f"bootstrap needs at least one unit, got {num_units}; evaluate at least one prompt and seed")
    if resamples < 1:
        raise ValueError(f"evaluate.bootstrap must be >= 1 resamples, got {resamples} (1000 is usual)")
    return np.random.default_rng(seed).integers(0, num_units, size=(int(resamples), int(num_units)))


def bootstrap_mean(values, indices: np.ndarray, level: float = 0.95) -> Estimate:
    """Mean of the per-unit `values` (n,) and its percentile-bootstrap CI over `indices` (B, n)."""
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or indices.ndim != 2 or indices.shape[1] != x.shape[0]:
        raise ValueError(f"per-unit values {x.shape} do not match bootstrap indices {indices.shape}: one value per unit")
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    means = x[indices].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.shape[0]))


def win_indicator(model_scores, base_scores) -> np.ndarray:
    """Per unit: 1 where the model scores higher than the base, 0.5 on a tie, 0 where lower."""
    a, b = np.asarray(model_scores, np.float64), np.asarray(base_scores, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores, got {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def defect_fraction(cell_scores, threshold: float) -> np.ndarray:
    """Per unit: the fraction of cells whose score is below `threshold`; `cell_scores` (n, *grid)."""
    s = np.asarray(cell_scores, np.float64)
    if s.ndim < 2:
        raise ValueError(f"cell scores must be (units, *grid), got shape {s.shape}")
    return (s < threshold).reshape(s.shape[0], -1).mean(axis=1)
