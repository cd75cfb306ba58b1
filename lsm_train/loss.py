"""Separability auxiliary loss on hidden layers (docs/loss.md).

    reg = lt.LSMLoss(model, layers=["layer3", "layer4"], weight=0.1)
    loss = F.cross_entropy(model(x), y) + reg(y)

The regulariser of a batch with labels y is

    R = weight · ramp · Σ_l α_l · (1 − S_l),     S_l = soft_md_lsm(H_l, y, tau, scheme, ...)

where H_l is the output of layer l in the latest forward pass (captured with
:class:`~lsm_train.capture.HiddenCapture`, ``detach=False``, so R has gradients to the model),
S_l ∈ (0, 1) is the differentiable soft MD-LSM (:func:`lsm_train.measures.soft.soft_md_lsm`) and

* α_l = ``layer_weights``: by default uniform 1/L, so ``weight`` means the same for one layer
  or ten (R ≤ weight); a dict {layer name: α} or a list in ``names`` order is used as given
  (not renormalised).
* ramp = min(1, k / ``warmup_steps``) on the call with index k = 0, 1, ... (calls counted
  only while both the loss module and the model are in training mode): a linear warmup from
  0, full weight from call ``warmup_steps`` on. The counter is the buffer ``num_steps``, so
  it is in ``state_dict()`` and a resumed run continues the ramp.
* A batch with fewer than two classes gives S_l = 1 exactly, so it contributes 0 with a zero
  (never NaN) gradient; such batches are counted in ``skipped``.
* Non-finite features (a diverged model) make ``LSMLoss`` return NaN, like the task loss,
  so the caller's ``isfinite(loss)`` check sees it; ``lsm_loss`` raises a ValueError instead.

The score is computed in float32 or float64 with autocast disabled (half-precision
features are upcast), since it solves a small linear system.

Data parallel (DDP). With ``gather=True`` and an initialized ``torch.distributed`` group of
W > 1 ranks, S_l is computed on the features and labels of *all* ranks' batches
(:func:`lsm_train.distributed.all_gather_cat`, unequal batch sizes allowed), so it is the
score of the global batch, the same value on every rank. With equal batch sizes the rows are
interleaved (rank 0's first sample, rank 1's first, ...), which undoes strided sharding
(``DistributedSampler``): the batch is the single-process global batch in its order, so
order-dependent options (``crossfit``) give the single-process value too. The gradient
flows to the local slice only; the regulariser's gradient is multiplied by W (its value is
unchanged) so that after DDP averages the gradients over the ranks, the update equals the
single-process gradient of R on the global batch. Cost per step and layer: one all-gather
of W·max n_r·d numbers, and the score on N = W·n samples instead of n
(O(N·d·min(N, d) + N²)). ``gather=False`` (default) scores each rank's own batch (no
communication).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lsm_train._validation import check_choice, check_int, check_positive, check_scheme, check_unit
from lsm_train.capture import HiddenCapture
from lsm_train.distributed import world_size
from lsm_train.features import REDUCTIONS
from lsm_train.layer_scores import (
    batch_labels,
    check_label_range,
    combine,
    gather_ranks,
    reference_scores,
    static_layer_scores,
)

__all__ = ["LSMLoss", "lsm_loss"]

# --------------------------------------------------------------------------- validation


def _check_options(tau: Any, scheme: Any, shrinkage: Any, reduce: Any) -> float:
    tau = check_positive(tau, "tau")
    check_scheme(scheme)
    check_unit(shrinkage, "shrinkage")
    check_choice(reduce, "reduce", REDUCTIONS)
    return tau


def _layer_weights(layer_weights: Any, names: list[str]) -> list[float]:
    """α per layer, in ``names`` order (default uniform 1/L)."""
    L = len(names)
    if layer_weights is None:
        return [1.0 / L] * L
    if isinstance(layer_weights, Mapping):
        keys = list(layer_weights)
        missing = [n for n in names if n not in layer_weights]
        unknown = [k for k in keys if k not in names]
        if missing or unknown:
            raise ValueError(
                f"layer_weights: expected one weight per layer {names}; "
                f"missing {missing}, unknown {unknown}"
            )
        values = [layer_weights[n] for n in names]
    elif isinstance(layer_weights, (Sequence, torch.Tensor)) and not isinstance(
        layer_weights, str
    ):
        values = [float(v) for v in layer_weights]
        if len(values) != L:
            raise ValueError(
                f"layer_weights: expected {L} weights (one per layer {names}), got {len(values)}"
            )
    else:
        raise ValueError(
            f"layer_weights: expected None, a dict {{layer: weight}} or a list, got "
            f"{type(layer_weights).__name__}"
        )
    alphas = [check_positive(v, f"layer_weights[{n!r}]", allow_zero=True)
              for n, v in zip(names, values, strict=True)]
    if sum(alphas) == 0:
        raise ValueError("layer_weights: all weights are 0; set weight=0 to switch the loss off")
    return alphas


# --------------------------------------------------------------------------- functional


def lsm_loss(
    features: Mapping[str, torch.Tensor] | torch.Tensor,
    labels: Any,
    *,
    weight: float = 0.1,
    layer_weights: Any = None,
    tau: float = 0.5,
    scheme: str = "pairwise",
    shrinkage: float = 0.1,
    detach_directions: bool = False,
    reduce: str = "auto",
    crossfit: bool = True,
    gather: bool = False,
    process_group: Any = None,
    num_classes: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """``weight · Σ_l α_l (1 − soft_md_lsm(features_l, labels))`` as a 0-dim tensor.

    ``features`` is a dict {layer name: (N, ...) tensor} (e.g. a HiddenCapture's dict with
    ``detach=False``) or a single tensor; α as in :class:`LSMLoss` (default uniform 1/L).
    ``gather``: score the features of all ranks (see the module docstring); the returned
    value is the same on every rank, its gradient reaches the local features only
    (not rescaled here: this function knows nothing of DDP's averaging).
    ``num_classes``: the static path, all layers in one batched call (see :class:`LSMLoss`);
    ``validate``: then check the labels' range first (one host read).
    """
    weight = check_positive(weight, "weight", allow_zero=True)
    tau = _check_options(tau, scheme, shrinkage, reduce)
    if isinstance(features, torch.Tensor):
        features = {"features": features}
    if not isinstance(features, Mapping):
        raise ValueError(
            f"features: expected a tensor or a dict {{layer: tensor}}, got "
            f"{type(features).__name__}"
        )
    if not features:
        raise ValueError("features: expected at least one layer, got an empty dict")
    for name, f in features.items():
        if not isinstance(f, torch.Tensor):
            raise ValueError(f"features[{name!r}]: expected a tensor, got {type(f).__name__}")
    alphas = _layer_weights(layer_weights, list(features))
    y = batch_labels(labels, features)
    if gather:
        features, y = gather_ranks(features, y, process_group)
    if num_classes is None:  # soft_md_lsm checks the labels with its own host read
        scores, _ = reference_scores(features, y, tau, scheme, shrinkage, detach_directions,
                                     reduce, bool(crossfit))
    else:
        _check_static_options(num_classes, detach_directions)
        if validate:
            check_label_range(y, num_classes)
        scores, _ = static_layer_scores(features, y, num_classes, tau, scheme, shrinkage,
                                        reduce, bool(crossfit))
    return weight * combine(scores, alphas)


def _check_static_options(num_classes: Any, detach_directions: bool) -> int:
    num_classes = check_int(num_classes, "num_classes (None or an integer)", 1)
    if detach_directions:
        raise ValueError("detach_directions=True is not supported with num_classes "
                         "(the static path); leave num_classes=None for it")
    return num_classes


# --------------------------------------------------------------------------- module


class LSMLoss(nn.Module):
    """Auxiliary separability loss with its own long-lived hidden-layer capture.

    Args:
        model: the network (DDP / torch.compile wrappers accepted, see HiddenCapture).
        layers: names, glob patterns or module classes; None = ``model.hidden_layers``.
        weight: overall weight >= 0 (the loss is at most ``weight`` with default α).
        layer_weights: None (uniform 1/L), dict {layer name: α} or list in ``names`` order.
        tau, scheme, shrinkage, detach_directions, reduce, crossfit: passed to
            ``soft_md_lsm``; ``crossfit=True`` (the default here, as in the app: the
            2-fold cross-fitted score) keeps a gradient when a wide layer makes every
            batch separable (d + 1 >= n); ``False`` scores the batch in-sample.
        warmup_steps: length of the linear ramp of the weight from 0 (int >= 0).
        gather: under torch.distributed, score the features gathered from all ranks (the
            global batch) instead of the local batch; see the module docstring.
        process_group: the group to gather over (default: the world).
        output_index: which tensor of a tuple/dict layer output (see HiddenCapture).
        num_classes: K: the static, sync-free path (labels in [0, K)): all layers scored in
            one batched call with no host read, counters kept on the features' device; works
            with ``torch.compile`` and CUDA graphs. The labels' range is checked on the first
            call (one host read); later, a label outside [0, K) gives a NaN loss.
            Not with ``detach_directions``.

    Use: run ``model(x)``, then ``reg(labels)`` once; the captured features are consumed
    (dropped) by the call, so a second call without a new forward pass raises. The model
    is not a submodule: ``reg.state_dict()`` holds only the counters ``num_steps`` and
    ``num_skipped``, and ``reg.parameters()`` is empty. ``remove()`` detaches the hooks.
    The counters follow the features to their device (moved once, on the first call), so
    updating them costs no host sync; ``steps``, ``skipped``, ``nonfinite`` and ``last``
    read them (call those only when logging).
    """

    num_steps: torch.Tensor
    num_skipped: torch.Tensor
    num_nonfinite: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        layers: Any = None,
        weight: float = 0.1,
        layer_weights: Any = None,
        tau: float = 0.5,
        scheme: str = "pairwise",
        warmup_steps: int = 0,
        shrinkage: float = 0.1,
        reduce: str = "auto",
        detach_directions: bool = False,
        *,
        output_index: int | str = 0,
        crossfit: bool = True,
        gather: bool = False,
        process_group: Any = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None:
            _check_static_options(num_classes, detach_directions)
        self.num_classes = num_classes
        self._range_checked = False
        self.weight = check_positive(weight, "weight", allow_zero=True)
        self.tau = _check_options(tau, scheme, shrinkage, reduce)
        self.scheme = scheme
        self.shrinkage = float(shrinkage)
        self.reduce = reduce
        self.detach_directions = bool(detach_directions)
        self.crossfit = bool(crossfit)
        self.gather = bool(gather)
        self.process_group = process_group
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        capture = HiddenCapture(model, layers, detach=False, output_index=output_index)
        try:
            self.alphas = _layer_weights(layer_weights, capture.names)
        except ValueError:
            capture.remove()
            raise
        self.capture = capture  # a plain attribute: the model is not a submodule
        self._hooked = True
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_nonfinite", torch.zeros((), dtype=torch.long), persistent=False)
        self._last: dict[str, torch.Tensor] = {}

    # -- read-only views -----------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The captured layers, in order."""
        return self.capture.names

    @property
    def steps(self) -> int:
        """Training-mode calls so far (drives the warmup)."""
        return int(self.num_steps)

    @property
    def skipped(self) -> int:
        """Batches with fewer than two classes to score (they contributed 0); with
        ``crossfit``, classes of one sample are not scored."""
        return int(self.num_skipped)

    @property
    def nonfinite(self) -> int:
        """Layer scores that were NaN (non-finite features) since construction (not saved)."""
        return int(self.num_nonfinite)

    @property
    def last(self) -> dict[str, float]:
        """Per-layer soft scores S_l of the latest call, as floats (for logging)."""
        return {name: float(s) for name, s in self._last.items()}

    def ramp(self) -> float:
        """Warmup factor the next call will use."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, self.steps / self.warmup_steps)

    # -- the loss --------------------------------------------------------------------------
    def forward(self, labels: Any) -> torch.Tensor:
        """R for the features of the latest forward pass (see the module docstring)."""
        if not self._hooked:  # not capture.attached: dynamo cannot trace its hook handles
            raise RuntimeError("LSMLoss: the hooks were removed (remove()); create a new LSMLoss")
        feats = self.capture.features
        if not feats:
            raise RuntimeError(
                "LSMLoss: no hidden features captured; run model(x) before each reg(labels) "
                "call (features are used once)"
            )
        missing = [n for n in self.names if n not in feats]
        if missing:
            raise RuntimeError(
                f"LSMLoss: layers {missing} did not run in the latest forward pass "
                f"(captured: {list(feats)})"
            )
        feats = {n: feats[n] for n in self.names}
        y = batch_labels(labels, feats)
        self._follow(y.device)
        world = 1
        if self.gather:
            world = world_size(self.process_group)
            if world > 1:
                feats, y = gather_ranks(feats, y, self.process_group)
        if self.num_classes is None:
            scores, degenerate = reference_scores(
                feats, y, self.tau, self.scheme, self.shrinkage, self.detach_directions,
                self.reduce, self.crossfit, nan_if_not_finite=True,
            )
        else:
            if not self._range_checked and not torch.compiler.is_compiling():
                check_label_range(y, self.num_classes)
                self._range_checked = True
            scores, degenerate = static_layer_scores(
                feats, y, self.num_classes, self.tau, self.scheme, self.shrinkage, self.reduce,
                self.crossfit,
            )
        self.capture.clear()
        self._last = {n: s.detach() for n, s in scores.items()}
        self.num_skipped += degenerate
        last = torch.stack([s.to(y.device) for s in self._last.values()])
        self.num_nonfinite += (~torch.isfinite(last)).sum()
        reg = self.weight * combine(scores, self.alphas)
        if self.warmup_steps:
            ramp = (self.num_steps.double() / self.warmup_steps).clamp(max=1.0)
            reg = reg * ramp.to(device=reg.device, dtype=reg.dtype)
        if world > 1:  # same value; gradient x W, undone by DDP's average over W ranks
            reg = reg * world - reg.detach() * (world - 1)
        if self.training and self.capture.module.training:
            self.num_steps += 1
        return reg

    def _follow(self, device: torch.device) -> None:
        """Move the counters to ``device`` (once) so that updating them needs no sync."""
        for name in ("num_steps", "num_skipped", "num_nonfinite"):
            buf = getattr(self, name)
            if buf.device != device:
                setattr(self, name, buf.to(device))

    def remove(self) -> None:
        """Remove the hooks from the model and drop captured features (idempotent)."""
        self.capture.remove()
        self.capture.clear()
        self._hooked = False

    def extra_repr(self) -> str:
        return (
            f"layers={self.names}, weight={self.weight}, tau={self.tau}, scheme={self.scheme!r}, "
            f"warmup_steps={self.warmup_steps}, shrinkage={self.shrinkage}"
            + (", gather=True" if self.gather else "")
            + (f", num_classes={self.num_classes}" if self.num_classes is not None else "")
        )
