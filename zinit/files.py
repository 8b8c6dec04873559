"""Files written so that nothing half-written ever replaces a good one: atomic writes (temporary file, fsync,
rename), JSON read and written through them, and the file mode a plain ``open(path, "w")`` would give.

Used by the adapter files (:mod:`zinit.io`), the trainer's checkpoints and every recipe's outputs. A temporary file
is made beside its target and renamed into place, so an interrupted write (an exception, Ctrl-C, a full disk) leaves
the earlier file untouched and no temporary file behind; new files get the umask's mode (``0o644`` under ``022``),
never ``mkstemp``'s ``0o600``. A full disk raises an OSError (errno ``ENOSPC``) that says so and names the file.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

#: errno values that mean "the disk (or the user's quota) is full".
DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask (umask), read without changing it where the system allows.

    Linux reports it in ``/proc/self/status`` (``Umask:``). Elsewhere it is read by setting and at once restoring it
    (under a lock; in between it is ``0o077``, so a file another thread creates in that instant is only the more
    private).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask (``0o644`` under ``022``)."""
    return 0o666 & ~current_umask()


def disk_full_error(exc: OSError, what: str) -> OSError:
    return OSError(exc.errno, f"disk full (no space left on the device) while writing {what}; what was there before "
                              "is unchanged: free some space and write it again")


def _explained(exc: OSError, path: Path) -> OSError:
    """``exc`` as an error naming ``path``: a full disk says so; other errors keep their type."""
    if exc.errno in DISK_FULL:
        return disk_full_error(exc, str(path))
    if isinstance(exc, PermissionError):
        return PermissionError(exc.errno, f"cannot write {path}: permission denied on {path.parent}")
    return exc


def discard(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (best effort: not every system can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stage(path: Path, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` on a new temporary file beside ``path``, give it the default mode, fsync it and return its
    name (not yet renamed). Any failure removes the temporary file; a full disk raises an OSError saying so."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        new = _explained(exc, path)
        if new is exc:
            raise
        raise new from exc
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), default_file_mode())
            else:  # pragma: no cover - Windows
                os.chmod(tmp, default_file_mode())
            os.fsync(f.fileno())
    except BaseException as exc:
        discard(tmp)
        if isinstance(exc, OSError):
            new = _explained(exc, path)
            if new is not exc:
                raise new from exc
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A crash or an exception inside ``write`` (Ctrl-C included) leaves any earlier file at ``path`` untouched and no
    temporary file behind. The new file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the
    umask), whatever mode an earlier file had. A full disk raises an OSError (errno ``ENOSPC``) naming ``path``.
    """
    path = Path(path)
    tmp = stage(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON (with a final newline) through :func:`atomic_write`."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike[str], what: str, hint: str = "") -> Any:
    """Parse a JSON file; a missing, empty or malformed file raises an error naming ``what`` and the path.

    ``hint`` (e.g. "save the adapter again") is appended to the message of an empty or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(f"{what} {path} is a folder, not a file")
        raise FileNotFoundError(f"{what} {path} does not exist")
    tail = f"; {hint}" if hint else ""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{what} {path} is empty ({len(data)} bytes){tail}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not valid JSON (not UTF-8 text){tail}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}{tail}") from None
