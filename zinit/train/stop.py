"""Ctrl-C (SIGINT) and SIGTERM during training: finish the step, save a checkpoint, exit 130 / 143.

While :func:`zinit.train.train` runs, :class:`StopSignals` replaces the SIGINT and SIGTERM handlers (main thread
only; the previous ones come back afterwards). The first signal only sets a flag, which the loop reads after each
optimizer step (agreed across processes under torchrun, so every rank stops at the same step); it then writes a
checkpoint and raises :class:`TrainingInterrupted`. The first signal also restores SIGINT's default action, so a
second Ctrl-C ends the process at once: the checkpoint on disk is then the last complete one, as checkpoints are
written to a temporary file and renamed into place. Repeated SIGTERMs are one request (a scheduler's SIGTERM and
torchrun's forwarded copy arrive together); torchrun itself follows up with SIGKILL after its grace period.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from . import dist as D

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_current: "StopSignals | None" = None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(SystemExit):
    """SIGINT or SIGTERM stopped :func:`zinit.train.train` after an optimizer step, and that step's checkpoint is
    saved in ``output``; running the same command again resumes from it.

    A :class:`SystemExit` whose ``code`` is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM): a command
    that lets it propagate exits with the status a shell reports for a process stopped by that signal.
    """

    def __init__(self, signum: int, step: int, total: int, output: str | Path):
        super().__init__(128 + int(signum))
        self.signum, self.step, self.total, self.output = int(signum), step, total, Path(output)

    @property
    def message(self) -> str:
        return (f"zinit: interrupted by {signal_name(self.signum)} at step {self.step}/{self.total}; checkpoint saved "
                f"in {self.output}; run the same command again to resume")

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """Context manager: catch SIGINT/SIGTERM as a stop request (``self.signum``) for the duration of the block.

    ``announce``: write one line to stderr when the first signal arrives (the main process does). A signal whose
    handler is SIG_IGN (a background job's SIGINT) or was installed from C is left alone. Outside the main thread
    nothing is installed (Python only runs signal handlers there).
    """

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._outer: StopSignals | None = None

    def __enter__(self) -> "StopSignals":
        global _current
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                previous = signal.getsignal(s)
                if previous is None or previous == signal.SIG_IGN:
                    continue
                self._previous[s] = previous
                signal.signal(s, self._handle)
        self._outer, _current = _current, self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _current
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        _current = self._outer

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a repeat: torchrun forwards its own copy of a SIGTERM the worker also got
            return
        self.signum = signum  # first, so a signal arriving during the wait below is seen as a repeat
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        # the kernel's SIGTERM for a dead launcher (torchrun's own SIGTERM leaves it alive): exit, write nothing
        D.exit_if_orphaned(wait=1.0 if signum == signal.SIGTERM else 0.0)
        if self.announce:
            line = (f"\nzinit: {signal_name(signum)} received: stopping after this step and saving a checkpoint "
                    "(press Ctrl-C again to quit at once, keeping the last checkpoint)\n")
            try:
                os.write(2, line.encode())  # not print(): the handler may have interrupted a write to stderr
            except OSError:
                pass


def stop_requested() -> int | None:
    """The signal number (SIGINT or SIGTERM) that asked the running :func:`zinit.train.train` call to stop, or None.

    Training stops after the current step anyway; a callback doing long work (an evaluation) may check this to
    return early.
    """
    return _current.signum if _current is not None else None
