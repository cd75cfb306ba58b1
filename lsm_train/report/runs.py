"""Run folders: finding them below a folder, and one run's metric columns and summaries.

A *run folder* holds ``metrics.jsonl`` (read through :mod:`lsm_train.runlog`) and, when Hydra
wrote it, ``.hydra/config.yaml`` and ``.hydra/overrides.yaml``. A folder given directly is a
run when it holds ``metrics.jsonl``; below a sweep folder only real run folders count (with
``.hydra/config.yaml``), at most ``max_depth`` levels down, hidden folders and ``report/``
outputs skipped, so a broad parent folder is not walked or pooled. See ``docs/report.md``.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsm_train import runlog, stats

__all__ = ["ReportError", "Run", "find_run_folders", "load_runs", "MAX_DEPTH"]

#: how many folder levels below the given folder are searched for run folders
#: (``multirun/<recipe group>/<recipe>/<date>/<job>`` is 4).
MAX_DEPTH = 4
HYDRA_DIR = ".hydra"


class ReportError(ValueError):
    """Bad input for the report (the message says what was wrong and what was expected)."""


def _read_yaml(path: Path):
    if not path.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - a broken Hydra file must not stop the report
        warnings.warn(f"{path}: could not read ({exc})", UserWarning, stacklevel=2)
        return None


@dataclass
class Run:
    """One run folder: its metric records and Hydra config and overrides."""

    path: Path
    name: str
    records: list[dict]
    overrides: list[str] = field(default_factory=list)
    config: dict | None = None
    acc_key: str = "auto"
    _sync: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> Run:
        path = Path(path)
        records = runlog.read_metrics(path / runlog.METRICS_FILE)
        if not records:
            warnings.warn(f"{path / runlog.METRICS_FILE}: no records (the run logged nothing)",
                          UserWarning, stacklevel=2)
        overrides = _read_yaml(path / HYDRA_DIR / "overrides.yaml")
        config = _read_yaml(path / HYDRA_DIR / "config.yaml")
        return cls(
            path=path,
            name=name or path.name,
            records=records,
            overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
            config=config if isinstance(config, dict) else None,
        )

    # -- columns -------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        """All keys, in order of first appearance."""
        seen: dict[str, None] = {}
        for rec in self.records:
            for k in rec:
                seen.setdefault(k, None)
        return list(seen)

    @property
    def layers(self) -> list[str]:
        """Hidden layers with a training-probe MD-LSM (``lsm/<layer>``), in file order."""
        return runlog.layer_names(self.records, runlog.LSM)

    @property
    def val_layers(self) -> list[str]:
        return runlog.layer_names(self.records, runlog.VAL_LSM)

    def column(self, key: str) -> np.ndarray:
        """Values of ``key`` per record (NaN where missing or not a number)."""
        return np.array([runlog.to_float(rec.get(key)) for rec in self.records], dtype=float)

    @property
    def steps(self) -> np.ndarray:
        """``step`` per record (the record index where ``step`` is missing)."""
        s = self.column(runlog.STEP)
        missing = ~np.isfinite(s)
        s[missing] = np.flatnonzero(missing)
        return s

    def final(self, key: str) -> float:
        """Last finite value of ``key`` (NaN if none)."""
        col = self.column(key)
        finite = col[np.isfinite(col)]
        return float(finite[-1]) if finite.size else math.nan

    def largest(self, key: str) -> float:
        """Largest finite value of ``key`` (NaN if none)."""
        col = self.column(key)
        return float(np.nanmax(col)) if np.isfinite(col).any() else math.nan

    def aligned(self, *keys: str) -> tuple[np.ndarray, ...]:
        """(steps, values of each key) over the records where every key is finite."""
        cols = [self.column(k) for k in keys]
        mask = np.ones(len(self.records), dtype=bool)
        for c in cols:
            mask &= np.isfinite(c)
        return (self.steps[mask], *(c[mask] for c in cols))

    # -- summaries -----------------------------------------------------------------------
    @property
    def sync_acc_key(self) -> str:
        """Accuracy for synchronicity: ``acc_key``, or with ``"auto"`` ``probe/acc`` when it
        is logged (same monitor call and samples as ``lsm/<layer>``), else ``train/acc``."""
        if self.acc_key != "auto":
            return self.acc_key
        logged = np.isfinite(self.column(runlog.PROBE_ACC)).any()
        return runlog.PROBE_ACC if logged else runlog.TRAIN_ACC

    def sync_series(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(MD-LSM, accuracy) of ``layer`` on the log points where both are finite."""
        _, lsm, acc = self.aligned(runlog.LSM + layer, self.sync_acc_key)
        return lsm, acc

    def synchronicity(self, until: float | None = None) -> dict[str, stats.Synchronicity]:
        """Per layer: synchronicity of ``lsm/<layer>`` with :attr:`sync_acc_key` (cached).

        ``until``: only the learning phase, the log points up to the first where the accuracy
        reaches ``until`` (:func:`lsm_train.stats.learning_phase`).
        """
        if until not in self._sync:
            out = {}
            for layer in self.layers:
                lsm, acc = self.sync_series(layer)
                if until is not None:
                    k = stats.learning_phase(acc, until)
                    lsm, acc = lsm[:k], acc[:k]
                out[layer] = stats.synchronicity(lsm, acc)
            self._sync[until] = out
        return self._sync[until]

    def steps_to(self, threshold: float):
        steps, acc = self.aligned(runlog.TRAIN_ACC)
        return stats.steps_to_threshold(steps, acc, threshold)

    def final_lsm(self, prefix: str = runlog.LSM) -> dict[str, float]:
        return {layer: self.final(prefix + layer)
                for layer in runlog.layer_names(self.records, prefix)}

    def final_mean_lsm(self) -> float:
        vals = [v for v in self.final_lsm().values() if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    def wall_time(self) -> float:
        """Seconds: the largest ``time/elapsed_s``, else the time from the ``.hydra`` files to
        the last write of ``metrics.jsonl``, else NaN."""
        logged = self.largest(runlog.TIME_ELAPSED)
        if math.isfinite(logged):
            return logged
        hydra = self.path / HYDRA_DIR
        starts = [p.stat().st_mtime for p in hydra.glob("*.yaml")] if hydra.is_dir() else []
        if not starts:
            return math.nan
        end = (self.path / runlog.METRICS_FILE).stat().st_mtime
        return max(0.0, end - min(starts))

    def train_time(self) -> float:
        """Seconds of training alone (``time/train_s``), NaN when the run did not log it."""
        return self.largest(runlog.TIME_TRAIN)

    def accept_rate(self) -> float:
        """The guard's acceptance rate: ``guard/accept_rate``, else accepted / (accepted +
        rejected) from the cumulative counters, else NaN."""
        rate = self.final(runlog.GUARD_ACCEPT_RATE)
        if math.isfinite(rate):
            return rate
        acc, rej = self.final(runlog.GUARD_ACCEPTED), self.final(runlog.GUARD_REJECTED)
        if math.isfinite(acc) and math.isfinite(rej) and acc + rej > 0:
            return acc / (acc + rej)
        return math.nan

    @property
    def has_guard(self) -> bool:
        return any(k.startswith(runlog.GUARD) for k in self.keys)


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_run_folders(folder: Path, max_depth: int = MAX_DEPTH) -> tuple[list[Path], int]:
    """(run folders below ``folder``, in natural order; how many ``metrics.jsonl`` were
    skipped because their folder has no ``.hydra/config.yaml``).

    Searches at most ``max_depth`` levels down, does not follow links (``os.walk``'s
    default), skips hidden folders and ``report`` folders, and does not look inside a run
    folder.
    """
    runs, skipped = [], 0
    root_depth = len(folder.parts)
    for here, dirs, files in os.walk(folder):
        here_path = Path(here)
        if runlog.METRICS_FILE in files and here_path != folder:
            if (here_path / HYDRA_DIR / "config.yaml").is_file():
                runs.append(here_path)
                dirs[:] = []
                continue
            skipped += 1
        if len(here_path.parts) - root_depth >= max_depth:
            dirs[:] = []
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "report"]
    return sorted(runs, key=_natural_key), skipped


def load_runs(folder: str | os.PathLike, acc_key: str = "auto",
              max_depth: int = MAX_DEPTH) -> list[Run]:
    """The run folder itself, or every run folder below a sweep folder (natural order)."""
    folder = Path(folder)
    if not folder.exists():
        raise ReportError(f"{folder} does not exist; expected a run or sweep folder")
    if folder.is_file() and folder.name == runlog.METRICS_FILE:
        folder = folder.parent  # a run's metrics.jsonl given directly: its run folder
    elif not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; expected a run or sweep folder")
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise ReportError(f"max_depth must be an integer >= 1, got {max_depth!r}")
    if (folder / runlog.METRICS_FILE).is_file():
        runs = [Run.load(folder)]
    else:
        paths, skipped = find_run_folders(folder, max_depth)
        if skipped:
            warnings.warn(f"{folder}: skipped {skipped} {runlog.METRICS_FILE} file(s) whose "
                          f"folder has no {HYDRA_DIR}/config.yaml (not lsm-train run folders)",
                          UserWarning, stacklevel=2)
        if not paths:
            raise ReportError(
                f"no run folder in {folder} or up to {max_depth} levels below it; expected a "
                f"run folder (with {runlog.METRICS_FILE}) or a sweep folder (one run folder "
                f"with {runlog.METRICS_FILE} and {HYDRA_DIR}/config.yaml per job)"
            )
        runs = [Run.load(p, name=p.relative_to(folder).as_posix()) for p in paths]
    for run in runs:
        run.acc_key = acc_key
    return runs
