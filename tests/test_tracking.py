"""Tracker: metrics.jsonl always, real wandb in offline mode, failures only warn."""

from __future__ import annotations

import json
import math

import pytest

from lsm_train.tracking import Tracker, read_metrics


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_metrics_jsonl_one_object_per_step(tmp_path):
    with Tracker(tmp_path) as tr:
        tr.log({"train/loss": 1.5, "epoch": 0}, step=1)
        # each line is flushed: readable while the run is still going
        assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 1.5, "epoch": 0}]
        tr.log({"train/loss": math.nan, "val/acc": 0.5}, step=2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s) for s in lines] == [
        {"step": 1, "train/loss": 1.5, "epoch": 0},
        {"step": 2, "train/loss": None, "val/acc": 0.5},  # NaN -> null, still valid JSON
    ]


def test_resume_drops_records_after_the_checkpoint_step(tmp_path):
    with Tracker(tmp_path) as tr:
        for s in range(1, 6):
            tr.log({"x": s}, step=s)
    with Tracker(tmp_path, resume_step=3) as tr:
        tr.log({"x": 40}, step=4)
    got = [(r["step"], r["x"]) for r in read_metrics(tmp_path)]
    assert got == [(1, 1), (2, 2), (3, 3), (4, 40)]
    with Tracker(tmp_path):  # a new run (no resume) starts a fresh file
        pass
    assert read_metrics(tmp_path) == []


def test_offline_wandb_run_folder_is_written(tmp_path):
    cfg = {"mode": "offline", "group": "quickstart", "job_type": "train", "tags": ["t"],
           "config": {"lsm": {"mode": "both"}}}
    tr = Tracker(tmp_path, wandb=cfg)
    assert tr.run is not None and tr.wandb_id
    tr.log({"train/acc": 0.5}, step=1)
    tr.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))


def test_a_failing_wandb_log_warns_once_and_training_goes_on(tmp_path):
    tr = Tracker(tmp_path, wandb={"mode": "offline"})
    assert tr.run is not None

    def broken(*args, **kwargs):
        raise ConnectionError("network down")

    tr.run.log = broken  # the real run object, its log method broken
    with pytest.warns(RuntimeWarning, match="wandb log failed.*network down"):
        tr.log({"a": 1.0}, step=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure does not warn again
        tr.log({"a": 2.0}, step=2)
    tr.close()
    assert tr.failures == 2
    assert [r["a"] for r in read_metrics(tmp_path)] == [1.0, 2.0]


def test_a_failing_wandb_init_warns_and_logs_locally(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("cannot start")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="wandb init failed"):
        tr = Tracker(tmp_path, wandb={"mode": "online"})
    assert tr.run is None
    tr.log({"a": 1.0}, step=1)
    tr.close()
    assert read_metrics(tmp_path) == [{"step": 1, "a": 1.0}]
