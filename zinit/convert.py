"""Convert adapters from other implementations into zinit's canonical state dict, and back to peft's.

Canonical keys: ``layers.{n}.prompt`` ``[K, C]`` and ``layers.{n}.gate`` ``[H]`` (per head) or ``[1]`` (per layer),
with ``n`` the backbone's own layer index. Load the result with :func:`zinit.load_adapter_state_dict` into a model
injected with matching options, as each converter's docstring says. :func:`to_peft` goes the other way, for the one
variant stock peft can represent (one raw gate per layer on the top L layers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .config import AdapterConfig

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


#: Where ``...layers.{n}.self_attn`` sits in the state dict of a peft ``PeftModel`` around a ``*ForCausalLM``
#: (``base_model.model`` is peft's wrapper, then the causal LM's own ``model``).
PEFT_CAUSAL_LM_PREFIX = "base_model.model.model."
_REPRESENTABLE = ('inject with gate="layer", gate_fn="identity" and layers=L (an int: the top L layers), e.g. '
                  'zinit.inject(model, L, K, gate="layer", gate_fn="identity") or '
                  'ZinitConfig(layers=L, K=K, gate="layer", gate_fn="identity")')


def to_peft(state_dict: Mapping[str, Tensor], config: AdapterConfig | Mapping[str, Any], *,
            prefix: str = PEFT_CAUSAL_LM_PREFIX) -> dict[str, Tensor]:
    """Canonical → peft adaption-prompt layout, for an adapter stock peft can compute.

    Stock peft (``AdaptionPromptConfig(adapter_len=K, adapter_layers=L)``) adapts the top L layers and multiplies each
    layer's prompt term by one raw scalar gate, so only an adapter injected with ``gate="layer"``,
    ``gate_fn="identity"`` and ``layers=L`` (the top L layers) has a peft equivalent; anything else is refused with a
    ValueError that says so. ``config`` says which variant the tensors are (the gate function is not in them):
    ``zinit.injection(model).config``, or the ``zinit.json`` fields of a saved adapter
    (``zinit.read_adapter_config(folder)``).

    Returns ``{prefix}layers.{n}.self_attn.adaption_prompt`` ``[1, K, C]`` and ``...adaption_gate`` ``[1]``, what
    ``peft.get_peft_model_state_dict`` gives for an adaption-prompt model. Load it with
    ``peft.set_peft_model_state_dict(peft_model, state)`` and check that the result's ``unexpected_keys`` is empty:
    peft ignores keys that do not fit. The default ``prefix`` fits a ``PeftModel`` around a ``*ForCausalLM``; around
    a bare ``LlamaModel`` it is ``"base_model.model."``.

    Only the arithmetic of peft's LLaMA/Mistral path is matched (tested both ways to 1e-5): peft runs ``o_proj`` on
    the prompt term separately, which adds an ``o_proj`` bias twice (``attention_bias=True``), where zinit adds it once.

    >>> import zinit
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = zinit.inject(LlamaForCausalLM(cfg), layers=2, K=5, gate="layer", gate_fn="identity")
    >>> state = to_peft(zinit.adapter_state_dict(model), zinit.injection(model).config)
    >>> shapes = {k.removeprefix(PEFT_CAUSAL_LM_PREFIX): tuple(v.shape) for k, v in state.items()}
    >>> shapes  # doctest: +NORMALIZE_WHITESPACE
    {'layers.1.self_attn.adaption_prompt': (1, 5, 32), 'layers.1.self_attn.adaption_gate': (1,),
     'layers.2.self_attn.adaption_prompt': (1, 5, 32), 'layers.2.self_attn.adaption_gate': (1,)}
    """
    if isinstance(config, Mapping):
        config = AdapterConfig.from_json(config, "to_peft's config")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be the adapter's AdapterConfig (zinit.injection(model).config) or its zinit.json "
                        f"fields (zinit.read_adapter_config(folder)), not {type(config).__name__}")
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise ValueError(f"prefix={prefix!r} must be a key prefix ending in '.' (peft's around a causal LM: "
                         f"{PEFT_CAUSAL_LM_PREFIX!r}) or ''")
    if config.gate != "layer" or config.gate_fn != "identity":
        raise ValueError(f"this adapter has gate={config.gate!r}, gate_fn={config.gate_fn!r}, but peft's adaption "
                         "prompt multiplies each layer's prompt term by one raw gate, so it has no equivalent in peft. "
                         f"An adapter is peft-representable when trained that way: {_REPRESENTABLE}")
    top = tuple(range(config.num_layers - len(config.layers), config.num_layers))
    if tuple(config.layers) != top:
        raise ValueError(f"this adapter adapts layers {list(config.layers)} of 0..{config.num_layers - 1}, but peft's "
                         f"adapter_layers=L always adapts the top L layers ({list(top)} for L={len(config.layers)}); "
                         f"{_REPRESENTABLE}")
    if config.visual_dim is not None or config.train_modules:
        extra = ("a visual projection" if config.visual_dim is not None
                 else f"train_modules {list(config.train_modules)}")
        raise ValueError(f"this adapter has {extra}, which peft's adaption prompt cannot hold: convert an adapter "
                         "of prompts and gates only")
    if config.backbone != "llama":
        raise ValueError(f"this adapter is for the {config.backbone!r} backbone; peft's adaption prompt computes the "
                         "LLaMA/Mistral attention only (zinit's 'llama' backbone)")
    expected = {f"layers.{n}.{w}": shape for n in config.layers
                for w, shape in (("prompt", (config.K, config.hidden_size)), ("gate", (1,)))}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise KeyError(f"the state dict does not fit its config (layers {list(config.layers)}, K={config.K}): missing "
                       f"keys {missing}, unexpected keys {unexpected}; pass zinit.adapter_state_dict(model) and "
                       "zinit.injection(model).config of the same model")
    out: dict[str, Tensor] = {}
    for n in config.layers:
        prompt, gate = state_dict[f"layers.{n}.prompt"], state_dict[f"layers.{n}.gate"]
        for key, value in ((f"layers.{n}.prompt", prompt), (f"layers.{n}.gate", gate)):
            if not isinstance(value, Tensor) or tuple(value.shape) != expected[key]:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{key} has shape {shape}, but its config says {expected[key]}")
        out[f"{prefix}layers.{n}.self_attn.adaption_prompt"] = prompt.detach()[None].clone()
        out[f"{prefix}layers.{n}.self_attn.adaption_gate"] = gate.detach().reshape(1).clone()
    return out
