"""The guard's acceptance rule as pure functions: no model, references from numpy/scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lsm_train.guard.rule import (
    AcceptanceWindow,
    Score,
    false_rejection_level,
    force,
    judge,
    needs_se,
    paired_se,
)


def mean_score(values: np.ndarray, groups: np.ndarray, G: int) -> Score:
    """The mean of per-sample values and its delete-a-group replicates."""
    reps = tuple(float(values[groups != g].mean()) for g in range(G))
    return Score(float(values.mean()), reps)


def test_paired_se_of_a_mean_is_the_sd_of_group_means():
    # equal groups: the delete-a-group jackknife SE of a mean is sd(group means) / sqrt(G)
    rng = np.random.default_rng(0)
    G, n = 10, 80
    groups = np.arange(n) % G
    before = rng.normal(size=n)
    after = before + rng.normal(0.1, 0.5, size=n)
    se = paired_se(mean_score(before, groups, G).replicates,
                   mean_score(after, groups, G).replicates)
    group_means = np.array([(after - before)[groups == g].mean() for g in range(G)])
    assert se == pytest.approx(group_means.std(ddof=1) / math.sqrt(G), rel=1e-10)


def test_paired_se_rejects_bad_replicates():
    with pytest.raises(ValueError, match="same length >= 2"):
        paired_se([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="same length >= 2"):
        paired_se([0.1], [0.1])


@pytest.mark.parametrize("z", [1.0, 2.0])
def test_false_rejection_rate_is_the_nominal_level(z):
    # steps that change nothing that matters: paired per-sample changes of mean zero
    rng = np.random.default_rng(1)
    G, n, trials = 10, 60, 4000
    groups = np.arange(n) % G
    rejected = 0
    for _ in range(trials):
        before = rng.normal(size=n)
        after = 0.9 * before + rng.normal(0.0, 0.3, size=n)
        after += before.mean() - after.mean() + rng.normal(0.0, 0.3 / math.sqrt(n))
        v = judge(mean_score(before, groups, G), mean_score(after, groups, G), z=z,
                  tolerance=0.0)
        rejected += not v.accepted
    level = stats.t.sf(z, G - 1)
    assert false_rejection_level(z, G) == pytest.approx(level)
    sd = math.sqrt(level * (1 - level) / trials)
    assert abs(rejected / trials - level) < 4 * sd


def test_a_real_drop_of_many_standard_errors_is_rejected():
    rng = np.random.default_rng(2)
    G, n = 10, 200
    groups = np.arange(n) % G
    before = rng.normal(size=n)
    after = before - 0.5 + rng.normal(0, 0.2, size=n)
    v = judge(mean_score(before, groups, G), mean_score(after, groups, G), z=2.0,
              tolerance=0.0)
    assert not v.accepted and v.finite and v.diff < -10 * v.se


def test_judge_fixed_margin_tolerance_and_non_finite():
    # dyadic values: every difference below is exact
    b, a = Score(0.5, (0.5, 0.5)), Score(0.25, (0.125, 0.375))
    assert not judge(b, a, z=0.0, tolerance=0.0).accepted
    assert judge(b, a, z=0.0, tolerance=0.25).accepted  # D = -0.25 >= -0.25
    # replicate differences -0.375, -0.125: SE = sqrt(1/2 * 2 * 0.125**2) = 0.125
    assert judge(b, a, z=1.0, tolerance=0.0).se == 0.125
    assert not judge(b, a, z=1.0, tolerance=0.0).accepted  # -0.25 < -0.125
    assert judge(b, a, z=2.0, tolerance=0.0).accepted  # -0.25 >= -0.25
    assert judge(b, a, z=1.0, tolerance=0.125).accepted  # -0.25 >= -(0.125 + 0.125)
    same = judge(b, Score(0.5, (0.5, 0.5)), z=2.0, tolerance=0.0)
    assert same.accepted and same.se == 0.0 and same.diff == 0.0
    # no replicates: the fixed margin
    assert not judge(Score(0.5), Score(0.25), z=2.0, tolerance=0.0).accepted
    for bad in (math.nan, math.inf, -math.inf):
        v = judge(b, Score(bad), z=2.0, tolerance=1.0)
        assert not v.accepted and not v.finite
    v = judge(Score(math.nan), a, z=2.0, tolerance=0.0)  # nothing to compare with
    assert v.accepted and v.finite


def test_needs_se_only_when_the_fixed_margin_would_reject():
    assert needs_se(Score(0.5), Score(0.25), 0.0)
    assert not needs_se(Score(0.5), Score(0.25), 0.25)
    assert not needs_se(Score(0.5), Score(0.75), 0.0)
    assert not needs_se(Score(0.5), Score(math.nan), 0.0)
    assert not needs_se(Score(math.nan), Score(0.5), 0.0)
    # and the verdict it skips is the same: without replicates the step is kept anyway
    for after in (Score(0.75, (0.7, 0.8)), Score(0.5, (0.4, 0.6))):
        assert judge(Score(0.5, (0.5, 0.5)), after, z=2.0, tolerance=0.0).accepted


def test_force_never_keeps_a_non_finite_step():
    assert force(False, True, 3, 3) == (True, True)
    assert force(False, True, 2, 3) == (False, False)
    assert force(False, False, 100, 0) == (False, False)
    assert force(False, True, 100, None) == (False, False)
    assert force(True, True, 100, 0) == (True, False)


def test_acceptance_window_warns_once_when_full_and_low():
    w = AcceptanceWindow(size=4, level=0.5)
    assert math.isnan(w.rate)
    assert [w.record(a) for a in (False, False, False)] == [False] * 3  # not full yet
    assert w.record(True) is True  # 1/4 < 0.5
    assert w.record(False) is False and w.warned  # only once
    twin = AcceptanceWindow(size=4, level=0.5)
    twin.load(w.state())
    assert list(twin.history) == list(w.history) and twin.warned
    ok = AcceptanceWindow(size=2, level=0.5)
    assert [ok.record(a) for a in (True, False, True, False)] == [False] * 4  # 0.5 is fine
    with pytest.raises(ValueError, match="warn_window"):
        AcceptanceWindow(size=0)
    with pytest.raises(ValueError, match="warn_below"):
        AcceptanceWindow(level=1.5)
