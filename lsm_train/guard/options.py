"""Checked constructor options of :class:`~lsm_train.guard.SeparabilityGuard` (docs/guard.md)."""

from __future__ import annotations

from typing import Any

import torch

from lsm_train._validation import check_choice, check_fraction, check_int, check_positive
from lsm_train.probe import MEASURES

__all__ = ["check_options", "SCOPES", "GUARD_MEASURES"]

SCOPES = ("step", "window")
GUARD_MEASURES = (*MEASURES, "random")


def check_options(*, measure: Any, tau: float, z: float, groups: int, tolerance: float,
                  accept_rate: float | None, seed: int, check_every: int, scope: str,
                  max_retries: int, backoff: float, max_consecutive_rejects: int | None,
                  max_nonfinite: int, snapshot_device: Any, track_buffers: bool,
                  process_group: Any) -> dict[str, Any]:
    """The options as attributes of the guard, or a ValueError naming the bad one."""
    if not (callable(measure) or measure in GUARD_MEASURES):
        raise ValueError(
            f"measure: expected one of {GUARD_MEASURES} or a callable (H, y) -> float, "
            f"got {measure!r}"
        )
    if measure == "random":
        if accept_rate is None:
            raise ValueError("accept_rate: expected a number in [0, 1] with measure='random'")
        accept_rate = float(accept_rate)
        if not 0.0 <= accept_rate <= 1.0:
            raise ValueError(f"accept_rate: expected a number in [0, 1], got {accept_rate!r}")
    elif accept_rate is not None:
        raise ValueError(
            f"accept_rate: only used with measure='random', got {accept_rate!r} with "
            f"measure={measure!r}"
        )
    check_choice(scope, "scope", SCOPES)
    max_retries = check_int(max_retries, "max_retries", minimum=0)
    if scope == "window" and max_retries:
        raise ValueError(
            "max_retries: expected 0 with scope='window' (a rolled-back window cannot be "
            f"retried: its gradients are gone), got {max_retries!r}"
        )
    z = check_positive(z, "z", allow_zero=True)
    groups = check_int(groups, "groups", minimum=2)
    limit = max_consecutive_rejects
    return dict(
        measure=measure,
        tau=check_positive(tau, "tau"),
        z=z,
        groups=groups,
        tolerance=check_positive(tolerance, "tolerance", allow_zero=True),
        accept_rate=accept_rate,
        seed=check_int(seed, "seed", minimum=0),
        check_every=check_int(check_every, "check_every", minimum=1),
        scope=scope,
        max_retries=max_retries,
        backoff=check_fraction(backoff, "backoff"),
        max_consecutive_rejects=(
            None if limit is None else check_int(limit, "max_consecutive_rejects", minimum=0)
        ),
        max_nonfinite=check_int(max_nonfinite, "max_nonfinite", minimum=1),
        snapshot_device=None if snapshot_device is None else torch.device(snapshot_device),
        track_buffers=bool(track_buffers),
        process_group=process_group,
    )
