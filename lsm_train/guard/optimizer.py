"""SeparabilityGuard: keep an optimizer step only if the probe score did not fall
significantly (the rule, the controls and every guarantee: docs/guard.md).

    opt = lt.SeparabilityGuard(torch.optim.AdamW(model.parameters()), model, probe=(x, y))
    loss.backward(); opt.step(); opt.zero_grad()          # as with any optimizer

A checked step: S_before (cached while nothing it depends on changed), a bit-exact
snapshot, the inner step, S_after, then :func:`~lsm_train.guard.rule.judge` keeps it or
the snapshot is restored (retries at ``lr * backoff**k``; after ``max_consecutive_rejects``
rejections a *finite* step is forced). A step with non-finite parameters or score is always
rolled back; ``max_nonfinite`` such attempts in a row raise a RuntimeError.
``scope="window"`` judges the last ``check_every`` steps together.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lsm_train.capture import unwrap_model
from lsm_train.guard import rule
from lsm_train.guard.options import check_options
from lsm_train.guard.persist import GuardPersistence
from lsm_train.guard.rule import GuardDecision, Score, Scored
from lsm_train.guard.snapshot import Snapshot
from lsm_train.probe import ProbeScorer, digest, version_key

__all__ = ["SeparabilityGuard"]

STAT_KEYS = ("steps", "checks", "accepted", "rejected", "retries", "forced", "nonfinite",
             "low_acceptance")
_UNCHECKED = GuardDecision(True, None, None, 0, False, False)


class SeparabilityGuard(GuardPersistence, torch.optim.Optimizer):
    """Wrap ``optimizer`` (sharing its ``param_groups``, ``state`` and ``defaults``) so that
    a step that lowers the probe score of ``model`` significantly is undone.

    ``measure``: ``"soft"`` (default), ``"degree"``, a callable ``(H, y) -> float``, or the
    controls ``"loss"`` (minus the probe cross-entropy) and ``"random"`` (accept with
    probability ``accept_rate`` from the guard's own generator, seeded by ``seed``).
    ``z``/``groups``/``tolerance``: keep iff D >= -(tolerance + z * SE(D)), SE from ``groups``
    jackknife groups; ``z=0`` is the fixed margin. ``warn_below``/``warn_window``: warn once
    when the acceptance rate of the last ``warn_window`` checks is below ``warn_below``.
    Other arguments as in docs/guard.md.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, probe: Any = None,
                 layers: Any = None, *, measure: str | Callable[..., Any] = "soft",
                 tau: float = 0.5, z: float = 2.0, groups: int = 10, tolerance: float = 0.0,
                 accept_rate: float | None = None, seed: int = 0, check_every: int = 1,
                 scope: str = "step", max_retries: int = 0, backoff: float = 0.5,
                 max_consecutive_rejects: int | None = 10, max_nonfinite: int = 20,
                 warn_below: float = 0.5, warn_window: int = 50,
                 snapshot_device: str | torch.device | None = None,
                 track_buffers: bool = False, process_group: Any = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, SeparabilityGuard):
            raise ValueError("optimizer: is already a SeparabilityGuard; wrap the inner one")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.__dict__.update(check_options(
            measure=measure, tau=tau, z=z, groups=groups, tolerance=tolerance,
            accept_rate=accept_rate, seed=seed, check_every=check_every, scope=scope,
            max_retries=max_retries, backoff=backoff,
            max_consecutive_rejects=max_consecutive_rejects, max_nonfinite=max_nonfinite,
            snapshot_device=snapshot_device, track_buffers=track_buffers,
            process_group=process_group))
        # a real Optimizer (hooks, schedulers) built on copies, then sharing the inner objects
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.optimizer, self.model = optimizer, model
        self._relink()
        _check_params_belong(self._params(), model)
        self.scorer: ProbeScorer | None = None
        self._probe_source, self._probe_version = probe, 0
        if measure != "random":
            if probe is None:
                raise ValueError(f"probe: expected (inputs, y) with measure={measure!r}")
            self.scorer = ProbeScorer(model, probe() if callable(probe) else probe, layers,
                                      measure=measure, tau=self.tau,
                                      groups=self.groups if self.z > 0 else 0)
        self.layer_names = self.scorer.layer_names if self.scorer else []
        self.rng = random.Random(self.seed)
        self.acceptance = rule.AcceptanceWindow(warn_window, warn_below)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.last_decision: GuardDecision | None = None
        self.last_layer_scores: dict[str, float] = {}
        self._rejects = self._nonfinite_run = 0
        self._cache: tuple[Scored, tuple] | None = None  # (score, version key)
        self._pending: tuple[Score, str] | None = None  # (score, digest) after a load
        self.snapshot = Snapshot(self.snapshot_device)
        self._window_before: Scored | None = None

    # ------------------------------------------------------------- sharing, probe ------
    def _relink(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state, self.defaults = self.optimizer.state, self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        self._relink()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def refresh_probe(self, probe: Any = None) -> None:
        """Re-read the probe (call the callable again, or use ``probe``) and drop the cached
        score; call it too after editing weights through ``.data``."""
        self._probe_source = self._probe_source if probe is None else probe
        src = self._probe_source
        if self.scorer is not None:
            self.scorer.set_probe(src() if callable(src) else src)
        self._probe_version += 1
        self._cache = self._pending = None
        if self._window_before is not None:  # no comparable score: the window is kept
            self._window_before = Scored(Score(math.nan))

    # ------------------------------------------------------------- scoring -------------
    def _score(self) -> Scored:
        feats = self.scorer.forward()
        values = self._reduce(self.scorer.values(feats))
        self.last_layer_scores = dict(zip(self.layer_names, values.tolist(), strict=True))
        return Scored(Score(float(values.mean())), feats)

    def _reduce(self, table: torch.Tensor) -> torch.Tensor:
        return _all_reduce_mean(table.to(self._device()), self.process_group).cpu()

    def _with_replicates(self, scored: Scored, local: bool = False) -> Scored:
        """``scored`` with its jackknife replicates (all-reduced unless ``local``), computed
        from its features on first need."""
        if scored.score.replicates is not None or scored.feats is None or not self.z:
            return scored
        table = self.scorer.replicates(scored.feats)
        reps = (table if local else self._reduce(table)).mean(0)
        return Scored(Score(scored.score.value, tuple(reps.tolist())), scored.feats)

    def score(self) -> float:
        """Mean layer score of the current weights on the probe (all-reduced under DDP)."""
        return self._score().score.value

    def _device(self) -> torch.device:
        params = self._params()
        return params[0].device if params else torch.device("cpu")

    def _key(self) -> tuple:
        key = [self._probe_version, version_key(self._params()),
               version_key(self.scorer.probe.tensors)]
        if self.track_buffers:
            key.append(version_key(unwrap_model(self.model).buffers()))
        return tuple(key)

    def _digest(self) -> str:
        buffers = list(unwrap_model(self.model).buffers()) if self.track_buffers else []
        return digest(self._params() + buffers + self.scorer.probe.tensors)

    def _score_before(self) -> Scored | None:
        if self.scorer is None:
            return None
        cached = None
        if self._cache is not None and self._cache[1] == self._key():
            cached = self._cache[0]
        elif self._pending is not None and self._pending[1] == self._digest():
            cached = Scored(self._pending[0])
        self._pending = None
        return cached if _all_true(cached is not None, self) else self._score()

    def _attempt(self, before: Scored | None) -> tuple[rule.Verdict, Scored | None, Scored | None]:
        """Judge the parameters now in place against ``before``: (verdict, before, after),
        ``before`` with its replicates when the SE was needed."""
        finite = _all_finite(self._params())
        self.stats["nonfinite"] += int(not finite)
        if self.scorer is None:
            keep = finite and self.rng.random() < self.accept_rate
            return rule.Verdict(keep, finite, math.nan, math.nan), None, None
        after = self._score() if finite else Scored(Score(math.nan))
        if rule.needs_se(before.score, after.score, self.tolerance):
            before, after = self._with_replicates(before), self._with_replicates(after)
        verdict = rule.judge(before.score, after.score, z=self.z, tolerance=self.tolerance)
        self.stats["nonfinite"] += int(finite and not verdict.finite)
        return verdict, before, after

    # ------------------------------------------------------------- step ----------------
    def _inner_step(self, closure: Any, first: bool) -> Any:
        if closure is not None and (first or isinstance(self.optimizer, torch.optim.LBFGS)):
            return self.optimizer.step(closure)
        return self.optimizer.step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Inner step, then the check (every ``check_every`` calls); returns the closure's
        loss. Retries reuse the gradients (LBFGS gets the closure on every attempt)."""
        self._relink()
        if self.scope == "window":
            return self._window_step(closure)
        checked = self.stats["steps"] % self.check_every == 0
        self.stats["steps"] += 1
        if not checked:
            loss = self._inner_step(closure, first=True)
            self._cache = self._pending = None
            self.last_decision = _UNCHECKED
            return loss
        before = self._score_before()
        self.snapshot.take(self._params(), self.optimizer)
        lrs = [g["lr"] for g in self.param_groups]
        loss = self._inner_step(closure, first=True)
        verdict, before, after = self._attempt(before)
        retries, nonfinite = 0, int(not verdict.finite)
        while not verdict.accepted and retries < self.max_retries:
            self.snapshot.restore(self.optimizer)
            retries += 1
            for g, lr in zip(self.param_groups, lrs, strict=True):
                g["lr"] = lr * self.backoff**retries
            self._inner_step(closure, first=False)
            verdict, before, after = self._attempt(before)
            nonfinite += int(not verdict.finite)
        self.stats["retries"] += retries
        for g, lr in zip(self.param_groups, lrs, strict=True):
            g["lr"] = lr  # the very same object: schedulers see no change
        self._conclude(verdict, before, after, retries, nonfinite, groups_too=True)
        return loss

    def _window_step(self, closure: Any) -> Any:
        position = self.stats["steps"] % self.check_every
        self.stats["steps"] += 1
        if position == 0:  # (a NaN score marks the open window of the random control)
            self._window_before = self._score_before() or Scored(Score(math.nan))
            self.snapshot.take(self._params(), self.optimizer)
        loss = self._inner_step(closure, first=True)
        self._cache = self._pending = None
        if position < self.check_every - 1:
            self.last_decision = _UNCHECKED
            return loss
        verdict, before, after = self._attempt(self._window_before)
        self._conclude(verdict, before, after, 0, int(not verdict.finite), groups_too=False)
        return loss

    def _conclude(self, verdict: rule.Verdict, before: Scored | None, after: Scored | None,
                  retries: int, nonfinite: int, groups_too: bool) -> None:
        """Force, count, restore a rejected check, cache the score in place, warn."""
        self.stats["checks"] += 1
        accepted, forced = rule.force(verdict.accepted, verdict.finite, self._rejects,
                                      self.max_consecutive_rejects)
        self._rejects = 0 if accepted else self._rejects + 1
        self.stats["accepted" if accepted else "rejected"] += 1
        self.stats["forced"] += int(forced)
        if not accepted:
            self.snapshot.restore(self.optimizer, groups_too=groups_too)
        kept = after if accepted else before
        finite = kept is not None and kept.score.finite and self.scorer is not None
        self._cache = (kept, self._key()) if finite else None
        self.snapshot.clear()
        self._window_before = None
        scored = self.scorer is not None
        self.last_decision = GuardDecision(
            accepted, _value(before) if scored else None, _value(after), retries, forced, True,
            verdict.se if scored and self.z else None, nonfinite)
        self._nonfinite_run = self._nonfinite_run + 1 if not verdict.finite else 0
        if self._nonfinite_run >= self.max_nonfinite:
            raise RuntimeError(
                f"SeparabilityGuard: the last {self._nonfinite_run} checked steps all gave "
                "non-finite parameters or probe scores and were rolled back (the weights are "
                "the last finite ones); lower the learning rate, clip the gradients, check "
                "the loss for inf/NaN, or use max_retries > 0 to retry at a smaller lr"
            )
        if self.acceptance.record(accepted) and self.measure != "random":
            self.stats["low_acceptance"] = 1
            warnings.warn(
                f"SeparabilityGuard: acceptance rate {self.acceptance.rate:.2f} over the last "
                f"{self.acceptance.size} checks is below {self.acceptance.level}; the guard "
                "is undoing most updates: check the probe, z/tolerance and the learning rate",
                RuntimeWarning, stacklevel=3)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held by the snapshot buffers (params + inner state tensors)."""
        return self.snapshot.nbytes

    @property
    def recent_accept_rate(self) -> float:
        """Acceptance rate over the last ``warn_window`` checks (NaN before a check)."""
        return self.acceptance.rate

    def __repr__(self) -> str:
        return (f"SeparabilityGuard({type(self.optimizer).__name__}, layers={self.layer_names}, "
                f"measure={self.measure!r}, z={self.z}, tolerance={self.tolerance}, "
                f"check_every={self.check_every}, scope={self.scope!r}, stats={self.stats})")


def _value(scored: Scored | None) -> float | None:
    return None if scored is None else scored.score.value


def _check_params_belong(params: list[torch.Tensor], model: nn.Module) -> None:
    owned = {id(p) for p in unwrap_model(model).parameters()}
    foreign = sum(id(p) not in owned for p in params)
    if foreign:
        raise ValueError(
            f"optimizer: {foreign} of its {len(params)} parameters are not parameters of "
            f"model {type(unwrap_model(model)).__name__}; build the optimizer on "
            "model.parameters() of the model the guard scores"
        )


def _all_finite(params: list[torch.Tensor]) -> bool:
    if not params:
        return True
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _group(process_group: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, (process_group or dist.group.WORLD)
    return None, None


def _all_reduce_mean(t: torch.Tensor, process_group: Any) -> torch.Tensor:
    dist, group = _group(process_group)
    if dist is None:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t / dist.get_world_size(group)


def _all_true(flag: bool, guard: SeparabilityGuard) -> bool:
    dist, group = _group(guard.process_group)
    if dist is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=guard._device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item() > 0.5)
