"""State dicts and pickling of :class:`~lsm_train.guard.SeparabilityGuard` (docs/guard.md).

``state_dict()`` is the inner optimizer's plus a ``"guard"`` entry: counters, the last
decision, the cached score with a content digest of what it was computed on (reused after
a load only if the digest matches), the open window's snapshot, the acceptance history and
the state of the guard's random generator. So a resumed run takes bitwise the decisions of
an uninterrupted one. ``copy.deepcopy`` / pickle copy the model and the inner optimizer
with the guard; the snapshot buffers and the cached score are rebuilt, a custom
``process_group`` is not copied.
"""

from __future__ import annotations

from typing import Any

from lsm_train.guard.rule import GuardDecision, Score, Scored

__all__ = ["GuardPersistence"]


def _score_payload(score: Score, digest: str) -> dict[str, Any]:
    reps = None if score.replicates is None else list(score.replicates)
    return {"score": score.value, "replicates": reps, "digest": digest}


def _score_of(payload: dict[str, Any]) -> Score:
    reps = payload.get("replicates")
    return Score(float(payload["score"]), None if reps is None else tuple(map(float, reps)))


class GuardPersistence:
    """``state_dict`` / ``load_state_dict`` / ``__getstate__`` / ``__setstate__``."""

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"guard"`` entry."""
        self._relink()
        sd = self.optimizer.state_dict()
        cache = None
        if self._cache is not None and self._cache[1] == self._key():
            scored = self._with_replicates(self._cache[0], local=True)  # no collective here
            cache = _score_payload(scored.score, self._digest())
        elif self._pending is not None:
            cache = _score_payload(*self._pending)
        sd["guard"] = {
            "stats": dict(self.stats),
            "consecutive_rejects": self._rejects,
            "consecutive_nonfinite": self._nonfinite_run,
            "last_decision": None if self.last_decision is None else tuple(self.last_decision),
            "cache": cache,
            "window": self._window_payload(),
            "acceptance": self.acceptance.state(),
            "rng": self.rng.getstate(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain inner-optimizer one)."""
        sd = dict(state_dict)
        guard = sd.pop("guard", None)
        self.optimizer.load_state_dict(sd)
        self._relink()
        self._cache = self._pending = None
        self.snapshot.clear()
        self._window_before = None
        if guard is None:
            return
        self.stats = {k: int(guard["stats"].get(k, 0)) for k in self.stats}
        self._rejects = int(guard["consecutive_rejects"])
        self._nonfinite_run = int(guard.get("consecutive_nonfinite", 0))
        last = guard.get("last_decision")
        self.last_decision = None if last is None else GuardDecision(*last)
        cache = guard.get("cache")
        if cache is not None and self.scorer is not None:
            self._pending = (_score_of(cache), str(cache["digest"]))
        self._load_window(guard.get("window"))
        self.acceptance.load(guard.get("acceptance"))
        if guard.get("rng") is not None:
            self.rng.setstate(_as_rng_state(guard["rng"]))

    def _window_payload(self) -> dict[str, Any] | None:
        """The open window (``scope="window"``): S_before and the snapshot; else None."""
        payload = self.snapshot.payload()
        if self._window_before is None or payload is None:
            return None
        before = self._with_replicates(self._window_before, local=True).score
        reps = None if before.replicates is None else list(before.replicates)
        return {"before": before.value, "before_replicates": reps, **payload}

    def _load_window(self, payload: dict[str, Any] | None) -> None:
        self._window_before = None
        self.snapshot.clear()
        if payload is None:
            return
        self.snapshot.load_payload(payload, self._params(), self.optimizer)
        reps = payload.get("before_replicates")
        self._window_before = Scored(Score(
            float(payload["before"]), None if reps is None else tuple(map(float, reps))))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("step", None)  # an LR scheduler's per-instance wrapper (holds a weakref)
        state["_window"] = self._window_payload()  # buffers are keyed by id(param): rebuilt
        state["snapshot"] = type(self.snapshot)(self.snapshot.device)
        state["_window_before"] = None
        state["_cache"] = None
        state["process_group"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        window = state.pop("_window", None)
        super().__setstate__(state)
        self._relink()
        self._load_window(window)


def _as_rng_state(state: Any) -> tuple:
    """``random.Random`` state from a state dict (tuples may come back as lists)."""
    version, internal, gauss = state
    return (int(version), tuple(int(v) for v in internal), gauss)
