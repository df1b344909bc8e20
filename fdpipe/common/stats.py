"""Bootstrap confidence intervals for means, ratios of sums and clustered samples.

Evaluation draws several completions per prompt, and completions of the same prompt are
not independent; `bootstrap_ci` therefore resamples *clusters* (prompts) with replacement
when ``groups`` is given, and single observations otherwise. The statistic is a weighted
mean ``Σ w·v / Σ w`` (plain mean with unit weights; e.g. entropy per token with
``v`` = mean entropy of a sequence and ``w`` = its length). Intervals are percentile
intervals of the resampled statistic, from a seeded generator, so they are reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    value: float      # the statistic on the data itself
    low: float
    high: float
    n: int            # number of observations


def weighted_mean(values, weights=None) -> float:
    values = np.asarray(values, dtype=np.float64)
    if weights is None:
        return float(values.mean()) if values.size else math.nan
    weights = np.asarray(weights, dtype=np.float64)
    total = weights.sum()
    return float((weights * values).sum() / total) if total > 0 else math.nan


def bootstrap_ci(values, *, weights=None, groups=None, confidence: float = 0.95,
                 resamples: int = 1000, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the (weighted) mean of `values`.

    Args:
        values: observations, shape [n].
        weights: optional non-negative weights [n]; the statistic is ``Σ w·v / Σ w``.
        groups: optional cluster label of each observation [n]; whole clusters are resampled.
        confidence: coverage of the interval, in (0, 1).
        resamples: number of bootstrap replicates.
        seed: seed of the NumPy generator.
    Returns:
        `Interval` (value, low, high, n). With fewer than two clusters (or observations) the
        interval is the point value itself; with no observations everything is NaN.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    n = values.size
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n:
        raise ValueError(f"weights has {w.size} entries for {n} values")
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    point = weighted_mean(values, w)
    if groups is None:
        codes = np.arange(n)
    else:
        groups = np.asarray(groups).reshape(-1)
        if groups.size != n:
            raise ValueError(f"groups has {groups.size} entries for {n} values")
        _, codes = np.unique(groups, return_inverse=True)
    num_clusters = int(codes.max()) + 1
    if num_clusters < 2:
        return Interval(point, point, point, n)
    # Per-cluster sums; a replicate is a multinomial count of how often each cluster is drawn.
    sum_wv = np.bincount(codes, weights=w * values, minlength=num_clusters)
    sum_w = np.bincount(codes, weights=w, minlength=num_clusters)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(num_clusters, np.full(num_clusters, 1.0 / num_clusters), size=resamples)
    numerator = draws @ sum_wv
    denominator = draws @ sum_w
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = numerator / denominator
    replicates = replicates[np.isfinite(replicates)]
    if replicates.size == 0:
        return Interval(point, math.nan, math.nan, n)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return Interval(point, float(low), float(high), n)


def normal_interval(value: float, stderr: float, confidence: float = 0.95) -> tuple[float, float]:
    """``value ± z·stderr`` with ``z`` the two-sided normal quantile for `confidence`."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return value - z * stderr, value + z * stderr
