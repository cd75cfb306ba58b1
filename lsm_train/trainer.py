"""The training loop behind ``lsm-train``: task loss (+ LSMLoss), optimizer (+ guard), monitor.

One step: forward a batch, ``loss = cross_entropy + reg(labels)`` when the LSM loss is on,
backward, ``optimizer.step()`` (a :class:`~lsm_train.guard.SeparabilityGuard` around the
configured optimizer when the guard is on), scheduler step. At step 0, at the last step and
in between as :class:`~lsm_train.monitor.MonitorSchedule` decides (every
``trainer.monitor_every_n_steps`` steps and at epoch ends, or, when that is null, spaced so
that the monitor takes at most ``lsm.monitor.budget`` of the training time) the monitor
computes, for each hidden layer, the cross-fitted separability
``layer_separability(H, y, method=lsm.monitor.method, holdout=0.5)`` (default the fast
``"fisher"`` score, all layers in one batched pass; docs/monitor.md) on a fixed probe set
taken from the training data (``lsm/<layer>``) and on the test set (``val_lsm/<layer>``),
plus the test loss and accuracy.

Reproducibility: the batch order of epoch ``e`` is ``epoch_order(n, seed, e)``; checkpoints
hold the model, optimizer, guard, scheduler and loss states, the RNG states, the position
inside the epoch and the running sums of the current log interval, so ``resume`` ends in
exactly the state (and ``metrics.jsonl``) of an uninterrupted run.

Stopping: SIGTERM/SIGINT set a flag; the loop finishes the current step, writes a
checkpoint and returns ``status="interrupted"``. A non-finite loss stops the run before the
update (``status="nan"``), leaving the last good checkpoint untouched; a checkpoint is only
written from finite parameters (else the run stops the same way). A resume is checked by
:mod:`lsm_train.resume` before anything is built. Run folders and resume: ``docs/runs.md``.

Data parallel (``trainer.strategy=ddp`` inside an initialized ``torch.distributed`` group of
W > 1 processes): rank r trains on ``shard_indices(epoch order, r, W)`` (as
``DistributedSampler(drop_last=True)``; ``data.batch_size`` is per process, the global batch
is W times larger) with the model wrapped in ``DistributedDataParallel``. The ranks agree
on every stop (a non-finite loss on any rank, a signal on any rank) through one small
all-reduce per step. The monitor splits the test set and the probe over the ranks:
val loss/accuracy are exact sums over ranks; the layer scores are either computed on rank 0
from the gathered probe features (``lsm.monitor.gather=true``: the single-process value) or
averaged over the ranks' local scores (``false``). Train metrics are summed over ranks.
Only rank 0 logs (``metrics.jsonl``, wandb) and writes checkpoints; every rank loads the
checkpoint on resume.
"""

from __future__ import annotations

import math
import random
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lsm_train import distributed as dist_utils
from lsm_train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lsm_train.data import ArrayDataset, DataBundle, epoch_order, load_data
from lsm_train.tracking import Tracker

__all__ = [
    "Trainer",
    "TrainResult",
    "resolve_device",
    "seed_everything",
    "build_scheduler",
    "measure_layers",
    "evaluate",
    "LSM_MODES",
    "NullTracker",
]

LSM_MODES = ("off", "monitor", "loss", "guard", "both")
CHECKPOINT_NAME = "checkpoint.pt"
_DATA_KEYS = ("batch_size", "eval_batch_size", "name", "augment", "_target_")


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and random ``pad``-pixel translation (zero-padded crop) of a
    batch of images ``(B, C, H, W)``, drawn from ``gen`` (the usual CIFAR augmentation)."""
    if x.ndim != 4:
        return x
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for DictConfig / dict / object, with a default."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            val = cfg.get(key, default)
        except Exception:  # noqa: BLE001
            val = default
        return default if val is None else val
    return getattr(cfg, key, default)


def _plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Per-step LR schedule from ``sched`` config: ``name`` none | cosine | step | linear.

    ``warmup_steps`` ramps linearly from 0; ``cosine`` decays to ``min_lr_ratio``;
    ``step`` multiplies by ``gamma`` every ``step_size`` steps; ``linear`` decays to
    ``min_lr_ratio`` at the last step.
    """
    name = _get(cfg, "name", "none")
    if name in (None, "none"):
        return None
    warmup = int(_get(cfg, "warmup_steps", 0))
    floor = float(_get(cfg, "min_lr_ratio", 0.0))
    gamma = float(_get(cfg, "gamma", 0.1))
    step_size = int(_get(cfg, "step_size", max(1, total_steps // 3)))
    span = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / span)
        if name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if name == "linear":
            return floor + (1 - floor) * (1 - t)
        if name == "step":
            return gamma ** ((step - warmup) // step_size)
        raise ValueError(f"sched.name: expected none, cosine, linear or step, got {name!r}")

    factor(0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ArrayDataset, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``data``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    n = max(1, len(data))
    return total_loss / n, correct / n


def _evaluate_ddp(
    model: nn.Module, data: ArrayDataset, device: torch.device, batch_size: int
) -> tuple[float, float]:
    """:func:`evaluate` with the samples split over the ranks and the sums all-reduced."""
    was_training = model.training
    model.eval()
    idx_all = torch.arange(dist_utils.rank(), len(data), dist_utils.world_size())
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, idx_all.shape[0], batch_size):
            x, y = data.batch(idx_all[start : start + batch_size])
            x, y = x.to(device), y.to(device)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    total_loss, correct = dist_utils.all_reduce_sum([total_loss, correct], device=device)
    n = max(1, len(data))
    return total_loss / n, correct / n


def capture_layers(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: list[str], batch_size: int = 512
) -> tuple[dict[str, torch.Tensor], int]:
    """Float32 CPU features (n, d) of each layer on ``x`` (eval mode; every module's own
    train/eval flag is restored afterwards) and the number of correct predictions. ``x`` and
    ``y`` may live anywhere: each batch is moved to the model's device."""
    from lsm_train.monitor import capture

    feats, stats = capture(model, x, y, layers, batch_size)
    return {name: H.cpu() for name, H in feats.items()}, int(stats["correct"])


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
    from lsm_train.measures.layer import layer_separability

    if method == "fisher":
        from lsm_train.monitor import score_sets

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


@torch.no_grad()
def measure_layers(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: list[str],
    *,
    method: str = "degree",
    holdout: float | None = 0.5,
    seed: int = 0,
    batch_size: int = 512,
) -> tuple[dict[str, float], float]:
    """Cross-fitted MD-LSM of each layer on ``(x, y)`` and the accuracy on it (eval mode)."""
    feats, correct = capture_layers(model, x, y, layers, batch_size)
    scores = score_layers(feats, y, method=method, holdout=holdout, seed=seed)
    return scores, correct / max(1, x.shape[0])


def measure_layers_ddp(
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
    """:func:`measure_layers` with the samples split over the ranks (``x[r::W]`` on rank r).

    ``gather=True``: the features are gathered (all ranks' shares, put back in the order of
    ``x``) and rank 0 scores them: the single-process values; other ranks return ``{}``.
    ``gather=False``: each rank scores its share; the scores are averaged over the ranks
    (every rank gets the mean). The accuracy is exact in both cases (summed over ranks).
    """
    r, w = dist_utils.rank(), dist_utils.world_size()
    n = x.shape[0]
    feats, correct = capture_layers(model, x[r::w], y[r::w], layers, batch_size)
    (correct,) = dist_utils.all_reduce_sum([correct])
    acc = correct / max(1, n)
    kw = dict(method=method, holdout=holdout, seed=seed)
    if not gather:
        local = score_layers(feats, y[r::w], **kw)
        summed = dist_utils.all_reduce_sum([local[name] for name in layers])
        return {name: v / w for name, v in zip(layers, summed, strict=True)}, acc
    order = torch.cat([torch.arange(k, n, w) for k in range(w)])  # gathered row -> sample
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    full = {name: dist_utils.all_gather_cat(feats[name])[inverse] for name in layers}
    if r != 0:
        return {}, acc
    return score_layers(full, y, **kw), acc


@dataclass
class TrainResult:
    status: str  # "completed" | "interrupted" | "nan"
    step: int
    epoch: int
    checkpoint: Path | None
    final: dict[str, float] = field(default_factory=dict)
    message: str = ""
    signum: int | None = None  # the signal that interrupted the run


class _StopFlag:
    """Installs SIGTERM/SIGINT handlers that only record the signal (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


class Trainer:
    """Train ``cfg.model`` on ``cfg.data`` with the LSM mode ``cfg.lsm.mode``.

    ``cfg`` sections: ``seed``, ``trainer``, ``data``, ``model``, ``optim``, ``sched``,
    ``lsm`` (see ``conf/``). ``model_factory(bundle) -> nn.Module`` replaces the zoo (tests);
    ``tracker`` defaults to a local-only :class:`Tracker` in ``run_dir``.
    """

    def __init__(
        self,
        cfg: Any,
        run_dir: str | Path,
        *,
        tracker: Tracker | None = None,
        model_factory: Callable[[DataBundle], nn.Module] | None = None,
        resume_from: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        tcfg = _get(cfg, "trainer", {})
        lcfg = _get(cfg, "lsm", {})
        self.seed = int(_get(cfg, "seed", 0))
        self.mode = _get(lcfg, "mode", "monitor")
        if self.mode not in LSM_MODES:
            raise ValueError(f"lsm.mode: expected one of {list(LSM_MODES)}, got {self.mode!r}")
        self.device = resolve_device(_get(tcfg, "device", "auto"))
        # data parallel ------------------------------------------------------------
        self.strategy = _get(tcfg, "strategy", "single")
        if self.strategy not in ("single", "ddp"):
            raise ValueError(f"trainer.strategy: expected single or ddp, got {self.strategy!r}")
        self.rank = dist_utils.rank()
        self.world_size = dist_utils.world_size()
        if self.world_size > 1 and self.strategy != "ddp":
            raise ValueError(
                f"this process is one of {self.world_size} (torch.distributed is initialized, "
                "e.g. by torchrun) but trainer.strategy is not ddp; add trainer=ddp"
            )
        self.ddp = self.strategy == "ddp" and self.world_size > 1
        self.is_main = self.rank == 0
        ddp_cfg = _get(tcfg, "ddp", {})
        if self.ddp and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        threads = _get(tcfg, "num_threads", None)
        if threads:
            torch.set_num_threads(int(threads))
        resume_state, resume_applied = None, []
        self.resume_wandb_id: str | None = None  # the wandb run of the checkpoint
        if resume_from is not None:  # refused before the data and the model are built
            from lsm_train.resume import check_resume

            resume_state = load_checkpoint(resume_from, map_location=self.device)
            resume_applied = check_resume(
                resume_state, _plain(cfg), self.world_size, Path(resume_from)
            )
            self.resume_wandb_id = resume_state.get("wandb_id")
        seed_everything(self.seed)

        # data ------------------------------------------------------------------
        dcfg = dict(_plain(_get(cfg, "data", {})) or {})
        self.batch_size = int(dcfg.get("batch_size") or 64)
        self.augment = bool(dcfg.get("augment") or False)
        self.eval_batch_size = int(dcfg.get("eval_batch_size") or 512)
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size: expected a positive integer, got {self.batch_size}")
        name = dcfg.get("name", "digits")
        if dcfg.get("_target_"):  # own data (lsm_train.custom)
            from lsm_train.custom import data_from_target

            self.data = data_from_target(dcfg, skip=_DATA_KEYS)
        else:
            self.data = load_data(name, **{k: v for k, v in dcfg.items() if k not in _DATA_KEYS})
        n = len(self.data.train)
        # DDP: every rank sees n // W samples per epoch, in batches of data.batch_size
        self.steps_per_epoch = max(1, (n // self.world_size) // self.batch_size)
        self.epochs = int(_get(tcfg, "epochs", 1))
        max_steps = _get(tcfg, "max_steps", None)
        self.total_steps = self.epochs * self.steps_per_epoch
        if max_steps is not None:
            self.total_steps = min(self.total_steps, int(max_steps))
        self.log_every = max(1, int(_get(tcfg, "log_every_n_steps", 10)))
        every = _get(tcfg, "monitor_every_n_steps", None)  # null: lsm.monitor.budget decides
        self.monitor_every = None if every is None else int(every)

        # model -----------------------------------------------------------------
        if model_factory is not None:
            model = model_factory(self.data)
        elif _get(_get(cfg, "model", {}), "_target_", None):  # own model (lsm_train.custom)
            from lsm_train.custom import model_from_target

            model = model_from_target(dict(_plain(_get(cfg, "model"))), self.data)
        else:
            from lsm_train.models import create_model

            mcfg = dict(_plain(_get(cfg, "model", {})) or {})
            kwargs = dict(mcfg.get("kwargs") or {})
            try:
                model = create_model(
                    mcfg.get("name", "mlp"),
                    num_classes=self.data.num_classes,
                    in_channels=self.data.in_channels,
                    image_size=self.data.image_size,
                    **kwargs,
                )
            except ValueError as err:
                if "unknown option" not in str(err):
                    raise
                raise ValueError(
                    f"{err}. model.kwargs come from conf/model/<name>.yaml and the recipe; "
                    "after model=<other> on a recipe that sets model.kwargs, use that "
                    "family's recipe or drop a key with ~model.kwargs.<key>"
                ) from err
        self.module = model.to(self.device)
        self.model: nn.Module = self.module
        if self.ddp:
            self.model = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(_get(ddp_cfg, "find_unused_parameters", False)),
                broadcast_buffers=bool(_get(ddp_cfg, "broadcast_buffers", True)),
            )

        # layers, probe sets ---------------------------------------------------------
        self.layers: list[str] = []
        monitor_enabled = bool(_get(_get(lcfg, "monitor", {}), "enabled", True))
        # lsm=off disables the monitor in its config; a recipe may switch it back on
        # (ablation/lsm-modes does, so that the MD-LSM curves of all modes compare)
        self.monitor_on = monitor_enabled
        need_layers = self.monitor_on or self.mode in ("loss", "guard", "both")
        if need_layers:
            from lsm_train.capture import resolve_layers

            spec = _plain(_get(lcfg, "layers", None))
            self.layers = resolve_layers(self.module, spec)
        mon = _get(lcfg, "monitor", {})
        self.monitor_method = _get(mon, "method", "fisher")
        # cross-fitting is defined for the degree and the fisher score
        holdout = _get(mon, "holdout", 0.5)
        self.monitor_holdout = holdout if self.monitor_method in ("degree", "fisher") else None
        self.monitor_gather = bool(_get(mon, "gather", True))
        probe_n = int(_get(mon, "probe_size", 512))
        test_n = int(_get(mon, "test_size", 512))
        self.probe = self.data.train.batch(torch.arange(min(probe_n, n)))
        self.test_probe = self.data.test.batch(torch.arange(min(test_n, len(self.data.test))))
        from lsm_train.monitor import MonitorSchedule

        self.schedule = MonitorSchedule(float(_get(mon, "budget", 0.03)), self.monitor_every)
        self._layouts: dict[str, Any] = {}  # fisher layouts of the probe and test labels

        # optimizer, guard, loss, scheduler -------------------------------------------
        from lsm_train.config_errors import build_section  # errors name the full key

        self.optimizer = build_section("optim", self._build_optimizer, _get(cfg, "optim", {}))
        self.reg = None
        self.guard = None
        if self.mode in ("loss", "both"):
            self.reg = build_section("lsm.loss", self._build_loss, _get(lcfg, "loss", {}))
        step_opt: torch.optim.Optimizer = self.optimizer
        if self.mode in ("guard", "both"):
            self.guard = build_section("lsm.guard", self._build_guard, _get(lcfg, "guard", {}))
            step_opt = self.guard
        self.step_optimizer = step_opt
        # the schedule drives the inner optimizer: the guard shares its param_groups
        self.scheduler = build_scheduler(self.optimizer, _get(cfg, "sched", {}), self.total_steps)
        self.grad_clip = _get(tcfg, "grad_clip", None)
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, (int, float)) and 0 < self.grad_clip < math.inf
        ):
            raise ValueError(
                f"trainer.grad_clip: expected null or a finite number > 0, got {self.grad_clip!r}"
            )

        self.tracker = tracker
        self._own_tracker = tracker is None
        self.progress = bool(_get(tcfg, "progress", True))
        self.checkpointing = bool(_get(tcfg, "checkpoint", True))
        self._saved_step: int | None = None  # the step of the checkpoint this run wrote/read
        self.params_finite = True  # False once save() found non-finite parameters
        self.resume_applied: list[str] = resume_applied  # keys whose new values a resume took

        # state --------------------------------------------------------------------
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed = 0.0
        self.monitor_elapsed = 0.0  # seconds spent in monitor() (evaluation + MD-LSM)
        self._clock_start: float | None = None  # perf_counter origin of `elapsed` in fit()
        self.acc_sums = {"loss": 0.0, "correct": 0, "count": 0, "batches": 0}
        self.last: dict[str, float] = {}
        self.history_lsm_mean: float | None = None
        self.pretrain_log: dict[str, float] = {}
        if resume_from is None:
            self._pretrain(_get(tcfg, "pretrain", None))
        if resume_state is not None:
            self._restore(resume_state)
            self._saved_step = self.step

    # ------------------------------------------------------------------ builders
    def _build_optimizer(self, ocfg: Any) -> torch.optim.Optimizer:
        ocfg = dict(_plain(ocfg) or {})
        params = [p for p in self.module.parameters() if p.requires_grad]
        if "_target_" in ocfg:
            from hydra.utils import get_class

            cls = get_class(ocfg.pop("_target_"))
            ocfg.pop("_partial_", None)
        else:
            name = ocfg.pop("name", "adamw")
            cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[
                name
            ]
        return cls(params, **ocfg)

    def _build_loss(self, cfg: Any) -> nn.Module:
        from lsm_train.loss import LSMLoss

        cfg = dict(_plain(cfg) or {})
        return LSMLoss(
            self.module,
            self.layers,
            weight=float(cfg.get("weight", 0.1)),
            layer_weights=cfg.get("layer_weights"),
            tau=float(cfg.get("tau", 0.5)),
            scheme=cfg.get("scheme", "pairwise"),
            warmup_steps=int(cfg.get("warmup_steps", 0)),
            crossfit=bool(cfg.get("crossfit", True)),
            gather=bool(cfg.get("gather", False)),
            num_classes=cfg.get("num_classes", self.data.num_classes),  # static path
        )

    def _build_guard(self, cfg: Any) -> torch.optim.Optimizer:
        from lsm_train.guard import SeparabilityGuard

        cfg = dict(_plain(cfg) or {})
        probe_n = int(cfg.pop("probe_size", 256))
        cfg.setdefault("seed", self.seed)  # measure=random draws from the guard's generator
        n = min(probe_n, len(self.data.train))
        gx, gy = self.data.train.batch(torch.arange(n))
        # the same probe on every rank; under DDP the guard all-reduces its scores, so every
        # rank takes the same decision
        return SeparabilityGuard(
            self.optimizer,
            self.module,
            (gx.to(self.device), gy.to(self.device)),
            layers=self.layers,
            **cfg,
        )

    def _pretrain(self, pcfg: Any) -> None:
        """Greedy pretraining (``model.pretrain``, e.g. the DBN's CD-k) when configured."""
        pcfg = dict(_plain(pcfg) or {})
        if not pcfg or not int(pcfg.get("epochs", 0)):
            return
        target = getattr(self.module, "pretrain", None)
        if not callable(target):
            raise ValueError(
                f"trainer.pretrain: model {type(self.module).__name__} has no pretrain method; "
                "set trainer.pretrain=null"
            )
        x = self.data.train.prepare(self.data.train.x).to(self.device)
        history = target(x, seed=self.seed, **pcfg)
        for i, errs in enumerate(history or []):
            if errs:
                self.pretrain_log[f"pretrain/recon_error_{i}"] = float(errs[-1])

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.module.state_dict(),
            # the guard's state dict is the inner optimizer's plus its counters and cache
            "optimizer": self.step_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "reg": self.reg.state_dict() if self.reg is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "elapsed": self.elapsed,
            "monitor_elapsed": self.monitor_elapsed,
            "acc_sums": dict(self.acc_sums),
            "last": dict(self.last),
            "rng": rng_state(),
            "config": _plain(self.cfg),
            "world_size": self.world_size,
        }
        if self.tracker is not None and self.tracker.wandb_id:
            state["wandb_id"] = self.tracker.wandb_id
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.step_optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.reg is not None and state.get("reg") is not None:
            self.reg.load_state_dict(state["reg"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.monitor_elapsed = float(state.get("monitor_elapsed", 0.0))
        self.acc_sums = dict(state["acc_sums"])
        if self.ddp and not self.is_main:  # the checkpoint holds the sums over all ranks
            self.acc_sums = {k: 0 for k in self.acc_sums}
        self.last = dict(state.get("last", {}))
        set_rng_state(state["rng"])

    def save(self) -> Path | None:
        """Write the checkpoint (rank 0 only; under DDP every rank must call it).

        Only finite parameters and buffers are written: otherwise nothing is written,
        :attr:`params_finite` becomes False and None is returned (the replicas hold the
        same values, so every rank decides alike)."""
        if not self.checkpointing:
            return None
        self.params_finite = all(
            bool(torch.isfinite(v).all())
            for v in self.module.state_dict().values()
            if torch.is_tensor(v) and v.is_floating_point()
        )
        if not self.params_finite:
            return None
        sums = self._reduced_sums() if self.ddp else None
        if not self.is_main:
            return None
        state = self.state_dict()
        if sums is not None:
            state["acc_sums"] = sums
        path = save_checkpoint(self.ckpt_path, state)
        self._saved_step = self.step
        return path

    def _checkpoint_note(self) -> str:
        """Where the last good checkpoint of this run is, for a stop message."""
        if not self.checkpointing:
            return "No checkpoint is written (trainer.checkpoint=false)."
        if self._saved_step is None:
            return "No checkpoint was written yet."
        return f"Last good checkpoint: {self.ckpt_path} (step {self._saved_step})."

    def _reduced_sums(self) -> dict[str, Any]:
        s = self.acc_sums
        keys = ("loss", "correct", "count", "batches")
        vals = dist_utils.all_reduce_sum([s[k] for k in keys], device=self.device)
        return {k: (v if k == "loss" else int(round(v))) for k, v in zip(keys, vals, strict=True)}

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample order of ``epoch``; under DDP this rank's shard of it."""
        order = epoch_order(len(self.data.train), self.seed, epoch)
        if self.ddp:
            order = dist_utils.shard_indices(order, self.rank, self.world_size)
        return order

    def check_replicas(self) -> float:
        """Under DDP: raise :class:`~lsm_train.distributed.ParameterMismatchError` unless the
        parameters agree on every rank (checksum all-reduce). Returns the largest spread."""
        if not self.ddp:
            return 0.0
        rtol = float(_get(_get(_get(self.cfg, "trainer", {}), "ddp", {}), "check_rtol", 1e-9))
        return dist_utils.check_parameters_in_sync(self.module, rtol=rtol)

    # ------------------------------------------------------------------- monitor
    def monitor(self) -> dict[str, float]:
        """Val loss/acc and per-layer MD-LSM (under DDP: every rank must call it; the layer
        scores are complete on rank 0). Its wall time is logged as ``time/monitor_s``."""
        started = time.perf_counter()
        try:
            with self.schedule.timed(max(self.elapsed - self.monitor_elapsed, 0.0)):
                return self._monitor()
        finally:
            self.monitor_elapsed += time.perf_counter() - started

    def _monitor(self) -> dict[str, float]:
        if self.monitor_on and self.layers and not self.ddp and self.monitor_method == "fisher":
            return self._monitor_batched()
        if self.ddp:
            val_loss, val_acc = _evaluate_ddp(
                self.module, self.data.test, self.device, self.eval_batch_size
            )
        else:
            val_loss, val_acc = evaluate(
                self.module, self.data.test, self.device, self.eval_batch_size
            )
        out: dict[str, float] = {"val/loss": val_loss, "val/acc": val_acc}
        if self.monitor_on and self.layers:
            kw: dict[str, Any] = dict(
                method=self.monitor_method, holdout=self.monitor_holdout, seed=self.seed
            )
            measure: Callable[..., tuple[dict[str, float], float]] = measure_layers
            if self.ddp:
                measure = measure_layers_ddp
                kw["gather"] = self.monitor_gather
            px, py = (t.to(self.device) for t in self.probe)
            lsm, probe_acc = measure(self.module, px, py, self.layers, **kw)
            tx, ty = (t.to(self.device) for t in self.test_probe)
            val_lsm, _ = measure(self.module, tx, ty, self.layers, **kw)
            if not lsm:  # DDP with gathered features: the scores live on rank 0
                out["probe/acc"] = probe_acc
                return out
            out["probe/acc"] = probe_acc
            out.update(self._layer_metrics(lsm, val_lsm))
        return out

    def _layer_metrics(self, lsm: Mapping[str, float],
                       val_lsm: Mapping[str, float]) -> dict[str, float]:
        """``lsm/<layer>``, ``val_lsm/<layer>`` and their means; remembers a finite mean."""
        out = {f"lsm/{k}": v for k, v in lsm.items()}
        out.update({f"val_lsm/{k}": v for k, v in val_lsm.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN mean -> NaN
            out["lsm/mean"] = float(np.nanmean(list(lsm.values())))
            out["val_lsm/mean"] = float(np.nanmean(list(val_lsm.values())))
        if math.isfinite(out["lsm/mean"]):
            self.history_lsm_mean = out["lsm/mean"]
        return out

    def _layout(self, key: str, labels: torch.Tensor) -> Any:
        """The fisher layout of the probe (or test) labels, built once; None when those
        labels cannot be cross-fitted (the scores are then NaN, with a warning)."""
        if key not in self._layouts:
            from lsm_train.measures.fisher import FisherLayout

            try:
                self._layouts[key] = FisherLayout(labels, "pairwise", self.monitor_holdout,
                                                  self.seed, device=self.device)
            except ValueError as err:
                warnings.warn(f"MD-LSM of the {key} set not computed: {err}", RuntimeWarning,
                              stacklevel=2)
                self._layouts[key] = None
        return self._layouts[key]

    def _monitor_batched(self) -> dict[str, float]:
        """One forward over the probe and one over the test set (the first ``test_size``
        rows captured), every layer of both scored in one batched pass, one host read."""
        from lsm_train.monitor import capture, score_sets

        px, py = self.probe
        probe_feats, probe = capture(self.module, px, py, self.layers, self.eval_batch_size)
        test_feats, test = capture(self.module, self.data.test, None, self.layers,
                                   self.eval_batch_size, keep=self.test_probe[0].shape[0])
        layouts = (self._layout("probe", py), self._layout("test", self.test_probe[1]))
        sets = [(f, lay) if lay is not None else ({}, None)
                for f, lay in zip((probe_feats, test_feats), layouts, strict=True)]
        scores, (correct_p, correct_t, loss_t) = score_sets(
            sets, extra=(probe["correct"], test["correct"], test["loss"]))
        nan = dict.fromkeys(self.layers, float("nan"))
        lsm, val_lsm = (s or nan for s in scores)
        n_test = max(1, len(self.data.test))
        out = {"val/loss": loss_t / n_test, "val/acc": correct_t / n_test,
               "probe/acc": correct_p / max(1, px.shape[0])}
        out.update(self._layer_metrics(lsm, val_lsm))
        return out

    def _train_metrics(self) -> dict[str, float]:
        s = self._reduced_sums() if self.ddp else self.acc_sums
        out: dict[str, float] = {}
        if s["count"]:
            out["train/loss"] = s["loss"] / max(1, s["batches"])
            out["train/acc"] = s["correct"] / s["count"]
        out["lr"] = float(self.step_optimizer.param_groups[0]["lr"])
        if self.reg is not None:
            last = getattr(self.reg, "last", None) or {}
            if self.ddp and last and not getattr(self.reg, "gather", False):
                summed = dist_utils.all_reduce_sum(list(last.values()), device=self.device)
                last = {k: v / self.world_size for k, v in zip(last, summed, strict=True)}
            out.update({f"lsm_loss/{k}": float(v) for k, v in last.items()})
        if self.guard is not None:
            out.update(_guard_stats(self.guard))
        self.acc_sums = {"loss": 0.0, "correct": 0, "count": 0, "batches": 0}
        return out

    def _log(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        record: dict[str, Any] = {"epoch": self.epoch}
        record.update(self._train_metrics())
        if extra:
            record.update(extra)
        if self._clock_start is not None:  # include a monitor just run
            self.elapsed = time.perf_counter() - self._clock_start
        record["time/elapsed_s"] = self.elapsed
        # training alone (elapsed minus the monitor): comparable across lsm modes, since
        # lsm=off does not monitor
        record["time/monitor_s"] = self.monitor_elapsed
        record["time/train_s"] = max(self.elapsed - self.monitor_elapsed, 0.0)
        if record["time/train_s"] > 0:
            record["time/monitor_fraction"] = self.monitor_elapsed / record["time/train_s"]
        record["time/monitor_evaluations"] = self.schedule.evaluations  # in this process
        self.last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        self.tracker.log(record, step=self.step)
        return record

    # --------------------------------------------------------------------- train
    def _agree(self, finite: bool, stop: bool) -> tuple[bool, bool]:
        """(every rank's loss is finite, some rank received a signal): one all-reduce."""
        if not self.ddp:
            return finite, stop
        bad, stops = dist_utils.all_reduce_sum(
            [0.0 if finite else 1.0, 1.0 if stop else 0.0], device=self.device
        )
        return bad == 0, stops > 0

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, stop_requested: bool = False
    ) -> tuple[float, torch.Tensor] | None:
        self.model.train()
        opt = self.step_optimizer
        opt.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if self.reg is not None:
            loss = loss + self.reg(y)
        finite, self._stop_agreed = self._agree(bool(torch.isfinite(loss)), stop_requested)
        if not finite:
            return None
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), float(self.grad_clip))
        opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return float(loss.detach()), logits.detach()

    def _monitor_due(self, epoch_end: bool, last: bool) -> bool:
        """The schedule's decision after this step; under DDP with the budget, checked at
        log steps and agreed by all ranks (any rank due: all evaluate)."""
        budget_ddp = self.ddp and self.schedule.uses_budget and not last
        if budget_ddp and self.step % self.log_every:
            return False
        train_s = max(self.elapsed - self.monitor_elapsed, 0.0)
        due = self.schedule.due(self.step, train_s, self.monitor_elapsed, epoch_end=epoch_end,
                                last=last)
        if budget_ddp:
            (votes,) = dist_utils.all_reduce_sum([1.0 if due else 0.0], device=self.device)
            due = votes > 0
        return due

    def fit(self) -> TrainResult:
        self._own_tracker = self.tracker is None  # a tracker given to us is closed by its owner
        if self.tracker is None:
            if self.is_main:
                self.tracker = Tracker(self.run_dir, resume_step=self.step if self.step else None)
            else:
                self.tracker = NullTracker()
        bar = None
        self._stop_agreed = False
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", leave=True,
                       dynamic_ncols=True)
        t0 = time.perf_counter() - self.elapsed
        self._clock_start = t0
        status, message = "completed", ""
        signum = None
        try:
            with _StopFlag() as stop:

                def stopping() -> bool:  # under DDP: only when all ranks know it
                    return self._stop_agreed if self.ddp else stop.signum is not None

                if self.step == 0 and self.monitor_on:
                    # step 0: the untrained (or only pretrained) network
                    self._log({**self.pretrain_log, **self.monitor()})
                while self.step < self.total_steps and status == "completed":
                    order = self._epoch_order(self.epoch)
                    while self.batch_in_epoch < self.steps_per_epoch:
                        if self.step >= self.total_steps:
                            break
                        b = self.batch_in_epoch
                        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
                        x, y = self.data.train.batch(idx)
                        if self.augment:
                            g = torch.Generator().manual_seed(
                                ((self.seed * 1_000_003 + self.epoch) * 100_003 + b)
                                * self.world_size + self.rank
                            )
                            x = augment_batch(x, g)
                        x, y = x.to(self.device), y.to(self.device)
                        out = self._train_step(x, y, stop.signum is not None)
                        if out is None:
                            status = "nan"
                            message = _nan_message(self, x) + " " + self._checkpoint_note()
                            break
                        loss_val, logits = out
                        self.step += 1
                        self.batch_in_epoch += 1
                        self.elapsed = time.perf_counter() - t0
                        s = self.acc_sums
                        s["loss"] += loss_val
                        s["batches"] += 1
                        s["correct"] += int((logits.argmax(1) == y).sum())
                        s["count"] += int(y.shape[0])
                        end_of_epoch = self.batch_in_epoch >= self.steps_per_epoch
                        last_step = self.step >= self.total_steps
                        mon = self.monitor_on and self._monitor_due(end_of_epoch, last_step)
                        if end_of_epoch or last_step:
                            self.epoch += int(end_of_epoch)
                            self.batch_in_epoch = 0 if end_of_epoch else self.batch_in_epoch
                            # lsm=off: val loss/acc at epoch ends (monitor() without layers)
                            self._log(self.monitor() if mon or not self.monitor_on else None)
                            self.save()
                            if not self.params_finite:
                                status = "nan"
                                message = _blown_up_message(self)
                                break
                        elif mon:
                            self._log(self.monitor())
                        elif self.step % self.log_every == 0:
                            self._log()
                        if bar is not None:
                            bar.update(1)
                            post = {"loss": f"{loss_val:.3f}",
                                    "acc": f"{self.last.get('train/acc', float('nan')):.3f}"}
                            if self.history_lsm_mean is not None:
                                post["lsm"] = f"{self.history_lsm_mean:.3f}"
                            bar.set_postfix(post, refresh=False)
                        if stopping():
                            break
                        if end_of_epoch:
                            break
                    if stopping() and status == "completed":
                        status = "interrupted"
                        signum = stop.signum or signal.SIGTERM  # DDP: another rank's signal
                        name = signal.Signals(signum).name
                        written = self.save()
                        if written is not None:
                            message = (
                                f"{name} received at step {self.step}: checkpoint written to "
                                f"{written}; continue with resume=true "
                                f"hydra.run.dir={self.run_dir}"
                            )
                        elif not self.params_finite:
                            status = "nan"
                            message = f"{name} received; " + _blown_up_message(self)
                        else:
                            message = (
                                f"{name} received at step {self.step}: stopped. "
                                + self._checkpoint_note()
                            )
        finally:
            if bar is not None:
                bar.close()
            if self._own_tracker and self.tracker is not None:
                self.tracker.close()
        return TrainResult(
            status=status,
            step=self.step,
            epoch=self.epoch,
            checkpoint=self.ckpt_path if self.ckpt_path.exists() else None,
            final=dict(self.last),
            message=message,
            signum=signum,
        )


def _nan_message(trainer: Trainer, x: torch.Tensor) -> str:
    """Why the loss of the step after ``trainer.step`` is not finite: bad input data or a
    diverged model."""
    where = f"at step {trainer.step + 1} (epoch {trainer.epoch})"
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
        return (
            f"loss is not finite {where}: {bad} of {x.shape[0]} input samples of the batch "
            f"hold NaN or inf values. The data is bad (data.name="
            f"{_get(_get(trainer.cfg, 'data', {}), 'name', '?')}), not the learning rate: "
            "clean or filter it; stopped without updating."
        )
    return (
        f"loss is not finite {where}; stopped without updating. Try a smaller optim.lr or "
        "lsm.loss.weight, or trainer.grad_clip."
    )


def _blown_up_message(trainer: Trainer) -> str:
    return (
        f"the parameters are not finite after step {trainer.step} (the update diverged); "
        "no checkpoint was written from them. " + trainer._checkpoint_note()
        + " Try a smaller optim.lr or trainer.grad_clip."
    )


def _guard_stats(guard: Any) -> dict[str, float]:
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
