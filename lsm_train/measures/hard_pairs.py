"""Hard-pair layer score: the mean of the worst k class-problem values (docs: ``docs/measures.md``).

The paper's layer score is the mean of m over all K(K−1)/2 class pairs; with many classes the
easy pairs (m ≈ 1) dominate it, so a layer whose few confusable pairs improve barely moves the
mean. The hard-pair score keeps the per-problem values ``layer_separability`` computes and
averages only the k smallest:

    hard_k = (1/k) · Σ_{r=1..k} v_(r),   v_(1) <= v_(2) <= ... the sorted problem values.

* ``k`` defaults to :func:`default_worst_k` = ⌈P/10⌉ for P problems: the worst decile
  (at least one problem). K=2 (one pair) gives that pair; 10 classes pairwise (45 pairs)
  give the mean of the worst 5; ovr with 10 classes the worst class.
* ``k >= P`` gives the plain mean (the paper's score); ``k = 1`` the minimum.
* A NaN value (a layer with non-finite features) makes the score NaN, as it makes the mean.
* Works for every method (``degree``, ``fisher``, ``margin``, ``soft``) and both schemes: the
  input is the per-problem values, as a ``details`` dict of ``layer_separability(...,
  return_details=True)``, a ``{problem: value}`` mapping, a sequence, or a tensor
  ``(..., P)`` (then reduced over the last axis on its device, without a host read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["hard_pair_score", "default_worst_k", "worst_k_mean", "AGGREGATES"]

AGGREGATES = ("mean", "worst")
WORST_FRACTION = 0.1  # default share of the problems the hard-pair score averages


def default_worst_k(n_problems: int) -> int:
    """⌈n_problems / 10⌉, at least 1: the worst decile of the class problems."""
    n = _check_k(n_problems, "n_problems")
    return max(1, math.ceil(n * WORST_FRACTION - 1e-9))


def _check_k(k: Any, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {k!r}")
    return int(k)


def resolve_k(k: int | None, n_problems: int) -> int:
    """The number of problems averaged: ``k`` (checked) or the default, at most ``n_problems``."""
    k = default_worst_k(n_problems) if k is None else _check_k(k, "k")
    return min(k, n_problems)


def worst_k_mean(values: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Mean of the k smallest entries along the last axis of ``values`` (..., P); NaN where a
    row holds a NaN. Stays on the tensor's device (no host read)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values: expected a torch.Tensor, got {type(values).__name__}")
    if values.ndim == 0 or values.shape[-1] == 0:
        raise ValueError(f"values: expected at least one problem value, got shape "
                         f"{tuple(values.shape)}")
    if not values.is_floating_point():
        values = values.double()
    kk = resolve_k(k, values.shape[-1])
    low = torch.topk(values, kk, dim=-1, largest=False, sorted=False).values.mean(-1)
    nan = torch.isnan(values).any(-1)
    return torch.where(nan, torch.full_like(low, math.nan), low)


def _number(v: Any) -> float:
    if isinstance(v, (bool, str, bytes)) or getattr(v, "ndim", 0) != 0:
        raise TypeError(f"values: expected numbers, got {v!r} ({type(v).__name__})")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"values: expected numbers, got {v!r} ({type(v).__name__})") from None


def _problem_values(values: Any) -> list[float]:
    """The per-problem numbers of a details dict, a mapping or a sequence."""
    if isinstance(values, Mapping):
        pairs = values["pairs"] if "pairs" in values else values
        if not isinstance(pairs, Mapping):
            raise TypeError(f"values['pairs']: expected a mapping {{problem: value}}, got "
                            f"{type(pairs).__name__}")
        items = list(pairs.values())
    elif isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            "values: expected layer_separability details, a {problem: value} mapping or a "
            f"sequence of numbers, got {type(values).__name__}"
        )
    else:
        items = list(values)
    out = [_number(v) for v in items]
    if not out:
        raise ValueError("values: expected at least one problem value, got none")
    return out


def hard_pair_score(values: Any, k: int | None = None) -> float | torch.Tensor:
    """The mean of the ``k`` smallest per-problem values (default ⌈P/10⌉; module docstring).

    Args:
        values: ``details`` of ``layer_separability(..., return_details=True)`` (its
            ``"pairs"`` are used), a ``{problem: value}`` mapping, a sequence of numbers, or
            a tensor ``(..., P)`` (reduced over the last axis, returned as a tensor).
        k: how many of the smallest values to average, an integer >= 1 (more than P: all).

    Returns a float (a tensor for tensor input); NaN when a value is NaN.
    """
    if isinstance(values, torch.Tensor):
        return worst_k_mean(values, k)
    return float(worst_k_mean(torch.tensor(_problem_values(values), dtype=torch.float64), k))
