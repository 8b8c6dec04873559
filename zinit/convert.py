"""Convert adapters from other implementations into zinit's canonical state dict.

Canonical keys: ``layers.{n}.prompt`` ``[K, C]`` and ``layers.{n}.gate`` ``[H]`` (per head) or ``[1]`` (per layer),
with ``n`` the backbone's own layer index. Load the result with :func:`zinit.load_adapter_state_dict` into a model
injected with matching options, as each converter's docstring says.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

_V1_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.attention\.gate$")
_V1_QUERY = re.compile(r"(?:^|\.)adapter_query\.weight$")
_PEFT = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(adaption_prompt|adaption_gate)$")


def load_state_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a PyTorch ``.pth``/``.bin`` file without unpickling code.

    ``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses anything but tensors and containers.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def from_llama_adapter_v1(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official LLaMA-Adapter v1 layout → canonical.

    The official release stores ``adapter_query.weight`` ``[L·K, C]`` (row block i is the i-th adapted layer, bottom
    to top) and ``layers.{n}.attention.gate`` ``[1, H, 1, 1]`` per adapted layer n. Keys may carry a prefix.

    Inject with ``gate="head"`` and ``gate_fn="identity"`` for the released checkpoint (the official inference code
    multiplies by the raw gate), or ``gate_fn="tanh"`` for adapters trained by ``alpaca_finetuning_v1``, which uses
    ``tanh(gate)``; the adapted layers are the keys' layer indices (the top 30 of LLaMA-7B for the release).

    >>> import torch
    >>> official = {"adapter_query.weight": torch.zeros(4, 8), "layers.2.attention.gate": torch.zeros(1, 2, 1, 1),
    ...             "layers.3.attention.gate": torch.ones(1, 2, 1, 1)}
    >>> {k: tuple(v.shape) for k, v in from_llama_adapter_v1(official).items()}
    {'layers.2.prompt': (2, 8), 'layers.2.gate': (2,), 'layers.3.prompt': (2, 8), 'layers.3.gate': (2,)}
    """
    queries = [k for k in state_dict if _V1_QUERY.search(k)]
    if len(queries) != 1:
        raise ValueError(
            f"expected exactly one 'adapter_query.weight' in an official LLaMA-Adapter v1 state dict, found {queries}"
        )
    gates = {int(m.group(1)): v for k, v in state_dict.items() if (m := _V1_GATE.search(k))}
    if not gates:
        raise ValueError("no 'layers.N.attention.gate' keys: not an official LLaMA-Adapter v1 state dict")
    prompts = state_dict[queries[0]]
    layers = sorted(gates)
    if prompts.dim() != 2 or prompts.shape[0] % len(layers):
        raise ValueError(
            f"adapter_query.weight has shape {tuple(prompts.shape)}: its rows must be L·K for the {len(layers)} gated layers"
        )
    K = prompts.shape[0] // len(layers)
    out: dict[str, Tensor] = {}
    for i, n in enumerate(layers):
        out[f"layers.{n}.prompt"] = prompts[i * K : (i + 1) * K].clone()
        out[f"layers.{n}.gate"] = gates[n].reshape(-1).clone()
    return out


def from_peft(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """peft adaption-prompt layout → canonical.

    peft stores ``...layers.{n}.self_attn.adaption_prompt`` ``[1, K, C]`` and ``...layers.{n}.self_attn.adaption_gate``
    ``[1]`` (one raw scalar per layer). Inject with ``gate="layer"`` and ``gate_fn="identity"`` to compute what peft
    computes.

    >>> import torch
    >>> peft_state = {"base_model.model.model.layers.5.self_attn.adaption_prompt": torch.zeros(1, 3, 8),
    ...               "base_model.model.model.layers.5.self_attn.adaption_gate": torch.zeros(1)}
    >>> {k: tuple(v.shape) for k, v in from_peft(peft_state).items()}
    {'layers.5.prompt': (3, 8), 'layers.5.gate': (1,)}
    """
    found: dict[int, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        m = _PEFT.search(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not found:
        raise ValueError("no '...layers.N.self_attn.adaption_prompt' keys: not a peft adaption-prompt state dict")
    out: dict[str, Tensor] = {}
    for n in sorted(found):
        parts = found[n]
        if set(parts) != {"adaption_prompt", "adaption_gate"}:
            raise ValueError(f"layer {n} has {sorted(parts)} but needs both adaption_prompt and adaption_gate")
        prompt = parts["adaption_prompt"]
        if prompt.dim() != 3 or prompt.shape[0] != 1:
            raise ValueError(f"layer {n}: adaption_prompt has shape {tuple(prompt.shape)}, expected [1, K, C]")
        out[f"layers.{n}.prompt"] = prompt[0].clone()
        out[f"layers.{n}.gate"] = parts["adaption_gate"].reshape(1).clone()
    return out
