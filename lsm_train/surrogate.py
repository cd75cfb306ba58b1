"""Soft MD-LSM: the differentiable surrogate of the MD-LSM degree (DESIGN §2).

For two classes A, B of a batch of features H (n × d)::

    S_τ(A, B) = (1 / |A||B|) · Σ_{a∈A, b∈B} σ( ŵ·(a − b) / τ ),     σ = logistic function,

    ŵ ∝ Σ_s⁻¹ (μ_A − μ_B),    scaled so that ŵᵀ Σ_s ŵ = 1,
    Σ_s = (1 − λ) Σ + (λ·tr Σ / d + ε·v̄) I.

* Σ is the pooled within-class covariance of *all* classes present in the batch,
  Σ = Σ_k Σ_{i∈k} (h_i − μ_k)(h_i − μ_k)ᵀ / max(n − K, 1), for both schemes (one shared matrix,
  hence one factorization for every class pair). A class with a single sample adds nothing.
* λ = ``shrinkage`` ∈ [0, 1]; λ = 1 gives the mean-difference direction.
* ε·v̄ is a tiny ridge (ε = 1e-6, v̄ = total variance per coordinate of the batch) that keeps
  Σ_s invertible when λ = 0 or the within-class scatter vanishes; it scales with H, so the
  value stays invariant to positive scaling of H.
* ŵᵀΣ_sŵ = 1 puts the projections in units of within-class standard deviation, so S_τ does
  not depend on the scale of H, and S_τ → the exact degree (Mann–Whitney AUC, ties 1/2) of
  direction ŵ as τ → 0. S_τ ∈ (0, 1); it is *not* clipped at 1/2.
* ``scheme="pairwise"`` averages S_τ over the K(K−1)/2 class pairs (k < l, A = class k);
  ``scheme="ovr"`` averages S_τ(class k, rest) over the K classes (μ_B = mean of the rest).
* A batch with fewer than two classes returns exactly 1.0, computed as ``H.sum() * 0 + 1`` so
  that it is connected to the graph with a zero gradient (never NaN).

Cost. The direction solve uses one Cholesky factorization with the K class means as
right-hand sides (ŵ for a pair is a difference of the K solutions): the d × d primal when
d <= n, the n × n dual (Woodbury) when d > n, so no d × d matrix is ever formed then —
O(n·d·min(n, d) + min(n, d)³). The soft count over all cross-class pairs works on n
projections per direction, O(n²) in total, in blocks of bounded memory.
"""

from __future__ import annotations

from typing import Any

import torch

from lsm_train._validation import (
    _as_float,
    check_labels,
    check_pair,
    check_points,
    check_positive,
    to_tensor,
)
from lsm_train.features import reduce_features

__all__ = ["soft_md_lsm", "soft_pair_score", "fisher_directions", "SCHEMES"]

SCHEMES = ("pairwise", "ovr")
_RIDGE = 1e-6  # ε: ridge relative to the total variance per coordinate
_BLOCK_ELEMS = 1 << 22  # max entries of one block of pairwise differences


# --------------------------------------------------------------------------- validation


def _check_shrinkage(shrinkage: Any) -> float:
    try:
        v = float(shrinkage)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shrinkage: expected a number in [0, 1], got {shrinkage!r}") from err
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"shrinkage: expected a number in [0, 1], got {shrinkage!r}")
    return v


def _check_scheme(scheme: Any) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    return scheme


def _features(H: Any, reduce: str) -> torch.Tensor:
    t = to_tensor(H, "H")
    if not t.is_floating_point():
        t = _as_float(t)
    return check_points(reduce_features(t, reduce), "H")


# --------------------------------------------------------------------------- linear algebra


def _spd_solve(S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """S⁻¹ R for a symmetric positive definite S (Cholesky; LU if Cholesky fails)."""
    L, info = torch.linalg.cholesky_ex(S)
    if bool((info != 0).any()):
        return torch.linalg.solve(S, R)
    return torch.cholesky_solve(R, L)


def _shrunk_solve(
    U: torch.Tensor, R: torch.Tensor, alpha: torch.Tensor, c: float, dual: bool | None = None
) -> torch.Tensor:
    """Σ_s⁻¹ R with Σ_s = αI + c·UᵀU (U: n × d, R: d × r).

    Primal: a d × d Cholesky solve. Dual (Woodbury), never forming a d × d matrix:
    Σ_s⁻¹R = (R − c·Uᵀ(αI_n + c·UUᵀ)⁻¹ U R) / α. ``dual=None`` picks the dual when d > n.
    """
    n, d = U.shape
    if dual is None:
        dual = d > n
    if c == 0.0:
        return R / alpha
    if dual:
        G = c * (U @ U.mT)
        G = G + alpha * torch.eye(n, dtype=U.dtype, device=U.device)
        return (R - c * (U.mT @ _spd_solve(G, U @ R))) / alpha
    S = c * (U.mT @ U)
    S = S + alpha * torch.eye(d, dtype=U.dtype, device=U.device)
    return _spd_solve(S, R)


# --------------------------------------------------------------------------- directions


def _tasks(counts: torch.Tensor, scheme: str) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Coefficients C (K × T) with δ_t = Mu @ C[:, t], and the (a-class, b-classes) per task."""
    K = counts.numel()
    dtype, device = counts.dtype, counts.device
    if scheme == "pairwise":
        pairs = [(k, l) for k in range(K) for l in range(k + 1, K)]
        C = torch.zeros(K, len(pairs), dtype=dtype, device=device)
        for t, (k, l) in enumerate(pairs):
            C[k, t] = 1.0
            C[l, t] = -1.0
        return C, pairs
    n = counts.sum()
    C = -counts[:, None] / (n - counts)[None, :]  # μ_rest(k) = Σ_{j≠k} n_j μ_j / (n − n_k)
    C.fill_diagonal_(1.0)
    return C, [(k, *[j for j in range(K) if j != k]) for k in range(K)]


def _directions(
    H: torch.Tensor,
    inverse: torch.Tensor,
    K: int,
    scheme: str,
    shrinkage: float,
    dual: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, ...]], torch.Tensor]:
    """Centered H, per-class solutions W (d × K, H units), task norms r (T,), tasks, C.

    The normalized direction of task t is ŵ_t = W @ C[:, t] · r_t, with ŵ_tᵀ Σ_s ŵ_t = 1
    (up to the ε guard of the square root).
    """
    n, d = H.shape
    dtype = H.dtype
    Y = torch.zeros(n, K, dtype=dtype, device=H.device)
    Y[torch.arange(n, device=H.device), inverse] = 1.0
    counts = Y.sum(0)
    Hc = H - H.mean(0, keepdim=True)
    tiny = torch.finfo(dtype).eps ** 2
    s = torch.sqrt(Hc.pow(2).sum() / (n * d) + tiny)  # rms scale: makes S_τ scale invariant
    X = Hc / s
    Mu = (X.mT @ Y) / counts  # d × K class means
    U = X - Y @ Mu.mT  # within-class centered
    m = max(n - K, 1)
    alpha = shrinkage * U.pow(2).sum() / (m * d) + _RIDGE
    Z = _shrunk_solve(U, Mu, alpha, (1.0 - shrinkage) / m, dual)  # Σ_s⁻¹ μ_k (X units)
    C, tasks = _tasks(counts, scheme)
    quad = ((Mu @ C) * (Z @ C)).sum(0)  # δ_tᵀ Σ_s⁻¹ δ_t (Mahalanobis², scale invariant)
    r = torch.rsqrt(quad.clamp_min(0.0) + torch.finfo(dtype).eps)
    return Hc, Z / s, r, tasks, C


def fisher_directions(
    H: Any, y: Any, *, scheme: str = "pairwise", shrinkage: float = 0.1, reduce: str = "auto"
) -> tuple[torch.Tensor, list[tuple[int, int | None]], torch.Tensor]:
    """The normalized shrunk Fisher directions used by :func:`soft_md_lsm`.

    Returns ``(W, tasks, classes)``: W is d × T, column t the direction ŵ_t (ŵᵀΣ_sŵ = 1) of
    task t; ``tasks[t] = (k, l)`` (class indices into ``classes``) for pairwise, ``(k, None)``
    for ovr (class k vs the rest); ``classes`` are the sorted labels present. Differentiable.
    """
    scheme = _check_scheme(scheme)
    shrinkage = _check_shrinkage(shrinkage)
    X = _features(H, reduce)
    labels = check_labels(y, X.shape[0], device=X.device)
    classes, inverse = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(
            f"y: expected at least 2 distinct classes, got {classes.numel()} "
            f"(labels present: {classes.tolist()})"
        )
    _, W, r, tasks, C = _directions(X, inverse, classes.numel(), scheme, shrinkage)
    out = [(t[0], t[1] if scheme == "pairwise" else None) for t in tasks]
    return (W @ C) * r, out, classes


# --------------------------------------------------------------------------- soft counts


def _soft_counts(a: torch.Tensor, b: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor):
    """Σ_{i,j} ma_i mb_j σ(a_i − b_j) per row (a: T × La, b: T × Lb), in memory blocks."""
    T, La = a.shape
    Lb = b.shape[1]
    step = max(1, _BLOCK_ELEMS // max(1, La * Lb))
    out = []
    for t0 in range(0, T, step):
        sl = slice(t0, t0 + step)
        z = torch.sigmoid(a[sl, :, None] - b[sl, None, :])
        w = ma[sl, :, None] * mb[sl, None, :]
        out.append((z * w).sum((1, 2)))
    return torch.cat(out)


def _padded(groups: list[torch.Tensor], device: torch.device):
    L = max(int(g.numel()) for g in groups)
    idx = torch.zeros(len(groups), L, dtype=torch.long, device=device)
    mask = torch.zeros(len(groups), L, dtype=torch.bool, device=device)
    for t, g in enumerate(groups):
        idx[t, : g.numel()] = g
        mask[t, : g.numel()] = True
    return idx, mask


# --------------------------------------------------------------------------- public API


def soft_md_lsm(
    H: Any,
    y: Any,
    tau: float = 0.5,
    *,
    scheme: str = "pairwise",
    shrinkage: float = 0.1,
    detach_directions: bool = False,
    reduce: str = "auto",
) -> torch.Tensor:
    """Soft MD-LSM of a batch: a 0-dim tensor in (0, 1), differentiable with respect to H.

    Args:
        H: features (n, d), or a map reduced by ``reduce`` (see :mod:`lsm_train.features`);
            tensor on any device or numpy array.
        y: integer class labels (n,).
        tau: temperature > 0, in units of within-class standard deviation; S_τ tends to the
            exact degree of the Fisher direction as tau -> 0.
        scheme: ``"pairwise"`` (mean over class pairs) or ``"ovr"`` (mean over class vs rest).
        shrinkage: λ in [0, 1], shrinkage of the pooled within-class covariance to
            (tr Σ / d)·I.
        detach_directions: stop the gradient through the directions ŵ; H still gets the
            gradient through the projections ŵ·h.
        reduce: how to reduce maps (N, C, H, W) / sequences (N, T, D) to (N, d).

    Returns exactly 1.0 (as ``H.sum() * 0 + 1``, zero gradient) when the batch has fewer than
    two classes. See the module docstring for the math and the cost.
    """
    tau = check_positive(tau, "tau")
    scheme = _check_scheme(scheme)
    shrinkage = _check_shrinkage(shrinkage)
    X = _features(H, reduce)
    labels = check_labels(y, X.shape[0], device=X.device)
    classes, inverse = torch.unique(labels, return_inverse=True)
    K = classes.numel()
    if K < 2:
        return X.sum() * 0 + 1.0
    Hc, W, r, tasks, C = _directions(X, inverse, K, scheme, shrinkage)
    if detach_directions:
        W, r = W.detach(), r.detach()
    P = (Hc @ W) @ C * (r / tau)  # n × T projections, in units of τ
    members = [torch.nonzero(inverse == k).flatten() for k in range(K)]
    ia, ma = _padded([members[t[0]] for t in tasks], X.device)
    ib, mb = _padded([torch.cat([members[j] for j in t[1:]]) for t in tasks], X.device)
    cols = torch.arange(len(tasks), device=X.device)[:, None]
    a, b = P[ia, cols], P[ib, cols]
    ma, mb = ma.to(X.dtype), mb.to(X.dtype)
    scores = _soft_counts(a, b, ma, mb) / (ma.sum(1) * mb.sum(1))
    return scores.mean()


def soft_pair_score(a: Any, b: Any, w: Any, tau: float = 0.5) -> torch.Tensor:
    """Logistic soft AUC of a fixed direction: mean over a∈A, b∈B of σ(w·(a − b) / τ).

    ``w`` is used as given (its scale acts like 1/τ); differentiable in A, B and w. As tau ->
    0 it tends to the Mann–Whitney AUC of the scores w·x (ties count 1/2). Returns a 0-dim
    tensor in (0, 1).
    """
    tau = check_positive(tau, "tau")
    A, B = check_pair(a, b)
    wt = to_tensor(w, "w")
    if wt.ndim == 2 and 1 in wt.shape:
        wt = wt.reshape(-1)
    if wt.ndim != 1 or wt.shape[0] != A.shape[1]:
        raise ValueError(
            f"w: expected a direction of shape ({A.shape[1]},), got shape {tuple(wt.shape)}"
        )
    if not wt.is_floating_point():
        wt = _as_float(wt)
    if not bool(torch.isfinite(wt).all()):
        raise ValueError("w: expected finite values, found NaN or inf")
    if wt.device != A.device:
        raise ValueError(
            f"w must be on the same device as A and B: w on {wt.device}, A on {A.device}"
        )
    dtype = torch.promote_types(A.dtype, wt.dtype)
    wt = wt.to(dtype)
    pa = (A.to(dtype) @ wt)[None] / tau
    pb = (B.to(dtype) @ wt)[None] / tau
    ones_a, ones_b = torch.ones_like(pa), torch.ones_like(pb)
    return (_soft_counts(pa, pb, ones_a, ones_b) / (pa.numel() * pb.numel()))[0]
