"""A naive implementation of the method, written straight from docs/design.md §1 and sharing no code with zinit.

For one adapted layer, in float64, with explicit matmuls, one loop over heads and two separate softmaxes:

    Kp = k_proj(P), Vp = v_proj(P)                    (no normalisation of P, no positional encoding)
    out_h = softmax(q_h·Kw_hᵀ·s + mask)·Vw_h + g_h · softmax(q_h·Kp_hᵀ·s)·Vp_h      (no mask on the prompt part)
    g = tanh(gate) or gate, one per head (a layer gate is the same for every head)

with query head h using key/value head h // (H / Hkv) for grouped-query attention.

``gate=None`` (zinit's ``gate="none"``) is plain prefix attention instead, one softmax over prompt and tokens:

    out_h = softmax([q_h·Kp_hᵀ·s ; q_h·Kw_hᵀ·s + mask])·[Vp_h ; Vw_h]      (no mask on the K prompt columns)

For any Hugging Face family (the coverage sweep), the prompt keys and values take one of two routes
(:func:`prompt_kv`): the family's projections and norms written out (:func:`written_out_kv`, independent of the
layer's forward and of zinit), or, where the key path has a part that cannot be written out generically, the layer's
own forward with every prompt row its own one-row sequence at position 0 (:func:`prompt_kv_at_position_0`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG = float("-inf")


def _lin(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = x @ weight.double().T
    return y if bias is None else y + bias.double()


def _heads(x: Tensor, n: int) -> Tensor:  # [..., T, n·d] -> [..., n, T, d]
    return x.unflatten(-1, (n, -1)).transpose(-2, -3)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def prefix_attention(q, k, v, kp, vp, scale, allowed, softcap=None):
    """Prefix attention: q [B,H,T,d], k/v [B,Hkv,S,d], kp/vp [Hkv,K,d], allowed [B,T,S] bool or None (token columns
    only; every query sees the K prompt columns) -> [B,H,T,d]. One softmax per head over K + S scores."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        kv = h // group
        keys = torch.cat([kp[kv].expand(B, -1, -1), k[:, kv]], dim=1)  # [B, K+S, d]
        values = torch.cat([vp[kv].expand(B, -1, -1), v[:, kv]], dim=1)
        s = q[:, h] @ keys.transpose(-1, -2) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if allowed is not None:
            seen = torch.cat([torch.ones(B, T, kp.shape[1], dtype=torch.bool), allowed], dim=-1)
            s = s.masked_fill(~seen, NEG)
        out[:, h] = torch.softmax(s, dim=-1) @ values
    return out


def gated_attention(q, k, v, kp, vp, gate, gate_fn, scale, allowed):
    """q [B,H,T,d], k/v [B,Hkv,S,d], kp/vp [Hkv,K,d], allowed [B,T,S] bool or None -> [B,H,T,d]. ``gate=None``:
    :func:`prefix_attention` instead."""
    if gate is None:
        return prefix_attention(q, k, v, kp, vp, scale, allowed)
    B, H, T, d = q.shape
    group = H // k.shape[1]
    g = torch.tanh(gate.double()) if gate_fn == "tanh" else gate.double()
    g = g.expand(H)
    out = torch.empty_like(q)
    for h in range(H):
        kv = h // group
        sw = q[:, h] @ k[:, kv].transpose(-1, -2) * scale
        if allowed is not None:
            sw = sw.masked_fill(~allowed, NEG)
        tok = torch.softmax(sw, dim=-1) @ v[:, kv]
        sp = q[:, h] @ kp[kv].T * scale
        out[:, h] = tok + g[h] * (torch.softmax(sp, dim=-1) @ vp[kv])
    return out


def llama_layer(attn, hidden: Tensor, cos: Tensor, sin: Tensor, mask_2d: Tensor | None, prompt, gate, gate_fn):
    """A LLaMA-family attention layer's output (after o_proj) for ``hidden`` [B,T,C]; cos/sin [B,T,d]."""
    hidden = hidden.double()
    H, Hkv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    q = _heads(_lin(hidden, attn.q_proj.weight, attn.q_proj.bias), H)
    k = _heads(_lin(hidden, attn.k_proj.weight, attn.k_proj.bias), Hkv)
    v = _heads(_lin(hidden, attn.v_proj.weight, attn.v_proj.bias), Hkv)
    cos, sin = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    q = q * cos + _rotate_half(q) * sin  # RoPE on token queries and keys only
    k = k * cos + _rotate_half(k) * sin
    kp = _heads(_lin(prompt.double(), attn.k_proj.weight, attn.k_proj.bias), Hkv)
    vp = _heads(_lin(prompt.double(), attn.v_proj.weight, attn.v_proj.bias), Hkv)
    T = hidden.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(hidden.shape[0], T, T)
    if mask_2d is not None:
        allowed = allowed & mask_2d.bool()[:, None, :]
    out = gated_attention(q, k, v, kp, vp, gate, gate_fn, 1 / math.sqrt(q.shape[-1]), allowed)
    return _lin(out.transpose(1, 2).flatten(2), attn.o_proj.weight, attn.o_proj.bias)


def vit_layer(attn, x: Tensor, prompt, gate, gate_fn):
    """A timm ViT attention layer's output (after proj) for ``x`` [B,N,C]: bidirectional, no mask."""
    x = x.double()
    H, C = attn.num_heads, x.shape[-1]
    w, b = attn.qkv.weight, attn.qkv.bias
    parts = [(w[i * C:(i + 1) * C], None if b is None else b[i * C:(i + 1) * C]) for i in range(3)]
    q, k, v = (_heads(_lin(x, *p), H) for p in parts)
    kp, vp = (_heads(_lin(prompt.double(), *p), H) for p in parts[1:])
    out = gated_attention(q, k, v, kp, vp, gate, gate_fn, 1 / math.sqrt(q.shape[-1]), None)
    return _lin(out.transpose(1, 2).flatten(2), attn.proj.weight, attn.proj.bias)


def encoder_layer(attn, hidden: Tensor, mask_2d: Tensor | None, prompt, gate, gate_fn):
    """A BERT/RoBERTa self-attention output (the context, before the output dense) for ``hidden`` [B,T,C]."""
    hidden = hidden.double()
    H = attn.num_attention_heads
    q, k, v = (_heads(_lin(hidden, lin.weight, lin.bias), H) for lin in (attn.query, attn.key, attn.value))
    kp, vp = (_heads(_lin(prompt.double(), lin.weight, lin.bias), H) for lin in (attn.key, attn.value))
    B, T = hidden.shape[:2]
    allowed = None if mask_2d is None else mask_2d.bool()[:, None, :].expand(B, T, T)
    out = gated_attention(q, k, v, kp, vp, gate, gate_fn, 1 / math.sqrt(q.shape[-1]), allowed)
    return out.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------------------------
# any Hugging Face family (the coverage sweep): the family's own key path, a route of its own


class _Captured(Exception):
    pass


def _record(module, query, key, value, attention_mask, **kwargs):
    raise _Captured(key, value)


class _RouteTo:
    """A config view naming another attention implementation (the reference runs single-threaded)."""

    def __init__(self, base, name):
        self.__dict__.update(_base=base, _attn_implementation=name)

    def __getattr__(self, name):
        return getattr(self._base, name)


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _layer_type(model, attn):
    """The layer type of ``attn``, read off the module itself: its ``layer_type`` / ``attention_type`` attribute,
    else ``config.layer_types[attn.layer_idx]`` (zinit reads the layer's place in its stack instead)."""
    for name in ("layer_type", "attention_type"):
        own = getattr(attn, name, None)
        if isinstance(own, str):
            return own
    types = getattr(_text_config(model), "layer_types", None)
    index = getattr(attn, "layer_idx", None)
    if isinstance(types, (list, tuple)) and isinstance(index, int) and 0 <= index < len(types):
        return types[index]
    return None


def _rotary_at_0(model, attn, width: int, device):
    """The rotary (cos, sin) ``[1, 1, r]`` the model gives ``attn`` at position 0, or None when the layer has no
    rotary: the attention module's own ``rotary_emb`` (Recurrent Gemma, Moshi) or the model's, called for the
    layer's own type (a rotary with no RoPE for that type, e.g. Ergo's full layers, gives none)."""
    import inspect

    own = attn._modules.get("rotary_emb")
    if own is None and "position_embeddings" not in inspect.signature(type(attn).forward).parameters:
        return None
    if not getattr(attn, "use_rope", True):  # a NoPE layer (SmolLM3's use_rope is 0 there)
        return None
    rotary = own
    if rotary is None:
        found = [m for name, m in model.named_modules() if name.split(".")[-1] in ("rotary_emb", "rotary_embedding")]
        if not found:
            return None
        rotary = found[0]
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        layer_type = _layer_type(model, attn)
        types = getattr(rotary, "rope_type", None)
        if isinstance(types, dict) and layer_type not in types:
            return None
        kwargs["layer_type"] = layer_type
    dummy = torch.zeros(1, 1, width, device=device)
    with torch.no_grad():
        return rotary(dummy, torch.zeros(1, 1, dtype=torch.long, device=device), **kwargs)


def prompt_kv_at_position_0(model, attn, prompt: Tensor):
    """The keys and values the layer's own forward makes of ``prompt`` [K, C] placed at position 0 (RoPE at position
    0 is the identity rotation, so these are the keys of a token with no position): [Hkv, K, d] each, float64.
    Every row is its own one-row sequence. The capture route: see :func:`written_out_kv` for the independent one."""
    import inspect

    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("reference_record", _record)
    params = inspect.signature(type(attn).forward).parameters
    floats = [p.dtype for p in attn.parameters() if p.is_floating_point()]  # none in a 4-bit layer (uint8 weights)
    hidden = prompt.detach()[:, None].to(floats[0] if floats else model.dtype)  # [K, 1, C]
    kwargs = {"hidden_states": hidden, "attention_mask": None}
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if name in params:
            kwargs[name] = None
    if "position_ids" in params:
        kwargs["position_ids"] = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if "position_embeddings" in params:
        at0 = _rotary_at_0(model, attn, hidden.shape[-1], hidden.device)
        kwargs["position_embeddings"] = None if at0 is None else tuple(
            t.reshape(1, 1, -1).expand(hidden.shape[0], 1, -1).to(hidden.dtype) for t in at0)
    config = attn.config
    attn.config = _RouteTo(config, "reference_record")
    try:
        type(attn).forward(attn, **kwargs)
    except _Captured as done:
        key, value = done.args  # [K, Hkv, 1, d]
        return key[:, :, 0].transpose(0, 1).double(), value[:, :, 0].transpose(0, 1).double()
    finally:
        attn.config = config
    raise AssertionError(f"{type(attn).__qualname__} never called its attention function")


# ---------------------------------------------------------------------------------------------------------------
# the independent key path: the family's projections and norms written out


class NotWrittenOut(Exception):
    """The attention module has a part of its key path :func:`written_out_kv` does not write out (named)."""


#: Children and direct parameters of attention modules that never touch the keys or values (queries, query norms,
#: output projections and gates, dropouts, attention sinks, mask and query scales): the family each is seen in.
NOT_KEY_PATH = frozenset({
    "q_proj", "query", "q_lin", "q_attn", "q_norm", "q_layernorm",  # queries
    "q_gate_proj",  # MiniCPM5-MoE: queries and an output gate in one projection
    "experts",  # JetMoE: the queries come out of a mixture of attention heads
    "o_proj", "out_proj", "dense", "c_proj", "Wo", "out_lin", "o",  # output projections
    "gate_proj", "g_proj", "gate_bias", "s_gate",  # output gates (AFMoE, Laguna, Beam, Dory)
    "attn_sub_norm",  # BitNet, Dory: a norm of the attention output
    "LayerNorm",  # ALBERT: the output norm of its attention block
    "sinks",  # gpt-oss, Flint, Granite SWA: attention sinks join the token softmax only
    "dt_proj", "A",  # Doge: a dynamic mask made from the values
    "sqk",  # Dory: a query scale
    "dropout", "attn_dropout", "resid_dropout", "attention_dropout", "output_dropout", "out_drop",
    "rotary_emb",  # read at position 0 (see _rotary_at_0)
})
#: Separate key and value projections, by their names.
SEPARATE = (("k_proj", "v_proj"), ("key", "value"), ("k_lin", "v_lin"))
#: Fused projections whose layout :func:`_fused_kv` writes out.
FUSED = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "kv_proj")
KEY_NORMS = ("k_norm", "k_layernorm")
VALUE_NORMS = ("v_norm",)


def _linear(module, x: Tensor, name: str) -> Tensor:
    """``x`` [K, C] float64 through a linear layer: nn.Linear (x·Wᵀ + b; Falcon's FalconLinear), transformers'
    Conv1D (x·W + b), or Moshi's MoshiLinear without its per-codebook weights (one nn.Linear inside). Anything else
    — another wrapper, a subclass with a forward of its own, a quantized weight (a tensor subclass, an integer
    dtype), hooks — is not written out."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "parametrizations", None):
        raise NotWrittenOut(f"{name} ({type(module).__qualname__}) has hooks or parametrizations")
    inner = module._modules.get("linear")
    if inner is not None and getattr(module, "use_flexible_linear", None) is False:  # Moshi: one nn.Linear inside
        return _linear(inner, x, name)
    plain = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
             if p is not None and type(p) in (nn.Parameter, Tensor) and type(p.data) is Tensor
             and p.is_floating_point()]
    weight = getattr(module, "weight", None)
    if len(plain) == sum(p is not None for p in (weight, getattr(module, "bias", None))):
        if type(module) is Conv1D:  # weight [in, out]
            return _lin(x, module.weight.T, module.bias)
        if isinstance(module, nn.Linear) and type(module).forward in (nn.Linear.forward, _falcon_forward()) \
                and weight.shape == (module.out_features, module.in_features):  # weight [out, in]
            return _lin(x, module.weight, module.bias)
    raise NotWrittenOut(f"{name} is a {type(module).__qualname__}, not a plain linear layer")


def _falcon_forward():
    """FalconLinear's forward (``x @ W.T + b``, nn.Linear's maths in another order), or None."""
    try:
        from transformers.models.falcon.modeling_falcon import FalconLinear
    except ImportError:
        return None
    return FalconLinear.forward


def _size(attn, names, config_names=()) -> int | None:
    for name in names:
        value = getattr(attn, name, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(attn, "config", None)
    for name in config_names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fused_kv(attn, name: str, x: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Keys and values ``[K, Hkv·d]`` out of a fused projection, each layout written out."""
    out = _linear(attn._modules[name], x, name)
    K, width = out.shape
    heads = _size(attn, ("num_heads", "num_attention_heads"), ("num_attention_heads",))
    if name == "kv_proj":  # JetMoE: [k | v]
        k, v = out.chunk(2, dim=-1)
        return k, v
    if name == "Wqkv" or name == "c_attn" and not hasattr(attn, "multi_query"):  # ModernBERT, GPT-2: [q | k | v]
        _, k, v = out.chunk(3, dim=-1)
        return k, v
    if heads is None:
        raise NotWrittenOut(f"{type(attn).__qualname__} names no head count for its fused {name}")
    if name == "qkv_proj":  # Phi-3, Ergo: [q (H·d) | k (Hkv·d) | v (Hkv·d)]
        kv = (width - heads * d) // 2
        return out[:, heads * d:heads * d + kv], out[:, heads * d + kv:]
    if name == "c_attn":  # GPT-BigCode: multi-query [q (C) | k (d) | v (d)], else per head [q_h | k_h | v_h]
        if attn.multi_query:
            return out[:, heads * d:heads * d + d], out[:, heads * d + d:]
        per_head = out.view(K, heads, 3 * d)
        return per_head[..., d:2 * d].flatten(1), per_head[..., 2 * d:].flatten(1)
    if hasattr(attn, "new_decoder_architecture"):  # Falcon's query_key_value, three layouts
        if attn.new_decoder_architecture:  # per KV group: its queries, then its key, then its value
            grouped = out.view(K, attn.num_kv_heads, -1, d)
            return grouped[:, :, -2].flatten(1), grouped[:, :, -1].flatten(1)
        if attn.multi_query:  # [q (H·d) | k (d) | v (d)]
            return out[:, heads * d:heads * d + d], out[:, heads * d + d:]
        per_head = out.view(K, heads, 3, d)
        return per_head[:, :, 1].flatten(1), per_head[:, :, 2].flatten(1)
    per_head = out.view(K, heads, 3 * d)  # GPT-NeoX, Persimmon, Fuyu: per head [q_h | k_h | v_h]
    return per_head[..., d:2 * d].flatten(1), per_head[..., 2 * d:].flatten(1)


def _norm(norm, x: Tensor, name: str) -> Tensor:
    """``x`` [K, Hkv, d] through a key (or value) norm, float64: a norm of each head's vector (weight [d], [Hkv, d]
    or none), of the whole projected key (weight [Hkv·d]: OLMo 2), or one norm per head (StableLM's ``norms``)."""
    import copy as _copy

    from torch import nn

    K, H, d = x.shape
    norm = _copy.deepcopy(norm).double()
    per_head = norm._modules.get("norms")
    if isinstance(per_head, nn.ModuleList) and len(per_head) == H:
        return torch.stack([per_head[h](x[:, h]) for h in range(H)], dim=1)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1 and weight.numel() == H * d and H > 1:
        return norm(x.flatten(1)).view(K, H, d)
    if weight is None or isinstance(weight, Tensor) and weight.shape[-1] == d and weight.numel() in (d, H * d):
        return norm(x)
    raise NotWrittenOut(f"{name} ({type(norm).__qualname__}) has a weight of shape {tuple(weight.shape)}, neither "
                        f"a head's ({d}) nor the whole key's ({H * d})")


def _partial_rotary_factor(model, attn) -> float | None:
    """The share of each head RoPE rotates, from the config: ``partial_rotary_factor`` in the layer type's
    ``rope_parameters`` (transformers ≥ 5) or on the config itself; None: all of it."""
    config = getattr(attn, "config", None)
    config = _text_config(model) if config is None else config
    factor = getattr(config, "partial_rotary_factor", None)
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict):
        mine = parameters.get(_layer_type(model, attn))
        parameters = mine if isinstance(mine, dict) else parameters
        factor = parameters.get("partial_rotary_factor", factor)
    return factor


def written_out_kv(model, attn, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """The prompt's keys and values ``[Hkv, K, d]`` (float64) computed from the attention module's own submodules,
    written out here and not through its forward: separate (``k_proj``/``key``/``k_lin``) or fused (``qkv_proj``,
    GPT-2's ``c_attn``, GPT-BigCode's, GPT-NeoX's and Falcon's ``query_key_value``, ModernBERT's ``Wqkv``, JetMoE's
    ``kv_proj``) projections with their biases; ``config.clip_qkv`` (OLMo); a key norm per head or over the whole
    key (``k_norm``, ``k_layernorm``) and a value norm (``v_norm``); key multipliers (Falcon-H1's
    ``key_multiplier``, Ergo's ``qk_scale``); and the rotary at position 0 of the layer's own type, whose cos carries
    the attention scale of YaRN-like RoPE onto the rotated dimensions (sin must be 0). Raises :class:`NotWrittenOut`
    naming the part it cannot write out (an unknown submodule, a projection that is no plain linear layer)."""
    children = dict(attn.named_children())
    params = {name for name, _ in attn.named_parameters(recurse=False)}
    names = [name for pair in SEPARATE for name in pair if name in children]
    fused = [name for name in FUSED if name in children]
    used = set(names) | set(fused) | set(KEY_NORMS) | set(VALUE_NORMS)
    unknown = sorted(n for n in set(children) | params if n not in used and n not in NOT_KEY_PATH)
    if unknown:
        parts = ", ".join(f"{n} ({type(children[n]).__qualname__})" if n in children else f"{n} (parameter)"
                          for n in unknown)
        raise NotWrittenOut(f"{type(attn).__qualname__} has parts this reference does not know: {parts}")
    d = _size(attn, ("head_dim", "head_size", "attention_head_size"), ("head_dim",))
    if d is None:
        raise NotWrittenOut(f"{type(attn).__qualname__} names no head size")
    x = prompt.detach().double()
    separate = [pair for pair in SEPARATE if pair[0] in children and pair[1] in children]
    if separate:
        k = _linear(children[separate[0][0]], x, separate[0][0])
        v = _linear(children[separate[0][1]], x, separate[0][1])
    elif len(fused) == 1:
        k, v = _fused_kv(attn, fused[0], x, d)
    else:
        raise NotWrittenOut(f"{type(attn).__qualname__} has no key projection this reference knows "
                            f"(children: {', '.join(children)})")
    if k.shape[-1] % d or v.shape[-1] % (k.shape[-1] // d):
        raise NotWrittenOut(f"keys of width {k.shape[-1]} and values of width {v.shape[-1]} do not split into "
                            f"heads of size {d}")
    Hkv = k.shape[-1] // d
    K = x.shape[0]
    k, v = k.view(K, Hkv, d), v.view(K, Hkv, -1)
    if fused == ["kv_proj"] and isinstance(getattr(attn, "top_k", None), int):  # JetMoE tiles (not interleaves)
        k, v = k.repeat(1, attn.top_k, 1), v.repeat(1, attn.top_k, 1)  # its key heads once per active expert
        Hkv *= attn.top_k
    key_norm = next((children[n] for n in KEY_NORMS if n in children), None)
    if key_norm is not None and getattr(attn, "use_qk_norm", True) and getattr(attn, "qk_layernorm", True):
        whole = getattr(key_norm, "weight", None)
        if isinstance(whole, Tensor) and whole.dim() == 1 and whole.numel() == Hkv * d and Hkv > 1:
            k = _norm(key_norm, k, "key norm")  # over the whole projected key (OLMo 2/3, OLMoE): before clipping
            key_norm = None
    clip = getattr(getattr(attn, "config", None), "clip_qkv", None)
    if clip is not None:  # OLMo, OLMoE: keys and values clamped after the projection (and its whole-key norm)
        k, v = k.clamp(-clip, clip), v.clamp(-clip, clip)
    if key_norm is not None and getattr(attn, "use_qk_norm", True) and getattr(attn, "qk_layernorm", True):
        k = _norm(key_norm, k, "key norm")  # each head's key (Qwen3, Gemma 3, Cohere, StableLM, Persimmon)
    value_norm = next((children[n] for n in VALUE_NORMS if n in children), None)
    if value_norm is not None:
        v = _norm(value_norm, v, "value norm")
    multiplier = getattr(attn, "key_multiplier", None)  # Falcon-H1
    if isinstance(multiplier, (int, float)):
        k = k * multiplier
    scale = getattr(attn, "qk_scale", None)  # Ergo: queries and keys scaled
    if isinstance(scale, Tensor):
        k = k * scale.double()
    at0 = _rotary_at_0(model, attn, x.shape[-1], x.device)
    if at0 is not None:  # RoPE at position 0 multiplies the rotated dimensions by cos(0) = the attention scale
        cos, sin = (t.reshape(-1, t.shape[-1])[0].double() for t in at0)
        if sin.abs().max() != 0 or cos.max() != cos.min():
            raise NotWrittenOut("the rotary at position 0 is not a plain scale (sin ≠ 0 or cos not constant)")
        factor = _partial_rotary_factor(model, attn)
        r = getattr(attn, "rotary_ndims", None) or (int(d * factor) if factor else d)  # the first r (Phi, GLM)
        k = torch.cat([k[..., :r] * cos[0], k[..., r:]], dim=-1)
    return k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()


def prompt_kv(model, attn, prompt: Tensor, independent: bool = True) -> tuple[Tensor, Tensor, str]:
    """The prompt's keys and values ``[Hkv, K, d]`` float64 and the route they took: ``"independent"``
    (:func:`written_out_kv`) where the family's key path can be written out, else ``"capture: <why not>"``
    (:func:`prompt_kv_at_position_0`, the layer's own forward)."""
    if independent:
        try:
            key, value = written_out_kv(model, attn, prompt)
            return key, value, "independent"
        except NotWrittenOut as why:
            reason = str(why)
    else:
        reason = "asked for"
    with torch.no_grad():
        key, value = prompt_kv_at_position_0(model, attn, prompt)
    return key, value, f"capture: {reason}"


def _prefix_reference(module, query, key, value, attention_mask, cap_prompt, **kwargs):
    """gate=None: naive float64 prefix attention over [prompt keys at position 0; the layer's keys]. The model must
    run with attn_implementation="eager", whose masks are always materialised: an additive float mask [B,1,T,S]
    (or bool), or None for no mask at all."""
    if module._reference_impl != "eager":
        raise AssertionError("the prefix reference reads eager masks: build the reference model with eager attention")
    kp, vp = module._reference_kv
    q, k, v = query.double(), key.double(), value.double()
    allowed = None
    if attention_mask is not None:
        m = attention_mask[:, 0]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        allowed = allowed.expand(q.shape[0], q.shape[2], k.shape[2])
    scale = kwargs.get("scaling") or module.scaling
    out = prefix_attention(q, k, v, kp, vp, scale, allowed, kwargs.get("softcap") if cap_prompt else None)
    return out.transpose(1, 2).to(query.dtype), None


def install_reference(model, attns, prompts, gates, gate_fn: str, cap_prompt: bool = True,
                      independent: bool = True) -> list[str]:
    """Route each of ``attns`` (modules of a *never-injected* copy of the model) through the reference: the family's
    own eager attention for the tokens plus the naive prompt term (float64, per head, its own softmax, the layer's
    soft-capping, unless ``cap_prompt`` is False) from :func:`prompt_kv` (the written-out key path where it can be,
    else the capture route; ``independent=False``: always the capture route). A gate of None: naive prefix
    attention instead (:func:`_prefix_reference`; the reference model must use eager attention). Returns each
    layer's key route, and leaves its keys and values on it as ``_reference_kv``."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    def reference(module, query, key, value, attention_mask, **kwargs):
        if module._reference_gate is None:
            return _prefix_reference(module, query, key, value, attention_mask, cap_prompt, **kwargs)
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        own = ALL_ATTENTION_FUNCTIONS.get_interface(module._reference_impl, eager) or eager
        out, weights = own(module, query, key, value, attention_mask,
                           **{k: v for k, v in kwargs.items() if not k.startswith("reference")})
        kp, vp = module._reference_kv
        q = query.double()
        H, group = q.shape[1], q.shape[1] // kp.shape[0]
        g = torch.tanh(module._reference_gate.double()) if gate_fn == "tanh" else module._reference_gate.double()
        g = g.expand(H)
        scale = kwargs.get("scaling") or module.scaling
        cap = kwargs.get("softcap") if cap_prompt else None
        extra = torch.empty_like(q)
        for h in range(H):
            s = q[:, h] @ kp[h // group].T * scale
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            extra[:, h] = g[h] * (torch.softmax(s, dim=-1) @ vp[h // group])
        return out + extra.transpose(1, 2).to(out.dtype), weights

    AttentionInterface.register("reference_prompt", reference)
    routes = []
    for attn, prompt, gate in zip(attns, prompts, gates):
        key, value, route = prompt_kv(model, attn, prompt, independent)
        routes.append(route)
        attn._reference_kv = (key, value)
        attn._reference_gate = None if gate is None else gate.detach()
        attn._reference_impl = attn.config._attn_implementation or "eager"
        attn.config = _RouteTo(attn.config, "reference_prompt")
    return routes


def _timm_parts(attn):
    """The (weight, bias) of q, k and v in a timm ``Attention``'s fused ``qkv`` ([q | k | v]), float64."""
    width = attn.num_heads * attn.head_dim
    w, b = attn.qkv.weight.double(), None if attn.qkv.bias is None else attn.qkv.bias.double()
    return [(w[i * width:(i + 1) * width], None if b is None else b[i * width:(i + 1) * width]) for i in range(3)]


def timm_prompt_kv(attn, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """A timm ``Attention``'s prompt keys (through its ``k_norm``) and values ``[H, K, d]``, float64, written out."""
    import copy as _copy

    kp, vp = (_heads(prompt.detach().double() @ pw.T + (0 if pb is None else pb), attn.num_heads)
              for pw, pb in _timm_parts(attn)[1:])
    return _copy.deepcopy(attn.k_norm).double()(kp), vp


def timm_attention_layer(attn, x: Tensor, prompt, gate, gate_fn):
    """Any timm ``Attention`` (qk-norm, scale-norm and gated variants included) for ``x`` [B,N,C], after ``proj``:
    the prompt keys go through the layer's ``k_norm`` as the token keys do; bidirectional, no mask."""
    import copy as _copy

    x = x.double()
    H = attn.num_heads
    parts = _timm_parts(attn)
    q, k, v = (_heads(x @ pw.T + (0 if pb is None else pb), H) for pw, pb in parts)
    kp, vp = timm_prompt_kv(attn, prompt)
    q_norm, k_norm, norm = (_copy.deepcopy(m).double() for m in (attn.q_norm, attn.k_norm, attn.norm))
    q, k = q_norm(q), k_norm(k)
    out = gated_attention(q, k, v, kp, vp, gate, gate_fn, attn.scale, None)
    out = norm(out.transpose(1, 2).flatten(2))
    if getattr(attn, "gate", None) is not None:
        out = out * _copy.deepcopy(attn.gate).double()(x).sigmoid()
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()
