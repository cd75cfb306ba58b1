"""Latency of soft_md_lsm (forward, forward+backward) on small training batches.

    .venv/bin/python bench/soft_latency.py [--device cuda] [--threads 1]

At n = 128 the cost is per-op and per-call overhead, not arithmetic; on a GPU, kernel
launches and host synchronisations. Medians of ``--repeats`` calls after warm-up, with
``torch.cuda.synchronize()`` around each timed call on CUDA. 10 classes, float32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lsm_train.surrogate import soft_md_lsm


def median_ms(fn, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'n':>5s} {'d':>6s} {'forward ms':>11s} {'fwd+bwd ms':>11s} {'no_grad ms':>11s}")
    g = torch.Generator().manual_seed(0)
    for n, d in ((128, 256), (128, 512), (128, 2048), (512, 512)):
        y = (torch.arange(n) % 10).to(device)
        H = torch.randn(n, d, generator=g).to(device).requires_grad_(True)

        def fwd(H=H, y=y) -> None:
            soft_md_lsm(H, y)

        def fwd_bwd(H=H, y=y) -> None:
            soft_md_lsm(H, y).backward()

        def no_grad(H=H, y=y) -> None:
            with torch.no_grad():
                soft_md_lsm(H, y)

        f, fb, ng = (median_ms(fn, device, args.repeats) for fn in (fwd, fwd_bwd, no_grad))
        print(f"{n:5d} {d:6d} {f:11.3f} {fb:11.3f} {ng:11.3f}")


if __name__ == "__main__":
    main()
