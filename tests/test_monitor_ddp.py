"""The monitor's budget under DDP (two gloo processes on the CPU): with
``trainer.monitor_every_n_steps=null`` every rank evaluates on the same steps (the ranks
vote at log steps), no rank hangs, and rank 0 logs ``time/monitor_fraction``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import WORLD, Tiny, _ddp_cfg, _init

from lsm_train import distributed as D
from lsm_train.tracking import read_metrics
from lsm_train.trainer import Trainer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

BUDGET = ("trainer.monitor_every_n_steps=null", "lsm.monitor.budget=1.0")


def _budget_run(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)  # gloo, 60 s timeout: a rank left waiting fails instead of hanging
    try:
        trainer = Trainer(_ddp_cfg(*BUDGET), Path(out_dir) / "run",
                          model_factory=lambda b: Tiny())
        steps: list[int] = []
        monitor = trainer.monitor

        def recording_monitor():
            steps.append(trainer.step)
            return monitor()

        trainer.monitor = recording_monitor
        res = trainer.fit()
        out = {"status": res.status, "step": res.step, "steps": steps,
               "evaluations": trainer.schedule.evaluations,
               "uses_budget": trainer.schedule.uses_budget}
        torch.save(out, os.path.join(out_dir, f"budget{rank}.pt"))
    finally:
        D.destroy()


def test_budget_under_ddp_evaluates_on_the_same_steps_on_every_rank(tmp_path):
    mp.spawn(_budget_run, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"budget{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["uses_budget"] and r0["status"] == r1["status"] == "completed"
    assert r0["step"] == r1["step"] == 8  # 4 steps per epoch, 2 epochs
    assert r0["steps"] == r1["steps"] and r0["evaluations"] == r1["evaluations"]
    assert r0["steps"][0] == 0 and r0["steps"][-1] == 8  # untrained and final network
    assert r0["evaluations"] == len(r0["steps"])
    records = read_metrics(tmp_path / "run")  # rank 0 alone writes the run
    assert [r["step"] for r in records if "lsm/mean" in r] == r0["steps"]
    last = records[-1]
    assert last["time/monitor_evaluations"] == r0["evaluations"]
    assert math.isfinite(last["time/monitor_fraction"]) and last["time/monitor_fraction"] > 0
    assert last["time/monitor_fraction"] == pytest.approx(
        last["time/monitor_s"] / last["time/train_s"])
