"""Latency and dispatched operators of soft_md_lsm (forward + backward) on training batches.

    .venv/bin/python bench/soft_latency.py [--device cuda] [--threads 1] [--compile]

Paths, side by side for each (n, d), 10 classes, float32:

  fused        the CPU default (num_classes=None): one fused autograd node, host reads
  static       num_classes=10, validate=False: sync-free recorded ops, eager
  compiled     the static path under torch.compile(fullgraph=True, dynamic=False)
               (``--compile``; inductor, or ``--backend``)
  graph        the static path's forward+backward replayed from a captured CUDA graph
               (CUDA only)

Medians of ``--repeats`` calls after warm-up, ``torch.cuda.synchronize()`` around each
timed call on CUDA. ``ops``: aten operators dispatched by one forward+backward (profiler,
top-level calls; kernels that inductor generates are called directly, not counted).
At n = 128 the cost is per-op overhead, not arithmetic: on a GPU, kernel launches and host
synchronisations.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

from lsm_train.measures.soft import soft_md_lsm


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


def dispatched_ops(fn) -> int:
    """aten operators called from Python or autograd (not their internal sub-calls)."""
    with profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
        e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def graph_step(H: torch.Tensor, y: torch.Tensor):
    """The static forward+backward captured in a CUDA graph; returns its replay."""
    static = lambda: torch.autograd.grad(  # noqa: E731
        soft_md_lsm(H, y, num_classes=10, validate=False), H)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            static()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static()
    return graph.replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--compile", action="store_true", help="add the compiled static path")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--sizes", default="128x256,128x512,128x2048,512x512,512x2048",
                    help="comma-separated n x d")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    paths = ["fused", "static"] + (["compiled"] if args.compile else []) + (
        ["graph"] if device.type == "cuda" else [])
    print(f"{'n':>5s} {'d':>6s} " + " ".join(f"{p + ' ms':>12s} {'ops':>5s}" for p in paths))
    g = torch.Generator().manual_seed(0)
    compiled = torch.compile(
        lambda H, y: soft_md_lsm(H, y, num_classes=10, validate=False),
        fullgraph=True, dynamic=False, backend=args.backend) if args.compile else None
    for size in args.sizes.split(","):
        n, d = (int(v) for v in size.split("x"))
        y = (torch.arange(n) % 10).to(device)
        H = torch.randn(n, d, generator=g).to(device).requires_grad_(True)
        fns = {
            "fused": lambda H=H, y=y: torch.autograd.grad(soft_md_lsm(H, y), H),
            "static": lambda H=H, y=y: torch.autograd.grad(
                soft_md_lsm(H, y, num_classes=10, validate=False), H),
        }
        if compiled is not None:
            fns["compiled"] = lambda H=H, y=y: torch.autograd.grad(compiled(H, y), H)
        if device.type == "cuda":
            fns["graph"] = graph_step(H, y)
        cells = []
        for p in paths:
            ms = median_ms(fns[p], device, args.repeats)
            ops = dispatched_ops(fns[p]) if p != "graph" else 0
            cells.append(f"{ms:12.3f} {ops:5d}")
        print(f"{n:5d} {d:6d} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
