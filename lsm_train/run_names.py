"""wandb run names of the app: readable, deterministic, unique within a sweep.

A run is named ``<model>-<data>-<lsm mode>-s<seed>``, where a ``_target_`` model or data
set is named after its target's last component (``model._target_=pkg.nets.make_net`` ->
``make_net``). A job of a multirun adds what distinguishes it: its values of the swept
keys (short key = the last dotted component, e.g. ``lr=0.01``), except those the base
name already shows, and its job number: ``cnn-digits-off-s0-lr=0.01-j1``. A
``logger.wandb.name`` given by the user wins. See ``docs/app.md`` (wandb).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["label", "base_name", "job_suffix", "hydra_job_suffix"]

#: override keys the base name already shows (not repeated in a job's suffix).
_IN_BASE_NAME = frozenset({"model", "model.name", "model._target_", "data", "data.name",
                           "data._target_", "lsm", "lsm.mode", "seed"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
_PART_MAX = 32  # characters of one ``key=value`` part


def label(cfg: DictConfig, node: str) -> str:
    """``node``'s name: its ``_target_``'s last component, else its ``name``."""
    target = OmegaConf.select(cfg, f"{node}._target_", default=None)
    if target:
        return str(target).rpartition(".")[2]
    return str(OmegaConf.select(cfg, f"{node}.name", default=None))


def base_name(cfg: DictConfig) -> str:
    """``<model>-<data>-<lsm mode>-s<seed>`` (module doc)."""
    mode = OmegaConf.select(cfg, "lsm.mode", default=None)
    seed = OmegaConf.select(cfg, "seed", default=None)
    return f"{label(cfg, 'model')}-{label(cfg, 'data')}-{mode}-s{seed}"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_suffix(task_overrides: Sequence[str], swept: Iterable[str], job_num: int) -> str:
    """``<short key>=<value>-...-j<num>``: the job's overrides of the ``swept`` keys (all
    its overrides when ``swept`` is empty) that the base name does not show, sorted by key,
    sanitized (characters other than letters, digits and ``._=+-`` become ``_``)."""
    swept = set(swept)
    parts = []
    for override in sorted(task_overrides, key=_key):
        key = _key(override)
        if "=" not in override or key in _IN_BASE_NAME or key.startswith("hydra."):
            continue
        if swept and key not in swept:
            continue
        value = override.split("=", 1)[1]
        part = _UNSAFE.sub("_", f"{key.rpartition('.')[2]}={value}")[:_PART_MAX]
        parts.append(part)
    return "-".join([*parts, f"j{int(job_num)}"])


def _swept_keys(hc: Any) -> set[str]:
    """The keys a sweep varies: ``hydra.sweeper.params`` and the command line's sweep
    overrides (``optim.lr=0.1,0.01``); empty when they cannot be told (a launcher that
    runs the job in another process)."""
    keys = set(dict(OmegaConf.select(hc, "sweeper.params", default=None) or {}))
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in sys.argv[1:]:
        if "=" not in arg or arg.startswith("-"):
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - not an override: not a swept key
            continue
        if override.is_sweep_override():
            keys.add(override.get_key_element().lstrip("+~"))
    return keys


def hydra_job_suffix() -> str | None:
    """:func:`job_suffix` of the current Hydra job of a multirun; ``None`` outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return job_suffix(list(hc.overrides.task), _swept_keys(hc), hc.job.num)
