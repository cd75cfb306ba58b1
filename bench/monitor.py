"""The fast monitoring score against today's degree, side by side in one run.

    .venv/bin/python bench/monitor.py            # timing table (issue sizes) and zoo gap
    .venv/bin/python bench/monitor.py --quick    # n <= 1,024, d <= 512, two zoo families
    .venv/bin/python bench/monitor.py --only gap # just the gap table
    .venv/bin/python bench/monitor.py --only time --n 1024 --d 512
    .venv/bin/python bench/monitor.py --only time --clock cpu   # on a machine shared with others
    .venv/bin/python bench/monitor.py --only gap --families vgg
    .venv/bin/python bench/monitor.py --only zoo     # one monitor evaluation per zoo family

(a) Per-layer cost of ``layer_separability(H, y, method="fisher")`` and of
    ``method="degree"`` (pairwise, 10 classes) at n = 512, 1,024, 4,096 and d = 64, 512,
    2,048, in-sample and cross-fitted (``holdout=0.5``), on Gaussian classes whose means
    differ along a few directions. "monitor" is the same fast score as the trainer computes
    it (the label layout built once per probe, reused). Medians of ``--repeats`` runs for the
    fast score, one run (after a warm-up at a small size) for the degree; the ratio is
    degree / fisher (the layer_separability call).
(b) Gap ``degree − fisher`` on the hidden layers of every zoo family (untrained, seed 0,
    and after 1 epoch of AdamW) on the first 512 training samples of digits, in-sample and
    cross-fitted: mean and worst over layers, and the largest value of ``fisher − degree``
    (the fast score is a lower bound of the in-sample degree; any positive value is shown).
(c) One monitor evaluation of the trainer (``evaluation.LayerMonitor``: probe and test
    forward, every hidden layer of the family scored on both sets, cross-fitted) on each
    untrained zoo family, with a 512-sample probe and the digits test set: the number of
    layers and their widths, the whole evaluation with the fast score, its forward passes
    alone, and the scoring of both sets alone with the fast score (medians of
    ``--repeats``) and with the degree (one run); ratio = degree / fast scoring.

Timings are wall-clock (``--clock wall``) on whatever else the machine runs: compare the
columns of one run. ``--clock cpu`` times the CPU time of this process instead
(``time.process_time``; one torch thread), which other jobs on the machine inflate far less
than the wall clock; it is meaningless on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import lsm_train as lt
from lsm_train.data import load_data
from lsm_train.evaluation import LayerMonitor
from lsm_train.measures.fisher import FisherLayout
from lsm_train.models import create_model
from lsm_train.monitor import capture, score_layers, score_sets


def machine() -> str:
    model, cores = "unknown CPU", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            model, cores = names[0], len(names)
    except OSError:
        pass
    return (f"{model}, {cores} logical cores; Python {platform.python_version()}, torch "
            f"{torch.__version__}, torch threads {torch.get_num_threads()}")


def classes(n: int, d: int, k: int = 10, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centers = torch.randn(k, min(d, 8), generator=g) * 0.6
    H = torch.randn(n, d, generator=g)
    H[:, : centers.shape[1]] += centers[y]
    return H.to(device), y.to(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times)


def timing_table(ns, ds, repeats: int, device: str, clock=time.perf_counter) -> None:
    H, y = classes(256, 32, device=device)
    for method in ("fisher", "degree"):  # warm-up (first calls load kernels)
        lt.layer_separability(H, y, method=method, holdout=0.5)
    print("\n(a) per-layer cost, pairwise, 10 classes (ms). fisher: one layer_separability"
          " call;\n    monitor: the same score with the label layout reused (as in the"
          " trainer); ratio = degree / fisher")
    head = f"{'fisher':>8} {'monitor':>8} {'degree':>9} {'ratio':>7}"
    print(f"{'n':>6} {'d':>6} | {'in-sample':^35} | {'cross-fitted (holdout=0.5)':^35}")
    print(f"{'':>6} {'':>6} | {head} | {head}")
    for n in ns:
        for d in ds:
            H, y = classes(n, d, device=device)
            row = []
            for holdout in (None, 0.5):
                layout = FisherLayout(y, "pairwise", holdout, 0, device=H.device)
                fast = seconds(lambda H=H, y=y, h=holdout: lt.layer_separability(
                    H, y, method="fisher", holdout=h), repeats, clock)
                mon = seconds(lambda H=H, lay=layout: score_sets([({"h": H}, lay)]), repeats,
                              clock)
                full = seconds(lambda H=H, y=y, h=holdout: lt.layer_separability(
                    H, y, method="degree", holdout=h), 1, clock)
                row.append(f"{fast * 1e3:8.1f} {mon * 1e3:8.1f} {full * 1e3:9.1f} "
                           f"{full / fast:6.1f}x")
            print(f"{n:>6} {d:>6} | {row[0]} | {row[1]}", flush=True)


def _features(name: str, bundle, n: int, epochs: int):
    torch.manual_seed(0)
    model = create_model(name, num_classes=bundle.num_classes,
                         in_channels=bundle.in_channels, image_size=bundle.image_size)
    x, y = bundle.train.batch(torch.arange(len(bundle.train)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for s in range(0, x.shape[0] - 63, 64):
            opt.zero_grad()
            F.cross_entropy(model(x[s:s + 64]), y[s:s + 64]).backward()
            opt.step()
    model.eval()
    feats, _ = capture(model, x[:n], y[:n], list(model.hidden_layers))
    return feats, y[:n]


def gap_table(families, n: int) -> None:
    bundle = load_data("digits")
    print(f"\n(b) gap degree − fisher on zoo layers, digits, first {n} training samples")
    print(f"{'family':>10} {'epochs':>6} {'layers':>6} | {'in-sample':^26} | "
          f"{'cross-fitted (holdout=0.5)':^26}")
    print(f"{'':>10} {'':>6} {'':>6} | {'mean':>8} {'worst':>8} {'max f−d':>8} | "
          f"{'mean':>8} {'worst':>8} {'max f−d':>8}")
    every = {None: [], 0.5: []}
    for name in families:
        for epochs in (0, 1):
            feats, y = _features(name, bundle, n, epochs)
            row = []
            for holdout in (None, 0.5):
                gaps = np.array([
                    lt.layer_separability(H, y, method="degree", holdout=holdout)
                    - lt.layer_separability(H, y, method="fisher", holdout=holdout)
                    for H in feats.values()
                ])
                every[holdout].extend(gaps.tolist())
                row.append(f"{gaps.mean():8.4f} {gaps.max():8.4f} {-gaps.min():8.4f}")
            print(f"{name:>10} {epochs:>6} {len(feats):>6} | {row[0]} | {row[1]}", flush=True)
    for holdout, gaps in every.items():
        g = np.array(gaps)
        print(f"all layers, holdout={holdout}: {g.size} layers, mean gap {g.mean():.4f}, "
              f"worst {g.max():.4f}, largest fisher − degree {-g.min():.4f}")


def zoo_evaluation_table(families, n: int, repeats: int, clock=time.perf_counter) -> None:
    bundle = load_data("digits")
    probe = bundle.train.batch(torch.arange(n))
    test = bundle.test.batch(torch.arange(min(n, len(bundle.test))))
    print(f"\n(c) one monitor evaluation (probe {n} + test {test[1].numel()}, cross-fitted,"
          " untrained, digits, ms):\n    the whole evaluation with the fast score, its"
          " forward passes alone, and the scoring\n    of both sets' layers alone, fast and"
          " degree; ratio = degree / fast scoring")
    print(f"{'family':>10} {'layers':>6} {'widths':>10} {'evaluation':>10} {'forward':>8} "
          f"{'fisher':>8} {'degree':>9} {'ratio':>7}")
    for name in families:
        torch.manual_seed(0)
        model = create_model(name, num_classes=bundle.num_classes,
                             in_channels=bundle.in_channels, image_size=bundle.image_size)
        layers = list(model.hidden_layers)
        sets = [(capture(model, *probe, layers)[0], probe[1]),
                (capture(model, *test, layers)[0], test[1])]
        widths = sorted({H.shape[1] for H in sets[0][0].values()})
        span = f"{widths[0]}–{widths[-1]}" if len(widths) > 1 else str(widths[0])
        monitor = LayerMonitor(layers, probe, bundle.test, n, method="fisher")
        monitor(model)  # builds the label layouts, as the first evaluation of a run does
        evaluation = seconds(lambda mon=monitor, m=model: mon(m), repeats, clock)
        forward = seconds(lambda m=model, ls=layers: (capture(m, *probe, ls),
                                                       capture(m, bundle.test, None, ls,
                                                               keep=n)), repeats, clock)
        layouts = [(f, FisherLayout(y, "pairwise", 0.5, 0)) for f, y in sets]
        fast = seconds(lambda ls=layouts: score_sets(ls), repeats, clock)
        full = seconds(lambda ss=sets: [score_layers(f, y, method="degree") for f, y in ss], 1,
                       clock)
        print(f"{name:>10} {len(layers):>6} {span:>10} {evaluation * 1e3:10.1f} "
              f"{forward * 1e3:8.1f} {fast * 1e3:8.1f} {full * 1e3:9.1f} "
              f"{full / fast:6.1f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("time", "gap", "zoo"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, nargs="*", help="sample sizes (default: the issue's)")
    p.add_argument("--d", type=int, nargs="*", help="widths (default: the issue's)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    p.add_argument("--families", nargs="*",
                   help="zoo families of the gap and zoo tables (default: all)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), f"; clock: {args.clock}")
    fams = ("mlp", "cnn") if args.quick else (
        "mlp", "cnn", "dbn", "resnet", "vgg", "alexnet", "vit", "googlenet")
    if args.only in (None, "time"):
        ns, ds = ((512, 1024), (64, 512)) if args.quick else ((512, 1024, 4096), (64, 512, 2048))
        timing_table(args.n or ns, args.d or ds, args.repeats, args.device, CLOCKS[args.clock])
    if args.only in (None, "gap"):
        gap_table(args.families or fams, 512)
    if args.only in (None, "zoo"):
        zoo_evaluation_table(args.families or fams, 512, args.repeats, CLOCKS[args.clock])


if __name__ == "__main__":
    main()
