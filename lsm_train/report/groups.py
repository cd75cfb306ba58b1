"""Settings: runs grouped by their real configuration, the seed aside.

Two runs are one *setting* when their ``.hydra/config.yaml`` agree on every key except those
that do not change what is trained (:data:`NOT_SETTINGS`: the seed, resume, tags, logging,
progress bars and plots). A run without a config falls back to its overrides minus the seed,
and a run without either is its own setting. A setting's label is the overrides that differ
between settings, or, where those do not tell two settings apart (a recipe edited between
runs), the config values that do; a setting without overrides among others is
"(no overrides)". See ``docs/report.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lsm_train.report.runs import Run

__all__ = ["Group", "group_runs", "is_seed_override", "flatten_config", "NOT_SETTINGS"]

#: config keys (dotted; a prefix covers its subtree) that are not part of a setting.
NOT_SETTINGS = ("resume", "tags", "logger", "trainer.progress", "trainer.plots")
#: at most this many differing config values in a label.
MAX_LABEL_VALUES = 4


@dataclass
class Group:
    """Runs of one setting."""

    key: tuple[str, ...]
    label: str
    runs: list[Run]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_seed(dotted: str) -> bool:
    return dotted.split(".")[-1] in {"seed", "seeds"}


def is_seed_override(override: str) -> bool:
    """``seed=1``, ``+seed=1``, ``trainer.seed=1``... (the last dotted key part is ``seed``)."""
    return _is_seed(_override_key(override))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"width": 8}}`` -> ``{"model.width": "8"}`` (strings as they are, other
    values as JSON text)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, dotted + "."))
        else:
            flat[dotted] = value if isinstance(value, str) else json.dumps(
                value, sort_keys=True, default=str)
    return flat


def _is_setting(dotted: str) -> bool:
    if _is_seed(dotted) or dotted.startswith("hydra."):
        return False
    return not any(dotted == k or dotted.startswith(k + ".") for k in NOT_SETTINGS)


def _setting_overrides(run: Run) -> list[str]:
    return [o for o in run.overrides
            if not is_seed_override(o) and _is_setting(_override_key(o))]


def _key(run: Run) -> tuple[str, ...]:
    if run.config is not None:
        flat = flatten_config(run.config)
        return ("config:",) + tuple(f"{k}={v}" for k, v in sorted(flat.items())
                                    if _is_setting(k))
    if run.overrides or (run.path / ".hydra" / "overrides.yaml").is_file():
        return ("overrides:",) + tuple(sorted(_setting_overrides(run)))
    return ("run:" + run.name,)


def _labels(groups: list[tuple[tuple[str, ...], list[Run]]]) -> list[str]:
    """Varying overrides per group; config values where overrides leave two groups alike."""
    firsts = [_setting_overrides(members[0]) for _, members in groups]
    common = set(firsts[0]).intersection(*firsts[1:]) if firsts else set()
    labels = []
    for (key, members), first in zip(groups, firsts, strict=True):
        if key[0].startswith("run:"):
            labels.append(members[0].name)
        elif len(groups) == 1:
            labels.append(" ".join(first) or "all")
        else:
            labels.append(" ".join(o for o in first if o not in common) or "(no overrides)")
    if len(set(labels)) == len(labels):
        return labels
    keys = [set(key) for key, _ in groups]
    shared = set.intersection(*keys)
    out = []
    for label, (key, _) in zip(labels, groups, strict=True):
        differing = [item for item in key if item not in shared]
        extra = " ".join(differing[:MAX_LABEL_VALUES]) or "fewer config keys"
        extra += " …" if len(differing) > MAX_LABEL_VALUES else ""
        out.append(f"[{extra}]" if label in ("all", "(no overrides)") else f"{label} [{extra}]")
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs grouped by setting, in first-seen order, each with its label."""
    keyed: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        keyed.setdefault(_key(run), []).append(run)
    items = list(keyed.items())
    return [Group(key, label, members)
            for (key, members), label in zip(items, _labels(items), strict=True)]
