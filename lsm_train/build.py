"""Everything the trainer needs, built from a validated config in one place (``docs/app.md``).

:func:`build_run` returns a :class:`RunParts`: the data, the model (on its device, wrapped
in ``DistributedDataParallel`` under ``trainer.strategy=ddp`` with W > 1 processes), the
layers, the monitor's probe sets, the optimizer, the learning-rate schedule, the
:class:`~lsm_train.loss.LSMLoss` and the :class:`~lsm_train.guard.SeparabilityGuard` of the
``lsm.mode``, and the run's length. The optimizer (``optim``), the schedule (``sched``),
the loss (``lsm.loss``) and the guard (``lsm.guard``) are each made by
``hydra.utils.instantiate`` of their section as a partial (``_target_``, ``_partial_``),
then called with what only the run knows: the parameters; the optimizer and the number of
steps; the model and the layers; the optimizer, the model, the probe and the layers.
The config is checked first by :func:`lsm_train.config_check.validate_config`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from lsm_train import distributed as dist_utils
from lsm_train.capture import resolve_layers
from lsm_train.config_errors import build_section
from lsm_train.custom import data_from_target, model_from_target
from lsm_train.data import DataBundle, load_data
from lsm_train.models import create_model
from lsm_train.schedules import lr_schedule

__all__ = [
    "RunParts",
    "build_run",
    "build_data",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_loss",
    "build_guard",
    "pretrain",
    "plain",
    "resolve_device",
    "seed_everything",
]

DATA_KEYS = ("batch_size", "eval_batch_size", "name", "augment", "_target_")  # the trainer's


def plain(cfg: Any) -> Any:
    """A resolved plain container of an OmegaConf node; anything else unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.device={device}: CUDA is not available here; use trainer.device=auto or cpu"
        )
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _partial(section: str, cfg: Any, default_target: str | None = None) -> Callable[..., Any]:
    """``instantiate(cfg, _partial_=True)``, with errors naming ``section``."""
    node = dict(plain(cfg) or {})
    if default_target is not None:
        node.setdefault("_target_", default_target)
    node["_partial_"] = True
    node.setdefault("_convert_", "all")  # plain lists and dicts reach the target
    try:
        return instantiate(node)
    except Exception as err:  # hydra wraps import and call errors in its own types
        raise ValueError(f"{section}._target_: cannot build {node.get('_target_')!r}: "
                         f"{err}") from err


def build_data(dcfg: Mapping[str, Any]) -> DataBundle:
    """The train and test sets of the ``data`` section (the zoo's ``name`` or ``_target_``)."""
    dcfg = dict(dcfg)
    if dcfg.get("_target_"):  # own data (lsm_train.custom)
        return data_from_target(dcfg, skip=DATA_KEYS)
    return load_data(dcfg.get("name", "digits"),
                     **{k: v for k, v in dcfg.items() if k not in DATA_KEYS})


def build_model(mcfg: Mapping[str, Any], data: DataBundle,
                model_factory: Callable[[DataBundle], nn.Module] | None = None) -> nn.Module:
    """``model_factory(data)`` when given, else the ``model`` section: an own factory
    (``_target_``) or the zoo's ``name`` with ``kwargs``."""
    if model_factory is not None:
        return model_factory(data)
    mcfg = dict(mcfg)
    if mcfg.get("_target_"):
        return model_from_target(mcfg, data)
    try:
        return create_model(mcfg.get("name", "mlp"), num_classes=data.num_classes,
                            in_channels=data.in_channels, image_size=data.image_size,
                            **dict(mcfg.get("kwargs") or {}))
    except ValueError as err:
        if "unknown option" not in str(err):
            raise
        raise ValueError(
            f"{err}. model.kwargs come from conf/model/<name>.yaml and the recipe; "
            "after model=<other> on a recipe that sets model.kwargs, use that "
            "family's recipe or drop a key with ~model.kwargs.<key>"
        ) from err


def build_optimizer(ocfg: Any, module: nn.Module) -> torch.optim.Optimizer:
    """The ``optim`` section's ``_target_`` called with the trainable parameters."""
    make = _partial("optim", ocfg)
    params = [p for p in module.parameters() if p.requires_grad]
    return build_section("optim", make, params)


def build_scheduler(optimizer: torch.optim.Optimizer, scfg: Any,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The ``sched`` section's ``_target_`` (default :func:`lsm_train.schedules.lr_schedule`)
    called with the optimizer, and ``total_steps`` when the target takes it."""
    target = dict(plain(scfg) or {}).get("_target_")
    make = _partial("sched", scfg, default_target="lsm_train.schedules.lr_schedule")
    kwargs = {"total_steps": total_steps} if target in (None, _LR_SCHEDULE) else {}
    return build_section("sched", lambda: make(optimizer, **kwargs))


_LR_SCHEDULE = f"{lr_schedule.__module__}.{lr_schedule.__name__}"


def build_loss(lcfg: Any, module: nn.Module, layers: list[str], num_classes: int) -> nn.Module:
    """The ``lsm.loss`` section's ``_target_`` (LSMLoss) on ``layers`` of ``module``, given
    ``num_classes`` (the static path) unless the section sets it or ``detach_directions``
    (which needs the dynamic path) is on."""
    node = dict(plain(lcfg) or {})
    if not node.get("detach_directions"):
        node.setdefault("num_classes", num_classes)
    return build_section("lsm.loss", _partial("lsm.loss", node), module, layers)


def build_guard(gcfg: Any, optimizer: torch.optim.Optimizer, module: nn.Module,
                layers: list[str], data: DataBundle, device: torch.device,
                seed: int) -> torch.optim.Optimizer:
    """The ``lsm.guard`` section's ``_target_`` (SeparabilityGuard) around ``optimizer``, on
    the first ``probe_size`` training samples (the same on every rank; under DDP the guard
    all-reduces its scores, so every rank takes the same decision)."""
    node = dict(plain(gcfg) or {})
    n = min(int(node.pop("probe_size")), len(data.train))  # config_check.GUARD_BUILD_KEYS
    node.setdefault("seed", seed)  # measure=random draws from the guard's generator
    gx, gy = data.train.batch(torch.arange(n))
    return build_section("lsm.guard", _partial("lsm.guard", node), optimizer, module,
                         (gx.to(device), gy.to(device)), layers)


def pretrain(module: nn.Module, data: DataBundle, device: torch.device, seed: int,
             pcfg: Any) -> dict[str, float]:
    """Greedy pretraining (``model.pretrain``, e.g. the DBN's CD-k) when ``trainer.pretrain``
    is set; returns ``pretrain/recon_error_<i>`` of each stage."""
    pcfg = dict(plain(pcfg) or {})
    if not pcfg or not int(pcfg.get("epochs", 0)):
        return {}
    target = getattr(module, "pretrain", None)
    if not callable(target):
        raise ValueError(
            f"trainer.pretrain: model {type(module).__name__} has no pretrain method; "
            "set trainer.pretrain=null"
        )
    x = data.train.prepare(data.train.x).to(device)
    history = target(x, seed=seed, **pcfg)
    return {f"pretrain/recon_error_{i}": float(errs[-1])
            for i, errs in enumerate(history or []) if errs}


@dataclass
class RunParts:
    """What :func:`build_run` makes (module doc)."""

    data: DataBundle
    module: nn.Module  # the model itself
    model: nn.Module  # what the training step calls: ``module`` or its DDP wrapper
    layers: list[str]
    probe: tuple[torch.Tensor, torch.Tensor]  # monitor probe (first training samples)
    optimizer: torch.optim.Optimizer
    step_optimizer: torch.optim.Optimizer  # the guard around ``optimizer``, or ``optimizer``
    scheduler: Any
    reg: nn.Module | None  # LSMLoss
    guard: torch.optim.Optimizer | None
    steps_per_epoch: int
    total_steps: int


def _wrap_ddp(module: nn.Module, device: torch.device, ddp_cfg: Mapping[str, Any]) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(ddp_cfg["find_unused_parameters"]),
        broadcast_buffers=bool(ddp_cfg["broadcast_buffers"]),
    )


def build_run(cfg: Mapping[str, Any], device: torch.device, *, ddp: bool,
              model_factory: Callable[[DataBundle], nn.Module] | None = None) -> RunParts:
    """Data, model, layers, probe, optimizer, schedule, loss and guard of ``cfg`` (a plain
    validated config: ``seed``, ``trainer``, ``data``, ``model``, ``optim``, ``sched``,
    ``lsm``), in that order, so that the model's initial weights follow from ``seed``."""
    tcfg, lcfg, dcfg = cfg["trainer"], cfg["lsm"], cfg["data"]
    data = build_data(dcfg)
    n, world = len(data.train), dist_utils.world_size()
    # DDP: every rank sees n // W samples per epoch, in batches of data.batch_size
    steps_per_epoch = max(1, (n // world) // int(dcfg["batch_size"]))
    total_steps = int(tcfg["epochs"]) * steps_per_epoch
    if tcfg["max_steps"] is not None:
        total_steps = min(total_steps, int(tcfg["max_steps"]))
    module = build_model(cfg["model"], data, model_factory).to(device)
    model = _wrap_ddp(module, device, tcfg["ddp"]) if ddp else module
    mode = lcfg["mode"]
    # lsm=off disables the monitor in its config; a recipe may switch it back on
    needs_layers = lcfg["monitor"]["enabled"] or mode in ("loss", "guard", "both")
    layers = resolve_layers(module, lcfg["layers"]) if needs_layers else []
    probe = data.train.batch(torch.arange(min(int(lcfg["monitor"]["probe_size"]), n)))
    optimizer = build_optimizer(cfg["optim"], module)
    reg = guard = None
    if mode in ("loss", "both"):
        reg = build_loss(lcfg["loss"], module, layers, data.num_classes)
    if mode in ("guard", "both"):
        guard = build_guard(lcfg["guard"], optimizer, module, layers, data, device,
                            int(cfg["seed"]))
    # the schedule drives the inner optimizer: the guard shares its param_groups
    scheduler = build_scheduler(optimizer, cfg["sched"], total_steps)
    return RunParts(data=data, module=module, model=model, layers=layers, probe=probe,
                    optimizer=optimizer,
                    step_optimizer=guard if guard is not None else optimizer,
                    scheduler=scheduler, reg=reg, guard=guard,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)
