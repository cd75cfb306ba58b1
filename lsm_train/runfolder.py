"""The run folder of one ``lsm-train`` run (user guide: ``docs/runs.md``).

* :func:`claim_run`: the checkpoint ``resume`` names (or none) and the folder's lock,
  decided on rank 0 and shared with every rank;
* :func:`remove_if_only_hydra_files`: a run that never started leaves no folder behind;
* :func:`exit_status`: the process exit status of a run's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["claim_run", "remove_if_only_hydra_files", "exit_status"]


def claim_run(resume: Any, run_dir: Path) -> tuple[Path | None, Any]:
    """The checkpoint to resume (None: a new run) and the run folder's lock, decided on
    rank 0 and shared with every rank (a refusal raises ValueError on all of them)."""
    from lsm_train import distributed as dist_utils
    from lsm_train.resume import resolve_checkpoint
    from lsm_train.runlock import RunLock

    lock, answer = None, ""
    if dist_utils.is_main_process():
        try:
            ckpt = resolve_checkpoint(resume, run_dir)
            lock = RunLock(run_dir if ckpt is None else ckpt.parent).acquire()
            answer = "" if ckpt is None else "ckpt:" + str(ckpt)
        except (ValueError, OSError) as err:
            answer = "err:" + str(err)
    if dist_utils.is_initialized():
        answer = dist_utils.broadcast_str(answer)
    if answer.startswith("err:"):
        raise ValueError(answer[4:])
    return (Path(answer[5:]) if answer else None), lock


def remove_if_only_hydra_files(run_dir: Path) -> None:
    """A run that never started leaves no folder behind: remove ``run_dir`` when it holds
    nothing but what Hydra and the lock wrote (``.hydra/``, ``*.log``, the lock file)."""
    import shutil

    from lsm_train.distributed import is_main_process
    from lsm_train.runlock import LOCK_NAME

    if not is_main_process() or not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        ours = p.name in (".hydra", LOCK_NAME) or (p.is_file() and p.suffix == ".log")
        if not ours:
            return
    shutil.rmtree(run_dir, ignore_errors=True)


def exit_status(result: Any) -> int:
    """The process exit status of a run's result (None: it raised): 0 completed, 1 not
    finite or an error, 3 replicas differ, 128 + N stopped by signal N."""
    if result is None:
        return 1
    if result.status == "completed":
        return 0
    if result.status == "interrupted":
        return 128 + int(result.signum or 15)
    return 3 if result.status == "replicas_differ" else 1
