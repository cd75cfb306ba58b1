"""The guard's acceptance rule: pure functions on scores, no model (see docs/guard.md).

A score is the probe value ``S`` plus, for the statistical rule, its delete-a-group
jackknife replicates ``S_(-g)``, g = 1..G (the value with the g-th of G class-stratified
probe groups left out). For a step, with D = S_after − S_before and
D_(-g) = S_after,(-g) − S_before,(-g) on the *same* probe (a paired difference),

    SE(D)² = (G − 1)/G · Σ_g (D_(-g) − mean_g D_(-g))²,

and the step is kept iff ``D >= -(tolerance + z · SE(D))``. ``z = 0`` gives the fixed
margin rule ``D >= -tolerance``. On a step that changes nothing that matters, D / SE(D)
follows about a Student t with G − 1 degrees of freedom, so the false-rejection rate is
about :func:`false_rejection_level` ``(z, G)`` (3.8 % for the default z = 2, G = 10).

A step whose parameters or score are not finite is never kept, not even when forced.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

__all__ = [
    "Score",
    "Verdict",
    "GuardDecision",
    "Scored",
    "paired_se",
    "needs_se",
    "judge",
    "force",
    "false_rejection_level",
    "AcceptanceWindow",
]


class Score(NamedTuple):
    """A probe score and its jackknife replicates (None: not computed, ``z = 0``)."""

    value: float
    replicates: tuple[float, ...] | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)


class Scored(NamedTuple):
    """A score with the probe features it came from (to compute replicates on need)."""

    score: Score
    feats: dict[str, Any] | None = None


class Verdict(NamedTuple):
    """What :func:`judge` found: keep the step?, is the attempt finite?, D and SE(D)."""

    accepted: bool
    finite: bool
    diff: float
    se: float


class GuardDecision(NamedTuple):
    """Outcome of the latest ``step``. ``before``/``after`` are None on unchecked steps and
    with ``measure="random"``; ``after`` is the score of the last attempt; ``retries``
    counts the extra attempts; ``se`` is SE(D) of the last attempt (None when not computed);
    ``nonfinite`` counts the attempts of this step rolled back as non-finite."""

    accepted: bool
    before: float | None
    after: float | None
    retries: int
    forced: bool
    checked: bool
    se: float | None = None
    nonfinite: int = 0


def paired_se(before: Sequence[float], after: Sequence[float]) -> float:
    """Jackknife standard error of S_after − S_before from the paired replicates."""
    if len(before) != len(after) or len(before) < 2:
        raise ValueError(
            f"replicates: expected two sequences of the same length >= 2, got "
            f"{len(before)} and {len(after)}"
        )
    d = [a - b for a, b in zip(after, before, strict=True)]
    g = len(d)
    mean = sum(d) / g
    return math.sqrt((g - 1) / g * sum((x - mean) ** 2 for x in d))


def needs_se(before: Score, after: Score, tolerance: float) -> bool:
    """Whether SE(D) can change the verdict: both finite and D < −tolerance (otherwise the
    step is kept, or rejected as non-finite, whatever the SE)."""
    return before.finite and after.finite and after.value - before.value < -tolerance


def judge(before: Score, after: Score, *, z: float, tolerance: float) -> Verdict:
    """Keep iff ``after`` is finite and D >= −(tolerance + z·SE(D)); a non-finite ``before``
    (nothing to compare with) keeps any finite ``after``. SE is 0 when z is 0, when a
    score has no replicates, or when the replicates are not finite (the fixed margin)."""
    if not after.finite:
        return Verdict(False, False, math.nan, math.nan)
    if not before.finite:
        return Verdict(True, True, math.nan, math.nan)
    diff = after.value - before.value
    se = 0.0
    if z > 0 and before.replicates is not None and after.replicates is not None:
        se = paired_se(before.replicates, after.replicates)
        se = se if math.isfinite(se) else 0.0
    return Verdict(diff >= -(tolerance + z * se), True, diff, se)


def force(accepted: bool, finite: bool, consecutive_rejects: int,
          limit: int | None) -> tuple[bool, bool]:
    """(accepted, forced): a failing *finite* check is kept anyway once ``limit`` checks in
    a row were rejected (None: never); a non-finite one never is."""
    if accepted or not finite or limit is None or consecutive_rejects < limit:
        return accepted, False
    return True, True


def false_rejection_level(z: float, groups: int) -> float:
    """P(T < −z), T Student t with ``groups − 1`` degrees of freedom: the nominal rate at
    which the rule rejects steps that change nothing that matters."""
    from scipy import stats

    return float(stats.t.sf(z, groups - 1))


class AcceptanceWindow:
    """Acceptance rate over the last ``size`` checks; :meth:`record` returns True once,
    the first time a full window's rate falls below ``level``."""

    def __init__(self, size: int = 50, level: float = 0.5) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"warn_window: expected an integer >= 1, got {size!r}")
        if not 0.0 <= float(level) <= 1.0:
            raise ValueError(f"warn_below: expected a number in [0, 1], got {level!r}")
        self.size, self.level = size, float(level)
        self.history: deque[bool] = deque(maxlen=size)
        self.warned = False

    @property
    def rate(self) -> float:
        """Acceptance rate over the window so far (NaN before the first check)."""
        return sum(self.history) / len(self.history) if self.history else math.nan

    def record(self, accepted: bool) -> bool:
        self.history.append(bool(accepted))
        if self.warned or len(self.history) < self.size or self.rate >= self.level:
            return False
        self.warned = True
        return True

    def state(self) -> dict[str, Any]:
        return {"history": list(self.history), "warned": self.warned}

    def load(self, state: dict[str, Any] | None) -> None:
        self.history = deque((bool(a) for a in (state or {}).get("history", [])),
                             maxlen=self.size)
        self.warned = bool((state or {}).get("warned", False))
