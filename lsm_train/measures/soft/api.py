"""The public functions of the soft MD-LSM: :func:`soft_md_lsm`, :func:`fisher_directions`,
:func:`soft_pair_score` (docs/loss.md).

For two classes A, B of a batch of features H (n × d)::

    S_τ(A, B) = (1 / |A||B|) · Σ_{a∈A, b∈B} σ( ŵ·(a − b) / τ ),     σ = logistic function,
    ŵ ∝ Σ_s⁻¹ (μ_A − μ_B),    scaled so that ŵᵀ Σ_s ŵ = 1,
    Σ_s = (1 − λ) Σ + (λ·tr Σ / d + ε·v̄) I,

Σ the pooled within-class covariance of all classes present, λ = ``shrinkage``, ε·v̄ a tiny
ridge (ε = 1e-6, v̄ the total variance per coordinate). Three implementations: the fused
in-sample node (:mod:`.fused`, CPU default for n <= 512), the recorded ops (:mod:`.reference`:
crossfit, detached directions, large batches) and the static sync-free path
(:mod:`.static`, ``num_classes=K``).
"""

from __future__ import annotations

from typing import Any

import torch

from lsm_train._validation import (
    _as_float,
    check_labels,
    check_pair,
    check_positive,
    check_scheme,
    to_tensor,
)
from lsm_train.features import reduce_features
from lsm_train.measures.soft.counts import SoftCount
from lsm_train.measures.soft.fused import FusedSoft
from lsm_train.measures.soft.layout import LabelLayout
from lsm_train.measures.soft.options import (
    BLOCK_ELEMS,
    DENSE_ELEMS,
    check_num_classes,
    check_shrinkage,
    check_tau,
    feature_scale,
    float_features,
    full_precision,
    label_vector,
    labels_tensor,
    scaled_features,
)
from lsm_train.measures.soft.reference import (
    directions,
    soft_md_lsm_crossfit,
    soft_md_lsm_tasks,
    task_rates,
)
from lsm_train.measures.soft.static import static_scores

__all__ = ["soft_md_lsm", "soft_pair_score", "fisher_directions"]


def soft_md_lsm(
    H: Any,
    y: Any,
    tau: float = 0.5,
    *,
    scheme: str = "pairwise",
    shrinkage: float = 0.1,
    detach_directions: bool = False,
    reduce: str = "auto",
    crossfit: bool = False,
    num_classes: int | None = None,
    validate: bool = True,
    layout: LabelLayout | None = None,
) -> torch.Tensor:
    """Soft MD-LSM of a batch: a 0-dim tensor in (0, 1), differentiable with respect to H.

    Args:
        H: features (n, d), or a map reduced by ``reduce`` (see :mod:`lsm_train.features`);
            tensor on any device or numpy array.
        y: integer class labels (n,) (float labels and (n, 1) columns raise).
        tau: temperature > 0, in units of within-class standard deviation; S_τ tends to the
            exact degree of the Fisher direction as tau -> 0.
        scheme: ``"pairwise"`` (mean over class pairs) or ``"ovr"`` (mean over class vs rest).
        shrinkage: λ in [0, 1], shrinkage of the pooled within-class covariance to
            (tr Σ / d)·I.
        detach_directions: stop the gradient through the directions ŵ; H still gets the
            gradient through the projections ŵ·h.
        reduce: how to reduce maps (N, C, H, W) / sequences (N, T, D) to (N, d).
        crossfit: 2-fold cross-fitted value (does not saturate when d >= n, see below).
        num_classes: K: the static, sync-free path (labels in [0, K); see docs/loss.md):
            no host read, shapes fixed by (n, d, K), ``torch.compile(fullgraph=True)`` and
            CUDA graph capture work. Not with ``detach_directions``.
        validate: with ``num_classes``, check the labels' range and the features'
            finiteness first (one host read; raises ValueError). ``False``: no check, a
            label outside [0, K) or a NaN/inf feature makes the value NaN.
        layout: a :class:`LabelLayout` of ``y`` (built once to score several layers of one
            batch without reading the labels again); ignored with ``num_classes``.

    In-sample (default), S_τ saturates at 1 whenever the batch is separable, which is always
    the case when d + 1 >= n (Cover) and nearly so for d ~ n/2, even with random labels: the
    gradient then vanishes. ``crossfit=True`` alternates the samples of each class between two
    halves (in batch order), fits ŵ (means, Σ_s) on one half, scores the pairs of the other
    half, swaps and averages the two values; random labels then give about 1/2. Classes with a
    single sample are left out; with fewer than two classes of >= 2 samples the value is 1.0.

    Returns exactly 1.0 (zero gradient) when the batch has fewer than two classes to score.
    """
    tau = check_tau(tau)
    scheme = check_scheme(scheme)
    shrinkage = check_shrinkage(shrinkage)
    if num_classes is not None:
        return _static(H, y, num_classes, tau, scheme, shrinkage, detach_directions, reduce,
                       crossfit, validate)
    X, lohi = float_features(H, reduce)
    labels, checked = labels_tensor(y, X.shape[0], X.device)
    lay = _own_layout(labels, layout)
    reads = [*lohi, lay.classes[0]] if not checked else [*lohi]
    fast = (not crossfit and lay.K >= 2 and not detach_directions and lay.n**2 <= DENSE_ELEMS
            and not torch.compiler.is_compiling())
    if not fast:
        lo, hi, *low = torch.stack([r.to(X.dtype) for r in reads]).tolist()
        _check_low(low)
        m = feature_scale(X, lo, hi)
        X = X / m if m != 1.0 else X
        with full_precision(X.device):
            if crossfit:
                return soft_md_lsm_crossfit(X, lay, tau, scheme, shrinkage, detach_directions)
            return soft_md_lsm_tasks(X, labels, tau, scheme, shrinkage, detach_directions,
                                     lay=lay).mean()
    grad = torch.is_grad_enabled() and X.requires_grad
    with full_precision(X.device):
        # compute first, check after: one host read of the call fetches min and max of X
        # (finiteness, scale), the lowest label and the Cholesky info, instead of a sync each
        status: list[torch.Tensor] = []
        value = FusedSoft.apply(X, lay, scheme, shrinkage, tau, None, grad, status)
        lo, hi, *rest = torch.stack([r.to(X.dtype) for r in [*reads, *status]]).tolist()
        _check_low(rest[: len(reads) - 2])
        m = feature_scale(X, lo, hi)  # raises on NaN or inf
        if m != 1.0 or any(rest[len(reads) - 2:]):  # rare: features beyond [2^-24, 2^24] or
            # Cholesky failed: redo on X / m, with the synchronous LU fallback
            value = FusedSoft.apply(X / m if m != 1.0 else X, lay, scheme, shrinkage, tau,
                                    None, grad)
        return value


def _own_layout(labels: torch.Tensor, layout: LabelLayout | None) -> LabelLayout:
    if layout is None:
        return LabelLayout(labels)
    if not isinstance(layout, LabelLayout):
        raise ValueError(f"layout: expected a LabelLayout or None, got {type(layout).__name__}")
    if layout.labels is not labels:
        raise ValueError("layout: expected the LabelLayout of these very labels "
                         "(LabelLayout(y), built from the same tensor y)")
    return layout


def _check_low(low: list[float]) -> None:
    if low and low[0] < 0:
        raise ValueError(f"y: expected class labels >= 0, got minimum {int(low[0])}")


def _static(H: Any, y: Any, num_classes: Any, tau: float, scheme: str, shrinkage: float,
            detach_directions: bool, reduce: str, crossfit: bool, validate: bool) -> torch.Tensor:
    K = check_num_classes(num_classes)
    if detach_directions:
        raise ValueError("detach_directions=True is not supported with num_classes "
                         "(the static path); leave num_classes=None for it")
    X = static_features(H, reduce)
    labels = static_labels(y, X.shape[0], X.device)
    if validate:
        check_static(X, labels, K)
    with full_precision(X.device):
        return static_scores([X], labels, K, tau=tau, scheme=scheme, shrinkage=shrinkage,
                             crossfit=bool(crossfit))[0][0]


def static_features(H: Any, reduce: str, name: str = "H") -> torch.Tensor:
    """(n, d) float32/float64 features of a valid shape; no host read."""
    t = to_tensor(H, name)
    t = reduce_features(t if t.is_floating_point() else _as_float(t), reduce)
    if t.ndim != 2 or 0 in t.shape:
        raise ValueError(f"{name}: expected a non-empty 2-D array (n, d) after reduce="
                         f"{reduce!r}, got shape {tuple(t.shape)}")
    return _as_float(t)


def static_labels(y: Any, n: int, device: torch.device, *, name: str = "y",
                  per: str = "row of H") -> torch.Tensor:
    """int64 labels (n,) on ``device``, type and shape checked; no host read."""
    return label_vector(y, n, name=name, per=per).to(device=device, dtype=torch.int64)


def check_static(X: torch.Tensor, labels: torch.Tensor, K: int, name: str = "y") -> None:
    """The host checks of the static path in one read: labels in [0, K), X finite."""
    lo, hi, finite = torch.stack([labels.min(), labels.max(),
                                  torch.isfinite(X).all().to(labels.dtype)]).tolist()
    if lo < 0 or hi >= K:
        raise ValueError(f"{name}: expected class labels in [0, num_classes={K}), got labels "
                         f"from {lo} to {hi}")
    if not finite:
        raise ValueError("H: expected finite values, found NaN or inf")


def fisher_directions(
    H: Any, y: Any, *, scheme: str = "pairwise", shrinkage: float = 0.1, reduce: str = "auto"
) -> tuple[torch.Tensor, list[tuple[int, int | None]], torch.Tensor]:
    """The normalized shrunk Fisher directions used by :func:`soft_md_lsm`.

    Returns ``(W, tasks, classes)``: W is d × T, column t the direction ŵ_t (ŵᵀΣ_sŵ = 1) of
    task t; ``tasks[t] = (k, l)`` (class indices into ``classes``) for pairwise, ``(k, None)``
    for ovr (class k vs the rest); ``classes`` are the sorted labels present. Differentiable.
    """
    scheme = check_scheme(scheme)
    shrinkage = check_shrinkage(shrinkage)
    X, m = scaled_features(H, reduce)
    lay = LabelLayout(check_labels(y, X.shape[0], device=X.device))
    if lay.K < 2:
        raise ValueError(
            f"y: expected at least 2 distinct classes, got {lay.K} "
            f"(labels present: {lay.classes.tolist()})"
        )
    with full_precision(X.device):
        _, W, R = directions(X / m if m != 1.0 else X, lay, scheme, shrinkage, need_w=True)
    tasks = [(k, None if l < 0 else l) for k, l in lay.tasks(scheme)]
    return lay.combine(W, scheme) * (task_rates(R, lay, scheme) / m), tasks, lay.classes



def soft_pair_score(a: Any, b: Any, w: Any, tau: float = 0.5) -> torch.Tensor:
    """Logistic soft AUC of a fixed direction: mean over a∈A, b∈B of σ(w·(a − b) / τ).

    ``w`` is used as given (its scale acts like 1/τ); differentiable in A, B and w. As tau ->
    0 it tends to the Mann–Whitney AUC of the scores w·x (ties count 1/2). Returns a 0-dim
    tensor in (0, 1).
    """
    tau = check_positive(tau, "tau")
    A, B = check_pair(a, b)
    wt = to_tensor(w, "w")
    if wt.ndim == 2 and 1 in wt.shape:
        wt = wt.reshape(-1)
    if wt.ndim != 1 or wt.shape[0] != A.shape[1]:
        raise ValueError(
            f"w: expected a direction of shape ({A.shape[1]},), got shape {tuple(wt.shape)}"
        )
    if not wt.is_floating_point():
        wt = _as_float(wt)
    if not bool(torch.isfinite(wt).all()):
        raise ValueError("w: expected finite values, found NaN or inf")
    if wt.device != A.device:
        raise ValueError(
            f"w must be on the same device as A and B: w on {wt.device}, A on {A.device}"
        )
    dtype = torch.promote_types(A.dtype, wt.dtype)
    wt = wt.to(dtype)
    with full_precision(A.device):
        pa = (A.to(dtype) @ wt) / tau
        pb = (B.to(dtype) @ wt) / tau
        step = max(1, BLOCK_ELEMS // pb.numel())  # blocks of rows of A
        total = sum(
            SoftCount.apply(pa[None, i : i + step], pb[None])[0]
            for i in range(0, pa.numel(), step)
        )
    return (total / (pa.numel() * pb.numel())).clamp(0.0, 1.0)
