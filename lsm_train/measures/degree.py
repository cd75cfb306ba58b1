"""The MD-LSM degree (DESIGN §2) and the exact AUC of a direction.

For point sets A, B (rows) and a direction w, the fraction of Minkowski-difference vectors
in the open half-space of w is the Mann–Whitney AUC of the scores w·x::

    auc(w) = (1 / |A||B|) · Σ_{a,b} s(w·a − w·b),   s(t) = 1 (t > 0), 1/2 (t = 0), 0 (t < 0),

computed exactly by sorting, O((|A| + |B|)·(d + log)), never over the |A||B| pairs. Since
auc(−w) = 1 − auc(w), the degree m(A, B) = max_w auc(w) lies in [1/2, 1].

The maximum over w is NP-hard in general, so :func:`md_lsm` returns the best exact AUC over
concrete candidate directions — a certified lower bound on m(A, B) — and exactly 1.0 when
A, B are strictly separable:

1. Candidates: shrinkage-LDA w ∝ Σ_α⁻¹(μ_A − μ_B), Σ_α = (1 − α)Σ + α·(tr Σ / d)·I (Σ the
   pooled within-class covariance) for several α (α = 1 is the mean difference), plus a few
   seeded random directions; both signs.
2. Refinement: from the best candidates, Adam ascent on the soft AUC
   mean σ(w·(a − b) / (τ·s_w)) (s_w the within-class std of the projections) with the
   temperature τ falling geometrically from 1 to 0.02, in coordinates whitened by Σ_0.1
   (w = L⁻ᵀv, Σ_0.1 = LLᵀ). Sets of at most ``subsample`` points use all pairs at every
   step; larger ones draw a fresh seeded sample of ``subsample`` points per set every step
   (a stochastic ascent on the soft AUC of all pairs). Cost per step O(subsample·d + d² +
   subsample²) per start.
3. Every candidate and several iterates of the ascent are scored exactly on *all* points;
   the best one is returned, with its exact AUC.
4. If that AUC is 1, A and B are separable. Otherwise the exact LP test
   (:func:`~lsm_train.measures.exact.separability_test`) decides, as ``certify`` asks; a
   separator it finds is checked exactly here, then the value is 1.0 with its direction.

For d = 2 (and |A||B| <= 2^22) the degree is computed exactly instead, by an angular sweep
over the critical directions (normals of the difference vectors); steps 1–3 are skipped.

When d > |A| + |B| everything runs in the span of the centred data (an n × n Gram
eigendecomposition; no d × d matrix), which loses nothing: w·(a − b) only depends on the
component of w in that span. The computation is deterministic given ``seed`` and exactly
symmetric in A, B (the pair is put in a canonical order first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import check_pair, to_tensor

__all__ = ["auc_of_direction", "md_lsm"]

_TAU0, _TAU1 = 1.0, 0.02  # temperature schedule of the ascent (units: within-class std)
_LR = 0.05  # Adam step of the ascent (unit directions in whitened coordinates)
_WHITEN_ALPHA = 0.1  # shrinkage of the metric used for the ascent
_MAX_CELLS = 1 << 24  # bound on problems × rows × columns of one exact-scoring block
_RESAMPLE_EVERY = 1  # ascent steps per fresh sample of rows (large sets)
_ASCENT_CELLS = 1 << 23  # bound on problems × sampled rows × max(d, pairs) of one ascent block
_LP_CHEAP = 50_000  # certify="auto": (|A| + |B|)·(d + 1) below which the LP always runs
_LP_GAP = 0.02  # certify="auto": and above it, when the best value is >= 1 - _LP_GAP


# ----------------------------------------------------------------------------- exact AUC


def _auc2_counts(sa: torch.Tensor, sb: torch.Tensor, mask_a: torch.Tensor | None = None):
    """Σ over pairs of 2·s(sa − sb) as int64, batched over leading dims.

    ``sa`` (..., nA), ``sb`` (..., nB); padded entries of ``sb`` must be +inf and padded
    entries of ``sa`` are excluded by ``mask_a`` (True = real).
    """
    sorted_b = torch.sort(sb.contiguous(), dim=-1).values
    sa = sa.contiguous()
    lo = torch.searchsorted(sorted_b, sa, right=False)  # number of b with score < a
    hi = torch.searchsorted(sorted_b, sa, right=True)  # number of b with score <= a
    counts = lo + hi  # 2·less + equal
    if mask_a is not None:
        counts = counts * mask_a
    return counts.sum(dim=-1)


def _check_direction(w: Any, d: int, device: torch.device) -> torch.Tensor:
    t = to_tensor(w, "w")
    if t.ndim == 2 and 1 in t.shape:
        t = t.reshape(-1)
    if t.ndim != 1 or t.shape[0] != d:
        raise ValueError(f"w: expected a direction of shape ({d},), got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("w: expected finite values, found NaN or inf")
    return t


def _scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w in float64, computed the same way for every row (an elementwise product and a
    row sum, not a BLAS product whose rounding can depend on the shape and the row), so that
    identical points always get identical scores and ties are exact."""
    return (x.double() * w.double()).sum(dim=1)


def _auc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> tuple[int, int]:
    """(2·U, 2·|A||B|) for direction w (float64 scores)."""
    u2 = int(_auc2_counts(_scores(a, w), _scores(b, w)))
    return u2, 2 * a.shape[0] * b.shape[0]


def auc_of_direction(A: Any, B: Any, w: Any) -> float:
    """Exact fraction of pairs (a, b) with w·(a − b) > 0, ties counting 1/2.

    The Mann–Whitney AUC of the scores A @ w against B @ w (float64), computed by sorting in
    O((|A| + |B|)·(d + log(|A| + |B|))). w = 0 gives 0.5. Inputs: torch (any device) or numpy.
    """
    a, b = check_pair(A, B)
    u2, total = _auc(a, b, _check_direction(w, a.shape[1], a.device))
    return u2 / total


# ------------------------------------------------------------------- the batched engine


@dataclass
class _Problems:
    """K two-set problems over the rows of one matrix: padded row indices and masks."""

    ia: torch.Tensor  # (K, maxA) long
    ma: torch.Tensor  # (K, maxA) bool
    ib: torch.Tensor  # (K, maxB) long
    mb: torch.Tensor  # (K, maxB) bool
    na: torch.Tensor  # (K,) long
    nb: torch.Tensor  # (K,) long

    @staticmethod
    def build(pairs: list[tuple[torch.Tensor, torch.Tensor]], device) -> _Problems:
        def pad(idx: list[torch.Tensor]):
            m = max(int(i.numel()) for i in idx)
            out = torch.zeros(len(idx), m, dtype=torch.long)
            mask = torch.zeros(len(idx), m, dtype=torch.bool)
            for k, i in enumerate(idx):
                out[k, : i.numel()] = i.cpu()
                mask[k, : i.numel()] = True
            return out.to(device), mask.to(device)

        ia, ma = pad([p[0] for p in pairs])
        ib, mb = pad([p[1] for p in pairs])
        return _Problems(ia, ma, ib, mb, ma.sum(1), mb.sum(1))

    def __len__(self) -> int:
        return self.ia.shape[0]

    def take(self, sel: slice) -> _Problems:
        return _Problems(*(t[sel] for t in (self.ia, self.ma, self.ib, self.mb, self.na, self.nb)))


def _exact_u2(x: torch.Tensor, W: torch.Tensor, P: _Problems) -> torch.Tensor:
    """Exact 2·U (K, C) of the C columns W[k] (K, r, C) of each problem, scored on rows x."""
    K, _, C = W.shape
    n = x.shape[0]
    out = torch.empty(K, C, dtype=torch.long, device=x.device)
    step = max(1, _MAX_CELLS // max(1, n * C))
    for s in range(0, K, step):
        sl = slice(s, min(K, s + step))
        p = P.take(sl)
        S = torch.einsum("nr,krc->kcn", x, W[sl])  # (k, C, n)
        sa = torch.gather(S, 2, p.ia[:, None, :].expand(-1, C, -1))
        sb = torch.gather(S, 2, p.ib[:, None, :].expand(-1, C, -1))
        sb = sb.masked_fill(~p.mb[:, None, :], math.inf)
        out[sl] = _auc2_counts(sa, sb, p.ma[:, None, :])
    return out


def _orient(u2: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oriented counts max(U2, total − U2) and the sign (+1/−1) that achieves them."""
    flip = 2 * u2 < total
    return torch.where(flip, total - u2, u2), torch.where(flip, -1.0, 1.0)


def _gram(u: torch.Tensor) -> torch.Tensor:
    """uᵀu, symmetrized."""
    g = u.T @ u
    return 0.5 * (g + g.T)


class _Metric:
    """Shared second-order statistics of the rows x (n × r, centred): within-class
    covariance Σ pooled over ``groups`` and solves with Σ_α = (1 − α)Σ + α·β·I, β = tr Σ / d."""

    def __init__(self, x: torch.Tensor, groups: list[torch.Tensor], d_full: int):
        r = x.shape[1]
        used = torch.cat(groups)
        resid = x[used]
        start = 0
        for g in groups:  # rows of `resid` are the groups, one after the other
            block = resid[start:start + g.numel()]
            block -= block.mean(0)
            start += g.numel()
        self.cov = _gram(resid) / max(used.numel() - len(groups), 1)
        self._resid_sq = (resid * resid).sum(1)  # squared norms of the residuals
        self._d_full = d_full
        self._n_groups = len(groups)
        tr = float(torch.diagonal(self.cov).sum())
        if not tr > 0:  # every class is a single repeated point: use the total variance
            tr = float((x * x).sum()) / max(x.shape[0], 1)
        self.beta = (tr if tr > 0 else 1.0) / d_full
        self.eye = torch.eye(r, dtype=x.dtype, device=x.device)
        self._chol: dict[float, torch.Tensor] = {}

    def ledoit_wolf(self) -> float:
        """Ledoit–Wolf shrinkage intensity α ∈ [0, 1] towards (tr S / d)·I for the pooled
        within-class residuals z_i (S = Σ z_i z_iᵀ / n, d the full dimension)::

            α = min(b̄², δ²) / δ²,  δ² = ‖S − (tr S / d)·I‖²_F = ‖S‖²_F − (tr S)² / d,
            b̄² = (1/n²) Σ_i ‖z_i z_iᵀ − S‖²_F = (Σ_i ‖z_i‖⁴ / n − ‖S‖²_F) / n,

        the analytic estimate of the shrinkage that minimizes the expected Frobenius loss
        (Ledoit & Wolf 2004; equals sklearn's ``ledoit_wolf_shrinkage`` of the residuals with
        ``assume_centered=True``). Computed in the reduced coordinates without loss: the
        norms and traces are those of the full d-dimensional S."""
        n = self._resid_sq.numel()
        if n == 0:
            return 1.0
        S = self.cov * (max(n - self._n_groups, 1) / n)
        fro2 = float((S * S).sum())
        tr = float(self._resid_sq.sum()) / n
        delta2 = fro2 - tr * tr / self._d_full
        if not delta2 > 0:
            return 1.0
        bbar2 = (float((self._resid_sq ** 2).sum()) / n - fro2) / n
        return float(min(max(bbar2, 0.0), delta2) / delta2)

    def chol(self, alpha: float) -> torch.Tensor:
        if alpha not in self._chol:
            S = (1.0 - alpha) * self.cov + alpha * self.beta * self.eye
            L, info = torch.linalg.cholesky_ex(S)
            jitter = 1e-10 * self.beta
            while int(info) != 0:  # numerically indefinite: add a growing ridge
                L, info = torch.linalg.cholesky_ex(S + jitter * self.eye)
                jitter *= 100
            self._chol[alpha] = L
        return self._chol[alpha]

    def solve(self, alpha: float, rhs: torch.Tensor) -> torch.Tensor:
        if alpha >= 1.0:
            return rhs.clone()
        return torch.cholesky_solve(rhs, self.chol(alpha))


def _reduce_rows(X: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Centre X and, when d > n, move to the span of the centred rows (an n × n Gram
    eigendecomposition). Returns the reduced rows and a map from reduced to full directions."""
    Xc = X - X.mean(0)
    n, d = X.shape
    if d <= n:
        return Xc, lambda W: W
    e, U = torch.linalg.eigh(Xc @ Xc.T)
    keep = e > e.max().clamp_min(0) * max(n, d) * torch.finfo(X.dtype).eps
    if not bool(keep.any()):  # all rows identical: any direction; keep one coordinate
        return Xc[:, :1], lambda W: torch.cat([W, W.new_zeros(d - 1, *W.shape[1:])])
    e, U = e[keep], U[:, keep]
    root = e.sqrt()
    xr = U * root

    def to_full(W: torch.Tensor) -> torch.Tensor:  # W (r, ...) -> Xcᵀ U diag(1/√e) W
        flat = W.reshape(W.shape[0], -1)
        return (Xc.T @ (U @ (flat / root[:, None]))).reshape(d, *W.shape[1:])

    return xr, to_full


def _sample_rows(idx: torch.Tensor, cnt: torch.Tensor, m: int, gen: torch.Generator):
    """m rows per problem drawn uniformly with replacement from its cnt real rows."""
    u = torch.rand(idx.shape[0], m, generator=gen, dtype=torch.float64).to(idx.device)
    pos = (u * cnt[:, None]).long().clamp_max(cnt[:, None] - 1)
    return torch.gather(idx, 1, pos)


def _ascend(
    x: torch.Tensor, L: torch.Tensor, V0: torch.Tensor, P: _Problems, *, max_iter: int,
    subsample: int, gen: torch.Generator, n_checkpoints: int,
) -> torch.Tensor:
    """Adam ascent on the soft AUC (falling temperature) of the columns of V0 (K, r, S),
    directions in coordinates whitened by L: w = L⁻ᵀv, so w·x = v·(L⁻¹x).

    A problem whose sides both have at most ``subsample`` rows uses all of its pairs at every
    step. Otherwise every step draws a fresh sample of ``subsample`` rows per side (with
    replacement): a stochastic ascent on the soft AUC of *all* pairs, which does not overfit
    one fixed subsample when d is large. Returns iterates (K, r, S·n_checkpoints), whitened.
    """
    K, r = V0.shape[0], V0.shape[1]
    x32, L32 = x.float(), L.float()
    full = P.ia.shape[1] <= subsample and P.ib.shape[1] <= subsample
    if full:
        ma, mb = P.ma, P.mb
        xab = torch.cat([x32[P.ia], x32[P.ib]], dim=1)  # (K, mA + mB, r)
    else:
        ma = mb = torch.ones(K, subsample, dtype=torch.bool, device=x.device)
    mA = ma.shape[1]
    fa, fb = ma.float()[:, None, :], mb.float()[:, None, :]  # (K, 1, m)
    na, nb = fa.sum(2, keepdim=True), fb.sum(2, keepdim=True)  # (K, 1, 1)
    pad_a, pad_b = ~ma[:, None, :], ~mb[:, None, :]
    V = V0.float().transpose(1, 2).contiguous()  # (K, S, r)
    m1, m2 = torch.zeros_like(V), torch.zeros_like(V)
    b1, b2, eps = 0.9, 0.999, 1e-8
    marks = {max(0, round(max_iter * (i + 1) / n_checkpoints) - 1) for i in range(n_checkpoints)}
    iterates = []
    for t in range(max_iter):
        tau = _TAU0 * (_TAU1 / _TAU0) ** (t / max(max_iter - 1, 1))
        if not full and t % _RESAMPLE_EVERY == 0:
            rows = torch.cat([_sample_rows(P.ia, P.na, subsample, gen),
                              _sample_rows(P.ib, P.nb, subsample, gen)], dim=1)
            xab = x32.index_select(0, rows.reshape(-1)).view(K, 2 * subsample, r)
        norm = V.norm(dim=2, keepdim=True).clamp_min(1e-30)
        Vn = V / norm
        S = Vn.shape[1]
        Wn = torch.linalg.solve_triangular(L32.T, Vn.reshape(-1, r).T, upper=True)
        Wn = Wn.T.reshape(K, S, r)  # w = L⁻ᵀv
        sab = Wn @ xab.transpose(1, 2)  # (K, S, mA + mB)
        sa, sb = sab[:, :, :mA], sab[:, :, mA:]
        mua = (sa * fa).sum(2, keepdim=True) / na
        mub = (sb * fb).sum(2, keepdim=True) / nb
        var = (((sa - mua) ** 2 * fa).sum(2, keepdim=True)
               + ((sb - mub) ** 2 * fb).sum(2, keepdim=True)) / (na + nb)
        inv = 1.0 / (tau * var.sqrt().clamp_min(1e-12))  # (K, S, 1), held fixed per step
        # soft AUC = mean σ(z), z = (sa − sb)·inv; σ'(z) = (1 − tanh²(z/2)) / 4. Padding is
        # pushed to ∓inf so that its pairs have σ' = 0 exactly.
        ha = (sa * (0.5 * inv)).masked_fill_(pad_a, -math.inf)
        hb = (sb * (0.5 * inv)).masked_fill_(pad_b, math.inf)
        q = (ha[:, :, :, None] - hb[:, :, None, :]).tanh_().square_()  # (K, S, mA, mB)
        scale = 0.25 * inv / (na * nb)
        ga = (q.shape[3] - q.sum(3)) * scale  # (K, S, mA): d soft / d sa
        gb = -(q.shape[2] - q.sum(2)) * scale  # (K, S, mB)
        g = torch.cat([ga, gb], dim=2) @ xab  # (K, S, r) wrt w
        g = torch.linalg.solve_triangular(L32, g.reshape(-1, r).T, upper=False)
        g = g.T.reshape(K, S, r)  # wrt v: L⁻¹ g
        g = (g - Vn * (Vn * g).sum(2, keepdim=True)) / norm  # through the normalization
        # Adam, ascending
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        step = _LR * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        V.addcdiv_(m1, m2.sqrt().add_(eps), value=step)
        if t in marks:
            iterates.append(V.transpose(1, 2).to(x.dtype))
    return torch.cat(iterates, dim=2)


def _fit(
    X: torch.Tensor,
    groups: list[torch.Tensor],
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    alphas: tuple[float | str, ...],
    n_random: int,
    n_starts: int,
    max_iter: int,
    subsample: int,
    seed: int,
    select: bool = True,
) -> torch.Tensor:
    """Best directions (d, K), oriented so that their AUC >= 1/2 on the rows of X, for the
    K problems ``pairs`` (A-rows, B-rows) over the float64 rows X. ``groups`` are the classes
    whose within-class covariance is pooled (shared by all problems). An entry ``"lw"`` of
    ``alphas`` is the Ledoit–Wolf shrinkage of that covariance (:meth:`_Metric.ledoit_wolf`).
    ``select=False`` skips the selection and the ascent: it returns every candidate, unit
    columns (d, K, C) in the order of ``alphas`` (then the random ones), not oriented."""
    d = X.shape[1]
    x, to_full = _reduce_rows(X)
    r = x.shape[1]
    metric = _Metric(x, groups, d)
    P = _Problems.build(pairs, X.device)
    K = len(P)
    gen = torch.Generator().manual_seed(int(seed))

    # mean differences (r, K)
    diff = torch.empty(r, K, dtype=x.dtype, device=x.device)  # μ_A − μ_B
    step = max(1, _MAX_CELLS // x.shape[0])
    for c in range(0, K, step):
        p = P.take(slice(c, c + step))
        sel = torch.zeros(len(p), x.shape[0], dtype=x.dtype, device=x.device)  # ±1/|set|
        sel.scatter_add_(1, p.ia, p.ma.to(x.dtype) / p.na.to(x.dtype)[:, None])
        sel.scatter_add_(1, p.ib, -p.mb.to(x.dtype) / p.nb.to(x.dtype)[:, None])
        diff[:, c:c + step] = (sel @ x).T

    alphas = tuple(metric.ledoit_wolf() if a == "lw" else a for a in alphas)
    cols = [metric.solve(a, diff) for a in alphas]  # each (r, K)
    Lw = metric.chol(_WHITEN_ALPHA)
    if n_random:
        v = torch.randn(r, K * n_random, generator=gen, dtype=x.dtype).to(x.device)
        w = torch.linalg.solve_triangular(Lw.T, v, upper=True)
        cols += list(w.reshape(r, K, n_random).permute(2, 0, 1))
    W = torch.stack(cols, dim=2)  # (r, K, C)
    W = W / W.norm(dim=0, keepdim=True).clamp_min(1e-300)
    W = W.permute(1, 0, 2).contiguous()  # (K, r, C)
    if not select:
        Wf = to_full(W.permute(1, 0, 2))  # (d, K, C)
        return Wf / Wf.norm(dim=0, keepdim=True).clamp_min(1e-300)

    total = 2 * P.na * P.nb  # (K,)
    u2, sign = _orient(_exact_u2(x, W, P), total[:, None])
    W = W * sign[:, None, :]

    if max_iter > 0 and n_starts > 0:
        S = min(n_starts, W.shape[2])
        top = torch.topk(u2, S, dim=1).indices  # (K, S)
        starts = torch.gather(W, 2, top[:, None, :].expand(-1, r, -1))
        # whitened coordinates: w·x = v·(L⁻¹x) with v = Lᵀw
        V0 = torch.einsum("sr,ksc->krc", Lw, starts)
        V0 = V0 / V0.norm(dim=1, keepdim=True).clamp_min(1e-300)  # Adam's step is absolute
        rows = min(subsample, P.ia.shape[1]) + min(subsample, P.ib.shape[1])
        step = max(1, _ASCENT_CELLS // (rows * max(r, S * rows)))  # bounded memory
        Vt = torch.cat([
            _ascend(x, Lw, V0[c:c + step], P.take(slice(c, c + step)), max_iter=max_iter,
                    subsample=subsample, gen=gen, n_checkpoints=3)
            for c in range(0, K, step)
        ])
        Wt = torch.linalg.solve_triangular(
            Lw.T, Vt.permute(1, 0, 2).reshape(r, -1), upper=True
        ).reshape(r, K, -1).permute(1, 0, 2)
        Wt = Wt / Wt.norm(dim=1, keepdim=True).clamp_min(1e-300)
        u2t, signt = _orient(_exact_u2(x, Wt, P), total[:, None])
        W = torch.cat([W, Wt * signt[:, None, :]], dim=2)
        u2 = torch.cat([u2, u2t], dim=1)

    best = torch.argmax(u2, dim=1)  # first best: candidates win ties with iterates
    Wb = W[torch.arange(K, device=W.device), :, best].T  # (r, K)
    Wf = to_full(Wb)
    return Wf / Wf.norm(dim=0, keepdim=True).clamp_min(1e-300)


_SWEEP_MAX_PAIRS = 1 << 22  # d = 2: exact angular sweep when |A|·|B| is at most this
_ANGLE_TOL = 1e-9  # critical angles closer than this (radians) are merged
_SWEEP_TOP = 16  # gaps of the sweep scored exactly


def _sweep_2d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact maximiser for d = 2: an angular sweep over the |A||B| difference vectors.

    w(φ) = (cos φ, sin φ) has w·z > 0 on the open half-circle φ ∈ (θ_z − π/2, θ_z + π/2); the
    count is constant between consecutive critical angles, so the best open interval's
    midpoint is a maximiser. O(|A||B| log(|A||B|)) time, O(|A||B|) scalars of memory.
    """
    z = (a[:, None, :] - b[None, :, :]).reshape(-1, 2)
    z = z[(z != 0).any(dim=1)]  # zero differences count 1/2 for every w
    if z.shape[0] == 0:
        return torch.tensor([1.0, 0.0], dtype=a.dtype, device=a.device)
    two_pi = 2 * math.pi
    s = torch.remainder(torch.atan2(z[:, 1], z[:, 0]) - math.pi / 2, two_pi)  # arc starts
    e = torch.remainder(s + math.pi, two_pi)  # arc ends
    # sweep from the middle of the widest gap between critical angles: no event is near it,
    # and the count there is evaluated directly
    crit = torch.sort(torch.cat([s, e])).values
    gaps = torch.diff(crit, append=crit[:1] + two_pi)
    g = int(torch.argmax(gaps))
    ref = crit[g] + 0.5 * gaps[g]
    initial = int((z @ torch.stack([torch.cos(ref), torch.sin(ref)]) > 0).sum())
    angles = torch.remainder(torch.cat([s, e]) - ref, two_pi)
    delta = torch.cat([torch.ones_like(s), -torch.ones_like(e)])
    order = torch.argsort(angles)
    angles, delta = angles[order], delta[order]
    # critical angles closer than _ANGLE_TOL are one angle (rounding of z and -z, parallel z)
    new_group = torch.ones_like(angles, dtype=torch.bool)
    new_group[1:] = torch.diff(angles) > _ANGLE_TOL
    starts = new_group.nonzero().reshape(-1)
    last = torch.cat([starts[1:], starts.new_tensor([angles.numel()])]) - 1
    level = initial + torch.cumsum(delta, 0)[last]  # count on the gap after group i
    lo = angles[last]
    hi = torch.cat([angles[starts[1:]], angles[:1] + two_pi])
    # score the midpoints of the best few gaps exactly; keep the best
    top = torch.topk(level, min(_SWEEP_TOP, level.numel())).indices
    phi = 0.5 * (lo[top] + hi[top]) + ref
    W = torch.stack([torch.cos(phi), torch.sin(phi)])  # (2, top)
    u2 = _auc2_counts((a @ W).T, (b @ W).T)
    return W[:, int(torch.argmax(u2))]


# --------------------------------------------------------------------------- md_lsm


def _canonical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when (a, b) is already in the canonical order (smaller set first, then
    lexicographic), so that md_lsm(A, B) and md_lsm(B, A) run the same computation."""
    if a.shape[0] != b.shape[0]:
        return a.shape[0] < b.shape[0]
    ne = (a != b).reshape(-1).nonzero()
    if ne.numel() == 0:
        return True
    i = int(ne[0])
    return bool(a.reshape(-1)[i] < b.reshape(-1)[i])


def _certify_mode(certify: Any) -> str:
    if certify is True or certify is False or certify == "auto":
        return str(certify)
    raise ValueError(f"certify: expected True, False or 'auto', got {certify!r}")


def _int_arg(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def md_lsm(
    A: Any,
    B: Any,
    *,
    return_direction: bool = False,
    max_iter: int = 60,
    seed: int = 0,
    certify: bool | str = True,
    subsample: int = 512,
    n_random: int = 8,
    n_starts: int = 4,
) -> float | tuple[float, Any]:
    """MD-LSM degree m(A, B) = max over unit w of the fraction of pairs with w·(a − b) > 0
    (ties 1/2), a value in [0.5, 1] (DESIGN §2).

    Returns the exact AUC of the best direction found (module docstring), hence a certified
    lower bound on m(A, B); 1.0 exactly when a separator is found. ``certify`` decides when the
    exact LP test runs if no candidate separates: ``True`` (default) always, ``False`` never,
    ``"auto"`` when the LP is small ((|A| + |B|)·(d + 1) <= 50,000) or the best value is
    >= 0.98. With ``certify=True`` the result is 1.0 if and only if A and B are strictly
    separable (the contract of DESIGN §2); the LP costs about 0.02 s for a few hundred points
    and 3–5 s at 2,000 points per class in d = 512 (2-core CPU). ``"auto"`` skips it for a
    large set whose best candidate scores below 0.98 (a separable set this far from our
    candidates is not seen in practice) — use it when speed matters more than the guarantee.

    ``return_direction=True`` returns ``(value, w)``: a unit vector (numpy for numpy A, else a
    float64 tensor on A's device) with ``auc_of_direction(A, B, w) == value``.
    ``max_iter`` ascent steps (0: candidates only), ``subsample`` points per set for the
    ascent, ``n_random`` random candidates and ``n_starts`` ascent starts bound the work.
    Deterministic given ``seed``; symmetric in A, B exactly.
    """
    mode = _certify_mode(certify)
    max_iter = _int_arg(max_iter, "max_iter", 0)
    subsample = _int_arg(subsample, "subsample", 2)
    n_random = _int_arg(n_random, "n_random", 0)
    n_starts = _int_arg(n_starts, "n_starts", 0)
    a, b = check_pair(A, B)
    a, b = a.double(), b.double()

    if not _canonical(a, b):
        value, w = md_lsm(
            b, a, return_direction=True, max_iter=max_iter, seed=seed, certify=certify,
            subsample=subsample, n_random=n_random, n_starts=n_starts,
        )
        w = -w
        return (value, w.cpu().numpy() if isinstance(A, np.ndarray) else w) if (
            return_direction
        ) else value

    na, nb = a.shape[0], b.shape[0]
    if a.shape[1] == 2 and na * nb <= _SWEEP_MAX_PAIRS:
        return _finish(a, b, _sweep_2d(a, b), mode, return_direction, A)
    X = torch.cat([a, b])
    ia = torch.arange(na, device=X.device)
    ib = torch.arange(na, na + nb, device=X.device)
    fit = dict(alphas=(1e-6, 0.01, 0.1, 0.5, 1.0), n_random=n_random, n_starts=n_starts,
               max_iter=max_iter, subsample=subsample, seed=seed)
    w = _fit(X, [ia, ib], [(ia, ib)], **fit)[:, 0]
    T = _whitening(a, b)
    if T is not None:  # the same search in within-class-whitened coordinates; keep the better
        w_white = T @ _fit(X @ T, [ia, ib], [(ia, ib)], **fit)[:, 0]
        w = max((w, w_white), key=lambda v: _oriented_auc2(a, b, v))
    return _finish(a, b, w, mode, return_direction, A)


def _oriented_auc2(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> int:
    u2, total = _auc(a, b, w)
    return max(u2, total - u2)


def _whitening(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Σ_w^{-1/2} of the pooled within-class covariance (tiny ridge), or None when Σ_w is
    singular (d >= |A| + |B| - 2, the span path) or d is large.

    The degree is invariant to a common invertible linear map M, but the candidate
    shrinkage and the ascent are not; in whitened coordinates the data of (A M, B M) equal
    those of (A, B) up to a rotation, so searching there as well makes the heuristic far
    less sensitive to the frame (the true degree never changes; we keep the better of the
    two exact AUCs, so the result can only go up)."""
    n, d = a.shape[0] + b.shape[0], a.shape[1]
    if d >= n - 2 or d > 512:
        return None
    U = torch.cat([a - a.mean(0), b - b.mean(0)])
    cov = U.T @ U / (n - 2)
    cov = cov + 1e-9 * (torch.trace(cov) / d + 1e-300) * torch.eye(d, dtype=cov.dtype,
                                                                   device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    if not bool(evals.min() > 0):
        return None
    return evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def _finish(a, b, w, mode: str, return_direction: bool, like: Any):
    """Exact value of direction w (oriented), the LP when ``certify`` asks for it, output."""
    na, nb = a.shape[0], b.shape[0]
    u2, total = _auc(a, b, w)
    if 2 * u2 < total:  # rounding in the full coordinates flipped the orientation
        w, u2 = -w, total - u2
    value = u2 / total

    if value < 1.0 and mode != "False":
        cheap = (na + nb) * (a.shape[1] + 1) <= _LP_CHEAP
        if mode == "True" or cheap or value >= 1.0 - _LP_GAP:
            from .exact import separability_test

            cert = separability_test(a, b)
            if cert.separable:  # keep the LP's separator once checked exactly here
                w_lp = cert.w.to(a.device, torch.float64)
                w_lp = w_lp / w_lp.norm()
                u2_lp, _ = _auc(a, b, w_lp)
                if u2_lp == total:
                    w, value = w_lp, 1.0

    if not return_direction:
        return value
    return value, (w.cpu().numpy() if isinstance(like, np.ndarray) else w)
