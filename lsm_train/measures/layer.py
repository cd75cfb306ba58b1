"""Layer score: the multi-class MD-LSM of one hidden layer (docs: ``docs/monitor.md``).

Features H (n × d, or a conv map / token sequence reduced by ``reduce``, see
:mod:`lsm_train.features`) and integer labels y with K >= 2 classes:

* ``scheme="pairwise"``: the mean of m(class i, class j) over the K(K−1)/2 pairs i < j;
* ``scheme="ovr"``: the mean of m(class c, rest) over the K classes.

``method`` picks m: ``"degree"`` (:func:`~lsm_train.measures.degree.md_lsm`, in [0.5, 1]),
``"fisher"`` (:mod:`~lsm_train.measures.fisher`: the exact AUC of the shrunk Fisher direction
of each problem, all problems from one factorization and one sort — the fast monitoring
score; in-sample a lower bound of the degree, cross-fitted with the degree's split),
``"margin"`` (:func:`~lsm_train.measures.margin.md_lsm_margin`, the distance between the
hulls, in the features' units) or ``"soft"`` (:func:`~lsm_train.measures.soft.soft_md_lsm`,
the differentiable surrogate at its default temperature; returned as a float).

**Degree, in-sample** (``holdout=None``). All class problems are solved together: the
within-class covariance is pooled over all K classes and factorized once per layer (d × d
when d <= n; when d > n everything runs in the span of the centred features via the n × n
Gram matrix, never a d × d matrix); the candidate directions (shrinkage-LDA with α = 1e-6
and 0.1, mean difference) of every problem are scored exactly, the best one is refined by a
batched soft-AUC ascent (``max_iter`` steps, each on a fresh sample of ``subsample`` points
per side), and the best direction per problem is scored exactly on *all* its points.
Each value is therefore the exact AUC of a concrete direction — a lower bound on m — and
1.0 only when that direction strictly
separates the pair (no LP is run here; use ``md_lsm(..., certify=True)`` on a pair to decide
separability exactly).

**Degree, cross-fitted** (``holdout=f``). The samples of each class are split at random
(seeded, stratified) into a part of round(f·n_c) samples (at least 1, at most n_c − 1) and
the rest. One direction per problem is fitted on the first part and its AUC — with the
fitted orientation, *not* flipped, so it can fall below 0.5 — is computed exactly on the
second part; then the parts swap roles and the two AUCs are averaged. This estimates
out-of-sample separability: it stays near 0.5 for random labels even when d >= n, where
the in-sample degree saturates at 1 (Cover's theorem).

The fitted direction is the shrinkage-LDA Σ_α⁻¹(μ_A − μ_B) (Σ pooled over the classes of
the fitting part) with one α per layer chosen *from the fitting part alone*: a stratified
inner 2-fold split of that part scores every α of {Ledoit–Wolf, 1, 0.3, 0.1, 0.03, 0.01,
1e-3} by its held-out AUC (mean over problems and both inner folds); the best α (ties: the
more regularized) is then refitted on the whole fitting part. There is no selection by
in-sample AUC and no ascent here (``max_iter``/``subsample`` only act in-sample): when the
fitting part has about as many rows as the layer has dimensions, several candidates
separate it perfectly, and picking among them in-sample favoured the nearly unregularized
LDA, whose held-out AUC is poor — a dip of the score at n_fit ≈ d. The same rule runs on
the primal (d <= n_fit) and the span (d > n_fit) path, which give the same direction for a
given α. Classes with fewer than 2 samples
cannot be split: they are left out of the cross-fitted score (pairs involving them are
dropped, and for ``ovr`` their samples are dropped from "rest") with a ``UserWarning``;
fewer than 2 splittable classes raise ValueError. ``holdout`` is only defined for
``method="degree"`` and ``method="fisher"``.

**Aggregate.** ``aggregate="mean"`` (default, the paper's score) averages the per-problem
values; ``aggregate="worst"`` is the hard-pair score
(:func:`~lsm_train.measures.hard_pairs.hard_pair_score`): the mean of the ``worst_k``
smallest values (default ⌈P/10⌉ of the P problems, the worst decile).

``return_details=True`` returns ``(score, details)`` with ``details["pairs"]`` =
{(i, j): value} (pairwise, i < j class labels) or {(c, "rest"): value} (ovr),
``details["classes"]`` the sorted class labels used, ``details["skipped"]`` the classes
left out (cross-fitting only), and ``details["aggregate"]`` / ``details["worst_k"]`` (the k
used, None for the mean). The score is the mean (or the worst-k mean) of
``details["pairs"]``. For ``method="soft"`` the per-pair values are the surrogate on the
samples of that pair alone (its own pooled covariance), so with ``aggregate="mean"`` their
mean can differ slightly from the score; the worst-k score is computed from them.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import (
    SCHEMES,
    _as_float,
    check_choice,
    check_features_labels,
    check_fraction,
    check_int,
    check_scheme,
    to_tensor,
)
from ..features import reduce_features
from .directions import Problems, auc2_counts, exact_u2, fit_directions, row_scores
from .fisher import FisherLayout, crossfit_classes, fisher_values, stratified_split
from .hard_pairs import AGGREGATES, hard_pair_score, resolve_k
from .soft import soft_md_lsm

__all__ = ["layer_separability", "METHODS", "SCHEMES"]

METHODS = ("degree", "fisher", "margin", "soft")
_ALPHAS = (1e-6, 0.1, 1.0)  # shrinkage-LDA candidates (1.0: mean difference)
# cross-fitting: shrinkage grid for the inner split, most regularized first ("lw": the
# analytic Ledoit–Wolf intensity of the fitting part)
_HOLDOUT_ALPHAS: tuple[float | str, ...] = ("lw", 1.0, 0.3, 0.1, 0.03, 0.01, 1e-3)


def _features(H: Any, reduce: str) -> torch.Tensor:
    t = to_tensor(H, "H")
    if not t.is_floating_point():
        t = _as_float(t)
    return reduce_features(t.detach(), reduce)


def _tasks(classes: list[int], index: dict[int, torch.Tensor], scheme: str):
    """(keys, [(A rows, B rows)]) of every class problem."""
    if scheme == "pairwise":
        keys = [(i, j) for k, i in enumerate(classes) for j in classes[k + 1:]]
        return keys, [(index[i], index[j]) for i, j in keys]
    keys = [(c, "rest") for c in classes]
    rows = [(index[c], torch.cat([index[o] for o in classes if o != c])) for c in classes]
    return keys, rows


def _auc_values(X: torch.Tensor, W: torch.Tensor, pairs, *, orient: bool) -> list[float]:
    """Exact AUC of direction W[:, k] for problem k on the rows of X (row-consistent float64
    scores, so tied points stay tied)."""
    out = []
    for k, (ia, ib) in enumerate(pairs):
        u2 = int(auc2_counts(row_scores(X[ia], W[:, k]), row_scores(X[ib], W[:, k])))
        total = 2 * ia.numel() * ib.numel()
        if orient:
            u2 = max(u2, total - u2)
        out.append(u2 / total)
    return out


def _stack(X: torch.Tensor, part: dict, classes: list[int], scheme: str):
    """Rows of ``part`` stacked class by class: (X rows, problems, class groups, keys)."""
    rows = torch.cat([part[c] for c in classes])
    local, start = {}, 0
    for c in classes:
        local[c] = torch.arange(start, start + part[c].numel(), device=X.device)
        start += part[c].numel()
    keys, pairs = _tasks(classes, local, scheme)
    return X[rows], pairs, [local[c] for c in classes], keys


def _choose_alpha(X, part: dict, classes: list[int], scheme: str, gen) -> float | str:
    """Shrinkage of the cross-fitted direction, chosen on the fitting part alone: a
    stratified inner 2-fold split of ``part``; every α of ``_HOLDOUT_ALPHAS`` is fitted on one
    inner half and its (unflipped) AUC measured on the other, both ways; the α with the best
    mean inner held-out AUC over all problems wins (ties: the earlier, more regularized
    entry). Falls back to Ledoit–Wolf when the part is too small to split (fewer than 2
    classes with >= 2 rows)."""
    ok = [c for c in classes if part[c].numel() >= 2]
    if len(ok) < 2:
        return "lw"
    inner = stratified_split(part, ok, 0.5, gen)
    score = torch.zeros(len(_HOLDOUT_ALPHAS), dtype=torch.float64)
    for a, b in ((inner[0], inner[1]), (inner[1], inner[0])):
        Xa, pairs_a, groups_a, _ = _stack(X, a, ok, scheme)
        Xb, pairs_b, _, _ = _stack(X, b, ok, scheme)
        W = fit_directions(Xa, groups_a, pairs_a, alphas=_HOLDOUT_ALPHAS, n_random=0,
                           n_starts=0, max_iter=0, subsample=2, seed=0, select=False)  # (d, K, C)
        P = Problems.build(pairs_b, X.device)
        u2 = exact_u2(Xb, W.permute(1, 0, 2).contiguous(), P)  # (K, C)
        score += (u2.double() / (2 * P.na * P.nb).double()[:, None]).mean(0).cpu()
    return _HOLDOUT_ALPHAS[int(torch.argmax(score))]


def _degree(X, labels, scheme, holdout, seed, fit_kw):
    classes = torch.unique(labels).tolist()
    index = {c: (labels == c).nonzero().reshape(-1) for c in classes}
    if holdout is None:
        keys, pairs = _tasks(classes, index, scheme)
        W = fit_directions(X, [index[c] for c in classes], pairs, seed=seed, **fit_kw)
        return keys, _auc_values(X, W, pairs, orient=True), classes, []

    classes, skipped = crossfit_classes(index, classes, holdout, stacklevel=4)
    gen = torch.Generator().manual_seed(int(seed))
    parts = stratified_split(index, classes, holdout, gen)

    sums = None
    for fit_part, eval_part in ((parts[0], parts[1]), (parts[1], parts[0])):
        Xf, pairs_f, groups_f, keys = _stack(X, fit_part, classes, scheme)
        Xe, pairs_e, _, _ = _stack(X, eval_part, classes, scheme)
        alpha = _choose_alpha(X, fit_part, classes, scheme, gen)
        W = fit_directions(Xf, groups_f, pairs_f, alphas=(alpha,), n_random=0, n_starts=0,
                           max_iter=0, subsample=2, seed=seed)
        auc = _auc_values(Xe, W, pairs_e, orient=False)
        sums = auc if sums is None else [s + a for s, a in zip(sums, auc, strict=True)]
    return keys, [s / 2 for s in sums], classes, skipped


def layer_separability(
    H: Any,
    y: Any,
    method: str = "degree",
    scheme: str = "pairwise",
    holdout: float | None = None,
    reduce: str = "auto",
    return_details: bool = False,
    seed: int = 0,
    *,
    max_iter: int = 30,
    subsample: int = 128,
    aggregate: str = "mean",
    worst_k: int | None = None,
) -> float | tuple[float, dict]:
    """Multi-class MD-LSM of a layer's features (module docstring has the definitions).

    Args:
        H: (n, d) features, (n, C, H, W) conv maps or (n, T, D) token sequences; torch
            tensor (any device) or numpy array.
        y: integer class labels >= 0, shape (n,), at least two classes.
        method: ``"degree"``, ``"fisher"``, ``"margin"`` or ``"soft"``.
        scheme: ``"pairwise"`` (mean over class pairs) or ``"ovr"`` (class vs rest).
        holdout: None (in-sample) or a fraction in (0, 1): cross-fitted degree.
        reduce: how to reduce maps/sequences to vectors (see :mod:`lsm_train.features`).
        return_details: also return the per-pair values (see module docstring).
        seed: seeds the subsampling of the ascent and the holdout splits.
        max_iter, subsample: work of the degree's ascent per problem (0: candidates only);
            in-sample only (the cross-fitted score does not use the ascent).
        aggregate: ``"mean"`` (over the class problems) or ``"worst"`` (the mean of the
            ``worst_k`` smallest problem values, the hard-pair score).
        worst_k: k of ``aggregate="worst"``, an integer >= 1 (None: ⌈P/10⌉ of P problems;
            more than P: all, i.e. the mean).

    Returns the score (float), or ``(score, details)``.
    """
    check_choice(method, "method", METHODS)
    check_scheme(scheme)
    if holdout is not None:
        if method not in ("degree", "fisher"):
            raise ValueError(
                f"holdout: cross-fitting is only defined for method='degree' or 'fisher' "
                f"(directions fitted on one part, scored on the other); got method={method!r}"
                f" with holdout={holdout!r}. Use holdout=None."
            )
        holdout = check_fraction(holdout, "holdout")
    check_choice(aggregate, "aggregate", AGGREGATES)
    if worst_k is not None:
        resolve_k(worst_k, 1)  # type and range check before any work
        if aggregate != "worst":
            raise ValueError(f"worst_k: only used with aggregate='worst', got worst_k="
                             f"{worst_k!r} with aggregate={aggregate!r}")
    fit_kw = {
        "alphas": _ALPHAS,
        "n_random": 0,
        "n_starts": 1,
        "max_iter": check_int(max_iter, "max_iter", 0),
        "subsample": check_int(subsample, "subsample", 2),
    }
    X, labels = check_features_labels(_features(H, reduce), y)
    skipped: list[int] = []

    if method == "fisher":
        layout = FisherLayout(labels, scheme, holdout, seed, device=X.device)
        keys, classes, skipped = layout.keys, layout.classes, layout.skipped
        values = fisher_values(X, layout).tolist()
    elif method == "degree":
        keys, values, classes, skipped = _degree(
            X.double(), labels, scheme, holdout, seed, fit_kw
        )
    else:
        classes = torch.unique(labels).tolist()
        index = {c: (labels == c).nonzero().reshape(-1) for c in classes}
        keys, pairs = _tasks(classes, index, scheme)
        if method == "margin":
            from .margin import md_lsm_margin

            values = [float(md_lsm_margin(X[a], X[b])) for a, b in pairs]
        else:
            score = float(soft_md_lsm(X, labels, scheme=scheme))
            if not return_details and aggregate == "mean":
                return score
            values = [_soft_pair(X, a, b) for a, b in pairs]
            if aggregate == "worst":
                score = hard_pair_score(values, worst_k)
            if not return_details:
                return score
            return score, _details(keys, values, classes, [], method, scheme, holdout,
                                   aggregate, worst_k)

    if aggregate == "worst":
        score = hard_pair_score(values, worst_k)
    else:
        score = float(sum(values) / len(values))
    if not return_details:
        return score
    return score, _details(keys, values, classes, skipped, method, scheme, holdout, aggregate,
                           worst_k)


def _soft_pair(X: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """The surrogate on the samples of one problem alone."""
    rows = torch.cat([a, b])
    yy = torch.cat([torch.ones_like(a), torch.zeros_like(b)])
    return float(soft_md_lsm(X[rows], yy))


def _details(keys, values, classes, skipped, method, scheme, holdout, aggregate, worst_k):
    return {
        "pairs": dict(zip(keys, values, strict=True)),
        "classes": classes,
        "skipped": skipped,
        "method": method,
        "scheme": scheme,
        "holdout": holdout,
        "aggregate": aggregate,
        "worst_k": resolve_k(worst_k, len(values)) if aggregate == "worst" else None,
    }
