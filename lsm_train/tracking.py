"""Run tracking: a local ``metrics.jsonl`` (always) and Weights & Biases (optional).

``metrics.jsonl`` holds one JSON object per logged step, e.g.
``{"step": 40, "epoch": 1, "train/loss": 0.31, "train/acc": 0.93, "val/acc": 0.91,
"lsm/fc1": 0.97, "val_lsm/fc1": 0.95, "guard/accept_rate": 0.9}``. It is written with a
flush per line, so it survives a crash, and on resume the lines past the checkpoint's step
are dropped so the file ends exactly as an uninterrupted run's would. That rewrite is
atomic (a temporary file moved over the old one), and a truncated last line (what a kill
or a full disk leaves) is dropped with a warning, by the rewrite and by
:func:`read_metrics`. A failed write raises :class:`MetricsWriteError`.
See ``docs/runs.md``.

wandb is failure-tolerant: any exception from ``wandb.init``, ``log`` or ``finish`` is
turned into one warning and training goes on (the local file is unaffected). A wandb log
file that cannot be written (a full disk) gives one warning and is dropped, instead of a
logging traceback per record.

wandb conventions: every metric is charted against ``step`` (``define_metric``), counters
are integers (:func:`lsm_train.runlog.is_counter`), and layer keys get zero-padded indices
(:func:`wandb_key`) so that panels sort in network order.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lsm_train.runlog import (
    AGGREGATES,
    LAYER_PREFIXES,
    METRICS_FILE,
    STEP,
    metric_value,
    read_metrics,
    to_record,
)

__all__ = ["Tracker", "read_metrics", "MetricsWriteError", "wandb_key"]

#: width to which :func:`wandb_key` zero-pads the numeric parts of a layer name.
LAYER_INDEX_WIDTH = 2


def wandb_key(key: str) -> str:
    """The wandb name of a ``metrics.jsonl`` key: under a layer prefix (``lsm/``,
    ``val_lsm/``, ``lsm_loss/``) every dot-separated all-digit part of the layer name is
    zero-padded to :data:`LAYER_INDEX_WIDTH` digits, so that wandb's alphabetical panel
    order is the network order (``lsm/features.3`` -> ``lsm/features.03``, before
    ``lsm/features.10``); every other key (and ``lsm/mean``) is unchanged. Only wandb sees
    these names: ``metrics.jsonl`` keeps the model's own names."""
    for prefix in LAYER_PREFIXES:
        if key.startswith(prefix) and key[len(prefix):] not in AGGREGATES:
            parts = key[len(prefix):].split(".")
            return prefix + ".".join(
                p.zfill(LAYER_INDEX_WIDTH) if p.isdigit() else p for p in parts
            )
    return key


class MetricsWriteError(OSError):
    """``metrics.jsonl`` could not be written (disk full, file-size limit, permissions)."""


class Tracker:
    """Log metrics to ``<run_dir>/metrics.jsonl`` and, when ``wandb`` is a config mapping,
    to a wandb run.

    ``wandb`` keys: ``project``, ``entity``, ``mode`` (offline/online/disabled), ``group``,
    ``job_type``, ``tags``, ``name``, ``id`` (to resume a run), ``config`` (a plain dict).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        wandb: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self.failures = 0
        self._warned: set[str] = set()
        self.run = None
        if wandb is not None:
            self._init_wandb(dict(wandb))

    # ------------------------------------------------------------------ local file
    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path, strict=True) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")  # records as read: already JSON values
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise MetricsWriteError(
                err.errno,
                f"could not rewrite {self.path} for the resume ({err.strerror or err}; a "
                "full disk or a file-size limit?); the file is unchanged",
            ) from err

    # ---------------------------------------------------------------------- wandb
    def _warn(self, what: str, err: BaseException) -> None:
        self.failures += 1
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(
                f"wandb {what} failed ({type(err).__name__}: {err}); training continues, "
                f"metrics.jsonl is still written",
                RuntimeWarning,
                stacklevel=3,
            )

    def _init_wandb(self, cfg: dict[str, Any]) -> None:
        try:
            import wandb

            wandb_dir = self.run_dir  # wandb writes <run_dir>/wandb/<offline-run-...>
            # logging's switch for "do not print a handler's write errors": wandb.init logs
            # to a file in the run folder, which fails record by record on a full disk
            raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
            try:
                self.run = self._start_wandb(wandb, cfg, wandb_dir)
            finally:
                logging.raiseExceptions = raise_exceptions
            self._guard_log_files()
        except Exception as err:  # noqa: BLE001 - a logger must never stop training
            self.run = None
            self._warn("init", err)
            return
        try:  # every chart against the training step, not wandb's own log counter
            self.run.define_metric(STEP)
            self.run.define_metric("*", step_metric=STEP)
        except Exception as err:  # noqa: BLE001 - charts against wandb's step still work
            self._warn("define_metric", err)

    def _guard_log_files(self) -> None:
        """On the first write error of a file handler of wandb's logger: one warning, then
        the handler is removed (each traceback logging printed would reach wandb's console
        capture and be logged again)."""
        logger = logging.getLogger("wandb")
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.FileHandler):
                continue

            def handle_error(record: logging.LogRecord, handler: Any = handler) -> None:
                logger.removeHandler(handler)
                err = sys.exc_info()[1] or OSError("write failed")
                self._warn(f"log file {handler.baseFilename}", err)

            handler.handleError = handle_error  # type: ignore[method-assign]

    @staticmethod
    def _start_wandb(wandb: Any, cfg: dict[str, Any], wandb_dir: Path) -> Any:
        return wandb.init(
            project=cfg.get("project") or "lsm_train",
            entity=cfg.get("entity"),
            mode=cfg.get("mode") or "offline",
            group=cfg.get("group"),
            job_type=cfg.get("job_type"),
            tags=list(cfg.get("tags") or []),
            name=cfg.get("name"),
            id=cfg.get("id"),
            resume="allow" if cfg.get("id") else None,
            dir=str(wandb_dir),
            config=cfg.get("config"),
        )

    @property
    def wandb_id(self) -> str | None:
        return getattr(self.run, "id", None)

    # ---------------------------------------------------------------------- API
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = to_record(metrics, step)
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            raise MetricsWriteError(
                err.errno,
                f"could not write {self.path} at step {step} ({err.strerror or err}; a full "
                "disk or a file-size limit?)",
            ) from err
        if self.run is not None:
            try:
                self.run.log({wandb_key(k): v for k, v in record.items()})
            except Exception as err:  # noqa: BLE001
                self._warn("log", err)

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            import wandb

            data: dict[str, Any] = {key: wandb.Image(str(path))}
            if step is not None:
                data[STEP] = int(step)
            self.run.log(data)
        except Exception as err:  # noqa: BLE001
            self._warn("image upload", err)

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for k, v in values.items():
                self.run.summary[wandb_key(k)] = metric_value(k, v)
        except Exception as err:  # noqa: BLE001
            self._warn("summary", err)

    def close(self, exit_code: int = 0) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:  # a failed write was reported by log() already
                pass
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as err:  # noqa: BLE001
                self._warn("finish", err)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(exit_code=0 if exc[0] is None else 1)
