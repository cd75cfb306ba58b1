"""DDP on the CPU: two gloo processes (torch.multiprocessing) and torchrun end to end.

* helpers: sharding = DistributedSampler, all_gather with unequal sizes and the local
  gradient, the gathered soft MD-LSM = the single-process score on the full batch, the
  LSMLoss(gather=True) gradient after DDP = the single-process gradient on the global batch,
  the parameter checksum check (and its failure when one rank is perturbed);
* Trainer(strategy=ddp): identical guard decisions and parameters on both ranks, equal to a
  single process on the global batch, rank 0 alone logs, monitor = single-process monitor;
* ``torchrun --nproc_per_node=2 -m lsm_train trainer=ddp debug=smoke``.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from lsm_train import distributed as D
from lsm_train.app import compose
from lsm_train.loss import LSMLoss
from lsm_train.measures.soft import soft_md_lsm
from lsm_train.tracking import read_metrics
from lsm_train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


def _init(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


def _batch(n: int, d: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, d, generator=g, dtype=torch.float64) + 0.8 * y[:, None], y


class Tiny(nn.Module):
    hidden_layers = ["act1", "act2"]

    def __init__(self, d_in: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 12)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(12, 8)
        self.act2 = nn.Tanh()
        self.out = nn.Linear(8, classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


# ------------------------------------------------------------------ single process


def test_shards_are_distributed_sampler_shards():
    from torch.utils.data import DistributedSampler

    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    for world in (1, 2, 3, 4):
        seen = []
        for r in range(world):
            ref = DistributedSampler(
                list(range(23)), num_replicas=world, rank=r, shuffle=False, drop_last=True
            )
            ours = D.shard_indices(order, r, world)
            assert ours.tolist() == order[list(ref)].tolist()
            seen += ours.tolist()
        assert len(set(seen)) == len(seen) == (23 // world) * world
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(order, 2, 2)


def test_helpers_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_cat(x) is x
    assert (D.rank(), D.world_size(), D.is_main_process()) == (0, 1, True)
    assert D.check_parameters_in_sync(nn.Linear(2, 2)) == 0.0
    assert D.broadcast_str("abc") == "abc" and D.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    m = nn.Linear(2, 3)
    names, sums = D.parameter_checksums(nn.Sequential(m))
    assert names == ["0.weight", "0.bias"]
    assert sums[0, 1].item() == pytest.approx(float((m.weight.detach().double() ** 2).sum()))


# ------------------------------------------------------------------ two processes


def _helpers(rank: int, out_dir: str) -> None:
    out: dict = {}
    # unequal sizes; gradient to the local slice only
    x = torch.full((3 + 2 * rank, 2), float(rank + 1), requires_grad=True)
    g = D.all_gather_cat(x)
    weights = torch.arange(g.numel(), dtype=g.dtype).reshape(g.shape)
    (g * weights).sum().backward()
    out["gathered"], out["grad"] = g.detach(), x.grad
    out["labels"] = D.all_gather_cat(torch.full((1 + rank,), rank))
    z = (torch.arange(3.0) + 10 * rank).requires_grad_(True)
    zi = D.all_gather_cat(z, interleave=True)  # equal sizes: r0[0], r1[0], r0[1], ...
    (zi * torch.arange(6.0)).sum().backward()
    out["interleaved"], out["interleaved_grad"] = zi.detach(), z.grad
    assert D.broadcast_str("from rank 0" if rank == 0 else "") == "from rank 0"

    # gathered soft MD-LSM = single-process score of the full batch, same gradient
    H, y = _batch(10 + 3 * rank, 5, seed=rank)  # 10 and 13 samples
    H.requires_grad_(True)
    s = soft_md_lsm(D.all_gather_cat(H), D.all_gather_cat(y), 0.5)
    s.backward()
    out["soft"], out["soft_grad"], out["H"], out["y"] = s.detach(), H.grad, H.detach(), y

    # LSMLoss(gather=True) + DDP: the averaged gradient = the single-process gradient
    torch.manual_seed(0)
    model = Tiny(d_in=5, classes=3).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    reg = LSMLoss(model, weight=0.5, gather=True)  # cross-fitted: order matters
    xb, yb = _batch(12, 5, seed=20 + rank)
    loss = F.cross_entropy(ddp(xb), yb) + reg(yb)
    loss.backward()
    out["loss_value"] = float(loss)
    out["reg_last"] = reg.last
    out["ddp_grads"] = [p.grad.clone() for p in model.parameters()]
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}

    # checksums: equal replicas pass; one perturbed rank fails on every rank
    out["spread_ok"] = D.check_parameters_in_sync(ddp)
    if rank == 1:
        with torch.no_grad():
            model.fc2.bias[0] += 1e-3
    try:
        D.check_parameters_in_sync(ddp)
        out["mismatch"] = None
    except D.ParameterMismatchError as err:
        out["mismatch"] = str(err)

    # a Trainer without trainer=ddp refuses to run inside a process group
    cfg = compose(["debug=smoke", "logger=none", "trainer.progress=false"])
    try:
        Trainer(cfg, Path(out_dir) / "refused", model_factory=lambda b: Tiny())
        out["refused"] = "no error"
    except ValueError as err:
        out["refused"] = str(err)
    torch.save(out, os.path.join(out_dir, f"helpers{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of two gloo processes for every test below (process start-up dominates)."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return tmp


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, init_file)
    try:
        _helpers(rank, out_dir)
        _trainers(rank, out_dir)
    finally:
        D.destroy()


def _load(tmp: Path, prefix: str) -> list[dict]:
    return [torch.load(tmp / f"{prefix}{r}.pt", weights_only=False) for r in range(WORLD)]


def test_gather_loss_and_checksum_in_two_gloo_processes(two_ranks):
    r0, r1 = _load(two_ranks, "helpers")
    # all_gather with unequal sizes, in rank order, the same on both ranks
    assert torch.equal(r0["gathered"], r1["gathered"])
    assert r0["gathered"].shape == (8, 2)
    expected = torch.cat([torch.full((3, 2), 1.0), torch.full((5, 2), 2.0)])
    assert torch.equal(r0["gathered"], expected)
    w = torch.arange(16.0).reshape(8, 2)
    assert torch.equal(r0["grad"], w[:3]) and torch.equal(r1["grad"], w[3:])
    assert r0["labels"].tolist() == [0, 1, 1]
    assert r0["interleaved"].tolist() == [0.0, 10.0, 1.0, 11.0, 2.0, 12.0]
    assert r0["interleaved_grad"].tolist() == [0.0, 2.0, 4.0]
    assert r1["interleaved_grad"].tolist() == [1.0, 3.0, 5.0]

    # gathered score == single-process score on the full batch; gradients are its slices
    H = torch.cat([r0["H"], r1["H"]]).requires_grad_(True)
    y = torch.cat([r0["y"], r1["y"]])
    full = soft_md_lsm(H, y, 0.5)
    full.backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["soft"], full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r0["soft_grad"], r1["soft_grad"]]), H.grad)

    # DDP-averaged gradient of CE + gathered LSM loss == one process on the global batch
    model = Tiny(d_in=5, classes=3).double()
    model.load_state_dict(r0["state"])
    reg = LSMLoss(model, weight=0.5)
    # the global batch in the order strided sharding took it from: rows interleaved
    (x0, y0), (x1, y1) = _batch(12, 5, seed=20), _batch(12, 5, seed=21)
    xb = torch.stack([x0, x1], dim=1).reshape(24, 5)
    yb = torch.stack([y0, y1], dim=1).reshape(24)
    F.cross_entropy(model(xb), yb).add(reg(yb)).backward()
    for r in (r0, r1):
        assert r["reg_last"] == pytest.approx(reg.last, abs=1e-12)
        for g_ddp, p in zip(r["ddp_grads"], model.parameters(), strict=True):
            torch.testing.assert_close(g_ddp, p.grad, rtol=1e-9, atol=1e-12)

    # parameter checksums
    assert r0["spread_ok"] == r1["spread_ok"] == 0.0
    for r in (r0, r1):
        assert r["mismatch"] is not None and "fc2.bias" in r["mismatch"]
        assert "differ across the 2 ranks" in r["mismatch"] and "fc1" not in r["mismatch"]
        assert "add trainer=ddp" in r["refused"]


def _ddp_cfg(*extra: str):
    return compose([
        "recipe=quickstart", "trainer=ddp", "logger=none", "trainer.progress=false",
        "trainer.plots=false", "trainer.num_threads=1", "data.limit_train=128",
        "data.limit_test=40", "data.batch_size=16", "trainer.epochs=2",
        "trainer.monitor_every_n_steps=3", "trainer.log_every_n_steps=1",
        "lsm.monitor.probe_size=40", "lsm.monitor.test_size=40", "lsm.guard.probe_size=32",
        "lsm.guard.tolerance=0.0", *extra,
    ])


def _fit(cfg, run: Path, resume_from: Path | None = None) -> dict:
    trainer = Trainer(cfg, run, model_factory=lambda b: Tiny(), resume_from=resume_from)
    start, decisions = trainer.step, []
    inner_step = trainer.guard.step

    def recording_step(*a, **k):
        result = inner_step(*a, **k)
        decisions.append(tuple(trainer.guard.last_decision))
        return result

    trainer.guard.step = recording_step
    res = trainer.fit()
    trainer.reg.remove()
    return {"status": res.status, "start": start, "step": res.step, "decisions": decisions,
            "spread": trainer.check_replicas(), "ddp": trainer.ddp,
            "params": [p.detach().clone() for p in trainer.module.parameters()],
            "steps_per_epoch": trainer.steps_per_epoch}


def _trainers(rank: int, out_dir: str) -> None:
    out = {"gathered": _fit(_ddp_cfg(), Path(out_dir) / "run")}
    # local features; stop after epoch 1, then resume on every rank from its checkpoint
    local = ["lsm.loss.gather=false", "lsm.monitor.gather=false"]
    out["local"] = _fit(_ddp_cfg(*local, "trainer.max_steps=4"), Path(out_dir) / "local")
    dist.barrier()
    out["resumed"] = _fit(
        _ddp_cfg(*local), Path(out_dir) / "local",
        resume_from=Path(out_dir) / "local" / "checkpoint.pt",
    )
    torch.save(out, os.path.join(out_dir, f"trainers{rank}.pt"))


def test_ddp_trainer_ranks_agree_and_match_one_process_on_the_global_batch(two_ranks, tmp_path):
    a, b = _load(two_ranks, "trainers")
    out_dir = two_ranks
    r0, r1 = a["gathered"], b["gathered"]
    assert r0["ddp"] and r0["status"] == r1["status"] == "completed"
    # 128 samples, 2 ranks x 16 per batch: 4 steps per epoch, 2 epochs
    assert r0["steps_per_epoch"] == 4 and r0["step"] == r1["step"] == 8
    assert r0["decisions"] == r1["decisions"] and len(r0["decisions"]) == 8
    for x, y in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(x, y)
    assert r0["spread"] == r1["spread"] == 0.0

    # rank 0 alone logged and wrote the checkpoint (one run folder)
    run = out_dir / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records if "val/acc" in r] == [0, 3, 4, 6, 8]
    assert (run / "checkpoint.pt").is_file()

    # one process with the global batch (2 x 16) takes the same steps
    single = Trainer(_ddp_cfg("data.batch_size=32"), tmp_path / "single",
                     model_factory=lambda b: Tiny())
    assert not single.ddp and single.steps_per_epoch == 4
    single.fit()
    for x, y in zip(r0["params"], single.module.parameters(), strict=True):
        torch.testing.assert_close(x, y.detach(), rtol=1e-4, atol=1e-5)
    ref = read_metrics(tmp_path / "single")
    # step 0 (same weights): val loss/acc exact over the split test set, gathered monitor
    # = the single-process scores on the full probe
    for key, value in ref[0].items():
        if key.startswith(("val/", "lsm/", "val_lsm/", "probe/")):
            assert records[0][key] == pytest.approx(value, abs=1e-6), key
    # later steps: train metrics summed over the ranks = one process on the global batch
    for mine, theirs in zip(records[1:], ref[1:], strict=True):
        assert mine["step"] == theirs["step"]
        assert mine["train/acc"] == pytest.approx(theirs["train/acc"], abs=1e-6)
        assert mine["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-3)

    # local features (no gather): ranks still agree; the resumed run continues on both
    for phase, steps in (("local", (0, 4)), ("resumed", (4, 8))):
        p0, p1 = a[phase], b[phase]
        assert (p0["start"], p0["step"]) == (p1["start"], p1["step"]) == steps
        assert p0["decisions"] == p1["decisions"]
        for x, y in zip(p0["params"], p1["params"], strict=True):
            assert torch.equal(x, y)
    records = read_metrics(out_dir / "local")
    assert [r["step"] for r in records] == list(range(9))
    assert all(0.5 <= records[-1][f"lsm/{n}"] <= 1 for n in Tiny.hidden_layers)


# ---------------------------------------------------------------------------- torchrun


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_torchrun_two_processes_debug_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lsm_train", "trainer=ddp", "debug=smoke", "logger=none",
         "trainer.progress=false", "trainer.plots=false", "trainer.num_threads=1",
         "data.limit_train=128", "trainer.max_steps=null"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "quickstart").iterdir())
    assert len(runs) == 1, runs  # both ranks used rank 0's run folder
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "checkpoint.pt").is_file()
    records = read_metrics(run)
    assert records[-1]["step"] == 2  # 128 samples / 2 ranks / 32 per batch
    assert proc.stderr.count("step=2  epoch=1") == 1  # the summary: rank 0 only


# ------------------------------------------------------------------ collective timeout


def _stalled_peer(rank: int, port: int, timeout_s: float, out_dir: str) -> None:
    """Rank 1 stalls before a collective; rank 0 must fail after ``timeout_s``."""
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_from_env()  # the default timeout, as main() does under torchrun
    D.set_timeout(D.ddp_timeout_s(timeout_s))  # then the configured one (train_from_config)
    out = Path(out_dir)
    if rank == 1:  # stalled: reaches no collective until rank 0 gave up (or 120 s passed)
        for _ in range(2400):
            if (out / "rank0.txt").exists():
                os._exit(0)
            time.sleep(0.05)
        (out / "rank1_gave_up").touch()
        os._exit(0)
    try:
        D.all_reduce_sum([1.0])
        result = "no error"
    except RuntimeError as err:
        result = f"{type(err).__name__}: {err}"
    stalled = not (out / "rank1_gave_up").exists()
    (out / "rank0.txt").write_text(f"{stalled}\n{result}")
    os._exit(0)


def test_a_stalled_rank_fails_its_peer_after_the_configured_timeout(tmp_path):
    import socket

    cfg = compose(["trainer=ddp", "trainer.ddp.timeout_s=2"])
    assert compose(["trainer=ddp"]).trainer.ddp.timeout_s == D.DEFAULT_TIMEOUT_S == 600
    with pytest.raises(ValueError, match=r"trainer\.ddp\.timeout_s: expected a number"):
        D.ddp_timeout_s(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_stalled_peer, args=(port, cfg.trainer.ddp.timeout_s, str(tmp_path)),
             nprocs=WORLD, join=True)
    stalled, result = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert stalled == "True", result  # rank 0 gave up while rank 1 was still stalled
    assert "timed out" in result.lower() or "timeout" in result.lower(), result
