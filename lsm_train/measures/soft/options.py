"""Validation of the soft MD-LSM's options, features and labels (docs/loss.md).

Features become an (n, d) float tensor (maps reduced by ``reduce``) whose (min, max) is read
by the caller together with its other values; labels must be a 1-D integer vector of length
n: floating point labels and (n, 1) columns raise a ValueError (pass ``y.long()`` /
``y.reshape(-1)`` explicitly).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from lsm_train._validation import (
    _as_float,
    check_int,
    check_labels,
    check_points,
    check_positive,
    check_unit,
    to_tensor,
)
from lsm_train.features import reduce_features

RIDGE = 1e-6  # ε: ridge relative to the total variance per coordinate
BLOCK_ELEMS = 1 << 22  # max entries of one block of pairwise differences
DENSE_ELEMS = 1 << 18  # n² up to this: the dense n × n soft count (n <= 512)


def check_shrinkage(shrinkage: Any) -> float:
    return check_unit(shrinkage, "shrinkage")


def check_tau(tau: Any) -> float:
    # a plain positive float (the usual call) needs no conversion: skip the generic check
    if type(tau) is float and 0.0 < tau < math.inf:
        return tau
    return check_positive(tau, "tau")


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast: the solves and the soft counts need float32/float64 arithmetic.
    Nothing to do (and no autocast context to build, which costs more than a small solve)
    when autocast is already off for the device."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
    except (TypeError, RuntimeError):  # torch < 2.4 (no device argument), unknown device type
        pass
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast
        return contextlib.nullcontext()


def float_features(H: Any, reduce: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(n, d) float features of a valid shape and their (min, max) as 0-dim tensors, not read
    yet: the caller reads it with its other values in one host sync and passes the numbers
    to :func:`feature_scale`, which checks finiteness (NaN and inf propagate to min and max)."""
    t = to_tensor(H, "H")
    if not t.is_floating_point():
        t = _as_float(t)
    t = reduce_features(t, reduce)
    if t.ndim != 2 or 0 in t.shape:
        t = check_points(t, "H")  # raises the shape error
    t = _as_float(t)
    return t, tuple(torch.aminmax(t.detach()))


def feature_scale(t: torch.Tensor, lo: float, hi: float) -> float:
    """A power of two ``m`` from the (min, max) of :func:`float_features`: 1.0 unless max|H| is
    outside [2^-24, 2^24]; the caller works on H / m, which keeps every sum of squares finite
    even for huge finite features. S_τ is scale invariant and m is exact, so this changes
    nothing else. A NaN or inf runs the full :func:`check_points`, which raises the error."""
    top = max(-lo, hi)
    if not math.isfinite(top):
        check_points(t, "H")  # raises: NaN or inf in H
    if 0.0 < top and not (2.0**-24 <= top <= 2.0**24):
        return math.ldexp(1.0, math.frexp(top)[1])
    return 1.0


def scaled_features(H: Any, reduce: str) -> tuple[torch.Tensor, float]:
    """Validated features and their scale m (:func:`feature_scale`), read at once (one sync)."""
    t, lohi = float_features(H, reduce)
    return t, feature_scale(t, *torch.stack(lohi).tolist())



def label_vector(y: Any, n: int, *, name: str = "y", per: str = "row of H") -> torch.Tensor:
    """``y`` as a tensor (device kept) if it is a 1-D integer vector of length ``n``, else a
    ValueError: float labels and (n, 1) columns are refused, not converted. No host read."""
    t = to_tensor(y, name)
    if t.is_floating_point():
        raise ValueError(
            f"{name}: expected integer class labels, got dtype {t.dtype} (convert explicitly, "
            f"e.g. {name}.long(), if the values are whole numbers)"
        )
    if t.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D vector of {n} integer class labels, got shape "
            f"{tuple(t.shape)} (a column (n, 1)? pass {name}.reshape(-1); one-hot? pass "
            f"{name}.argmax(1))"
        )
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per {per}), got {t.shape[0]}")
    return t


def labels_tensor(
    y: Any, n: int, device: torch.device, *, name: str = "y", per: str = "row of H"
) -> tuple[torch.Tensor, bool]:
    """(int64 labels (n,) on ``device``, checked): ``checked`` is False for an int64 tensor
    already in place, whose minimum the caller reads with its other values (one host sync);
    anything else goes through :func:`check_labels` (a host read) now."""
    t = label_vector(y, n, name=name, per=per)
    if t.dtype == torch.int64 and t.device == device:
        return t, False
    return check_labels(t, n, device=device, name=name, per=per), True


def check_num_classes(num_classes: Any) -> int:
    return check_int(num_classes, "num_classes", 1)
