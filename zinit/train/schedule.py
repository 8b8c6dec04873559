"""The official LLaMA-Adapter optimisation recipe: scaled learning rate, per-iteration warmup + half-cycle cosine,
AdamW with weight decay on prompts but not on 1-D parameters (gates)."""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn


def scaled_lr(blr: float, global_batch: int) -> float:
    """``lr = blr · global_batch / 256`` (DESIGN.md §4).

    >>> scaled_lr(9e-3, 32)  # 8 GPUs × batch 4
    0.001125
    """
    return blr * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: float, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from 0, then half-cycle cosine to ``min_lr``.

    This is the official ``adjust_learning_rate`` with the epoch fraction ``step / steps_per_epoch`` written in
    steps: ``peak·step/warmup`` while ``step < warmup``, else
    ``min + (peak - min)·½·(1 + cos(π·(step - warmup)/(total - warmup)))``.

    >>> [round(lr_at(s, 10, 4, 1.0), 4) for s in (0, 2, 4, 7, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1e-12)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on parameters of 2+ dimensions (prompts, projections), none on 1-D ones (gates,
    biases, norms), as the official recipe (timm's ``param_groups_weight_decay``)."""
    decay, no_decay = [], []
    for _, p in named:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
