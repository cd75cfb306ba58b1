"""SeparabilityGuard under DDP: two gloo processes on the CPU take identical decisions."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from lsm_train.guard import SeparabilityGuard

WORLD = 2
STEPS = 6


class Net(nn.Module):
    hidden_layers = ["act", "res"]

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.bn = nn.BatchNorm1d(12)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.2)
        self.res = nn.Linear(12, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.drop(self.act(self.bn(self.fc1(x))))
        return self.out(h + self.res(h))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(n, 5, generator=g) + 0.7 * y[:, None].float(), y


def _worker(rank: int, init_file: str, out_dir: str, scope: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(model)
        probe = _data(24, seed=1000 + rank)  # a different probe on each rank
        kw = dict(max_retries=1) if scope == "step" else dict(scope="window", check_every=2)
        guard = SeparabilityGuard(torch.optim.Adam(ddp.parameters(), lr=0.05), ddp, probe, **kw)
        torch.manual_seed(10 + rank)  # different dropout masks and batches per rank
        decisions, local_scores = [], []
        for step in range(STEPS):
            x, y = _data(32, seed=100 * rank + step)
            guard.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            guard.step()
            decisions.append(tuple(guard.last_decision))
        local_scores = guard.last_layer_scores
        params = [p.detach().clone() for p in model.parameters()]
        torch.save(
            {"decisions": decisions, "params": params, "stats": guard.stats,
             "scores": local_scores, "probe": probe},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        from lsm_train.distributed import destroy

        destroy()  # barrier first: no rank tears down while a peer's message is in flight


@pytest.mark.parametrize("scope", ["step", "window"])
def test_ddp_ranks_take_identical_decisions(tmp_path, scope):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), scope), nprocs=WORLD,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert r0["decisions"] == r1["decisions"]
    assert r0["stats"] == r1["stats"]
    assert r0["stats"]["accepted"] > 0 and r0["stats"]["rejected"] > 0
    for p, q in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(p, q)
    assert r0["scores"] == r1["scores"]  # all-reduced

    # the probes really disagree: scored locally, the final weights give different values
    model = Net()
    with torch.no_grad():
        for p, q in zip(model.parameters(), r0["params"], strict=True):
            p.copy_(q)
    local = [
        SeparabilityGuard(torch.optim.SGD(model.parameters(), lr=0.1), model, r["probe"]).score()
        for r in (r0, r1)
    ]
    assert local[0] != local[1]
