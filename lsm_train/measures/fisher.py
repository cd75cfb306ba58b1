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

Every problem shares one factorization per fit: the d × d matrix Σ_α when d is at most
about n_fit (``_PRIMAL_SLACK``), else the n_fit × n_fit Woodbury dual; then C solves (one
per class mean), the scores of all problems as (rows × C) @ (C × problems), and one batched
sort for every problem (and every layer, :func:`pair_values`). The Gram matrix and its
factorization (LU on a CPU, Cholesky elsewhere) are in the features' precision; for float32
features two steps of iterative refinement against the float64 system give the float64
solve with the same Gram matrix (to about (cond · 2⁻²⁴)³ relative). The labels are laid
out once (:class:`FisherLayout`: each part of the rows is gathered once per call), nothing
is read back to the host on an accelerator, and a failed factorization falls back to the
mean difference (α = 1) on the device. It gives up, against ``method="degree"``: the
search over other directions (the in-sample ascent, the inner choice of α when
cross-fitted).
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
REFINE_STEPS = 2  # refinement steps of a float32 factorization against the float64 system
# the d × d primal system while d <= n_fit + _PRIMAL_SLACK · C: its larger Gram matrix costs
# less than the dual's float64 copies and products of the (n_fit × d) residuals
_PRIMAL_SLACK = 10


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
    every layer (and every evaluation on the same labelled rows).

    The rows form parts (in-sample: one part, all rows in their order; cross-fitted: the
    two parts of the split, each gathered once per call); fold f fits on part
    ``folds[f][0]`` and is evaluated on part ``folds[f][1]``. The scores of all folds are
    stacked along the rows (fold after fold); ``ia``/``ib`` are the padded flat indices of
    each (fold, problem)'s two sets into them, for the batched AUC."""

    def __init__(self, labels: torch.Tensor, scheme: str = "pairwise",
                 holdout: float | None = None, seed: int = 0, device=None):
        labels = labels.detach().reshape(-1).cpu().long()
        classes = torch.unique(labels).tolist()
        index = {c: (labels == c).nonzero().reshape(-1) for c in classes}
        self.scheme, self.holdout, self.orient = scheme, holdout, holdout is None
        self.skipped: list[int] = []
        if holdout is None:
            self.folds = [(0, 0)]
            pos = torch.searchsorted(torch.tensor(classes), labels)
            part_rows, part_cls = [None], [pos.numpy()]
        else:
            classes, self.skipped = crossfit_classes(index, classes, holdout, stacklevel=4)
            gen = torch.Generator().manual_seed(int(seed))
            splits = stratified_split(index, classes, holdout, gen)
            self.folds = [(0, 1), (1, 0)]
            part_rows = [torch.cat([p[c] for c in classes]) for p in splits]
            part_cls = [np.repeat(np.arange(len(classes)), [p[c].numel() for c in classes])
                        for p in splits]
        self.classes = classes
        C = len(classes)
        if scheme == "pairwise":
            self.problems = [(i, j) for i in range(C) for j in range(i + 1, C)]
            self.keys = [(classes[i], classes[j]) for i, j in self.problems]
        else:
            self.problems = [(c, None) for c in range(C)]
            self.keys = [(classes[c], "rest") for c in range(C)]
        self.part_rows = part_rows  # row indices of each part (None: all rows, in order)
        counts = [np.bincount(c, minlength=C).astype(np.float64) for c in part_cls]
        self.part_onehot = [F.one_hot(torch.from_numpy(c).long(), C).to(torch.float32)
                            for c in part_cls]
        self.part_counts = [torch.from_numpy(c) for c in counts]
        self.mix = [torch.from_numpy(self._mix(counts[p])) for p, _ in self.folds]
        self._eval_positions([part_cls[q] for _, q in self.folds])
        if device is not None:
            self.to(device)

    def _mix(self, counts: np.ndarray) -> np.ndarray:
        """(C, K): problem k's direction from the class directions (fit counts: the rest)."""
        mix = np.zeros((len(counts), len(self.problems)))
        for k, (i, j) in enumerate(self.problems):
            if j is not None:
                mix[j, k] = -1.0
            else:  # the rest: the mean of the other classes' fit rows
                rest = counts.copy()
                rest[i] = 0.0
                mix[:, k] -= rest / rest.sum()
            mix[i, k] += 1.0
        return mix

    def _eval_positions(self, eval_cls: list[np.ndarray]) -> None:
        K, C = len(self.problems), len(self.classes)
        ia, ib, offset = [], [], 0
        for cls in eval_cls:  # fold after fold: positions of each class among the rows
            pos = [offset + np.flatnonzero(cls == c) for c in range(C)]
            for k, (i, j) in enumerate(self.problems):
                others = pos[j] if j is not None else np.concatenate(
                    [pos[o] for o in range(C) if o != i])
                ia.append(pos[i] * K + k)
                ib.append(others * K + k)
            offset += len(cls)
        self.ia, self.ma = _pad(ia)
        self.ib, self.mb = _pad(ib)
        self.total = 2 * self.ma.sum(1).double() * self.mb.sum(1).double()  # (F·K,)

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def to(self, device) -> FisherLayout:
        """Move the index tensors to ``device`` (in place); returns self."""
        for name in ("part_onehot", "part_counts", "mix"):
            setattr(self, name, [t.to(device) for t in getattr(self, name)])
        self.part_rows = [None if r is None else r.to(device) for r in self.part_rows]
        for name in ("ia", "ma", "ib", "mb", "total"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.ia.device


def _use_lu(device: torch.device) -> bool:
    """LU on a CPU, where torch's Cholesky costs more than the LU's extra flops (it zeroes a
    triangle of its output); Cholesky elsewhere, whose solves never read the host."""
    return device.type == "cpu"


def _factorize(A: torch.Tensor):
    """A solver r ↦ A⁻¹r (in A's dtype) for a batch of SPD matrices A (B, s, s), and the
    factorization's info (B,): 0 where it succeeded."""
    if _use_lu(A.device):
        LU, pivots, info = torch.linalg.lu_factor_ex(A)
        return (lambda r: torch.linalg.lu_solve(LU, pivots, r)), info
    L, info = torch.linalg.cholesky_ex(A)

    def solve(r: torch.Tensor) -> torch.Tensor:  # A⁻¹r = L⁻ᵀ L⁻¹ r
        half = torch.linalg.solve_triangular(L, r, upper=False)
        return torch.linalg.solve_triangular(L.mT, half, upper=True)

    return solve, info


def _shrunk_solve(G: torch.Tensor, G64: torch.Tensor, c: torch.Tensor, lam: torch.Tensor,
                  b: torch.Tensor):
    """(c·G + λI)⁻¹ b as float64 for a batch of symmetric G (B, s, s) in the features'
    dtype (G64: the same in float64), c, λ (B,) and b (B, s, C) float64; also the
    factorization's info (B,). The factorization is taken in G's dtype (G is overwritten
    when it is not G64); a float32 one is refined by ``REFINE_STEPS`` steps against
    c·G + λI in float64: each step multiplies the error by about cond(c·G + λI)·2⁻²⁴."""
    A = G.mul_(c[:, None, None].to(G.dtype)) if G is not G64 else G * c[:, None, None]
    A.diagonal(dim1=1, dim2=2).add_(lam[:, None].to(G.dtype))
    solve, info = _factorize(A)
    x = solve(b.to(A.dtype)).double()
    if A.dtype != torch.float64:
        c, lam = c[:, None, None], lam[:, None, None]
        for _ in range(REFINE_STEPS):
            x = x + solve((b - (c * (G64 @ x) + lam * x)).to(A.dtype)).double()
    return x, info


def _class_directions(Xf: torch.Tensor, X64: torch.Tensor, onehot: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
    """Σ_α⁻¹(μ_c − μ̄) of each class c as columns, (L, d, C) float64 (μ̄ the mean of the fit
    rows), for the fit rows Xf (L, m, d) of L layers (X64: the same in float64) with their
    classes one-hot (m, C) and the class counts (C,) float64. One batch of L
    factorizations."""
    nl, m, d = Xf.shape
    C = counts.shape[0]
    dof = max(m - C, 1)
    means = (onehot.to(Xf.dtype).mT @ Xf) / counts.to(Xf.dtype)[:, None]  # (L, C, d)
    Z = torch.baddbmm(Xf, onehot.to(Xf.dtype).expand(nl, -1, -1), means, alpha=-1)  # residuals
    primal = d <= m + _PRIMAL_SLACK * C
    G = Z.mT @ Z if primal else Z @ Z.mT  # (L, s, s): s = d primal, m dual
    sq = torch.linalg.vector_norm(Z, dim=2).double().square()  # ‖z_i‖² (L, m)
    tr = sq.sum(1)
    # Ledoit–Wolf towards (tr S / d)·I, S = ZᵀZ / m (as directions._Metric.ledoit_wolf)
    G64 = G.double()  # G itself for float64 features
    fro2 = torch.linalg.vector_norm(G64, dim=(1, 2)).square() / m**2
    delta2 = fro2 - (tr / m) ** 2 / d
    bbar2 = ((sq.square().sum(1) / m - fro2) / m).clamp_min(0)
    alpha = torch.where(delta2 > 0, torch.minimum(bbar2, delta2) / delta2.clamp_min(1e-300),
                        torch.ones_like(delta2)).clamp(ALPHA_MIN, 1.0)
    means = means.double()
    centred = means - (counts @ means / m)[:, None, :]  # (L, C, d)
    between = (counts * centred.square().sum(2)).sum(1) / m
    beta = torch.where(tr > 0, tr / dof, between) / d
    beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    c, lam = (1 - alpha) / dof, alpha * beta
    rhs = centred.mT  # (L, d, C)
    if primal:
        V, info = _shrunk_solve(G, G64, c, lam, rhs)
    else:  # (λI + cZᵀZ)⁻¹ = (I − cZᵀ(λI + cZZᵀ)⁻¹Z) / λ, Z = X − onehot·means in float64
        oh = onehot.double()
        U, info = _shrunk_solve(G, G64, c, lam, X64 @ rhs - oh @ (means @ rhs))
        ZtU = X64.mT @ U - means.mT @ (oh.mT @ U)
        V = (rhs - c[:, None, None] * ZtU) / lam[:, None, None]
    ok = ((info == 0) & torch.isfinite(V).all(2).all(1))[:, None, None]
    return torch.where(ok, V, rhs / beta[:, None, None])


def pair_scores(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Scores x·w of every problem's direction on its fold's eval rows, for L layers of the
    same width ``X`` (L, n, d) (or one layer (n, d)), floating point on layout.device:
    (L, eval rows of all folds, K) float64."""
    if X.ndim == 2:
        X = X[None]
    if not X.is_floating_point() or X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    parts = [X if rows is None else X.index_select(1, rows) for rows in layout.part_rows]
    exact = [P.double() for P in parts]  # the scores in float64: ties stay ties
    T = [(exact[q] @ _class_directions(parts[p], exact[p], layout.part_onehot[p],
                                        layout.part_counts[p])) @ layout.mix[f]
         for f, (p, q) in enumerate(layout.folds)]
    return torch.cat(T, dim=1)


def pair_values(T: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Exact AUC of every problem from the scores T (L, eval rows of all folds, K) of L layers
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
