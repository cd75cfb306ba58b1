"""MD-LSM margin: the distance between conv(A) and conv(B) (docs/math.md#md-lsm-margin).

    ρ(A, B) = dist(0, conv(A ⊖ B)) = min ‖Aᵀα − Bᵀβ‖  over  α ∈ Δ_|A|, β ∈ Δ_|B|,

twice the hard-margin SVM margin; ρ = 0 ⇔ A and B are not strictly linearly separable.

Algorithm: Wolfe's minimum-norm-point method on P = conv(A) − conv(B), run on A and B
directly. A ⊖ B is never formed: the linear oracle of P is the support function
``argmin_{p∈P} x·p = argmin_a x·a − argmax_b x·b`` (two matrix-vector products), and the
iterate is kept as convex weights over a "corral" of rows of A and of B separately,
x = A_Sᵀα − B_Tᵀβ. A major step adds the rows with the largest Frank–Wolfe violations (up
to 16 at a time, in one block update that skips affinely dependent rows); minor steps move
to the minimiser over the affine hull of the corral (Σα = Σβ = 1: the system M w = E μ with
M = Z Zᵀ + E Eᵀ, solved with a Cholesky factor that grows with the appended rows) and
drop the rows whose weight reaches zero (all negative ones at once when clipping them
lowers the norm, else Wolfe's line search) — lazily, through the cached columns
M⁻¹[E, I_D], so the factor is rebuilt only once per 48 dropped rows. The norm decreases
at every step and the method terminates in exact arithmetic with the exact nearest point.
The oracle runs on a working set of rows (up to 2,048 per side: every row of smaller sets),
kept on the CPU as one matrix [A_S; −B_T] and priced with one matrix-vector product per
major step (ranked in float32, the picks re-priced in float64); it is checked against all
rows only when the working set is solved, and the most violating rows (up to 2,048 per
side) then join it (column generation). Pricing every row at every step, rather than a
small working set solved to optimality first, adds far fewer rows that are later dropped.
Data are centred and scaled first, into one buffer [A; −B] (ρ is translation invariant
and scales linearly). The large products run in float64 on the inputs' device; the small
corral algebra runs in float64 numpy on the CPU (single-threaded BLAS, LAPACK triangular
solves called directly).

Cost: O((|A| + |B|)·d) per full check (a handful per call), O(|W|·d + s·d + s²) per major
step (W the working set, s ≤ d + 2 the corral size), O(s³) per 48 dropped rows. On 2,000
points per class in d = 512 (about 500 support vectors) that is ~65 major steps.

Certified bounds: ``upper`` = ‖x‖ for the current iterate x ∈ P; ``lower`` = the best
min_a u·a − max_b u·b over the unit directions u = x/‖x‖ checked against all rows (weak
duality), clipped at 0. The iteration stops when upper − lower ≤ tol·upper.

Zero: when ‖x‖ falls below 1e-12 of the data scale, or the iteration ends without a
positive lower bound, separability is decided exactly: first by
:func:`~lsm_train.measures.exact.separability_test` on the corral rows only (if a subset
of A and a subset of B are not separable, neither are A and B), then on all rows. Not
separable → exactly 0.0; separable → the LP's separating direction gives a positive lower
bound and the bounds are returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from .._validation import check_pair, check_positive
from .corral import Corral
from .exact import separability_test

__all__ = ["MarginResult", "md_lsm_margin"]

# ‖x‖ below this fraction of the data scale counts as "touching". Not larger: a corral
# whose own hulls are ~1e-9 apart is a separable but nearly degenerate subset, on which the
# exact LP can take minutes; one more Wolfe step puts 0 inside the corral instead.
_ZERO = 1e-12
_CONTROLLER: list[ThreadpoolController] = []


def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (scanned once: a scan costs ~1 ms)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


@dataclass(frozen=True)
class MarginResult:
    """Result of ``md_lsm_margin(..., return_bounds=True)``.

    ``lower <= value <= upper`` (certified, in the input's units); ``value`` is 0.0 exactly
    iff A and B are not strictly separable (then ``lower = upper = 0`` and ``w`` is None).
    ``w`` is the unit direction from conv(B) to conv(A) (``A @ w > B @ w`` on every row
    when separable), a float64 numpy array or tensor on the inputs' device.
    ``iterations`` counts major Wolfe steps.
    """

    value: float
    lower: float
    upper: float
    w: Any
    iterations: int


def _wolfe(data: torch.Tensor, na: int, tol: float, max_iter: int, batch: int = 2048,
           bulk: int = 16):
    """Working-set Wolfe iteration on centred, scaled float64 data ``data`` = [A; −B] (the
    first ``na`` rows are A; any device).

    The working set starts as the ``batch`` rows per side that score worst on the
    mean-difference direction (every row when a side has at most ``batch``), kept on the CPU
    as one stacked matrix W = [A_S; −B_T] so that a major step prices all its rows with one
    matrix-vector product.

    Returns (corral, lower, u, iterations, status), status "converged" (certified within
    tol), "zero" (‖x‖ below _ZERO) or "undecided"; u is the unit direction (numpy) that
    gave ``lower``."""
    a, nb = data[:na], data[na:]  # nb = −B
    x0 = a.mean(0) + nb.mean(0)
    sa, sb = (a @ x0).cpu().numpy(), -(nb @ x0).cpu().numpy()
    wa = np.zeros(na, dtype=bool)
    wb = np.zeros(data.shape[0] - na, dtype=bool)
    wa[np.argsort(sa)[:batch]] = True
    wb[np.argsort(-sb)[:batch]] = True

    def working():
        ia, ib = np.flatnonzero(wa), np.flatnonzero(wb)
        if wa.all() and wb.all():  # every row: no copy (on the CPU)
            W = data.cpu().numpy()
        else:
            W = data[torch.as_tensor(np.r_[ia, na + ib], device=data.device)].cpu().numpy()
        side = np.r_[np.ones(len(ia), dtype=bool), np.zeros(len(ib), dtype=bool)]
        return W, W.astype(np.float32), side, np.r_[ia, ib]

    W, W32, wside, widx = working()
    i0, j0 = int(np.argmin(sa)), int(np.argmax(sb))
    corral = Corral(a[i0].cpu().numpy(), i0, -nb[j0].cpu().numpy(), j0)
    lower, best_u, it = 0.0, None, 0
    while True:
        x = corral.x
        xx = float(x @ x)
        if xx <= _ZERO**2:
            return corral, lower, best_u, it, "zero"
        proj = corral.z @ x
        on = corral.sides
        xa, xb = float(corral.v[on] @ proj[on]), -float(corral.v[~on] @ proj[~on])
        eps = 1e-10 * xx  # violations below this are rounding noise
        added = 0
        if it < max_iter:
            # violation of each working row: a·x − xa (A rows), xb − b·x (B rows; W holds
            # −b). Ranked in float32 (half the memory traffic), the picks re-priced in
            # float64; all rows in float64 when none of the float32 picks violates
            level = np.where(wside, xa, -xb)
            viol = W32 @ x.astype(np.float32) - level
            k = min(bulk, len(viol))
            cand = np.argpartition(viol, k - 1)[:k]
            exact = W[cand] @ x - level[cand]
            if not (exact < -eps).any():
                viol = W @ x - level
                cand = np.argpartition(viol, k - 1)[:k]
                exact = viol[cand]
            order = np.argsort(exact)
            cand = cand[order][exact[order] < -eps]
            if len(cand):
                keys = corral.rows * 2 + corral.sides  # (row, side) -> corral position
                pos = {k: j for j, k in enumerate(keys.tolist())}
                new = []
                for c in cand.tolist():
                    j = pos.get(int(widx[c]) * 2 + int(wside[c]), -1)
                    if j >= 0 and corral.dropped[j]:
                        corral.undrop(j)
                        added += 1
                    elif j < 0:
                        new.append(c)
                if new:
                    new = np.array(new, dtype=np.int64)
                    added += corral.append(W[new], wside[new], widx[new])
        if added:
            it += 1
            corral.minimise()
            continue
        # working set solved (or out of steps, or numerically stalled): check every row
        xt = torch.as_tensor(x, device=data.device)
        # elementwise product and row sum: the same arithmetic for every row, so a point
        # shared by A and B gets bit-identical scores and never fakes a positive gap
        # (negation is exact, so −((−b)·x) = b·x bit for bit)
        fa, fb = (a * xt).sum(1).cpu().numpy(), -(nb * xt).sum(1).cpu().numpy()
        gap = float(fa.min()) - float(fb.max())
        noise = 64 * np.finfo(float).eps * max(np.abs(fa).max(), np.abs(fb).max())
        lo = gap / np.sqrt(xx) if gap > noise else 0.0  # certified only above rounding
        if lo > lower:
            lower, best_u = lo, x / np.sqrt(xx)
        if np.sqrt(xx) - lower <= tol * np.sqrt(xx):
            return corral, lower, best_u, it, "converged"
        add_a, add_b = (fa < xa - eps) & ~wa, (fb > xb + eps) & ~wb
        if it >= max_iter or not (add_a.any() or add_b.any()):
            return corral, lower, best_u, it, "undecided"
        for add, w, f in ((add_a, wa, -fa), (add_b, wb, fb)):
            k = np.flatnonzero(add)
            w[k[np.argsort(-f[k])[:batch]]] = True
        W, W32, wside, widx = working()


def md_lsm_margin(
    A: Any,
    B: Any,
    *,
    tol: float = 1e-4,
    max_iter: int = 20_000,
    return_bounds: bool = False,
) -> float | MarginResult:
    """Distance between conv(A) and conv(B): the MD-LSM margin ρ = dist(0, conv(A ⊖ B)).

    A, B: point sets (rows), torch tensors on any device or numpy arrays, same dimension d.
    Wolfe's minimum-norm-point method on conv(A) − conv(B) through its support function
    (see the module docstring); stops when upper − lower ≤ ``tol``·upper (certified
    bounds) or after ``max_iter`` major steps. Returns the upper bound ‖x‖, a distance
    attained by a point of conv(A) and a point of conv(B), and exactly 0.0 iff the sets are
    not strictly separable (decided by the exact test when the iteration cannot certify a
    positive margin). ``return_bounds=True`` returns a :class:`MarginResult`.

    Cost: O((|A|+|B|)·d) per full check, O(|W|·d + s²) per major step (working set W,
    corral size s ≤ d + 2); ρ(A, B) = ρ(B, A), invariant to a common translation and
    ρ(cA, cB) = c·ρ(A, B) for c > 0.
    """
    ta, tb = check_pair(A, B)
    tol = check_positive(tol, "tol")
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter: expected a positive integer, got {max_iter!r}")
    a = ta.detach().to(torch.float64)
    b = tb.detach().to(torch.float64)
    na = a.shape[0]
    centre = (a.sum(0) + b.sum(0)) / (na + b.shape[0])
    # one buffer [A − c; c − B] = [A; −B] centred, then scaled in place
    data = torch.empty((na + b.shape[0], a.shape[1]), dtype=torch.float64, device=a.device)
    torch.sub(a, centre, out=data[:na])
    torch.sub(centre, b, out=data[na:])
    scale = float(data.norm(dim=1).max())
    if scale == 0.0:  # every point is the same point
        return _result(0.0, 0.0, 0.0, None, 0, ta, A, return_bounds)
    data.div_(scale)

    with _blas().limit(limits=1, user_api="blas"):  # small dense algebra: 1 thread
        corral, lower, u, it, _ = _wolfe(data, na, tol, int(max_iter))
    upper = float(np.linalg.norm(corral.x)) * scale
    lower *= scale
    upper = max(upper, lower)  # equal up to rounding once the optimum is reached
    if lower > 0.0:  # certified separable
        return _result(upper, lower, upper, u, it, ta, A, return_bounds)

    # no positive lower bound: decide exactly, on the corral rows first (a small LP: if
    # subsets of A and B are not separable, neither are A and B). The centred, scaled copy
    # goes to the LP (separability is invariant to both; the LP is better conditioned).
    a, b = data[:na], -data[na:]
    act = corral.v > 0  # the rows that carry the current point
    rows = [torch.as_tensor(corral.rows[(corral.sides == s) & act], device=a.device)
            for s in (1, 0)]
    cert = separability_test(a[rows[0]], b[rows[1]])
    if cert.separable:
        cert = separability_test(a, b)
    if not cert.separable:
        return _result(0.0, 0.0, 0.0, None, it, ta, A, return_bounds)
    w = cert.w / cert.w.norm()
    lo = float((a @ w).min() - (b @ w).max()) * scale
    if lo > lower:
        lower, u = lo, w.cpu().numpy()
    upper = max(upper, lower)
    return _result(upper, lower, upper, u, it, ta, A, return_bounds)


def _result(value, lower, upper, u, it, t, like, return_bounds):
    if not return_bounds:
        return float(value)
    if u is not None and isinstance(like, torch.Tensor):
        u = torch.as_tensor(u, dtype=torch.float64, device=t.device)
    return MarginResult(float(value), float(lower), float(upper), u, int(it))
