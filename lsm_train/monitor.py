"""The real-time monitor: every hidden layer scored in one batched pass, within a budget.

* :func:`capture` runs the model once (eval mode, batches) over labelled rows and returns
  every requested layer's features, reduced to (n, d), on the model's device, and the
  number of correct predictions as a device tensor; each module's own train/eval flag is
  restored afterwards.
* :func:`score_sets` scores the layers of one or more captured sets with the fast Fisher
  score (:mod:`lsm_train.measures.fisher`): the labels are laid out once per set, every
  layer's linear algebra runs on the device, all AUCs of a set come from one batched sort,
  and the per-layer means of every set are read to the host once, at the end.
* :class:`MonitorSchedule` decides when to evaluate. With ``every_n_steps`` (an explicit
  interval) it evaluates on those steps and at epoch ends. Otherwise it keeps the
  monitor's share of the time within ``budget`` × training time: it times each
  evaluation and starts the next one only when the time spent, plus the cost of this
  evaluation and of the final one, fits in the budget at the current training time.

Docs: ``docs/monitor.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lsm_train.features import reduce_features
from lsm_train.measures.fisher import FisherLayout, pair_scores, pair_values

__all__ = ["MonitorSchedule", "capture", "score_sets"]


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside; afterwards every submodule gets back its own ``training`` flag (a
    frozen submodule kept in eval mode stays in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@torch.no_grad()
def capture(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[str],
    batch_size: int = 512, keep: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Float32 (n, d) features of each layer (conv maps and token sequences reduced as
    ``reduce="auto"``) on the model's device, for the first ``keep`` rows (default all), and
    the number of correct predictions over all rows (a 0-dim device tensor). ``x`` and ``y``
    may live anywhere: each batch is moved to the model's device."""
    from lsm_train.capture import HiddenCapture

    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    keep = x.shape[0] if keep is None else min(int(keep), x.shape[0])
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model), HiddenCapture(model, layers) as captured:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            correct += (model(xb).argmax(1) == yb).sum()
            rows = min(keep - start, xb.shape[0])
            if rows > 0:
                for name in layers:
                    feats[name].append(reduce_features(captured[name][:rows].float()))
    return {name: torch.cat(parts) for name, parts in feats.items() if parts}, correct


def score_sets(
    sets: Iterable[tuple[Mapping[str, torch.Tensor], Any]],
    *,
    scheme: str = "pairwise",
    holdout: float | None = 0.5,
    seed: int = 0,
    extra: Iterable[torch.Tensor] = (),
) -> tuple[list[dict[str, float]], list[float]]:
    """Fast Fisher layer score (the mean over class problems) of every layer of every set
    ``(features by layer name, labels or a FisherLayout)``, with one host read at the end,
    which also reads the 0-dim tensors ``extra`` (e.g. correct counts). A layer with a
    non-finite feature scores NaN. Returns (one {layer: score} per set, extra as floats)."""
    names, means = [], []
    for feats, labels in sets:
        if not feats:
            names.append([])
            continue
        device = next(iter(feats.values())).device
        layout = labels if isinstance(labels, FisherLayout) else FisherLayout(
            torch.as_tensor(labels), scheme, holdout, seed, device=device)
        T = torch.stack([pair_scores(H, layout) for H in feats.values()])
        values = pair_values(T, layout).mean(1)  # (L,)
        finite = torch.stack([torch.isfinite(H).all() for H in feats.values()])
        means.append(torch.where(finite, values, torch.full_like(values, math.nan)))
        names.append(list(feats))
    extra = [t.reshape(1).double().to(means[0].device if means else "cpu") for t in extra]
    flat = torch.cat(means + extra).tolist() if (means or extra) else []  # the host read
    out, at = [], 0
    for layer_names in names:
        out.append(dict(zip(layer_names, flat[at : at + len(layer_names)], strict=True)))
        at += len(layer_names)
    return out, flat[at:]


class MonitorSchedule:
    """When to evaluate: an explicit interval, or a budget on the monitor's share of time.

    ``every_n_steps`` (an int >= 0) wins when given: evaluate at multiples of it (0: never
    between epoch ends) and at every epoch end. With ``every_n_steps=None`` the budget
    rules: ``due`` is True at the last step, and elsewhere when
    ``spent + 2 · cost <= budget · train_seconds`` — ``spent`` the seconds of all timed
    evaluations, ``cost`` the duration of the latest one (one for this evaluation, one kept
    for the final one). Epoch ends are not forced. Before any evaluation is timed the cost
    is taken as ``spent / evaluations`` or, with none, the next evaluation is due. Time
    evaluations with :meth:`timed`; ``clock`` (seconds) is replaceable for tests.
    """

    def __init__(self, budget: float = 0.03, every_n_steps: int | None = None,
                 clock: Callable[[], float] = time.perf_counter, spent: float = 0.0):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
            0 < budget <= 1
        ):
            raise ValueError(f"lsm.monitor.budget: expected a fraction in (0, 1], got {budget!r}")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
            or every_n_steps < 0
        ):
            raise ValueError(
                f"trainer.monitor_every_n_steps: expected null (budget) or an integer >= 0, "
                f"got {every_n_steps!r}")
        self.budget = float(budget)
        self.every_n_steps = every_n_steps
        self.clock = clock
        self.spent = float(spent)
        self.evaluations = 0
        self.cost: float | None = None

    @property
    def uses_budget(self) -> bool:
        return self.every_n_steps is None

    def due(self, step: int, train_seconds: float, *, epoch_end: bool = False,
            last: bool = False) -> bool:
        """Whether to evaluate after training step ``step`` (training time so far:
        ``train_seconds``, the monitor's time excluded)."""
        if last:
            return True
        if not self.uses_budget:
            n = self.every_n_steps
            return epoch_end or (n > 0 and step % n == 0)
        cost = self.cost
        if cost is None:
            if not self.evaluations:
                return True
            cost = self.spent / self.evaluations
        return self.spent + 2 * cost <= self.budget * train_seconds

    @contextmanager
    def timed(self):
        """Time one evaluation: adds it to ``spent`` and makes it the current ``cost``."""
        start = self.clock()
        try:
            yield
        finally:
            self.cost = self.clock() - start
            self.spent += self.cost
            self.evaluations += 1

    def fraction(self, train_seconds: float) -> float:
        """spent / train_seconds (NaN before any training time)."""
        return self.spent / train_seconds if train_seconds > 0 else math.nan
