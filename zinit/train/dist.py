"""Process-group set-up for ``torchrun``: gloo on CPU (testable anywhere), nccl on GPUs; a no-op for one process.

zinit trains data-parallel over the adapter: every process holds a frozen replica of the model (or, with FSDP2, a
shard of it) and after each optimizer step's backward the adapter's gradients (a few MB) are averaged with one
all-reduce, which is what DistributedDataParallel does for the parameters that require grad.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        raise RuntimeError(f"device={device!r} was asked for, but CUDA is not available here; use --device cpu")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev)


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


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` to every process (so every replica starts identical)."""
    if not dist.is_initialized():
        return
    for t in tensors:
        dist.broadcast(t, src)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
