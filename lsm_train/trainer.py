"""The training loop behind ``lsm-train``: one flat ``fit`` loop with named hooks (``docs/app.md``).

One step: forward a batch, ``loss = cross_entropy + reg(labels)`` when the LSM loss is on,
backward, ``optimizer.step()`` (a :class:`~lsm_train.guard.SeparabilityGuard` around the
configured optimizer when the guard is on), scheduler step. Everything is built from the
config by :func:`lsm_train.build.build_run`; the monitor
(:class:`lsm_train.evaluation.LayerMonitor`) runs at step 0, at the last step and when
:class:`~lsm_train.monitor.MonitorSchedule` says so. Hooks (:data:`HOOKS`,
:meth:`Trainer.add_hook`): ``on_step`` after every step (the progress bar is one),
``on_monitor`` with each evaluation, ``on_log`` with each record of ``metrics.jsonl``,
``on_checkpoint`` with each checkpoint written.

Checkpoints hold the model, optimizer, guard, scheduler and loss states, the RNG states, the
position inside the epoch and the running sums of the log interval, so ``resume`` ends in
exactly the state (and ``metrics.jsonl``) of an uninterrupted run. SIGTERM/SIGINT: the step
finishes, a checkpoint is written, ``status="interrupted"``. A non-finite loss stops before
the update (``status="nan"``); checkpoints are only written from finite parameters. Under
``trainer.strategy=ddp`` (W > 1 processes, ``docs/distributed.md``) the ranks agree on every
stop through one small all-reduce per step and rank 0 alone logs and writes checkpoints.
Run folders and resume: ``docs/runs.md``.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsm_train import distributed as dist_utils
from lsm_train.batches import TrainBatches, augment_batch
from lsm_train.build import (
    build_run,
    build_scheduler,
    plain,
    pretrain,
    resolve_device,
    seed_everything,
)
from lsm_train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lsm_train.config_check import LSM_MODES, check_keys
from lsm_train.data import DataBundle
from lsm_train.evaluation import (
    LayerMonitor,
    capture_layers,
    evaluate,
    measure_layers,
    score_layers,
)
from lsm_train.monitor import MonitorSchedule
from lsm_train.resume import check_resume
from lsm_train.stopping import (
    StopFlag,
    TrainResult,
    agree_on_stop,
    blown_up_message,
    checkpoint_note,
    interrupted_outcome,
    nan_message,
)
from lsm_train.tracking import Tracker
from lsm_train.train_log import (
    NullTracker,
    RunningSums,
    guard_stats,
    loss_stats,
    progress_bar,
    time_record,
)

__all__ = ["Trainer", "TrainResult", "HOOKS", "resolve_device", "seed_everything",
           "build_scheduler", "measure_layers", "evaluate", "LSM_MODES", "NullTracker",
           "augment_batch", "capture_layers", "score_layers"]

CHECKPOINT_NAME = "checkpoint.pt"
HOOKS = ("on_step", "on_monitor", "on_log", "on_checkpoint")


class Trainer:
    """Train ``cfg.model`` on ``cfg.data`` with the LSM mode ``cfg.lsm.mode``.

    ``cfg``: the app's config (``conf/``; unknown keys of the strict sections are refused,
    :func:`lsm_train.config_check.check_keys`). ``model_factory(bundle) -> nn.Module``
    replaces the zoo (tests); ``tracker`` defaults to a local-only :class:`Tracker` in
    ``run_dir``; ``resume_from`` a checkpoint to continue.
    """

    def __init__(self, cfg: Any, run_dir: str | Path, *, tracker: Tracker | None = None,
                 model_factory: Callable[[DataBundle], nn.Module] | None = None,
                 resume_from: str | Path | None = None) -> None:
        check_keys(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.run_dir / CHECKPOINT_NAME
        conf = plain(cfg)
        tcfg, lcfg, dcfg = conf["trainer"], conf["lsm"], conf["data"]
        self.seed, self.mode = int(conf["seed"]), lcfg["mode"]
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        if self.world_size > 1 and tcfg.get("strategy") != "ddp":
            raise ValueError(
                f"this process is one of {self.world_size} (torch.distributed is initialized, "
                "e.g. by torchrun) but trainer.strategy is not ddp; add trainer=ddp")
        self.ddp, self.is_main = self.world_size > 1, self.rank == 0
        self.device = resolve_device(tcfg["device"])
        if self.ddp and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if tcfg["num_threads"]:
            torch.set_num_threads(int(tcfg["num_threads"]))
        resume_state, self.resume_applied, self.resume_wandb_id = None, [], None
        if resume_from is not None:  # refused before the data and the model are built
            resume_state = load_checkpoint(resume_from, map_location=self.device)
            self.resume_applied = check_resume(resume_state, conf, self.world_size,
                                               Path(resume_from))
            self.resume_wandb_id = resume_state.get("wandb_id")
        seed_everything(self.seed)
        p = build_run(conf, self.device, ddp=self.ddp, model_factory=model_factory)
        self.data, self.module, self.model, self.layers = p.data, p.module, p.model, p.layers
        self.optimizer, self.step_optimizer = p.optimizer, p.step_optimizer
        self.scheduler, self.reg, self.guard, self.probe = p.scheduler, p.reg, p.guard, p.probe
        self.steps_per_epoch, self.total_steps = p.steps_per_epoch, p.total_steps
        self.batch_size = int(dcfg["batch_size"])
        self.batches = TrainBatches(self.data.train, self.batch_size, self.seed,
                                    augment=bool(dcfg.get("augment")), rank=self.rank,
                                    world_size=self.world_size if self.ddp else 1)
        self.eval_batch_size = int(dcfg["eval_batch_size"])
        mon = lcfg["monitor"]
        self.monitor_on, self.log_every = bool(mon["enabled"]), int(tcfg["log_every_n_steps"])
        self.test_probe = self.data.test.batch(
            torch.arange(min(int(mon["test_size"]), len(self.data.test))))
        self.schedule = MonitorSchedule(float(mon["budget"]), tcfg["monitor_every_n_steps"])
        self.layer_monitor = LayerMonitor(
            self.layers, self.probe, self.data.test, int(mon["test_size"]),
            method=mon["method"], holdout=mon["holdout"], seed=self.seed,
            gather=bool(mon["gather"]), batch_size=self.eval_batch_size,
            device=self.device)
        self.grad_clip = tcfg["grad_clip"]
        self.check_rtol = float((tcfg.get("ddp") or {}).get("check_rtol", 1e-9))
        self.tracker, self.progress = tracker, bool(tcfg["progress"])
        self.checkpointing = bool(tcfg["checkpoint"])
        self.hooks: dict[str, list[Callable[[Trainer, Any], None]]] = {h: [] for h in HOOKS}
        self._saved_step: int | None = None  # the step of the checkpoint this run wrote/read
        self.params_finite = True  # False once save() found non-finite parameters
        self.step = self.epoch = self.batch_in_epoch = 0
        self.elapsed = self.monitor_elapsed = 0.0  # seconds; monitor_elapsed: in monitor()
        self._clock_start: float | None = None  # perf_counter origin of `elapsed` in fit()
        self.sums = RunningSums()
        self.last: dict[str, float] = {}
        self.history_lsm_mean: float | None = None
        self.pretrain_log: dict[str, float] = {}
        if resume_state is None:
            self.pretrain_log = pretrain(self.module, self.data, self.device, self.seed,
                                         tcfg["pretrain"])
        else:
            self._restore(resume_state)
            self._saved_step = self.step

    # --------------------------------------------------------------------- hooks
    def add_hook(self, name: str, fn: Callable[[Trainer, Any], None]) -> None:
        """Call ``fn(trainer, payload)`` at the hook ``name`` (one of :data:`HOOKS`)."""
        if name not in self.hooks:
            raise ValueError(f"hook: expected one of {list(HOOKS)}, got {name!r}")
        self.hooks[name].append(fn)

    def _fire(self, name: str, payload: Any) -> None:
        for fn in self.hooks[name]:
            fn(self, payload)

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.module.state_dict(),
            # the guard's state dict is the inner optimizer's plus its counters and cache
            "optimizer": self.step_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "reg": self.reg.state_dict() if self.reg is not None else None,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed": self.elapsed, "monitor_elapsed": self.monitor_elapsed,
            "acc_sums": dict(self.sums.values), "last": dict(self.last),
            "rng": rng_state(), "config": plain(self.cfg), "world_size": self.world_size,
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
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.monitor_elapsed = float(state.get("monitor_elapsed", 0.0))
        self.sums = RunningSums(state["acc_sums"])
        if self.ddp and not self.is_main:  # the checkpoint holds the sums over all ranks
            self.sums = RunningSums()
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
            bool(torch.isfinite(v).all()) for v in self.module.state_dict().values()
            if torch.is_tensor(v) and v.is_floating_point())
        if not self.params_finite:
            return None
        sums = self.sums.reduced(self.ddp, self.device) if self.ddp else None
        if not self.is_main:
            return None
        state = self.state_dict()
        if sums is not None:
            state["acc_sums"] = sums
        path = save_checkpoint(self.ckpt_path, state)
        self._saved_step = self.step
        self._fire("on_checkpoint", path)
        return path

    def _checkpoint_note(self) -> str:
        return checkpoint_note(self.checkpointing, self.ckpt_path, self._saved_step)

    def check_replicas(self) -> float:
        """Under DDP: raise :class:`~lsm_train.distributed.ParameterMismatchError` unless the
        parameters agree on every rank (checksum all-reduce). Returns the largest spread."""
        if not self.ddp:
            return 0.0
        return dist_utils.check_parameters_in_sync(self.module, rtol=self.check_rtol)

    # ----------------------------------------------------------- monitor and log
    def monitor(self) -> dict[str, float]:
        """Val loss/acc and, with the monitor on, the per-layer MD-LSM (under DDP every rank
        must call it; the layer scores are complete on rank 0). Its wall time is logged as
        ``time/monitor_s``."""
        started = time.perf_counter()
        try:
            with self.schedule.timed(max(self.elapsed - self.monitor_elapsed, 0.0)):
                if self.monitor_on and self.layers:
                    out = self.layer_monitor(self.module)
                else:
                    loss, acc = evaluate(self.module, self.data.test, self.device,
                                         self.eval_batch_size)
                    out = {"val/loss": loss, "val/acc": acc}
        finally:
            self.monitor_elapsed += time.perf_counter() - started
        if math.isfinite(out.get("lsm/mean", math.nan)):
            self.history_lsm_mean = out["lsm/mean"]
        self._fire("on_monitor", out)
        return out

    def _log(self, extra: Mapping[str, float] | None = None) -> dict[str, Any]:
        record: dict[str, Any] = {"epoch": self.epoch}
        record.update(self.sums.metrics(self.ddp, self.device))
        record["lr"] = float(self.step_optimizer.param_groups[0]["lr"])
        if self.reg is not None:
            record.update(loss_stats(self.reg, self.ddp, self.device))
        if self.guard is not None:
            record.update(guard_stats(self.guard))
        record.update(extra or {})
        if self._clock_start is not None:  # include a monitor just run
            self.elapsed = time.perf_counter() - self._clock_start
        record.update(time_record(self.elapsed, self.monitor_elapsed, self.schedule.evaluations))
        self.last.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
        self.tracker.log(record, step=self.step)
        self._fire("on_log", record)
        return record

    # --------------------------------------------------------------------- train
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        return self.batches.order(epoch)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor,
                    stop_requested: bool) -> tuple[float, torch.Tensor] | None:
        """One update; None (nothing updated) when the loss is not finite on some rank."""
        self.model.train()
        self.step_optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        if self.reg is not None:
            loss = loss + self.reg(y)
        finite, self._stop_agreed = agree_on_stop(bool(torch.isfinite(loss)), stop_requested,
                                                  ddp=self.ddp, device=self.device)
        if not finite:
            return None
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), float(self.grad_clip))
        self.step_optimizer.step()
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

    def _after_step(self) -> str:
        """Log, monitor and checkpoint as due after a step; ``"nan"`` when the parameters
        are no longer finite, else ``"completed"``."""
        epoch_end = self.batch_in_epoch >= self.steps_per_epoch
        last = self.step >= self.total_steps
        due = self.monitor_on and self._monitor_due(epoch_end, last)
        if epoch_end or last:
            self.epoch += int(epoch_end)
            self.batch_in_epoch = 0 if epoch_end else self.batch_in_epoch
            # lsm=off: val loss/acc at epoch ends (monitor() without layers)
            self._log(self.monitor() if due or not self.monitor_on else None)
            self.save()
            return "completed" if self.params_finite else "nan"
        if due:
            self._log(self.monitor())
        elif self.step % self.log_every == 0:
            self._log()
        return "completed"

    def _interrupted(self, signum: int) -> tuple[str, str]:
        """(status, message) of a run stopped by ``signum`` after the current step."""
        written = self.save()
        return interrupted_outcome(signal.Signals(signum).name, self.step, written,
                                   self.params_finite, self._checkpoint_note(), self.run_dir)

    def fit(self) -> TrainResult:
        """Train to ``total_steps`` or a stop (module doc); returns the :class:`TrainResult`."""
        own_tracker = self.tracker is None  # a tracker given to us is closed by its owner
        if own_tracker:
            self.tracker = (Tracker(self.run_dir, resume_step=self.step or None)
                            if self.is_main else NullTracker())
        bar = progress_bar(self) if self.progress and self.is_main else None
        self._stop_agreed = False
        t0 = self._clock_start = time.perf_counter() - self.elapsed
        status, message, signum = "completed", "", None
        try:
            with StopFlag() as stop:
                if self.step == 0 and self.monitor_on:  # the untrained (or pretrained) network
                    self._log({**self.pretrain_log, **self.monitor()})
                while self.step < self.total_steps:
                    x, y = self.batches.batch(self.epoch, self.batch_in_epoch)
                    x, y = x.to(self.device), y.to(self.device)
                    out = self._train_step(x, y, stop.signum is not None)
                    if out is None:
                        status = "nan"
                        data_name = (plain(self.cfg).get("data") or {}).get("name", "?")
                        message = (nan_message(x, self.step + 1, self.epoch, data_name) + " "
                                   + self._checkpoint_note())
                        break
                    self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                    self.elapsed = time.perf_counter() - t0
                    self.sums.add(out[0], out[1], y)
                    status = self._after_step()
                    if status == "nan":
                        message = blown_up_message(self.step, self._checkpoint_note())
                        break
                    self._fire("on_step", out[0])
                    if self._stop_agreed if self.ddp else stop.signum is not None:
                        signum = stop.signum or signal.SIGTERM  # DDP: another rank's signal
                        status, message = self._interrupted(signum)
                        break
        finally:
            if bar is not None:
                self.hooks["on_step"].remove(bar[1])
                bar[0].close()
            if own_tracker:
                self.tracker.close()
        return TrainResult(status=status, step=self.step, epoch=self.epoch,
                           checkpoint=self.ckpt_path if self.ckpt_path.exists() else None,
                           final=dict(self.last), message=message,
                           signum=signum)
