"""Exact test of strict linear separability (DESIGN §2, Fact 1).

A and B are strictly linearly separable iff there are w, b with ``a·w > b > b'·w`` for all
a in A, b' in B, iff 0 is not in conv(A ⊖ B). By scaling, this is the LP feasibility
problem on the |A| + |B| original points (never on A ⊖ B):

    find (w, b)  with  a·w - b >= 1  (a in A),   b - a'·w >= 1  (a' in B).

Cheap candidate directions (mean difference, shrinkage Fisher) are tried first: when one
of them already separates the sets, that is a certificate and no LP is solved. Otherwise
scipy's HiGHS decides feasibility; a feasible answer is verified in float64 before it is
returned, so ``separable=True`` is always backed by a checked (w, b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linprog

from .._validation import check_pair

__all__ = ["SeparabilityCertificate", "separability_test"]


@dataclass(frozen=True)
class SeparabilityCertificate:
    """Result of :func:`separability_test`.

    When ``separable`` is True, ``A @ w > b > B @ w`` holds for every row (checked in
    float64); ``w`` has the type of the input (numpy array or tensor on A's device).
    When False, ``w`` and ``b`` are None: 0 lies in conv(A ⊖ B).
    ``method`` is ``"direction"`` (a candidate direction separated the sets) or ``"lp"``.
    """

    separable: bool
    w: Any
    b: float | None
    method: str

    def __bool__(self) -> bool:  # `if lt.separability_test(A, B): ...`
        return self.separable


def _strict_threshold(sa: np.ndarray, sb: np.ndarray) -> float | None:
    """Midpoint threshold if the scores separate strictly, else None."""
    lo, hi = float(sa.min()), float(sb.max())
    if lo > hi:
        mid = 0.5 * (lo + hi)
        if lo > mid > hi:
            return mid
    return None


def _candidate_directions(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    diff = a.mean(0) - b.mean(0)
    out = [diff]
    d = a.shape[1]
    xa, xb = a - a.mean(0), b - b.mean(0)
    n = a.shape[0] + b.shape[0]
    if d <= 2048:
        cov = (xa.T @ xa + xb.T @ xb) / max(n - 2, 1)
        ridge = 1e-3 * max(float(np.trace(cov)) / d, 1e-12)
        try:
            out.append(np.linalg.solve(cov + ridge * np.eye(d), diff))
        except np.linalg.LinAlgError:
            pass
    return out


def _to_output(w: np.ndarray, like: Any) -> Any:
    if isinstance(like, torch.Tensor):
        return torch.as_tensor(w, dtype=torch.float64, device=like.device)
    return w


def separability_test(A: Any, B: Any) -> SeparabilityCertificate:
    """Decide exactly whether A and B (rows are points) are strictly linearly separable.

    Returns a :class:`SeparabilityCertificate`. Cost: O((|A|+|B|)·d²) for the candidate
    directions, then one LP with d + 1 variables and |A| + |B| constraints if needed.
    """
    ta, tb = check_pair(A, B)
    a = ta.detach().cpu().double().numpy()
    b = tb.detach().cpu().double().numpy()

    for w in _candidate_directions(a, b):
        if not np.all(np.isfinite(w)) or not np.any(w):
            continue
        thr = _strict_threshold(a @ w, b @ w)
        if thr is not None:
            return SeparabilityCertificate(True, _to_output(w, A), thr, "direction")

    d = a.shape[1]
    # variables x = (w, c); constraints  -a·w + c <= -1,  b·w - c <= -1
    a_ub = np.vstack([
        np.hstack([-a, np.ones((a.shape[0], 1))]),
        np.hstack([b, -np.ones((b.shape[0], 1))]),
    ])
    b_ub = -np.ones(a_ub.shape[0])
    res = None
    # interior point decides large infeasible problems far faster than simplex; simplex is
    # the fallback when it cannot conclude
    for method in ("highs-ipm", "highs-ds"):
        res = linprog(
            np.zeros(d + 1), A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * (d + 1), method=method
        )
        if res.status in (0, 2):
            break
    if res.status == 2:  # infeasible: 0 ∈ conv(A ⊖ B)
        return SeparabilityCertificate(False, None, None, "lp")
    if res.status != 0:
        raise RuntimeError(f"separability_test: the LP solver failed ({res.message})")
    w = res.x[:d]
    thr = _strict_threshold(a @ w, b @ w)
    if thr is None:  # the solver's tolerance let a touching pair through: not strict
        return SeparabilityCertificate(False, None, None, "lp")
    return SeparabilityCertificate(True, _to_output(w, A), thr, "lp")
