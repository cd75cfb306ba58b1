"""End-of-run outputs: ``summary.png`` and a terminal summary table, from ``metrics.jsonl``.

The PNG has two panels against the step: the cross-fitted MD-LSM of every hidden layer on
the training probe (solid) and on the test set (dashed), and the train/val accuracy.
The table lists, per layer, the MD-LSM at the first and the last monitor step, then the
final accuracies, the step count, the wall time and, with the guard, its acceptance rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsm_train.tracking import read_metrics

__all__ = ["plot_run", "summary_table", "layer_names"]


def layer_names(records: list[dict[str, Any]]) -> list[str]:
    """Layer names in first-seen order of the ``lsm/<layer>`` keys (``lsm/mean`` excluded)."""
    names: dict[str, None] = {}
    for r in records:
        for k in r:
            if k.startswith("lsm/") and k != "lsm/mean":
                names.setdefault(k[4:], None)
    return list(names)


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_run(metrics: str | Path, out: str | Path, *, title: str = "") -> Path:
    """Write the two-panel summary PNG of a run to ``out`` and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    layers = layer_names(records)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(layers):
        color = cmap(i / max(1, len(layers) - 1))
        ax1.plot(*_series(records, f"lsm/{name}"), color=color, label=name)
        xs, ys = _series(records, f"val_lsm/{name}")
        if xs:
            ax1.plot(xs, ys, color=color, linestyle="--", alpha=0.7)
    ax1.set_xlabel("step")
    ax1.set_ylabel("MD-LSM (cross-fitted)")
    ax1.set_title("hidden-layer separability (solid: train probe, dashed: test)")
    if layers:
        ax1.legend(fontsize=7, loc="lower right")
    else:
        ax1.text(0.5, 0.5, "monitor off", ha="center", va="center", transform=ax1.transAxes)
    for key, style in (("train/acc", "-"), ("probe/acc", ":"), ("val/acc", "--")):
        xs, ys = _series(records, key)
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


def summary_table(metrics: str | Path, result: Any = None) -> str:
    """A plain-text table of the run (per-layer MD-LSM first/last, final accuracies)."""
    records = read_metrics(metrics)
    if not records:
        return "(no metrics logged)"
    layers = layer_names(records)
    lines = []
    if layers:
        w = max(12, max(len(n) for n in layers))
        lines.append(f"{'layer':<{w}}  {'lsm first':>9}  {'lsm last':>9}  {'val_lsm last':>12}")
        for name in layers:
            _, ys = _series(records, f"lsm/{name}")
            _, vs = _series(records, f"val_lsm/{name}")
            lines.append(
                f"{name:<{w}}  {_fmt(ys[0] if ys else None):>9}  {_fmt(ys[-1] if ys else None):>9}"
                f"  {_fmt(vs[-1] if vs else None):>12}"
            )
    last: dict[str, Any] = {}
    for r in records:
        last.update(r)
    facts = [("step", last.get("step")), ("epoch", last.get("epoch"))]
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "guard/accept_rate"):
        if key in last:
            facts.append((key, last[key]))
    if "time/elapsed_s" in last:
        facts.append(("wall time (s)", round(float(last["time/elapsed_s"]), 1)))
    if result is not None:
        facts.append(("status", result.status))
    lines.append("  ".join(f"{k}={_fmt(v)}" for k, v in facts))
    return "\n".join(lines)
