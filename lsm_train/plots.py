"""End-of-run outputs of the app: ``summary.png`` and a terminal summary, from ``metrics.jsonl``.

The PNG has two panels against the step: the cross-fitted MD-LSM of every hidden layer on
the training probe (solid) and on the test set (dashed), drawn as 1 − m on a log axis
(:func:`lsm_train.report.plots.draw_layer_gaps`), and the train/probe/val accuracy.
The text lists, per layer, the MD-LSM at the first and the last monitor step, then the final
accuracies, the step count, the wall time and, with the guard, its acceptance rate.
Records are read through :mod:`lsm_train.runlog`; ``lsm-report`` draws its per-run panels
with :func:`draw_layers` too. See ``docs/app.md`` (run folder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsm_train import runlog

__all__ = ["series", "draw_layers", "draw_layer_gaps", "gap_records", "summary_png",
           "summary_text", "GAP_FLOOR", "GAP_LABEL"]

GAP_FLOOR = 1e-6  # 1 − m is drawn as at least this (m = 1 has no place on a log axis)
GAP_LABEL = "1 − MD-LSM (log; up = more separable)"


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the records where it is a finite number (the record
    index stands in for a missing ``step``)."""
    xs, ys = [], []
    for i, record in enumerate(records):
        value = runlog.to_float(record.get(key))
        if math.isfinite(value):
            xs.append(runlog.to_float(record.get(runlog.STEP, i)))
            ys.append(value)
    return xs, ys


def draw_layers(ax, records: Sequence[dict[str, Any]], *, test: bool = False,
                **style: Any) -> list[str]:
    """Plot ``lsm/<layer>`` of every layer on ``ax`` (one colour each; with ``test=True``
    also ``val_lsm/<layer>``, dashed, same colour). Returns the layer names."""
    import matplotlib.pyplot as plt

    layers = runlog.layer_names(records, runlog.LSM)
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(layers):
        color = cmap(i / max(1, len(layers) - 1))
        ax.plot(*series(records, runlog.LSM + name), color=color, label=name, **style)
        if test:
            xs, ys = series(records, runlog.VAL_LSM + name)
            if xs:
                ax.plot(xs, ys, color=color, linestyle="--", alpha=0.7)
    return layers


def gap_records(records: list[dict], floor: float = GAP_FLOOR) -> list[dict]:
    """The records with every per-layer MD-LSM value m (``lsm/`` and ``val_lsm/`` layer
    keys) replaced by max(1 − m, floor); other keys unchanged; a non-number becomes None
    (not drawn)."""
    out = []
    for record in records:
        row = dict(record)
        for key, value in record.items():
            if runlog.layer_of(key, runlog.LSM) or runlog.layer_of(key, runlog.VAL_LSM):
                m = runlog.to_float(value)
                row[key] = max(1.0 - m, floor) if math.isfinite(m) else None
        out.append(row)
    return out


def draw_layer_gaps(ax, records: list[dict], *, test: bool = False,
                    floor: float = GAP_FLOOR, **style) -> list[str]:
    """1 − MD-LSM of every layer on a log y axis (inverted: up = more separable), clipped
    at ``floor``; colours and dashes as :func:`draw_layers`."""
    layers = draw_layers(ax, gap_records(records, floor), test=test, **style)
    ax.set_yscale("log")
    if not ax.yaxis_inverted():
        ax.invert_yaxis()
    return layers


def summary_png(metrics: str | Path, out: str | Path, *, title: str = "") -> Path:
    """Write the two-panel summary PNG of a run (``metrics.jsonl`` or its folder) to ``out``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = runlog.read_metrics(metrics)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    layers = draw_layer_gaps(ax1, records, test=True)
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"{GAP_LABEL}, cross-fitted")
    ax1.set_title("hidden-layer separability (solid: train probe, dashed: test)")
    if layers:
        ax1.legend(fontsize=7, loc="lower right")
    else:
        ax1.text(0.5, 0.5, "monitor off", ha="center", va="center", transform=ax1.transAxes)
    for key, style in ((runlog.TRAIN_ACC, "-"), (runlog.PROBE_ACC, ":"),
                       (runlog.VAL_ACC, "--")):
        xs, ys = series(records, key)
        if xs:
            ax2.plot(xs, ys, style, label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8, loc="lower right")
    ax2.set_title("accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def summary_text(metrics: str | Path, result: Any = None) -> str:
    """A plain-text summary of the run (per-layer MD-LSM first/last, final accuracies)."""
    records = runlog.read_metrics(metrics)
    if not records:
        return "(no metrics logged)"
    layers = runlog.layer_names(records, runlog.LSM)
    lines = []
    if layers:
        w = max(12, max(len(n) for n in layers))
        lines.append(f"{'layer':<{w}}  {'lsm first':>9}  {'lsm last':>9}  {'val_lsm last':>12}")
        for name in layers:
            _, ys = series(records, runlog.LSM + name)
            _, vs = series(records, runlog.VAL_LSM + name)
            lines.append(
                f"{name:<{w}}  {_fmt(ys[0] if ys else None):>9}  {_fmt(ys[-1] if ys else None):>9}"
                f"  {_fmt(vs[-1] if vs else None):>12}"
            )
    last: dict[str, Any] = {}
    for r in records:
        last.update(r)
    facts = [("step", last.get(runlog.STEP)), ("epoch", last.get(runlog.EPOCH))]
    for key in (runlog.TRAIN_LOSS, runlog.TRAIN_ACC, runlog.VAL_LOSS, runlog.VAL_ACC,
                runlog.GUARD_ACCEPT_RATE):
        if key in last:
            facts.append((key, last[key]))
    if runlog.TIME_ELAPSED in last:
        facts.append(("wall time (s)", round(float(last[runlog.TIME_ELAPSED]), 1)))
    if result is not None:
        facts.append(("status", result.status))
    lines.append("  ".join(f"{k}={_fmt(v)}" for k, v in facts))
    return "\n".join(lines)
