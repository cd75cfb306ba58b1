"""A run never lies and never loses data: resume continues exactly the run it names or
refuses, a broken metrics tail or checkpoint is handled, only finite checkpoints are
written, wandb ends with the run's status, one process per run folder, clear messages.

Kills are simulated with truncated files, a full disk with ``RLIMIT_FSIZE`` in a
subprocess; wandb is real (offline) and its run file is read back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _wandb_offline import offline_run

from lsm_train.app import SetupError, compose, train_from_config
from lsm_train.checkpoint import load_checkpoint, save_checkpoint
from lsm_train.tracking import read_metrics
from lsm_train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BASE = ["logger=none", "trainer.progress=false", "trainer.plots=false", "debug=smoke"]
FAST = [*BASE, "lsm=off"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               HYDRA_FULL_ERROR="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(run_dir: Path, *extra: str, fast=FAST):
    return train_from_config(compose([*fast, *extra]), run_dir, recipe="quickstart")


LIMIT_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""


def _python_limited(limit: int, code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python whose files may not grow past ``limit`` bytes."""
    return subprocess.run(
        [sys.executable, "-c", LIMIT_FSIZE + textwrap.dedent(code), str(limit), *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _run_main(monkeypatch, *argv: str) -> int:
    """``lsm-train <argv>`` in this process; its exit status."""
    from lsm_train.app import main

    monkeypatch.setattr(sys, "argv", ["lsm-train", *argv])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ------------------------------------------------------------------ 1: resume names a run


def test_resume_true_without_a_checkpoint_refuses_and_leaves_other_runs_alone(tmp_path):
    old = tmp_path / "2026-01-01_00-00-00_000001"
    _run(old)
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    new = tmp_path / "2026-01-02_00-00-00_000001"
    with pytest.raises(SetupError, match=r"resume=true: no checkpoint\.pt in the run folder .*"
                                         r"2026-01-02.*resume=false"):
        _run(new, "resume=true")
    after = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    assert after == before  # the newest sibling is untouched
    assert not (new / "metrics.jsonl").exists()


def test_resume_from_a_file_loads_that_file(tmp_path):
    from lsm_train.resume import resolve_checkpoint

    run = tmp_path / "run"
    _run(run, "trainer.max_steps=2")
    shutil.copy(run / "checkpoint.pt", run / "step2.pt")
    (run / "checkpoint.pt").write_bytes(b"not this one")
    res = _run(run, "trainer.max_steps=3", f"resume={run / 'step2.pt'}")
    assert res.status == "completed" and res.step == 3
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    assert resolve_checkpoint(str(run), tmp_path) == run / "checkpoint.pt"
    with pytest.raises(ValueError, match="that path does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)


@pytest.mark.parametrize("override,key,values", [
    ("optim.lr=0.5", "optim.lr", r"0\.003 in the checkpoint, 0\.5 now"),
    ("optim=sgd", "optim._target_", r"'torch\.optim\.AdamW' in the checkpoint, "
                                    r"'torch\.optim\.SGD' now"),
])
def test_a_config_change_at_resume_is_refused_naming_the_keys(tmp_path, override, key, values):
    _run(tmp_path, "trainer.max_steps=2")
    ckpt = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(SetupError, match=rf"cannot change: .*{key}: {values}"):
        _run(tmp_path, "resume=true", override)
    assert (tmp_path / "checkpoint.pt").read_bytes() == ckpt


def test_run_length_and_logging_changes_are_applied_at_resume(tmp_path):
    _run(tmp_path, "trainer.max_steps=2")
    cfg = compose([*FAST, "resume=true", "trainer.max_steps=4", "trainer.log_every_n_steps=2"])
    trainer = Trainer(cfg, tmp_path, resume_from=tmp_path / "checkpoint.pt")
    assert trainer.resume_applied == ["resume", "trainer.log_every_n_steps", "trainer.max_steps"]
    assert trainer.step == 2 and trainer.total_steps == 3  # 96 samples / 32: epochs=1 caps


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    _run(tmp_path, "trainer.max_steps=2")
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["world_size"] == 1
    state["world_size"] = 2  # as written by rank 0 of a two-process run
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(SetupError, match=r"written by 2 process\(es\) and this run has 1"):
        _run(tmp_path, "resume=true")


def test_resume_keeps_the_runs_own_hydra_config(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["logger=none", "trainer.progress=false", "trainer.plots=false", "lsm=off",
            "debug=smoke", f"hydra.run.dir={run}"]
    assert _run_main(monkeypatch, *args, "trainer.max_steps=2") == 0
    original = (run / ".hydra" / "config.yaml").read_text()
    assert _run_main(monkeypatch, *args, "resume=true", "trainer.max_steps=3") == 0
    assert (run / ".hydra" / "config.yaml").read_text() == original
    (resumed,) = (run / ".hydra").glob("resume-*/config.yaml")
    assert "max_steps: 3" in resumed.read_text() and "max_steps: 2" in original


# ------------------------------------------------------------------ 2: metrics.jsonl


def test_a_truncated_last_metrics_line_is_dropped_at_resume(tmp_path):
    _run(tmp_path, "trainer.max_steps=2")
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "train/lo')  # what kill -9 during a write leaves
    with pytest.warns(UserWarning, match=r"truncated last line \(killed run\?\) \(line 3\)"):
        res = _run(tmp_path, "resume=true", "trainer.max_steps=3")
    assert res.status == "completed"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [1, 2, 3]


def test_a_broken_line_before_the_last_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_metrics(tmp_path, strict=True)


def test_the_resume_rewrite_of_metrics_is_atomic_under_a_file_size_limit(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": "y" * 60}) + "\n" for s in range(100)))
    before = path.read_bytes()
    proc = _python_limited(len(before) // 4, """
        from lsm_train.tracking import MetricsWriteError, Tracker
        try:
            Tracker(sys.argv[2], resume_step=90)
        except MetricsWriteError as err:
            print("refused:", err)
    """, str(tmp_path))
    assert "refused:" in proc.stdout and "the file is unchanged" in proc.stdout, proc.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ------------------------------------------------------------------ 3: finite checkpoints


def _small(*extra):
    return compose(["recipe=quickstart", "logger=none", "trainer.progress=false",
                    "trainer.plots=false", "lsm=off", "data.limit_train=96",
                    "data.limit_test=32", "data.batch_size=32", "trainer.epochs=3",
                    "trainer.log_every_n_steps=1", "lsm.monitor.probe_size=32",
                    "lsm.monitor.test_size=32", *extra])


def test_an_infinite_lr_writes_no_checkpoint_and_says_so(tmp_path):
    t = Trainer(_small("optim.lr=inf", "data.limit_train=32"), tmp_path)  # 1 step an epoch
    res = t.fit()
    assert res.status == "nan" and res.step == 1
    assert not (tmp_path / "checkpoint.pt").exists()
    assert "parameters are not finite after step 1" in res.message
    assert "No checkpoint was written yet" in res.message


def test_blown_up_weights_are_never_checkpointed(tmp_path):
    t = Trainer(_small(), tmp_path)  # 3 steps an epoch, a checkpoint at steps 3, 6, 9

    def blow_up(opt, args, kwargs):
        if t.step == 5:  # the update of step 6, the last of epoch 2
            with torch.no_grad():
                next(t.module.parameters()).fill_(float("inf"))

    t.optimizer.register_step_post_hook(blow_up)
    res = t.fit()
    assert res.status == "nan" and res.step == 6
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert f"Last good checkpoint: {tmp_path / 'checkpoint.pt'} (step 3)" in res.message


# ------------------------------------------------------------------ 4: wandb status


def _poison_after(n_steps: int):
    from lsm_train.models import create_model

    def factory(bundle):
        model = create_model("mlp", num_classes=bundle.num_classes,
                             in_channels=bundle.in_channels, image_size=bundle.image_size,
                             width=16, depth=2)
        calls = {"n": 0}

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] > n_steps:
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    return factory


def test_the_wandb_run_of_a_diverged_run_ends_failed_with_plot_and_summary(tmp_path):
    cfg = compose(["debug=smoke", "lsm=off", "trainer.progress=false", "trainer.max_steps=3"])
    res = train_from_config(cfg, tmp_path, recipe="quickstart", model_factory=_poison_after(2))
    assert res.status == "nan"
    run = offline_run(tmp_path)
    assert run["exit_code"] == 1
    assert run["summary"]["run/status"] == "nan"
    assert "train/loss" in run["summary"]  # the final summary was logged
    assert any(h.get("plots/summary._type") == "image-file" for h in run["history"])  # the plot


def _sigterm_on_second_training_forward(model):
    """``model`` sends this process SIGTERM at its second forward in training mode."""
    calls = {"n": 0}

    def hook(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    model.register_forward_pre_hook(hook)
    return model


def test_the_wandb_run_of_a_stopped_run_ends_with_the_signal_status(tmp_path):
    cfg = compose(["debug=smoke", "lsm=off", "trainer.progress=false", "trainer.plots=false",
                   "trainer.max_steps=3"])
    factory = _poison_after(10**9)

    def killing_factory(bundle):
        return _sigterm_on_second_training_forward(factory(bundle))

    res = train_from_config(cfg, tmp_path, recipe="quickstart", model_factory=killing_factory)
    assert res.status == "interrupted" and res.step == 2
    run = offline_run(tmp_path)
    assert run["exit_code"] == 128 + signal.SIGTERM
    assert [h["step"] for h in run["history"] if "train/loss" in h] == [1, 2]  # flushed


# ------------------------------------------------------------------ 5: one process per run


def test_a_second_process_in_a_run_folder_is_refused(tmp_path):
    from lsm_train.runlock import RunLock

    _run(tmp_path, "trainer.max_steps=2")
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with RunLock(tmp_path):  # another process holds the folder (a separate open file)
        with pytest.raises(SetupError, match=r"is in use by lsm-train pid \d+"):
            _run(tmp_path, "resume=true", "trainer.max_steps=3")
        with pytest.raises(SetupError, match="is in use"):
            _run(tmp_path)  # a new run in that folder too
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert _run(tmp_path, "resume=true", "trainer.max_steps=3").step == 3  # released


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    from lsm_train.runlock import RunLock, RunLockedError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lsm_train.runlock import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
         str(tmp_path)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    with RunLock(tmp_path) as lock:
        assert lock.held


# ------------------------------------------------------------------ 7: multirun


def test_a_multirun_with_a_diverged_job_exits_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lsm_train", "-m", "optim=sgd", "optim.lr=0.01,1e30", *FAST,
         "trainer.num_threads=1", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "loss is not finite" in proc.stderr
    steps = {job.name: read_metrics(job)[-1]["step"] for job in tmp_path.iterdir()
             if job.is_dir()}
    assert steps["0"] == 3 and steps["1"] < 3  # both jobs ran; the second diverged


# ------------------------------------------------------------------ messages


def _checkpoint_bytes(tmp_path: Path) -> bytes:
    _run(tmp_path / "src", "trainer.max_steps=1")
    return (tmp_path / "src" / "checkpoint.pt").read_bytes()


def test_an_unreadable_checkpoint_is_named_with_a_hint(tmp_path):
    from lsm_train.checkpoint import CheckpointReadError

    good = _checkpoint_bytes(tmp_path)
    for name, data in [("empty", b""), ("garbage", b"\x00garbage" * 10),
                       ("truncated", good[: len(good) // 2])]:
        path = tmp_path / name / "checkpoint.pt"
        path.parent.mkdir()
        path.write_bytes(data)
        with pytest.raises(CheckpointReadError, match=rf"{path} is unreadable.*resume=false"):
            load_checkpoint(path)
    with pytest.raises(SetupError, match=r"truncated.*checkpoint\.pt is unreadable"):
        _run(tmp_path / "truncated", "resume=true")
    import numpy as np

    legacy = tmp_path / "legacy.pt"  # the numpy RNG state as an array, as before
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, legacy)
    with pytest.raises(CheckpointReadError, match=r"legacy\.pt holds objects the safe loader "
                                                  r"refuses.*weights_only=False"):
        load_checkpoint(legacy)


def test_the_checkpoint_loads_with_the_safe_loader(tmp_path):
    res = _run(tmp_path, "lsm=both", "sched=cosine", fast=BASE)
    assert res.status == "completed"
    state = torch.load(tmp_path / "checkpoint.pt")  # weights_only=True, torch's default
    assert state["step"] == 3 and state["reg"] is not None and state["scheduler"] is not None
    assert state["optimizer"]["guard"]["stats"]  # the guard's counters too


def test_a_file_size_limit_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    _run(run, "trainer.max_steps=2")
    previous = (run / "checkpoint.pt").read_bytes()
    proc = _python_limited(len(previous) // 2, """
        from lsm_train.app import main
        sys.argv = ["lsm-train", *sys.argv[2:]]
        main()
    """, *FAST, "resume=true", "trainer.max_steps=3", f"hydra.run.dir={run}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "lsm-train: error: [Errno 27] could not write the checkpoint" in proc.stderr
    assert "the previous checkpoint is kept" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "checkpoint.pt").read_bytes() == previous
    assert not (run / "checkpoint.pt.tmp").exists()


def test_a_read_only_run_folder_is_reported_before_hydra_writes(tmp_path):
    if os.geteuid() == 0:  # root writes into a chmod 555 folder: use sysfs, which refuses
        ro = Path("/sys")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    proc = subprocess.run(
        [sys.executable, "-m", "lsm_train", *FAST, f"hydra.run.dir={ro / 'lsm_run'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"the run folder {ro / 'lsm_run'} cannot be written" in proc.stderr
    assert "hydra.run.dir=<folder>" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ro / "lsm_run").exists()


def test_sigterm_without_checkpointing_does_not_claim_a_checkpoint(tmp_path):
    t = Trainer(_small("trainer.checkpoint=false"), tmp_path)
    _sigterm_on_second_training_forward(t.model)
    res = t.fit()
    assert res.status == "interrupted" and res.step == 2
    assert "checkpoint written" not in res.message
    assert "No checkpoint is written (trainer.checkpoint=false)" in res.message
    assert not (tmp_path / "checkpoint.pt").exists()


def test_an_unknown_recipe_lists_the_recipes_and_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _run_main(monkeypatch, "recipe=zoo/nope") == 2
    err = capsys.readouterr().err
    assert "unknown recipe zoo/nope" in err and "zoo/digits" in err and "quickstart" in err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,message", [
    ("lsm.guard.tau=0", r"lsm\.guard\.tau: expected a finite number > 0, got 0"),
    ("+lsm.guard.foo=1", r"lsm\.guard\.foo: unknown option"),
    ("+optim.momentum_typo=1", r"optim\.momentum_typo: unknown option"),
])
def test_config_errors_name_the_full_key(tmp_path, override, message):
    with pytest.raises(SetupError, match=message):
        _run(tmp_path, override, "lsm=guard", fast=BASE)


def test_nan_in_the_data_is_reported_as_bad_data(tmp_path):
    t = Trainer(_small(), tmp_path)
    t.data.train.x[40] = float("nan")  # a sample of the second batch of epoch 0
    order = t._epoch_order(0)
    batch = int((order == 40).nonzero()) // t.batch_size
    res = t.fit()
    assert res.status == "nan" and res.step == batch
    assert "1 of 32 input samples of the batch hold NaN or inf" in res.message
    assert "The data is bad" in res.message and "optim.lr" not in res.message


def test_a_config_error_leaves_no_run_folder_and_a_run_prints_its_folder(
    tmp_path, monkeypatch, capsys
):
    bad = tmp_path / "bad"
    assert _run_main(monkeypatch, "lsm.loss.weight=-1", "logger=none",
                     f"hydra.run.dir={bad}") == 2
    assert "lsm.loss.weight: expected a number >= 0" in capsys.readouterr().err
    assert not bad.exists()
    good = tmp_path / "good"
    assert _run_main(monkeypatch, *FAST, f"hydra.run.dir={good}") == 0
    assert f"lsm-train: run folder: {good}" in capsys.readouterr().err


def test_a_full_wandb_folder_gives_one_warning_not_a_traceback_per_record(tmp_path):
    """wandb's debug.log past a file-size limit (metrics.jsonl stays below it)."""
    proc = _python_limited(2500, """
        from lsm_train.app import main
        sys.argv = ["lsm-train", *sys.argv[2:]]
        main()
    """, "trainer.progress=false", "lsm=off", "data.limit_train=640", "data.batch_size=16",
        "trainer.max_steps=8", "trainer.log_every_n_steps=4", "trainer.monitor_every_n_steps=0",
        "trainer.checkpoint=false", "trainer.plots=false", "hydra.output_subdir=null",
        f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("logs/debug.log failed (OSError: [Errno 27] File too large)") == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [4, 8]
