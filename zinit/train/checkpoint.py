"""Training checkpoints: trainable tensors + optimizer + step/data position + RNG states, written atomically.

One file, ``checkpoint.pt``, written with ``torch.save`` to a temporary name and renamed into place (so a run
killed mid-write keeps the previous checkpoint) and read back with ``torch.load(weights_only=True)`` (tensors,
numbers, strings and containers only: nothing is unpickled).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "zinit-train-checkpoint/1"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    path = Path(folder) / CHECKPOINT_NAME
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    return path


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``folder``, or None if there is none. A file that is not one raises, naming it."""
    path = Path(folder) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} cannot be read as a zinit checkpoint ({exc}); move it away to start afresh") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a zinit training checkpoint ({FORMAT})")
    return state


def check_same_run(saved: dict[str, Any], current: dict[str, Any], folder: str | Path) -> None:
    """Refuse to resume a checkpoint written by a run of another configuration, naming the fields that differ."""
    keys = sorted(set(saved) | set(current))
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(
            f"{Path(folder) / CHECKPOINT_NAME} belongs to a run with another configuration ("
            + "; ".join(diff) + "). Use another --output folder, or delete the checkpoint to start afresh."
        )
