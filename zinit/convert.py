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

from .config import AdapterConfig, FittedConfig
from .errors import ZinitKeyError, ZinitValueError
from .registry import Dims

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
        raise ZinitValueError(f"{path} holds a {type(state).__name__}, not a state dict")
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
        raise ZinitValueError(
            f"expected exactly one 'adapter_query.weight' in an official LLaMA-Adapter v1 state dict, found {queries}"
        )
    gates = {int(m.group(1)): v for k, v in state_dict.items() if (m := _V1_GATE.search(k))}
    if not gates:
        raise ZinitValueError("no 'layers.N.attention.gate' keys: not an official LLaMA-Adapter v1 state dict")
    prompts = state_dict[queries[0]]
    layers = sorted(gates)
    if prompts.dim() != 2 or prompts.shape[0] % len(layers):
        raise ZinitValueError(
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
        raise ZinitValueError("no '...layers.N.self_attn.adaption_prompt' keys: not a peft adaption-prompt state dict")
    out: dict[str, Tensor] = {}
    for n in sorted(found):
        parts = found[n]
        if set(parts) != {"adaption_prompt", "adaption_gate"}:
            raise ZinitValueError(f"layer {n} has {sorted(parts)} but needs both adaption_prompt and adaption_gate")
        prompt = parts["adaption_prompt"]
        if prompt.dim() != 3 or prompt.shape[0] != 1:
            raise ZinitValueError(f"layer {n}: adaption_prompt has shape {tuple(prompt.shape)}, expected [1, K, C]")
        out[f"layers.{n}.prompt"] = prompt[0].clone()
        out[f"layers.{n}.gate"] = parts["adaption_gate"].reshape(1).clone()
    return out


#: Where ``...layers.{n}.self_attn`` sits in the state dict of a peft ``PeftModel`` around a ``*ForCausalLM``
#: (``base_model.model`` is peft's wrapper, then the causal LM's own ``model``).
PEFT_CAUSAL_LM_PREFIX = "base_model.model.model."
_REPRESENTABLE = ('inject with gate="layer", gate_fn="identity" and layers=L (an int: the top L layers), e.g. '
                  'zinit.inject(model, L, K, gate="layer", gate_fn="identity") or '
                  'ZinitConfig(layers=L, K=K, gate="layer", gate_fn="identity")')


def _fitted(config: AdapterConfig | Mapping[str, Any], dims: Dims | None, what: str) -> FittedConfig:
    """The resolved config and the model's sizes a converter is given: an :class:`AdapterConfig` and ``dims``
    (``zinit.injection(model).config`` and ``.dims``), or the fields of ``zinit.json`` (which hold both)."""
    if isinstance(config, Mapping):
        return AdapterConfig.from_json(config, f"{what}'s config")
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be the adapter's AdapterConfig (zinit.injection(model).config) or its zinit.json "
                        f"fields (zinit.read_adapter_config(folder)), not {type(config).__name__}")
    if not isinstance(dims, Dims):
        raise TypeError(f"{what}(state_dict, config, dims) needs the model's sizes beside an AdapterConfig "
                        "(zinit.injection(model).dims), or the zinit.json fields as config")
    if not config.resolved:
        raise ZinitValueError(f"{what} needs the adapter's resolved config (its backbone and layer indices): "
                              "zinit.injection(model).config, or config.bind(model).config")
    return FittedConfig(config, dims)


def _peft_config(config: AdapterConfig | Mapping[str, Any], dims: Dims | None, prefix: str) -> FittedConfig:
    """``config`` (and ``dims``) as a :class:`~zinit.config.FittedConfig`; an error unless it and ``prefix`` fit an
    adapter stock peft computes."""
    config, dims = _fitted(config, dims, "to_peft")
    if not isinstance(prefix, str) or (prefix and not prefix.endswith(".")):
        raise ZinitValueError(f"prefix={prefix!r} must be a key prefix ending in '.' (peft's around a causal LM: "
                         f"{PEFT_CAUSAL_LM_PREFIX!r}) or ''")
    if config.gate != "layer" or config.gate_fn != "identity":
        raise ZinitValueError(f"this adapter has gate={config.gate!r}, gate_fn={config.gate_fn!r}, but peft's adaption "
                         "prompt multiplies each layer's prompt term by one raw gate, so it has no equivalent in peft. "
                         f"An adapter is peft-representable when trained that way: {_REPRESENTABLE}")
    top = tuple(range(dims.num_layers - len(config.layers), dims.num_layers))
    if tuple(config.layers) != top:
        raise ZinitValueError(f"this adapter adapts layers {list(config.layers)} of 0..{dims.num_layers - 1}, but peft's "
                         f"adapter_layers=L always adapts the top L layers ({list(top)} for L={len(config.layers)}); "
                         f"{_REPRESENTABLE}")
    if config.visual_dim is not None or config.train_modules or config.bias_scale or config.train_norms:
        extra = ("a visual projection" if config.visual_dim is not None
                 else f"train_modules {list(config.train_modules)}" if config.train_modules
                 else "LLaMA-Adapter V2's bias/scale or trained norms (bias_scale / train_norms)")
        raise ZinitValueError(f"this adapter has {extra}, which peft's adaption prompt cannot hold: convert an adapter "
                         "of prompts and gates only")
    if config.backbone != "llama":
        raise ZinitValueError(f"this adapter is for the {config.backbone!r} backbone; peft's adaption prompt computes the "
                         "LLaMA/Mistral attention only (zinit's 'llama' backbone)")
    return FittedConfig(config, dims)


def _peft_tensors(state_dict: Mapping[str, Tensor], config: AdapterConfig, dims: Dims, prefix: str
                  ) -> dict[str, Tensor]:
    """The peft keys and tensors of ``state_dict``, checked against what ``config`` says it holds."""
    expected = {f"layers.{n}.{w}": shape for n in config.layers
                for w, shape in (("prompt", (config.K, dims.hidden_size)), ("gate", (1,)))}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ZinitKeyError(f"the state dict does not fit its config (layers {list(config.layers)}, K={config.K}): missing "
                       f"keys {missing}, unexpected keys {unexpected}; pass zinit.adapter_state_dict(model) and "
                       "zinit.injection(model).config of the same model")
    out: dict[str, Tensor] = {}
    for n in config.layers:
        prompt, gate = state_dict[f"layers.{n}.prompt"], state_dict[f"layers.{n}.gate"]
        for key, value in ((f"layers.{n}.prompt", prompt), (f"layers.{n}.gate", gate)):
            if not isinstance(value, Tensor) or tuple(value.shape) != expected[key]:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ZinitValueError(f"{key} has shape {shape}, but its config says {expected[key]}")
        out[f"{prefix}layers.{n}.self_attn.adaption_prompt"] = prompt.detach()[None].clone()
        out[f"{prefix}layers.{n}.self_attn.adaption_gate"] = gate.detach().reshape(1).clone()
    return out


def to_peft(state_dict: Mapping[str, Tensor], config: AdapterConfig | Mapping[str, Any], dims: Dims | None = None, *,
            prefix: str = PEFT_CAUSAL_LM_PREFIX) -> dict[str, Tensor]:
    """Canonical → peft adaption-prompt layout, for an adapter stock peft can compute.

    Stock peft (``AdaptionPromptConfig(adapter_len=K, adapter_layers=L)``) adapts the top L layers and multiplies each
    layer's prompt term by one raw scalar gate, so only an adapter injected with ``gate="layer"``,
    ``gate_fn="identity"`` and ``layers=L`` (the top L layers) has a peft equivalent; anything else is refused with a
    ValueError that says so. ``config`` says which variant the tensors are (the gate function is not in them) and
    ``dims`` the model's sizes: ``zinit.injection(model).config`` and ``.dims``, or the ``zinit.json`` fields of a
    saved adapter (``zinit.read_adapter_config(folder)``), which hold both.

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
    >>> state = to_peft(zinit.adapter_state_dict(model), zinit.injection(model).config, zinit.injection(model).dims)
    >>> shapes = {k.removeprefix(PEFT_CAUSAL_LM_PREFIX): tuple(v.shape) for k, v in state.items()}
    >>> shapes  # doctest: +NORMALIZE_WHITESPACE
    {'layers.1.self_attn.adaption_prompt': (1, 5, 32), 'layers.1.self_attn.adaption_gate': (1,),
     'layers.2.self_attn.adaption_prompt': (1, 5, 32), 'layers.2.self_attn.adaption_gate': (1,)}
    """
    config, dims = _peft_config(config, dims, prefix)
    return _peft_tensors(state_dict, config, dims, prefix)


# ---------------------------------------------------------------------------------------------------------------
# litgpt adapter / adapter_v2


#: zinit's module path within an HF LLaMA-family block -> litgpt's, for the linear layers and norms of adapter_v2.
#: q_proj, k_proj and v_proj are litgpt's one fused ``attn.qkv`` ([q of every head, k of every KV head, v ...]).
LITGPT_BLOCK_NAMES = {"self_attn.o_proj": "attn.proj", "mlp.gate_proj": "mlp.fc_1", "mlp.up_proj": "mlp.fc_2",
                      "mlp.down_proj": "mlp.proj", "input_layernorm": "norm_1", "post_attention_layernorm": "norm_2"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
#: Where the blocks, the final norm and the LM head of a ``LlamaForCausalLM`` are (zinit's keys use these names).
HF_LLAMA_NAMES = {"blocks": "model.layers", "norm": "model.norm", "head": "lm_head"}
_LITGPT_FORM = ('inject with gate="head", gate_fn="identity" (litgpt multiplies by the raw gating_factor) and, for '
                'adapter_v2, bias_scale="all" and train_norms=True, e.g. zinit.inject(model, 30, 10, '
                'gate_fn="identity", bias_scale="all", train_norms=True)')


def _litgpt_checks(config: AdapterConfig | Mapping[str, Any], dims: Dims | None, what: str) -> FittedConfig:
    config, dims = _fitted(config, dims, what)
    if config.backbone != "llama":
        raise ZinitValueError(f"this adapter is for the {config.backbone!r} backbone; litgpt's adapter naming is converted "
                         "for zinit's 'llama' backbone (LlamaForCausalLM) only")
    if config.gate != "head" or config.gate_fn != "identity":
        raise ZinitValueError(f"this adapter has gate={config.gate!r}, gate_fn={config.gate_fn!r}, but litgpt's adapter "
                         f"has one raw gating_factor per head; {_LITGPT_FORM}")
    if config.bias_scale == "blocks":
        raise ZinitValueError('this adapter has bias_scale="blocks", but litgpt\'s adapter_v2 has a bias/scale on the LM '
                         f'head too; {_LITGPT_FORM}')
    if config.visual_dim is not None or config.train_modules:
        raise ZinitValueError("this adapter has a visual projection or train_modules, which litgpt's adapter cannot hold")
    top = tuple(range(dims.num_layers - len(config.layers), dims.num_layers))
    if tuple(config.layers) != top:
        raise ZinitValueError(f"this adapter adapts layers {list(config.layers)} of 0..{dims.num_layers - 1}, but litgpt "
                         f"adapts the layers from adapter_start_layer up, the top L ({list(top)} for L="
                         f"{len(config.layers)}: adapter_start_layer={top[0]}); {_LITGPT_FORM}")
    if (config.bias_scale is None) != (not config.train_norms):
        raise ZinitValueError("litgpt's adapter_v2 has both the bias/scale and trained norms, its adapter neither; this "
                         f"adapter has bias_scale={config.bias_scale!r}, train_norms={config.train_norms}: "
                         f"{_LITGPT_FORM}")
    return FittedConfig(config, dims)


def _litgpt_pairs(config: AdapterConfig, dims: Dims) -> list[tuple[str, str]]:
    """(zinit key, litgpt key) of every tensor but the fused qkv bias/scale (handled by the callers)."""
    b, names = HF_LLAMA_NAMES["blocks"], LITGPT_BLOCK_NAMES
    pairs = []
    for n in config.layers:
        pairs += [(f"layers.{n}.prompt", f"transformer.h.{n}.attn.adapter_wte.weight"),
                  (f"layers.{n}.gate", f"transformer.h.{n}.attn.gating_factor")]
    if config.bias_scale is not None:
        for n in range(dims.num_layers):
            for ours, theirs in names.items():
                kind = "norms" if "norm" in ours else "linears"
                if kind == "norms":
                    pairs.append((f"norms.{b}.{n}.{ours}.weight", f"transformer.h.{n}.{theirs}.weight"))
                else:
                    pairs += [(f"linears.{b}.{n}.{ours}.{w}", f"transformer.h.{n}.{theirs}.adapter_{w}")
                              for w in ("bias", "scale")]
        pairs.append((f"norms.{HF_LLAMA_NAMES['norm']}.weight", "transformer.ln_f.weight"))
        pairs += [(f"linears.{HF_LLAMA_NAMES['head']}.{w}", f"lm_head.adapter_{w}") for w in ("bias", "scale")]
    return pairs


def to_litgpt(state_dict: Mapping[str, Tensor], config: AdapterConfig | Mapping[str, Any], dims: Dims | None = None
              ) -> dict[str, Tensor]:
    """Canonical → litgpt ``adapter`` / ``adapter_v2`` state naming, for a LLaMA-family ``*ForCausalLM`` adapter.

    litgpt keeps ``transformer.h.{n}.attn.adapter_wte.weight`` ``[K, C]`` and ``...attn.gating_factor``
    ``[1, 1, H, 1]`` (a raw per-head gate) in each adapted layer, and adapter_v2 adds ``adapter_bias`` /
    ``adapter_scale`` to every linear layer (``attn.qkv``, the concatenation of zinit's q/k/v ones in that order;
    ``attn.proj``; ``mlp.fc_1/fc_2/proj`` = gate/up/down) of every layer and to ``lm_head``, and trains ``norm_1``,
    ``norm_2`` and ``ln_f``. So only an adapter injected as litgpt computes converts: gate ``"head"`` with
    ``gate_fn="identity"`` and, for V2, ``bias_scale="all"`` and ``train_norms=True`` (anything else is refused,
    naming the option), on the top L layers (litgpt's ``adapter_start_layer`` = number of layers − L). Load the
    result with litgpt's ``model.load_state_dict(state, strict=False)`` beside the base checkpoint, and check that no
    key was left unused; :func:`from_litgpt` goes back.

    The tensors convert by meaning (each q/k/v row to its projection), which is what litgpt's model computes for the
    tokens. litgpt's own adapter forward (``litgpt/adapter.py``, 2025) reads the prompt's fused qkv output in the
    interleaved per-group layout its checkpoints no longer use (``view(…, n_query_groups, q_per_kv + 2,
    head_size)``), so inside litgpt the prompt keys/values of a converted adapter (or one litgpt trained) are not the
    paper's; zinit's are, and the conversion keeps the parameters, not that arithmetic.

    >>> import zinit
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = zinit.inject(LlamaForCausalLM(cfg), 1, 5, gate_fn="identity", bias_scale="all", train_norms=True)
    >>> lit = to_litgpt(zinit.adapter_state_dict(model), zinit.injection(model).config, zinit.injection(model).dims)
    >>> {k: tuple(v.shape) for k, v in lit.items() if k.startswith("transformer.h.1.attn")}  # doctest: +NORMALIZE_WHITESPACE
    {'transformer.h.1.attn.adapter_wte.weight': (5, 32), 'transformer.h.1.attn.gating_factor': (1, 1, 4, 1),
     'transformer.h.1.attn.proj.adapter_bias': (32,), 'transformer.h.1.attn.proj.adapter_scale': (32,),
     'transformer.h.1.attn.qkv.adapter_bias': (64,), 'transformer.h.1.attn.qkv.adapter_scale': (64,)}
    """
    config, dims = _litgpt_checks(config, dims, "to_litgpt")
    pairs = _litgpt_pairs(config, dims)
    qkv = [(n, w) for n in range(dims.num_layers) for w in ("bias", "scale")] if config.bias_scale else []
    b = HF_LLAMA_NAMES["blocks"]
    expected = {ours for ours, _ in pairs} | {f"linears.{b}.{n}.{p}.{w}" for n, w in qkv for p in _QKV}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ZinitKeyError(f"the state dict does not fit its config: missing keys {missing[:5]}, unexpected keys "
                       f"{unexpected[:5]}; pass zinit.adapter_state_dict(model) and zinit.injection(model).config of "
                       "the same model")
    out: dict[str, Tensor] = {}
    for ours, theirs in pairs:
        value = state_dict[ours].detach()
        out[theirs] = value.reshape(1, 1, -1, 1).clone() if theirs.endswith("gating_factor") else value.clone()
    for n, w in qkv:
        out[f"transformer.h.{n}.attn.qkv.adapter_{w}"] = torch.cat(
            [state_dict[f"linears.{b}.{n}.{p}.{w}"].detach() for p in _QKV])
    return dict(sorted(out.items()))


def from_litgpt(state_dict: Mapping[str, Tensor], config: AdapterConfig | Mapping[str, Any], dims: Dims | None = None
                ) -> dict[str, Tensor]:
    """litgpt ``adapter`` / ``adapter_v2`` state naming → canonical, for the model of ``config`` and ``dims``: the
    :class:`~zinit.AdapterConfig` and sizes of a ``LlamaForCausalLM`` injected as litgpt computes (:func:`to_litgpt`:
    ``gate_fn="identity"``, and ``bias_scale="all"``, ``train_norms=True`` for adapter_v2 keys), into which
    :func:`zinit.load_adapter_state_dict` then loads the result. Keys may carry a prefix (``model.``, Lightning's
    ``_forward_module.``); litgpt's fused qkv bias/scale is split into the q, k and v projections' by the config's
    head counts. A key missing or left over is an error naming it.
    """
    config, dims = _litgpt_checks(config, dims, "from_litgpt")
    found: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = re.search(r"(?:^|\.)((?:transformer\.(?:h\.\d+\.|ln_f\.)|lm_head\.).*)$", key)
        if m:
            found[m.group(1)] = value
    if not found:
        raise ZinitValueError("no 'transformer.h.N.attn.adapter_wte.weight' (or other litgpt adapter) keys: not a litgpt "
                         "adapter state dict")
    pairs = _litgpt_pairs(config, dims)
    out: dict[str, Tensor] = {}
    used = set()
    widths = [dims.num_heads * dims.head_dim] + [dims.num_kv_heads * dims.head_dim] * 2
    b = HF_LLAMA_NAMES["blocks"]
    wanted = [theirs for _, theirs in pairs]
    if config.bias_scale:
        wanted += [f"transformer.h.{n}.attn.qkv.adapter_{w}" for n in range(dims.num_layers) for w in ("bias", "scale")]
    missing = [k for k in wanted if k not in found]
    if missing:
        raise ZinitKeyError(f"the litgpt state lacks {missing[:5]} ({len(missing)} keys) for this config (layers "
                       f"{list(config.layers)}, bias_scale={config.bias_scale!r}); {_LITGPT_FORM}")
    for ours, theirs in pairs:
        out[ours] = found[theirs].reshape(-1).clone() if theirs.endswith("gating_factor") else found[theirs].clone()
        used.add(theirs)
    if config.bias_scale:
        for n in range(dims.num_layers):
            for w in ("bias", "scale"):
                key = f"transformer.h.{n}.attn.qkv.adapter_{w}"
                fused = found[key]
                if fused.shape != (sum(widths),):
                    raise ZinitValueError(f"{key} has shape {tuple(fused.shape)}, but this model's q/k/v give "
                                     f"({sum(widths)},)")
                for p, part in zip(_QKV, fused.split(widths)):
                    out[f"linears.{b}.{n}.{p}.{w}"] = part.clone()
                used.add(key)
    extra = sorted(set(found) - used)
    if extra:
        raise ZinitKeyError(f"litgpt keys this config has no place for: {extra[:5]} ({len(extra)} keys); {_LITGPT_FORM} "
                       f"with the layers the keys name")
    return out
