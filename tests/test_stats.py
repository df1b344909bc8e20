"""Bootstrap intervals: coverage on known distributions, clustering, weights."""
import math

import numpy as np
import pytest

from fdpipe.common.stats import bootstrap_ci, normal_interval, weighted_mean


def _coverage(make_sample, truth, trials=300, **kw):
    rng = np.random.default_rng(123)
    hits = 0
    for t in range(trials):
        values, groups = make_sample(rng)
        ci = bootstrap_ci(values, groups=groups, resamples=400, seed=t, **kw)
        hits += ci.low <= truth <= ci.high
    return hits / trials


def test_coverage_of_the_mean_of_a_normal():
    cover = _coverage(lambda rng: (rng.normal(1.0, 2.0, size=60), None), truth=1.0)
    assert 0.89 <= cover <= 0.99


def test_clustered_samples_need_cluster_resampling():
    def sample(rng):
        effect = rng.normal(0.0, 1.0, size=20)          # one shared effect per prompt
        values = np.repeat(effect, 4) + rng.normal(0.0, 0.3, size=80)
        return values, np.repeat(np.arange(20), 4)

    clustered = _coverage(sample, truth=0.0)
    naive = _coverage(lambda rng: (sample(rng)[0], None), truth=0.0)
    assert 0.88 <= clustered <= 0.99
    assert naive < 0.8                                    # ignoring clusters is overconfident


def test_weighted_ratio_point_value_and_interval():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    weights = np.array([1.0, 1.0, 1.0, 5.0])
    ci = bootstrap_ci(values, weights=weights, resamples=200, seed=0)
    assert ci.value == pytest.approx((1 + 2 + 3 + 20) / 8)
    assert ci.value == pytest.approx(weighted_mean(values, weights))
    assert 1.0 <= ci.low <= ci.value <= ci.high <= 4.0
    assert ci.n == 4


def test_seeded_and_degenerate_cases():
    values = np.arange(10.0)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    one = bootstrap_ci([2.5])
    assert (one.value, one.low, one.high) == (2.5, 2.5, 2.5)
    empty = bootstrap_ci([])
    assert math.isnan(empty.value) and empty.n == 0
    same_group = bootstrap_ci([1.0, 3.0], groups=["p", "p"])
    assert same_group.low == same_group.high == 2.0
    with pytest.raises(ValueError):
        bootstrap_ci(values, confidence=1.5)
    with pytest.raises(ValueError):
        bootstrap_ci(values, weights=[1.0])


def test_normal_interval():
    low, high = normal_interval(1.0, 0.5, 0.95)
    assert low == pytest.approx(1.0 - 1.959964 * 0.5, abs=1e-6)
    assert high == pytest.approx(1.0 + 1.959964 * 0.5, abs=1e-6)
