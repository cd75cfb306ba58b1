"""Pure statistics behind ``lsm-report`` (numpy/scipy only, no I/O).

Synchronicity (the seed paper's claim: when an update raises a hidden layer's separability,
training accuracy rises too, and vice versa). Given a layer's MD-LSM ``m_0, ..., m_T`` and the
training accuracy ``a_0, ..., a_T`` at the same consecutive log points, form the changes

    Δm_t = m_t − m_{t−1},   Δa_t = a_t − a_{t−1},   t = 1..T.

* ``same_sign_fraction`` = #{t : sign(Δm_t) = sign(Δa_t)} / #{t : Δm_t ≠ 0 and Δa_t ≠ 0}.
  Intervals where either change is exactly 0 (or not finite) carry no sign and are left out
  of numerator and denominator alike; NaN when no interval is left.  0.5 is what two
  independent series give; 1.0 means every update moved both in the same direction.
* ``spearman`` = Spearman rank correlation of (Δm_t, Δa_t) over the intervals where both are
  finite (zeros kept; ties get average ranks, as in ``scipy.stats.spearmanr``). NaN when
  fewer than 2 intervals remain or either series is constant (no ranking exists).

Shuffled baseline (``same_sign_test``): pooled over several aligned change series (one per
run and layer), the same-sign fraction is compared with the fractions obtained when each
score series' changes are permuted within its own series (over the intervals where neither
change is 0). The permutation keeps how often each series rises, so a series that rises
almost always against an accuracy that rises almost always does not look synchronous by
that alone. ``baseline`` is the mean permuted fraction, ``p_value`` the one-sided
(1 + #{permuted >= observed}) / (1 + permutations).

The *learning phase* restricts both statistics to the log points up to the first one where
the accuracy reaches a threshold (``learning_phase``): after that, accuracy changes are mostly
noise around its plateau.

Sweep summaries: ``mean_std`` gives the mean and the sample standard deviation (ddof=1) over
seeds, ignoring NaN entries; the std of a single value is NaN (shown as the mean alone).
Definitions: ``docs/math.md`` (synchronicity); the report's use of them: ``docs/report.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Synchronicity",
    "changes",
    "same_sign_fraction",
    "SameSignTest",
    "same_sign_test",
    "spearman",
    "synchronicity",
    "steps_to_threshold",
    "learning_phase",
    "mean_std",
    "format_mean_std",
]


@dataclass(frozen=True)
class Synchronicity:
    """Synchronicity of one layer's MD-LSM with training accuracy over one run."""

    same_sign: float  # fraction of sign-carrying intervals where both changes agree
    spearman: float  # Spearman correlation of the change series
    intervals: int  # consecutive log intervals with both changes finite
    used: int  # of those, intervals where neither change is exactly 0


def _as_float_array(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def changes(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Consecutive differences ``v[t] − v[t−1]`` (length ``len(values) − 1``, empty if < 2)."""
    arr = _as_float_array(values, "values")
    return np.diff(arr) if arr.size >= 2 else np.empty(0)


def _pair(dx, dy) -> tuple[np.ndarray, np.ndarray]:
    dx = _as_float_array(dx, "dx")
    dy = _as_float_array(dy, "dy")
    if dx.shape != dy.shape:
        raise ValueError(f"change series must have equal length, got {dx.size} and {dy.size}")
    keep = np.isfinite(dx) & np.isfinite(dy)
    return dx[keep], dy[keep]


def same_sign_fraction(dx, dy) -> tuple[float, int]:
    """(fraction of intervals with sign(dx) == sign(dy), number of intervals used).

    Intervals where either change is exactly 0 or not finite are excluded; NaN if none left.
    """
    dx, dy = _pair(dx, dy)
    used = (dx != 0) & (dy != 0)
    n = int(used.sum())
    if n == 0:
        return math.nan, 0
    agree = np.sign(dx[used]) == np.sign(dy[used])
    return float(agree.mean()), n


@dataclass(frozen=True)
class SameSignTest:
    """Pooled same-sign fraction of several change series against its shuffled baseline."""

    fraction: float  # observed, pooled over the used intervals of every series
    baseline: float  # mean fraction with each series' score changes permuted
    p_value: float  # one-sided: permuted fraction >= observed
    used: int  # intervals where neither change is 0 (nor non-finite), over all series


def same_sign_test(series, permutations: int = 2000, seed: int = 0) -> SameSignTest:
    """Same-sign fraction of ``series`` = [(dx, dy), ...] (aligned changes of a score and of
    the accuracy, one pair per run/layer) against permutations of each ``dx`` within its
    own series (module docstring). NaN fields when no interval carries a sign."""
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise ValueError(f"permutations: expected an integer >= 1, got {permutations!r}")
    signs_x, signs_y = [], []
    for dx, dy in series:
        dx, dy = _pair(dx, dy)
        used = (dx != 0) & (dy != 0)
        signs_x.append(np.sign(dx[used]))
        signs_y.append(np.sign(dy[used]))
    n = sum(a.size for a in signs_x)
    if n == 0:
        return SameSignTest(math.nan, math.nan, math.nan, 0)
    observed = sum(int((a == b).sum()) for a, b in zip(signs_x, signs_y, strict=True))
    rng = np.random.default_rng(seed)
    null = np.zeros(permutations)
    for a, b in zip(signs_x, signs_y, strict=True):
        if a.size:
            perm = rng.permuted(np.tile(a, (permutations, 1)), axis=1)
            null += (perm == b).sum(1)
    p = (1 + int((null >= observed).sum())) / (1 + permutations)
    return SameSignTest(observed / n, float(null.mean()) / n, p, n)


def spearman(x, y) -> float:
    """Spearman correlation over finite pairs; NaN if < 2 pairs or either side is constant."""
    x, y = _pair(x, y)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    from scipy.stats import spearmanr

    rho = spearmanr(x, y).statistic
    return float(rho)


def synchronicity(lsm: Sequence[float], acc: Sequence[float]) -> Synchronicity:
    """Synchronicity of a layer's MD-LSM series with the training-accuracy series.

    ``lsm[t]`` and ``acc[t]`` must be measured at the same log point ``t`` (aligned series).
    """
    lsm = _as_float_array(lsm, "lsm")
    acc = _as_float_array(acc, "acc")
    if lsm.shape != acc.shape:
        raise ValueError(
            f"lsm and acc must be aligned (same length), got {lsm.size} and {acc.size}"
        )
    dm, da = changes(lsm), changes(acc)
    frac, used = same_sign_fraction(dm, da)
    finite = int((np.isfinite(dm) & np.isfinite(da)).sum())
    return Synchronicity(frac, spearman(dm, da), finite, used)


def learning_phase(acc: Sequence[float], threshold: float) -> int:
    """Number of leading log points up to and including the first with ``acc >= threshold``
    (all points when never reached). Synchronicity over ``series[:k]`` describes the
    learning phase, before accuracy saturates and its changes become noise."""
    acc = _as_float_array(acc, "acc")
    hit = np.flatnonzero(np.isfinite(acc) & (acc >= threshold))
    return int(hit[0]) + 1 if hit.size else int(acc.size)


def steps_to_threshold(steps: Sequence[float], acc: Sequence[float], threshold: float):
    """First ``step`` whose accuracy is ``>= threshold`` (NaN accuracies skipped); None if never."""
    steps = _as_float_array(steps, "steps")
    acc = _as_float_array(acc, "acc")
    if steps.shape != acc.shape:
        raise ValueError(f"steps and acc must have equal length, got {steps.size}, {acc.size}")
    hit = np.flatnonzero(np.isfinite(acc) & (acc >= threshold))
    if hit.size == 0:
        return None
    s = steps[hit[0]]
    return int(s) if float(s).is_integer() else float(s)


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, count) over the finite entries (None/NaN ignored).

    No finite entry -> (NaN, NaN, 0); one entry -> (value, NaN, 1).
    """
    arr = np.asarray([math.nan if v is None else float(v) for v in values], dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan, 0
    std = float(arr.std(ddof=1)) if arr.size >= 2 else math.nan
    return float(arr.mean()), std, int(arr.size)


def format_mean_std(values: Sequence[float | None], digits: int = 3, missing: str = "–") -> str:
    """``"mean ± std"`` (``"mean"`` for one value, ``missing`` for none) of the finite values.

    When some entries are None/NaN (e.g. a seed that never reached a threshold) the count of
    finite entries is appended as ``(k/n)``.
    """
    mean, std, k = mean_std(values)
    if k == 0:
        return missing
    text = f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
    if k < len(values):
        text += f" ({k}/{len(values)})"
    return text
