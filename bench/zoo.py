"""Parameters and forward+backward time of every model family (default: 3x32x32, batch 128),
or, with ``--train``, test accuracy of every family's digits recipe over several seeds.

    .venv/bin/python bench/zoo.py                     # CPU-sized defaults
    .venv/bin/python bench/zoo.py --gpu-scale         # also the GPU-scale variants
    .venv/bin/python bench/zoo.py --device cuda --gpu-scale
    .venv/bin/python bench/zoo.py --train --seeds 0 1 2 [--lsm off] [--set key=value ...]

``--train`` runs ``recipe=zoo/digits model=<family>`` for each of ``--families`` (or each of
the ``--recipes`` given, as they are) in-process for each seed (``lsm=off``, ``logger=none``,
no plots or checkpoints unless overridden) and prints mean +- std of the final test accuracy
(``val/acc``) and the wall time per run (see docs/models-training.md).

One timed step = zero_grad, forward, cross-entropy, backward (no optimizer step), in train
mode; the table shows the median over ``--repeats`` steps after ``--warmup`` steps. The
GPU-scale options mirror conf/tuning/zoo/cifar10/<family>.yaml.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lsm_train.models import FAMILIES, create_model

GPU_SCALE: dict[str, tuple[str, dict]] = {
    "mlp": ("mlp", dict(width=1024, depth=3)),
    "cnn": ("cnn", dict(channels=[64, 128, 256], fc_width=256)),
    "dbn": ("dbn", dict(sizes=[1024, 512], visible="gaussian")),
    "resnet": ("resnet18", {}),
    "vgg": ("vgg11", {}),
    "alexnet": ("alexnet", dict(width=64, fc_width=1024, batchnorm=True)),
    "vit": ("vit", dict(grid=8, dim=256, depth=6, heads=8)),
    "googlenet": ("googlenet", dict(width=1.0, depth=9)),
}


def time_step(model, x, y, warmup: int, repeats: int) -> float:
    """Median seconds of one forward+backward step."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_recipes(runs: list[list[str]], seeds: list[int], lsm: str, extra: list[str]) -> None:
    """Run each override list (``recipe=...`` first) once per seed; print a Markdown table
    of the final test accuracy."""
    import contextlib
    import io
    import tempfile

    from lsm_train.app import compose, train_from_config

    print("| recipe | test acc (mean +- std) | per seed | wall s / run |")
    print("|---|---:|---|---:|")
    for run in runs:
        recipe = run[0].removeprefix("recipe=")
        label = " ".join([recipe, *run[1:]])
        accs, walls = [], []
        for seed in seeds:
            cfg = compose([*run, f"lsm={lsm}", "logger=none", f"seed={seed}",
                           "trainer.progress=false", "trainer.plots=false",
                           "trainer.checkpoint=false", *extra])
            with tempfile.TemporaryDirectory() as run_dir, \
                    contextlib.redirect_stderr(io.StringIO()):
                t0 = time.perf_counter()
                result = train_from_config(cfg, run_dir, recipe=recipe)
                walls.append(time.perf_counter() - t0)
            accs.append(float(result.final["val/acc"]))
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = " / ".join(f"{a:.3f}" for a in accs)
        print(f"| `{label}` lsm={lsm} | {mean:.3f} +- {std:.3f} | {per_seed} | "
              f"{statistics.mean(walls):.1f} |", flush=True)
    print(f"\nmachine: {machine(torch.device('cpu'))}; overrides: {' '.join(extra) or 'none'}")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread(s), load average {load:.1f}, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-scale", action="store_true", help="also time the GPU-scale variants")
    ap.add_argument("--only-gpu-scale", action="store_true", help="time only those")
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train", action="store_true",
                    help="train each family's digits recipe instead of timing steps")
    ap.add_argument("--recipes", nargs="*", default=None,
                    help="recipes for --train (default: zoo/digits model=<family> for each of "
                         "--families)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--lsm", default="off", help="lsm= group for --train (default off)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Hydra overrides for --train, e.g. --set trainer.epochs=20")
    args = ap.parse_args(argv)
    if args.train:
        runs = ([[f"recipe={r}"] for r in args.recipes] if args.recipes else
                [["recipe=zoo/digits", f"model={fam}"] for fam in args.families])
        train_recipes(runs, args.seeds, args.lsm, args.set)
        return
    if args.set:
        ap.error("--set is only used with --train")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)

    rows = []
    for fam in args.families:
        configs = [] if args.only_gpu_scale else [("default", fam, {})]
        if args.gpu_scale or args.only_gpu_scale:
            configs.append(("gpu-scale", *GPU_SCALE[fam]))
        for scale, name, kw in configs:
            model = create_model(name, num_classes=args.num_classes, in_channels=args.channels,
                                 image_size=args.image_size, **kw).to(device).train()
            params = sum(p.numel() for p in model.parameters())
            sec = time_step(model, x, y, args.warmup, args.repeats)
            opts = ", ".join(f"{k}={v}" for k, v in kw.items()) or "defaults"
            rows.append((fam, scale, name, opts, params, sec))
            print(f"  {fam:<9} {scale:<9} {params:>11,d}  {1e3 * sec:9.1f} ms", flush=True)
            del model

    print(f"\n{args.channels}x{args.image_size}x{args.image_size}, batch {args.batch}, "
          f"forward+backward, median of {args.repeats} (after {args.warmup} warm-up)")
    print(f"machine: {machine(device)}\n")
    print("| family | scale | model (options) | parameters | fwd+bwd ms / batch | images / s |")
    print("|---|---|---|---:|---:|---:|")
    for fam, scale, name, opts, params, sec in rows:
        print(f"| {fam} | {scale} | `{name}` ({opts}) | {params:,d} | {1e3 * sec:,.1f} | "
              f"{args.batch / sec:,.0f} |")


if __name__ == "__main__":
    main()
