"""The real-time monitor: every hidden layer scored in one batched pass, within a budget.

* :func:`capture` runs the model once (eval mode, batches) over labelled rows and returns
  every requested layer's features, reduced to (n, d), on the model's device, and the
  correct count and summed loss as device tensors; each module's own train/eval flag is
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

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsm_train.capture import HiddenCapture
from lsm_train.features import reduce_features
from lsm_train.measures.fisher import FisherLayout, pair_scores, pair_values
from lsm_train.measures.hard_pairs import worst_k_mean
from lsm_train.measures.layer import layer_separability
from lsm_train.probe import eval_mode

__all__ = ["MonitorSchedule", "capture", "score_layers", "score_sets", "score_sets_mean_and_hard"]


def _batches(source: Any, batch_size: int):
    """(x, y) batches of a tuple of tensors or of a dataset with ``len`` and ``.batch(idx)``."""
    if isinstance(source, tuple):
        x, y = source
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    for start in range(0, len(source), batch_size):
        yield source.batch(torch.arange(start, min(start + batch_size, len(source))))


@torch.no_grad()
def capture(
    model: nn.Module, x: Any, y: torch.Tensor | None = None, layers: list[str] = (),
    batch_size: int = 512, keep: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass (eval mode, batches) over labelled rows: ``x, y`` tensors, or ``x``
    a dataset with ``len`` and ``.batch(idx) -> (x, y)`` and ``y=None``. Returns float32
    (n, d) features of each layer in ``layers`` (conv maps and token sequences reduced as
    ``reduce="auto"``) on the model's device, for the first ``keep`` rows (default all),
    and device tensors ``{"correct": count, "loss": summed cross-entropy (float64),
    "n": rows}`` over all rows. Each batch is moved to the model's device."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    source = x if y is None else (x, y)
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    with eval_mode(model), HiddenCapture(model, list(layers)) as captured:
        for xb, yb in _batches(source, batch_size):
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            correct += (logits.argmax(1) == yb).sum()
            loss += F.cross_entropy(logits, yb, reduction="sum").double()
            rows = xb.shape[0] if keep is None else min(int(keep) - seen, xb.shape[0])
            for name in layers if rows > 0 else ():
                feats[name].append(reduce_features(captured[name][:rows].float()))
            seen += xb.shape[0]
    stats = {"correct": correct, "loss": loss, "n": torch.tensor(seen, device=device)}
    return {name: torch.cat(parts) for name, parts in feats.items() if parts}, stats


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
    means, _, extra_values = score_sets_mean_and_hard(
        sets, scheme=scheme, holdout=holdout, seed=seed, extra=extra)
    return means, extra_values


def score_sets_mean_and_hard(
    sets: Iterable[tuple[Mapping[str, torch.Tensor], Any]],
    *,
    scheme: str = "pairwise",
    holdout: float | None = 0.5,
    seed: int = 0,
    extra: Iterable[torch.Tensor] = (),
    worst_k: int | None = None,
) -> tuple[list[dict[str, float]], list[dict[str, float]], list[float]]:
    """:func:`score_sets` plus the hard-pair score of every layer (the mean of its
    ``worst_k`` smallest problem values, default ⌈P/10⌉: :func:`~lsm_train.hard_pair_score`),
    from the same per-problem values and in the same host read. Returns (means per set,
    hard-pair scores per set, extra as floats)."""
    sets = list(sets)
    names, values = [], []
    for feats, labels in sets:
        if not feats:
            names.append([])
            continue
        device = next(iter(feats.values())).device
        layout = labels if isinstance(labels, FisherLayout) else FisherLayout(
            torch.as_tensor(labels), scheme, holdout, seed, device=device)
        groups: dict[tuple, list[str]] = {}  # layers of one width and dtype: one batch
        for name, H in feats.items():
            groups.setdefault((H.shape[1], H.dtype), []).append(name)
        order = [name for group in groups.values() for name in group]
        T = torch.cat([pair_scores(torch.stack([feats[n] for n in group]), layout)
                       for group in groups.values()])
        per_problem = pair_values(T, layout)  # (L, P) in ``order``; NaN rows: not finite
        values += [per_problem.mean(1), worst_k_mean(per_problem, worst_k)]
        names.append(order)
    extra = [t.reshape(1).double().to(values[0].device if values else "cpu") for t in extra]
    flat = torch.cat(values + extra).tolist() if (values or extra) else []  # the host read
    means, hards, at = [], [], 0
    for (feats, _), layer_names in zip(sets, names, strict=True):
        n = len(layer_names)
        for out, part in ((means, flat[at : at + n]), (hards, flat[at + n : at + 2 * n])):
            got = dict(zip(layer_names, part, strict=True))
            out.append({name: got[name] for name in feats if name in got})
        at += 2 * n if n else 0
    return means, hards, flat[at:]


def score_layers(
    feats: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    *,
    method: str = "degree",
    holdout: float | None = 0.5,
    seed: int = 0,
) -> dict[str, float]:
    """``layer_separability`` of each layer's features (NaN with a warning when it fails);
    ``method="fisher"``: all layers in one batched pass (:func:`lsm_train.monitor.score_sets`)."""
    if method == "fisher":
        try:
            return score_sets([(feats, y)], holdout=holdout, seed=seed)[0][0]
        except ValueError as err:  # e.g. a probe too small to cross-fit: log null, go on
            warnings.warn(f"MD-LSM not computed: {err}", RuntimeWarning, stacklevel=2)
            return {name: float("nan") for name in feats}
    yc = y.cpu()
    scores = {}
    for name, H in feats.items():
        try:
            scores[name] = float(
                layer_separability(H, yc, method=method, holdout=holdout, seed=seed)
            )
        except ValueError as err:  # e.g. a probe too small to cross-fit: log null, go on
            warnings.warn(f"MD-LSM of {name} not computed: {err}", RuntimeWarning, stacklevel=2)
            scores[name] = float("nan")
    return scores


class MonitorSchedule:
    """When to evaluate: an explicit interval, or a budget on the monitor's share of time.

    ``every_n_steps`` (an int >= 0) wins when given: evaluate at multiples of it (0: only
    at epoch ends) and at every epoch end. With ``every_n_steps=None`` the budget rules:
    :meth:`due` is True at the last step, and elsewhere when both
    ``monitor_seconds + 2 · cost <= budget · train_seconds`` (``cost`` the duration of the
    latest timed evaluation: once for this one, once kept for the final one) and
    ``budget · (train_seconds − train seconds at the latest evaluation) >= cost`` (no
    catching up in bursts: evaluations come at most at the budget's rate). Epoch ends are
    not forced. Before any evaluation is timed (a resumed run) the next one is due when
    ``monitor_seconds <= budget · train_seconds``. Time evaluations with :meth:`timed`;
    ``clock`` (seconds) is replaceable for tests.
    """

    def __init__(self, budget: float = 0.03, every_n_steps: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
            0 < budget <= 1
        ):
            raise ValueError(f"lsm.monitor.budget: expected a fraction in (0, 1], got {budget!r}")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
            or every_n_steps < 0
        ):
            raise ValueError(
                f"trainer.monitor_every_n_steps: expected null (use lsm.monitor.budget) or an "
                f"integer >= 0, got {every_n_steps!r}")
        self.budget = float(budget)
        self.every_n_steps = every_n_steps
        self.clock = clock
        self.evaluations = 0
        self.cost: float | None = None
        self.trained_at_last = 0.0  # training seconds when the latest evaluation started

    @property
    def uses_budget(self) -> bool:
        return self.every_n_steps is None

    def due(self, step: int, train_seconds: float, monitor_seconds: float, *,
            epoch_end: bool = False, last: bool = False) -> bool:
        """Whether to evaluate after training step ``step``, given the training time so far
        (the monitor's excluded) and the monitor's time so far."""
        if last:
            return True
        if not self.uses_budget:
            n = self.every_n_steps
            return epoch_end or (n > 0 and step % n == 0)
        if self.cost is None:
            return monitor_seconds <= self.budget * train_seconds
        within = monitor_seconds + 2 * self.cost <= self.budget * train_seconds
        return within and self.budget * (train_seconds - self.trained_at_last) >= self.cost

    @contextmanager
    def timed(self, train_seconds: float = 0.0):
        """Time one evaluation (started at ``train_seconds`` of training): its duration
        becomes the current ``cost``."""
        self.trained_at_last = float(train_seconds)
        start = self.clock()
        try:
            yield
        finally:
            self.cost = self.clock() - start
            self.evaluations += 1
