"""Process-group set-up for ``torchrun``: gloo on CPU (testable anywhere), nccl on GPUs; a no-op for one process.

zinit trains data-parallel over the adapter: every process holds a frozen replica of the model (or, with FSDP2, a
shard of it) and after each optimizer step's backward the adapter's gradients (a few MB) are averaged with one
all-reduce, which is what DistributedDataParallel does for the parameters that require grad.

Under a launcher (``torchrun``), :func:`setup` also makes the worker exit when its launcher dies: torchrun starts
workers in their own session, so a launcher killed with SIGKILL would otherwise leave them running, and writing into
the output folder while a resumed run starts there (see :func:`watch_launcher`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ZinitStateError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick this process's device.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ZinitStateError(f"device={device!r} was asked for, but CUDA is not available here; use --device cpu")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    watch_launcher()
    return Dist(rank, world, local, dev)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_launcher_pid: int | None = None  # the parent pid recorded when the watch started (None: no watch)


def under_launcher() -> bool:
    """True when this process is a worker started by ``torchrun`` (``TORCHELASTIC_RUN_ID`` is set), unless
    ``ZINIT_WATCH_LAUNCHER=0``. Processes started any other way (by hand, a cluster scheduler, ``nohup``) are never
    watched: their parent may be a shell that is allowed to exit."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env and env.get("ZINIT_WATCH_LAUNCHER", "1") != "0"


def watch_launcher(interval: float = 0.5) -> bool:
    """Make this worker exit when its launcher dies; a no-op (returns False) outside a launcher, or if already on.

    Only torchrun workers are watched (:func:`under_launcher`). Two guards, because either alone can miss: on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` has the
    kernel send SIGTERM the moment the parent dies (the trainer's SIGTERM handler sees the parent is gone and exits;
    outside training SIGTERM's default action ends the process); and a daemon thread compares ``os.getppid()`` with
    the parent pid recorded now every ``interval`` seconds (a dead launcher's workers are re-parented), then writes
    one line to stderr and ends the process with ``os._exit``. The kernel releases the output folder's lock on exit.
    """
    global _launcher_pid
    if _launcher_pid is not None or not under_launcher():
        return False
    parent = os.getppid()
    _launcher_pid = parent
    if sys.platform.startswith("linux"):  # torchrun starts its workers from its main thread (a launcher's
        try:  # short-lived thread would fire the signal while the launcher still lives)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the heartbeat thread still guards
    exit_if_orphaned()  # the launcher died before the kernel knew to tell us

    def heartbeat() -> None:
        while True:
            time.sleep(interval)
            exit_if_orphaned()

    threading.Thread(target=heartbeat, name="zinit-launcher-watch", daemon=True).start()
    return True


def launcher_gone() -> bool:
    """True when :func:`watch_launcher` is on and the launcher it recorded is no longer this process's parent."""
    return _launcher_pid is not None and os.getppid() != _launcher_pid


def exit_if_orphaned(wait: float = 0.0) -> None:
    """If the launcher is gone, say so on stderr in one line and end this process at once (``os._exit(143)``): an
    orphaned worker must not keep writing into an output folder that a resumed run may be using.

    ``wait``: keep checking for up to that many seconds. The kernel sends the parent-death signal as soon as the
    launcher's thread that started this worker exits, which can be a moment before the whole launcher is gone and
    this worker re-parented; a SIGTERM handler waits that moment out to tell "launcher died" from "launcher asks us
    to stop".
    """
    if _launcher_pid is None:
        return
    deadline = time.monotonic() + wait
    while not launcher_gone():
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)
    message = (f"zinit: the launcher (pid {_launcher_pid}) of this worker (rank {os.environ.get('RANK', '?')}, "
               f"pid {os.getpid()}) is gone; exiting so no orphan writes into the output folder\n")
    try:
        os.write(2, message.encode())
    except OSError:
        pass
    os._exit(128 + int(signal.SIGTERM))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The trainer's precision for ``device``: bf16 autocast on CUDA, nothing (fp32) elsewhere. Evaluation uses it
    too, so a model is scored in the precision it was trained in."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across processes in place, with one collective (flattened)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_max(values: list[int], device: torch.device) -> list[int]:
    """The element-wise maximum of ``values`` over all processes (one small collective; ``values`` itself with one
    process). Every process must call it at the same point."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def broadcast_int(value: int, device: torch.device, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every process (``value`` itself with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src)
    return int(t.item())


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` to every process (so every replica starts identical)."""
    if not dist.is_initialized():
        return
    for t in tensors:
        dist.broadcast(t, src)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
