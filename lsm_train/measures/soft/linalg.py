"""Linear algebra of the soft MD-LSM: SPD solves with adjoint backwards (docs/loss.md).

* :func:`spd_solve` / :class:`SPDSolve`: S⁻¹R with one factorization (Cholesky, LU if it
  fails: a host read of the status), reused by the backward.
* :class:`SafeSolve`: the sync-free variant of the static path: ``cholesky_ex`` whose status
  never leaves the device; a failed factorization gives X = 0 and ``ok`` = False, which the
  caller turns into the mean-difference direction with ``where``.
* :func:`shrunk_solve`: Σ_s⁻¹R with Σ_s = αI + c·UᵀU, primal or dual (Woodbury).
"""

from __future__ import annotations

import torch


def factor(S: torch.Tensor) -> tuple[str, tuple[torch.Tensor, ...]]:
    """Cholesky factor of a symmetric positive definite S; LU if Cholesky fails (round-off).

    When the order is a multiple of 128 (batch sizes often are) S is bordered by one unit
    row/column, [[S, 0], [0, 1]] = [[L, 0], [0, 1]][[L, 0], [0, 1]]ᵀ: the CPU LAPACK Cholesky
    is 2-4x slower at such orders (cache aliasing, measured 120 µs at 128 against 31 µs at
    129); the factor is the same."""
    L, info = cholesky(S)
    if int(info) != 0:
        return "lu", torch.linalg.lu_factor(S)
    return "cholesky", (L,)


def cholesky(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, info) of :func:`factor`'s Cholesky; ``info`` (0 = success) stays on the device."""
    m = S.shape[-1]
    if m % 128 == 0:
        L, info = torch.linalg.cholesky_ex(torch.block_diag(S, S.new_ones(1, 1)))
        return L[:m, :m], info
    return torch.linalg.cholesky_ex(S)


def apply_factor(kind: str, F: tuple[torch.Tensor, ...], R: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_solve(R, F[0]) if kind == "cholesky" else torch.linalg.lu_solve(*F, R)


def fast_factor(S: torch.Tensor, status: list | None) -> tuple[str, tuple[torch.Tensor, ...]]:
    """:func:`factor`, or with a ``status`` list the Cholesky factor alone, its ``info``
    appended to ``status`` for the caller to read with its other values in one host sync
    (and to redo with :func:`factor`'s LU fallback in the rare case it is not 0)."""
    if status is None:
        return factor(S)
    L, info = cholesky(S)
    status.append(info)
    return "cholesky", (L,)


class Gram(torch.autograd.Function):
    """V Vᵀ with the symmetric adjoint ḡV = (ḡ + ḡᵀ) V: one matrix product in the backward
    instead of two. The backward is made of differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx, V: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(V)
        return V @ V.mT

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (V,) = ctx.saved_tensors
        return (g + g.mT) @ V


class SPDSolve(torch.autograd.Function):
    """X = S⁻¹R for symmetric S, with the adjoint backward ḡR = S⁻¹ḡX, ḡS = −ḡR Xᵀ that
    reuses the factorization: O(m²·r) instead of differentiating through the factorization
    (O(m³)). Under create_graph the backward re-enters this function, so it stays
    differentiable (double backward)."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        kind, F = factor(S)
        X = apply_factor(kind, F, R)
        ctx.kind = kind
        ctx.save_for_backward(S, X, *F)
        return X

    @staticmethod
    def backward(ctx, gX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, X, *F = ctx.saved_tensors
        if torch.is_grad_enabled():
            gR = SPDSolve.apply(S, gX)
        else:
            gR = apply_factor(ctx.kind, tuple(F), gX)  # S symmetric: S⁻ᵀ = S⁻¹
        return -gR @ X.mT, gR


def spd_solve(S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """S⁻¹ R for a symmetric positive definite S (one factorization, many right-hand sides)."""
    return SPDSolve.apply(S, R)


def shrunk_solve(
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
        return (R - c * (U.mT @ spd_solve(G, U @ R))) / alpha
    S = c * Gram.apply(U.mT)
    S = S + alpha * torch.eye(d, dtype=U.dtype, device=U.device)
    return spd_solve(S, R)



class SafeSolve(torch.autograd.Function):
    """(X, ok) = (S⁻¹R, True) for a batch of SPD matrices S (…, m, m), or (0, False) where
    the Cholesky factorization fails; nothing is read to the host. The backward is the
    adjoint ḡR = S⁻¹ḡX, ḡS = −ḡR Xᵀ (0 where it failed), re-entering this function under
    create_graph, so it never differentiates through the factorization."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, info = torch.linalg.cholesky_ex(S)
        ok = (info == 0)[..., None, None]
        L = torch.where(ok, L, torch.eye(S.shape[-1], dtype=S.dtype, device=S.device))
        X = _cho_solve(L, R) * ok
        ctx.save_for_backward(S, X, L, ok)
        ctx.mark_non_differentiable(ok)
        return X, ok

    @staticmethod
    def backward(ctx, gX: torch.Tensor, _gok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, X, L, ok = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: stay differentiable
            gR, _ = SafeSolve.apply(S, gX)
        else:
            gR = _cho_solve(L, gX) * ok
        return -gR @ X.mT, gR


def _cho_solve(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ R by two triangular solves: unlike ``cholesky_solve``, which reads a status
    to the host, ``solve_triangular`` has none."""
    T = torch.linalg.solve_triangular(L, R, upper=False)
    return torch.linalg.solve_triangular(L.mT, T, upper=True)
