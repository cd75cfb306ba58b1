"""What the trainer logs between evaluations (the keys: ``docs/app.md``, ``lsm_train.runlog``).

* :class:`RunningSums`: the training loss, correct count, samples and batches since the
  last log (summed over the ranks under DDP), read as ``train/loss`` and ``train/acc``.
* :func:`loss_stats`: ``lsm_loss/<layer>`` of the last LSM-loss call (averaged over the
  ranks when each rank scored its own features); :func:`guard_stats`: ``guard/<counter>``,
  ``guard/accept_rate`` and ``guard/recent_accept_rate``.
* :func:`time_record`: ``time/elapsed_s``, ``time/monitor_s``, ``time/train_s`` (the
  elapsed time less the monitor's: comparable across lsm modes, since lsm=off does not
  monitor), ``time/monitor_fraction`` and ``time/monitor_evaluations``.
* :func:`progress_bar`: a tqdm bar updated by an ``on_step`` hook of the trainer.
* :class:`NullTracker`: the tracker of ranks other than 0 under DDP: logs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lsm_train import distributed as dist_utils

__all__ = ["RunningSums", "loss_stats", "guard_stats", "time_record", "progress_bar",
           "NullTracker"]

_SUM_KEYS = ("loss", "correct", "count", "batches")


class RunningSums:
    """Sums of the training steps since the last log (module doc)."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = dict(values or dict.fromkeys(_SUM_KEYS, 0))
        self.values["loss"] = float(self.values["loss"])

    def add(self, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        s = self.values
        s["loss"] += loss
        s["batches"] += 1
        s["correct"] += int((logits.argmax(1) == y).sum())
        s["count"] += int(y.shape[0])

    def reduced(self, ddp: bool, device: Any = "cpu") -> dict[str, Any]:
        """The sums over all ranks (a collective under DDP: every rank must call it)."""
        if not ddp:
            return dict(self.values)
        vals = dist_utils.all_reduce_sum([self.values[k] for k in _SUM_KEYS], device=device)
        return {k: (v if k == "loss" else int(round(v)))
                for k, v in zip(_SUM_KEYS, vals, strict=True)}

    def metrics(self, ddp: bool, device: Any = "cpu") -> dict[str, float]:
        """``train/loss`` and ``train/acc`` since the last log; the sums restart at zero."""
        s = self.reduced(ddp, device)
        self.values = dict.fromkeys(_SUM_KEYS, 0)
        self.values["loss"] = 0.0
        if not s["count"]:
            return {}
        return {"train/loss": s["loss"] / max(1, s["batches"]),
                "train/acc": s["correct"] / s["count"]}


def loss_stats(reg: Any, ddp: bool, device: Any = "cpu") -> dict[str, float]:
    """``lsm_loss/<layer>`` of the LSM loss's last call (module doc)."""
    last = getattr(reg, "last", None) or {}
    if ddp and last and not getattr(reg, "gather", False):
        summed = dist_utils.all_reduce_sum(list(last.values()), device=device)
        w = dist_utils.world_size()
        last = {k: v / w for k, v in zip(last, summed, strict=True)}
    return {f"lsm_loss/{k}": float(v) for k, v in last.items()}


def guard_stats(guard: Any) -> dict[str, float]:
    """``guard/<counter>``, ``guard/accept_rate`` and ``guard/recent_accept_rate``."""
    stats = getattr(guard, "stats", None)
    if callable(stats):
        stats = stats()
    out: dict[str, float] = {}
    if isinstance(stats, Mapping):
        for k, v in stats.items():
            if isinstance(v, (int, float, bool)) or (torch.is_tensor(v) and v.numel() == 1):
                out[f"guard/{k}"] = float(v)
        checks = out.get("guard/checks")
        if checks:
            out["guard/accept_rate"] = out.get("guard/accepted", 0.0) / checks
    recent = getattr(guard, "recent_accept_rate", None)
    if isinstance(recent, float) and math.isfinite(recent):
        out["guard/recent_accept_rate"] = recent  # over the guard's warn_window checks
    return out


def time_record(elapsed: float, monitor_s: float, evaluations: int) -> dict[str, float]:
    """The ``time/*`` keys of a log record (module doc)."""
    out = {"time/elapsed_s": elapsed, "time/monitor_s": monitor_s,
           "time/train_s": max(elapsed - monitor_s, 0.0)}
    if out["time/train_s"] > 0:
        out["time/monitor_fraction"] = monitor_s / out["time/train_s"]
    out["time/monitor_evaluations"] = evaluations  # in this process
    return out


def progress_bar(trainer: Any) -> tuple[Any, Callable[[Any, float], None]]:
    """A tqdm bar over the trainer's steps and the ``on_step`` hook (added to the trainer)
    that moves it and shows the loss, the train accuracy and the latest mean MD-LSM."""
    from tqdm.auto import tqdm  # tqdm is only needed for an interactive run

    bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="train", leave=True,
               dynamic_ncols=True)

    def show(trainer: Any, loss: float) -> None:
        bar.update(1)
        post = {"loss": f"{loss:.3f}",
                "acc": f"{trainer.last.get('train/acc', float('nan')):.3f}"}
        if trainer.history_lsm_mean is not None:
            post["lsm"] = f"{trainer.history_lsm_mean:.3f}"
        bar.set_postfix(post, refresh=False)

    trainer.add_hook("on_step", show)
    return bar, show


class NullTracker:
    """The tracker of ranks other than 0 under DDP: logs nothing."""

    wandb_id = None
    run = None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass
