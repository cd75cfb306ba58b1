"""Layer score: the multi-class MD-LSM of one hidden layer (DESIGN §2, "Layer score").

Features H (n × d, or a conv map / token sequence reduced by ``reduce``, see
:mod:`lsm_train.features`) and integer labels y with K >= 2 classes:

* ``scheme="pairwise"``: the mean of m(class i, class j) over the K(K−1)/2 pairs i < j;
* ``scheme="ovr"``: the mean of m(class c, rest) over the K classes.

``method`` picks m: ``"degree"`` (:func:`~lsm_train.measures.degree.md_lsm`, in [0.5, 1]),
``"margin"`` (:func:`~lsm_train.measures.margin.md_lsm_margin`, the distance between the
hulls, in the features' units) or ``"soft"`` (:func:`~lsm_train.surrogate.soft_md_lsm`,
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
the rest. Directions are fitted, as above, on the first part and their AUC — with the
fitted orientation, *not* flipped, so it can fall below 0.5 — is computed exactly on the
second part; then the parts swap roles and the two AUCs are averaged. This estimates
out-of-sample separability: it stays near 0.5 for random labels even when d >= n, where
the in-sample degree saturates at 1 (Cover's theorem). Classes with fewer than 2 samples
cannot be split: they are left out of the cross-fitted score (pairs involving them are
dropped, and for ``ovr`` their samples are dropped from "rest") with a ``UserWarning``;
fewer than 2 splittable classes raise ValueError. ``holdout`` is only defined for
``method="degree"``.

``return_details=True`` returns ``(score, details)`` with ``details["pairs"]`` =
{(i, j): value} (pairwise, i < j class labels) or {(c, "rest"): value} (ovr),
``details["classes"]`` the sorted class labels used, and ``details["skipped"]`` the classes
left out (cross-fitting only). The score is the plain mean of ``details["pairs"]``. For
``method="soft"`` the per-pair values are the surrogate on the samples of that pair alone
(its own pooled covariance), so their mean can differ slightly from the score.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._validation import _as_float, check_features_labels, check_fraction, to_tensor
from ..features import reduce_features
from .degree import _auc2_counts, _fit, _int_arg, _scores

__all__ = ["layer_separability", "METHODS", "SCHEMES"]

METHODS = ("degree", "margin", "soft")
SCHEMES = ("pairwise", "ovr")
_ALPHAS = (1e-6, 0.1, 1.0)  # shrinkage-LDA candidates (1.0: mean difference)


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
        u2 = int(_auc2_counts(_scores(X[ia], W[:, k]), _scores(X[ib], W[:, k])))
        total = 2 * ia.numel() * ib.numel()
        if orient:
            u2 = max(u2, total - u2)
        out.append(u2 / total)
    return out


def _degree(X, labels, scheme, holdout, seed, fit_kw):
    classes = torch.unique(labels).tolist()
    index = {c: (labels == c).nonzero().reshape(-1) for c in classes}
    if holdout is None:
        keys, pairs = _tasks(classes, index, scheme)
        W = _fit(X, [index[c] for c in classes], pairs, seed=seed, **fit_kw)
        return keys, _auc_values(X, W, pairs, orient=True), classes, []

    skipped = [c for c in classes if index[c].numel() < 2]
    classes = [c for c in classes if index[c].numel() >= 2]
    if skipped:
        warnings.warn(
            f"layer_separability(holdout={holdout}): classes {skipped} have fewer than 2 "
            "samples and cannot be split; they are left out of the cross-fitted score",
            UserWarning,
            stacklevel=3,
        )
    if len(classes) < 2:
        raise ValueError(
            f"holdout: cross-fitting needs at least 2 classes with >= 2 samples each, got "
            f"{len(classes)} (class sizes: "
            f"{ {c: int(index[c].numel()) for c in classes + skipped} })"
        )
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[dict[int, torch.Tensor]] = [{}, {}]
    for c in classes:
        idx = index[c]
        perm = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
        k = min(max(round(holdout * idx.numel()), 1), idx.numel() - 1)
        parts[0][c], parts[1][c] = perm[:k], perm[k:]

    sums = None
    for fit_part, eval_part in ((parts[0], parts[1]), (parts[1], parts[0])):
        values = []
        for part in (fit_part, eval_part):
            rows = torch.cat([part[c] for c in classes])
            local = {}
            start = 0
            for c in classes:
                local[c] = torch.arange(start, start + part[c].numel(), device=X.device)
                start += part[c].numel()
            keys, pairs = _tasks(classes, local, scheme)
            values.append((X[rows], pairs, [local[c] for c in classes]))
        (Xf, pairs_f, groups_f), (Xe, pairs_e, _) = values
        W = _fit(Xf, groups_f, pairs_f, seed=seed, **fit_kw)
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
) -> float | tuple[float, dict]:
    """Multi-class MD-LSM of a layer's features (module docstring has the definitions).

    Args:
        H: (n, d) features, (n, C, H, W) conv maps or (n, T, D) token sequences; torch
            tensor (any device) or numpy array.
        y: integer class labels >= 0, shape (n,), at least two classes.
        method: ``"degree"``, ``"margin"`` or ``"soft"``.
        scheme: ``"pairwise"`` (mean over class pairs) or ``"ovr"`` (class vs rest).
        holdout: None (in-sample) or a fraction in (0, 1): cross-fitted degree.
        reduce: how to reduce maps/sequences to vectors (see :mod:`lsm_train.features`).
        return_details: also return the per-pair values (see module docstring).
        seed: seeds the subsampling of the ascent and the holdout split.
        max_iter, subsample: work of the degree's ascent per problem (0: candidates only).

    Returns the score (float), or ``(score, details)``.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if holdout is not None:
        if method != "degree":
            raise ValueError(
                f"holdout: cross-fitting is only defined for method='degree' (directions "
                f"fitted on one part, scored on the other); got method={method!r} with "
                f"holdout={holdout!r}. Use holdout=None."
            )
        holdout = check_fraction(holdout, "holdout")
    fit_kw = {
        "alphas": _ALPHAS,
        "n_random": 0,
        "n_starts": 1,
        "max_iter": _int_arg(max_iter, "max_iter", 0),
        "subsample": _int_arg(subsample, "subsample", 2),
    }
    X, labels = check_features_labels(_features(H, reduce), y)
    skipped: list[int] = []

    if method == "degree":
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
            from ..surrogate import soft_md_lsm

            score = float(soft_md_lsm(X, labels, scheme=scheme))
            if not return_details:
                return score
            values = []
            for a, b in pairs:
                rows = torch.cat([a, b])
                yy = torch.cat([torch.ones_like(a), torch.zeros_like(b)])
                values.append(float(soft_md_lsm(X[rows], yy)))
            return score, {"pairs": dict(zip(keys, values, strict=True)), "classes": classes,
                           "skipped": [], "method": method, "scheme": scheme,
                           "holdout": holdout}

    score = float(sum(values) / len(values))
    if not return_details:
        return score
    return score, {
        "pairs": dict(zip(keys, values, strict=True)),
        "classes": classes,
        "skipped": skipped,
        "method": method,
        "scheme": scheme,
        "holdout": holdout,
    }
