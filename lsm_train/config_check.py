"""The one check of the app's config, before anything is built (``docs/app.md``).

:func:`validate_config` rejects, in one ``ValueError`` that lists every problem with its
full key and what was expected:

* an unknown key in ``lsm``, ``lsm.monitor``, ``trainer``, ``trainer.ddp`` (the keys of
  ``conf/lsm/monitor.yaml`` and ``conf/trainer/*.yaml``) and in the sections built by
  ``hydra.utils.instantiate`` (``optim``, ``sched``, ``lsm.loss``, ``lsm.guard``: the
  parameters of their ``_target_``, less the arguments the build passes itself);
* a value out of range. The ranges are those of the objects the values reach
  (``torch.optim``, :class:`~lsm_train.loss.LSMLoss`,
  :class:`~lsm_train.guard.SeparabilityGuard`, :class:`~lsm_train.monitor.MonitorSchedule`),
  so a config that passes here is accepted by them.

:func:`check_keys` is the key part alone (the :class:`~lsm_train.trainer.Trainer` runs it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lsm_train._validation import SCHEMES
from lsm_train.features import REDUCTIONS
from lsm_train.guard.options import GUARD_MEASURES, SCOPES
from lsm_train.measures.layer import METHODS
from lsm_train.schedules import SCHEDULES

__all__ = ["LSM_MODES", "validate_config", "check_keys", "allowed_keys"]

LSM_MODES = ("off", "monitor", "loss", "guard", "both")

LSM_KEYS = ("mode", "layers", "monitor", "loss", "guard")
MONITOR_KEYS = ("enabled", "method", "holdout", "budget", "probe_size", "test_size", "gather")
TRAINER_KEYS = ("device", "epochs", "max_steps", "log_every_n_steps", "monitor_every_n_steps",
                "grad_clip", "num_threads", "checkpoint", "progress", "plots", "pretrain",
                "strategy", "ddp")
DDP_KEYS = ("find_unused_parameters", "broadcast_buffers", "check_params", "check_rtol",
            "timeout_s")
GUARD_BUILD_KEYS = ("probe_size",)  # lsm.guard keys the build uses, not the guard
_META_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
# sections built by instantiate: the arguments the build passes, and its own extra keys
_BUILT = {
    "optim": (("params",), ()),
    "sched": (("optimizer", "total_steps"), ()),
    "lsm.loss": (("model", "layers", "process_group"), ()),
    "lsm.guard": (("optimizer", "model", "probe", "layers", "process_group"), GUARD_BUILD_KEYS),
}
_DEFAULT_TARGET = {"sched": "lsm_train.schedules.lr_schedule"}


def _select(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else (
        _select_plain(cfg, key))


def _select_plain(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, Mapping):
            return None
        cfg = cfg.get(part)
    return cfg


def allowed_keys(section: str, node: Mapping[str, Any] | None = None) -> tuple[str, ...] | None:
    """The keys ``section`` may hold (None: any key, a ``_target_`` taking ``**kwargs``).
    For an instantiated section, ``node`` is the section (its ``_target_`` decides)."""
    fixed = {"lsm": LSM_KEYS, "lsm.monitor": MONITOR_KEYS, "trainer": TRAINER_KEYS,
             "trainer.ddp": DDP_KEYS}
    if section in fixed:
        return fixed[section]
    passed, extra = _BUILT[section]
    target = (node or {}).get("_target_") or _DEFAULT_TARGET.get(section)
    if not target:
        raise ValueError(f"{section}._target_: expected a dotted path to a class or function")
    try:
        params = inspect.signature(get_object(str(target))).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError) as err:
        raise ValueError(f"{section}._target_: cannot import {target!r}: {err}") from err
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return (*_META_KEYS, *extra, *(n for n in names if n not in passed))


def check_keys(cfg: Any) -> None:
    """ValueError naming every unknown key of the strict sections (module doc)."""
    errors = _key_errors(cfg)
    if errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))


def _key_errors(cfg: Any) -> list[str]:
    errors = []
    for section in ("lsm", "lsm.monitor", "trainer", "trainer.ddp", *_BUILT):
        node = _select(cfg, section)
        if node is None:
            continue
        node = OmegaConf.to_container(node) if isinstance(node, DictConfig) else dict(node)
        try:
            allowed = allowed_keys(section, node)
        except ValueError as err:
            errors.append(str(err))
            continue
        for key in sorted(set(node) - set(allowed or node)):
            errors.append(f"{section}.{key}: unknown option; expected one of "
                          f"{', '.join(k for k in allowed if not k.startswith('_'))}")
    return errors


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


class _Checks:
    """Collects the messages of the failed value checks of one config."""

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.errors = cfg, []

    def __getitem__(self, key: str) -> Any:
        return _select(self.cfg, key)

    def need(self, cond: bool, msg: str) -> None:
        if not cond:
            self.errors.append(msg)

    def choice(self, key: str, options: tuple, *, null: bool = False) -> None:
        v = self[key]
        self.need((null and v is None) or v in options,
                  f"{key}: expected {' or '.join(', '.join(options).rsplit(', ', 1))}"
                  f"{' or null' if null else ''}, got {v!r}")

    def ints(self, low: int, *keys: str, null: bool = False) -> None:
        for key in keys:
            v = self[key]
            self.need((null and v is None) or _is_int(v, low),
                      f"{key}: expected {'null or ' if null else ''}an integer >= {low}, "
                      f"got {v!r}")

    def bools(self, *keys: str) -> None:
        for key in keys:
            v = self[key]
            self.need(v is None or isinstance(v, bool), f"{key}: expected true or false, got {v!r}")


def _check_lsm(c: _Checks) -> None:
    c.need(c["lsm.mode"] in LSM_MODES,
           f"lsm.mode: expected one of {list(LSM_MODES)}, got {c['lsm.mode']!r}")
    w, tau = c["lsm.loss.weight"], c["lsm.loss.tau"]
    c.need(_is_num(w) and w >= 0, f"lsm.loss.weight: expected a number >= 0, got {w!r}")
    c.need(_is_num(tau) and tau > 0, f"lsm.loss.tau: expected a number > 0, got {tau!r}")
    c.choice("lsm.loss.scheme", SCHEMES)
    c.choice("lsm.loss.reduce", REDUCTIONS, null=True)
    lam = c["lsm.loss.shrinkage"]
    c.need(lam is None or (_is_num(lam) and 0 <= lam <= 1),
           f"lsm.loss.shrinkage: expected a number in [0, 1], got {lam!r}")
    lw = c["lsm.loss.layer_weights"]
    if lw is not None:
        vals = list(lw.values()) if hasattr(lw, "values") else list(lw)
        c.need(all(_is_num(v) and v >= 0 for v in vals),
               f"lsm.loss.layer_weights: expected numbers >= 0, got {OmegaConf.to_container(lw)}"
               if isinstance(lw, DictConfig) else
               f"lsm.loss.layer_weights: expected numbers >= 0, got {lw}")
    hold = c["lsm.monitor.holdout"]
    c.need(hold is None or (_is_num(hold) and 0 < hold < 1),
           f"lsm.monitor.holdout: expected null or a fraction in (0, 1), got {hold!r}")
    c.choice("lsm.monitor.method", METHODS)
    budget = c["lsm.monitor.budget"]
    c.need(_is_num(budget) and 0 < budget <= 1,
           f"lsm.monitor.budget: expected a fraction in (0, 1], got {budget!r}")
    c.ints(4, "lsm.monitor.probe_size", "lsm.monitor.test_size", "lsm.guard.probe_size")
    gmeasure = c["lsm.guard.measure"]
    c.choice("lsm.guard.measure", GUARD_MEASURES)
    rate = c["lsm.guard.accept_rate"]
    c.need(gmeasure != "random" or (_is_num(rate) and 0 <= rate <= 1),
           f"lsm.guard.accept_rate: expected a number in [0, 1] with lsm.guard.measure=random, "
           f"got {rate!r}")
    c.need(gmeasure == "random" or rate is None,
           f"lsm.guard.accept_rate: expected null unless lsm.guard.measure=random, got {rate!r}")
    c.ints(2, "lsm.guard.groups")
    c.ints(1, "lsm.guard.max_nonfinite", "lsm.guard.warn_window")
    c.ints(1, "lsm.guard.check_every")
    c.ints(0, "lsm.guard.max_retries", "lsm.loss.warmup_steps")
    c.ints(0, "lsm.guard.max_consecutive_rejects", null=True)  # null: no limit
    gz, below = c["lsm.guard.z"], c["lsm.guard.warn_below"]
    c.need(gz is None or (_is_num(gz) and gz >= 0),
           f"lsm.guard.z: expected a number >= 0, got {gz!r}")
    c.need(below is None or (_is_num(below) and 0 <= below <= 1),
           f"lsm.guard.warn_below: expected a number in [0, 1], got {below!r}")
    tol, backoff = c["lsm.guard.tolerance"], c["lsm.guard.backoff"]
    c.need(_is_num(tol) and tol >= 0, f"lsm.guard.tolerance: expected a number >= 0, got {tol!r}")
    c.need(_is_num(backoff) and 0 < backoff < 1,
           f"lsm.guard.backoff: expected a fraction in (0, 1), got {backoff!r}")
    c.choice("lsm.guard.scope", SCOPES)
    c.need(c["lsm.guard.scope"] != "window" or c["lsm.guard.max_retries"] == 0,
           "lsm.guard.max_retries: expected 0 with lsm.guard.scope=window (a rolled-back "
           "window cannot be retried)")
    c.bools("lsm.loss.gather", "lsm.monitor.gather", "lsm.loss.crossfit",
            "lsm.loss.detach_directions", "lsm.monitor.enabled")
    layers = c["lsm.layers"]
    if layers is not None and not isinstance(layers, str):
        c.need(len(layers) > 0,
               "lsm.layers: expected null (model.hidden_layers) or a non-empty list")


def _check_run(c: _Checks) -> None:
    c.ints(1, "trainer.epochs", "trainer.log_every_n_steps", "data.batch_size",
           "data.eval_batch_size")
    c.ints(1, "trainer.max_steps", "trainer.num_threads", null=True)
    c.ints(0, "trainer.monitor_every_n_steps", null=True)  # null: lsm.monitor.budget
    lr, wd = c["optim.lr"], c["optim.weight_decay"]
    c.need(_is_num(lr) and lr > 0, f"optim.lr: expected a finite number > 0, got {lr!r}")
    c.need(wd is None or (_is_num(wd) and wd >= 0),
           f"optim.weight_decay: expected a finite number >= 0, got {wd!r}")
    if c["sched._target_"] in (None, _DEFAULT_TARGET["sched"]):
        c.choice("sched.name", SCHEDULES, null=True)
        c.ints(0, "sched.warmup_steps", null=True)
        c.ints(1, "sched.step_size", null=True)
    clip, timeout = c["trainer.grad_clip"], c["trainer.ddp.timeout_s"]
    c.need(clip is None or (_is_num(clip) and clip > 0),
           f"trainer.grad_clip: expected null or a finite number > 0, got {clip!r}")
    c.need(timeout is None or (_is_num(timeout) and timeout > 0),
           f"trainer.ddp.timeout_s: expected a number of seconds > 0, got {timeout!r}")
    strategy = c["trainer.strategy"]
    c.need(strategy in (None, "single", "ddp"),
           f"trainer.strategy: expected single or ddp (trainer=ddp), got {strategy!r}")
    c.bools("trainer.checkpoint", "trainer.progress", "trainer.plots",
            "trainer.ddp.check_params")


def validate_config(cfg: Any) -> None:
    """Reject unknown keys and bad values before any data is loaded (module doc); the
    ValueError names each key and what was expected."""
    c = _Checks(cfg)
    c.errors.extend(_key_errors(cfg))
    _check_lsm(c)
    _check_run(c)
    if c.errors:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(c.errors))
