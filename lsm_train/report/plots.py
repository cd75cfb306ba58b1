"""Report plots (PNG, matplotlib's Agg backend): per run, and per setting for sweeps.

``<run>_lsm.png`` is the MD-LSM of each layer (drawn by :func:`lsm_train.plots.draw_layers`,
as in the app's ``summary.png``) as ``1 − m`` on a log axis (:func:`draw_layer_gaps`: clipped
at ``GAP_FLOOR`` for m = 1, axis inverted so that up is more separable; 0.999 and 0.9999 are
a decade apart), with the accuracy on a twin axis; ``<run>_sync.png`` the
change of MD-LSM against the change of accuracy; for sweeps ``lsm_grid.png`` (one panel per
setting), ``final_acc_bars.png`` and ``final_lsm_bars.png`` (final 1 − m per layer and
setting, on the same log axis). See ``docs/report.md``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from lsm_train import runlog, stats
from lsm_train.plots import GAP_FLOOR, GAP_LABEL, draw_layer_gaps, gap_records
from lsm_train.report.groups import Group
from lsm_train.report.runs import Run
from lsm_train.report.tables import ordered_layers

__all__ = ["plot_run", "plot_grid", "plot_layer_bars", "plot_acc_bars", "slug",
           "draw_layer_gaps", "gap_records", "GAP_FLOOR", "GAP_LABEL"]

def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _plot_lsm(ax, run: Run, title: str, legend: bool = False) -> None:
    """1 − MD-LSM per layer on ``ax`` (log, inverted: trained layers crowd near m = 1) and
    the accuracy (dashed) on a twin axis in [0, 1]."""
    draw_layer_gaps(ax, run.records, marker=".", ms=3, lw=1)
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
        ax.set_ylabel(f"{GAP_LABEL}, train probe", fontsize=8)
        twin.set_ylabel(f"{key} (dashed)", fontsize=8)


def plot_run(run: Run, out: Path, title: str | None = None) -> list[Path]:
    """``<run>_lsm.png`` (MD-LSM per layer and accuracy vs step) and ``<run>_sync.png``."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    name = slug(run.name)
    title = title or run.name
    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _plot_lsm(ax, run, f"MD-LSM per layer: {title}", legend=True)
    fig.tight_layout()
    paths.append(out / f"{name}_lsm.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for layer in run.layers:
        dm, da = (stats.changes(series) for series in run.sync_series(layer))
        ax.scatter(dm, da, s=8, alpha=0.7, label=layer)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("Δ MD-LSM per log interval")
    ax.set_ylabel(f"Δ {run.sync_acc_key} per log interval")
    ax.set_title(f"Synchronicity: {title}", fontsize=9)
    if run.layers:
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / f"{name}_sync.png")
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
    fig.suptitle("1 − MD-LSM per layer (coloured, left log axis, up = more separable) and "
                 "accuracy (dashed, right axis) against step; first run of each setting",
                 fontsize=9)
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
    """Final 1 − MD-LSM of the k-th hidden layer, one marker per setting (± std over seeds),
    on an inverted log axis (up = more separable; clipped at ``GAP_FLOOR``), so that
    settings at 0.999 and 0.9999 are a decade apart. The file keeps its name
    ``final_lsm_bars.png``."""
    import matplotlib.pyplot as plt

    names = [ordered_layers(g.runs) for g in groups]
    depth = max(len(n) for n in names)
    same = all(n == names[0] for n in names)
    labels, title = _short_labels(groups)
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * depth + 0.2 * len(groups) * depth), 4.2))
    for i, (g, layers) in enumerate(zip(groups, names, strict=True)):
        gaps, low, high = [], [], []
        for layer in layers:
            m, s, _ = stats.mean_std([r.final(runlog.LSM + layer) for r in g.runs])
            s = 0.0 if math.isnan(s) else s
            gap = max(1.0 - m, GAP_FLOOR) if math.isfinite(m) else math.nan
            gaps.append(gap)
            low.append(gap - max(gap - s, GAP_FLOOR) if math.isfinite(gap) else 0.0)
            high.append(s if math.isfinite(gap) else 0.0)
        x = np.arange(len(layers)) + (i - (len(groups) - 1) / 2) * width
        ax.errorbar(x, gaps, yerr=[low, high], fmt="o", ms=5, capsize=2, label=labels[i])
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.set_xticks(np.arange(depth))
    ax.set_xticklabels(
        names[0] if same else [f"hidden {k + 1}" for k in range(depth)], rotation=20, fontsize=7
    )
    ax.set_ylabel(f"final {GAP_LABEL}, train probe", fontsize=8)
    ax.set_title("Final per-layer 1 − MD-LSM by setting (mean ± std over seeds)", fontsize=9)
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
        m, s, _ = stats.mean_std([r.final(runlog.VAL_ACC) for r in g.runs])
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


