"""A naive implementation of the method, written straight from DESIGN.md §1 and sharing no code with zinit.

For one adapted layer, in float64, with explicit matmuls, one loop over heads and two separate softmaxes:

    Kp = k_proj(P), Vp = v_proj(P)                    (no normalisation of P, no positional encoding)
    out_h = softmax(q_h·Kw_hᵀ·s + mask)·Vw_h + g_h · softmax(q_h·Kp_hᵀ·s)·Vp_h      (no mask on the prompt part)
    g = tanh(gate) or gate, one per head (a layer gate is the same for every head)

with query head h using key/value head h // (H / Hkv) for grouped-query attention.

``gate=None`` (zinit's ``gate="none"``) is plain prefix attention instead, one softmax over prompt and tokens:

    out_h = softmax([q_h·Kp_hᵀ·s ; q_h·Kw_hᵀ·s + mask])·[Vp_h ; Vw_h]      (no mask on the K prompt columns)
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


def _position0(model, width: int, length: int, device):
    """The model's own rotary (cos, sin) at position 0 for ``length`` rows, or None when it has no rotary module."""
    import inspect

    rotaries = [m for name, m in model.named_modules() if name.split(".")[-1] in ("rotary_emb", "rotary_embedding")]
    if not rotaries:
        return None
    rotary = rotaries[0]
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kwargs["layer_type"] = (getattr(text, "layer_types", None) or [None])[0]
    dummy = torch.zeros(1, length, width, device=device)
    return rotary(dummy, torch.zeros(1, length, dtype=torch.long, device=device), **kwargs)


def prompt_kv_at_position_0(model, attn, prompt: Tensor):
    """The keys and values the layer's own forward makes of ``prompt`` [K, C] placed at position 0 (RoPE at position
    0 is the identity rotation, so these are the keys of a token with no position): [Hkv, K, d] each, float64."""
    import inspect

    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register("reference_record", _record)
    params = inspect.signature(type(attn).forward).parameters
    floats = [p.dtype for p in attn.parameters() if p.is_floating_point()]  # none in a 4-bit layer (uint8 weights)
    hidden = prompt.detach()[None].to(floats[0] if floats else model.dtype)
    kwargs = {"hidden_states": hidden, "attention_mask": None}
    for name in ("past_key_values", "past_key_value", "layer_past"):
        if name in params:
            kwargs[name] = None
    if "position_ids" in params:
        kwargs["position_ids"] = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if "position_embeddings" in params:
        cos, sin = _position0(model, hidden.shape[-1], 1, hidden.device)
        kwargs["position_embeddings"] = (cos.expand(1, hidden.shape[1], -1), sin.expand(1, hidden.shape[1], -1))
    config = attn.config
    attn.config = _RouteTo(config, "reference_record")
    try:
        type(attn).forward(attn, **kwargs)
    except _Captured as done:
        key, value = done.args
        return key[0].double(), value[0].double()
    finally:
        attn.config = config
    raise AssertionError(f"{type(attn).__qualname__} never called its attention function")


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


def install_reference(model, attns, prompts, gates, gate_fn: str, cap_prompt: bool = True):
    """Route each of ``attns`` (modules of a *never-injected* copy of the model) through the reference: the family's
    own eager attention for the tokens plus the naive prompt term (float64, per head, its own softmax, the layer's
    soft-capping, unless ``cap_prompt`` is False) from :func:`prompt_kv_at_position_0`. A gate of None: naive prefix
    attention instead (:func:`_prefix_reference`; the reference model must use eager attention)."""
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
    for attn, prompt, gate in zip(attns, prompts, gates):
        attn._reference_kv = prompt_kv_at_position_0(model, attn, prompt)
        attn._reference_gate = None if gate is None else gate.detach()
        attn._reference_impl = attn.config._attn_implementation or "eager"
        attn.config = _RouteTo(attn.config, "reference_prompt")


def timm_attention_layer(attn, x: Tensor, prompt, gate, gate_fn):
    """Any timm ``Attention`` (qk-norm, scale-norm and gated variants included) for ``x`` [B,N,C], after ``proj``:
    the prompt keys go through the layer's ``k_norm`` as the token keys do; bidirectional, no mask."""
    import copy as _copy

    x = x.double()
    H, d = attn.num_heads, attn.head_dim
    width = H * d
    w, b = attn.qkv.weight.double(), None if attn.qkv.bias is None else attn.qkv.bias.double()
    parts = [(w[i * width:(i + 1) * width], None if b is None else b[i * width:(i + 1) * width]) for i in range(3)]
    q, k, v = (_heads(x @ pw.T + (0 if pb is None else pb), H) for pw, pb in parts)
    kp, vp = (_heads(prompt.double() @ pw.T + (0 if pb is None else pb), 1 * H) for pw, pb in parts[1:])
    q_norm, k_norm, norm = (_copy.deepcopy(m).double() for m in (attn.q_norm, attn.k_norm, attn.norm))
    q, k, kp = q_norm(q), k_norm(k), k_norm(kp)
    out = gated_attention(q, k, v, kp, vp, gate, gate_fn, attn.scale, None)
    out = norm(out.transpose(1, 2).flatten(2))
    if getattr(attn, "gate", None) is not None:
        out = out * _copy.deepcopy(attn.gate).double()(x).sigmoid()
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()
