"""Atomic checkpoints and the RNG state they carry (user guide: ``docs/runs.md``).

A checkpoint is a ``torch.save`` dict written to ``<path>.tmp`` and moved over ``<path>``
with ``os.replace`` (atomic on POSIX and Windows), so a crash, a signal, a full disk or a
file-size limit during the write leaves the previous checkpoint intact; a failed write
raises :class:`CheckpointWriteError` and removes the temporary file. It includes the
Python, numpy and torch (CPU and CUDA) RNG states, so a resumed run draws the same random
numbers as an uninterrupted one. Every value is a tensor or a plain Python object, so the
file loads with PyTorch's safe loader (``torch.load(path)``, ``weights_only=True``); an
unreadable file (empty, truncated, not a checkpoint) raises :class:`CheckpointReadError`
naming it.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointReadError",
    "CheckpointWriteError",
]


class CheckpointReadError(ValueError):
    """A checkpoint file exists but cannot be read (empty, truncated, not a checkpoint)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file-size limit, permissions)."""


def rng_state() -> dict[str, Any]:
    """The Python, numpy and torch RNG states; the numpy state as a tensor (safe loader)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos),
                  int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`. The torch states are byte tensors that torch wants on the
    CPU, also when the checkpoint was loaded with ``map_location="cuda"``; CUDA states are
    set for the devices present (a run resumed on fewer GPUs sets the first ones)."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    if torch.is_tensor(keys):
        keys = keys.cpu().numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Raises :class:`CheckpointWriteError` when the write fails; ``path`` is then unchanged.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # serialized first: a failed write is then a plain OSError
        torch.save(state, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint exists"
        raise CheckpointWriteError(
            err.errno,
            f"could not write the checkpoint {path} ({err.strerror or err}; a full disk or "
            f"a file-size limit?); {kept}",
        ) from err
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with the safe loader (``weights_only=True``).

    Raises FileNotFoundError when ``path`` is missing and :class:`CheckpointReadError`
    when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle, EOF and unpickler errors
        if "Unsupported global" in str(err):  # a class the safe loader does not allow
            raise CheckpointReadError(
                f"the checkpoint {path} holds objects the safe loader refuses (written by an "
                "earlier lsm_train, which kept the numpy RNG state as an array, or not by "
                "lsm_train): if you trust the file, load it with torch.load(path, "
                "weights_only=False) and save it again; or start anew with resume=false"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointReadError(
            f"the checkpoint {path} is unreadable ({path.stat().st_size} bytes; "
            f"{type(err).__name__}: {first[:200]}): it is truncated, damaged or not an "
            "lsm_train checkpoint; start anew with resume=false (or resume=<another file>)"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointReadError(
            f"the checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict; "
            "start anew with resume=false"
        )
    return state
