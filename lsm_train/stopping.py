"""How a training run ends (docs: ``docs/runs.md``): the result, the signal flag, the messages.

* :class:`TrainResult`: ``status`` completed | interrupted | nan (| replicas_differ, set by
  the app), the step and epoch reached, the checkpoint, the last logged values, a message.
* :class:`StopFlag`: SIGTERM/SIGINT handlers that only record the signal, so that the loop
  finishes the current step and checkpoints; a second signal acts as before it.
* :func:`agree_on_stop`: under DDP, every rank learns whether any rank's loss is not
  finite or any rank received a signal (one small all-reduce per step).
* :func:`nan_message`, :func:`blown_up_message`, :func:`checkpoint_note`: why a run
  stopped without updating and where its last good checkpoint is;
  :func:`interrupted_outcome`: the status and message of a run stopped by a signal.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lsm_train import distributed as dist_utils

__all__ = ["TrainResult", "StopFlag", "agree_on_stop", "nan_message", "blown_up_message",
           "checkpoint_note", "interrupted_outcome"]


@dataclass
class TrainResult:
    status: str  # "completed" | "interrupted" | "nan"
    step: int
    epoch: int
    checkpoint: Path | None
    final: dict[str, float] = field(default_factory=dict)
    message: str = ""
    signum: int | None = None  # the signal that interrupted the run


class StopFlag:
    """Installs SIGTERM/SIGINT handlers that only record the signal (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum
        # a second signal falls back to the previous behaviour (e.g. KeyboardInterrupt)
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def agree_on_stop(finite: bool, stop: bool, *, ddp: bool,
                  device: Any = "cpu") -> tuple[bool, bool]:
    """(every rank's loss is finite, some rank received a signal); as given in one process."""
    if not ddp:
        return finite, stop
    bad, stops = dist_utils.all_reduce_sum(
        [0.0 if finite else 1.0, 1.0 if stop else 0.0], device=device)
    return bad == 0, stops > 0


def checkpoint_note(checkpointing: bool, path: Path, saved_step: int | None) -> str:
    """Where the last good checkpoint of a run is, for a stop message."""
    if not checkpointing:
        return "No checkpoint is written (trainer.checkpoint=false)."
    if saved_step is None:
        return "No checkpoint was written yet."
    return f"Last good checkpoint: {path} (step {saved_step})."


def nan_message(x: torch.Tensor, step: int, epoch: int, data_name: str) -> str:
    """Why the loss of step ``step`` (1-based) is not finite: bad input data in the batch
    ``x`` or a diverged model."""
    where = f"at step {step} (epoch {epoch})"
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        return (
            f"loss is not finite {where}: {bad} of {x.shape[0]} input samples of the batch "
            f"hold NaN or inf values. The data is bad (data.name={data_name}), not the "
            "learning rate: clean or filter it; stopped without updating."
        )
    return (
        f"loss is not finite {where}; stopped without updating. Try a smaller optim.lr or "
        "lsm.loss.weight, or trainer.grad_clip."
    )


def blown_up_message(step: int, checkpoint_note: str) -> str:
    return (
        f"the parameters are not finite after step {step} (the update diverged); "
        "no checkpoint was written from them. " + checkpoint_note
        + " Try a smaller optim.lr or trainer.grad_clip."
    )


def interrupted_outcome(signal_name: str, step: int, written: Path | None,
                        params_finite: bool, checkpoint_note: str,
                        run_dir: Path) -> tuple[str, str]:
    """(status, message) after a signal at ``step``: the checkpoint ``written`` then (None:
    none written, because checkpoints are off or the parameters are not finite)."""
    if written is not None:
        return "interrupted", (f"{signal_name} received at step {step}: checkpoint written "
                               f"to {written}; continue with resume=true hydra.run.dir={run_dir}")
    if not params_finite:
        return "nan", f"{signal_name} received; " + blown_up_message(step, checkpoint_note)
    return "interrupted", (f"{signal_name} received at step {step}: stopped. "
                           + checkpoint_note)
