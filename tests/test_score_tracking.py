"""Statistics of bench/score_tracking.py (lsm_train.stats): the pooled same-sign fraction and
its shuffled baseline against the exact hypergeometric null, Spearman ρ of levels against
scipy, and the bench's cross-fitted linear probe against scikit-learn by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _bench import load_bench
from scipy.stats import hypergeom, spearmanr

from lsm_train import stats


def exact_null(dx, dy):
    """Exact null of the agreement count when dx's signs are permuted: with n used intervals,
    a rises of dx and b of dy, the overlap X of rises is hypergeometric and the agreement
    count is 2X + n − a − b. Returns (expected fraction, P(agreements >= observed))."""
    dx, dy = np.asarray(dx, float), np.asarray(dy, float)
    keep = (dx != 0) & (dy != 0) & np.isfinite(dx) & np.isfinite(dy)
    sx, sy = dx[keep] > 0, dy[keep] > 0
    n, a, b = sx.size, int(sx.sum()), int(sy.sum())
    x_obs = int((sx & sy).sum())
    dist = hypergeom(n, a, b)
    mean_agree = 2 * dist.mean() + n - a - b
    return mean_agree / n, float(dist.sf(x_obs - 1))


def test_same_sign_test_matches_the_exact_hypergeometric_null():
    rng = np.random.default_rng(0)
    dy = rng.normal(0.2, 1.0, size=40)  # rises more often than it falls
    dx = dy + rng.normal(0, 0.3, size=40)
    dx[[3, 9]] = 0.0  # no sign: left out
    dy[5] = np.nan  # not finite: left out
    res = stats.same_sign_test([(dx, dy)], permutations=20000, seed=1)
    frac, used = stats.same_sign_fraction(dx, dy)
    assert res.fraction == frac and res.used == used == 37
    mean, p = exact_null(dx, dy)
    assert res.baseline == pytest.approx(mean, abs=0.005)
    assert res.p_value == pytest.approx(p, abs=0.01)
    assert 0 < res.p_value < 0.05  # the construction is synchronous


def test_same_sign_test_pools_series_and_permutes_within_each():
    """A series that always rises against an accuracy that always rises agrees perfectly,
    yet its permutation null agrees perfectly too: p = 1, baseline = fraction."""
    up = np.ones(10)
    res = stats.same_sign_test([(up, up), (up * 2, up)], permutations=200)
    assert res.fraction == 1.0 and res.baseline == 1.0 and res.p_value == 1.0
    assert res.used == 20
    a, b = np.array([1.0, -1, 1, -1]), np.array([1.0, -1, -1, 1])
    pooled = stats.same_sign_test([(a, b), (up, up)], permutations=500, seed=2)
    assert pooled.fraction == pytest.approx(12 / 14)
    # first series null: 2 of 4 agreeing in expectation; second: always 10 of 10
    assert pooled.baseline == pytest.approx((2 + 10) / 14, abs=0.02)


def test_same_sign_test_edge_cases_and_bad_input():
    empty = stats.same_sign_test([(np.zeros(3), np.ones(3))])
    assert empty.used == 0 and math.isnan(empty.fraction) and math.isnan(empty.p_value)
    assert stats.same_sign_test([]).used == 0
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="permutations: expected an integer >= 1"):
            stats.same_sign_test([(np.ones(2), np.ones(2))], permutations=bad)
    with pytest.raises(ValueError, match="equal length"):
        stats.same_sign_test([(np.ones(2), np.ones(3))])


def test_spearman_of_levels_matches_scipy():
    rng = np.random.default_rng(3)
    score = rng.uniform(0.9, 1.0, size=15)
    acc = 0.5 * score + rng.normal(0, 0.02, size=15)
    acc[4] = acc[7]  # a tie: average ranks
    assert stats.spearman(score, acc) == pytest.approx(spearmanr(score, acc).statistic,
                                                       abs=1e-12)


def _bench():
    return load_bench("score_tracking")


def test_cross_fitted_probe_accuracy_by_hand():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    bench = _bench()
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 20)
    H = rng.normal(size=(60, 4)) + np.eye(3, 4)[y] * 1.5
    got = bench.probe_accuracy(H, y, seed=5)
    accs = []
    for fit, ev in StratifiedKFold(2, shuffle=True, random_state=5).split(H, y):
        mu, sd = H[fit].mean(0), H[fit].std(0) + 1e-8
        clf = LogisticRegression(C=1.0, max_iter=5000).fit((H[fit] - mu) / sd, y[fit])
        accs.append(clf.score((H[ev] - mu) / sd, y[ev]))
    assert got == pytest.approx(np.mean(accs), abs=1e-12)
