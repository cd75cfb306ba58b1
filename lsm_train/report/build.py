"""Build a report: read the runs, group them, compute the tables and plots, write them out.

:func:`build_report` writes ``report.md`` (the tables as markdown, then the plots),
``summary.json`` (every run's figures, machine-readable) and the PNGs to ``out`` (default
``<folder>/report``); :func:`log_to_wandb` also logs them to a wandb run. See
``docs/report.md``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from lsm_train import runlog
from lsm_train.report import plots as report_plots
from lsm_train.report.groups import Group, group_runs
from lsm_train.report.runs import MAX_DEPTH, ReportError, Run, load_runs
from lsm_train.report.tables import (
    Table,
    controls_table,
    layer_table,
    ordered_layers,
    summary_table,
    sync_summary_table,
    sync_table,
)

__all__ = ["Report", "build_report", "log_to_wandb", "MAX_BAR_GROUPS"]

#: the per-layer bar chart is drawn for sweeps of at most this many settings.
MAX_BAR_GROUPS = 16


@dataclass
class Report:
    """What :func:`build_report` computed and wrote."""

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
        "final_val_acc": num(run.final(runlog.VAL_ACC)),
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
    max_depth: int = MAX_DEPTH,
) -> Report:
    """Read ``folder``, compute every table, write ``report.md``, ``summary.json`` and PNGs.

    ``threshold``: the training accuracy for "steps to threshold" and the learning phase;
    ``acc_key``: the accuracy for synchronicity (``auto``: ``probe/acc`` when logged, else
    ``train/acc``); ``max_depth``: how deep to search a sweep folder for run folders.
    """
    if not (0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ReportError(f"threshold must be an accuracy in [0, 1], got {threshold}")
    folder = Path(folder)
    if folder.is_file() and folder.name == runlog.METRICS_FILE:
        folder = folder.parent
    runs = load_runs(folder, acc_key, max_depth)
    out = Path(out) if out is not None else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    tables = [summary_table(groups, threshold)]
    controls = controls_table(groups)
    if controls is not None:
        tables.append(controls)
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
                images += report_plots.plot_run(r, out / "runs", labels[id(r)])
            else:
                images += report_plots.plot_run(r, out)
        if len(runs) > 1:
            images.append(report_plots.plot_grid(groups, out))
            images.append(report_plots.plot_acc_bars(groups, out))
        with_layers = [g for g in groups if ordered_layers(g.runs)]
        if 1 < len(with_layers) <= MAX_BAR_GROUPS:
            images.append(report_plots.plot_layer_bars(with_layers, out))

    summary = {
        "folder": str(folder),
        "threshold": threshold,
        "acc_key": acc_key,
        "groups": [{"label": g.label, "key": list(g.key),
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
                table = wandb.Table(columns=t.columns, data=t.rows)
                run.log({f"report/{report_plots.slug(t.title)}": table})
            for p in report.images:
                key = f"plots/{report_plots.slug(p.relative_to(report.out).as_posix())}"
                run.log({key: wandb.Image(str(p))})
        finally:
            run.finish()
        return True
    except Exception as exc:  # tracking must never break the report
        warnings.warn(f"wandb logging failed ({type(exc).__name__}: {exc}); "
                      f"the local report is in {report.out}", stacklevel=2)
        return False


