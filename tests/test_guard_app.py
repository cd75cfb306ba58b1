"""The guard in the app: lsm.guard.measure=loss|random, the z rule keys, validation, stats."""

from __future__ import annotations

import pytest

from lsm_train.app import compose, validate_config
from lsm_train.guard import SeparabilityGuard
from lsm_train.trainer import Trainer

SMALL = [
    "recipe=quickstart",
    "logger=none",
    "trainer.progress=false",
    "trainer.plots=false",
    "trainer.num_threads=1",
    "data.limit_train=64",
    "data.limit_test=32",
    "data.batch_size=32",
    "trainer.epochs=1",
    "trainer.log_every_n_steps=1",
    "lsm.monitor.enabled=false",
    "lsm.guard.probe_size=32",
    "model.kwargs.width=16",
    "model.kwargs.depth=2",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.mark.parametrize("mode", ["guard", "both"])
def test_default_guard_keys_reach_the_guard(tmp_path, mode):
    t = Trainer(compose([*SMALL, f"lsm={mode}", "lsm.guard.z=3.0", "lsm.guard.groups=4"]),
                tmp_path)
    g = t.step_optimizer
    assert isinstance(g, SeparabilityGuard)
    assert (g.measure, g.z, g.groups, g.tolerance) == ("soft", 3.0, 4, 0.0)
    assert (g.max_nonfinite, g.acceptance.size, g.acceptance.level) == (20, 50, 0.5)


def test_controls_from_the_command_line(tmp_path):
    t = Trainer(compose([*SMALL, "lsm=guard", "lsm.guard.measure=loss"]), tmp_path / "a")
    assert t.step_optimizer.measure == "loss" and t.step_optimizer.layer_names == ["loss"]
    cfg = compose([*SMALL, "lsm=guard", "lsm.guard.measure=random",
                   "lsm.guard.accept_rate=0.5", "seed=3"])
    t = Trainer(cfg, tmp_path / "b")
    g = t.step_optimizer
    assert (g.measure, g.accept_rate, g.seed) == ("random", 0.5, 3)
    result = t.fit()
    assert result.status == "completed", result.message
    assert {"guard/nonfinite", "guard/low_acceptance", "guard/forced",
            "guard/recent_accept_rate", "guard/accept_rate"} <= set(result.final)
    assert result.final["guard/nonfinite"] == 0


@pytest.mark.parametrize("override,message", [
    ("lsm.guard.measure=nope", r"lsm\.guard\.measure: expected soft, degree, loss or random"),
    ("lsm.guard.measure=random", r"lsm\.guard\.accept_rate: expected a number in \[0, 1\]"),
    ("lsm.guard.measure=random lsm.guard.accept_rate=2",
     r"lsm\.guard\.accept_rate: expected a number in \[0, 1\]"),
    ("lsm.guard.z=-1", r"lsm\.guard\.z: expected a number >= 0"),
    ("lsm.guard.groups=1", r"lsm\.guard\.groups: expected an integer >= 2"),
    ("lsm.guard.warn_below=2", r"lsm\.guard\.warn_below: expected a number in \[0, 1\]"),
])
def test_bad_guard_keys_are_rejected_by_the_config_check(override, message):
    with pytest.raises(ValueError, match=message):
        validate_config(compose([*SMALL, "lsm=guard", *override.split()]))
