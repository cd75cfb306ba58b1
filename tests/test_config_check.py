"""The one config check: unknown keys are refused by name, the values it accepts are the
values the built objects accept, and the app's defaults are the library's."""

from __future__ import annotations

import inspect

import pytest
import torch

from lsm_train.app import compose
from lsm_train.config_check import (
    DDP_KEYS,
    LSM_KEYS,
    MONITOR_KEYS,
    TRAINER_KEYS,
    allowed_keys,
    check_keys,
    validate_config,
)
from lsm_train.guard import SeparabilityGuard
from lsm_train.loss import LSMLoss


@pytest.mark.parametrize("override,key", [
    ("+lsm.monitor.probesize=3", "lsm.monitor.probesize"),
    ("+lsm.moed=loss", "lsm.moed"),
    ("+lsm.loss.tua=1.0", "lsm.loss.tua"),
    ("+lsm.guard.zz=1.0", "lsm.guard.zz"),
    ("+trainer.epoch=3", "trainer.epoch"),
    ("+trainer.ddp.timeout=3", "trainer.ddp.timeout"),
    ("+optim.momentum=0.9", "optim.momentum"),  # AdamW has no momentum
    ("+sched.warmup=3", "sched.warmup"),
])
def test_a_mistyped_key_is_named_with_the_allowed_keys(override, key):
    cfg = compose([override])
    escaped = key.replace(".", r"\.")
    with pytest.raises(ValueError, match=escaped + r": unknown option; expected one of \w+"):
        validate_config(cfg)
    with pytest.raises(ValueError, match=escaped):
        check_keys(cfg)


def test_the_allowed_keys_of_an_instantiated_section_follow_its_target():
    sgd = compose(["optim=sgd"])
    validate_config(sgd)  # momentum and nesterov are SGD's
    assert {"momentum", "nesterov", "lr"} <= set(allowed_keys("optim", dict(sgd.optim)))
    assert "momentum" not in allowed_keys("optim", {"_target_": "torch.optim.AdamW"})
    assert "params" not in allowed_keys("optim", {"_target_": "torch.optim.SGD"})
    with pytest.raises(ValueError, match=r"optim\._target_: cannot import 'torch\.optim\.Nope'"):
        validate_config(compose(["optim._target_=torch.optim.Nope"]))


def test_the_strict_sections_hold_exactly_the_keys_of_conf():
    cfg = compose(["trainer=ddp"])
    assert set(cfg.lsm) == set(LSM_KEYS)
    assert set(cfg.lsm.monitor) == set(MONITOR_KEYS)
    assert set(cfg.trainer) == set(TRAINER_KEYS)
    assert set(cfg.trainer.ddp) == set(DDP_KEYS)
    for mode in ("off", "monitor", "loss", "guard", "both"):
        validate_config(compose([f"lsm={mode}"]))


def _defaults(fn) -> dict:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.default is not inspect.Parameter.empty}


def test_the_loss_and_guard_keys_of_conf_are_the_constructors_defaults():
    cfg = compose([])
    loss = {k: v for k, v in cfg.lsm.loss.items() if not k.startswith("_")}
    for name in ("shrinkage", "reduce", "detach_directions"):  # settable from config
        assert name in loss
    lib = _defaults(LSMLoss)
    assert loss == {k: lib[k] for k in loss}
    guard = {k: v for k, v in cfg.lsm.guard.items() if not k.startswith("_")}
    guard.pop("probe_size")  # the build's, not the guard's
    lib = _defaults(SeparabilityGuard)
    assert guard == {k: lib[k] for k in guard}


def _guard_accepts(**options) -> bool:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        SeparabilityGuard(opt, model, measure="random", accept_rate=0.5, **options)
    except ValueError:
        return False
    return True


def _loss_accepts(**options) -> bool:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    try:
        LSMLoss(model, ["1"], **options).remove()
    except ValueError:
        return False
    return True


def _config_accepts(*overrides: str) -> bool:
    try:
        validate_config(compose(list(overrides)))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("value", [None, 0, 3, -1])
def test_max_consecutive_rejects_is_accepted_as_the_guard_accepts_it(value):
    text = "null" if value is None else str(value)
    assert _config_accepts(f"lsm.guard.max_consecutive_rejects={text}") == _guard_accepts(
        max_consecutive_rejects=value)


@pytest.mark.parametrize("key,value,text", [
    ("shrinkage", 0.0, "0.0"), ("shrinkage", 1.0, "1.0"), ("shrinkage", 1.5, "1.5"),
    ("shrinkage", -0.1, "-0.1"), ("reduce", "avgpool", "avgpool"), ("reduce", "bogus", "bogus"),
    ("tau", 0.0, "0.0"), ("scheme", "ovr", "ovr"), ("scheme", "both", "both"),
    ("warmup_steps", 2, "2"), ("warmup_steps", -1, "-1"),
])
def test_loss_values_are_accepted_as_lsmloss_accepts_them(key, value, text):
    assert _config_accepts(f"lsm.loss.{key}={text}") == _loss_accepts(**{key: value})
