"""The fast layer score: the exact degree of the shrunk Fisher direction of every class pair.

For features X (n × d) with C classes, Σ the within-class covariance pooled over the classes
of the fitting rows, α its Ledoit–Wolf shrinkage intensity (at least ``ALPHA_MIN``) and
Σ_α = (1 − α)Σ + α·(tr Σ / d)·I, the direction of a problem (A, B) — a class pair, or a
class and the rest — is w = Σ_α⁻¹(μ_A − μ_B), and its value is the exact AUC of the float64
scores x·w: the fraction of pairs (a, b) with w·a > w·b, ties counting 1/2 (docs:
``docs/monitor.md``).

* In-sample (``holdout=None``): the better of w and −w on all rows. It is the exact AUC of
  a concrete direction, hence a certified lower bound of the MD-LSM degree m(A, B).
* Cross-fitted (``holdout=f``): the split of ``layer_separability(method="degree")``
  (:func:`stratified_split`, same seed, same parts); w is fitted on one part and its AUC,
  not flipped, is counted on the other; then the parts swap and the two AUCs are averaged.

Every problem shares one factorization per fit: the d × d matrix Σ_α when d <= n_fit, else
the n_fit × n_fit Woodbury dual; then C solves (one per class mean), the scores of all
problems as (rows × C) @ (C × problems), and one batched sort for every problem (and every
layer, :func:`pair_values`). Nothing reads back to the host: the labels are laid out once
(:class:`FisherLayout`), and a failed factorization falls back to the mean difference
(α = 1) on the device. It gives up, against ``method="degree"``: the search over other
directions (the in-sample ascent, the inner choice of α when cross-fitted).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .directions import auc2_counts

__all__ = [
    "ALPHA_MIN",
    "FisherLayout",
    "crossfit_classes",
    "fisher_values",
    "pair_scores",
    "pair_values",
    "stratified_split",
]

ALPHA_MIN = 1e-3  # floor of the Ledoit–Wolf intensity: keeps the factorization well posed


def stratified_split(index: dict, classes: list[int], frac: float, gen: torch.Generator):
    """Seeded stratified split: per class a random part of round(frac·n_c) rows (at least
    1, at most n_c − 1) and the rest."""
    parts: list[dict[int, torch.Tensor]] = [{}, {}]
    for c in classes:
        idx = index[c]
        perm = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
        k = min(max(round(frac * idx.numel()), 1), idx.numel() - 1)
        parts[0][c], parts[1][c] = perm[:k], perm[k:]
    return parts


def crossfit_classes(index: dict, classes: list[int], holdout: float, stacklevel: int = 3):
    """(classes that can be split, classes left out with a UserWarning): a class needs 2
    samples. Fewer than 2 splittable classes raise ValueError."""
    skipped = [c for c in classes if index[c].numel() < 2]
    kept = [c for c in classes if index[c].numel() >= 2]
    if skipped:
        warnings.warn(
            f"layer_separability(holdout={holdout}): classes {skipped} have fewer than 2 "
            "samples and cannot be split; they are left out of the cross-fitted score",
            UserWarning,
            stacklevel=stacklevel,
        )
    if len(kept) < 2:
        raise ValueError(
            f"holdout: cross-fitting needs at least 2 classes with >= 2 samples each, got "
            f"{len(kept)} (class sizes: "
            f"{ {c: int(index[c].numel()) for c in kept + skipped} })"
        )
    return kept, skipped


@dataclass
class _Fold:
    fit_rows: torch.Tensor  # (n_fit,) rows of X, class by class
    fit_class: torch.Tensor  # (n_fit,) class position 0..C-1 of each fit row
    fit_counts: torch.Tensor  # (C,) float64
    eval_rows: torch.Tensor  # (n_eval,) rows of X, class by class
    mix: torch.Tensor  # (C, K) float64: problem direction = class directions @ mix


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(r.numel()) for r in rows)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for k, r in enumerate(rows):
        out[k, : r.numel()] = r
        mask[k, : r.numel()] = True
    return out, mask


class FisherLayout:
    """Everything that depends on the labels alone, built once on the host and reused for
    every layer (and every evaluation on the same labelled rows): the classes, problems,
    folds and the padded flat indices of the batched AUC."""

    def __init__(self, labels: torch.Tensor, scheme: str = "pairwise",
                 holdout: float | None = None, seed: int = 0, device=None):
        labels = labels.detach().reshape(-1).cpu().long()
        classes = torch.unique(labels).tolist()
        index = {c: (labels == c).nonzero().reshape(-1) for c in classes}
        self.scheme, self.holdout, self.orient = scheme, holdout, holdout is None
        self.skipped: list[int] = []
        if holdout is None:
            splits = [(index, index)]
        else:
            classes, self.skipped = crossfit_classes(index, classes, holdout, stacklevel=4)
            gen = torch.Generator().manual_seed(int(seed))
            parts = stratified_split(index, classes, holdout, gen)
            splits = [(parts[0], parts[1]), (parts[1], parts[0])]
        self.classes = classes
        C = len(classes)
        if scheme == "pairwise":
            self.problems = [(i, j) for i in range(C) for j in range(i + 1, C)]
            self.keys = [(classes[i], classes[j]) for i, j in self.problems]
        else:
            self.problems = [(c, None) for c in range(C)]
            self.keys = [(classes[c], "rest") for c in range(C)]
        K = len(self.problems)
        self.folds: list[_Fold] = []
        ia, ib, offset = [], [], 0
        for fit, ev in splits:
            counts = torch.tensor([fit[c].numel() for c in classes], dtype=torch.float64)
            mix = torch.zeros(C, K, dtype=torch.float64)
            for k, (i, j) in enumerate(self.problems):
                mix[i, k] = 1.0
                if j is not None:
                    mix[j, k] = -1.0
                else:  # the rest: the mean of the other classes' fit rows
                    rest = counts.clone()
                    rest[i] = 0.0
                    mix[:, k] -= rest / rest.sum()
            self.folds.append(_Fold(
                fit_rows=torch.cat([fit[c] for c in classes]),
                fit_class=torch.repeat_interleave(torch.arange(C), counts.long()),
                fit_counts=counts, eval_rows=torch.cat([ev[c] for c in classes]), mix=mix,
            ))
            # positions of each class among this fold's eval rows, in the stacked scores
            sizes = [ev[c].numel() for c in classes]
            starts = torch.tensor([0] + sizes).cumsum(0).tolist()
            pos = [torch.arange(offset + starts[c], offset + starts[c + 1]) for c in range(C)]
            for k, (i, j) in enumerate(self.problems):
                others = [pos[j]] if j is not None else [pos[o] for o in range(C) if o != i]
                ia.append(pos[i] * K + k)
                ib.append(torch.cat(others) * K + k)
            offset += starts[-1]
        self.n_scored = offset  # rows of the stacked scores (all folds' eval rows)
        ia_t, ma = _pad(ia)
        ib_t, mb = _pad(ib)
        na, nb = ma.sum(1).double(), mb.sum(1).double()
        self.ia, self.ma, self.ib, self.mb = ia_t, ma, ib_t, mb
        self.total = 2 * na * nb  # (F·K,) twice the number of pairs of each problem
        if device is not None:
            self.to(device)

    def to(self, device) -> FisherLayout:
        """Move the index tensors to ``device`` (in place); returns self."""
        for name in ("ia", "ma", "ib", "mb", "total"):
            setattr(self, name, getattr(self, name).to(device))
        for f in self.folds:
            for name in ("fit_rows", "fit_class", "fit_counts", "eval_rows", "mix"):
                setattr(f, name, getattr(f, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.ia.device


def _class_directions(X: torch.Tensor, fold: _Fold) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_α⁻¹(μ_c − μ̄) for each class c as columns (d, C), the grand mean μ̄ (d,)), float64,
    from the fit rows of ``fold``; Gram matrix in the features' precision."""
    Xf = X[fold.fit_rows]
    nf, d = Xf.shape
    C = fold.fit_counts.shape[0]
    onehot = F.one_hot(fold.fit_class, C).to(Xf.dtype)  # (n_fit, C)
    means = (onehot.T @ Xf) / fold.fit_counts.to(Xf.dtype)[:, None]  # (C, d)
    Z = Xf - means[fold.fit_class]  # within-class residuals
    means = means.double()
    grand = (fold.fit_counts @ means) / nf
    primal = d <= nf
    G = (Z.T @ Z if primal else Z @ Z.T).double()  # Cholesky reads the lower triangle
    sq = torch.linalg.vector_norm(Z, dim=1, dtype=torch.float64).square()  # ‖z_i‖²
    tr = sq.sum()
    dof = max(nf - C, 1)
    # Ledoit–Wolf towards (tr S / d)·I, S = ZᵀZ / n_fit (as directions._Metric.ledoit_wolf)
    fro2 = torch.linalg.vector_norm(G).square() / nf**2
    delta2 = fro2 - (tr / nf) ** 2 / d
    bbar2 = ((sq.square().sum() / nf - fro2) / nf).clamp_min(0)
    alpha = torch.where(delta2 > 0, torch.minimum(bbar2, delta2) / delta2.clamp_min(1e-300),
                        torch.ones_like(delta2)).clamp(ALPHA_MIN, 1.0)
    between = (fold.fit_counts @ (means - grand).square().sum(1)) / nf
    beta = torch.where(tr > 0, tr / dof, between) / d
    beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    c, lam = (1 - alpha) / dof, alpha * beta
    rhs = (means - grand).T  # (d, C)
    A = G.mul_(c)
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    if primal:
        V = torch.cholesky_solve(rhs, L)
    else:  # (λI + cZᵀZ)⁻¹ = (I − cZᵀ(λI + cZZᵀ)⁻¹Z) / λ
        Zd = Z.double()
        V = (rhs - c * (Zd.T @ torch.cholesky_solve(Zd @ rhs, L))) / lam
    ok = (info == 0) & torch.isfinite(V).all()
    return torch.where(ok, V, rhs / beta), grand


def pair_scores(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Scores x·w of every problem's direction on its fold's eval rows, stacked over the
    folds: (layout.n_scored, K) float64. ``X`` (n, d) floating point on layout.device."""
    if not X.is_floating_point() or X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    out = []
    for fold in layout.folds:
        V, grand = _class_directions(X, fold)
        Xe = X[fold.eval_rows].double() - grand
        out.append((Xe @ V) @ fold.mix)
    return torch.cat(out)


def pair_values(T: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Exact AUC of every problem from stacked scores T (L, n_scored, K) of L layers:
    (L, K) float64, one batched sort; in-sample oriented, cross-fitted averaged over folds."""
    flat = T.reshape(T.shape[0], -1)
    sa = flat[:, layout.ia]  # (L, F·K, max |A|)
    sb = flat[:, layout.ib].masked_fill(~layout.mb, float("inf"))
    u2 = auc2_counts(sa, sb, layout.ma).double()  # (L, F·K)
    if layout.orient:
        u2 = torch.maximum(u2, layout.total - u2)
    values = u2 / layout.total
    return values.reshape(T.shape[0], len(layout.folds), -1).mean(1)


def fisher_values(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Per-problem values (K,) float64 of one layer's features (n, d) on the device; NaN
    when X has a non-finite entry."""
    values = pair_values(pair_scores(X, layout)[None], layout)[0]
    return torch.where(torch.isfinite(X).all(), values, torch.full_like(values, float("nan")))
