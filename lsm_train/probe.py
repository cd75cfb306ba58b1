"""Score a model on a fixed probe set: checked input, a clean eval forward, per-layer scores.

    scorer = ProbeScorer(model, (x, y), layers=["fc1", "fc2"], measure="soft", groups=10)
    table = scorer.scores()        # (L, 1 + G) float64: value, then G jackknife replicates
    feats = scorer.forward()       # or in two parts: features, then values / replicates

Contract (docs/guard.md, "The probe"):

* A probe is ``(inputs, y)``: ``inputs`` a tensor (``model(x)``), a tuple (positional
  arguments, ``model(*x)``) or a dict (keyword arguments, ``model(**x)``); numpy arrays are
  converted; floating tensors take the dtype and every tensor the device of the model's
  parameters; ``y`` must hold one integer label per sample (the first dimension of the first
  input tensor) and at least two classes. :func:`as_probe` checks all that at once.
* :func:`probe_forward` runs the unwrapped model under ``torch.no_grad`` in eval mode (dropout
  off, BatchNorm statistics untouched) and puts back *each* module's own ``training`` flag,
  so a submodule frozen in eval mode stays in eval mode. A chosen layer that did not run in
  the forward pass is a ValueError naming it.
* Measures: ``"soft"`` (soft MD-LSM), ``"degree"`` (MD-LSM degree), ``"loss"`` (minus the
  mean cross-entropy of the model's output; one row named ``"loss"``) or a callable
  ``(H, y) -> float``. Non-finite features give a NaN score.
* With ``groups = G >= 2`` each row also holds the delete-a-group jackknife replicates: the
  score with the g-th of G class-stratified groups of the probe left out.
* :func:`version_key` and :func:`digest` identify what a score was computed on (in-place
  version counters; an exact content hash for state dicts).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lsm_train._validation import check_labels
from lsm_train.capture import HiddenCapture, resolve_layers, unwrap_model
from lsm_train.measures.layer import layer_separability
from lsm_train.measures.soft import soft_md_lsm

__all__ = [
    "Probe",
    "ProbeScorer",
    "as_probe",
    "eval_mode",
    "probe_forward",
    "jackknife_groups",
    "version_key",
    "digest",
    "MEASURES",
]

MEASURES = ("soft", "degree", "loss")


class Probe(NamedTuple):
    """Checked probe: ``inputs`` (tensor, tuple or dict) and int64 ``labels`` of length n."""

    inputs: Any
    labels: torch.Tensor

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [*_tensors_of(self.inputs), self.labels]

    def call(self, module: nn.Module) -> Any:
        if isinstance(self.inputs, dict):
            return module(**self.inputs)
        if isinstance(self.inputs, tuple):
            return module(*self.inputs)
        return module(self.inputs)


def _tensors_of(inputs: Any) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else (
        inputs if isinstance(inputs, tuple) else (inputs,))
    return [v for v in values if isinstance(v, torch.Tensor)]


def _model_dtype_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device]:
    tensors = list(module.parameters()) + list(module.buffers())
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    device = tensors[0].device if tensors else torch.device("cpu")
    return dtype, device


def _convert(value: Any, dtype: torch.dtype | None, device: torch.device) -> Any:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point() and dtype is not None and value.dtype != dtype:
        value = value.to(dtype)
    return value.to(device)


def as_probe(probe: Any, model: nn.Module) -> Probe:
    """Check and normalize ``(inputs, y)`` for ``model`` (see the module docstring)."""
    if isinstance(probe, Probe):
        probe = tuple(probe)
    if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
        raise ValueError(
            "probe: expected a pair (inputs, y): inputs a tensor, a tuple of positional "
            f"arguments or a dict of keyword arguments, y integer labels; got "
            f"{type(probe).__name__}"
        )
    x, y = probe
    dtype, device = _model_dtype_device(unwrap_model(model))
    if isinstance(x, Mapping):
        inputs: Any = {str(k): _convert(v, dtype, device) for k, v in x.items()}
    elif isinstance(x, (tuple, list)):
        inputs = tuple(_convert(v, dtype, device) for v in x)
    else:
        inputs = _convert(x, dtype, device)
    tensors = _tensors_of(inputs)
    if not tensors or tensors[0].ndim == 0:
        raise ValueError(
            "probe: expected inputs holding at least one tensor or numpy array with a batch "
            f"dimension, got {type(x).__name__}"
        )
    n = int(tensors[0].shape[0])
    labels = check_labels(y, n, name="probe labels", per="probe sample (first dimension "
                          "of the first input tensor)")
    if isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.ndim == 1:
        labels = y  # keep the caller's tensor (its version counter is tracked)
    k = int(torch.unique(labels).numel())
    if k < 2:
        raise ValueError(f"probe: expected labels of at least 2 classes, got {k}")
    return Probe(inputs, labels.to(device))


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside, then every submodule's own ``training`` flag put back."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def probe_forward(model: nn.Module, probe: Probe,
                  layer_names: list[str]) -> tuple[dict[str, torch.Tensor], Any]:
    """Features of ``layer_names`` and the output of one clean probe forward pass."""
    module = unwrap_model(model)
    with eval_mode(module), torch.no_grad():
        if not layer_names:
            return {}, probe.call(module)
        with HiddenCapture(module, layer_names) as feats:
            output = probe.call(module)
    missing = [n for n in layer_names if n not in feats]
    if missing:
        raise ValueError(
            f"layers: {missing} of {type(module).__name__} did not run in the probe forward "
            "pass (a module used only through its weights, e.g. MultiheadAttention.out_proj, "
            "never calls its forward); choose layers that run, e.g. the enclosing block"
        )
    return dict(feats), output


def jackknife_groups(labels: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """For g = 0..G-1 the indices kept when group g is left out; the i-th sample of each
    class (in probe order) belongs to group i mod G."""
    rank = torch.empty_like(labels)
    for c in torch.unique(labels):
        where = torch.nonzero(labels == c).flatten()
        rank[where] = torch.arange(where.numel(), device=labels.device)
    group = rank % groups
    return [torch.nonzero(group != g).flatten() for g in range(groups)]


def _layer_measure(measure: Any, tau: float) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    if measure == "soft":
        return lambda H, y: soft_md_lsm(H, y, tau=tau)
    if measure == "degree":

        return lambda H, y: layer_separability(H, y, method="degree")
    return measure


def _value(fn: Callable[..., Any], H: torch.Tensor, y: torch.Tensor) -> float:
    try:
        v = fn(H, y)
    except ValueError:  # the built-in measures reject non-finite features
        if bool(torch.isfinite(H).all()):
            raise
        return math.nan
    return float(v.detach().double()) if isinstance(v, torch.Tensor) else float(v)


class ProbeScorer:
    """Per-layer scores of ``model`` on a checked ``probe`` (see the module docstring).

    Args:
        model: the module to score (DDP / compiled wrappers accepted).
        probe: ``(inputs, y)`` (checked by :func:`as_probe`).
        layers: names / patterns / classes (default ``model.hidden_layers``); unused by
            ``measure="loss"``.
        measure: ``"soft"``, ``"degree"``, ``"loss"`` or a callable ``(H, y) -> float``.
        tau: temperature of the soft measure.
        groups: G jackknife replicates per row (0: the value only).
    """

    def __init__(self, model: nn.Module, probe: Any, layers: Any = None, *,
                 measure: Any = "soft", tau: float = 0.5, groups: int = 0) -> None:
        if not (callable(measure) or measure in MEASURES):
            raise ValueError(
                f"measure: expected one of {MEASURES}, 'random' (guard only) or a callable "
                f"(H, y) -> float, got {measure!r}"
            )
        if groups == 1 or groups < 0:
            raise ValueError(f"groups: expected 0 or an integer >= 2, got {groups!r}")
        self.model, self.measure, self.tau, self.groups = model, measure, tau, int(groups)
        self.layer_names = ["loss"] if measure == "loss" else _resolve(model, layers)
        self.set_probe(probe)

    def set_probe(self, probe: Any) -> None:
        self.probe = as_probe(probe, self.model)
        self._keep = jackknife_groups(self.probe.labels, self.groups) if self.groups else []

    def forward(self) -> dict[str, torch.Tensor]:
        """One clean probe forward: the features of each layer (for ``"loss"``, the
        per-sample cross-entropy under the name ``"loss"``)."""
        if self.measure == "loss":
            _, out = probe_forward(self.model, self.probe, [])
            return {"loss": _per_sample_loss(out, self.probe.labels)}
        feats, _ = probe_forward(self.model, self.probe, self.layer_names)
        return feats

    def values(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(L,) float64 on the CPU: each layer's score on the whole probe."""
        return self._table(feats, [None])[:, 0]

    def replicates(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(L, G) float64 on the CPU: each layer's score with group g left out."""
        if not self._keep:
            raise ValueError("replicates: this scorer was built with groups=0")
        return self._table(feats, self._keep)

    def scores(self) -> torch.Tensor:
        """(L, 1 + G) float64 on the CPU: each row a layer's value, then its replicates."""
        return self._table(self.forward(), [None, *self._keep])

    def _table(self, feats: dict[str, torch.Tensor], keeps: list[Any]) -> torch.Tensor:
        y = self.probe.labels
        if self.measure == "loss":
            losses = feats["loss"]
            rows = [[-float(losses.mean() if k is None else losses[k].mean()) for k in keeps]]
            return torch.tensor(rows, dtype=torch.float64)
        fn = _layer_measure(self.measure, self.tau)
        rows = []
        for name in self.layer_names:
            H = feats[name]
            rows.append([_value(fn, H, y) if k is None else _value(fn, H[k], y[k])
                         for k in keeps])
        return torch.tensor(rows, dtype=torch.float64)


def _per_sample_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
    if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == y.numel()
            and out.shape[1] > int(y.max())):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"measure='loss': expected the model to return logits of shape "
            f"({y.numel()}, C) with C > {int(y.max())} (the largest probe label), got {shape}"
        )
    return F.cross_entropy(out.detach().double(), y, reduction="none")


def _resolve(model: nn.Module, layers: Any) -> list[str]:
    names = resolve_layers(unwrap_model(model), layers)
    if not names:
        raise ValueError("layers: no hidden layer selected (pass layers=... explicitly)")
    return names


def version_key(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """In-place version counters of ``tensors`` (changes whenever one is modified)."""
    return tuple(t._version for t in tensors)


def digest(tensors: Iterable[Any]) -> str:
    """Exact content hash of tensors (bytes, dtype, shape)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        flat = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
