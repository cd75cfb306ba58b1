"""The Hydra app: every recipe composes, runs end to end (debug=smoke), wandb offline folder,
SIGTERM checkpoint in a real subprocess, multirun, bad inputs fail before training."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from lsm_train.app import (
    _wandb_settings,
    compose,
    conf_dir,
    list_recipes,
    recipes_dir,
    train_from_config,
    validate_config,
)
from lsm_train.checkpoint import load_checkpoint
from lsm_train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(
    p.relative_to(ROOT / "recipes").with_suffix("").as_posix()
    for p in (ROOT / "recipes").rglob("*.yaml")
)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


HAS_OPTUNA = _has_module("hydra_plugins.hydra_optuna_sweeper")
FAST = ["logger=none", "trainer.progress=false"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _env():
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_app(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "lsm_train", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


# ----------------------------------------------------------------------------- compose


def test_recipe_list_matches_the_files():
    assert recipes_dir() == ROOT / "recipes" and conf_dir() == ROOT / "conf"
    assert list_recipes() == RECIPES
    expected = {"quickstart", "ablation/lsm-modes", "ablation/optuna-search", "zoo/digits",
                "zoo/cifar10"}
    assert expected <= set(RECIPES)


def test_recipes_flag_lists_every_recipe_file_and_help_shows_them(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lsm_train", "--recipes"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(None, 1) for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == RECIPES
    described = dict(rows)  # the first sentence of each recipe's header comment
    assert described["zoo/digits"].startswith("Any zoo family on scikit-learn's 8x8 digits")
    assert not list(tmp_path.iterdir())  # nothing composed, no run folder
    helped = run_app("--help")
    assert helped.returncode == 0 and "recipe=<name>" in helped.stdout
    assert all(name in helped.stdout for name in RECIPES)


# the settings of the eight former recipes zoo/<family>-digits and zoo/<family>-cifar10
ZOO_DIGITS = {  # family: (epochs, sched, min_lr_ratio, lr, weight_decay)
    "mlp": (20, "cosine", 0.0, 3e-3, 1e-4), "alexnet": (20, "cosine", 0.0, 3e-3, 1e-4),
    "vgg": (20, "cosine", 0.0, 3e-3, 1e-4), "dbn": (20, "cosine", 0.0, 1e-2, 1e-4),
    "vit": (20, "cosine", 0.0, 2e-3, 0.05), "cnn": (6, "none", None, 3e-3, 1e-4),
    "resnet": (6, "none", None, 3e-3, 1e-4), "googlenet": (6, "none", None, 3e-3, 1e-4),
}
ZOO_CIFAR10 = {  # family: (optimizer, lr, epochs, model options)
    "mlp": ("AdamW", 1e-3, 30, {"width": 1024, "depth": 3}),
    "cnn": ("SGD", 0.05, 30, {"channels": [64, 128, 256], "fc_width": 256}),
    "dbn": ("AdamW", 1e-3, 30, {"sizes": [1024, 512], "visible": "gaussian"}),
    "resnet": ("SGD", 0.05, 30, {"width": 64, "blocks": [2, 2, 2, 2]}),
    "vgg": ("SGD", 0.05, 30, {"layout": "vgg11", "width": 64, "fc_width": 512, "dropout": 0.5}),
    "alexnet": ("SGD", 0.05, 30, {"width": 64, "fc_width": 1024, "batchnorm": True}),
    "vit": ("AdamW", 1e-3, 50, {"grid": 8, "dim": 256, "depth": 6, "heads": 8}),
    "googlenet": ("SGD", 0.05, 30, {"width": 1.0, "depth": 9}),
}


@pytest.mark.parametrize("family", sorted(ZOO_DIGITS))
def test_zoo_digits_gives_each_family_its_own_settings(family):
    from lsm_train.trainer import build_scheduler

    epochs, sched, floor, lr, wd = ZOO_DIGITS[family]
    cfg = compose(["recipe=zoo/digits", f"model={family}"], return_hydra_config=True)
    assert cfg.model.name == family and cfg.data.name == "digits" and cfg.lsm.mode == "both"
    assert (cfg.trainer.epochs, cfg.optim.lr, cfg.optim.weight_decay) == (epochs, lr, wd)
    assert cfg.hydra.runtime.choices["tuning@_global_"] == f"zoo/digits/{family}"
    assert cfg.trainer.monitor_every_n_steps == 25 and cfg.trainer.num_threads == 1
    if sched == "cosine":
        assert (cfg.sched.name, cfg.sched.min_lr_ratio) == ("cosine", floor)
        return
    # a constant lr, as the former recipe's sched=none: the cosine floor is lr itself
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    scheduler = build_scheduler(opt, cfg.sched, total_steps=50)
    lrs = []
    for _ in range(50):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [lr] * 50


def test_zoo_digits_family_settings_of_vit_and_dbn():
    vit = compose(["recipe=zoo/digits", "model=vit"])
    assert (vit.model.kwargs.dropout, vit.sched.warmup_steps) == (0.1, 50)
    dbn = compose(["recipe=zoo/digits", "model=dbn"])
    assert dict(dbn.trainer.pretrain) == {"epochs": 3, "k": 1, "lr": 0.01, "batch_size": 64}


@pytest.mark.parametrize("family", sorted(ZOO_CIFAR10))
def test_zoo_cifar10_gives_each_family_its_own_settings(family):
    optimizer, lr, epochs, options = ZOO_CIFAR10[family]
    cfg = compose(["recipe=zoo/cifar10", f"model={family}"])
    validate_config(cfg)
    assert cfg.optim._target_ == f"torch.optim.{optimizer}" and cfg.optim.lr == lr
    if optimizer == "SGD":
        assert (cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.9, True,
                                                                                   5e-4)
    else:
        assert "momentum" not in cfg.optim
    assert cfg.trainer.epochs == epochs and cfg.sched.name == "cosine"
    assert {k: cfg.model.kwargs[k] for k in options} == options
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.augment) == ("cifar10", 128, True)
    assert (cfg.lsm.monitor.probe_size, cfg.lsm.guard.probe_size) == (1024, 512)


def test_a_family_file_applies_to_its_recipe_only_and_the_command_line_wins():
    assert compose(["recipe=quickstart", "model=cnn"]).trainer.epochs == 15  # quickstart's
    cfg = compose(["recipe=zoo/digits", "model=cnn", "trainer.epochs=2", "sched.min_lr_ratio=0"])
    assert (cfg.trainer.epochs, cfg.sched.min_lr_ratio) == (2, 0.0)


def test_a_recipe_folder_of_ones_own_through_the_search_path(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "tiny.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: cnn\ntrainer:\n  epochs: 2\n")
    cfg = compose(["recipe=mine/tiny",
                   f"hydra.searchpath=[lsmrecipes://builtin,lsmrecipes://{tmp_path}]"])
    assert (cfg.model.name, cfg.trainer.epochs) == ("cnn", 2)
    assert compose(["recipe=zoo/digits",  # the built-in ones stay
                    f"hydra.searchpath=[lsmrecipes://builtin,lsmrecipes://{tmp_path}]"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    if recipe == "ablation/optuna-search" and not HAS_OPTUNA:
        with pytest.raises(MissingConfigException, match="optuna"):
            compose([f"recipe={recipe}"])
        pytest.skip("hydra-optuna-sweeper (optional extra) is not installed")
    cfg = compose([f"recipe={recipe}"])
    validate_config(cfg)
    assert cfg.model.name and cfg.data.name and cfg.lsm.mode
    smoke = compose([f"recipe={recipe}", "debug=smoke"])
    assert smoke.trainer.max_steps == 3 and smoke.data.limit_train == 96
    validate_config(smoke)


def test_default_recipe_is_quickstart_mlp_digits_both():
    cfg = compose([], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.recipe == "quickstart"
    assert (cfg.model.name, cfg.data.name, cfg.lsm.mode) == ("mlp", "digits", "both")
    assert cfg.logger.wandb.mode == "offline"


def test_switching_the_model_of_a_recipe_keeps_that_models_own_options():
    cfg = compose(["recipe=quickstart", "model=cnn"])
    assert cfg.model.name == "cnn" and "width" not in cfg.model.kwargs
    cfg = compose(["recipe=paper/synchronicity", "model=vit"])
    assert cfg.model.name == "vit" and cfg.model.kwargs.dim == 64


def test_recipes_win_over_groups_and_command_line_wins_over_recipes():
    cfg = compose(["recipe=zoo/digits", "model=cnn"])
    assert cfg.model.name == "cnn" and list(cfg.model.kwargs.channels) == [16, 32]
    assert cfg.trainer.epochs == 6  # conf/tuning/zoo/digits/cnn.yaml wins over the recipe
    cfg = compose(["recipe=zoo/digits", "lsm=off", "trainer.epochs=2", "model=resnet"])
    assert (cfg.lsm.mode, cfg.trainer.epochs, cfg.model.name) == ("off", 2, "resnet")


def test_a_group_choice_that_a_family_file_replaces_is_named_not_lost():
    from lsm_train.recipe_source import tuning_conflicts

    overrides = ["recipe=zoo/cifar10", "model=resnet", "optim=adam"]
    cfg = compose(overrides, return_hydra_config=True)
    (msg,) = tuning_conflicts(cfg.hydra.runtime.choices, cfg.hydra.overrides.task)
    assert "optim=adam" in msg and "conf/tuning/zoo/cifar10/resnet.yaml" in msg
    assert "torch.optim.SGD" in msg
    ok = compose(overrides[:2] + ["optim.lr=0.1"], return_hydra_config=True)
    assert tuning_conflicts(ok.hydra.runtime.choices, ok.hydra.overrides.task) == []
    plain = compose(["recipe=zoo/digits", "model=mlp", "optim=sgd"], return_hydra_config=True)
    assert tuning_conflicts(plain.hydra.runtime.choices, plain.hydra.overrides.task) == []


def test_the_app_refuses_a_group_choice_a_family_file_would_replace(tmp_path):
    proc = run_app("recipe=zoo/cifar10", "model=resnet", "optim=adam", "logger=none",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "optim=adam is replaced by conf/tuning/zoo/cifar10/resnet.yaml" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- run


def test_default_recipe_runs_end_to_end_in_a_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app("debug=smoke", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["metrics.jsonl", "checkpoint.pt", "summary.png", ".hydra/config.yaml"]:
        assert (run_dir / name).is_file(), name
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    records = read_metrics(run_dir)
    keys = set().union(*records)
    assert {"step", "epoch", "train/loss", "train/acc", "val/acc", "lsm/blocks.0.act",
            "val_lsm/blocks.2.act", "guard/accept_rate", "lsm_loss/blocks.0.act"} <= keys
    assert records[-1]["step"] == 3
    assert "lsm last" in proc.stderr and "val/acc=" in proc.stderr  # the summary table


@pytest.mark.slow
def test_default_recipe_full_run(tmp_path):
    proc = run_app(f"hydra.run.dir={tmp_path}", "trainer.progress=false", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = read_metrics(tmp_path)[-1]
    assert last["val/acc"] > 0.9


ZOO_FAMILIES = ["mlp", "cnn", "dbn", "resnet", "vgg", "alexnet", "vit", "googlenet"]


@pytest.mark.parametrize("family", ZOO_FAMILIES)
def test_zoo_digits_recipe_runs_with_debug_smoke(tmp_path, family):
    cfg = compose(["recipe=zoo/digits", f"model={family}", "debug=smoke", *FAST])
    res = train_from_config(cfg, tmp_path, recipe="zoo/digits")
    assert res.status == "completed" and res.step == 3
    records = read_metrics(tmp_path)
    layer_keys = [k for k in records[-1] if k.startswith("lsm/") and k != "lsm/mean"]
    assert layer_keys and all(0.0 <= records[-1][k] <= 1.0 for k in layer_keys)
    assert (tmp_path / "summary.png").is_file()
    if family == "dbn":  # the RBM stack is pretrained before step 0
        assert records[0]["step"] == 0 and records[0]["pretrain/recon_error_1"] > 0


def test_wandb_settings_group_tags_and_resolved_config(tmp_path):
    cfg = compose(["recipe=zoo/digits", "tags=[mine]"])
    w = _wandb_settings(cfg, "zoo/digits", None, None)
    assert w["group"] == "zoo/digits" and w["job_type"] == "train"
    assert {"mine", "mlp", "digits", "lsm-both"} <= set(w["tags"])  # command line wins
    assert "zoo" in _wandb_settings(compose(["recipe=zoo/digits"]), "r", None, None)["tags"]
    assert w["mode"] == "offline" and "${" not in repr(w["config"])  # resolved
    assert w["config"]["recipe"] == "zoo/digits"
    assert _wandb_settings(cfg, "r", "2026-01-01_00-00-00_000001", None)["group"] == (
        "r/2026-01-01_00-00-00_000001"  # one group per sweep
    )
    assert _wandb_settings(compose(["logger=none"]), "r", None, None) is None


def test_logger_none_writes_no_wandb_folder_but_metrics(tmp_path):
    cfg = compose(["debug=smoke", "lsm=monitor", *FAST])
    train_from_config(cfg, tmp_path, recipe="quickstart")
    assert not (tmp_path / "wandb").exists() and read_metrics(tmp_path)


def test_a_broken_wandb_run_only_warns(tmp_path, monkeypatch):
    """wandb.log raising inside the real run object: warn, finish training, keep metrics."""
    from lsm_train import tracking

    real_init = tracking.Tracker._init_wandb

    def init_then_break(self, cfg):
        real_init(self, cfg)

        def broken(*a, **k):
            raise OSError("disk full")

        self.run.log = broken

    monkeypatch.setattr(tracking.Tracker, "_init_wandb", init_then_break)
    cfg = compose(["debug=smoke", "lsm=monitor", "trainer.progress=false"])
    with pytest.warns(RuntimeWarning, match="wandb log failed.*disk full"):
        res = train_from_config(cfg, tmp_path, recipe="quickstart")
    assert res.status == "completed" and read_metrics(tmp_path)[-1]["step"] == 3


def test_multirun_lsm_modes_sweep(tmp_path):
    proc = run_app(
        "-m", "recipe=ablation/lsm-modes", "debug=smoke", "logger=none",
        "trainer.progress=false", "hydra.sweeper.params.seed=0",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {}
    for job in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        over = (job / ".hydra" / "overrides.yaml").read_text()
        modes[job.name] = next(m for m in ["off", "loss", "guard", "both"] if f"lsm={m}" in over)
        assert read_metrics(job)[-1]["step"] == 3
    assert sorted(modes.values()) == ["both", "guard", "loss", "off"]


# ----------------------------------------------------------------------------- signals


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    args = ["lsm=monitor", "trainer.epochs=200", "logger=none", "trainer.progress=false",
            "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lsm_train", *args], cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    assert "SIGTERM received" in err and "resume=true" in err
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["step"] >= 2
    assert read_metrics(run_dir)[-1]["step"] <= state["step"]

    # resume=true with the same run folder continues from that step to a run length past it
    # (how far the killed run got depends on the machine's load: 22 steps per epoch here)
    epochs = state["step"] // 22 + 2
    cfg = compose(args[:-1] + [f"trainer.epochs={epochs}", "resume=true"])
    res = train_from_config(cfg, run_dir, recipe="quickstart")
    assert res.status == "completed" and res.step == 22 * epochs
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 22 * epochs


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override,message",
    [
        ("lsm.loss.weight=-0.1", r"lsm\.loss\.weight: expected a number >= 0, got -0\.1"),
        ("lsm.loss.tau=0", r"lsm\.loss\.tau: expected a number > 0, got 0"),
        ("lsm.loss.tau=-1.0", r"lsm\.loss\.tau: expected a number > 0"),
        ("lsm.monitor.holdout=1.5", r"lsm\.monitor\.holdout"),
        ("optim.lr=0", r"optim\.lr: expected a finite number > 0"),
        ("optim.lr=inf", r"optim\.lr: expected a finite number > 0, got inf"),
        ("optim.lr=nan", r"optim\.lr: expected a finite number > 0, got nan"),
        ("trainer.grad_clip=-1", r"trainer\.grad_clip: expected null or a finite number > 0"),
        ("trainer.grad_clip=0", r"trainer\.grad_clip: expected null or a finite number > 0"),
        ("optim.weight_decay=-1", r"optim\.weight_decay: expected a finite number >= 0"),
        ("trainer.epochs=0", r"trainer\.epochs: expected an integer >= 1"),
        ("lsm.mode=sometimes", r"lsm\.mode: expected one of"),
        ("lsm.guard.scope=block", r"lsm\.guard\.scope: expected step or window, got 'block'"),
        ("lsm.guard.scope=window lsm.guard.max_retries=2",
         r"lsm\.guard\.max_retries: expected 0 with lsm\.guard\.scope=window"),
    ],
)
def test_invalid_values_fail_before_training(tmp_path, override, message):
    cfg = compose([*override.split(), *FAST])
    with pytest.raises(ValueError, match=message):
        train_from_config(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_layer_pattern_matching_nothing_fails_before_training(tmp_path):
    cfg = compose(["lsm.layers=[blocks.*.act,nothing_here*]", *FAST])
    with pytest.raises(ValueError, match="nothing_here"):
        train_from_config(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_recipe_and_group_option_give_hydras_message():
    with pytest.raises(MissingConfigException, match=r"recipe/nope[\s\S]*quickstart"):
        compose(["recipe=nope"])
    with pytest.raises((MissingConfigException, ConfigCompositionException),
                       match=r"lsm/sometimes[\s\S]*both"):
        compose(["lsm=sometimes"])


def test_bad_value_on_the_command_line_exits_2_with_a_message(tmp_path):
    proc = run_app("lsm.loss.weight=-1", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "lsm-train: error: invalid configuration" in proc.stderr
    assert "lsm.loss.weight: expected a number >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mnist_and_cifar10_files_run_through_the_app(tmp_path):
    from test_data import make_cifar, make_mnist

    make_mnist(tmp_path / "data", n_train=40, n_test=10)
    cfg = compose(["recipe=zoo/digits", "model=cnn", "data=mnist",
                   f"data.root={tmp_path / 'data'}", "debug=smoke", "data.batch_size=8", *FAST])
    with pytest.warns(RuntimeWarning, match="cross-fitting needs at least 2 classes"):
        res = train_from_config(cfg, tmp_path / "mnist", recipe="zoo/digits")
    assert res.status == "completed" and res.step == 3
    last = read_metrics(tmp_path / "mnist")[-1]
    # 10 test images, one per class: too few to cross-fit, logged as null, training goes on
    assert last["val_lsm/fc.act"] is None and last["lsm/fc.act"] is not None
    make_cifar(tmp_path / "data", per_batch=8, n_test=8)
    cfg = compose(["recipe=zoo/digits", "model=resnet", "data=cifar10",
                   f"data.root={tmp_path / 'data'}",
                   "data.augment=true", "debug=smoke", "data.batch_size=8", *FAST])
    res = train_from_config(cfg, tmp_path / "cifar", recipe="zoo/digits")
    assert res.status == "completed" and res.step == 3


def test_a_mistyped_data_key_is_a_setup_error_naming_it(tmp_path):
    from lsm_train.app import SetupError

    cfg = compose(["+data.tset_fraction=0.3", "debug=smoke", *FAST])
    with pytest.raises(SetupError, match=r"data=digits: unknown option\(s\) \['tset_fraction'\]; "
                                         r"accepted: test_fraction, split_seed"):
        train_from_config(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_from_config(compose(["trainer=gpu", *FAST]), tmp_path)


def test_setup_failures_are_setup_errors_before_any_step(tmp_path):
    from lsm_train.app import SetupError

    cfg = compose(["data=mnist", f"data.root={tmp_path / 'empty'}", *FAST])
    with pytest.raises(SetupError, match=r"data\.download=true"):
        train_from_config(cfg, tmp_path / "a")
    cfg = compose(["+model.kwargs.wdith=3", *FAST])  # a typo in a model option
    with pytest.raises(SetupError, match=r"unknown option[\s\S]*~model\.kwargs"):
        train_from_config(cfg, tmp_path / "b")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra", [["data.shape=vector"],
                                   ["data.shape=image", "model=cnn"]])
def test_synthetic_data_runs_through_the_app(tmp_path, extra):
    cfg = compose(["data=synthetic", "data.overlap=0.2", "debug=smoke", *extra, *FAST])
    res = train_from_config(cfg, tmp_path)
    assert res.status == "completed" and res.step == 3
    assert 0.0 <= read_metrics(tmp_path)[-1]["val/acc"] <= 1.0
