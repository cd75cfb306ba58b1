"""Per-step cost of LSMLoss and SeparabilityGuard next to a plain training step.

    .venv/bin/python bench/step_overhead.py [--reps 5] [--steps 20] [--threads N] [--quick]
    .venv/bin/python bench/step_overhead.py --device cuda [--compile]
    .venv/bin/python bench/step_overhead.py --models convnet --variants "+LSMLoss;+LSMLoss(K)"

Three models: a small conv net (3 conv blocks with BatchNorm, 3x32x32 inputs) and two MLPs
with hidden layers 512 -> 256: one on the same 3x32x32 batches flattened (3072 inputs) and
one on 784 inputs (MNIST-sized), batches of 128, SGD with momentum (``--optim adamw`` for a
larger state). On CUDA every timed block ends with ``torch.cuda.synchronize()``.

Variants, run interleaved (each repetition runs every variant for ``--steps`` steps,
in a rotated order, so drifts of a shared machine hit all of them alike):

  plain                 forward + cross-entropy + backward + step
  +LSMLoss              plus reg(y) on the hidden layers (weight 0.1), the reference path
  +LSMLoss(crossfit)    the same, crossfit=True
  +LSMLoss(K)           LSMLoss(num_classes=10): the static path, all layers in one call
  +LSMLoss(K,crossfit)  the static path, crossfit=True
  compiled ...          with ``--compile``: plain and the static variants with forward and
                        loss under torch.compile(fullgraph=True, dynamic=False) (hooks
                        registered before compiling); ratios to "compiled plain"
  +Guard(every=1)       SeparabilityGuard, a probe as large as the batch, check every step
  +Guard(every=1,exact) the same with track_buffers=True (the cached score is keyed on the
                        BatchNorm statistics too: two probe forwards per check on the conv net)
  +Guard(every=10)      check every 10th step (scope="step": two probe forwards per check)
  +Guard(every=10,window) scope="window": each check judges the last 10 steps together
                        (one probe forward and one snapshot per 10 steps)

Reported: ms per step of the fastest repetition (on a shared machine the minimum is the
least disturbed estimate) and the median, the ratio of the minima to plain, the aten
operators one step dispatches (profiler, top-level calls), the targets (LSMLoss in-sample
<= 1.15x, crossfit <= 1.5x, compiled <= 1.3x; Guard <= 1.5x every step, <= 1.1x every 10
steps), a breakdown of one
check, and the snapshot memory against parameter + optimizer-state bytes. Data are random
tensors (the cost does not depend on them); the guard's tolerance is 1 so every step is kept
(rejections cost the same plus a restore copy).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import profile

from lsm_train.guard import SeparabilityGuard


class ConvNet(nn.Module):
    hidden_layers = ["block1", "block2", "block3"]

    def __init__(self, k: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: nn.Module) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True), pool,
            )

        self.block1 = block(3, 32, nn.MaxPool2d(2))
        self.block2 = block(32, 64, nn.MaxPool2d(2))
        self.block3 = block(64, 128, nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(128, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block3(self.block2(self.block1(x))).flatten(1))


class MLP(nn.Module):
    hidden_layers = ["act1", "act2"]

    def __init__(self, d: int = 784, k: int = 10) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(d, 512), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(512, 256), nn.ReLU()
        self.out = nn.Linear(256, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


class Runner:
    """One model + optimizer (+ loss / guard) that runs timed training steps."""

    def __init__(self, variant: str, model_fn, shape, optim: str, batch: int,
                 device: str = "cpu", backend: str = "inductor") -> None:
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = model_fn().to(self.device)
        self.opt = make_optimizer(optim, self.model)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, *shape, generator=g).to(self.device)
        self.y = (torch.arange(batch) % 10).to(self.device)
        self.reg = None
        if "+LSMLoss" in variant:
            from lsm_train.loss import LSMLoss

            self.reg = LSMLoss(self.model, weight=0.1, crossfit="crossfit" in variant,
                               num_classes=10 if "(K" in variant else None)
        self.forward = self._forward
        if variant.startswith("compiled"):
            self.forward = torch.compile(self._forward, fullgraph=self.reg is not None,
                                         dynamic=False, backend=backend)
        if variant.startswith("+Guard"):
            probe = (torch.randn(batch, *shape, generator=g).to(self.device),
                     (torch.arange(batch) % 10).to(self.device))
            every = 10 if "every=10" in variant else 1
            self.opt = SeparabilityGuard(
                self.opt, self.model, probe, check_every=every, tolerance=1.0,
                track_buffers="exact" in variant,
                scope="window" if "window" in variant else "step",
            )

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model(x), y)
        if self.reg is not None:
            loss = loss + self.reg(y)
        return loss

    def step(self) -> None:
        self.opt.zero_grad()
        self.forward(self.x, self.y).backward()
        self.opt.step()

    def ops(self) -> int:
        """aten operators dispatched by one step (top-level calls, profiler)."""
        with profile() as prof:
            self.step()
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and (
            e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

    def timed(self, steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return (time.perf_counter() - t0) / steps * 1e3


def sync() -> None:
    """Wait for queued CUDA work, so wall-clock times cover it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_breakdown(runner: Runner, reps: int = 5) -> dict[str, float]:
    """ms of a probe forward alone, of a full score (forward + capture + measure), and of
    the snapshot copy, on a guard runner."""
    guard: SeparabilityGuard = runner.opt
    model, x = runner.model, guard.scorer.probe.inputs

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return min(times)

    def forward() -> None:
        training = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(training)

    return {
        "probe forward": best(forward),
        "score (forward+measure)": best(guard.score),
        "snapshot copy": best(lambda: guard.snapshot.take(guard._params(), guard.optimizer)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--optim", choices=["sgd", "adamw"], default="sgd")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="convnet,mlp3072,mlp784",
                    help="comma-separated subset of convnet, mlp3072, mlp784")
    ap.add_argument("--quick", action="store_true", help="reps=2, steps=10 (smoke run)")
    ap.add_argument("--variants", default=None,
                    help="';'-separated subset of the variants (default: all)")
    ap.add_argument("--compile", action="store_true", help="add the compiled variants")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.steps = 2, 10
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"(python {platform.python_version()}, {platform.system()})")
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}")
    print(f"batch {args.batch}, optimizer {args.optim}, {args.reps} interleaved reps x "
          f"{args.steps} steps per variant\n")

    variants = ["plain", "+LSMLoss", "+LSMLoss(crossfit)", "+LSMLoss(K)",
                "+LSMLoss(K,crossfit)", "+Guard(every=1)", "+Guard(every=1,exact)",
                "+Guard(every=10)", "+Guard(every=10,window)"]
    if args.compile:
        variants += ["compiled plain", "compiled +LSMLoss(K)", "compiled +LSMLoss(K,crossfit)"]
    if args.variants:
        chosen = args.variants.split(";")
        unknown = set(chosen) - set(variants)
        if unknown:
            ap.error(f"--variants: unknown {sorted(unknown)}; expected a subset of {variants}")
        variants = [v for v in variants if v in chosen or v in ("plain", "compiled plain")]
    targets = {"+LSMLoss": 1.15, "+LSMLoss(K)": 1.15, "+LSMLoss(crossfit)": 1.5,
               "+LSMLoss(K,crossfit)": 1.5, "compiled +LSMLoss(K)": 1.3,
               "compiled +LSMLoss(K,crossfit)": 1.3, "+Guard(every=1)": 1.5,
               "+Guard(every=1,exact)": 1.5, "+Guard(every=10)": 1.1,
               "+Guard(every=10,window)": 1.1}
    all_models = {
        "convnet": ("convnet 3x32x32", ConvNet, (3, 32, 32)),
        "mlp3072": ("mlp 3x32x32 (3072-512-256-10)", lambda: MLP(3072), (3072,)),
        "mlp784": ("mlp 784 (784-512-256-10)", MLP, (784,)),
    }
    unknown = set(args.models.split(",")) - set(all_models)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; expected a subset of {list(all_models)}")
    for key in args.models.split(","):
        title, model_fn, shape = all_models[key]
        runners = {}
        for v in variants:
            try:
                runners[v] = Runner(v, model_fn, shape, args.optim, args.batch, args.device,
                                    args.backend)
            except ImportError as err:
                print(f"  {v}: skipped ({err})")
        for r in runners.values():  # warm-up (allocations, snapshot buffers, caches)
            r.timed(2)
        times: dict[str, list[float]] = {v: [] for v in runners}
        names = list(runners)
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for v in order:
                times[v].append(runners[v].timed(args.steps))
        print(f"== {title}")
        print(f"  {'variant':30s} {'min ms':>9s} {'ratio':>7s} {'median ms':>10s} {'ratio':>7s}"
              f" {'ops':>6s} {'target':>7s}")
        for v in names:
            base = "compiled plain" if v.startswith("compiled") else "plain"
            plain, plain_med = min(times[base]), statistics.median(times[base])
            ms, med = min(times[v]), statistics.median(times[v])
            t = targets.get(v)
            verdict = "" if t is None else ("ok" if ms / plain <= t else "MISSED")
            tgt = "" if t is None else f"<={t:.2f}"
            print(f"  {v:30s} {ms:9.2f} {ms / plain:6.2f}x {med:10.2f} {med / plain_med:6.2f}x"
                  f" {runners[v].ops():6d} {tgt:>7s} {verdict}", flush=True)

        guard_runner = runners.get("+Guard(every=1)")
        if guard_runner is None:
            continue
        guard = guard_runner.opt
        print("  one check, ms (best of 5): " + ", ".join(
            f"{k} {v:.2f}" for k, v in check_breakdown(guard_runner).items()))
        params = list(guard_runner.model.parameters())
        state = [t for s in guard.state.values() for t in s.values() if torch.is_tensor(t)]
        pb, sb = nbytes(params), nbytes(state)
        print(f"  memory: params {pb / 2**20:.2f} MiB + optimizer state {sb / 2**20:.2f} MiB"
              f" = {(pb + sb) / 2**20:.2f} MiB; snapshot {guard.snapshot_bytes / 2**20:.2f} MiB"
              f" (ratio {guard.snapshot_bytes / max(pb + sb, 1):.2f})\n")


    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
