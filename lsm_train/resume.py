"""Resuming a run: which checkpoint a ``resume=`` value names, and whether the current
configuration may continue it (user guide: ``docs/runs.md``).

* ``resume=false``: a new run. ``resume=true``: the run in the run folder itself
  (``hydra.run.dir``); ``resume=<folder>``: ``<folder>/checkpoint.pt``;
  ``resume=<file>``: that file. A missing checkpoint is refused, never replaced by a
  neighbouring run's.
* The checkpoint's config is compared with the current one, key by key. Keys in
  :data:`APPLIED_AT_RESUME` (run length, logging, device, data location, ...) take the new
  value; any other difference is refused, naming every such key with both values.
* A checkpoint written by W processes is resumed by W processes only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "APPLIED_AT_RESUME",
    "resolve_checkpoint",
    "config_differences",
    "check_resume",
]

CHECKPOINT_NAME = "checkpoint.pt"

# keys (or key prefixes ending in ".") whose new value a resumed run takes; each is well
# defined mid-run: it changes how far the run goes, what is logged or where it runs, never
# the state the checkpoint holds
APPLIED_AT_RESUME = (
    "resume",
    "tags",
    "logger.",
    "trainer.epochs",
    "trainer.max_steps",
    "trainer.log_every_n_steps",
    "trainer.monitor_every_n_steps",
    "trainer.progress",
    "trainer.plots",
    "trainer.checkpoint",
    "trainer.num_threads",
    "trainer.device",
    "trainer.ddp.check_params",
    "trainer.ddp.check_rtol",
    "trainer.ddp.timeout_s",
    "data.root",
    "data.download",
    "data.eval_batch_size",
)


def _is_false(value: Any) -> bool:
    return value in (None, False, "false", "False", "")


def resolve_checkpoint(resume: Any, run_dir: str | Path) -> Path | None:
    """The checkpoint file ``resume`` names (None for a new run); ValueError when it is
    missing. ``resume=true`` means ``<run_dir>/checkpoint.pt``."""
    run_dir = Path(run_dir)
    if _is_false(resume):
        return None
    if resume in (True, "true", "True"):
        ckpt = run_dir / CHECKPOINT_NAME
        if ckpt.is_file():
            return ckpt
        why = (
            "the run there stopped before its first checkpoint"
            if (run_dir / "metrics.jsonl").is_file()
            else "there is no run there to continue"
        )
        raise ValueError(
            f"resume=true: no {CHECKPOINT_NAME} in the run folder {run_dir} ({why}); name the "
            f"run to continue with resume=<run folder> or hydra.run.dir=<run folder>, or start "
            f"anew with resume=false"
        )
    p = Path(str(resume)).expanduser()
    if p.is_file():
        return p
    if (p / CHECKPOINT_NAME).is_file():
        return p / CHECKPOINT_NAME
    what = "folder has no " + CHECKPOINT_NAME if p.is_dir() else "path does not exist"
    raise ValueError(
        f"resume={resume}: that {what}; expected a run folder with a {CHECKPOINT_NAME} or a "
        "checkpoint file (or resume=false for a new run)"
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _applied(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) or key.startswith(a + ".")
               for a in APPLIED_AT_RESUME)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """``{dotted key: (saved value, current value)}`` for every leaf that differs (a key
    missing on one side reads ``<unset>``)."""
    a, b = _flatten(saved), _flatten(current)
    unset = "<unset>"
    return {k: (a.get(k, unset), b.get(k, unset)) for k in sorted(set(a) | set(b))
            if a.get(k, unset) != b.get(k, unset)}


def check_resume(state: Mapping[str, Any], config: Any, world_size: int, path: Path) -> list[str]:
    """Refuse (ValueError) a resume of ``state`` by ``config`` on ``world_size`` processes
    that cannot continue it exactly; return the keys whose new values are applied."""
    saved_world = state.get("world_size")
    if saved_world is not None and int(saved_world) != int(world_size):
        raise ValueError(
            f"resume: {path} was written by {saved_world} process(es) and this run has "
            f"{world_size}; the data shards and the global batch would change. Resume with "
            f"{saved_world} process(es) (torchrun --nproc_per_node={saved_world}) or start "
            "anew with resume=false"
        )
    saved = state.get("config")
    if not isinstance(saved, Mapping) or not isinstance(config, Mapping):
        return []
    diffs = config_differences(saved, config)
    refused = {k: v for k, v in diffs.items() if not _applied(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now"
                           for k, (old, new) in refused.items())
        raise ValueError(
            f"resume: the configuration differs from the one {path} was written with, in "
            f"keys a resumed run cannot change: {listed}. Resume with the checkpoint's values "
            "or start a new run with resume=false (keys applied at resume: see docs/runs.md)"
        )
    return sorted(diffs)
