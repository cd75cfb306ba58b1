"""Held-out evaluation: loss and accuracy, and the per-layer MD-LSM (docs: ``docs/monitor.md``).

* :func:`evaluate`: mean cross-entropy and accuracy of a model on a dataset.
* :func:`measure_layers`: cross-fitted ``layer_separability`` of each hidden layer on
  ``(x, y)`` and the accuracy on it.
* :class:`LayerMonitor`: the trainer's monitor pass. One forward over the probe and one
  over the test set (its first ``test_size`` rows captured), then one scorer for every
  layer: the batched Fisher pass (:func:`lsm_train.monitor.score_sets_mean_and_hard`,
  label layouts built once; it also logs the hard-pair score ``lsm_hard/<layer>``) for
  ``method="fisher"``, :func:`score_layers` for the other methods.

All of them are DDP-aware through :mod:`lsm_train.distributed`, whose helpers do nothing in
one process: rank r takes the rows ``r, r + W, ...``; counts and losses are summed over
the ranks (exact); the layer scores are either computed on rank 0 from the gathered
features (``gather=True``: the single-process values; other ranks get ``{}``) or averaged
over the ranks' local scores (``gather=False``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lsm_train import distributed as dist_utils
from lsm_train.measures.fisher import FisherLayout
from lsm_train.monitor import capture, score_layers, score_sets_mean_and_hard
from lsm_train.probe import eval_mode

__all__ = ["evaluate", "capture_layers", "score_layers", "measure_layers", "layer_metrics",
           "LayerMonitor"]

CROSSFIT_METHODS = ("degree", "fisher")  # cross-fitting is defined for these scores


class _Share:
    """Rank ``r``'s rows ``r, r + W, ...`` of a dataset with ``len`` and ``.batch(idx)``."""

    def __init__(self, data: Any, r: int, w: int) -> None:
        self.data, self.idx = data, torch.arange(r, len(data), w)

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(self.idx[idx])


def _share(data: Any) -> Any:
    w = dist_utils.world_size()
    return data if w == 1 else _Share(data, dist_utils.rank(), w)


def _gather_rows(feats: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Features of every rank's rows ``x[r::W]`` put back in the order of the ``n`` rows."""
    w = dist_utils.world_size()
    if w == 1:
        return dict(feats)
    order = torch.cat([torch.arange(k, n, w) for k in range(w)])  # gathered row -> sample
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return {name: dist_utils.all_gather_cat(H)[inverse.to(H.device)] for name, H in feats.items()}


def _mean_over_ranks(scores: Mapping[str, float], layers: list[str]) -> dict[str, float]:
    w = dist_utils.world_size()
    summed = dist_utils.all_reduce_sum([scores[name] for name in layers])
    return {name: v / w for name, v in zip(layers, summed, strict=True)}


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Any, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``data`` (a dataset with
    ``len`` and ``.batch(idx) -> (x, y)``); every module's train/eval flag is restored."""
    share = _share(data)
    total_loss, correct = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(share), batch_size):
            x, y = share.batch(torch.arange(start, min(start + batch_size, len(share))))
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    total_loss, correct = dist_utils.all_reduce_sum([total_loss, correct], device=device)
    n = max(1, len(data))
    return total_loss / n, correct / n


def capture_layers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[str], batch_size: int = 512
) -> tuple[dict[str, torch.Tensor], int]:
    """Float32 CPU features (n, d) of each layer on ``x`` (eval mode; every module's own
    train/eval flag is restored afterwards) and the number of correct predictions. ``x`` and
    ``y`` may live anywhere: each batch is moved to the model's device."""
    feats, stats = capture(model, x, y, layers, batch_size)
    return {name: H.cpu() for name, H in feats.items()}, int(stats["correct"])


@torch.no_grad()
def measure_layers(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: list[str],
    *,
    gather: bool = True,
    method: str = "degree",
    holdout: float | None = 0.5,
    seed: int = 0,
    batch_size: int = 512,
) -> tuple[dict[str, float], float]:
    """Cross-fitted MD-LSM of each layer on ``(x, y)`` and the accuracy on it (eval mode).

    Under DDP rank r measures ``x[r::W]``; ``gather`` as in the module doc. The accuracy is
    exact (summed over ranks) on every rank."""
    r, w = dist_utils.rank(), dist_utils.world_size()
    n = x.shape[0]
    feats, correct = capture_layers(model, x[r::w], y[r::w], layers, batch_size)
    (correct,) = dist_utils.all_reduce_sum([correct])
    acc = correct / max(1, n)
    kw = dict(method=method, holdout=holdout, seed=seed)
    if not gather:
        return _mean_over_ranks(score_layers(feats, y[r::w], **kw), layers), acc
    full = _gather_rows(feats, n)
    if r != 0:
        return {}, acc
    return score_layers(full, y, **kw), acc


def layer_metrics(lsm: Mapping[str, float], val_lsm: Mapping[str, float],
                  hard: Mapping[str, float] | None = None,
                  val_hard: Mapping[str, float] | None = None) -> dict[str, float]:
    """``lsm/<layer>``, ``val_lsm/<layer>`` and their means over the finite layers; with
    the hard-pair scores also ``lsm_hard/<layer>`` and ``val_lsm_hard/<layer>``."""
    out = {f"lsm/{k}": v for k, v in lsm.items()}
    out.update({f"val_lsm/{k}": v for k, v in val_lsm.items()})
    out.update({f"lsm_hard/{k}": v for k, v in (hard or {}).items()})
    out.update({f"val_lsm_hard/{k}": v for k, v in (val_hard or {}).items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN mean -> NaN
        out["lsm/mean"] = float(np.nanmean(list(lsm.values())))
        out["val_lsm/mean"] = float(np.nanmean(list(val_lsm.values())))
    return out


class LayerMonitor:
    """The monitor pass of the trainer (module doc): ``monitor(model)`` returns ``val/loss``,
    ``val/acc``, ``probe/acc`` and, where scored, :func:`layer_metrics`.

    ``probe``: the fixed ``(x, y)`` probe; ``test``: the test dataset, of which the first
    ``test_size`` rows are scored; ``holdout`` applies to the cross-fitted methods only.
    """

    def __init__(self, layers: list[str], probe: tuple[torch.Tensor, torch.Tensor], test: Any,
                 test_size: int, *, method: str = "fisher", holdout: float | None = 0.5,
                 seed: int = 0, gather: bool = True, batch_size: int = 512,
                 device: torch.device | str = "cpu") -> None:
        self.layers, self.probe, self.test = list(layers), probe, test
        self.test_labels = test.batch(torch.arange(min(test_size, len(test))))[1]
        self.method, self.seed, self.gather = method, seed, gather
        self.holdout = holdout if method in CROSSFIT_METHODS else None
        self.batch_size, self.device = batch_size, torch.device(device)
        self._layouts: dict[str, FisherLayout | None] = {}

    def __call__(self, model: nn.Module) -> dict[str, float]:
        r, w = dist_utils.rank(), dist_utils.world_size()
        px, py = self.probe
        n_keep = self.test_labels.shape[0]
        probe_feats, probe = capture(model, px[r::w], py[r::w], self.layers, self.batch_size)
        test_feats, test = capture(model, _share(self.test), None, self.layers,
                                   self.batch_size, keep=len(range(r, n_keep, w)))
        sets = {"probe": (probe_feats, py), "test": (test_feats, self.test_labels)}
        if self.gather:
            sets = {k: (_gather_rows(f, y.shape[0]), y) for k, (f, y) in sets.items()}
            scored = r == 0
        else:
            sets = {k: (f, y[r::w]) for k, (f, y) in sets.items()}
            scored = True
        stats = (probe["correct"], test["correct"], test["loss"])
        scores, hard, stats = self._score(sets if scored else {}, stats)
        correct_p, correct_t, loss_t = dist_utils.all_reduce_sum(stats, device=self.device)
        n_test = max(1, len(self.test))
        out = {"val/loss": loss_t / n_test, "val/acc": correct_t / n_test,
               "probe/acc": correct_p / max(1, px.shape[0])}
        if not scored:
            return out
        found = [scores["probe"], scores["test"], *(hard[k] for k in ("probe", "test") if hard)]
        if not self.gather:
            found = [_mean_over_ranks(s, self.layers) for s in found]
        out.update(layer_metrics(*found))
        return out

    def _score(self, sets: Mapping[str, tuple[dict[str, torch.Tensor], torch.Tensor]],
               stats: tuple[torch.Tensor, ...]) -> tuple[dict, dict, list[float]]:
        """The scores of each set's layers, their hard-pair scores (fisher only, else {})
        and ``stats`` read to the host (the batched Fisher pass reads all at once)."""
        if self.method != "fisher":
            scores = {k: score_layers({n: H.cpu() for n, H in f.items()}, y, method=self.method,
                                      holdout=self.holdout, seed=self.seed)
                      for k, (f, y) in sets.items()}
            return scores, {}, [float(t) for t in stats]
        keys = list(sets)
        layouts = [self._layout(k, sets[k][1]) for k in keys]
        pairs = [(sets[k][0], lay) if lay is not None else ({}, None)
                 for k, lay in zip(keys, layouts, strict=True)]
        means, hards, values = score_sets_mean_and_hard(pairs, extra=stats)
        nan = dict.fromkeys(self.layers, math.nan)
        return ({k: s or nan for k, s in zip(keys, means, strict=True)},
                {k: s or nan for k, s in zip(keys, hards, strict=True)}, values)

    def _layout(self, key: str, labels: torch.Tensor) -> FisherLayout | None:
        """The Fisher layout of the probe (or test) labels, built once; None when those
        labels cannot be cross-fitted (the scores are then NaN, with a warning)."""
        if key not in self._layouts:
            try:
                self._layouts[key] = FisherLayout(labels, "pairwise", self.holdout, self.seed,
                                                  device=self.device)
            except ValueError as err:
                warnings.warn(f"MD-LSM of the {key} set not computed: {err}", RuntimeWarning,
                              stacklevel=3)
                self._layouts[key] = None
        return self._layouts[key]
