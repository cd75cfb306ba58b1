"""Sweeps with Hydra's launchers: a two-job joblib sweep logs both jobs, one wandb group per
sweep, every wandb run finished; sweep folders carry microseconds; the Slurm presets compose;
a parameter mismatch across DDP ranks makes the app exit 3 with a message."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lsm_train.app import compose
from lsm_train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}$")


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(not _has("hydra_plugins.hydra_joblib_launcher"),
                    reason="needs hydra-joblib-launcher (pip install 'lsm_train[launchers]')")
def test_joblib_sweep_of_two_jobs_logs_both_in_one_wandb_group(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lsm_train", "-m", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", "seed=0,1", "debug=smoke", "trainer.progress=false",
         "trainer.plots=false", "trainer.num_threads=1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out
    sweeps = list((tmp_path / "multirun" / "quickstart").iterdir())
    assert len(sweeps) == 1 and STAMP.match(sweeps[0].name), sweeps
    group = f"quickstart/{sweeps[0].name}".encode()
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for seed, job in enumerate(jobs):
        assert f"seed={seed}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert read_metrics(job)[-1]["step"] == 3
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        assert group in next(runs[0].glob("run-*.wandb")).read_bytes()  # the sweep's group
        log = (runs[0] / "logs" / "debug.log").read_text()
        assert "finishing run" in log  # each job closed its wandb run


def test_sweep_and_run_folders_carry_microseconds():
    cfg = compose([], return_hydra_config=True)
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    for key in ("run", "sweep"):
        assert hydra[key]["dir"].endswith("${now:%Y-%m-%d_%H-%M-%S_%f}")


@pytest.mark.skipif(not _has("hydra_plugins.hydra_submitit_launcher"),
                    reason="needs hydra-submitit-launcher (pip install 'lsm_train[launchers]')")
def test_slurm_presets_compose():
    one = compose(["hydra/launcher=slurm_gpu"], return_hydra_config=True).hydra.launcher
    assert one._target_.endswith("SlurmLauncher")
    assert (one.gpus_per_node, one.tasks_per_node) == (1, 1)
    ddp = compose(["hydra/launcher=slurm_ddp", "trainer=ddp",
                   "hydra.launcher.partition=gpu"], return_hydra_config=True)
    la = ddp.hydra.launcher
    assert la.gpus_per_node == la.tasks_per_node == 4 and la.partition == "gpu"
    assert ddp.trainer.strategy == "ddp" and ddp.lsm.loss.gather is True
    assert re.match(r"multirun/quickstart/[\d_-]+/\.submitit/%j$", la.submitit_folder)


def test_a_parameter_mismatch_exits_3_with_a_message(tmp_path, monkeypatch, capsys):
    import lsm_train.trainer as trainer_mod
    from lsm_train.app import main
    from lsm_train.distributed import ParameterMismatchError

    def boom(self):
        raise ParameterMismatchError("parameters differ across the 2 ranks: fc.weight")

    monkeypatch.setattr(trainer_mod.Trainer, "check_replicas", boom)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [
        "lsm-train", "debug=smoke", "logger=none", "trainer.progress=false",
        "trainer.plots=false", "trainer.max_steps=1", "lsm=off",
        f"hydra.run.dir={tmp_path / 'run'}",
    ])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 3
    err = capsys.readouterr().err
    assert "lsm-train: error: parameters differ across the 2 ranks: fc.weight" in err


def test_a_multirun_under_torchrun_is_refused(monkeypatch, capsys):
    from lsm_train.app import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["lsm-train", "-m", "seed=0,1"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "multirun cannot run under torchrun" in capsys.readouterr().err


def test_a_sweep_over_the_model_of_the_zoo_recipe_gives_each_job_its_family(
        tmp_path, monkeypatch):
    from lsm_train.app import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(sys, "argv", [
        "lsm-train", "-m", "recipe=zoo/digits", "model=cnn,vit", "debug=smoke", "lsm=off",
        "logger=none", "trainer.progress=false", "trainer.plots=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ])
    main()
    jobs = {}
    for job in sorted((tmp_path / "sweep").iterdir()):
        if job.is_dir() and job.name.isdigit():
            cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
            jobs[cfg.model.name] = cfg
            assert read_metrics(job)[-1]["step"] == 3
    assert sorted(jobs) == ["cnn", "vit"]
    # debug=smoke sets trainer.epochs; the families' own values show in sched and optim
    assert (jobs["cnn"].sched.min_lr_ratio, jobs["cnn"].optim.lr) == (1.0, 3e-3)
    assert (jobs["vit"].sched.min_lr_ratio, jobs["vit"].optim.lr) == (0.0, 2e-3)
    assert jobs["vit"].model.kwargs.dropout == 0.1 and "dropout" not in jobs["cnn"].model.kwargs
