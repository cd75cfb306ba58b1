"""PyTorch Lightning integration (``pip install 'lsm_train[lightning]'``).

    trainer = lightning.Trainer(callbacks=[SeparabilityMonitor(probe=(x, y), every_n_steps=50)])

:class:`SeparabilityMonitor` is a ``Callback`` that, every ``every_n_steps`` optimizer steps
(and once before the first), measures the cross-fitted MD-LSM
(:func:`lsm_train.measures.layer.layer_separability`) of the chosen hidden layers of the
LightningModule on a fixed probe set, in eval mode without gradients, and logs
``lsm/<layer>`` (and ``lsm/mean``) through every logger of the Trainer (CSV, TensorBoard,
wandb, ...) at ``trainer.global_step``, from global rank 0. Layers resolve against the
LightningModule itself (``"model.blocks.0"`` for a network stored as ``self.model``);
``None`` takes ``hidden_layers`` or the automatic choice. Every measurement is one forward
pass over the probe (in batches) for all layers; with ``method="fisher"`` (the trainer's
fast monitor, docs/monitor.md) the features stay on the module's device, the probe labels
are laid out once, and all layers are scored in one batched pass with one host read
(:func:`lsm_train.monitor.score_sets`).

``SeparabilityGuard`` and ``LSMLoss`` need nothing from this module: return the guard from
``configure_optimizers`` (build any scheduler on the guard, not on the inner optimizer) and
add ``LSMLoss`` to the loss in ``training_step``; see docs/integrations.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lsm_train.integrations.lightning needs Lightning: pip install 'lsm_train[lightning]'"
    ) from err

from lsm_train._validation import check_choice, check_int
from lsm_train.capture import HiddenCapture, resolve_layers
from lsm_train.features import reduce_features
from lsm_train.measures.layer import METHODS
from lsm_train.monitor import score_layers
from lsm_train.probe import eval_mode

__all__ = ["METHODS", "SeparabilityMonitor"]


class SeparabilityMonitor(Callback):
    """Log the MD-LSM of hidden layers of the LightningModule during ``fit``.

    Args:
        probe: ``(inputs, y)`` with integer labels ``y`` (at least 2 classes); ``inputs``
            is a tensor, a tuple of tensors (positional arguments of ``forward``) or a dict
            of tensors (keyword arguments), each with ``len(y)`` rows. Or a callable
            returning such a pair (called once, at the first measurement).
        every_n_steps: measure when ``trainer.global_step`` is a multiple of this (>= 1).
        layers: names / patterns / classes as for :class:`~lsm_train.HiddenCapture`.
        method: ``"fisher"`` (default: fast, batched, as the trainer's monitor),
            ``"degree"``, ``"margin"`` or ``"soft"``.
        holdout: cross-fitting fraction for the degree and fisher (None: in-sample).
        batch_size: probe batch size of the forward passes.
        prefix: metric name prefix.
    """

    def __init__(
        self,
        probe: tuple[Any, torch.Tensor] | Callable[[], tuple[Any, torch.Tensor]],
        every_n_steps: int = 50,
        *,
        layers: Any = None,
        method: str = "fisher",
        holdout: float | None = 0.5,
        batch_size: int = 512,
        prefix: str = "lsm/",
    ) -> None:
        check_int(every_n_steps, "every_n_steps", 1)
        check_choice(method, "method", METHODS)
        if not callable(probe) and not (isinstance(probe, (tuple, list)) and len(probe) == 2):
            raise ValueError(
                "probe: expected an (inputs, labels) pair or a callable returning one, got "
                f"{type(probe).__name__}"
            )
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.method = method
        self.holdout = holdout if method in ("degree", "fisher") else None
        self.batch_size = int(batch_size)
        self.prefix = prefix
        self.names: list[str] = []
        self.last: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self._measured_at: int | None = None
        self._layout: Any = None  # fisher: the probe labels laid out (False: cannot be)

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.names = resolve_layers(pl_module, self.layers)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._maybe_measure(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"measured_at": self._measured_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._measured_at = state_dict.get("measured_at")

    # -- measuring --------------------------------------------------------------------------
    def _maybe_measure(self, trainer: Any, pl_module: Any) -> None:
        step = int(trainer.global_step)
        if step % self.every_n_steps or step == self._measured_at:
            return
        self._measured_at = step
        if not trainer.is_global_zero:
            return
        scores = self.measure(pl_module)
        metrics = {f"{self.prefix}{name}": value for name, value in scores.items()}
        if scores:
            metrics[f"{self.prefix}mean"] = sum(scores.values()) / len(scores)
        self.last = scores
        self.history.append((step, scores))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _probe_pair(self) -> tuple[Any, torch.Tensor]:
        if callable(self.probe):
            self.probe = tuple(self.probe())
        x, y = self.probe
        return x, torch.as_tensor(y)

    @torch.no_grad()
    def measure(self, pl_module: torch.nn.Module) -> dict[str, float]:
        """The MD-LSM of each layer on the probe (eval mode; training flags restored)."""
        if not self.names:
            self.names = resolve_layers(pl_module, self.layers)
        x, y = self._probe_pair()
        device = next(pl_module.parameters()).device
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        with eval_mode(pl_module), HiddenCapture(pl_module, self.names) as feats:
            for start in range(0, len(y), self.batch_size):
                _call(pl_module, x, slice(start, start + self.batch_size), device)
                for name in self.names:  # (n, d) as reduce="auto", on the device
                    parts[name].append(reduce_features(feats[name].float()))
        features = {name: torch.cat(chunks) for name, chunks in parts.items()}
        if self.method == "fisher":
            return self._fisher_scores(features, y.to(device))
        features = {name: H.cpu() for name, H in features.items()}
        return score_layers(features, y.cpu(), method=self.method, holdout=self.holdout)

    def _fisher_scores(self, features: dict[str, torch.Tensor],
                       y: torch.Tensor) -> dict[str, float]:
        """All layers in one batched pass on the features' device, one host read; the
        label layout is built at the first call. NaN (with a warning) when the probe
        labels cannot be cross-fitted."""
        from lsm_train.measures.fisher import FisherLayout
        from lsm_train.monitor import score_sets

        if self._layout is None:
            try:
                self._layout = FisherLayout(y, "pairwise", self.holdout, 0, device=y.device)
            except ValueError as err:
                warnings.warn(f"MD-LSM not computed: {err}", RuntimeWarning, stacklevel=3)
                self._layout = False
        if self._layout is False:
            return {name: float("nan") for name in features}
        if self._layout.device != y.device:
            self._layout.to(y.device)
        return score_sets([(features, self._layout)])[0][0]


def _call(module: torch.nn.Module, inputs: Any, rows: slice, device: torch.device) -> Any:
    """``module(inputs[rows])`` for a tensor, ``module(*...)`` for a tuple/list and
    ``module(**...)`` for a dict of tensors."""
    if isinstance(inputs, dict):
        return module(**{k: v[rows].to(device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return module(*(v[rows].to(device) for v in inputs))
    return module(inputs[rows].to(device))
