"""How hard is each CPU benchmark? The input's layer score next to a linear probe's accuracy.

    .venv/bin/python bench/hardness.py                 # every benchmark below
    .venv/bin/python bench/hardness.py --only teacher digits_small

For each benchmark (a ``data=`` config from conf/data/ plus overrides) the raw inputs,
flattened, are scored on the training split with ``lt.layer_separability`` (degree,
cross-fitted with ``holdout=0.5``): the mean over class pairs (the paper's score), the
worst pair, and the one-vs-rest mean. The linear probe is scikit-learn's multinomial
LogisticRegression (C=1, standardised inputs) fitted on the training split and scored
on the test split (clean labels). Training labels are the benchmark's own (noisy where
the benchmark adds noise). See docs/models-training.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from omegaconf import OmegaConf

import lsm_train as lt
from lsm_train.app import conf_dir
from lsm_train.data import load_data

BENCHMARKS: dict[str, tuple[str, dict]] = {
    "digits": ("digits", {}),
    "teacher": ("teacher", {}),
    "teacher_noise0.2": ("teacher", {"label_noise": 0.2}),
    "teacher_width128": ("teacher", {"teacher_width": 128}),
    "digits_noisy": ("digits_noisy", {}),
    "digits_noisy0.2": ("digits_noisy", {"label_noise": 0.2}),
    "digits_small": ("digits_small", {}),
    "digits_small20": ("digits_small", {"per_class": 20}),
    "mnist5k": ("mnist5k", {}),
}
_NOT_LOADER_KEYS = ("batch_size", "eval_batch_size", "name", "augment", "_target_")


def data_config(group: str, overrides: dict) -> dict:
    """conf/data/<group>.yaml with ``overrides``, minus the trainer-only keys."""
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "data" / f"{group}.yaml"))
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if k not in _NOT_LOADER_KEYS}


def linear_probe_accuracy(x_tr, y_tr, x_te, y_te) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    return float(probe.fit(x_tr, y_tr).score(x_te, y_te))


def hardness_row(name: str, group: str, overrides: dict) -> dict:
    bundle = load_data(group, **data_config(group, overrides))
    x_tr = bundle.train.x.flatten(1).float()
    y_tr = bundle.train.y
    x_te, y_te = bundle.test.x.flatten(1).float(), bundle.test.y
    pairwise, details = lt.layer_separability(x_tr, y_tr, holdout=0.5, return_details=True)
    ovr = lt.layer_separability(x_tr, y_tr, scheme="ovr", holdout=0.5)
    counts = torch.bincount(y_te, minlength=bundle.num_classes)
    return {
        "benchmark": name,
        "data": f"data={group} " + " ".join(f"data.{k}={v}" for k, v in overrides.items()),
        "n_train": len(bundle.train), "n_test": len(bundle.test), "dim": x_tr.shape[1],
        "pairwise": float(pairwise), "worst_pair": float(min(details["pairs"].values())),
        "ovr": float(ovr),
        "probe": linear_probe_accuracy(x_tr.numpy(), y_tr.numpy(), x_te.numpy(), y_te.numpy()),
        "majority": float(counts.max()) / float(counts.sum()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print("| benchmark | config | n train / test | d | input MD-LSM pairwise mean | worst pair "
          "| ovr mean | linear probe test acc | majority class |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.only:
        r = hardness_row(name, *BENCHMARKS[name])
        print(f"| {r['benchmark']} | `{r['data'].strip()}` | {r['n_train']} / {r['n_test']} | "
              f"{r['dim']} | {r['pairwise']:.3f} | {r['worst_pair']:.3f} | {r['ovr']:.3f} | "
              f"{r['probe']:.3f} | {r['majority']:.3f} |", flush=True)
    print(f"\nMD-LSM: lt.layer_separability(x_train, y_train, holdout=0.5) on the flattened "
          f"inputs; probe: StandardScaler + LogisticRegression(C=1) fitted on train, scored on "
          f"test.\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, numpy {np.__version__}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
