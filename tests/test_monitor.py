"""The monitor: capture (one forward, flags restored), the batched score of all layers
against layer_separability one layer at a time, the budget schedule with a fake clock, and
the trainer's monitor under the budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lsm_train as lt
from lsm_train.app import compose
from lsm_train.monitor import MonitorSchedule, capture, score_sets
from lsm_train.tracking import read_metrics
from lsm_train.trainer import Trainer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))


# ------------------------------------------------------------------------------ capture


def test_capture_one_forward_reduced_features_and_module_flags_restored():
    net = _net()
    net.train()
    net[4].eval()  # a frozen submodule kept in eval mode
    x, y = torch.randn(10, 1, 8, 8), torch.randint(0, 3, (10,))
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(m.training))
    feats, stats = capture(net, x, y, ["1", "5"], batch_size=4, keep=6)
    assert calls == [False, False, False]  # eval mode, batches of 4
    assert [m.training for m in net.modules()] == [True, True, True, True, True, False, True,
                                                   True]
    net.eval()
    with torch.no_grad():
        logits = net(x)
        conv = net[1](net[0](x))
    assert torch.allclose(feats["1"], conv.mean(dim=(2, 3))[:6])  # global average pool
    assert feats["5"].shape == (6, 16)
    assert int(stats["correct"]) == int((logits.argmax(1) == y).sum())
    assert float(stats["loss"]) == pytest.approx(
        float(nn.functional.cross_entropy(logits, y, reduction="sum")), rel=1e-6)


# --------------------------------------------------------------------------- score_sets


def _layers(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    base = rng.normal(size=(n, 6)) + y[:, None] * 0.7
    return {"a": torch.tensor(base, dtype=torch.float32),
            "b": torch.tensor(np.tanh(base @ rng.normal(size=(6, 20))), dtype=torch.float32),
            "c": torch.tensor(base[:, :3] * 4.0, dtype=torch.float32),
            "d": torch.tensor(rng.normal(size=(n, 6)), dtype=torch.float32)}, torch.tensor(y)


@pytest.mark.parametrize("holdout", [None, 0.5])
def test_score_sets_equals_layer_separability_layer_by_layer(holdout):
    feats, y = _layers()
    other, y2 = _layers(60, seed=1)
    (s1, s2), extra = score_sets([(feats, y), (other, y2)], holdout=holdout, seed=3,
                                 extra=[torch.tensor(7)])
    assert list(s1) == list(feats) and list(s2) == list(other)  # input order kept
    assert extra == [7.0]
    for scores, layers, labels in ((s1, feats, y), (s2, other, y2)):
        for name, H in layers.items():
            ref = lt.layer_separability(H, labels, method="fisher", holdout=holdout, seed=3)
            assert scores[name] == pytest.approx(ref, abs=1e-12)


def test_score_sets_non_finite_layer_is_nan_and_others_unchanged():
    feats, y = _layers()
    ref = score_sets([(feats, y)])[0][0]
    feats["a"] = feats["a"].clone()
    feats["a"][0, 0] = math.inf
    got = score_sets([(feats, y)])[0][0]
    assert math.isnan(got["a"]) and all(got[k] == ref[k] for k in "bcd")


# --------------------------------------------------------------------------- schedule


def test_explicit_interval_wins_over_the_budget():
    s = MonitorSchedule(budget=0.01, every_n_steps=3)
    due = [step for step in range(1, 13) if s.due(step, 1.0, 100.0, epoch_end=step == 5)]
    assert due == [3, 5, 6, 9, 12]
    assert MonitorSchedule(every_n_steps=0).due(4, 1.0, 0.0) is False
    assert MonitorSchedule(every_n_steps=0).due(4, 1.0, 0.0, epoch_end=True) is True


def test_budget_spaces_evaluations_and_keeps_the_fraction():
    """Each training step costs 1 s and each evaluation 2 s (fake clock, exact binary
    fractions): with a 12.5 % budget and one evaluation kept for the last step, the k-th
    evaluation after step 0 comes at the first step s with 2·k + 2 + 2 <= s / 8 (spent so
    far + this one + the final one), i.e. s = 48, 64, ..., and the share stays <= 12.5 %."""
    clock = FakeClock()
    s = MonitorSchedule(budget=0.125, clock=clock)
    train, spent, steps = 0.0, 0.0, []

    def evaluate():
        nonlocal spent
        with s.timed(train):
            clock.now += 2.0
        spent += 2.0

    evaluate()  # step 0
    for step in range(1, 201):
        clock.now += 1.0
        train += 1.0
        if s.due(step, train, spent, epoch_end=step % 50 == 0, last=step == 200):
            evaluate()
            steps.append(step)
    assert steps == [*range(48, 200, 16), 200]  # epoch ends (50, 100, 150) not forced
    assert s.cost == 2.0 and s.evaluations == len(steps) + 1
    assert spent / train == 24 / 200 <= 0.125


def test_budget_does_not_catch_up_in_a_burst_after_an_expensive_first_evaluation():
    """Step 0 costs 20 s, later evaluations 2 s: the first comes when 20 + 2·20 <= s / 8
    (s = 480); afterwards the spent total is far below the budget, yet evaluations come
    only every 2 / 0.125 = 16 steps."""
    clock = FakeClock()
    s = MonitorSchedule(budget=0.125, clock=clock)
    with s.timed(0.0):
        clock.now += 20.0
    spent, steps = 20.0, []
    for step in range(1, 601):
        clock.now += 1.0
        if s.due(step, float(step), spent):
            with s.timed(float(step)):
                clock.now += 2.0
            spent += 2.0
            steps.append(step)
    assert steps == list(range(480, 601, 16))


def test_budget_before_any_timed_evaluation_and_bad_values():
    s = MonitorSchedule(budget=0.05)
    assert s.due(10, 100.0, 5.0) and not s.due(10, 100.0, 5.1)  # a resumed run
    assert s.due(3, 0.0, 50.0, last=True)
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="budget"):
            MonitorSchedule(budget=bad)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="monitor_every_n_steps"):
            MonitorSchedule(every_n_steps=bad)


# ---------------------------------------------------------------------------- trainer

SMALL = ["logger=none", "trainer.progress=false", "trainer.plots=false",
         "trainer.num_threads=1", "data.limit_train=192", "data.limit_test=60",
         "data.batch_size=32", "trainer.epochs=2", "trainer.log_every_n_steps=1",
         "lsm.monitor.probe_size=60", "lsm.monitor.test_size=60", "model.kwargs.width=16",
         "model.kwargs.depth=2", "lsm=monitor"]


def test_trainer_budget_mode_logs_the_fraction_and_ends_with_an_evaluation(tmp_path):
    cfg = compose(["recipe=quickstart", *SMALL])
    assert cfg.trainer.monitor_every_n_steps is None and cfg.lsm.monitor.method == "fisher"
    t = Trainer(cfg, tmp_path)
    t.fit()
    records = read_metrics(tmp_path)
    monitored = [r["step"] for r in records if "lsm/mean" in r]
    assert monitored[0] == 0 and monitored[-1] == 12  # 2 epochs of 6 steps
    assert t.schedule.evaluations == len(monitored) == records[-1]["time/monitor_evaluations"]
    last = records[-1]
    assert last["time/monitor_fraction"] == pytest.approx(
        last["time/monitor_s"] / last["time/train_s"])


@pytest.mark.parametrize("method", ["fisher", "degree"])
def test_trainer_monitor_equals_the_score_of_the_captured_layers(tmp_path, method):
    """The monitor pass (one forward per set; for fisher all layers in one batched pass)
    gives the values of layer_separability(method) on the captured features, the val
    loss/acc of evaluate(), and for fisher the hard-pair score (aggregate="worst")."""
    from lsm_train.trainer import evaluate

    cfg = compose(["recipe=quickstart", *SMALL, "trainer.monitor_every_n_steps=3",
                   f"lsm.monitor.method={method}"])
    t = Trainer(cfg, tmp_path)
    out = t.monitor()
    loss, acc = evaluate(t.module, t.data.test, t.device)
    assert out["val/loss"] == pytest.approx(loss, rel=1e-6) and out["val/acc"] == acc
    tol = 1e-9 if method == "fisher" else 1e-6
    for key, (x, y) in (("lsm", t.probe), ("val_lsm", t.test_probe)):
        t.module.eval()
        with torch.no_grad(), lt.HiddenCapture(t.module, t.layers) as feats:
            t.module(x)
        for name in t.layers:
            kw = dict(method=method, holdout=0.5, seed=0)
            ref = lt.layer_separability(feats[name], y, **kw)
            assert out[f"{key}/{name}"] == pytest.approx(float(ref), abs=tol)
            if method == "fisher":
                hard = lt.layer_separability(feats[name], y, aggregate="worst", **kw)
                assert out[f"{key}_hard/{name}"] == pytest.approx(hard, abs=tol)
                assert out[f"{key}_hard/{name}"] <= out[f"{key}/{name}"] + 1e-12
            else:
                assert f"{key}_hard/{name}" not in out
