"""The batched direction engine behind :func:`~lsm_train.measures.degree.md_lsm` and
:func:`~lsm_train.measures.layer.layer_separability` (docs: ``docs/monitor.md``).

K two-set problems over the rows of one matrix (:class:`Problems`) share one pooled
within-class covariance; :func:`fit_directions` returns, per problem, the best of its
shrinkage-LDA candidates Σ_α⁻¹(μ_A − μ_B) (optionally refined by a batched soft-AUC
ascent), and :func:`exact_u2` / :func:`auc2_counts` count the pairs (a, b) with
w·a > w·b exactly by sorting (twice the Mann–Whitney U, ties counting 1 of 2).
:func:`row_scores` computes x·w the same way for every row, so identical points tie exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Problems", "auc2_counts", "exact_u2", "fit_directions", "row_scores"]

_TAU0, _TAU1 = 1.0, 0.02  # temperature schedule of the ascent (units: within-class std)
_LR = 0.05  # Adam step of the ascent (unit directions in whitened coordinates)
_WHITEN_ALPHA = 0.1  # shrinkage of the metric used for the ascent
_MAX_CELLS = 1 << 24  # bound on problems × rows × columns of one exact-scoring block
_RESAMPLE_EVERY = 1  # ascent steps per fresh sample of rows (large sets)
_ASCENT_CELLS = 1 << 23  # bound on problems × sampled rows × max(d, pairs) of one ascent block


def auc2_counts(sa: torch.Tensor, sb: torch.Tensor, mask_a: torch.Tensor | None = None):
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



def row_scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w in float64, computed the same way for every row (an elementwise product and a
    row sum, not a BLAS product whose rounding can depend on the shape and the row), so that
    identical points always get identical scores and ties are exact."""
    return (x.double() * w.double()).sum(dim=1)



@dataclass
class Problems:
    """K two-set problems over the rows of one matrix: padded row indices and masks."""

    ia: torch.Tensor  # (K, maxA) long
    ma: torch.Tensor  # (K, maxA) bool
    ib: torch.Tensor  # (K, maxB) long
    mb: torch.Tensor  # (K, maxB) bool
    na: torch.Tensor  # (K,) long
    nb: torch.Tensor  # (K,) long

    @staticmethod
    def build(pairs: list[tuple[torch.Tensor, torch.Tensor]], device) -> Problems:
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
        return Problems(ia, ma, ib, mb, ma.sum(1), mb.sum(1))

    def __len__(self) -> int:
        return self.ia.shape[0]

    def take(self, sel: slice) -> Problems:
        return Problems(*(t[sel] for t in (self.ia, self.ma, self.ib, self.mb, self.na, self.nb)))


def exact_u2(x: torch.Tensor, W: torch.Tensor, P: Problems) -> torch.Tensor:
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
        out[sl] = auc2_counts(sa, sb, p.ma[:, None, :])
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
    x: torch.Tensor, L: torch.Tensor, V0: torch.Tensor, P: Problems, *, max_iter: int,
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


def fit_directions(
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
    P = Problems.build(pairs, X.device)
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
    u2, sign = _orient(exact_u2(x, W, P), total[:, None])
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
        u2t, signt = _orient(exact_u2(x, Wt, P), total[:, None])
        W = torch.cat([W, Wt * signt[:, None, :]], dim=2)
        u2 = torch.cat([u2, u2t], dim=1)

    best = torch.argmax(u2, dim=1)  # first best: candidates win ties with iterates
    Wb = W[torch.arange(K, device=W.device), :, best].T  # (r, K)
    Wf = to_full(Wb)
    return Wf / Wf.norm(dim=0, keepdim=True).clamp_min(1e-300)



