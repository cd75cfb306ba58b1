"""SeparabilityGuard: keep an optimizer step only if hidden-layer separability did not fall.

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = lt.SeparabilityGuard(opt, model, probe=(x_probe, y_probe))
    loss.backward(); opt.step(); opt.zero_grad()          # as with any optimizer

Contract. On a *checked* step (every ``check_every``-th call of ``step``, the first one
included) the guard

1. takes S_before = score of the current weights (reused from the previous check when the
   parameters, the probe and, with ``track_buffers``, the buffers are unchanged since then:
   one probe forward per checked step in the steady state),
2. snapshots every parameter and every tensor of the inner optimizer's state into buffers
   allocated once and reused, runs the inner ``step``,
3. scores again (S_after) and keeps the step iff S_after is finite and
   ``S_after >= S_before - tolerance``. Otherwise it restores parameters, inner state and
   param_groups bit for bit (state created lazily by that step, e.g. Adam's first
   ``exp_avg``, is deleted), and, up to ``max_retries`` times, retries the inner step with
   every group's lr scaled by ``backoff**k`` (k = 1, 2, ...; the gradients are unchanged).
   The exact original lr objects are put back afterwards, so schedulers see no change.
   After ``max_consecutive_rejects`` rejected steps in a row, a failing step is kept anyway
   (``forced``; the last attempt is kept) so training never stalls.

Scope. With ``scope="step"`` (default) a check judges one step: with ``check_every=k`` the
k − 1 steps between checks are never judged, and each check needs two probe forwards (the
weights moved since the last check, so S_before is scored afresh). With ``scope="window"``
a check judges the last ``check_every`` steps together, as Lookahead treats its k fast
steps: the snapshot is taken before the first step of the window, S_before is the score at
that point (the previous check's S_after in the steady state: one probe forward per
window), and after the window's last step the whole window is kept or rolled back
(parameters and inner state; ``param_groups`` are left as they are, so a scheduler that
moved the lr inside the window keeps its course). A rolled-back window cannot be retried
(its gradients are gone): ``max_retries`` must be 0. A checkpoint taken inside a window
holds the window's snapshot too, so a resumed run still equals an uninterrupted one.

The score of a layer is ``measure`` on the probe features of that layer (``"soft"``: the
soft MD-LSM S_τ of :func:`lsm_train.surrogate.soft_md_lsm`; ``"degree"``: the MD-LSM degree
of :func:`lsm_train.measures.layer.layer_separability`; or a callable ``(H, y) -> float``);
the guard's score is the mean over the layers. Probe passes run on the unwrapped module
(DDP / torch.compile wrappers peeled) under ``torch.no_grad`` in eval mode, so dropout is
off and BatchNorm running statistics and ``num_batches_tracked`` never change; each
module's own ``training`` flag is restored afterwards. Non-finite features (which the built-in
measures reject with a ValueError) give a NaN layer score, and a NaN or infinite score after
a step is a rejection.

Distributed. When ``torch.distributed`` is initialized, the per-layer scores are averaged
over the ranks of ``process_group`` (default: the world) with ``all_reduce``, and so is the
validity of the cached score, so every rank takes the same decision even with different
probes; parameters stay identical across ranks as long as the inner steps are.

Memory. The snapshot holds one copy of every parameter and of every tensor in the inner
optimizer's state: ``snapshot_bytes == bytes(params) + bytes(state tensors)`` (e.g. SGD with
momentum: 2x params; Adam/AdamW: 3x params plus the step counters), allocated on first use
and reused. ``snapshot_device="cpu"`` keeps it in host memory instead (copies cross the
bus on every checked step).

Cached score. The cache key is the in-place version counters of the parameters and of
the probe tensors, plus a probe version bumped by :meth:`refresh_probe` (and, with
``track_buffers=True``, the version counters of the model's buffers). By default buffers are
not in the key: BatchNorm in training mode moves its running statistics on every training
forward, so the reused "before" score was measured with the statistics of the previous
check (one probe forward per check; the step is judged against slightly older statistics).
``track_buffers=True`` makes the comparison exact (before and after with the current
statistics) at the price of a second probe forward per check on models whose buffers change
during training. Edits through ``.data`` bypass version counters: call
:meth:`refresh_probe` after them. The cache survives ``state_dict`` / ``load_state_dict``
through a content hash of what it depends on (parameters, probe, tracked buffers), checked
at the next checked step, so a resumed run takes bitwise the same decisions as an
uninterrupted one; if the loaded weights differ, "before" is re-scored.

Copies. ``copy.deepcopy(guard)`` and pickling copy the model and the inner optimizer with it
(one consistent set of parameters); a probe given as a callable must then be picklable
(a module-level function, not a lambda). A custom ``process_group`` is not copied (the copy
uses the default group). Snapshot buffers and the cached score are not copied.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from lsm_train._validation import check_fraction, check_labels, check_positive
from lsm_train.capture import HiddenCapture, resolve_layers, unwrap_model

__all__ = ["SeparabilityGuard", "GuardDecision"]

_MEASURES = ("soft", "degree")
_SCOPES = ("step", "window")
_STAT_KEYS = ("steps", "checks", "accepted", "rejected", "retries", "forced")


class GuardDecision(NamedTuple):
    """Outcome of the latest ``step``. ``before``/``after`` are None on unchecked steps;
    ``after`` is the score of the last attempt; ``retries`` counts the extra attempts."""

    accepted: bool
    before: float | None
    after: float | None
    retries: int
    forced: bool
    checked: bool


def _soft_score(H: torch.Tensor, y: torch.Tensor, tau: float) -> Any:
    from lsm_train.surrogate import soft_md_lsm

    return soft_md_lsm(H, y, tau=tau)


def _degree_score(H: torch.Tensor, y: torch.Tensor, tau: float) -> Any:
    from lsm_train.measures.layer import layer_separability

    return layer_separability(H, y, method="degree")


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i] <- src[i] bitwise (one foreach kernel when possible)."""
    if not dst:
        return
    with torch.no_grad():
        try:
            torch._foreach_copy_(dst, src)
        except (RuntimeError, TypeError):  # mixed devices on some backends
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)


def _digest(tensors: Iterable[Any]) -> str:
    """Exact content hash of tensors (bytes, dtype, shape); used only at save/load."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            h.update(repr(t).encode())
            continue
        flat = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SeparabilityGuard(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that a step is kept only if the mean hidden-layer score of
    ``model`` on ``probe`` does not fall by more than ``tolerance`` (see the module doc).

    Args:
        optimizer: any ``torch.optim.Optimizer``; its ``param_groups``, ``state`` and
            ``defaults`` are shared (the very same objects).
        model: the module whose hidden layers are scored (DDP / compiled wrappers accepted).
        probe: ``(x, y)`` (inputs for ``model(x)``, integer labels with >= 2 classes) or a
            callable returning such a pair, called on first use and by ``refresh_probe``.
        layers: names / glob patterns / module classes for :class:`HiddenCapture`
            (default ``model.hidden_layers``).
        measure: ``"soft"`` (default), ``"degree"`` or a callable ``(H, y) -> float``.
        tau: temperature of the soft measure.
        tolerance: largest allowed fall of the score (>= 0).
        check_every: check one step in this many (1 = every step).
        scope: ``"step"``: a check judges its own step; ``"window"``: it judges the last
            ``check_every`` steps together and rolls them all back on a rejection.
        max_retries: retries with a smaller lr after a rejection.
        backoff: lr factor per retry, in (0, 1).
        max_consecutive_rejects: after this many rejected steps in a row the next failing
            step is kept (``forced``); None never forces, 0 forces every failing step.
        snapshot_device: None (same device as each tensor) or e.g. ``"cpu"``.
        track_buffers: also key the cached score on the buffers (BatchNorm statistics):
            exact, but a second probe forward per check for models with BatchNorm.
        process_group: group for the all-reduce of scores under torch.distributed.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        probe: Any,
        layers: Any = None,
        *,
        measure: str | Callable[[torch.Tensor, torch.Tensor], Any] = "soft",
        tau: float = 0.5,
        tolerance: float = 0.0,
        check_every: int = 1,
        scope: str = "step",
        max_retries: int = 0,
        backoff: float = 0.5,
        max_consecutive_rejects: int | None = 10,
        snapshot_device: str | torch.device | None = None,
        track_buffers: bool = False,
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, SeparabilityGuard):
            raise ValueError("optimizer: is already a SeparabilityGuard; wrap the inner one")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not (callable(measure) or measure in _MEASURES):
            raise ValueError(f"measure: expected one of {_MEASURES} or a callable, got {measure!r}")
        self.tau = check_positive(tau, "tau")
        self.tolerance = check_positive(tolerance, "tolerance", allow_zero=True)
        self.check_every = _check_int(check_every, "check_every", minimum=1)
        self.max_retries = _check_int(max_retries, "max_retries", minimum=0)
        if scope not in _SCOPES:
            raise ValueError(f"scope: expected one of {_SCOPES}, got {scope!r}")
        if scope == "window" and self.max_retries:
            raise ValueError(
                "max_retries: expected 0 with scope='window' (a rolled-back window cannot be "
                f"retried: its gradients are gone), got {max_retries!r}"
            )
        self.scope = scope
        self.backoff = check_fraction(backoff, "backoff")
        self.max_consecutive_rejects = (
            None
            if max_consecutive_rejects is None
            else _check_int(max_consecutive_rejects, "max_consecutive_rejects", minimum=0)
        )
        self.snapshot_device = None if snapshot_device is None else torch.device(snapshot_device)
        self.measure = measure
        self.track_buffers = bool(track_buffers)
        self.process_group = process_group

        # A real Optimizer (hooks, profiler, schedulers) on copies of the group dicts, so
        # the inner groups are not touched; then share the inner objects.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.optimizer = optimizer
        self._relink()

        self.model = model
        self.layers = layers
        self.layer_names: list[str] = _resolve_names(unwrap_model(model), layers)
        self._probe_source = probe
        self._probe: tuple[Any, torch.Tensor] | None = None
        self._probe_version = 0
        if not callable(probe):
            self._probe = self._check_probe(probe)

        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self.last_decision: GuardDecision | None = None
        self.last_layer_scores: dict[str, float] = {}
        self._consecutive_rejects = 0
        self._cache: tuple[float, tuple] | None = None  # (score, key)
        self._pending_cache: tuple[float, str] | None = None  # (score, digest) after a load
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._saved: Any = None
        self._window_before: float | None = None  # S_before of the open window

    # ---------------------------------------------------------------- sharing ---------
    def _relink(self) -> None:
        """Share the inner optimizer's objects (its load_state_dict replaces them)."""
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        self._relink()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # ---------------------------------------------------------------- probe -----------
    def _check_probe(self, probe: Any) -> tuple[Any, torch.Tensor]:
        if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
            raise ValueError(
                "probe: expected a pair (x, y) of inputs and integer labels, or a callable "
                f"returning one, got {type(probe).__name__}"
            )
        x, y = probe
        n = x.shape[0] if isinstance(x, torch.Tensor) else len(x)
        labels = check_labels(y, n)
        if isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.ndim == 1:
            labels = y  # keep the caller's tensor (its version counter is tracked)
        k = int(torch.unique(labels).numel())
        if k < 2:
            raise ValueError(f"probe: expected labels of at least 2 classes, got {k}")
        device = self._device()
        if isinstance(x, torch.Tensor):
            x = x.to(device)
        return x, labels.to(device)

    def _device(self) -> torch.device:
        params = self._params()
        return params[0].device if params else torch.device("cpu")

    def _probe_data(self) -> tuple[Any, torch.Tensor]:
        if self._probe is None:
            self._probe = self._check_probe(self._probe_source())
        return self._probe

    def refresh_probe(self, probe: Any = None) -> None:
        """Re-read the probe (call the callable again, or use ``probe`` when given) and
        invalidate the cached score. Call it too after editing weights through ``.data``."""
        if probe is not None:
            self._probe_source = probe
        src = self._probe_source
        self._probe = self._check_probe(src() if callable(src) else src)
        self._probe_version += 1
        self._cache = None
        self._pending_cache = None
        if self._window_before is not None:  # no comparable score: the window is kept
            self._window_before = math.nan

    # ---------------------------------------------------------------- scoring ---------
    def _measure_fn(self) -> Callable[..., Any]:
        if self.measure == "soft":
            return _soft_score
        if self.measure == "degree":
            return _degree_score
        return lambda H, y, tau: self.measure(H, y)

    def score(self) -> float:
        """Mean layer score of the current weights on the probe (all-reduced under DDP)."""
        x, y = self._probe_data()
        module = unwrap_model(self.model)
        flags = [(m, m.training) for m in module.modules()]
        fn = self._measure_fn()
        values = []
        try:
            module.eval()
            with torch.no_grad():
                with HiddenCapture(module, self.layer_names) as feats:
                    module(x)
                for name in self.layer_names:
                    H = feats[name]
                    try:
                        v = fn(H, y, self.tau)
                    except ValueError:  # the measures reject non-finite features
                        if bool(torch.isfinite(H).all()):
                            raise
                        v = math.nan
                    if not isinstance(v, torch.Tensor):
                        v = torch.tensor(v, dtype=torch.float64)
                    values.append(v.detach().to(torch.float64).reshape(()))
        finally:
            for m, training in flags:
                m.training = training
        device = self._device()
        scores = torch.stack([v.to(device) for v in values])
        scores = self._all_reduce_mean(scores)
        scores = scores.cpu().tolist()
        self.last_layer_scores = dict(zip(self.layer_names, scores, strict=True))
        return float(sum(scores) / len(scores))

    def _group(self) -> Any:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist, (self.process_group or dist.group.WORLD)
        return None, None

    def _all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        dist, group = self._group()
        if dist is None:
            return t
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t / dist.get_world_size(group)

    def _all_true(self, flag: bool) -> bool:
        dist, group = self._group()
        if dist is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return bool(t.item() > 0.5)

    def _cache_key(self) -> tuple:
        key = [self._probe_version, tuple(p._version for p in self._params())]
        if self._probe is not None:
            key.append(tuple(t._version for t in self._probe if isinstance(t, torch.Tensor)))
        if self.track_buffers:
            key.append(tuple(b._version for b in unwrap_model(self.model).buffers()))
        return tuple(key)

    def _digest_now(self) -> str:
        tensors: list[Any] = list(self._params())
        if self.track_buffers:
            tensors += list(unwrap_model(self.model).buffers())
        tensors += list(self._probe_data())
        return _digest(tensors)

    def _score_before(self) -> float:
        cached = None
        if self._cache is not None and self._cache[1] == self._cache_key():
            cached = self._cache[0]
        elif self._pending_cache is not None and self._pending_cache[1] == self._digest_now():
            cached = self._pending_cache[0]
        self._pending_cache = None
        if self._all_true(cached is not None):
            return cached
        return self.score()

    # ---------------------------------------------------------------- snapshot --------
    def _buffer_for(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        device = self.snapshot_device or t.device
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != device:
            buf = torch.empty(t.shape, dtype=t.dtype, device=device)
            self._buffers[key] = buf
        return buf

    @property
    def snapshot_bytes(self) -> int:
        """Bytes held by the snapshot buffers (params + inner state tensors)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _snapshot(self) -> None:
        src, dst = [], []
        params = self._params()
        for p in params:
            src.append(p)
            dst.append(self._buffer_for(("param", id(p)), p))
        saved_state = {}
        for owner, entries in self.optimizer.state.items():
            saved = {}
            for k, v in entries.items():
                if isinstance(v, torch.Tensor):
                    buf = self._buffer_for(("state", id(owner), k), v)
                    src.append(v)
                    dst.append(buf)
                    saved[k] = (v, buf)
                else:
                    saved[k] = (copy.deepcopy(v), None)
            saved_state[owner] = saved
        groups = self._group_hyperparameters()
        _copy_all(dst, src)
        n = len(params)
        self._saved = (list(zip(src[:n], dst[:n], strict=True)), saved_state, groups)

    def _group_hyperparameters(self) -> list[dict[str, Any]]:
        """Every param group's entries but ``params`` (what a rejection puts back)."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def _restore(self, groups_too: bool = True) -> None:
        param_pairs, saved_state, groups = self._saved
        dst, src = [p for p, _ in param_pairs], [b for _, b in param_pairs]
        state = self.optimizer.state
        for owner in [o for o in state if o not in saved_state]:
            del state[owner]
        for owner, saved in saved_state.items():
            entries = state[owner]
            for k in [k for k in entries if k not in saved]:
                del entries[k]
            for k, (value, buf) in saved.items():
                if buf is None:
                    entries[k] = copy.deepcopy(value)
                else:
                    entries[k] = value
                    dst.append(value)
                    src.append(buf)
        _copy_all(dst, src)
        if not groups_too:
            return
        for g, saved_group in zip(self.param_groups, groups, strict=True):
            for k in [k for k in g if k != "params" and k not in saved_group]:
                del g[k]
            g.update(saved_group)

    # ---------------------------------------------------------------- step ------------
    def _inner_step(self, closure: Any, first: bool) -> Any:
        if closure is not None and (first or isinstance(self.optimizer, torch.optim.LBFGS)):
            return self.optimizer.step(closure)
        return self.optimizer.step()

    def _acceptable(self, before: float, after: float) -> bool:
        if not math.isfinite(after):
            return False
        return not math.isfinite(before) or after >= before - self.tolerance

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Inner step, then check (every ``check_every`` calls). With a closure, it is
        evaluated by the inner optimizer as usual and the loss is returned; retries reuse
        the gradients it produced (LBFGS gets the closure on every attempt)."""
        self._relink()
        if self.scope == "window":
            return self._window_step(closure)
        checked = self.stats["steps"] % self.check_every == 0
        self.stats["steps"] += 1
        if not checked:
            loss = self._inner_step(closure, first=True)
            self._cache = None
            self._pending_cache = None
            self.last_decision = GuardDecision(True, None, None, 0, False, False)
            return loss

        self.stats["checks"] += 1
        before = self._score_before()
        self._snapshot()
        lrs = [g["lr"] for g in self.param_groups]
        loss = self._inner_step(closure, first=True)
        after = self.score()
        accepted, retries = self._acceptable(before, after), 0
        while not accepted and retries < self.max_retries:
            self._restore()
            retries += 1
            for g, lr in zip(self.param_groups, lrs, strict=True):
                g["lr"] = lr * self.backoff**retries
            self._inner_step(closure, first=False)
            after = self.score()
            accepted = self._acceptable(before, after)
        self.stats["retries"] += retries

        accepted, forced = self._decide(accepted)
        if accepted:
            for g, lr in zip(self.param_groups, lrs, strict=True):
                g["lr"] = lr  # the very same object: schedulers see no change
        else:
            self._restore()
        self._finish_check(accepted, before, after)
        self.last_decision = GuardDecision(accepted, before, after, retries, forced, True)
        return loss

    def _window_step(self, closure: Any) -> Any:
        """``scope="window"``: snapshot before the window's first step, judge after its last."""
        position = self.stats["steps"] % self.check_every
        self.stats["steps"] += 1
        if position == 0:
            self._window_before = self._score_before()
            self._snapshot()
        loss = self._inner_step(closure, first=True)
        self._cache = None
        self._pending_cache = None
        if position < self.check_every - 1:
            self.last_decision = GuardDecision(True, None, None, 0, False, False)
            return loss

        self.stats["checks"] += 1
        before, after = self._window_before, self.score()
        accepted, forced = self._decide(self._acceptable(before, after))
        if not accepted:
            self._restore(groups_too=False)
        self._finish_check(accepted, before, after)
        self.last_decision = GuardDecision(accepted, before, after, 0, forced, True)
        return loss

    def _decide(self, accepted: bool) -> tuple[bool, bool]:
        """(accepted, forced): a failing check is kept anyway after
        ``max_consecutive_rejects`` rejections in a row; updates the counters."""
        forced = False
        limit = self.max_consecutive_rejects
        if not accepted and limit is not None and self._consecutive_rejects >= limit:
            accepted = forced = True
        if accepted:
            self._consecutive_rejects = 0
            self.stats["accepted"] += 1
            self.stats["forced"] += int(forced)
        else:
            self._consecutive_rejects += 1
            self.stats["rejected"] += 1
        return accepted, forced

    def _finish_check(self, accepted: bool, before: float, after: float) -> None:
        """Cache the score of the weights now in place (after a restore, if any) and drop
        the snapshot."""
        kept = after if accepted else before
        self._cache = (kept, self._cache_key()) if math.isfinite(kept) else None
        self._saved = None
        self._window_before = None

    # ---------------------------------------------------------------- persistence -----
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict plus a ``"guard"`` entry (counters, last
        decision, and the cached score with a hash of what it was computed on)."""
        self._relink()
        sd = self.optimizer.state_dict()
        cache = None
        if self._cache is not None and self._cache[1] == self._cache_key():
            cache = {"score": self._cache[0], "digest": self._digest_now()}
        elif self._pending_cache is not None:
            cache = {"score": self._pending_cache[0], "digest": self._pending_cache[1]}
        sd["guard"] = {
            "stats": dict(self.stats),
            "consecutive_rejects": self._consecutive_rejects,
            "last_decision": None if self.last_decision is None else tuple(self.last_decision),
            "cache": cache,
            "window": self._window_payload(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict from :meth:`state_dict` (or a plain inner-optimizer one)."""
        sd = dict(state_dict)
        guard = sd.pop("guard", None)
        self.optimizer.load_state_dict(sd)
        self._relink()
        self._cache = None
        self._pending_cache = None
        self._saved = None
        if guard is not None:
            self.stats = {k: int(guard["stats"].get(k, 0)) for k in _STAT_KEYS}
            self._consecutive_rejects = int(guard["consecutive_rejects"])
            last = guard.get("last_decision")
            self.last_decision = None if last is None else GuardDecision(*last)
            cache = guard.get("cache")
            if cache is not None:
                self._pending_cache = (float(cache["score"]), str(cache["digest"]))
            self._load_window(guard.get("window"))

    def _window_payload(self) -> dict[str, Any] | None:
        """The open window (``scope="window"``, between its first and last step): S_before
        and the snapshot, with parameters by position; None when no window is open."""
        if self._window_before is None or self._saved is None:
            return None
        param_pairs, saved_state, _ = self._saved
        index = {id(p): i for i, (p, _) in enumerate(param_pairs)}
        state = {
            index[id(owner)]: {k: (v if buf is None else buf) for k, (v, buf) in saved.items()}
            for owner, saved in saved_state.items()
        }
        return {"before": self._window_before, "params": [b for _, b in param_pairs],
                "state": state}

    def _load_window(self, payload: dict[str, Any] | None) -> None:
        """Reopen a window saved by :meth:`_window_payload` on the current parameters."""
        self._window_before, self._saved = None, None
        if payload is None:
            return
        params = self._params()
        if len(payload["params"]) != len(params):
            raise ValueError(
                f"state_dict: the open guard window holds {len(payload['params'])} parameters, "
                f"this optimizer has {len(params)}"
            )
        param_pairs = []
        for p, saved in zip(params, payload["params"], strict=True):
            buf = self._buffer_for(("param", id(p)), p)
            buf.copy_(saved)
            param_pairs.append((p, buf))
        saved_state = {}
        for i, entries in payload["state"].items():
            owner, live = params[int(i)], self.optimizer.state.get(params[int(i)], {})
            saved = {}
            for k, v in entries.items():
                if not isinstance(v, torch.Tensor):
                    saved[k] = (copy.deepcopy(v), None)
                    continue
                target = live.get(k)
                if not (isinstance(target, torch.Tensor) and target.shape == v.shape
                        and target.dtype == v.dtype):
                    target = v.detach().clone().to(owner.device if v.ndim else v.device)
                buf = self._buffer_for(("state", id(owner), k), target)
                buf.copy_(v)
                saved[k] = (target, buf)
            saved_state[owner] = saved
        groups = self._group_hyperparameters()
        self._saved = (param_pairs, saved_state, groups)
        self._window_before = float(payload["before"])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("step", None)  # an LR scheduler's per-instance wrapper (holds a weakref)
        state["_window"] = self._window_payload()  # buffers are keyed by id(param): rebuilt
        state["_buffers"] = {}
        state["_saved"] = None
        state["_window_before"] = None
        state["_cache"] = None
        state["process_group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        window = state.pop("_window", None)
        super().__setstate__(state)
        self._relink()
        self._load_window(window)

    def __repr__(self) -> str:
        return (
            f"SeparabilityGuard({type(self.optimizer).__name__}, layers={self.layer_names}, "
            f"measure={self.measure!r}, tolerance={self.tolerance}, "
            f"check_every={self.check_every}, scope={self.scope!r}, "
            f"max_retries={self.max_retries}, "
            f"stats={self.stats})"
        )


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _resolve_names(module: nn.Module, layers: Any) -> list[str]:
    names = resolve_layers(module, layers)
    if not names:
        raise ValueError("layers: no hidden layer selected (pass layers=... explicitly)")
    return names
