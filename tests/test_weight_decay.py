"""Weight decay by what a parameter is (a gate, a scale, a bias), not by its rank (zinit.train.schedule.decays)."""

from __future__ import annotations

import torch

from tiny import tiny_llama
from zinit.train.schedule import param_groups


def _zero_gradient_steps(model, steps=8, lr=1e-2, weight_decay=0.02):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(named, weight_decay), lr=lr, betas=(0.9, 0.95))
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    return dict(named)


def test_ia3_scaling_vectors_get_no_weight_decay():
    """peft stores IA3's vectors as (out, 1) / (1, in) matrices initialised to 1: with gradients of zero, AdamW's
    decay alone would pull them towards 0 (8 steps: 0.999986). They are scales, so they stay exactly 1."""
    from peft import IA3Config, get_peft_model

    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
    params = _zero_gradient_steps(model)
    scales = {n: p for n, p in params.items() if "ia3_l" in n}
    assert scales and all(p.ndim == 2 for p in scales.values())  # what made the rank rule decay them
    for name, p in scales.items():
        assert torch.equal(p, torch.ones_like(p)), name


def test_lora_factors_and_prompts_are_decayed_gates_are_not():
    from peft import LoraConfig, get_peft_model

    import zinit

    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    after = _zero_gradient_steps(lora)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every LoRA factor shrinks

    model = zinit.inject(tiny_llama(), 2, K=3)
    for a in zinit.layer_adapters(model).values():
        with torch.no_grad():
            a.gate.fill_(0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    after = _zero_gradient_steps(model)
    for n in before:
        assert torch.equal(before[n], after[n]) == n.endswith("gate"), n
