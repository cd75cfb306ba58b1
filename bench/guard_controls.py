"""SeparabilityGuard against its controls on digits, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/guard_controls.py [--epochs 8] [--seeds 3]

For an MLP and a small transformer (AdamW, batch 64), each seed trains: plain AdamW, the
guard's default rule (paired jackknife test, z=2), the old fixed margin (``z=0,
tolerance=0``), the loss control (``measure="loss"``) and the random control
(``measure="random"`` at the acceptance rate the default reached with that seed). Prints
test accuracy mean ± std over the seeds, the acceptance rate and the wall time relative to
plain (measured in the same process, one thread). Data: sklearn ``load_digits`` (on disk,
no download), 1200 train / 597 test, pixels / 16; the guard probe is the first 256
training samples.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from lsm_train.guard import SeparabilityGuard

VARIANTS = ("plain", "default (z=2)", "tolerance=0 (z=0)", "measure=loss", "measure=random")


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y, dtype=torch.long)[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


class MLP(nn.Module):
    hidden_layers = ["act1", "act2"]

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(64, 128), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(128, 128), nn.ReLU()
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


class TinyTransformer(nn.Module):
    """The 8 image rows as 8 tokens of 8 pixels; 2 encoder layers; mean pooling."""

    hidden_layers = ["encoder.layers.0", "encoder.layers.1"]

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(x.reshape(-1, 8, 8)) + self.pos)
        return self.out(h.mean(1))


MODELS = {"mlp": (MLP, 1e-3), "transformer": (TinyTransformer, 2e-3)}


def guard_kwargs(variant: str, rate: float | None) -> dict | None:
    return {
        "plain": None,
        "default (z=2)": {},
        "tolerance=0 (z=0)": {"z": 0.0, "tolerance": 0.0},
        "measure=loss": {"measure": "loss"},
        "measure=random": {"measure": "random", "accept_rate": rate},
    }[variant]


def run(model_name: str, variant: str, seed: int, epochs: int, data, rate: float | None):
    xtr, ytr, xte, yte = data
    factory, lr = MODELS[model_name]
    torch.manual_seed(seed)
    model = factory()
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    kw = guard_kwargs(variant, rate)
    if kw is not None:
        opt = SeparabilityGuard(opt, model, (xtr[:256], ytr[:256]), seed=seed, **kw)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=order)
        for i in range(0, len(perm) - 63, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    stats = getattr(opt, "stats", None)
    accept = stats["accepted"] / stats["checks"] if stats else 1.0
    return acc, accept, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", default="mlp,transformer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # low-acceptance warnings: in the table
    data = digits()
    print(f"digits 1200/597, AdamW, batch 64, {args.epochs} epochs, {args.seeds} seeds, "
          f"torch {torch.__version__}, 1 thread")
    print("| model | variant | test acc (mean ± std) | accept rate | time / plain |")
    print("|---|---|---|---|---|")
    for model_name in args.models.split(","):
        results = {v: [] for v in VARIANTS}
        for seed in range(args.seeds):
            rate = None
            for variant in VARIANTS:
                results[variant].append(run(model_name, variant, seed, args.epochs, data, rate))
                if variant == "default (z=2)":
                    rate = results[variant][-1][1]
        plain_time = [r[2] for r in results["plain"]]
        for variant in VARIANTS:
            accs = [r[0] for r in results[variant]]
            rates = [r[1] for r in results[variant]]
            ratio = statistics.mean(r[2] / t for r, t in zip(results[variant], plain_time,
                                                             strict=True))
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {model_name} | {variant} | {statistics.mean(accs):.3f} ± {std:.3f} | "
                  f"{statistics.mean(rates):.3f} | {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
