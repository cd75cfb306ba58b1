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

Every problem shares one factorization per fit, and the fits of both folds (and of every
layer of one width, :func:`pair_scores`) run as one batch: the d × d matrix Σ_α when d is
at most about n_fit (``_PRIMAL_SLACK``), else the n_fit × n_fit Woodbury dual; then C solves
(one per class mean), the scores of all problems as (rows × C) @ (C × problems), and one
batched sort for every problem and layer (:func:`pair_values`). The Gram matrix and its
factorization (LU on a CPU, in place; Cholesky elsewhere) are in the features' precision:
for float32 features the directions agree with those of the same features in float64 to
about 10⁻⁵ relative (measured on the zoo's layers; the float32 Gram matrix sets it, so
iterative refinement of the solve does not improve it), and each value is the exact AUC
of the direction it used. The labels
are laid out once (:class:`FisherLayout`: the two parts of a split side by side, padded to
one size with zero rows, gathered in one pass), the large temporaries reuse per-thread CPU
buffers (:class:`_Buffers`), nothing is read back to the host on an accelerator, and a
failed factorization falls back to the mean difference (α = 1) on the device. It gives
up, against ``method="degree"``: the search over other directions (the in-sample ascent,
the inner choice of α when cross-fitted).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

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
# the d × d primal system while d <= n_fit + _PRIMAL_SLACK · C: its larger Gram matrix costs
# less than the dual's products of the (n_fit × d) residuals
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


def _members(cls: torch.Tensor, C: int, rest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each class's rows (``rest``: of every other class's rows) in a part
    whose rows have classes ``cls`` (m,), C marking a padded row: (C, width) long, padded
    with 0, and its mask."""
    sizes = torch.bincount(cls, minlength=C + 1)[:C]
    if rest:
        outside = (cls[None, :] == torch.arange(C)[:, None]) | (cls[None, :] == C)
        order = torch.argsort(outside.to(torch.int8), dim=1, stable=True)
        sizes = sizes.sum() - sizes
        rows = order[:, : int(sizes.max())]
    else:
        starts = torch.cumsum(sizes, 0) - sizes
        slots = starts[:, None] + torch.arange(int(sizes.max()))[None]
        rows = torch.argsort(cls, stable=True)[slots.clamp_max(cls.numel() - 1)]
    mask = torch.arange(rows.shape[1])[None] < sizes[:, None]
    return rows.masked_fill(~mask, 0), mask


def _pad_columns(tables: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tables)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tables])


class FisherLayout:
    """Everything that depends on the labels alone, built once on the host and reused for
    every layer (and every evaluation on the same labelled rows).

    The rows form F parts of m rows each (in-sample: one part, all rows in their order;
    cross-fitted: the two parts of the split, each in class order, the shorter padded with
    zero rows), gathered side by side in one pass; fold f fits on part ``folds[f][0]`` and
    is evaluated on part ``folds[f][1]``. The scores of all parts are stacked along the rows
    (part after part); ``ia``/``ib`` are the padded flat indices of each (fold, problem)'s
    two sets into them, for the batched AUC."""

    def __init__(self, labels: torch.Tensor, scheme: str = "pairwise",
                 holdout: float | None = None, seed: int = 0, device=None):
        labels = labels.detach().reshape(-1).cpu().long()
        classes = torch.unique(labels).tolist()
        self.scheme, self.holdout, self.orient = scheme, holdout, holdout is None
        self.skipped: list[int] = []
        if holdout is None:
            self.folds = [(0, 0)]
            self.fit_rows = self.pad_rows = None  # all rows, in their order: no gather
            part_cls = [torch.searchsorted(torch.tensor(classes), labels)]
        else:
            index = {c: (labels == c).nonzero().reshape(-1) for c in classes}
            classes, self.skipped = crossfit_classes(index, classes, holdout, stacklevel=4)
            gen = torch.Generator().manual_seed(int(seed))
            splits = stratified_split(index, classes, holdout, gen)
            self.folds = [(0, 1), (1, 0)]
            rows = [torch.cat([p[c] for c in classes]) for p in splits]
            part_cls = [torch.repeat_interleave(torch.tensor([p[c].numel() for c in classes]))
                        for p in splits]
            m = max(r.numel() for r in rows)
            self.fit_rows = torch.cat([F.pad(r, (0, m - r.numel())) for r in rows])
            pad = torch.cat([torch.arange(r.numel(), m) + k * m for k, r in enumerate(rows)])
            self.pad_rows = pad if pad.numel() else None  # zeroed after the gather
            part_cls = [F.pad(c, (0, m - c.numel()), value=len(classes)) for c in part_cls]
        self.classes = classes
        C = len(classes)
        if scheme == "pairwise":
            first, second = torch.triu_indices(C, C, 1)
            self.problems = list(zip(first.tolist(), second.tolist(), strict=True))
            self.keys = [(classes[i], classes[j]) for i, j in self.problems]
        else:
            first = torch.arange(C)
            self.problems = [(c, None) for c in range(C)]
            self.keys = [(classes[c], "rest") for c in range(C)]
        self.part_size = part_cls[0].numel()
        onehot = torch.stack([F.one_hot(c, C + 1)[:, :C] for c in part_cls]).double()
        self.onehot = onehot  # (F, m, C); padded rows are zero
        self.counts = onehot.sum(1)  # (F, C)
        # (parts, C, K): the mix of the fold that scores each part (cross-fitted: the fold
        # fitted on the other part; in-sample: the one fold)
        self.part_mix = self._mix(first, second if scheme == "pairwise" else None).flip(0)
        self._eval_positions(part_cls, first, second if scheme == "pairwise" else None)
        if device is not None:
            self.to(device)

    def _mix(self, first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """(F, C, K): problem k's direction from the class directions of fold f's fit (the
        rest: the mean of the other classes' fit rows)."""
        C, K = len(self.classes), len(self.problems)
        eye = torch.eye(C, dtype=torch.float64)
        if second is not None:
            one = torch.zeros(C, K, dtype=torch.float64)
            one[first, torch.arange(K)] = 1.0
            one[second, torch.arange(K)] = -1.0
            return one.expand(self.n_folds, C, K).clone()
        counts = self.counts  # (F, C): fold f fits on part f
        rest = counts[:, :, None] * (1 - eye)  # (F, C other, K = C)
        return eye - rest / rest.sum(1, keepdim=True)

    def _eval_positions(self, part_cls: list[torch.Tensor], first: torch.Tensor,
                        second: torch.Tensor | None) -> None:
        K, C, m = len(self.problems), len(self.classes), self.part_size
        k = torch.arange(K)[:, None]
        ia, ma, ib, mb = [], [], [], []
        for _, q in self.folds:  # fold after fold, into the scores of its evaluation part
            rows, mask = _members(part_cls[q], C, rest=False)
            rb, mask_b = ((rows[second], mask[second]) if second is not None
                          else _members(part_cls[q], C, rest=True))
            ia.append((q * m + rows[first]) * K + k)
            ma.append(mask[first])
            ib.append((q * m + rb) * K + k)
            mb.append(mask_b)
        self.ia, self.ma, self.ib, self.mb = (_pad_columns(t) for t in (ia, ma, ib, mb))
        self.total = 2 * self.ma.sum(1).double() * self.mb.sum(1).double()  # (F·K,)

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def to(self, device) -> FisherLayout:
        """Move the index tensors to ``device`` (in place); returns self."""
        for name in ("fit_rows", "pad_rows", "onehot", "counts", "part_mix", "ia", "ma",
                     "ib", "mb", "total"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else value.to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.ia.device


class _Buffers(threading.local):
    """Reusable CPU buffers for the large temporaries of one call (the gathered rows, their
    float64 copy, the Gram matrices), kept per thread for the last shapes up to
    ``LIMIT_BYTES``. glibc hands large freed blocks back to the system, and faulting fresh
    pages in cost a call at n=1,024, d=512 about a third of its time; accelerators allocate
    through their caching allocator and get plain ``torch.empty``. Every buffer is
    overwritten before it is read, and none is returned to a caller."""

    LIMIT_BYTES = 64 << 20

    def __init__(self):
        self.slots: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        size = torch.Size(shape).numel() * dtype.itemsize
        if torch.device(device).type != "cpu" or size > self.LIMIT_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, tuple(shape), dtype)
        buf = self.slots.pop(key, None)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype)
        self.slots[key] = buf  # the most recently used last
        while sum(t.numel() * t.dtype.itemsize for t in self.slots.values()) > self.LIMIT_BYTES:
            self.slots.popitem(last=False)
        return buf

    def clear(self) -> None:
        self.slots.clear()


_BUFFERS = _Buffers()


def _use_lu(device: torch.device) -> bool:
    """LU on a CPU, where torch's Cholesky costs more than the LU's extra flops (it zeroes a
    triangle of its output); Cholesky elsewhere, whose solves never read the host."""
    return device.type == "cpu"


def _factorize(A: torch.Tensor):
    """A solver r ↦ A⁻¹r (in A's dtype) for a batch of SPD matrices A (B, s, s), and the
    factorization's info (B,): 0 where it succeeded. The CPU's LU overwrites A: it factors
    A.mT, the same symmetric matrix in the column-major layout LAPACK works in, so that
    neither the factorization nor the solves copy it."""
    if _use_lu(A.device):
        pivots = torch.empty(A.shape[:-1], dtype=torch.int32, device=A.device)
        info = torch.empty(A.shape[:-2], dtype=torch.int32, device=A.device)
        LU = A.mT  # one view as input and output: no copy onto itself
        LU, pivots, info = torch.linalg.lu_factor_ex(LU, out=(LU, pivots, info))
        return (lambda r: torch.linalg.lu_solve(LU, pivots, r)), info
    L, info = torch.linalg.cholesky_ex(A)

    def solve(r: torch.Tensor) -> torch.Tensor:  # A⁻¹r = L⁻ᵀ L⁻¹ r
        half = torch.linalg.solve_triangular(L, r, upper=False)
        return torch.linalg.solve_triangular(L.mT, half, upper=True)

    return solve, info


def _shrunk_solve(G: torch.Tensor, c: torch.Tensor, lam: torch.Tensor, b: torch.Tensor):
    """(c·G + λI)⁻¹ b as float64 for a batch of symmetric G (B, s, s), c, λ (B,) and
    b (B, s, C) float64, solved in G's dtype (G is overwritten); also the factorization's
    info (B,)."""
    A = G.mul_(c[:, None, None].to(G.dtype))
    A.diagonal(dim1=1, dim2=2).add_(lam[:, None].to(G.dtype))
    solve, info = _factorize(A)
    return solve(b.to(A.dtype)).double(), info


def _class_directions(Xf: torch.Tensor, X64: torch.Tensor, onehot: torch.Tensor,
                      counts: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """Σ_α⁻¹(μ_c − μ̄) of each class c as columns, (B, d, C) float64 (μ̄ the mean of the fit
    rows), for B fits: rows Xf (B, m, d) (X64: the same in float64; zero rows are padding)
    with their classes one-hot (B, m, C) float64 (zero for padding) and the class counts
    (B, C) float64. One batch of B factorizations; ``overwrite``: Xf may be overwritten."""
    _, m, d = Xf.shape
    C = counts.shape[1]
    n_fit = counts.sum(1)  # (B,) real fit rows
    dof = (n_fit - C).clamp_min(1)
    oh = onehot.to(Xf.dtype)
    means = (oh.mT @ Xf) / counts.to(Xf.dtype)[:, :, None]  # (B, C, d)
    Z = (Xf.baddbmm_ if overwrite else Xf.baddbmm)(oh, means, alpha=-1)
    means = means.double()
    primal = d <= m + _PRIMAL_SLACK * C
    s = d if primal else m
    G = torch.matmul(*((Z.mT, Z) if primal else (Z, Z.mT)),  # (B, s, s)
                     out=_BUFFERS.get("gram", (Z.shape[0], s, s), Z.dtype, Z.device))
    sq = torch.linalg.vector_norm(Z, dim=2).double().square()  # ‖z_i‖² (B, m)
    tr = sq.sum(1)
    # Ledoit–Wolf towards (tr S / d)·I, S = ZᵀZ / n_fit (as directions._Metric.ledoit_wolf)
    fro2 = torch.linalg.vector_norm(G, dim=(1, 2)).double().square() / n_fit**2
    delta2 = fro2 - (tr / n_fit) ** 2 / d
    bbar2 = ((sq.square().sum(1) / n_fit - fro2) / n_fit).clamp_min(0)
    alpha = torch.where(delta2 > 0, torch.minimum(bbar2, delta2) / delta2.clamp_min(1e-300),
                        torch.ones_like(delta2)).clamp(ALPHA_MIN, 1.0)
    centred = means - (counts[:, :, None] * means).sum(1, keepdim=True) / n_fit[:, None, None]
    between = (counts * centred.square().sum(2)).sum(1) / n_fit
    beta = torch.where(tr > 0, tr / dof, between) / d
    beta = torch.where(beta > 0, beta, torch.ones_like(beta))
    c, lam = (1 - alpha) / dof, alpha * beta
    rhs = centred.mT  # (B, d, C)
    if primal:
        V, info = _shrunk_solve(G, c, lam, rhs)
    else:  # (λI + cZᵀZ)⁻¹ = (I − cZᵀ(λI + cZZᵀ)⁻¹Z) / λ, Z = X − onehot·means in float64
        U, info = _shrunk_solve(G, c, lam, X64 @ rhs - onehot @ (means @ rhs))
        ZtU = (U.mT @ X64).mT - means.mT @ (onehot.mT @ U)
        V = (rhs - c[:, None, None] * ZtU) / lam[:, None, None]
    ok = ((info == 0) & torch.isfinite(V.sum((1, 2))))[:, None, None]  # NaN, ±inf: no
    return torch.where(ok, V, rhs / beta[:, None, None])


@torch.no_grad()
def pair_scores(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Scores x·w of every problem's direction on its fold's eval rows, for L layers of the
    same width ``X`` (L, n, d) (or one layer (n, d)), floating point on layout.device:
    (L, rows of all parts, K) float64 (padded rows included; ``layout.ia``/``ib`` skip
    them)."""
    if X.ndim == 2:
        X = X[None]
    if not X.is_floating_point() or X.dtype in (torch.float16, torch.bfloat16):
        X = X.float()
    nl, _, d = X.shape
    parts, m = layout.n_folds, layout.part_size
    if layout.fit_rows is None:
        Xf, overwrite = X, False
    else:  # both parts in one gather; the padded rows zeroed
        Xf = torch.index_select(X, 1, layout.fit_rows, out=_BUFFERS.get(
            "rows", (nl, layout.fit_rows.numel(), d), X.dtype, X.device))
        if layout.pad_rows is not None:
            Xf.index_fill_(1, layout.pad_rows, 0)
        overwrite = Xf.dtype != torch.float64  # else Xf is its own float64 copy
    X64 = Xf if Xf.dtype == torch.float64 else _BUFFERS.get(  # the scores in float64:
        "rows64", Xf.shape, torch.float64, Xf.device).copy_(Xf)  # ties stay ties
    batch = (nl * parts, m, d)  # fold f fits on part f
    onehot = layout.onehot.expand(nl, -1, -1, -1).reshape(nl * parts, m, -1)
    counts = layout.counts.expand(nl, -1, -1).reshape(nl * parts, -1)
    V = _class_directions(Xf.reshape(batch), X64.reshape(batch), onehot, counts, overwrite)
    V = V.reshape(nl, parts, d, -1)
    if parts == 2:  # part q is scored by the fold fitted on the other part
        V = V.flip(1)
    T = (X64.reshape(nl, parts, m, d) @ V) @ layout.part_mix
    return T.reshape(nl, parts * m, -1)


def pair_values(T: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Exact AUC of every problem from the scores T (L, rows of all parts, K) of L layers
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
    finite = torch.isfinite(T.sum((1, 2)))[:, None]  # a NaN or ±inf score (or overflow)
    return torch.where(finite, values, torch.full_like(values, float("nan")))


def fisher_values(X: torch.Tensor, layout: FisherLayout) -> torch.Tensor:
    """Per-problem values (K,) float64 of one layer's features (n, d) on the device; NaN
    when X has a non-finite entry."""
    return pair_values(pair_scores(X, layout), layout)[0]
