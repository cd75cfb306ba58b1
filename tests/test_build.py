"""Objects built from config by ``hydra.utils.instantiate`` (optimizer, schedule, loss,
guard), compared with the same objects made directly with torch / the library."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lsm_train.app import compose
from lsm_train.build import build_guard, build_loss, build_optimizer, build_scheduler
from lsm_train.data import ArrayDataset, DataBundle
from lsm_train.guard import SeparabilityGuard
from lsm_train.loss import LSMLoss
from lsm_train.trainer import Trainer

SMALL = ["logger=none", "trainer.progress=false", "trainer.plots=false", "data.limit_train=64",
         "data.limit_test=32", "data.batch_size=32", "trainer.epochs=1",
         "lsm.monitor.probe_size=32", "lsm.monitor.test_size=32", "lsm.guard.probe_size=16",
         "model.kwargs.width=8", "model.kwargs.depth=2"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter stays out of the optimizer
    return model


def test_the_optimizer_is_its_target_with_the_sections_kwargs():
    model = _model()
    opt = build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.5,
                           "nesterov": True}, model)
    ref = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.5, nesterov=True)
    assert type(opt) is torch.optim.SGD
    assert opt.param_groups[0].keys() == ref.param_groups[0].keys()
    for key, value in ref.param_groups[0].items():
        if key != "params":
            assert opt.param_groups[0][key] == value, key
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(p) for p in ref.param_groups[0]["params"]]


def test_optim_target_from_the_command_line_reaches_the_trainer(tmp_path):
    cfg = compose(["recipe=quickstart", *SMALL, "lsm=off", "optim._target_=torch.optim.SGD",
                   "~optim.weight_decay", "+optim.momentum=0.7", "optim.lr=0.02"])
    t = Trainer(cfg, tmp_path)
    assert type(t.optimizer) is torch.optim.SGD
    assert (t.optimizer.param_groups[0]["momentum"], t.optimizer.param_groups[0]["lr"]) == (
        0.7, 0.02)


def _lrs(scheduler, opt, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return seen


def test_a_torch_scheduler_target_equals_the_scheduler_made_directly():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, {"_target_": "torch.optim.lr_scheduler.StepLR",
                                  "_partial_": True, "step_size": 2, "gamma": 0.5}, 10)
    assert type(sched) is torch.optim.lr_scheduler.StepLR
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    assert _lrs(sched, opt, 7) == _lrs(ref, ref_opt, 7)


def test_the_conf_schedules_are_built_with_the_runs_length():
    p = nn.Parameter(torch.zeros(1))
    for name in ("cosine", "linear"):
        cfg = compose([f"sched={name}", "sched.min_lr_ratio=0.25"]).sched
        opt = torch.optim.SGD([p], lr=1.0)
        lrs = _lrs(build_scheduler(opt, cfg, 8), opt, 9)
        assert lrs[0] == 1.0 and lrs[8] == pytest.approx(0.25)  # min_lr_ratio at the last
    assert build_scheduler(torch.optim.SGD([p], lr=1.0), compose(["sched=none"]).sched, 8) is None


def test_the_loss_partial_gets_the_model_layers_and_every_configured_option():
    model = _model()
    node = {"_target_": "lsm_train.loss.LSMLoss", "_partial_": True, "weight": 0.3,
            "shrinkage": 0.4, "reduce": "flatten", "detach_directions": False,
            "crossfit": True, "layer_weights": {"1": 2.0}}
    reg = build_loss(node, model, ["1"], num_classes=3)
    assert isinstance(reg, LSMLoss)
    assert (reg.weight, reg.shrinkage, reg.reduce, reg.detach_directions, reg.crossfit) == (
        0.3, 0.4, "flatten", False, True)
    assert reg.num_classes == 3  # the static path
    reg.remove()


def test_shrinkage_reduce_and_detach_directions_reach_the_trainers_loss(tmp_path):
    cfg = compose(["recipe=quickstart", *SMALL, "lsm=loss", "lsm.loss.shrinkage=0.3",
                   "lsm.loss.reduce=flatten", "lsm.loss.detach_directions=true",
                   "lsm.loss.crossfit=false"])
    t = Trainer(cfg, tmp_path)
    assert (t.reg.shrinkage, t.reg.reduce, t.reg.detach_directions, t.reg.crossfit) == (
        0.3, "flatten", True, False)
    assert t.reg.num_classes is None  # detach_directions needs the dynamic path


def test_the_guard_partial_wraps_the_optimizer_on_the_first_probe_size_samples():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(20, 4)
    y = torch.arange(20) % 3
    data = DataBundle(train=ArrayDataset(x, y), test=ArrayDataset(x, y), num_classes=3,
                      in_channels=1, image_size=4, name="t")
    node = {"_target_": "lsm_train.guard.SeparabilityGuard", "_partial_": True,
            "measure": "degree", "z": 0.0, "probe_size": 12, "check_every": 2}
    guard = build_guard(node, opt, model, ["1"], data, torch.device("cpu"), seed=5)
    assert isinstance(guard, SeparabilityGuard) and guard.optimizer is opt
    assert (guard.measure, guard.z, guard.check_every, guard.seed) == ("degree", 0.0, 2, 5)
    px, py = guard.scorer.probe
    assert torch.equal(px, x[:12]) and torch.equal(py, y[:12])


def test_a_target_that_cannot_be_imported_names_its_section():
    with pytest.raises(ValueError, match=r"lsm\.loss\._target_: cannot build"):
        build_loss({"_target_": "lsm_train.nope.Loss"}, _model(), ["1"], num_classes=3)
    with pytest.raises(ValueError, match=r"optim: Invalid learning rate"):
        build_optimizer({"_target_": "torch.optim.SGD", "lr": -1.0}, _model())
