"""Input checking shared by every public function.

Every public entry point accepts torch tensors (any device) or numpy arrays (or nested
lists). Bad input raises a ValueError that says what was wrong and what was expected.
Validated tensors keep the caller's device; floating point is promoted to at least
float32 (float64 inputs stay float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "to_tensor",
    "check_points",
    "check_pair",
    "check_labels",
    "check_features_labels",
    "check_positive",
    "check_fraction",
    "check_int",
    "check_unit",
    "check_scheme",
    "check_choice",
    "SCHEMES",
]

SCHEMES = ("pairwise", "ovr")  # class problems of a layer score: pairs i < j, or c vs rest


def to_tensor(x: Any, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a tensor (no copy for tensors of the right dtype).

    numpy arrays and nested lists become CPU tensors; tensors keep their device.
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise ValueError(f"{name}: expected a numeric array, got a numpy array of objects")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}"
            ) from err
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected real numbers, got dtype {t.dtype}")
    if dtype is not None:
        t = t.to(dtype)
    return t


def _as_float(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.to(torch.float64 if t.dtype in (torch.int64, torch.int32) else torch.float32)


def check_points(x: Any, name: str, *, min_rows: int = 1) -> torch.Tensor:
    """A finite 2-D float tensor with at least ``min_rows`` rows (one point per row)."""
    t = to_tensor(x, name)
    if t.ndim == 1:
        raise ValueError(
            f"{name}: expected a 2-D array of points (n, d), got a 1-D array of shape "
            f"{tuple(t.shape)}; use x.reshape(-1, 1) for 1-D points"
        )
    if t.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array of points (n, d), got shape {tuple(t.shape)}"
        )
    if t.shape[0] < min_rows:
        raise ValueError(
            f"{name}: expected at least {min_rows} point(s), got an empty set of shape "
            f"{tuple(t.shape)}"
            if t.shape[0] == 0
            else f"{name}: expected at least {min_rows} points, got {t.shape[0]}"
        )
    if t.shape[1] == 0:
        raise ValueError(
            f"{name}: expected points with at least one coordinate, got shape {tuple(t.shape)}"
        )
    t = _as_float(t)
    # a finite sum proves every entry finite (one reduction, no n x d mask); an infinite
    # or NaN sum (a non-finite entry, or an overflow of large finite ones) checks exactly
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name}: expected finite values, found NaN or inf in {bad} row(s)")
    return t


def check_pair(A: Any, B: Any, *, min_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two validated point sets with the same dimension, dtype and device."""
    a = check_points(A, "A", min_rows=min_rows)
    b = check_points(B, "B", min_rows=min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"A and B must have the same dimension: A has d={a.shape[1]}, B has d={b.shape[1]}"
        )
    if a.device != b.device:
        raise ValueError(f"A and B must be on the same device: A on {a.device}, B on {b.device}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def check_labels(
    y: Any, n: int, *, device: torch.device | None = None, name: str = "y",
    per: str = "row of H",
) -> torch.Tensor:
    """Integer class labels: 1-D, length ``n``, non-negative. Returns an int64 tensor.

    ``name`` and ``per`` (what one label belongs to) word the error messages."""
    t = to_tensor(y, name)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(
            f"{name}: expected a 1-D array of integer class labels of length {n}, got shape "
            f"{tuple(t.shape)} (one-hot labels? pass {name}.argmax(1))"
        )
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels (one per {per}), got {t.shape[0]}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name}: expected integer class labels, got non-integer values")
    t = t.to(torch.int64)
    if n and int(t.min()) < 0:
        raise ValueError(f"{name}: expected class labels >= 0, got minimum {int(t.min())}")
    if device is not None:
        t = t.to(device)
    return t


def check_features_labels(
    H: Any, y: Any, *, min_classes: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, d) and labels (n,), with at least ``min_classes`` distinct classes."""
    h = check_points(H, "H")
    labels = check_labels(y, h.shape[0], device=h.device)
    k = int(torch.unique(labels).numel())
    if k < min_classes:
        raise ValueError(
            f"y: expected at least {min_classes} distinct classes, got {k} "
            f"(labels present: {torch.unique(labels).tolist()})"
        )
    return h, labels


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (or >= 0 with ``allow_zero``)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a number, got {value!r}") from err
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        bound = ">=" if allow_zero else ">"
        raise ValueError(f"{name}: expected a finite number {bound} 0, got {value!r}")
    return v


def check_fraction(value: float, name: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a fraction in (0, 1), got {value!r}") from err
    if not (0.0 < v < 1.0):
        raise ValueError(f"{name}: expected a fraction strictly between 0 and 1, got {value!r}")
    return v


def check_int(value: Any, name: str, minimum: int = 0, *, integral_float: bool = False) -> int:
    """An integer >= ``minimum`` (numpy integers accepted, bools refused; with
    ``integral_float`` also floats such as 3.0, as YAML or a sweep may give them)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok and integral_float and isinstance(value, (float, np.floating)):
        ok = bool(np.isfinite(value)) and float(value).is_integer()
    if not ok or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_unit(value: Any, name: str) -> float:
    """A number in the closed interval [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}") from err
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    """``value`` when it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_scheme(scheme: Any) -> str:
    """``"pairwise"`` or ``"ovr"`` (:data:`SCHEMES`)."""
    return check_choice(scheme, "scheme", SCHEMES)
