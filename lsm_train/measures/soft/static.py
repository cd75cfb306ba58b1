"""The static, sync-free soft MD-LSM (``num_classes=K``): for GPUs, ``torch.compile`` and
CUDA graphs (docs/loss.md). Tested against :mod:`.reference`.

Every shape depends on (n, d, K) only and nothing is read to the host:

* labels become a one-hot Y against ``arange(K)``; class counts and "classes present" are
  tensors; absent classes are masked out of every sum, so the value is the reference value
  of the classes present. A label outside [0, K) makes the value NaN.
* cross-fitting uses 0/1 row weights (the within-class rank from a cumulative sum) instead
  of boolean indexing; the two folds are one batch.
* features are scaled by a power of two computed on the device (exact; S_τ is scale
  invariant); a NaN or inf feature makes the value NaN.
* the direction solve is one batched ``cholesky_ex`` (:class:`.linalg.SafeSolve`); where it
  fails, the mean-difference direction is used instead (with ``where``).
* fewer than two classes to score: exactly 1.0 (``where``), zero gradient.

Layers are batched: each layer's rows are reduced to a Gram matrix of [U; Mc] (U the rows
centred on their class mean, Mc the class means about the batch mean), (n + K)² numbers
whatever its width, and everything after it (the n × n dual solve, the projections, the soft
counts) runs once for all layers and folds.
"""

from __future__ import annotations

import math

import torch

from lsm_train.measures.soft.counts import cut
from lsm_train.measures.soft.linalg import SafeSolve
from lsm_train.measures.soft.options import RIDGE

__all__ = ["static_scores"]


def _onehot(y: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Y (n × K) with Y[i, k] = [y_i == k]: a row of zeros for a label outside [0, K)."""
    return (y[:, None] == torch.arange(K, device=y.device)).to(dtype)


def _folds(Y: torch.Tensor, crossfit: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fit, ev, mask): 0/1 row weights (F × n) of the rows that fit the directions and of the
    rows scored, per fold, and the classes scored (K,). In-sample: one fold, every row, the
    classes present. Crossfit: the samples of each class alternate between the halves in batch
    order (rank within the class from a cumulative sum); classes of one sample are left out."""
    cnt = Y.sum(0)
    if not crossfit:
        ones = Y.new_ones(1, Y.shape[0])
        return ones, ones, (cnt > 0).to(Y.dtype)
    mask = (cnt >= 2).to(Y.dtype)
    rank = ((torch.cumsum(Y, 0) - Y) * Y).sum(1)
    keep = Y @ mask
    odd = torch.remainder(rank, 2.0)
    half0, half1 = keep * (1.0 - odd), keep * odd
    return torch.stack([half0, half1]), torch.stack([half1, half0]), mask


def _scaled(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X / 2^e, guard): 2^e the power of two at or below max|X| (1 when X is 0 or not
    finite); guard = 0, or NaN when X has a NaN or inf (added to the value)."""
    top = X.detach().abs().amax()
    good = torch.isfinite(top) & (top > 0)
    e = torch.floor(torch.log2(torch.where(good, top, torch.ones_like(top))))
    return X * torch.exp2(-e), top - top


def _class_rows(
    X: torch.Tensor, Y: torch.Tensor, fit: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, Mc, cf) per fold: U = X − Y·(class means of the fit rows) (F × n × d), Mc = those
    means about the mean of the fit rows, 0 for classes not scored (F × K × d), and the
    number of fit rows per class cf (F × K)."""
    Yf = Y * fit[..., None]  # F × n × K
    cf = Yf.sum(1)
    Mr = (Yf.mT @ X) / cf.clamp_min(1.0)[..., None]
    mean = (fit @ X) / fit.sum(1, keepdim=True).clamp_min(1.0)
    U = X - Y @ Mr
    Mc = (Mr - mean[:, None]) * mask[:, None]
    return U, Mc, cf


def _shrinkage_terms(
    ssu: torch.Tensor, ssh: torch.Tensor, nf: torch.Tensor, kt: torch.Tensor,
    inv_d: torch.Tensor | float, shrinkage: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, c) of Σ_s = (1 − λ)Σ + (λ tr Σ / d + ε v̄) I = αI + c·U_fᵀU_f, from ‖U_f‖², ‖Hc_f‖²,
    the number of fit rows nf and of classes kt (as the reference :func:`.reference.directions`)."""
    m = (nf - kt).clamp_min(1.0)
    c = (1.0 - shrinkage) / m
    eps = torch.finfo(ssu.dtype).eps
    alpha = (ssu * (shrinkage / m) + ssh * (RIDGE / nf.clamp_min(1.0))) * inv_d + RIDGE * eps**2
    return alpha, c


def _dual(
    Gm: torch.Tensor, Y: torch.Tensor, fit: torch.Tensor, cf: torch.Tensor, kt: torch.Tensor,
    d: torch.Tensor, shrinkage: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, G) from the Gram matrices Gm of [U; Mc] (B × (n + K)²): P = Hc Z (B × n × K), G = Mc Z
    (B × K × K), Z = Σ_s⁻¹ Mcᵀ by Woodbury with one batched n × n solve. ``d``: width per
    batch entry (B,)."""
    n = Y.shape[0]
    Ka, Ba, MM = Gm[:, :n, :n], Gm[:, :n, n:], Gm[:, n:, n:]
    w = fit[..., None]
    Ub = Ba * w  # U_f Mcᵀ
    ssu = (Ka.diagonal(dim1=-2, dim2=-1) * fit).sum(-1)
    ssh = ssu + (MM.diagonal(dim1=-2, dim2=-1) * cf).sum(-1)
    alpha, c = _shrinkage_terms(ssu, ssh, fit.sum(-1), kt, 1.0 / d, shrinkage)
    a, cc = alpha[:, None, None], c[:, None, None]
    S = Ka * (w * w.mT) * cc + a * torch.eye(n, dtype=Gm.dtype, device=Gm.device)
    Sol, _ = SafeSolve.apply(S, Ub)  # 0 where the factorization failed: mean difference
    G = (MM - cc * (Ub.mT @ Sol)) / a
    P = (Ba - cc * (Ka @ Sol)) / a + Y @ G
    return P, G


def _primal(
    U: torch.Tensor, Mc: torch.Tensor, Y: torch.Tensor, fit: torch.Tensor, cf: torch.Tensor,
    kt: torch.Tensor, shrinkage: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, G) as :func:`_dual` with one batched d × d solve (for d <= n)."""
    d = U.shape[-1]
    Uf = U * fit[..., None]
    ssu = (Uf * Uf).sum((-2, -1))
    ssh = ssu + ((Mc * Mc).sum(-1) * cf).sum(-1)
    alpha, c = _shrinkage_terms(ssu, ssh, fit.sum(-1), kt, 1.0 / d, shrinkage)
    a = alpha[:, None, None]
    S = (Uf.mT @ Uf) * c[:, None, None] + a * torch.eye(d, dtype=U.dtype, device=U.device)
    Z, ok = SafeSolve.apply(S, Mc.mT)
    Z = Z + (Mc.mT / a) * ~ok  # mean difference where the factorization failed
    G = Mc @ Z
    return U @ Z + Y @ G, G


def _values(
    P: torch.Tensor, G: torch.Tensor, Y: torch.Tensor, cf: torch.Tensor, ev: torch.Tensor,
    mask: torch.Tensor, scheme: str, tau: float,
) -> torch.Tensor:
    """S_τ (B,) from the projections P (B × n × K) and G = Mc Z (B × K × K): the mean over the
    scored class pairs (pairwise) or classes vs the rest (ovr) of the soft count over the
    scored rows ``ev``, as :func:`.reference.dense_task_scores`."""
    K = Y.shape[1]
    eye = torch.eye(K, dtype=P.dtype, device=P.device)
    if scheme == "pairwise":  # δ_klᵀ Σ_s⁻¹ δ_kl = G_kk + G_ll − G_kl − G_lk
        dg = G.diagonal(dim1=-2, dim2=-1)
        quad = dg[..., :, None] + dg[..., None, :] - G - G.mT
    else:  # δ_k = Mc C[:, k], C[j, k] = −cf_j / (nf − cf_k) off the diagonal, 1 on it
        rest = (cf.sum(-1, keepdim=True) - cf).clamp_min(1.0)
        C = (-cf[..., :, None] / rest[..., None, :]) * (1.0 - eye) + eye
        quad = (C * (G @ C)).sum(-2)
        P = P @ C
    rate = torch.rsqrt(quad.clamp_min(0.0) + torch.finfo(P.dtype).eps) * (1.0 / tau)
    g = (P * Y).sum(-1)  # g_a = P[a, y_a]
    E = P @ Y.mT  # E[a, b] = P[a, y_b]
    if scheme == "pairwise":  # x_ab = r_{y_a y_b} (g_a + g_b − E[a, b] − E[b, a])
        D = g[..., :, None] - E
        x = (D + D.mT) * (Y @ rate @ Y.mT)
    else:  # x_ab = r_{y_a} (g_a − P[b, y_a])
        x = (g[..., :, None] - E.mT) * (Y @ rate[..., None])
    lim = cut(P.dtype)
    z = torch.sigmoid(x.clamp(-lim, lim))
    Ye = Y * ev[..., None]
    M = Ye.mT @ z @ Ye  # block sums over the scored rows, B × K × K
    ce = Ye.sum(-2)
    floor = 1.0 / (1.0 + math.exp(lim))  # σ(−c): f = σ(clip(x)) − σ(−c)
    kt = mask.sum()
    if scheme == "pairwise":  # each pair counted as (k, l) and (l, k)
        pairs = (ce[..., :, None] * ce[..., None, :]).clamp_min(1.0)
        raw = (M / pairs - floor).clamp(0.0, 1.0)
        weight = mask[:, None] * mask * (1.0 - eye) / (kt * (kt - 1.0)).clamp_min(1.0)
        return (raw * weight).sum((-2, -1))
    pairs = (ce * (ce.sum(-1, keepdim=True) - ce)).clamp_min(1.0)
    raw = (((M * (1.0 - eye)).sum(-1)) / pairs - floor).clamp(0.0, 1.0)
    return (raw * mask).sum(-1) / kt.clamp_min(1.0)


def static_scores(
    feats: list[torch.Tensor], y: torch.Tensor, num_classes: int, *, tau: float, scheme: str,
    shrinkage: float, crossfit: bool, dual: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (L,), degenerate) for L layers' features (n × d_l, one dtype and device) and int64
    labels y (n,): S_l the soft MD-LSM of layer l; ``degenerate`` (0-dim bool) is True when
    fewer than two classes are scored (then S = 1 exactly). ``dual``: None = the n × n dual
    for several layers or d > n, else the d × d primal; no host read, no data-dependent shape.
    """
    dtype = feats[0].dtype
    Y = _onehot(y, num_classes, dtype)
    fit, ev, mask = _folds(Y, crossfit)
    kt = mask.sum()
    n, F = Y.shape[0], fit.shape[0]
    if dual is None:
        dual = len(feats) > 1 or feats[0].shape[1] > n
    grams, widths, guards, PG = [], [], [], []
    for X in feats:
        X, guard = _scaled(X)
        guards.append(guard)
        U, Mc, cf = _class_rows(X, Y, fit, mask)
        if dual:
            V = torch.cat([U, Mc], 1)
            grams.append(V @ V.mT)
            widths.append(X.new_full((F,), float(X.shape[1])))
        else:
            PG.append(_primal(U, Mc, Y, fit, cf, kt, shrinkage))
    cfb = cf.repeat(len(feats), 1)
    fitb, evb = fit.repeat(len(feats), 1), ev.repeat(len(feats), 1)
    if dual:
        P, G = _dual(torch.cat(grams), Y, fitb, cfb, kt, torch.cat(widths), shrinkage)
    else:
        P, G = (torch.cat(t) for t in zip(*PG, strict=True))
    S = _values(P, G, Y, cfb, evb, mask, scheme, tau).reshape(len(feats), F).mean(1)
    degenerate = kt < 2
    in_range = (Y.sum(1) == 1).all()
    S = torch.where(degenerate, torch.ones_like(S), S)
    S = torch.where(in_range, S, torch.full_like(S, math.nan))
    return S + torch.stack(guards).to(S.dtype), degenerate
