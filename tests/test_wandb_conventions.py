"""wandb conventions, read back from real offline runs: run names unique within a sweep,
counters as integers, every metric charted against ``step``, layer keys that sort in
network order (docs/app.md, wandb)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from _wandb_offline import offline_run
from torch import nn

from lsm_train.app import _wandb_settings, compose
from lsm_train.run_names import job_suffix
from lsm_train.runlog import is_counter
from lsm_train.tracking import Tracker, read_metrics, wandb_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


RECORD = {
    "epoch": 1, "train/loss": 1.0, "train/acc": 0.5, "lr": 0.1,
    "guard/checks": 3.0, "guard/accepted": 2.0, "guard/rejected": 1.0,
    "guard/accept_rate": 2.0 / 3.0, "time/monitor_evaluations": 2, "time/elapsed_s": 4.0,
    "lsm/features.3": 0.5, "lsm/features.10": 0.75, "lsm/mean": 0.625,
}


def test_counters_reach_wandb_and_metrics_jsonl_as_integers(tmp_path):
    tr = Tracker(tmp_path, wandb={"mode": "offline"})
    assert tr.run is not None
    sent, real_log = [], tr.run.log

    def recording_log(data, *args, **kwargs):  # the real run's log, watched
        sent.append(dict(data))
        return real_log(data, *args, **kwargs)

    tr.run.log = recording_log
    tr.log(RECORD, step=4)
    tr.summary({"guard/checks": 3.0, "epoch": 2.0, "train/loss": 1.0})
    tr.close()
    counters = ["step", "epoch", "guard/checks", "guard/accepted", "guard/rejected",
                "time/monitor_evaluations"]
    (data,) = sent
    assert all(type(data[k]) is int for k in counters), data
    assert all(type(data[k]) is float for k in ["train/loss", "guard/accept_rate", "lr"])
    run = offline_run(tmp_path)
    (hist,) = run["history"]
    assert (hist["step"], hist["guard/checks"], hist["time/monitor_evaluations"]) == (4, 3, 2)
    # the summary's JSON keeps 3 apart from 3.0 (wandb's history encoder writes both as 3)
    summary = run["summary"]
    assert type(summary["guard/checks"]) is int and type(summary["epoch"]) is int
    assert type(summary["train/loss"]) is float
    line = (tmp_path / "metrics.jsonl").read_text()
    assert '"guard/checks": 3,' in line and '"train/loss": 1.0,' in line


def test_counter_keys():
    assert all(is_counter(k) for k in ["step", "epoch", "guard/checks", "guard/forced",
                                       "time/monitor_evaluations"])
    assert not any(is_counter(k) for k in ["guard/accept_rate", "guard/recent_accept_rate",
                                           "train/loss", "lsm/3", "time/monitor_s", "guard/"])


def test_every_metric_is_charted_against_step(tmp_path):
    with Tracker(tmp_path, wandb={"mode": "offline"}) as tr:
        tr.log({"train/loss": 0.5}, step=7)
    metrics = offline_run(tmp_path)["metrics"]
    assert {"name": "step", "glob_name": "", "step_metric": ""} in metrics
    assert {"name": "", "glob_name": "*", "step_metric": "step"} in metrics


def test_a_failing_define_metric_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no metrics today")

    monkeypatch.setattr(wandb.Run, "define_metric", broken)
    with pytest.warns(RuntimeWarning, match="wandb define_metric failed.*no metrics today"):
        tr = Tracker(tmp_path, wandb={"mode": "offline"})
    assert tr.run is not None
    tr.log({"train/loss": 0.5}, step=1)
    tr.close()
    run = offline_run(tmp_path)
    assert run["history"][0]["train/loss"] == 0.5 and run["metrics"] == []


def test_layer_keys_sort_in_network_order_in_wandb_only(tmp_path):
    with Tracker(tmp_path, wandb={"mode": "offline"}) as tr:
        tr.log(RECORD, step=1)
    (hist,) = offline_run(tmp_path)["history"]
    assert {"lsm/features.03", "lsm/features.10", "lsm/mean"} <= set(hist)
    assert hist["lsm/features.03"] == 0.5
    local = read_metrics(tmp_path)[0]  # the local file keeps the model's names
    assert {"lsm/features.3", "lsm/features.10"} <= set(local) and "lsm/features.03" not in local


def test_wandb_key_order_is_the_module_order():
    """Names of a real 12-layer Sequential and of nested blocks, in named_modules order."""
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(12)])
    for prefix in ["lsm/", "val_lsm/", "lsm_loss/"]:
        names = [prefix + n for n, m in blocks.named_modules() if isinstance(m, nn.ReLU)]
        assert sorted(names) != names  # "blocks.10" < "blocks.2": the plain names do not
        assert sorted(map(wandb_key, names)) == [wandb_key(n) for n in names]
    assert wandb_key("lsm/layer1.0.conv1") == "lsm/layer1.00.conv1"  # "layer1" is a name
    for key in ["lsm/mean", "val_lsm/mean", "train/loss", "guard/checks", "pretrain/x.1"]:
        assert wandb_key(key) == key


# ----------------------------------------------------------------------------- run names


def test_job_suffix_lists_the_swept_values_and_the_job_number():
    task = ["recipe=zoo/cnn-digits", "debug=smoke", "optim.lr=0.01", "lsm=off", "seed=0"]
    assert job_suffix(task, {"optim.lr", "lsm"}, 1) == "lr=0.01-j1"  # lsm: in the base name
    assert job_suffix(task, set(), 3) == "debug=smoke-lr=0.01-recipe=zoo_cnn-digits-j3"
    assert job_suffix(["+model.tag=a b/c"], set(), 0) == "tag=a_b_c-j0"  # sanitized


def test_run_name_of_a_target_model_and_a_user_name():
    cfg = compose(["model._target_=pkg.nets.make_net", "lsm=off", "seed=2"])
    w = _wandb_settings(cfg, "r", None, None)
    assert w["name"] == "make_net-digits-off-s2" and "make_net" in w["tags"]
    cfg = compose(["logger.wandb.name=mine"])
    assert _wandb_settings(cfg, "r", "sweep-folder", None)["name"] == "mine"


def test_multirun_jobs_get_distinct_deterministic_names(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "lsm_train", "-m", "recipe=zoo/digits", "model=cnn",
         "debug=smoke", "lsm=off", "optim.lr=0.1,0.01", "trainer.progress=false",
         "trainer.plots=false", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {}
    for job in sorted(p for p in tmp_path.iterdir() if p.is_dir()):
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        lr = next(v for v in ["0.1", "0.01"] if f"optim.lr={v}\n" in overrides)
        names[lr] = offline_run(job)["name"]
    assert names == {"0.1": "cnn-digits-off-s0-lr=0.1-j0",
                     "0.01": "cnn-digits-off-s0-lr=0.01-j1"}


def test_no_warning_from_a_healthy_offline_run(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with Tracker(tmp_path, wandb={"mode": "offline"}) as tr:
            tr.log(RECORD, step=1)
            tr.summary({"lsm/features.3": 0.5})
    assert offline_run(tmp_path)["summary"]["lsm/features.03"] == 0.5


def test_an_app_run_logs_int_guard_counters_and_padded_layer_keys(tmp_path):
    """The trainer's own records (guard counters built as floats) through the app."""
    from lsm_train.app import train_from_config

    cfg = compose(["debug=smoke", "lsm=both", "trainer.progress=false", "trainer.plots=false"])
    res = train_from_config(cfg, tmp_path, recipe="quickstart")
    assert res.status == "completed"
    run = offline_run(tmp_path)
    local = read_metrics(tmp_path)[-1]
    layers = [k for k in local if k.startswith("lsm/") and k != "lsm/mean"]
    assert layers and all(wandb_key(k) in run["history"][-1] for k in layers)
    assert {"name": "", "glob_name": "*", "step_metric": "step"} in run["metrics"]
    summary = run["summary"]
    assert type(summary["guard/checks"]) is int and summary["guard/checks"] >= 1
    assert type(summary["time/monitor_evaluations"]) is int and type(summary["epoch"]) is int
    assert type(local["guard/checks"]) is int
    assert run["name"] == f"{cfg.model.name}-{cfg.data.name}-both-s{cfg.seed}"
