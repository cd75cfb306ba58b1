"""``lsm-report``: synchronicity, sweep tables and plots from local run folders (no network).

    lsm-report <run or sweep folder> [--out DIR] [--threshold ACC] [--wandb]

A *run folder* holds ``metrics.jsonl`` (one JSON object per logged step: ``step``, ``epoch``,
``train/loss``, ``train/acc``, ``val/acc``, ``lsm/<layer>``, ``val_lsm/<layer>``,
``guard/...``, ``time/...``) and Hydra's ``.hydra/{config,overrides}.yaml``. A *sweep folder*
(Hydra multirun) holds one run folder per job, found recursively.

The report contains, for every run and every hidden layer (in the order the layers first appear
in the file), the synchronicity of the layer's MD-LSM with training accuracy (see
:mod:`lsm_train.stats`). The accuracy is ``probe/acc`` when the run logs it (the accuracy on
the fixed training probe, measured in the same monitor call and on the same samples as
``lsm/<layer>``), else ``train/acc`` (``--acc-key`` picks another). For sweeps, jobs are
grouped by their overrides minus the seed, with mean ± std over seeds of final ``val/acc``,
steps to a training-accuracy threshold (on ``train/acc``), wall time, guard acceptance rate and
final mean MD-LSM. PNG plots are written too. Everything is printed as markdown
and written to ``--out`` (default ``<folder>/report``): ``report.md``, ``summary.json``, PNGs.
``--wandb`` also logs the tables and PNGs to a wandb run (mode from ``WANDB_MODE``, offline by
default); a wandb failure only warns.

The reader is tolerant: missing keys and NaN/None/"nan" values are skipped, a malformed line
(e.g. the truncated last line of a killed run) is skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsm_train import stats

METRICS_FILE = "metrics.jsonl"
LSM_PREFIX = "lsm/"
VAL_LSM_PREFIX = "val_lsm/"
TRAIN_ACC = "train/acc"
PROBE_ACC = "probe/acc"
#: ``lsm/<name>`` keys that are aggregates, not layers.
AGGREGATE_LAYER_NAMES = frozenset({"mean", "avg", "average", "min", "max", "all"})
#: keys tried, in order, for the elapsed wall time of a run (seconds; the largest value wins).
TIME_KEYS = ("time/elapsed", "time/wall", "time/total", "time/elapsed_s")
#: keys tried, in order, for the guard's acceptance rate (the last finite value wins).
#: decimals of MD-LSM values in tables (trained layers often differ only in the 3rd decimal).
LSM_DIGITS = 4
#: the per-layer bar chart is drawn for sweeps of at most this many settings.
MAX_BAR_GROUPS = 16
ACCEPT_KEYS = ("guard/accept_rate", "guard/acceptance_rate", "guard/accepted_fraction")

__all__ = ["ReportError", "Run", "Report", "read_metrics", "load_runs", "build_report", "main"]


class ReportError(Exception):
    """Bad input for the report (message says what was wrong and what was expected)."""


# ---------------------------------------------------------------------------------------------
# reading


def _to_float(value) -> float:
    """Number from a JSON value: numbers and numeric strings; anything else -> NaN."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return math.nan


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` file; malformed lines are skipped with a warning."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    last = nonblank[-1] if nonblank else -1
    records = []
    for i in nonblank:
        try:
            obj = json.loads(lines[i])
        except json.JSONDecodeError:
            what = "truncated last line (killed run?)" if i == last else "malformed line"
            warnings.warn(f"{path}: skipped {what} (line {i + 1})", stacklevel=2)
            continue
        if isinstance(obj, dict):
            records.append(obj)
        else:
            warnings.warn(f"{path}: skipped line {i + 1}: not a JSON object", stacklevel=2)
    return records


def _read_yaml(path: Path):
    if not path.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # a broken Hydra file must not stop the report
        warnings.warn(f"{path}: could not read ({exc})", stacklevel=2)
        return None


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_seed_override(override: str) -> bool:
    """``seed=1``, ``+seed=1``, ``trainer.seed=1``... (the last dotted key part is ``seed``)."""
    return _override_key(override).split(".")[-1] in {"seed", "seeds"}


@dataclass
class Run:
    """One run folder: its metric records and Hydra overrides/config."""

    path: Path
    name: str
    records: list[dict]
    overrides: list[str] = field(default_factory=list)
    config: dict | None = None
    acc_key: str = "auto"
    _sync: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path, name: str | None = None) -> Run:
        path = Path(path)
        records = read_metrics(path / METRICS_FILE)
        if not records:
            warnings.warn(f"{path / METRICS_FILE}: no records (the run logged nothing)",
                          stacklevel=2)
        overrides = _read_yaml(path / ".hydra" / "overrides.yaml")
        config = _read_yaml(path / ".hydra" / "config.yaml")
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

    def _layers(self, prefix: str) -> list[str]:
        names = [k[len(prefix):] for k in self.keys if k.startswith(prefix)]
        return [n for n in names if n and n not in AGGREGATE_LAYER_NAMES]

    @property
    def layers(self) -> list[str]:
        """Hidden layers with a training-probe MD-LSM (``lsm/<layer>``), in file order."""
        return self._layers(LSM_PREFIX)

    @property
    def val_layers(self) -> list[str]:
        return self._layers(VAL_LSM_PREFIX)

    def column(self, key: str) -> np.ndarray:
        """Values of ``key`` per record (NaN where missing or not a number)."""
        return np.array([_to_float(rec.get(key)) for rec in self.records], dtype=float)

    @property
    def steps(self) -> np.ndarray:
        """``step`` per record (the record index where ``step`` is missing)."""
        s = self.column("step")
        missing = ~np.isfinite(s)
        s[missing] = np.flatnonzero(missing)
        return s

    def final(self, key: str) -> float:
        """Last finite value of ``key`` (NaN if none)."""
        col = self.column(key)
        finite = col[np.isfinite(col)]
        return float(finite[-1]) if finite.size else math.nan

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
        """Accuracy key for synchronicity: ``acc_key``, or with ``"auto"`` ``probe/acc`` when
        it is logged (the training-probe accuracy, measured by the same monitor call and on the
        same samples as ``lsm/<layer>``), else ``train/acc``."""
        if self.acc_key != "auto":
            return self.acc_key
        return PROBE_ACC if np.isfinite(self.column(PROBE_ACC)).any() else TRAIN_ACC

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

    def sync_series(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(MD-LSM, accuracy) of ``layer`` on the log points where both are finite."""
        _, lsm, acc = self.aligned(LSM_PREFIX + layer, self.sync_acc_key)
        return lsm, acc

    def sync_changes(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        lsm, acc = self.sync_series(layer)
        return stats.changes(lsm), stats.changes(acc)

    def steps_to(self, threshold: float):
        steps, acc = self.aligned(TRAIN_ACC)
        return stats.steps_to_threshold(steps, acc, threshold)

    def final_lsm(self, prefix: str = LSM_PREFIX) -> dict[str, float]:
        layers = self.layers if prefix == LSM_PREFIX else self.val_layers
        return {layer: self.final(prefix + layer) for layer in layers}

    def final_mean_lsm(self) -> float:
        vals = [v for v in self.final_lsm().values() if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    def wall_time(self) -> float:
        """Seconds: the largest ``time/elapsed``-like value, else file times (see docs)."""
        for key in TIME_KEYS:
            col = self.column(key)
            if np.isfinite(col).any():
                return float(np.nanmax(col))
        hydra = self.path / ".hydra"
        starts = [p.stat().st_mtime for p in hydra.glob("*.yaml")] if hydra.is_dir() else []
        if not starts:
            return math.nan
        end = (self.path / METRICS_FILE).stat().st_mtime
        return max(0.0, end - min(starts))

    def train_time(self) -> float:
        """Seconds of training alone (``time/train_s``: wall time minus the monitor), NaN
        when the run did not log it."""
        col = self.column("time/train_s")
        return float(np.nanmax(col)) if np.isfinite(col).any() else math.nan

    def accept_rate(self) -> float:
        """Guard acceptance rate: last value of an accept-rate key, else from counts, else NaN."""
        for key in ACCEPT_KEYS:
            value = self.final(key)
            if math.isfinite(value):
                return value
        for key in self.keys:  # any other guard/<...accept...rate|fraction...> key
            name = key[len("guard/"):] if key.startswith("guard/") else ""
            if "accept" in name and ("rate" in name or "frac" in name):
                value = self.final(key)
                if math.isfinite(value):
                    return value
        for a_key, r_key in (("guard/accepted", "guard/rejected"),
                             ("guard/accepts", "guard/rejects")):
            acc, rej = self.final(a_key), self.final(r_key)
            if math.isfinite(acc) and math.isfinite(rej) and acc + rej > 0:
                return acc / (acc + rej)
        return math.nan

    @property
    def has_guard(self) -> bool:
        return any(k.startswith("guard/") for k in self.keys)


def load_runs(folder: str | os.PathLike, acc_key: str = "auto") -> list[Run]:
    """The run folder itself, or every run folder below a sweep folder (natural order)."""
    folder = Path(folder)
    if not folder.exists():
        raise ReportError(f"{folder} does not exist; expected a run or sweep folder")
    if folder.is_file() and folder.name == METRICS_FILE:
        folder = folder.parent  # a run's metrics.jsonl given directly: its run folder
    elif not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; expected a run or sweep folder")
    if (folder / METRICS_FILE).is_file():
        runs = [Run.load(folder)]
    else:
        paths = sorted({p.parent for p in folder.rglob(METRICS_FILE) if p.is_file()},
                       key=_natural_key)
        if not paths:
            raise ReportError(
                f"no {METRICS_FILE} in {folder} or its subfolders; expected a run folder "
                f"(with {METRICS_FILE}) or a sweep folder (one run folder per job)"
            )
        runs = [Run.load(p, name=p.relative_to(folder).as_posix()) for p in paths]
    for run in runs:
        run.acc_key = acc_key
    return runs


# ---------------------------------------------------------------------------------------------
# grouping


@dataclass
class Group:
    """Jobs sharing every override but the seed."""

    key: tuple[str, ...]
    label: str
    runs: list[Run]


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by their overrides minus seed (and ``hydra.*``) overrides, first-seen order.

    The label shows only the overrides that differ between groups (``all`` if none differ).
    A run without ``.hydra/overrides.yaml`` is its own group, labelled by its name.
    """
    keyed: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.overrides or (run.path / ".hydra" / "overrides.yaml").is_file():
            key = tuple(sorted(
                o for o in run.overrides
                if not is_seed_override(o) and not _override_key(o).startswith("hydra.")
            ))
        else:
            key = ("run=" + run.name,)
        keyed.setdefault(key, []).append(run)
    keys = list(keyed)
    common = set(keys[0]).intersection(*keys[1:]) if keys else set()
    groups = []
    for key, members in keyed.items():
        first = [o for o in members[0].overrides if o in key]  # the command line's order
        varying = [o for o in first if o not in common]
        if key and key[0].startswith("run=") and len(key) == 1:
            label = key[0][4:]
        else:
            label = " ".join(varying) if varying else (" ".join(first) if len(keys) == 1 else "all")
        groups.append(Group(key, label or "all", members))
    return groups


# ---------------------------------------------------------------------------------------------
# tables


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def sync_table(run: Run, threshold: float) -> Table:
    rows = []
    early = run.synchronicity(until=threshold)
    for layer, s in run.synchronicity().items():
        e = early[layer]
        rows.append([layer, str(s.intervals), str(s.used), _fmt(s.same_sign), _fmt(s.spearman),
                     str(e.used), _fmt(e.same_sign), _fmt(e.spearman)])
    return Table(
        f"Synchronicity: {run.name} (Δ lsm/<layer> vs Δ {run.sync_acc_key})",
        ["layer", "intervals", "used (no zero change)", "same-sign fraction", "Spearman ρ",
         f"until {run.sync_acc_key} ≥ {threshold:g}: used", "same-sign", "Spearman ρ"],
        rows,
    )


def summary_table(groups: list[Group], threshold: float) -> Table:
    any_guard = any(r.has_guard for g in groups for r in g.runs)
    any_train_time = any(math.isfinite(r.train_time()) for g in groups for r in g.runs)
    columns = ["setting", "runs", "final val/acc", f"steps to train/acc ≥ {threshold:g}",
               "wall time (s)"]
    if any_train_time:
        columns.append("train time (s)")
    if any_guard:
        columns.append("guard accept rate")
    columns.append("final mean MD-LSM")
    rows = []
    for g in groups:
        steps = [r.steps_to(threshold) for r in g.runs]
        steps_text = "n/r" if all(s is None for s in steps) else stats.format_mean_std(
            steps, digits=0
        )
        row = [
            g.label,
            str(len(g.runs)),
            stats.format_mean_std([r.final("val/acc") for r in g.runs]),
            steps_text,
            stats.format_mean_std([r.wall_time() for r in g.runs], digits=1),
        ]
        if any_train_time:
            row.append(stats.format_mean_std([r.train_time() for r in g.runs], digits=1))
        if any_guard:
            guarded = [r.accept_rate() for r in g.runs if r.has_guard]
            row.append(stats.format_mean_std(guarded) if guarded else "–")
        row.append(stats.format_mean_std([r.final_mean_lsm() for r in g.runs], digits=LSM_DIGITS))
        rows.append(row)
    return Table("Summary (mean ± std over seeds)", columns, rows)


def _ordered_layers(runs: list[Run], prefix: str = LSM_PREFIX) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        for layer in r.layers if prefix == LSM_PREFIX else r.val_layers:
            seen.setdefault(layer, None)
    return list(seen)


def layer_table(groups: list[Group]) -> Table:
    """Per setting and layer: final MD-LSM (train probe, and test set when logged) and sync."""
    rows = []
    for g in groups:
        for layer in _ordered_layers(g.runs):
            syncs = [r.synchronicity().get(layer) for r in g.runs]
            syncs = [s for s in syncs if s is not None]
            rows.append([
                g.label,
                layer,
                stats.format_mean_std([r.final(LSM_PREFIX + layer) for r in g.runs],
                                      digits=LSM_DIGITS),
                stats.format_mean_std([r.final(VAL_LSM_PREFIX + layer) for r in g.runs],
                                      digits=LSM_DIGITS),
                stats.format_mean_std([s.same_sign for s in syncs]),
                stats.format_mean_std([s.spearman for s in syncs]),
            ])
    return Table(
        "Per layer (mean ± std over seeds)",
        ["setting", "layer", "final MD-LSM (train probe)", "final MD-LSM (test)",
         "same-sign fraction", "Spearman ρ"],
        rows,
    )


def sync_summary_table(groups: list[Group], threshold: float) -> Table:
    """Per setting: synchronicity of the first and the last hidden layer and over all layers.

    The paper expects it clearest next to the output (the last hidden layer). Each run
    contributes its own first/last layer and its mean over layers; mean ± std over seeds.
    """
    rows = []
    for g in groups:
        firsts, lasts, means, rhos, early = [], [], [], [], []
        for r in g.runs:
            sync = list(r.synchronicity().values())
            if not sync:
                continue
            firsts.append(sync[0].same_sign)
            lasts.append(sync[-1].same_sign)
            early.append(list(r.synchronicity(until=threshold).values())[-1].same_sign)
            means.append(float(np.nanmean([s.same_sign for s in sync]))
                         if any(math.isfinite(s.same_sign) for s in sync) else math.nan)
            rhos.append(sync[-1].spearman)
        if not firsts:
            continue
        rows.append([g.label, str(len(firsts)), stats.format_mean_std(firsts),
                     stats.format_mean_std(lasts), stats.format_mean_std(means),
                     stats.format_mean_std(rhos), stats.format_mean_std(early)])
    return Table(
        "Synchronicity by setting (same-sign fraction; mean ± std over seeds)",
        ["setting", "runs", "first hidden layer", "last hidden layer", "mean over layers",
         "Spearman ρ, last hidden layer", f"last hidden layer, until acc ≥ {threshold:g}"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _plot_lsm(ax, run: Run, title: str, legend: bool = False) -> None:
    """MD-LSM per layer on ``ax`` (own y range: trained layers crowd near 1) and the
    accuracy (dashed) on a twin axis in [0, 1]."""
    for layer in run.layers:
        steps, lsm = run.aligned(LSM_PREFIX + layer)
        ax.plot(steps, lsm, marker=".", ms=3, lw=1, label=layer)
    key = run.sync_acc_key
    steps, acc = run.aligned(key)
    twin = ax.twinx()
    if steps.size:
        twin.plot(steps, acc, "k--", lw=1, label=key)
    twin.set_ylim(0, 1.02)
    twin.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=6)
    if legend:
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=6, loc="lower right")
        ax.set_ylabel("MD-LSM (train probe)", fontsize=8)
        twin.set_ylabel(f"{key} (dashed)", fontsize=8)


def plot_run(run: Run, out: Path, title: str | None = None) -> list[Path]:
    """``<run>_lsm.png`` (MD-LSM per layer and accuracy vs step) and ``<run>_sync.png``."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    slug = _slug(run.name)
    title = title or run.name
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _plot_lsm(ax, run, f"MD-LSM per layer: {title}", legend=True)
    fig.tight_layout()
    paths.append(out / f"{slug}_lsm.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for layer in run.layers:
        dm, da = run.sync_changes(layer)
        ax.scatter(dm, da, s=8, alpha=0.7, label=layer)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("Δ MD-LSM per log interval")
    ax.set_ylabel(f"Δ {run.sync_acc_key} per log interval")
    ax.set_title(f"Synchronicity: {title}", fontsize=9)
    if run.layers:
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / f"{slug}_sync.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def plot_grid(groups: list[Group], out: Path, max_panels: int = 36) -> Path:
    """One panel per setting (its first run): MD-LSM per layer against step."""
    import matplotlib.pyplot as plt

    shown = groups[:max_panels]
    ncol = min(4, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow), squeeze=False)
    for i, (ax, g) in enumerate(zip(axes.flat, shown, strict=False)):
        _plot_lsm(ax, g.runs[0], g.label, legend=i == 0)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("MD-LSM per layer (coloured, left axis) and accuracy (dashed, right axis) "
                 "against step; first run of each setting", fontsize=9)
    fig.tight_layout()
    path = out / "lsm_grid.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _short_labels(groups: list[Group]) -> tuple[list[str], str | None]:
    """Labels for a legend: ``sigmoid`` with title ``model.kwargs.activation`` when every
    label is one override of the same key; the full labels otherwise."""
    parts = [g.label.split("=", 1) if " " not in g.label else [] for g in groups]
    if all(len(p) == 2 for p in parts) and len({p[0] for p in parts}) == 1:
        return [p[1] for p in parts], parts[0][0]
    return [g.label for g in groups], None


def plot_layer_bars(groups: list[Group], out: Path) -> Path:
    """Grouped bars: final MD-LSM of the k-th hidden layer, one bar per setting (± std).

    The y axis is zoomed to the data (MD-LSM lies in [0.5, 1]; trained layers are often
    close to 1, where a full-range axis would hide the differences).
    """
    import matplotlib.pyplot as plt

    names = [_ordered_layers(g.runs) for g in groups]
    depth = max(len(n) for n in names)
    same = all(n == names[0] for n in names)
    labels, title = _short_labels(groups)
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * depth + 0.2 * len(groups) * depth), 4.2))
    low = 1.0
    for i, (g, layers) in enumerate(zip(groups, names, strict=True)):
        means, stds = [], []
        for layer in layers:
            m, s, _ = stats.mean_std([r.final(LSM_PREFIX + layer) for r in g.runs])
            means.append(m)
            stds.append(0.0 if math.isnan(s) else s)
            if math.isfinite(m):
                low = min(low, m - stds[-1])
        x = np.arange(len(layers)) + (i - (len(groups) - 1) / 2) * width
        ax.bar(x, means, width, yerr=stds, capsize=2, label=labels[i])
    ax.set_xticks(np.arange(depth))
    ax.set_xticklabels(
        names[0] if same else [f"hidden {k + 1}" for k in range(depth)], rotation=20, fontsize=7
    )
    pad = max(0.002, 0.1 * (1.0 - low))
    ax.set_ylim(max(0.5, low - pad), 1.0 + pad / 2)
    ax.set_ylabel("final MD-LSM (train probe)")
    ax.set_title("Final per-layer MD-LSM by setting (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7, title=title, title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = out / "final_lsm_bars.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_acc_bars(groups: list[Group], out: Path) -> Path:
    """Horizontal bars: final val/acc per setting (mean ± std over seeds)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.3 * len(groups) + 1.2))
    means, stds = [], []
    for g in groups:
        m, s, _ = stats.mean_std([r.final("val/acc") for r in g.runs])
        means.append(0.0 if math.isnan(m) else m)
        stds.append(0.0 if math.isnan(s) else s)
    y = np.arange(len(groups))
    ax.barh(y, means, xerr=stds, capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels([g.label for g in groups], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("final val/acc")
    fig.tight_layout()
    path = out / "final_acc_bars.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# report


@dataclass
class Report:
    folder: Path
    out: Path
    runs: list[Run]
    groups: list[Group]
    tables: list[Table]
    images: list[Path]
    summary: dict

    def markdown(self) -> str:
        parts = [f"# lsm-report: {self.folder}", ""]
        for t in self.tables:
            parts += [f"## {t.title}", "", t.markdown(), ""]
        if self.images:
            parts += ["## Plots", ""]
            parts += [f"![{p.stem}]({p.relative_to(self.out).as_posix()})" for p in self.images]
        return "\n".join(parts) + "\n"


def _run_summary(run: Run, threshold: float) -> dict:
    def num(x):
        return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

    def sync(until):
        return {
            k: {"same_sign": num(s.same_sign), "spearman": num(s.spearman),
                "intervals": s.intervals, "used": s.used}
            for k, s in run.synchronicity(until).items()
        }

    return {
        "name": run.name,
        "path": str(run.path),
        "overrides": run.overrides,
        "records": len(run.records),
        "final_val_acc": num(run.final("val/acc")),
        "steps_to_threshold": run.steps_to(threshold),
        "wall_time_s": num(run.wall_time()),
        "train_time_s": num(run.train_time()),
        "guard_accept_rate": num(run.accept_rate()),
        "final_mean_lsm": num(run.final_mean_lsm()),
        "final_lsm": {k: num(v) for k, v in run.final_lsm().items()},
        "sync_acc_key": run.sync_acc_key,
        "synchronicity": sync(None),
        "synchronicity_learning_phase": sync(threshold),
    }


def build_report(
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    threshold: float = 0.9,
    plots: bool = True,
    acc_key: str = "auto",
) -> Report:
    """Read ``folder``, compute every table, write ``report.md``, ``summary.json`` and PNGs."""
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ReportError(f"threshold must be an accuracy in [0, 1], got {threshold}")
    folder = Path(folder)
    if folder.is_file() and folder.name == METRICS_FILE:
        folder = folder.parent
    runs = load_runs(folder, acc_key)
    out = Path(out) if out is not None else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    tables = [summary_table(groups, threshold)]
    if len(runs) > 1:
        sync_summary = sync_summary_table(groups, threshold)
        if sync_summary.rows:
            tables.append(sync_summary)
        tables.append(layer_table(groups))
    tables += [sync_table(r, threshold) for r in runs]

    images: list[Path] = []
    if plots:
        import matplotlib

        matplotlib.use("Agg", force=True)
        labels = {id(r): f"{r.name} ({g.label})" for g in groups for r in g.runs}
        for r in runs:
            if len(runs) > 1:
                images += plot_run(r, out / "runs", labels[id(r)])
            else:
                images += plot_run(r, out)
        if len(runs) > 1:
            images.append(plot_grid(groups, out))
            images.append(plot_acc_bars(groups, out))
        with_layers = [g for g in groups if _ordered_layers(g.runs)]
        if 1 < len(with_layers) <= MAX_BAR_GROUPS:
            images.append(plot_layer_bars(with_layers, out))

    summary = {
        "folder": str(folder),
        "threshold": threshold,
        "acc_key": acc_key,
        "groups": [{"label": g.label, "overrides": list(g.key),
                    "runs": [r.name for r in g.runs]} for g in groups],
        "runs": [_run_summary(r, threshold) for r in runs],
    }
    report = Report(folder, out, runs, groups, tables, images, summary)
    (out / "report.md").write_text(report.markdown(), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return report


def log_to_wandb(report: Report) -> bool:
    """Log tables and PNGs to a wandb run (``WANDB_MODE``, default offline). Warn on failure."""
    try:
        import wandb

        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lsm_train"),
            job_type="report",
            name=f"report-{report.folder.name}",
            dir=str(report.out),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config={"folder": str(report.folder), "threshold": report.summary["threshold"]},
        )
        try:
            for t in report.tables:
                run.log({f"report/{_slug(t.title)}": wandb.Table(columns=t.columns, data=t.rows)})
            for p in report.images:
                key = f"plots/{_slug(p.relative_to(report.out).as_posix())}"
                run.log({key: wandb.Image(str(p))})
        finally:
            run.finish()
        return True
    except Exception as exc:  # tracking must never break the report
        warnings.warn(f"wandb logging failed ({type(exc).__name__}: {exc}); "
                      f"the local report is in {report.out}", stacklevel=2)
        return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lsm-report",
        description="Synchronicity, sweep tables and plots from lsm-train run folders "
        "(metrics.jsonl), with no network.",
    )
    p.add_argument("folder", help="a run folder (with metrics.jsonl) or a sweep folder")
    p.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="training-accuracy threshold for 'steps to threshold' (default 0.9)")
    p.add_argument("--wandb", action="store_true",
                   help="also log tables and plots to wandb (WANDB_MODE, default offline)")
    p.add_argument("--acc-key", default="auto",
                   help="accuracy key for synchronicity: auto (probe/acc when logged, else "
                   "train/acc), train/acc, probe/acc, ... (default auto)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = build_report(args.folder, args.out, threshold=args.threshold,
                                  plots=not args.no_plots, acc_key=args.acc_key)
        except ReportError as exc:
            print(f"lsm-report: error: {exc}", file=sys.stderr)
            return 2
        finally:
            _print_warnings(caught)
            caught.clear()
        print(report.markdown())
        if args.wandb:
            log_to_wandb(report)
        _print_warnings(caught)
    print(f"report written to {report.out}", file=sys.stderr)
    return 0


def _print_warnings(caught) -> None:
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"lsm-report: warning: {w.message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
