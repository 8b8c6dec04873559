"""The official LLaMA-Adapter optimisation recipe: scaled learning rate, per-iteration warmup + half-cycle cosine,
AdamW with weight decay on prompts and weight matrices, none on gates, scales, biases and norms (:func:`decays`)."""

from __future__ import annotations

import math
from typing import Iterable

from torch import nn


def scaled_lr(blr: float, global_batch: int) -> float:
    """``lr = blr · global_batch / 256`` (docs/design.md §4).

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


#: Parameter names (the last part of a parameter's full name) of what is a gate, a scale or a bias whatever its
#: layout: the official LLaMA-Adapter code stores its gate as [1, H, 1, 1], so rank does not say what it is.
NO_DECAY_NAMES = ("gate", "adaption_gate", "scale", "bias")
#: peft's per-adapter parameter dicts (``<module>.ia3_l.<adapter name>``) that hold scales: IA3's vectors, stored as
#: (out, 1) / (1, in) matrices initialised to 1.
NO_DECAY_DICTS = ("ia3_l",)


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies to ``param``: yes for weight matrices (prompts, projections, LoRA factors,
    task heads), no for what is a gate, a scale or a bias, or a norm weight, in any layout (:data:`NO_DECAY_NAMES`:
    decaying IA3's or V2's scales pulls them from 1 towards 0, a gate's from 0 is the method's own regulariser
    turned off), and no for any 1-D parameter (timm's rule, which the official recipe uses).

    >>> import torch
    >>> p = lambda *shape: nn.Parameter(torch.ones(shape))
    >>> decays("layers.3.prompt", p(10, 64)), decays("layers.3.gate", p(4)), decays("attn.gate", p(1, 4, 1, 1))
    (True, False, False)
    >>> decays("q_proj.lora_A.default.weight", p(8, 64)), decays("k_proj.ia3_l.default", p(64, 1))
    (True, False)
    >>> decays("block_sparse_moe.gate.weight", p(8, 64))  # a router's weight matrix, named 'gate' by its module
    True
    """
    if param.ndim <= 1:
        return False
    parts = name.split(".")
    if parts[-1] in NO_DECAY_NAMES or parts[-1].endswith(("_gate", "_bias", "_scale")):
        return False
    return not (len(parts) >= 2 and parts[-2] in NO_DECAY_DICTS)


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on what :func:`decays` says (prompts and weight matrices), none on gates, scales,
    biases and norms in any layout.

    The official LLaMA-Adapter code (timm's ``add_weight_decay``) decays every parameter of 2+ dimensions, which
    includes its [1, H, 1, 1] gates: zinit gives gates none (its gates are [H], and a decayed gate is pulled towards
    0, the closed state), a deliberate difference that the README states."""
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
