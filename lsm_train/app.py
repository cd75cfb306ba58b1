"""``lsm-train`` / ``python -m lsm_train``: the Hydra 1.3 application.

    lsm-train                                   # recipe=quickstart: MLP on digits, lsm=both
    lsm-train recipe=zoo/digits model=resnet lsm=guard trainer.epochs=3
    lsm-train -m recipe=ablation/lsm-modes      # off, loss, guard, both as one multirun
    lsm-train --recipes                         # every recipe= value, with a line about it

Config groups live in ``conf/`` (model, data, optim, sched, lsm, logger, trainer, debug,
hydra, and ``tuning/<recipe>/<model>.yaml``: a recipe's settings for one model family,
applied after the recipe when the file exists); experiments in ``recipes/``
(``# @package _global_``). ``recipes/`` is exposed as
the config group ``recipe`` by :class:`RecipeConfigSource`, a Hydra config source for the
``lsmrecipes://`` search-path scheme (:mod:`lsm_train.recipe_source`), so
``recipe=zoo/digits`` selects ``recipes/zoo/digits.yaml``. Both folders are found in a
source checkout (next to the package) and in an installed wheel (inside the package).

Each run writes to Hydra's run folder: ``metrics.jsonl``, ``checkpoint.pt``,
``summary.png``, ``wandb/`` (offline unless ``WANDB_MODE=online``) and ``.hydra/``; one
process at a time (a file lock), ``resume`` continues exactly the run it names or refuses.
Exit status: 0 completed, 1 diverged or a failed write, 2 bad setup, 3 replicas differ,
128 + N stopped by signal N. Run folders, resume rules and messages: ``docs/runs.md``.

Data parallel: ``torchrun --nproc_per_node=N -m lsm_train trainer=ddp ...``. :func:`main`
creates the process group from torchrun's variables before Hydra starts and gives every
rank rank 0's run folder; the tasks of a multi-task Slurm job (submitit launcher) create it
in :func:`train_from_config`. Rank 0 alone logs, plots and writes checkpoints; at the end
every rank checks that the parameters agree (exit status 3 and a message when not).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lsm_train.config_check import validate_config
from lsm_train.recipe_source import (
    RecipeConfigSource,
    conf_dir,
    list_recipes,
    recipes_dir,
    recipes_table,
    register_sources,
    tuning_conflicts,
)

__all__ = [
    "main",
    "conf_dir",
    "recipes_dir",
    "list_recipes",
    "compose",
    "train_from_config",
    "validate_config",
    "RecipeConfigSource",
    "SetupError",
]


class SetupError(ValueError):
    """A run could not start (bad config value, missing data, unknown model option, ...)."""


register_sources()


# ---------------------------------------------------------------------------- config


def compose(overrides: list[str] | None = None, *, return_hydra_config: bool = False) -> DictConfig:
    """Compose the app's config as ``lsm-train`` would (for tests, notebooks, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(
            "config", overrides=list(overrides or []), return_hydra_config=return_hydra_config
        )


def _num(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


# ---------------------------------------------------------------------------- running


def _wandb_settings(
    cfg: DictConfig, recipe: str, sweep: str | None, resume_id: str | None
) -> dict[str, Any] | None:
    from lsm_train import run_names

    wcfg = _num(cfg, "logger.wandb")
    if wcfg is None:
        return None
    w = OmegaConf.to_container(wcfg, resolve=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["recipe"] = recipe
    group = w.get("group") or (f"{recipe}/{sweep}" if sweep else recipe)
    mode = _num(cfg, "lsm.mode")
    tags = list(dict.fromkeys(
        [str(t) for t in (w.get("tags") or [])] + [str(t) for t in (cfg.get("tags") or [])]
        + [run_names.label(cfg, "model"), run_names.label(cfg, "data"), f"lsm-{mode}"]
    ))
    name = w.get("name")
    if not name:  # docs/app.md (wandb): unique within a sweep, deterministic
        name = run_names.base_name(cfg)
        suffix = run_names.hydra_job_suffix() if sweep else None
        name = f"{name}-{suffix}" if suffix else name
    return {
        "project": w.get("project"),
        "entity": w.get("entity"),
        "mode": w.get("mode"),
        "group": group,
        "job_type": w.get("job_type") or "train",
        "tags": tags,
        "name": name,
        "id": resume_id,
        "config": config,
    }


def train_from_config(
    cfg: DictConfig,
    run_dir: str | Path,
    *,
    recipe: str = "custom",
    sweep: str | None = None,
    model_factory: Any = None,
) -> Any:
    """Validate ``cfg``, build the trainer, train, write plots and the summary.

    Returns the :class:`~lsm_train.trainer.TrainResult`. Anything that prevents the start
    (bad config value, missing data files, unknown model option, a layer pattern matching
    nothing, no checkpoint to resume) raises :class:`SetupError` (a ValueError) before
    the first step; errors during training propagate unchanged.
    """
    from lsm_train import distributed as dist_utils

    created = False
    try:
        validate_config(cfg)
        if _num(cfg, "trainer.strategy") == "ddp":
            timeout = dist_utils.ddp_timeout_s(_num(cfg, "trainer.ddp.timeout_s"))
            created = dist_utils.init_from_env(timeout_s=timeout)
            dist_utils.set_timeout(timeout)  # a group torchrun's main() created before
    except (ValueError, RuntimeError) as err:
        raise SetupError(str(err)) from err
    try:
        return _train(cfg, Path(run_dir), recipe, sweep, model_factory)
    finally:
        if created:
            dist_utils.destroy()


def _train(
    cfg: DictConfig, run_dir: Path, recipe: str, sweep: str | None, model_factory: Any
) -> Any:
    from lsm_train import distributed as dist_utils
    from lsm_train.runfolder import claim_run

    main_rank = dist_utils.is_main_process()
    try:
        ckpt, lock = claim_run(cfg.get("resume"), run_dir)
    except ValueError as err:
        raise SetupError(str(err)) from err
    try:
        work = run_dir if ckpt is None else ckpt.parent
        if main_rank:
            note = "" if ckpt is None else f" (resuming from {ckpt})"
            print(f"lsm-train: run folder: {work}{note}", file=sys.stderr)
        return _train_locked(cfg, work, ckpt, recipe, sweep, model_factory)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    cfg: DictConfig, work: Path, ckpt: Path | None, recipe: str, sweep: str | None,
    model_factory: Any,
) -> Any:
    from lsm_train import distributed as dist_utils
    from lsm_train.plots import summary_png, summary_text
    from lsm_train.runfolder import exit_status
    from lsm_train.tracking import Tracker
    from lsm_train.trainer import NullTracker, Trainer

    main_rank = dist_utils.is_main_process()
    try:
        trainer = Trainer(cfg, work, resume_from=ckpt, model_factory=model_factory)
    except SetupError:
        raise
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # everything before the first step: data, model options, layers, optimizer, resume
        raise SetupError(str(err)) from err
    resume_id = trainer.resume_wandb_id if ckpt is not None else None
    if ckpt is not None and main_rank and trainer.resume_applied:
        print("lsm-train: applied at resume: " + ", ".join(trainer.resume_applied),
              file=sys.stderr)
    tracker: Any = NullTracker()
    if main_rank:  # DDP: rank 0 alone logs, plots and writes checkpoints
        tracker = Tracker(
            work,
            wandb=_wandb_settings(cfg, recipe, sweep, resume_id),
            resume_step=trainer.step if ckpt is not None else None,
        )
    trainer.tracker = tracker
    result = None
    try:
        result = trainer.fit()
        # DDP: every replica must end with the same weights (raises ParameterMismatchError)
        if _num(cfg, "trainer.ddp.check_params") is not False:
            try:
                spread = trainer.check_replicas()
            except dist_utils.ParameterMismatchError:
                result.status = "replicas_differ"  # wandb run closed with exit code 3
                raise
            if trainer.ddp:
                tracker.summary({"ddp/param_checksum_spread": spread,
                                 "ddp/world_size": trainer.world_size})
        if not main_rank:
            return result
        if _num(cfg, "trainer.plots") is not False:
            try:
                png = summary_png(work / "metrics.jsonl", work / "summary.png", title=recipe)
                tracker.log_image("plots/summary", png)
            except Exception as err:  # noqa: BLE001 - plotting never fails a run
                warnings.warn(f"summary plot failed: {err}", RuntimeWarning, stacklevel=2)
        tracker.summary({k: v for k, v in result.final.items() if not k.startswith("time/")})
        tracker.summary({"run/status": result.status})
        print(summary_text(work / "metrics.jsonl", result), file=sys.stderr)
        if result.message:
            print(f"lsm-train: {result.message}", file=sys.stderr)
    finally:
        tracker.close(exit_code=exit_status(result))
    return result


class RunFailedError(RuntimeError):
    """A job of a multirun diverged (raised so that Hydra counts it as failed)."""


def _hydra_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lsm_train.checkpoint import CheckpointWriteError
    from lsm_train.distributed import ParameterMismatchError
    from lsm_train.runfolder import exit_status, remove_if_only_hydra_files
    from lsm_train.tracking import MetricsWriteError

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    recipe = hc.runtime.choices.get("recipe") or "custom"
    multirun = hc.mode == RunMode.MULTIRUN
    sweep = Path(hc.sweep.dir).name if multirun else None

    def fail(err: BaseException, status: int) -> None:
        print(f"lsm-train: error: {err}", file=sys.stderr)
        if multirun:
            raise err
        sys.exit(status)

    try:
        conflicts = tuning_conflicts(hc.runtime.choices, hc.overrides.task)
        if conflicts:
            raise SetupError("; ".join(conflicts))
        result = train_from_config(cfg, run_dir, recipe=recipe, sweep=sweep)
    except SetupError as err:
        remove_if_only_hydra_files(run_dir)
        fail(err, 2)
    except ParameterMismatchError as err:
        fail(err, 3)
    except (CheckpointWriteError, MetricsWriteError) as err:
        fail(err, 1)
    if result.status == "interrupted":
        sys.exit(exit_status(result))  # the shell convention for "stopped by signal"
    if result.status == "nan":
        if not multirun:
            sys.exit(1)
        # an optimizing sweeper (optuna) records NaN as a failed trial and goes on; for a
        # grid sweep the job fails, so the multirun exits 1
        if "optuna" in str(OmegaConf.select(hc, "sweeper._target_", default="")).lower():
            return float("nan")
        raise RunFailedError(f"{run_dir}: {result.message}")
    acc = result.final.get("val/acc")
    return None if acc is None else float(acc)


RUN_STAMP_FORMAT = "%Y-%m-%d_%H-%M-%S_%f"  # as ${now:...} in conf/hydra/default.yaml


def _share_run_dir(argv: list[str]) -> None:
    """Under torchrun every rank composes its own config, and ``${now:...}`` would give each
    rank its own run folder: use rank 0's time on every rank (``hydra.run.dir`` override,
    unless the command line sets one), and let rank 0 alone write ``.hydra/``."""
    import datetime

    from lsm_train import distributed as dist_utils

    stamp_us = dist_utils.broadcast_int(int(datetime.datetime.now().timestamp() * 1e6))
    stamp = datetime.datetime.fromtimestamp(stamp_us / 1e6).strftime(RUN_STAMP_FORMAT)
    if not any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in argv[1:]):
        argv.append(f"hydra.run.dir=outputs/${{hydra:runtime.choices.recipe}}/{stamp}")
    if not dist_utils.is_main_process():
        argv[:] = [a for a in argv if not a.startswith("hydra.output_subdir=")]
        argv.append("hydra.output_subdir=null")


def main() -> None:
    """Console entry point ``lsm-train``."""
    import hydra

    from lsm_train import distributed as dist_utils

    register_sources()
    if "--recipes" in sys.argv[1:]:  # the recipe= values, each with its header's first sentence
        print(recipes_table())
        return
    created = False
    torchrun = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    multirun = any(a in ("-m", "--multirun") for a in sys.argv[1:])
    if torchrun and multirun:
        print("lsm-train: error: a multirun cannot run under torchrun (every rank would start "
              "its own sweep); sweep with a launcher, e.g. hydra/launcher=slurm_ddp "
              "trainer=ddp, or run torchrun once per configuration", file=sys.stderr)
        sys.exit(2)
    info_only = any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info")
                    for a in sys.argv[1:])
    if not info_only:
        from lsm_train.cli_args import check_recipes, check_writable, resume_args

        check_recipes(sys.argv)
        if not multirun:
            resume_args(sys.argv, RUN_STAMP_FORMAT)
        check_writable(sys.argv, multirun)
    if torchrun and not info_only:
        created = dist_utils.init_from_env()  # torchrun: one process group for the run
        _share_run_dir(sys.argv)
    try:
        hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(
            _hydra_task
        )()
    finally:
        if created:
            dist_utils.destroy()


if __name__ == "__main__":
    main()
