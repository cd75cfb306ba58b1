"""Reduce a layer's output to one feature vector per sample.

``reduce`` (docs/loss.md, the soft measure's ``reduce`` option):

* ``"auto"``       (N, d) as is; (N, C, H, W) and other (N, C, *spatial) maps -> global
                   average pool over the spatial axes; (N, T, D) token sequences -> token mean.
* ``"avgpool"``    mean over every axis after the channel axis 1.
* ``"flatten"``    (N, -1).
* ``"token_mean"`` mean over axis 1 of an (N, T, D) sequence.
* ``"cls"``        token 0 of an (N, T, D) sequence (the class token).

Note the ambiguity of 3-D inputs: ``"auto"`` treats (N, A, B) as a token sequence
(N, T, D) (transformer convention); pass ``reduce="avgpool"`` for 1-D conv maps (N, C, L).
"""

from __future__ import annotations

import torch

from lsm_train._validation import check_choice

__all__ = ["REDUCTIONS", "reduce_features"]

REDUCTIONS = ("auto", "avgpool", "flatten", "token_mean", "cls")


def reduce_features(H: torch.Tensor, reduce: str = "auto") -> torch.Tensor:
    """Return an (N, d) view/reduction of ``H`` (differentiable; no copy for 2-D input)."""
    check_choice(reduce, "reduce", REDUCTIONS)
    if not isinstance(H, torch.Tensor):
        raise ValueError(f"H: expected a tensor here, got {type(H).__name__}")
    if H.ndim < 2:
        raise ValueError(
            f"H: expected at least 2 dimensions (N, d, ...), got shape {tuple(H.shape)}"
        )
    if reduce == "auto":
        if H.ndim == 2:
            return H
        reduce = "token_mean" if H.ndim == 3 else "avgpool"
    if reduce == "flatten":
        return H.reshape(H.shape[0], -1)
    if reduce == "avgpool":
        return H if H.ndim == 2 else H.flatten(2).mean(dim=2)
    if H.ndim != 3:
        raise ValueError(
            f"reduce={reduce!r} expects a token sequence (N, T, D), got shape {tuple(H.shape)}"
        )
    return H.mean(dim=1) if reduce == "token_mean" else H[:, 0]
