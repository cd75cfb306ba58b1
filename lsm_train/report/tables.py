"""Report tables: per-run synchronicity, per-setting summary, per-layer finals, controls.

Every cell is a mean ± sample std over the seeds of a setting
(:func:`lsm_train.stats.format_mean_std`); ``–`` where no run has a value. See
``docs/report.md`` for what each column means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lsm_train import runlog, stats
from lsm_train.report.groups import Group
from lsm_train.report.runs import Run

__all__ = ["Table", "sync_table", "summary_table", "layer_table", "sync_summary_table",
           "controls_table", "is_plain", "training_seconds", "ordered_layers", "LSM_DIGITS"]

#: decimals of MD-LSM values in tables (trained layers often differ only in the 3rd decimal).
LSM_DIGITS = 4


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


@dataclass
class Table:
    """A titled table of strings, printed as markdown."""

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
    """Per layer of one run: synchronicity over the whole run and in the learning phase."""
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
    """Per setting: final val/acc, steps to the threshold, times, guard rate, final MD-LSM."""
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
            stats.format_mean_std([r.final(runlog.VAL_ACC) for r in g.runs]),
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


def is_plain(run: Run) -> bool:
    """Trained without the loss and the guard: ``lsm.mode`` is ``off`` or ``monitor``."""
    lsm = (run.config or {}).get("lsm")
    return isinstance(lsm, dict) and lsm.get("mode") in ("off", "monitor")


def training_seconds(run: Run) -> float:
    """``time/train_s`` (the training loop alone), else the wall time."""
    train = run.train_time()
    return train if math.isfinite(train) else run.wall_time()


def controls_table(groups: list[Group]) -> Table | None:
    """Per setting against the reference, the first setting whose runs are all plain
    (:func:`is_plain`): test accuracy at the end and at its best evaluation, accept rate,
    and the mean training time (``time/train_s``, else wall time) over the reference's.
    None when fewer than two settings, or none or all of them plain (a study of the plain
    network alone, such as a width sweep, has no controls to show)."""
    plain = [bool(g.runs) and all(is_plain(r) for r in g.runs) for g in groups]
    if len(groups) < 2 or all(plain) or not any(plain):
        return None
    reference = groups[plain.index(True)]
    ref_time, _, _ = stats.mean_std([training_seconds(r) for r in reference.runs])
    rows = []
    for g in groups:
        mean_time, _, k = stats.mean_std([training_seconds(r) for r in g.runs])
        ratio = mean_time / ref_time if k and ref_time > 0 else math.nan
        guarded = [r.accept_rate() for r in g.runs if r.has_guard]
        rows.append([
            g.label,
            stats.format_mean_std([r.final(runlog.VAL_ACC) for r in g.runs]),
            stats.format_mean_std([r.largest(runlog.VAL_ACC) for r in g.runs]),
            str(len(g.runs)),
            stats.format_mean_std(guarded) if guarded else "–",
            "–" if not math.isfinite(ratio) else f"{ratio:.2f}x",
        ])
    return Table(
        f"Controls (mean ± std over seeds; time ratio to {reference.label})",
        ["setting", "test acc (final)", "test acc (best evaluation)", "seeds",
         "guard accept rate", "train time ratio"],
        rows,
    )


def ordered_layers(runs: list[Run]) -> list[str]:
    """The layers of all runs (``lsm/<layer>``), in first-seen order."""
    return runlog.layer_names(rec for r in runs for rec in r.records)


def layer_table(groups: list[Group]) -> Table:
    """Per setting and layer: final MD-LSM (train probe, and test set when logged) and sync."""
    rows = []
    for g in groups:
        for layer in ordered_layers(g.runs):
            syncs = [r.synchronicity().get(layer) for r in g.runs]
            syncs = [s for s in syncs if s is not None]
            rows.append([
                g.label,
                layer,
                stats.format_mean_std([r.final(runlog.LSM + layer) for r in g.runs],
                                      digits=LSM_DIGITS),
                stats.format_mean_std([r.final(runlog.VAL_LSM + layer) for r in g.runs],
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


