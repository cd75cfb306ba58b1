"""Regenerate the figures of RESULTS.md from the sweep folders of the ablation studies.

    .venv/bin/python bench/results_figures.py --out results \\
        teacher=/work/studies/teacher noisy=/work/studies/noisy unstable=/work/studies/unstable

Each ``NAME=FOLDER`` is a sweep of ``recipe=ablation/<name>-controls`` (or several sweeps
below one folder); runs are read and grouped into settings by ``lsm_train.report``. For each
it writes ``<NAME>_acc_by_arm.png`` (final test accuracy per arm, one dot per seed, the mean
as a tick with ± sd, the train-time ratio to the plain arm on the right) and
``<NAME>_test_acc_curves.png`` (test accuracy at each evaluation, mean over seeds per arm).
A name starting with ``paper`` (a sweep of ``recipe=ablation/teacher-paper``) is drawn
instead as ``<NAME>_lsm.png``: the final ``1 - MD-LSM`` per layer on a log axis next to the
final test accuracy, per setting, and its synchronicity against an independence null is
printed as a markdown table (:func:`sync_against_null`). See RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lsm_train import runlog, stats
from lsm_train.report import group_runs, load_runs
from lsm_train.report.groups import Group
from lsm_train.report.tables import is_plain, ordered_layers, training_seconds

ARM_KEY = "+recipe/ablation/arms="


def arm_name(group: Group) -> str:
    """The arm's name (``guard-loss``) from a label such as ``+recipe/ablation/arms=guard-loss``."""
    return " ".join(part.removeprefix(ARM_KEY) for part in group.label.split())


def acc_by_arm(groups: list[Group], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ref = next((g for g in groups if all(is_plain(r) for r in g.runs)), groups[0])
    ref_time, _, _ = stats.mean_std([training_seconds(r) for r in ref.runs])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(groups) + 1.2))
    for i, g in enumerate(groups):
        accs = [r.final(runlog.VAL_ACC) for r in g.runs]
        mean, std, _ = stats.mean_std(accs)
        y = len(groups) - 1 - i
        color = "tab:blue" if is_plain(g.runs[0]) else "tab:orange"
        ax.errorbar(mean, y, xerr=0 if np.isnan(std) else std, fmt="|", ms=14, mew=2,
                    color=color, capsize=3, lw=1)
        ax.plot(accs, [y] * len(accs), "k.", ms=6, alpha=0.7)
        ratio = stats.mean_std([training_seconds(r) for r in g.runs])[0] / ref_time
        ax.annotate(f"{ratio:.1f}x", (1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(groups)), [arm_name(g) for g in reversed(groups)], fontsize=8)
    finals = [r.final(runlog.VAL_ACC) for g in groups for r in g.runs]
    lo, hi = np.nanmin(finals), np.nanmax(finals)
    pad = max(0.02, 0.1 * (hi - lo))
    ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + pad))
    ax.set_xlabel("final test accuracy (dots: seeds; bar: mean ± sd; blue: no loss or guard; "
                  "right: train time vs plain)", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_acc_curves(groups: list[Group], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for g in groups:
        curves = [r.aligned(runlog.VAL_ACC) for r in g.runs]
        n = min(len(s) for s, _ in curves)
        if n == 0:
            continue
        steps = curves[0][0][:n]
        mean = np.mean([a[:n] for _, a in curves], axis=0)
        style = "-" if is_plain(g.runs[0]) else "--"
        ax.plot(steps, mean, style, lw=1.3, label=arm_name(g))
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("test accuracy (mean over seeds)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paper_lsm(groups: list[Group], title: str, path: Path) -> None:
    """Final 1 - MD-LSM per layer (log axis) and final test accuracy, per setting."""
    import matplotlib.pyplot as plt

    fig, (ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 0.4 * len(groups) + 1.5),
                                     gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    for i, g in enumerate(groups):
        y = len(groups) - 1 - i
        for j, layer in enumerate(ordered_layers(g.runs)):
            vals = np.array([1.0 - r.final(runlog.LSM + layer) for r in g.runs])
            vals = np.clip(vals[np.isfinite(vals)], 1e-6, None)
            ax.plot(vals, [y + 0.12 * j] * len(vals), ".", color=f"C{j}", ms=5,
                    label=layer if i == 0 else None)
        accs = [r.final(runlog.VAL_ACC) for r in g.runs]
        acc_ax.plot(accs, [y] * len(accs), "k.", ms=5)
    ax.set_xscale("log")
    ax.set_yticks(range(len(groups)), [arm_name(g) for g in reversed(groups)], fontsize=8)
    ax.set_xlabel("1 - final MD-LSM (train probe), log axis: left = more separable",
                  fontsize=8)
    ax.legend(fontsize=7)
    acc_ax.set_xlabel("final test accuracy", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sync_against_null(run, layer: str) -> tuple[float, float]:
    """(same-sign fraction of the changes of ``lsm/<layer>`` and the probe accuracy, the
    fraction expected if the two signs were independent with each series' own share of
    rises: p_l p_a + (1 - p_l)(1 - p_a)); intervals where either change is 0 are left out."""
    lsm, acc = run.sync_series(layer)
    dl, da = np.diff(lsm), np.diff(acc)
    keep = (dl != 0) & (da != 0) & np.isfinite(dl) & np.isfinite(da)
    dl, da = dl[keep], da[keep]
    if dl.size == 0:
        return float("nan"), float("nan")
    pl, pa = float(np.mean(dl > 0)), float(np.mean(da > 0))
    return float(np.mean(np.sign(dl) == np.sign(da))), pl * pa + (1 - pl) * (1 - pa)


def sync_table(groups: list[Group]) -> str:
    """Markdown: per setting, the last hidden layer's same-sign fraction against its null."""
    lines = ["| setting | seeds | same-sign, last hidden layer | independence null | "
             "observed − null |", "|---|---|---|---|---|"]
    for g in groups:
        pairs = [sync_against_null(r, r.layers[-1]) for r in g.runs if r.layers]
        obs, null = [p[0] for p in pairs], [p[1] for p in pairs]
        lines.append(f"| {arm_name(g)} | {len(pairs)} | {stats.format_mean_std(obs)} | "
                     f"{stats.format_mean_std(null)} | "
                     f"{stats.format_mean_std([o - n for o, n in pairs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("studies", nargs="+", help="NAME=FOLDER (a sweep folder)")
    parser.add_argument("--out", default="results", help="folder for the PNGs")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg", force=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.studies:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"expected NAME=FOLDER, got {spec!r}")
        groups = group_runs(load_runs(folder))
        if name.startswith("paper"):
            paper_lsm(groups, f"{name}: layer separability by setting", out / f"{name}_lsm.png")
            print(out / f"{name}_lsm.png")
            print(sync_table(groups))
            continue
        acc_by_arm(groups, f"{name}: final test accuracy per arm",
                   out / f"{name}_acc_by_arm.png")
        test_acc_curves(groups, f"{name}: test accuracy during training",
                        out / f"{name}_test_acc_curves.png")
        print(out / f"{name}_acc_by_arm.png", out / f"{name}_test_acc_curves.png")


if __name__ == "__main__":
    main()
