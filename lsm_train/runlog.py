"""The ``metrics.jsonl`` schema: file name, key names, which keys are layers, one reader.

A run folder's ``metrics.jsonl`` holds one JSON object per logged step, for example
``{"step": 40, "epoch": 1, "train/loss": 0.31, "train/acc": 0.93, "val/acc": 0.91,
"probe/acc": 0.94, "lsm/fc1": 0.97, "val_lsm/fc1": 0.95, "lsm/mean": 0.97,
"guard/accept_rate": 0.9, "time/elapsed_s": 12.5}``. The writer (:func:`to_record`,
:func:`encode_record`) and every reader (:func:`read_metrics`) go through this module, so the
names live in one place.
Non-finite numbers are written as ``null`` (NaN) or ±1e308 (±inf), counters
(:func:`is_counter`: step, epoch, ``guard/<counter>``, ``time/monitor_evaluations``) as
integers. The reader is tolerant: blank lines are ignored and a line that is not a JSON
object (a killed run's truncated last line) is dropped with a warning. See ``docs/app.md``
(run folder) and ``docs/report.md``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE", "STEP", "EPOCH", "LR", "TRAIN_LOSS", "TRAIN_ACC", "VAL_LOSS", "VAL_ACC",
    "PROBE_ACC", "LSM", "VAL_LSM", "LSM_HARD", "VAL_LSM_HARD", "LSM_LOSS", "GUARD", "TIME",
    "PRETRAIN", "LAYER_PREFIXES",
    "AGGREGATES", "LSM_MEAN", "VAL_LSM_MEAN", "GUARD_ACCEPT_RATE", "GUARD_ACCEPTED",
    "GUARD_REJECTED", "GUARD_CHECKS", "TIME_ELAPSED", "TIME_TRAIN", "TIME_MONITOR",
    "TIME_MONITOR_EVALUATIONS", "SCALARS", "PREFIXES", "is_schema_key", "is_counter",
    "layer_key", "layer_of", "layer_names", "to_float",
    "json_value", "metric_value", "to_record", "encode_record", "read_metrics",
]

METRICS_FILE = "metrics.jsonl"

# scalar keys
STEP = "step"
EPOCH = "epoch"
LR = "lr"
TRAIN_LOSS = "train/loss"  # mean over the batches of the log interval
TRAIN_ACC = "train/acc"  # running accuracy of the log interval's batches
VAL_LOSS = "val/loss"  # test set
VAL_ACC = "val/acc"
PROBE_ACC = "probe/acc"  # the fixed training probe, same monitor call as lsm/<layer>

# prefixes: ``<prefix><layer name>`` per hidden layer
LSM = "lsm/"  # cross-fitted MD-LSM on the training probe
VAL_LSM = "val_lsm/"  # the same on the test set
LSM_HARD = "lsm_hard/"  # hard-pair score (mean of the worst problems), training probe
VAL_LSM_HARD = "val_lsm_hard/"  # the same on the test set
LSM_LOSS = "lsm_loss/"  # soft MD-LSM inside LSMLoss at the last step
LAYER_PREFIXES = (LSM, VAL_LSM, LSM_HARD, VAL_LSM_HARD, LSM_LOSS)
#: names under a layer prefix that are aggregates over layers, not layers.
AGGREGATES = frozenset({"mean"})
LSM_MEAN = LSM + "mean"
VAL_LSM_MEAN = VAL_LSM + "mean"

# other prefixes
GUARD = "guard/"  # the guard's cumulative counters (guard.stats) and accept_rate
TIME = "time/"  # seconds since the start of the run
PRETRAIN = "pretrain/"  # e.g. pretrain/recon_error_0 (DBN)

GUARD_CHECKS = GUARD + "checks"
GUARD_ACCEPTED = GUARD + "accepted"  # forced acceptances included
GUARD_REJECTED = GUARD + "rejected"
GUARD_ACCEPT_RATE = GUARD + "accept_rate"  # accepted / checks
TIME_ELAPSED = TIME + "elapsed_s"  # wall time of the run
TIME_MONITOR = TIME + "monitor_s"  # of which the monitor
TIME_TRAIN = TIME + "train_s"  # elapsed minus monitor
TIME_MONITOR_EVALUATIONS = TIME + "monitor_evaluations"  # monitor calls in this process


#: every key without a prefix that a record may hold.
SCALARS = frozenset({STEP, EPOCH, LR, TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, PROBE_ACC})
#: every prefix a record's other keys start with.
PREFIXES = (*LAYER_PREFIXES, GUARD, TIME, PRETRAIN)


def is_schema_key(key: str) -> bool:
    """Whether ``key`` is one of :data:`SCALARS` or starts with one of :data:`PREFIXES`."""
    return key in SCALARS or any(key.startswith(p) and len(key) > len(p) for p in PREFIXES)


def is_counter(key: str) -> bool:
    """Whether ``key`` counts things (written as an integer): ``step``, ``epoch``,
    ``time/monitor_evaluations`` and the guard's counters (``guard/<name>`` except the
    rates, ``guard/*rate``)."""
    if key in (STEP, EPOCH, TIME_MONITOR_EVALUATIONS):
        return True
    return key.startswith(GUARD) and len(key) > len(GUARD) and not key.endswith("rate")


def layer_key(prefix: str, layer: str) -> str:
    """``layer_key(LSM, "fc1") == "lsm/fc1"``."""
    if prefix not in LAYER_PREFIXES:
        raise ValueError(f"prefix must be one of {LAYER_PREFIXES}, got {prefix!r}")
    return prefix + layer


def layer_of(key: str, prefix: str = LSM) -> str | None:
    """The layer name of ``key`` under ``prefix`` (``None`` for other keys and aggregates)."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix):]
    return name if name and name not in AGGREGATES else None


def layer_names(records: Iterable[Mapping[str, Any]], prefix: str = LSM) -> list[str]:
    """Layer names under ``prefix``, in the order their keys first appear."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            name = layer_of(key, prefix)
            if name is not None:
                seen.setdefault(name, None)
    return list(seen)


def to_float(value: Any) -> float:
    """A logged value as a float: numbers and numeric strings; anything else (``None``) NaN."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def json_value(value: Any) -> Any:
    """A logged value as a JSON value: tensors and numpy scalars as numbers, NaN as
    ``None``, ±inf as ±1e308."""
    if hasattr(value, "item"):  # 0-dim tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(1e308, value)
    return value


def metric_value(key: str, value: Any) -> Any:
    """:func:`json_value` of ``value``, and an integral number under a counter key
    (:func:`is_counter`) as an ``int`` (``3.0`` -> ``3``)."""
    value = json_value(value)
    if (isinstance(value, float) and value.is_integer() and abs(value) < 2**53
            and is_counter(key)):
        return int(value)
    return value


def to_record(metrics: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The record of one logged step: ``step`` first, then ``metrics`` as JSON values
    (:func:`metric_value`: tensors and numpy scalars as numbers, NaN as ``None``, ±inf as
    ±1e308, counters as integers)."""
    record: dict[str, Any] = {STEP: int(step)}
    record.update({k: metric_value(k, v) for k, v in metrics.items() if k != STEP})
    return record


def encode_record(metrics: Mapping[str, Any], step: int) -> str:
    """One ``metrics.jsonl`` line (with its newline): :func:`to_record` as JSON."""
    return json.dumps(to_record(metrics, step)) + "\n"


def read_metrics(path: str | os.PathLike, *, strict: bool = False) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, or of ``<run folder>/metrics.jsonl``.

    Blank lines are ignored; a broken last line (a write cut short by a kill or a full
    disk) is dropped with a ``UserWarning``. Any other line that is not a JSON object is
    dropped with a warning naming it, or, with ``strict=True`` (what a resume uses: the
    file is damaged, not cut short), raises ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    last = numbered[-1][0] if numbered else 0
    records = []
    for i, line in numbered:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last:
                warnings.warn(f"{path}: skipped truncated last line (killed run?) (line {i})",
                              UserWarning, stacklevel=2)
                continue
            if strict:
                raise ValueError(
                    f"{path}, line {i}: not a JSON record ({err}); only the last line may be "
                    "broken (a write cut short), this file is damaged"
                ) from err
            warnings.warn(f"{path}: skipped malformed line (line {i})", UserWarning,
                          stacklevel=2)
            continue
        if isinstance(obj, dict):
            records.append(obj)
        elif strict:
            raise ValueError(f"{path}, line {i}: not a JSON object")
        else:
            warnings.warn(f"{path}: skipped line {i}: not a JSON object", UserWarning,
                          stacklevel=2)
    return records
