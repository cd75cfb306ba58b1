"""One process per run folder: an OS file lock on ``<run dir>/.lsm_train.lock``
(user guide: ``docs/runs.md``).

:class:`RunLock` takes an exclusive, non-blocking lock (``fcntl.flock`` on POSIX,
``msvcrt.locking`` on Windows) and writes the holder's pid and host into the file. The
operating system releases the lock when the holder exits in any way (also ``kill -9``), so
a stale lock file never blocks a later run. A second process asking for the lock of a held
folder gets :class:`RunLockedError` naming the holder.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import IO, Any

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".lsm_train.lock"


class RunLockedError(ValueError):
    """Another process holds the run folder's lock."""


def _try_lock(f: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class RunLock:
    """Exclusive lock of a run folder, held from :meth:`acquire` to :meth:`release`
    (or the ``with`` block)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunLock:
        if self._file is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release
        f.seek(0)
        if not _try_lock(f):
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"the run folder {self.run_dir} is in use by {holder}: two processes in one "
                "run folder would overwrite each other's metrics and checkpoint. Wait for it "
                "to end, or use another folder (hydra.run.dir=<folder>)"
            )
        f.seek(0)
        f.truncate()
        f.write(f"lsm-train pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the OS lock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
