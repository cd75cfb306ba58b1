"""Trainer: resume equivalence (bitwise), signal checkpoint, NaN stop, schedules, augment."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from test_build import _lrs

from lsm_train.app import compose
from lsm_train.checkpoint import load_checkpoint
from lsm_train.tracking import read_metrics
from lsm_train.trainer import Trainer, augment_batch, build_scheduler, evaluate

SMALL = [
    "logger=none",
    "trainer.progress=false",
    "trainer.plots=false",
    "trainer.num_threads=1",
    "data.limit_train=96",
    "data.limit_test=48",
    "data.batch_size=32",
    "trainer.epochs=3",
    "trainer.monitor_every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "lsm.monitor.probe_size=48",
    "lsm.monitor.test_size=48",
    "lsm.guard.probe_size=32",
    "model.kwargs.width=16",
    "model.kwargs.depth=2",
]


def small_cfg(*extra):
    return compose(["recipe=quickstart", *SMALL, *extra])


def _strip_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _kill_at_training_forward(model, n, sig=signal.SIGTERM):
    """Send ``sig`` to this process during the n-th training-mode forward."""
    calls = {"n": 0}

    def hook(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), sig)

    return model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("lsm", ["both", "off"])
def test_resume_after_a_signal_ends_exactly_like_an_uninterrupted_run(tmp_path, lsm):
    cfg = small_cfg(f"lsm={lsm}", "sched=cosine")
    full = Trainer(cfg, tmp_path / "full")
    res_full = full.fit()
    assert res_full.status == "completed" and res_full.step == 9 and res_full.epoch == 3

    part = Trainer(cfg, tmp_path / "part")
    _kill_at_training_forward(part.model, 5)  # step 5: in the middle of epoch 1
    res_part = part.fit()
    assert res_part.status == "interrupted" and res_part.step == 5
    assert "SIGTERM" in res_part.message and "resume=true" in res_part.message
    state = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 2)

    resumed = Trainer(cfg, tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint.pt")
    assert resumed.step == 5
    res = resumed.fit()
    assert res.status == "completed" and res.step == 9
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert _strip_time(read_metrics(tmp_path / "part")) == _strip_time(
        read_metrics(tmp_path / "full")
    )
    if lsm == "both":
        assert resumed.guard.stats == full.guard.stats
        assert torch.equal(resumed.reg.num_steps, full.reg.num_steps)


def test_metrics_keys(tmp_path):
    t = Trainer(small_cfg("lsm=both"), tmp_path)
    t.fit()
    records = read_metrics(tmp_path)
    layers = t.layers
    assert layers == ["blocks.0.act", "blocks.1.act"]
    assert records[0]["step"] == 0  # the untrained network is measured first
    keys = set().union(*records)
    for key in ["step", "epoch", "train/loss", "train/acc", "val/acc", "val/loss", "probe/acc",
                "lr", "lsm/mean", "guard/accept_rate", "guard/accepted", "guard/rejected"]:
        assert key in keys, key
    for name in layers:
        assert f"lsm/{name}" in keys and f"val_lsm/{name}" in keys and f"lsm_loss/{name}" in keys
    monitored = [r for r in records if "lsm/blocks.0.act" in r]
    assert [r["step"] for r in monitored] == [0, 2, 3, 4, 6, 8, 9]  # every 2 + epoch ends
    for r in monitored:
        assert 0.5 <= r["lsm/blocks.1.act"] <= 1.0
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 9 and ckpt["epoch"] == 3
    # wall time splits into training and monitoring, both growing, summing to the elapsed time
    last = records[-1]
    assert last["time/monitor_s"] > 0 and last["time/train_s"] > 0
    assert last["time/train_s"] + last["time/monitor_s"] == pytest.approx(
        last["time/elapsed_s"], rel=1e-6
    )
    monitor_times = [r["time/monitor_s"] for r in records]
    assert monitor_times == sorted(monitor_times)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    t = Trainer(small_cfg("lsm=off"), tmp_path)
    calls = {"n": 0}

    def poison(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] >= 5:  # step 5, after the epoch-1 checkpoint at step 3
                return output * float("nan")
        return output

    t.model.register_forward_hook(poison)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    res = t.fit()
    assert res.status == "nan" and res.step == 4
    assert "not finite at step 5" in res.message and str(tmp_path) in res.message
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_guard_wraps_the_configured_optimizer(tmp_path):
    from lsm_train.guard import SeparabilityGuard

    t = Trainer(small_cfg("lsm=guard", "optim=sgd", "lsm.monitor.enabled=false"), tmp_path)
    assert isinstance(t.step_optimizer, SeparabilityGuard)
    assert isinstance(t.optimizer, torch.optim.SGD) and t.step_optimizer.optimizer is t.optimizer
    assert t.reg is None and not t.monitor_on
    t2 = Trainer(small_cfg("lsm=loss", "optim=adam"), tmp_path / "b")
    assert isinstance(t2.step_optimizer, torch.optim.Adam) and t2.reg is not None


def test_device_is_chosen_automatically(tmp_path):
    t = Trainer(small_cfg("lsm=off"), tmp_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert t.device.type == expected
    assert next(t.model.parameters()).device.type == expected


def test_schedules():
    p = torch.nn.Parameter(torch.zeros(1))

    def lrs(cfg: dict, total: int, steps: int) -> list[float]:
        """The lr of each of the first ``steps`` steps under the schedule ``cfg``."""
        opt = torch.optim.SGD([p], lr=1.0)
        return _lrs(build_scheduler(opt, cfg, total), opt, steps)

    cosine = lrs({"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}, 12, 12)
    assert cosine[0] == pytest.approx(0.5) and cosine[1] == pytest.approx(1.0)
    expect = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10)) for s in range(2, 12)]
    assert cosine[2:] == pytest.approx(expect)
    step = lrs({"name": "step", "step_size": 3, "gamma": 0.5}, 9, 7)
    assert step == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25])
    assert build_scheduler(torch.optim.SGD([p], lr=1.0), {"name": "none"}, 10) is None
    with pytest.raises(ValueError, match="sched.name"):
        build_scheduler(torch.optim.SGD([p], lr=1.0), {"name": "bogus"}, 10)


def test_augment_batch_flips_and_translates():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, pad=0)  # pad 0: only flips
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = augment_batch(x, g1, pad=2), augment_batch(x, g2, pad=2)
    assert torch.equal(a, b) and a.shape == x.shape
    # every output pixel is zero padding or a pixel of the (possibly flipped) input
    for i in range(2):
        vals = set(a[i].flatten().tolist())
        assert vals <= set(x[i].flatten().tolist()) | {0.0}


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    from lsm_train.data import ArrayDataset

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = ArrayDataset(torch.randn(10, 4), torch.arange(10) % 3)
    loss, acc = evaluate(model, data, torch.device("cpu"), batch_size=3)
    with torch.no_grad():
        logits = model(data.x)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, data.y)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(1) == data.y).float().mean()))


def test_sigint_also_checkpoints_and_stops(tmp_path):
    t = Trainer(small_cfg("lsm=off"), tmp_path)
    _kill_at_training_forward(t.model, 2, sig=signal.SIGINT)
    res = t.fit()
    assert res.status == "interrupted" and res.signum == signal.SIGINT and "SIGINT" in res.message
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_monitor_scores_equal_layer_separability_on_the_captured_features(tmp_path):
    import lsm_train as lt
    from lsm_train.trainer import measure_layers

    t = Trainer(small_cfg("lsm=monitor"), tmp_path)
    x, y = t.probe
    scores, acc = measure_layers(t.model, x, y, t.layers, holdout=0.5, seed=0, batch_size=20)
    t.model.eval()  # the probe stays on the host; on a GPU run the model is on the device
    with torch.no_grad(), lt.HiddenCapture(t.model, t.layers) as feats:
        logits = t.model(x.to(t.device)).cpu()
    for name in t.layers:
        H = feats[name].cpu()
        expect = lt.layer_separability(H, y, method="degree", holdout=0.5, seed=0)
        assert scores[name] == pytest.approx(float(expect), abs=1e-6)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from lsm_train import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    state = checkpoint.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    checkpoint.save_checkpoint(path, {"step": 3})
    assert checkpoint.load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # the partial file moved
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load_checkpoint(tmp_path / "nope.pt")


def test_rng_state_roundtrip():
    import random

    import numpy as np

    from lsm_train.checkpoint import rng_state, set_rng_state

    state = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_the_loop_calls_its_named_hooks(tmp_path):
    from lsm_train.trainer import HOOKS

    t = Trainer(small_cfg("lsm=monitor"), tmp_path)
    seen = {name: [] for name in HOOKS}
    for name in HOOKS:
        t.add_hook(name, lambda trainer, payload, name=name: seen[name].append(
            (trainer.step, payload)))
    with pytest.raises(ValueError, match="hook: expected one of"):
        t.add_hook("on_epoch", lambda trainer, payload: None)
    t.fit()
    records = read_metrics(tmp_path)
    # on_log: every record of metrics.jsonl, as written
    assert [s for s, _ in seen["on_log"]] == [r["step"] for r in records]
    for (_, logged), record in zip(seen["on_log"], records, strict=True):
        assert {k: logged[k] for k in record if k != "step"} == {
            k: v for k, v in record.items() if k != "step"}
    # on_monitor: the evaluations, with the values logged at those steps
    monitored = [r for r in records if "lsm/mean" in r]
    assert [s for s, _ in seen["on_monitor"]] == [r["step"] for r in monitored]
    assert [m["lsm/mean"] for _, m in seen["on_monitor"]] == [r["lsm/mean"] for r in monitored]
    # on_checkpoint: each epoch end, with the file written; on_step: each step's loss
    assert [s for s, _ in seen["on_checkpoint"]] == [3, 6, 9]
    assert all(p == tmp_path / "checkpoint.pt" for _, p in seen["on_checkpoint"])
    assert [s for s, _ in seen["on_step"]] == list(range(1, 10))
    assert all(math.isfinite(loss) for _, loss in seen["on_step"])


