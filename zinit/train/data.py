"""Batching: deterministic length-grouped batches (resumable from a step), sharded across processes, and
dynamic padding."""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch


def epoch_batches(lengths: Sequence[int], batch_size: int, world_size: int, epoch: int, seed: int,
                  group_by_length: bool = True, mega: int = 64) -> list[list[list[int]]]:
    """This epoch's batches: ``[step][rank] -> example indices``, the same on every process.

    Examples are shuffled with a generator seeded by ``(seed, epoch)``; with ``group_by_length`` each run of
    ``mega`` global batches is sorted by length (so padding is small) and the batches are shuffled again (so lengths
    do not trend over the epoch). Every step holds ``world_size`` full batches; the remainder is dropped.

    >>> epoch_batches([3, 1, 2, 5, 4, 6], batch_size=1, world_size=2, epoch=0, seed=0, mega=2)
    [[[4], [0]], [[5], [3]], [[2], [1]]]
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    per_step = batch_size * world_size
    steps = len(order) // per_step
    order = order[: steps * per_step]
    if group_by_length:
        chunk = per_step * mega
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    steps_list = [batches[s:s + world_size] for s in range(0, len(batches), world_size)]
    if group_by_length:
        rng.shuffle(steps_list)
    return steps_list


def pad_collate(items: Sequence[dict[str, Any]], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the longest item, or to ``pad_to``.

    >>> pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    {'input_ids': tensor([[5, 6, 7],
            [8, 0, 0]]), 'labels': tensor([[-100,    6,    7],
            [   8, -100, -100]]), 'attention_mask': tensor([[1, 1, 1],
            [1, 0, 0]])}
    """
    width = pad_to or max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, x in enumerate(items):
        n = min(len(x["input_ids"]), width)
        ids[row, :n] = torch.tensor(x["input_ids"][:n])
        labels[row, :n] = torch.tensor(x["labels"][:n])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
