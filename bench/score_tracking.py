"""Which layer score moves with training? Mean pairwise, hard-pair, ovr and a linear probe.

    .venv/bin/python bench/score_tracking.py            # 4 benchmarks x 3 seeds (<= 10 min)
    .venv/bin/python bench/score_tracking.py --quick    # 1 seed, short runs (about 1 min)

For each benchmark (``data=`` configs of bench/hardness.py) and seed, an MLP (2 hidden ReLU
layers of 64, AdamW lr 1e-3, the config's batch size) is trained with a plain PyTorch loop.
At evenly spaced steps (step 0 included) it records the training accuracy (all training rows,
the training labels) and, for each hidden layer on a probe of the first ``--probe`` training
rows, four cross-fitted scores (every split seeded, the same at every evaluation):

* ``mean pairwise``: ``lt.layer_separability(H, y, method, holdout=0.5)`` (the paper's score);
* ``hard-pair``: :func:`lsm_train.hard_pair_score` of the same per-pair values (worst ⌈P/10⌉);
* ``ovr``: ``scheme="ovr"``, the mean over class-vs-rest problems;
* ``linear probe``: accuracy of a multinomial logistic regression (C=1, standardised
  features) fitted on one stratified half of the probe and scored on the other, both ways.

Then, per score and benchmark: the same-sign fraction of its changes with the training
accuracy's changes between successive evaluations, pooled over seeds and layers, against
the shuffled baseline of :func:`lsm_train.stats.same_sign_test` (mean and p-value), and
Spearman ρ of the levels (score vs accuracy over the evaluations of one run and layer; mean
over runs and layers), Spearman ρ of the changes, and the final level of each score.
Docs: ``docs/measures.md`` (the hard-pair score and this table).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hardness import BENCHMARKS as HARDNESS_BENCHMARKS  # noqa: E402
from hardness import data_config, linear_probe_accuracy  # noqa: E402

import lsm_train as lt  # noqa: E402
from lsm_train import stats  # noqa: E402
from lsm_train.data import epoch_order, load_data  # noqa: E402
from lsm_train.models import create_model  # noqa: E402
from lsm_train.monitor import capture  # noqa: E402

SCORES = ("mean pairwise", "hard-pair", "ovr", "linear probe")
# benchmark: (epochs, epochs with --quick)
EPOCHS = {"teacher": (12, 3), "digits_noisy": (30, 8), "digits_small": (150, 40),
          "digits": (20, 5)}


def probe_accuracy(H: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Cross-fitted linear-probe accuracy: bench/hardness.py's probe (logistic regression,
    C=1, standardised features) fitted on one stratified half and scored on the other,
    averaged both ways."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(2, shuffle=True, random_state=seed).split(H, y)
    return float(np.mean([linear_probe_accuracy(H[fit], y[fit], H[ev], y[ev])
                          for fit, ev in folds]))


def layer_scores(H: torch.Tensor, y: torch.Tensor, method: str) -> dict[str, float]:
    """The four scores of one layer's probe features (module docstring)."""
    mean, details = lt.layer_separability(H, y, method=method, holdout=0.5,
                                          return_details=True)
    return {
        "mean pairwise": mean,
        "hard-pair": lt.hard_pair_score(details),
        "ovr": lt.layer_separability(H, y, method=method, scheme="ovr", holdout=0.5),
        "linear probe": probe_accuracy(H.double().numpy(), y.numpy()),
    }


def eval_steps(total: int, count: int) -> list[int]:
    """Step 0 and ``count`` evenly spaced steps up to ``total`` (without repeats): the late
    intervals, where the accuracy goes up and down, are what the same-sign test can use."""
    return np.unique(np.round(np.linspace(0, total, count + 1)).astype(int)).tolist()


def train_run(bundle, batch_size: int, seed: int, epochs: int, n_evals: int, probe: int,
              method: str) -> dict:
    """Train one MLP; returns {"acc": [...], "scores": {layer: {score: [...]}}}."""
    torch.manual_seed(seed)
    model = create_model("mlp", num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                         image_size=bundle.image_size, width=64, depth=2)
    layers = list(model.hidden_layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, bs = bundle.train, batch_size
    per_epoch = -(-len(train) // bs)
    due = set(eval_steps(epochs * per_epoch, n_evals))
    y_probe = train.y[:probe]
    out = {"acc": [], "scores": {name: {s: [] for s in SCORES} for name in layers}}

    def evaluate() -> None:
        feats, counts = capture(model, train, layers=layers, keep=probe)
        out["acc"].append(float(counts["correct"]) / float(counts["n"]))
        for name in layers:
            for score, value in layer_scores(feats[name], y_probe, method).items():
                out["scores"][name][score].append(float(value))

    step = 0
    for epoch in range(epochs):
        order = epoch_order(len(train), seed, epoch)
        for start in range(0, len(train), bs):
            if step in due:
                evaluate()
            xb, yb = train.batch(order[start:start + bs])
            model.train()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    if step in due:
        evaluate()
    return out


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per score: the pooled same-sign test, and over runs × layers the Spearman ρ of the
    levels, the Spearman ρ of the changes and the final level."""
    table = {}
    for score in SCORES:
        series, rhos, rho_changes, finals = [], [], [], []
        for run in runs:
            for layer in run["scores"].values():
                dx, dy = stats.changes(layer[score]), stats.changes(run["acc"])
                series.append((dx, dy))
                rhos.append(stats.spearman(layer[score], run["acc"]))
                rho_changes.append(stats.spearman(dx, dy))
                finals.append(layer[score][-1])
        table[score] = {"test": stats.same_sign_test(series, permutations=5000, seed=0),
                        "rho": rhos, "rho_changes": rho_changes, "final": finals}
    return table


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(results: dict[str, dict], cell) -> None:
    names = list(results)
    print("| score | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for score in SCORES:
        print(f"| {score} | " + " | ".join(cell(results[n][score]) for n in names) + " |")


def print_tables(results: dict[str, dict], header: str) -> None:
    print(header)
    print("\nSame-sign fraction of Δscore and Δtrain-acc between evaluations, pooled over "
          "seeds and layers: observed / shuffled baseline (one-sided p, intervals used)\n")
    _table(results, lambda r: f"{r['test'].fraction:.2f} / {r['test'].baseline:.2f} "
                              f"(p={r['test'].p_value:.3f}, n={r['test'].used})")
    for key, title in (
        ("rho", "Spearman ρ of the levels (score vs train acc over one run's evaluations)"),
        ("rho_changes", "Spearman ρ of the changes (Δscore vs Δtrain-acc)"),
        ("final", "Final level of the score (last evaluation)"),
    ):
        print(f"\n{title}, mean ± std over seeds × layers\n")
        _table(results, lambda r, key=key: stats.format_mean_std(r[key], digits=3 if key ==
                                                                 "final" else 2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(EPOCHS), default=list(EPOCHS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--evals", type=int, default=24, help="evaluations per run after step 0")
    ap.add_argument("--probe", type=int, default=1000, help="training rows scored")
    ap.add_argument("--method", choices=["fisher", "degree"], default="fisher")
    ap.add_argument("--quick", action="store_true", help="1 seed, short runs (~1 min)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.evals, args.probe = 1, 10, min(args.probe, 500)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = {}
    for name in args.only:
        group, overrides = HARDNESS_BENCHMARKS[name]
        bundle = load_data(group, **data_config(group, overrides))
        epochs = EPOCHS[name][1 if args.quick else 0]
        runs = [train_run(bundle, batch_size(group), seed, epochs, args.evals, args.probe,
                          args.method)
                for seed in range(args.seeds)]
        results[name] = summarize(runs)
        final = [r["acc"][-1] for r in runs]
        print(f"{name}: {epochs} epochs, final train acc {stats.format_mean_std(final)}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    command = "bench/score_tracking.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"\nmachine: {platform.machine()}, {os.cpu_count()} cores (1 thread used), torch "
              f"{torch.__version__}; commit {_commit()}; command: {command.strip()}; "
              f"method={args.method}, seeds={args.seeds}, evals={args.evals}, "
              f"probe={args.probe}; {time.perf_counter() - t0:.0f} s")
    print_tables(results, header)


def batch_size(group: str) -> int:
    """The batch size of conf/data/<group>.yaml."""
    from omegaconf import OmegaConf

    from lsm_train.app import conf_dir

    return int(OmegaConf.load(conf_dir() / "data" / f"{group}.yaml").batch_size)


if __name__ == "__main__":
    main()
