"""Per-step learning-rate schedules of the app (``conf/sched/*.yaml``; docs: ``docs/app.md``).

:func:`lr_schedule` is the ``_target_`` of the built-in schedules (``_partial_: true``):
``name`` none | cosine | step | linear, a linear warmup over ``warmup_steps`` steps from 0,
``cosine`` and ``linear`` decay to ``min_lr_ratio`` × lr at the last step, ``step``
multiplies by ``gamma`` every ``step_size`` steps. ``total_steps`` is the run's length
(filled in by :func:`lsm_train.build.build_scheduler`). Any other
``torch.optim.lr_scheduler`` class can be the ``_target_`` instead.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "lr_schedule"]

SCHEDULES = ("none", "cosine", "linear", "step")


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    name: str = "none",
    *,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    gamma: float = 0.1,
    step_size: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """A :class:`~torch.optim.lr_scheduler.LambdaLR` stepped once per optimizer step, or
    None for ``name="none"`` (module doc)."""
    if name not in SCHEDULES:
        raise ValueError(f"sched.name: expected none, cosine, linear or step, got {name!r}")
    if name == "none":
        return None
    warmup = int(warmup_steps)
    floor = float(min_lr_ratio)
    every = int(step_size) if step_size is not None else max(1, total_steps // 3)
    span = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / span)
        if name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if name == "linear":
            return floor + (1 - floor) * (1 - t)
        return gamma ** ((step - warmup) // every)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
