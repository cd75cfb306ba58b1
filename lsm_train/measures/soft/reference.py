"""The recorded-autograd soft MD-LSM: the numerical reference of the fused and static paths,
and the path for crossfit, detached directions and large batches (docs/loss.md).

Every op is recorded by autograd, so double backward works. :func:`directions` solves for
the K per-class Fisher solutions with one factorization (primal d × d when d <= n, dual
n × n when d > n); :func:`scores` turns projections into per-task S_τ, dense n × n when
n² <= DENSE_ELEMS, else in blocks of bounded memory (:mod:`.counts`).
"""

from __future__ import annotations

import math

import torch

from lsm_train.measures.soft.counts import cut, task_scores
from lsm_train.measures.soft.layout import LabelLayout
from lsm_train.measures.soft.linalg import Gram, shrunk_solve, spd_solve
from lsm_train.measures.soft.options import DENSE_ELEMS, RIDGE


def directions(
    H: torch.Tensor,
    lay: LabelLayout,
    scheme: str,
    shrinkage: float,
    dual: bool | None = None,
    need_w: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (P, W, R): W = Σ_s⁻¹ Mu (d × K per-class solutions, in H units); P = Hc @ W
    (n × K), Hc = H − batch mean; rates R so that ŵ_t = lay.combine(W)[:, t] · r_t has
    ŵ_tᵀ Σ_s ŵ_t = 1: pairwise, R is K × K with r_(k,l) = R[k, l] (symmetric, diagonal
    unused); ovr, R is (K,). W is None in the dual unless ``need_w`` (the in-sample value only
    needs P).

    Works in H units: Σ_s = (1 − λ)Σ + (λ tr Σ / d + ε s²) I with s² the mean square of Hc
    (+ eps²) equals s² times the Σ_s of X = Hc / s, which leaves P, ŵ and R unchanged, so s
    itself is never formed. Hc is not formed either: with U = H − Y·(class means) (Yᵀ U = 0)
    and Mc the class means about the batch mean, Hc = U + Y Mc, ‖Hc‖² = ‖U‖² + Σ_k n_k ‖Mc_k‖².

    Dual (d > n), from one Gram matrix of [U; Mc] ((n + K)²) and an n × n Cholesky solve:
    with Sol = (α I + c U Uᵀ)⁻¹ U Mcᵀ (Woodbury), Σ_s⁻¹ Mcᵀ = (Mcᵀ − c Uᵀ Sol) / α, so
    G = Mc Σ_s⁻¹ Mcᵀ = (Mc Mcᵀ − c (U Mcᵀ)ᵀ Sol) / α and P = Hc Σ_s⁻¹ Mcᵀ = Sol + Y G.
    Primal (d <= n): a d × d solve, P = U W + Y (Mc W).
    """
    n, d = H.shape
    dtype, K = H.dtype, lay.K
    cnt = lay.count_t.to(dtype)
    Y = lay.onehot(dtype)
    Mr = (Y / cnt).mT @ H  # K × d class means
    U = torch.addmm(H, Y, Mr, alpha=-1.0)  # within-class centered rows
    Mc = Mr - (cnt / n) @ Mr  # class means about the batch mean
    m = max(n - K, 1)
    c = (1.0 - shrinkage) / m
    eps = torch.finfo(dtype).eps
    if dual is None:
        dual = d > n
    if dual:
        Gm = Gram.apply(torch.cat([U, Mc]))
        Ku, B, MM = Gm[:n, :n], Gm[:n, n:], Gm[n:, n:]
        ssu = Ku.trace()
        ss = Gm.diagonal() @ torch.cat([cnt.new_ones(n), cnt])  # ‖Hc‖²
    else:
        ssu = U.square().sum()
        MM = Mc @ Mc.mT
        ss = ssu + MM.diagonal() @ cnt
    alpha = ssu * (shrinkage / (m * d)) + ss * (RIDGE / (n * d)) + RIDGE * eps**2
    W = None
    if dual:
        if c == 0.0:
            Sol = B / alpha
        else:
            eye = torch.eye(n, dtype=dtype, device=H.device)
            Sol = spd_solve(torch.add(alpha * eye, Ku, alpha=c), B)
        G = torch.addmm(MM, B.mT, Sol, alpha=-c) / alpha
        P = torch.addmm(Sol, Y, G)
        if need_w:
            W = torch.addmm(Mc.mT, U.mT, Sol, alpha=-c) / alpha
    else:
        W = shrunk_solve(U, Mc.mT, alpha, c, dual=False)
        G = Mc @ W
        P = torch.addmm(U @ W, Y, G)
    if scheme == "pairwise":  # δ_klᵀ Σ_s⁻¹ δ_kl = G_kk + G_ll − G_kl − G_lk
        dg = G.diagonal()
        quad = (dg[:, None] + dg) - (G + G.mT)
    else:
        C = lay.ovr_coefficients(dtype)
        quad = (C * (G @ C)).sum(0)
    R = torch.rsqrt(quad.clamp_min(0.0) + eps)  # Mahalanobis: scale free
    return P, W, R


def task_rates(R: torch.Tensor, lay: LabelLayout, scheme: str) -> torch.Tensor:
    """r_t per task (T,) in task order from the R of :func:`directions`."""
    if scheme == "pairwise":
        k, l = lay.pair_index()
        return R[k, l]
    return R

def dense_task_scores(
    P: torch.Tensor, lay: LabelLayout, scheme: str, R: torch.Tensor, tau: float
) -> torch.Tensor:
    """:func:`task_scores` for small batches, as a handful of dense n × n ops (plain
    autograd, O(n²) memory; no blocks, no gathers of padded pieces, no Python loop).

    With g_a = P[a, y_a] and E[a, b] = P[a, y_b] (E = P Yᵀ, Y one-hot): pairwise, for a, b in
    different classes, ŵ_{y_a y_b}·(a − b) = r·(g_a + g_b − E[a, b] − E[b, a]) (symmetric in
    a, b); ovr, ŵ_{y_a}·(a − b) = r·(g_a − P[b, y_a]). Per-task sums are the off-diagonal
    entries of Yᵀ F Y (F the n × n soft counts): same-class entries of F land on the diagonal
    and are never used, so they need no mask."""
    inv, K = lay.inverse, lay.K
    Y = lay.onehot(P.dtype)
    cnt = lay.count_t.to(P.dtype)
    g, E = P.gather(1, inv[:, None]), P @ Y.mT
    if scheme == "pairwise":
        D = g - E
        x = (D + D.mT) * (Y @ (R * (1.0 / tau)) @ Y.mT)
    else:
        x = (g - E.mT) * (Y @ (R * (1.0 / tau)))[:, None]
    c = cut(P.dtype)
    M = Y.mT @ (torch.sigmoid(x.clamp(-c, c)) @ Y)  # K × K block sums
    floor = 1.0 / (1.0 + math.exp(c))  # σ(−c): f = σ(clip(x)) − σ(−c) as in _SoftCount
    if scheme == "pairwise":
        k, l = lay.pair_index()
        pairs = cnt[k] * cnt[l]
        sums = M[k, l]
    else:
        pairs = cnt * (lay.n - cnt)
        sums = (M * (1.0 - torch.eye(K, dtype=P.dtype, device=P.device))).sum(1)
    return (sums / pairs - floor).clamp(0.0, 1.0)

def scores(
    P: torch.Tensor, lay: LabelLayout, scheme: str, R: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-task S_τ: dense n × n ops when n² <= DENSE_ELEMS (fast, O(n²) autograd memory),
    else the memory-bounded blocks of :func:`task_scores` (autograd memory O(n) per task)."""
    if lay.n * lay.n <= DENSE_ELEMS:
        return dense_task_scores(P, lay, scheme, R, tau)
    return task_scores(P, lay, scheme, task_rates(R, lay, scheme) / tau)

def soft_md_lsm_tasks(
    X: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    scheme: str,
    shrinkage: float,
    detach_directions: bool = False,
    dual: bool | None = None,
    lay: LabelLayout | None = None,
) -> torch.Tensor:
    """Per-task S_τ (T,) on validated input (for benchmarks and per-pair details); a single
    1.0 (``(X * 0).sum() + 1``) when there are fewer than two classes. ``dual`` forces the
    solver (None: dual iff d > n); ``lay``: the layout of ``labels`` if the caller has it."""
    lay = lay if lay is not None else LabelLayout(labels)
    if lay.K < 2:
        return ((X * 0).sum() + 1.0).reshape(1)
    if detach_directions:  # P = Hc @ W with W (and r) constants
        _, W, R = directions(X.detach(), lay, scheme, shrinkage, dual, need_w=True)
        P = (X - X.mean(0, keepdim=True)) @ W
        if scheme == "ovr":
            P = lay.combine(P, scheme)
        return scores(P, lay, scheme, R, tau)
    return soft_md_lsm_graph(X, lay, scheme, shrinkage, tau, dual)


def soft_md_lsm_graph(
    X: torch.Tensor, lay: LabelLayout, scheme: str, shrinkage: float, tau: float, dual: bool | None
) -> torch.Tensor:
    """Per-task S_τ (T,) with every op recorded by autograd (reference of the other paths)."""
    P, _, R = directions(X, lay, scheme, shrinkage, dual)
    if scheme == "ovr":
        P = lay.combine(P, scheme)
    return scores(P, lay, scheme, R, tau)


def soft_md_lsm_crossfit(
    X: torch.Tensor,
    lay: LabelLayout,
    tau: float,
    scheme: str,
    shrinkage: float,
    detach_directions: bool = False,
) -> torch.Tensor:
    """2-fold cross-fitted S_τ (0-dim): fit on one half of each class, score the other."""
    labels = lay.inverse  # class indices: the same halves and layouts as the labels
    big = [k for k in range(lay.K) if lay.counts[k] >= 2]
    if len(big) < 2:
        return (X * 0).sum() + 1.0
    rank = torch.empty_like(lay.order)  # position of each sample among its class, batch order
    rank[lay.order] = torch.cat([torch.arange(c, device=X.device) for c in lay.counts])
    keep = torch.isin(lay.inverse, torch.tensor(big, device=X.device))
    values = []
    for fold in (0, 1):
        fit = keep & (rank % 2 == fold)
        ev = keep & (rank % 2 != fold)
        lay_fit, lay_ev = LabelLayout(labels[fit]), LabelLayout(labels[ev])  # the same classes
        Xf = X[fit].detach() if detach_directions else X[fit]
        _, W, R = directions(Xf, lay_fit, scheme, shrinkage, need_w=True)
        P = (X[ev] - X[fit].mean(0, keepdim=True)) @ W  # only differences matter
        if scheme == "ovr":  # the weights of the rest's mean come from the fit half
            P = lay_fit.combine(P, scheme)
        values.append(scores(P, lay_ev, scheme, R, tau).mean())
    return (values[0] + values[1]) / 2

