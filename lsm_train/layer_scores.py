"""The per-layer soft scores of one batch, for :class:`lsm_train.loss.LSMLoss` and
:func:`lsm_train.loss.lsm_loss` (docs/loss.md): label checks, the reference path (one
:class:`LabelLayout` for every layer), the static path (every layer in one batched call),
the weighted sum and the DDP gather.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from lsm_train.distributed import all_gather_cat
from lsm_train.measures.soft import LabelLayout, soft_md_lsm, static_scores
from lsm_train.measures.soft.api import static_features
from lsm_train.measures.soft.options import full_precision, label_vector

__all__ = ["batch_labels", "check_label_range", "combine", "gather_ranks", "reference_scores",
           "static_layer_scores"]


def batch_labels(labels: Any, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """int64 labels (n,) on the features' device, one per sample of every layer's batch;
    type and shape checked without a host read (float labels and (n, 1) columns raise)."""
    for name, f in feats.items():
        if f.ndim < 2:
            raise ValueError(
                f"features[{name!r}]: expected a batch (N, d, ...), got shape {tuple(f.shape)}"
            )
    sizes = {name: f.shape[0] for name, f in feats.items()}
    first = next(iter(sizes))
    y = label_vector(labels, sizes[first], name="labels",
                     per=f"sample of the batch seen by layer {first!r}")
    for name, n in sizes.items():
        if n != y.shape[0]:
            raise ValueError(
                f"labels: expected {n} labels, one per sample of the batch seen by "
                f"layer {name!r}, got {y.shape[0]}"
            )
    return y.to(device=feats[first].device, dtype=torch.int64)


def check_label_range(y: torch.Tensor, num_classes: int | None) -> None:
    """Labels >= 0 (and < num_classes): one host read."""
    lo, hi = torch.stack([y.min(), y.max()]).tolist()
    if lo < 0:
        raise ValueError(f"labels: expected class labels >= 0, got minimum {lo}")
    if num_classes is not None and hi >= num_classes:
        raise ValueError(f"labels: expected class labels in [0, num_classes={num_classes}), "
                         f"got maximum {hi}")


def reference_scores(
    feats: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    tau: float,
    scheme: str,
    shrinkage: float,
    detach_directions: bool,
    reduce: str,
    crossfit: bool = False,
    nan_if_not_finite: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({layer: S_l} (0-dim tensors attached to the graph), degenerate): the reference path,
    one :class:`LabelLayout` for every layer of the batch. ``degenerate`` (0-dim bool on the
    device) is True when the batch has fewer than two classes to score.

    Non-finite features raise (soft_md_lsm's check) unless ``nan_if_not_finite``: then
    S_l = NaN, still attached to the graph, so a diverged model gives a NaN loss."""
    layout = LabelLayout(y)
    out = {}
    for name, f in feats.items():
        if f.dtype in (torch.float16, torch.bfloat16):
            f = f.float()
        try:  # soft_md_lsm turns autocast off itself and checks finiteness in its own pass
            out[name] = soft_md_lsm(
                f, y, tau, scheme=scheme, shrinkage=shrinkage,
                detach_directions=detach_directions, reduce=reduce, crossfit=crossfit,
                layout=layout,
            )
        except ValueError:
            if not nan_if_not_finite or bool(torch.isfinite(f).all()):
                raise
            out[name] = f.sum() * float("nan")  # still attached to the graph
    scored = (layout.count_t >= 2).sum() if crossfit else layout.count_t.new_tensor(layout.K)
    return out, scored < 2


def static_layer_scores(
    feats: Mapping[str, torch.Tensor], y: torch.Tensor, num_classes: int, tau: float,
    scheme: str, shrinkage: float, reduce: str, crossfit: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """As :func:`_scores` on the static path: every layer in one batched call, no host read;
    a non-finite layer gives NaN."""
    X = [static_features(f.float() if f.dtype in (torch.float16, torch.bfloat16) else f,
                         reduce, name=f"features[{n!r}]") for n, f in feats.items()]
    dtype = functools.reduce(torch.promote_types, [x.dtype for x in X])
    with full_precision(X[0].device):
        values, degenerate = static_scores(
            [x.to(dtype) for x in X], y, num_classes, tau=tau, scheme=scheme,
            shrinkage=shrinkage, crossfit=crossfit)
    return dict(zip(feats, values.unbind(0), strict=True)), degenerate


def combine(scores: dict[str, torch.Tensor], alphas: list[float]) -> torch.Tensor:
    terms = [a * (1.0 - s) for a, s in zip(alphas, scores.values(), strict=True)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t.to(total.device)
    return total


def gather_ranks(
    feats: Mapping[str, torch.Tensor], y: torch.Tensor, group: Any
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Features and labels of every rank, concatenated in rank order (local part keeps grad)."""
    out = {n: all_gather_cat(f, group, interleave=True) for n, f in feats.items()}
    return out, all_gather_cat(y, group, interleave=True)
