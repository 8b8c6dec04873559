"""One training run per output folder: an exclusive ``flock`` on ``OUTPUT/.zinit.lock`` for the whole
:func:`zinit.train.train` call.

Rank 0 takes the lock (``LOCK_EX | LOCK_NB``, so a second run is refused at once instead of waiting) and writes its
pid, host, start time and command line into the file; under ``torchrun`` the outcome is broadcast so every rank
raises the same refusal instead of hanging in a barrier. The kernel drops the lock when its holder exits, however it
exits (SIGKILL included), so a stale file never blocks a later run; the file itself is left in place (deleting a
lock file is what makes two holders possible).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import ZinitStateError
from . import dist as D

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".zinit.lock"
_held: set[str] = set()  # folders this process holds through hold_output (on every rank)


class OutputInUse(ZinitStateError):
    """Another training run holds the output folder's lock. ``holder`` is what it wrote into the lock file (``pid``,
    ``host``, ``started``, ``argv``), or None if that could not be read."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder


def describe_refusal(folder: str | Path, holder: dict[str, Any] | None) -> str:
    """The one-line error for a run refused because ``holder`` holds ``folder``."""
    folder = Path(folder)
    if not holder or "pid" not in holder:
        return (f"{folder} is in use by another training run (its lock {folder / LOCK_NAME} is held; pid unknown): "
                "wait for it to finish or kill it, then run this command again")
    pid, host = holder["pid"], holder.get("host", "?")
    where = "" if host == socket.gethostname() else f" on host {host}"
    command = " ".join(str(a) for a in holder.get("argv", []))
    command = f", `{command[:160]}`" if command else ""
    launcher = f"; its launcher is pid {holder['launcher_pid']}" if holder.get("launcher_pid") else ""
    return (f"{folder} is in use by another training run: pid {pid}{where} (started {holder.get('started', '?')}"
            f"{command}{launcher}). Wait for it to finish or kill it (kill {pid}{where}), then run this command "
            "again")


class OutputLock:
    """The exclusive lock on ``folder/.zinit.lock`` (non-blocking). Use :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any] | None:
        """What the current holder wrote into the lock file, or None (no file, empty, or unreadable)."""
        for _ in range(10):  # the holder writes just after it locks: give it a moment
            try:
                text = self.path.read_text()
            except OSError:
                return None
            if text.strip():
                try:
                    data = json.loads(text)
                except ValueError:
                    return None
                return data if isinstance(data, dict) else None
            time.sleep(0.02)
        return None

    def acquire(self) -> None:
        """Take the lock and record this process in it; raise :class:`OutputInUse` (naming the holder) if another
        process holds it. On a filesystem without ``flock`` this warns and carries on unguarded."""
        if fcntl is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise OutputInUse(describe_refusal(self.folder, holder), holder) from None
        except OSError as exc:
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({exc}); two runs into {self.folder} would not be stopped",
                          RuntimeWarning, stacklevel=2)
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv,
                "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        if D.under_launcher():
            info["launcher_pid"] = os.getppid()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the lock file and unlock it (a no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


@contextlib.contextmanager
def hold_output(folder: str | Path, env: D.Dist) -> Iterator[OutputLock | None]:
    """Create ``folder`` and hold its lock for the ``with`` block, on rank 0; every rank learns the outcome.

    Raises :class:`OutputInUse` on every rank when another run holds the folder. Other failures of rank 0 (the folder
    cannot be created) raise there, and a RuntimeError pointing at rank 0 on the other ranks. Nested calls for a
    folder this process already holds do nothing (yield None): a recipe may hold its output folder around its own
    evaluation and saving, and the :func:`~zinit.train.train` inside it runs under that hold.
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        yield None
        return
    lock = OutputLock(folder)
    status, error = 0, None  # 0: held, 1: in use, 2: rank 0 failed otherwise
    if env.is_main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OutputInUse as exc:
            status, error = 1, exc
        except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            status, error = 2, exc
    status = D.broadcast_int(status, env.device)  # also the barrier that the folder exists
    if status:
        if error is not None:
            raise error
        if status == 1:
            holder = lock.holder()
            raise OutputInUse(describe_refusal(folder, holder), holder)
        raise ZinitStateError(f"rank 0 could not prepare the output folder {folder}; its error says why")
    _held.add(key)
    try:
        yield lock
    finally:
        _held.discard(key)
        lock.release()
