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

import numpy as np
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


def _pad(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max(len(r) for r in rows), 1)
    out = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for k, r in enumerate(rows):
        out[k, : len(r)] = r
        mask[k, : len(r)] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


class FisherLayout:
    """Everything that depends on the labels alone, built once on the host and reused for
    every layer (and every evaluation on the same labelled rows): the classes, problems,
    the F folds (1 in-sample, 2 cross-fitted) as padded row indices, and the padded flat
    indices of the batched AUC into the scores (L, F · eval width, K)."""

    _TENSORS = ("fit_idx", "fit_mask", "fit_onehot", "fit_counts", "n_fit", "dof", "eval_idx",
                "mix", "ia", "ma", "ib", "mb", "total")

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
        fits = [[fit[c].numpy() for c in classes] for fit, _ in splits]
        evals = [[ev[c].numpy() for c in classes] for _, ev in splits]
        counts = np.array([[len(r) for r in f] for f in fits], dtype=np.float64)  # (F, C)
        fit_cls = [np.repeat(np.arange(C), cnt.astype(np.int64)) for cnt in counts]
        self.fit_idx, self.fit_mask = _pad([np.concatenate(f) for f in fits])
        self.fit_padded = not bool(self.fit_mask.all())
        cls_pad, _ = _pad(fit_cls)
        self.fit_onehot = F.one_hot(cls_pad, C).to(torch.float32) * self.fit_mask[..., None]
        self.fit_counts = torch.from_numpy(counts)
        self.n_fit = self.fit_counts.sum(1)
        self.dof = (self.n_fit - C).clamp_min(1)
        self.min_fit = int(self.n_fit.min())
        mix = np.zeros((len(splits), C, K))
        for k, (i, j) in enumerate(self.problems):
            mix[:, i, k] = 1.0
            if j is not None:
                mix[:, j, k] = -1.0
            else:  # the rest: the mean of the other classes' fit rows
                rest = counts.copy()
                rest[:, i] = 0.0
                mix[:, :, k] -= rest / rest.sum(1, keepdims=True)
        self.mix = torch.from_numpy(mix)
        self.eval_idx, _ = _pad([np.concatenate(e) for e in evals])
        width = self.eval_idx.shape[1]
        ia, ib = [], []
        for f, ev in enumerate(evals):  # positions of each class among the padded eval rows
            starts = np.cumsum([0] + [len(r) for r in ev])
            pos = [np.arange(f * width + starts[c], f * width + starts[c + 1]) for c in range(C)]
            for k, (i, j) in enumerate(self.problems):
                others = pos[j] if j is not None else np.concatenate(
                    [pos[o] for o in range(C) if o != i])
                ia.append(pos[i] * K + k)
                ib.append(others * K + k)
        self.ia, self.ma = _pad(ia)
        self.ib, self.mb = _pad(ib)
        self.total = 2 * self.ma.sum(1).double() * self.mb.sum(1).double()  # (F·K,)
        if device is not None:
            self.to(device)

    @property
    def n_folds(self) -> int:
        return self.fit_idx.shape[0]

    def to(self, device) -> FisherLayout:
        """Move the index tensors to ``device`` (in place); returns self."""
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.ia.device


def _class_directions(X: torch.Tensor, lay: FisherLayout) -> torch.Tensor:
    """Σ_α⁻¹(μ_c − μ̄) of each class c as columns, (L, F, d, C) float64 (μ̄ the mean of the
    fold's fit rows), for the L layers X (L, n, d) and the F folds; Gram matrix in the
    features' precision. One batch of L·F factorizations."""
    nl, _, d = X.shape
    nfold, C = lay.n_folds, lay.fit_counts.shape[1]
    B = nl * nfold
    oh = lay.fit_onehot.to(X.dtype)  # (F, m, C), zero rows for padding
    Xf = X[:, lay.fit_idx]  # (L, F, m, d)
    means = (oh.mT @ Xf) / lay.fit_counts.to(X.dtype)[..., None]  # (L, F, C, d)
    Z = Xf - oh @ means  # within-class residuals
    if lay.fit_padded:  # padding rows gathered row 0: zero them
        Z = Z * lay.fit_mask[..., None].to(X.dtype)
    Z = Z.reshape(B, -1, d)
    means = means.double().reshape(B, C, d)
    nf, dof = lay.n_fit.repeat(nl), lay.dof.repeat(nl)  # (B,)
    counts = lay.fit_counts.repeat(nl, 1)  # (B, C)
    grand = (counts[:, None, :] @ means)[:, 0] / nf[:, None]  # (B, d)
    primal = d <= lay.min_fit
    G = (Z.mT @ Z if primal else Z @ Z.mT).double()  # Cholesky reads the lower triangle
    sq = torch.linalg.vector_norm(Z, dim=2, dtype=torch.float64).square()  # ‖z_i‖² (B, m)
    tr = sq.sum(1)
    # Ledoit–Wolf towards (tr S / d)·I, S = ZᵀZ / n_fit (as directions._Metric.ledoit_wolf)
    fro2 = torch.linalg.vector_norm(G, dim=(1, 2)).square() / nf**2
    delta2 = fro2 - (tr / nf) ** 2 / d
    bbar2 = ((sq.square().sum(1) / nf - fro2) / nf).clamp_min(0)
    alpha = torch.where(delta2 > 0, torch.minimum(bbar2, delta2) / delta2.clamp_min(1e-300),
                        torch.ones_like(delta2)).clamp(ALPHA_MIN, 1.0)
    centred = means - grand[:, None, :]  # (B, C, d)
    between = (counts * centred.square().sum(2)).sum(1) / nf
    beta = torch.where(tr > 0, tr / dof, between) / d
    beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    c, lam = ((1 - alpha) / dof)[:, None, None], (alpha * beta)[:, None, None]
    rhs = centred.mT  # (B, d, C)
    A = G.mul_(c)
    A.diagonal(dim1=1, dim2=2).add_(lam[:, :, 0])
    L, info = torch.linalg.cholesky_ex(A)

    def solve(b: torch.Tensor) -> torch.Tensor:  # A⁻¹b = L⁻ᵀ L⁻¹ b
        half = torch.linalg.solve_triangular(L, b, upper=False)
        return torch.linalg.solve_triangular(L.mT, half, upper=True)

    if primal:
        V = solve(rhs)
    else:  # (λI + cZᵀZ)⁻¹ = (I − cZᵀ(λI + cZZᵀ)⁻¹Z) / λ
        Zd = Z.double()
        V = (rhs - c * (Zd.mT @ solve(Zd @ rhs))) / lam
    ok = ((info == 0) & torch.isfinite(V).all(2).all(1))[:, None, None]
    V = torch.where(ok, V, rhs / beta[:, None, None])
    return V.reshape(nl, nfold, d, C)


def pair_scores(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Scores x·w of every problem's direction on its fold's eval rows, for L layers of the
    same width ``X`` (L, n, d) (or one layer (n, d)), floating point on layout.device:
    (L, F · eval width, K) float64 (padded rows are never read)."""
    if X.ndim == 2:
        X = X[None]
    if not X.is_floating_point() or X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    V = _class_directions(X, layout)
    Xe = X[:, layout.eval_idx].double()  # (L, F, width, d); AUCs ignore a common shift
    T = (Xe @ V) @ layout.mix[None]  # (L, F, width, K)
    return T.reshape(X.shape[0], -1, T.shape[-1])


def pair_values(T: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Exact AUC of every problem from the scores T (L, F · eval width, K) of L layers
    (:func:`pair_scores`, concatenated over layers): (L, K) float64, one batched sort;
    in-sample oriented, cross-fitted averaged over the folds; NaN for a layer whose scores
    are not finite (non-finite features)."""
    flat = T.reshape(T.shape[0], -1)
    sa = flat[:, layout.ia]  # (L, F·K, max |A|)
    sb = flat[:, layout.ib].masked_fill(~layout.mb, float("inf"))
    u2 = auc2_counts(sa, sb, layout.ma).double()  # (L, F·K)
    if layout.orient:
        u2 = torch.maximum(u2, layout.total - u2)
    values = (u2 / layout.total).reshape(T.shape[0], layout.n_folds, -1).mean(1)
    finite = torch.isfinite(T).flatten(1).all(1, keepdim=True)
    return torch.where(finite, values, torch.full_like(values, float("nan")))


def fisher_values(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Per-problem values (K,) float64 of one layer's features (n, d) on the device; NaN
    when X has a non-finite entry."""
    return pair_values(pair_scores(X, layout), layout)[0]
