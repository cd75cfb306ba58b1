"""A bit-exact snapshot of parameters, inner-optimizer state and param-group settings
(see docs/guard.md).

``take`` copies every parameter and every tensor of ``optimizer.state`` into buffers that
are allocated once and reused (``nbytes == bytes(params) + bytes(state tensors)``), and
records the param groups' hyperparameters. ``restore`` puts all of it back bit for bit:
state created after ``take`` (e.g. Adam's first ``exp_avg``) is deleted, the very same
state tensor objects are kept (written in place). ``payload`` / ``load_payload`` turn the
held snapshot into plain tensors keyed by parameter position and back, for state dicts
and pickling.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["Snapshot", "group_hyperparameters"]


def group_hyperparameters(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every param group's entries but ``params`` (what a rejection puts back)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in param_groups]


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


class Snapshot:
    """Reusable snapshot buffers on ``device`` (None: each tensor's own device)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._saved: Any = None  # (param pairs, saved state, group hyperparameters)

    @property
    def held(self) -> bool:
        return self._saved is not None

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop the held snapshot (the buffers stay allocated for the next ``take``)."""
        self._saved = None

    def _buffer_for(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        device = self.device or t.device
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != device:
            buf = torch.empty(t.shape, dtype=t.dtype, device=device)
            self._buffers[key] = buf
        return buf

    def take(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        src, dst = [], []
        for p in params:
            src.append(p)
            dst.append(self._buffer_for(("param", id(p)), p))
        saved_state = {}
        for owner, entries in optimizer.state.items():
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
        _copy_all(dst, src)
        n = len(params)
        pairs = list(zip(src[:n], dst[:n], strict=True))
        self._saved = (pairs, saved_state, group_hyperparameters(optimizer.param_groups))

    def restore(self, optimizer: torch.optim.Optimizer, groups_too: bool = True) -> None:
        """Put parameters, state (and, with ``groups_too``, group settings) back."""
        param_pairs, saved_state, groups = self._saved
        dst, src = [p for p, _ in param_pairs], [b for _, b in param_pairs]
        state = optimizer.state
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
        for g, saved_group in zip(optimizer.param_groups, groups, strict=True):
            for k in [k for k in g if k != "params" and k not in saved_group]:
                del g[k]
            g.update(saved_group)

    def payload(self) -> dict[str, Any] | None:
        """The held snapshot as tensors keyed by parameter position (None: none held)."""
        if self._saved is None:
            return None
        param_pairs, saved_state, _ = self._saved
        index = {id(p): i for i, (p, _) in enumerate(param_pairs)}
        state = {
            index[id(owner)]: {k: (v if buf is None else buf) for k, (v, buf) in saved.items()}
            for owner, saved in saved_state.items()
        }
        return {"params": [b for _, b in param_pairs], "state": state}

    def load_payload(self, payload: dict[str, Any], params: list[torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> None:
        """Hold the snapshot of :meth:`payload` again, on the current ``params``."""
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
            owner, live = params[int(i)], optimizer.state.get(params[int(i)], {})
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
        self._saved = (param_pairs, saved_state, group_hyperparameters(optimizer.param_groups))
