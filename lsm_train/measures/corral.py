"""Wolfe's corral for the MD-LSM margin: the affine minimiser over a growing set of rows
of A and of −B (docs/math.md#md-lsm-margin).

:class:`Corral` holds the rows z_i of the current corral with convex weights per side and
keeps a Cholesky factor of M = Z Zᵀ + E Eᵀ that grows with appended rows; ``minimise``
runs Wolfe's minor cycle (affine minimiser, then drop rows whose weight reaches zero).
It is the small dense algebra of :func:`lsm_train.measures.margin.md_lsm_margin`
(float64 numpy on the CPU); the oracle and the stopping rule live there.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular
from scipy.linalg.lapack import dtrtrs

__all__ = ["Corral"]


class Corral:
    """Wolfe's corral: rows z_i (a row of A, or −(a row of B)) with convex weights per side,
    M = Z Zᵀ + E Eᵀ (E the side indicators: M_ij = z_i·z_j + [side_i = side_j]) and its
    lower Cholesky factor L. M is positive definite iff the rows are affinely independent in
    the sense of conv(A) − conv(B) (affine hull of dimension s − 2).

    Dropping is lazy: a dropped row keeps its place in L with weight 0 and the affine
    minimiser is taken under the extra constraints w_D = 0, through the cached columns
    K = M⁻¹[E, I_D] (updated in O(s·|K|) when a row is appended, by the bordered-inverse
    formula); the factor is compacted only when |D| exceeds ``lazy``. A dropped row that the
    oracle picks again is simply re-activated. Small dense algebra on the CPU, float64."""

    def __init__(self, za: np.ndarray, ia: int, zb: np.ndarray, ib: int, lazy: int = 48):
        self.lazy = lazy
        self._Z = np.zeros((64, za.shape[0]))  # buffers that grow by doubling
        self._M = np.zeros((64, 64))
        self._Z[:2] = za, -zb
        self.side = np.array([True, False])  # True: a row of A
        self.idx = np.array([ia, ib], dtype=np.int64)
        self.dropped = np.zeros(2, dtype=bool)
        self.v = np.ones(2)
        self._M[:2, :2] = self.z @ self.z.T + np.eye(2)
        self._factor()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def s(self) -> int:
        return len(self.v)

    @property
    def z(self) -> np.ndarray:
        return self._Z[: self.s]

    @property
    def M(self) -> np.ndarray:
        return self._M[: self.s, : self.s]

    @property
    def sides(self) -> np.ndarray:
        return self.side

    @property
    def rows(self) -> np.ndarray:
        return self.idx

    @property
    def x(self) -> np.ndarray:
        return self.v @ self.z

    def find(self, side: bool, i: int) -> int:
        hit = np.flatnonzero((self.side == side) & (self.idx == i))
        return int(hit[0]) if len(hit) else -1

    def _tri(self, r: np.ndarray, trans: str = "N") -> np.ndarray:
        """L⁻¹r (or L⁻ᵀr): solved with the padded buffer (identity beyond row s), so that
        appending a row never copies the factor."""
        s, cap = self.s, self._L.shape[0]
        pad = np.zeros((cap,) + r.shape[1:], order="F")
        pad[:s] = r
        # LAPACK directly on the transposed (Fortran-ordered, upper) view: no copies
        x, info = dtrtrs(self._L.T, pad, lower=0, trans=int(trans == "N"), overwrite_b=1)
        if info:
            raise np.linalg.LinAlgError(f"dtrtrs: info {info}")
        return x[:s]

    def _solve(self, R: np.ndarray) -> np.ndarray:
        return self._tri(self._tri(R), "T")

    def _factor(self) -> None:
        s = self.s
        cap = -(-(s + 1) // 64) * 64
        self._L = np.eye(cap)
        self._L[:s, :s] = np.linalg.cholesky(self.M)
        E = np.stack([self.side, ~self.side], 1).astype(np.float64)
        self.K = self._solve(E)  # M⁻¹ E; columns M⁻¹ e_j of dropped rows follow
        self.D: list[int] = []

    # ------------------------------------------------------------------ changes
    def append(self, zs: np.ndarray, sides: np.ndarray, idx: np.ndarray) -> int:
        """Add rows (in order of priority) with weight 0, skipping any row that lies
        (numerically) in the affine hull of the corral and the rows accepted before it.
        One block update: the factor gains the rows of the Schur complement's Cholesky
        factor, K the block bordered inverse. Returns the number of rows added."""
        s = self.s
        C = self.z @ zs.T + (self.side[:, None] == sides[None, :])  # s × k
        N = zs @ zs.T + (sides[:, None] == sides[None, :])  # k × k
        Lc = self._tri(C)
        S = N - Lc.T @ Lc  # Schur complement
        acc: list[int] = []
        Ls = np.zeros((len(sides), len(sides)))
        try:  # usual case: every row is independent
            full = np.linalg.cholesky(S)
            if np.all(np.diag(full) ** 2 > 1e-12 * np.diag(N)):
                acc, Ls = list(range(len(sides))), full
        except np.linalg.LinAlgError:
            pass
        for j in range(len(sides) if not acc else 0):  # pivoted: skip dependent rows
            r = len(acc)
            lrow = (solve_triangular(Ls[:r, :r], S[acc, j], lower=True, check_finite=False)
                    if r else np.zeros(0))
            piv = S[j, j] - lrow @ lrow
            if piv > 1e-12 * N[j, j]:
                Ls[r, :r], Ls[r, r] = lrow, np.sqrt(piv)
                acc.append(j)
        if not acc:
            if self.D:  # they may only depend on dropped rows
                self._compact()
                return self.append(zs, sides, idx)
            return 0
        r, Ls = len(acc), Ls[: len(acc), : len(acc)]
        C, Lc, N, sides = C[:, acc], Lc[:, acc], N[np.ix_(acc, acc)], sides[acc]
        # block bordered inverse: M'⁻¹[R; P] = [M⁻¹R + Q·G; −G], G = S⁻¹(QᵀR − P),
        # Q = M⁻¹C; P holds the new rows' entries of E (their sides), 0 for the e_j columns
        Q = self._tri(Lc, "T")
        T = C.T @ self.K
        T[:, 0] -= sides
        T[:, 1] -= ~sides
        G = solve_triangular(Ls, solve_triangular(Ls, T, lower=True, check_finite=False),
                             lower=True, trans="T", check_finite=False)
        self.K = np.vstack([self.K + Q @ G, -G])
        if s + r >= self._L.shape[0]:  # keep at least one identity row of padding
            L = np.eye(self._L.shape[0] + 64 * (1 + r // 64))
            L[:s, :s] = self._L[:s, :s]
            self._L = L
        self._L[s : s + r, :s], self._L[s : s + r, s : s + r] = Lc.T, Ls
        if s + r > self._Z.shape[0]:
            cap = 2 * (s + r)
            Z, M = np.zeros((cap, self._Z.shape[1])), np.zeros((cap, cap))
            Z[:s], M[:s, :s] = self._Z[:s], self._M[:s, :s]
            self._Z, self._M = Z, M
        self._Z[s : s + r] = zs[acc]
        self._M[s : s + r, :s], self._M[:s, s : s + r] = C.T, C
        self._M[s : s + r, s : s + r] = N
        self.side = np.append(self.side, sides)
        self.idx = np.append(self.idx, idx[acc])
        self.dropped = np.append(self.dropped, np.zeros(r, dtype=bool))
        self.v = np.append(self.v, np.zeros(r))
        return r

    def undrop(self, j: int) -> None:
        k = self.D.index(j)
        self.D.pop(k)
        self.K = np.delete(self.K, 2 + k, axis=1)
        self.dropped[j] = False

    def _drop(self, js: np.ndarray) -> None:
        e = np.zeros((self.s, len(js)))
        e[js, np.arange(len(js))] = 1.0
        self.K = np.hstack([self.K, self._solve(e)])
        self.D += [int(j) for j in js]
        self.dropped[js] = True
        self.v[js] = 0.0
        if len(self.D) > self.lazy:
            self._compact()

    def _compact(self) -> None:
        keep = ~self.dropped
        n, K = int(keep.sum()), np.flatnonzero(keep)
        self._M[:n, :n] = self.M[np.ix_(K, K)]
        self._Z[:n] = self._Z[K]
        self.side, self.idx = self.side[keep], self.idx[keep]
        self.v, self.dropped = self.v[keep], self.dropped[keep]
        self._factor()

    # ------------------------------------------------------------------ minimisation
    def _affine_min(self) -> np.ndarray:
        """Min-norm point of the affine hull of the active rows: w = K γ with Eᵀw = (1, 1)
        and w_D = 0 (a (2 + |D|)-dimensional symmetric system)."""
        E = np.stack([self.side, ~self.side], 1).astype(np.float64)
        C = np.vstack([E.T @ self.K, self.K[self.D]])
        rhs = np.zeros(C.shape[0])
        rhs[:2] = 1.0
        w = self.K @ np.linalg.solve(C, rhs)
        w[self.D] = 0.0
        return w

    def minimise(self) -> None:
        """Minor cycles: go to the affine minimiser, dropping rows whose weight reaches 0
        (the norm decreases along the way)."""
        while True:
            w = self._affine_min()
            neg = (w <= 0) & ~self.dropped
            if not neg.any():
                self.v = np.where(self.dropped, 0.0, w)
                return
            # optimistic step: clip the negative weights and renormalise; taken when it
            # lowers the norm (it is a feasible point), dropping all those rows at once
            on, live = self.side, ~self.dropped & ~neg
            if (live & on).any() and (live & ~on).any():
                wc = np.where(live, w, 0.0)
                wc = np.where(on, wc / wc[on].sum(), wc / wc[~on].sum())
                xc, x = wc @ self.z, self.x
                if xc @ xc < x @ x:
                    self.v = wc
                    self._drop(np.flatnonzero(neg))
                    continue
            dv = self.v - w
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(neg & (dv > 0), self.v / dv, np.inf)
            if not np.isfinite(ratio.min()):  # only weightless rows block: drop them
                self._drop(np.flatnonzero(neg))
                continue
            theta = min(max(float(ratio.min()), 0.0), 1.0)
            v = self.v + theta * (w - self.v)
            out = neg & (v <= 1e-14 * v.max())  # rows that hit 0 on the way leave
            out[int(ratio.argmin())] = True
            for side in (True, False):  # a side never empties (its weights sum to 1)
                live = (self.side == side) & ~self.dropped
                if not (live & ~out).any():
                    out[int(np.where(live, v, -np.inf).argmax())] = False
            v = np.where(out | self.dropped, 0.0, np.clip(v, 0.0, None))
            on = self.side
            self.v = np.where(on, v / v[on].sum(), v / v[~on].sum())
            self._drop(np.flatnonzero(out))
