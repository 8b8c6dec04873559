"""Gated prompt attention as plain functions on tensors (no module state).

The method (docs/design.md §1): every token query of an adapted layer also attends to K learnable prompt keys,
through a softmax of its own, and the result is scaled per head by a gate that starts at exactly zero::

    out = softmax(q·Kwᵀ·s + mask)·Vw  +  gate ⊙ softmax(q·Kpᵀ·s)·Vp

The first term is the layer's own attention, computed by the model's own kernel (SDPA / flash) and never
touched here. This module computes the second term only: it is ``T × K`` per head, tiny beside the first.

Without a gate (``gate="none"``, plain prefix attention) there is one softmax over prompt and token keys; the
layer's own kernel computes it on the longer key sequence, with the mask :func:`joint_mask` widens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ZinitValueError

GATE_FUNCTIONS = ("tanh", "identity")


def gate_values(gate: Tensor, gate_fn: str, num_heads: int) -> Tensor:
    """The per-head multiplier ``[num_heads]`` from a raw gate parameter (``[num_heads]`` or ``[1]``).

    ``gate_fn="tanh"`` is the paper's training code, ``"identity"`` the official v1 inference code, peft and litgpt.

    >>> gate_values(torch.zeros(1), "tanh", 4)
    tensor([0., 0., 0., 0.])
    """
    if gate_fn == "tanh":
        g = torch.tanh(gate)
    elif gate_fn == "identity":
        g = gate
    else:
        raise ZinitValueError(f"gate_fn={gate_fn!r} is not one of {GATE_FUNCTIONS}")
    return g.expand(num_heads)


def _expand_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[..., Hkv, K, d]`` → ``[..., H, K, d]``: query head h uses KV head ``h // (H // Hkv)``, as HF ``repeat_kv``.

    The prompt has only K rows, so this copy is K·d per head: negligible, and it lets the query stay as it is.
    """
    kv_heads = x.shape[-3]
    if kv_heads == num_heads:
        return x
    if num_heads % kv_heads:
        raise ZinitValueError(f"{num_heads} query heads are not a multiple of {kv_heads} key/value heads")
    *lead, _, K, d = x.shape  # as repeat_kv: a view with a group axis, copied once into H heads (no einops: this
    # runs for every adapter of every layer at each prefill, where its parsing cost more than the copy)
    return x.unsqueeze(-3).expand(*lead, kv_heads, num_heads // kv_heads, K, d).reshape(*lead, num_heads, K, d)


def prepare_prompt_kv(prompt_key: Tensor, prompt_value: Tensor, gate: Tensor, num_heads: int,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Prompt keys/values ready for every query head: ``[..., H, K, d]``, the gate folded into the values.

    Depends on parameters only (never on tokens), so it can be computed once and reused for every decoding step.
    """
    key = _expand_kv_heads(prompt_key, num_heads).to(dtype)
    value = _expand_kv_heads(prompt_value, num_heads).to(dtype)
    return key, value * gate.to(dtype).view(num_heads, 1, 1)


def softcap_scores(scores: Tensor, softcap: float | None) -> Tensor:
    """Logit soft-capping as Gemma 2 applies it to attention scores: ``softcap · tanh(scores / softcap)`` (None: off).

    >>> softcap_scores(torch.tensor([0.0, 100.0]), 50.0)
    tensor([ 0.0000, 48.2014])
    """
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def prompt_attention(query: Tensor, key: Tensor, gated_value: Tensor, scaling: float,
                     softcap: float | None = None, mask: Tensor | None = None) -> Tensor:
    """``softmax(q·Kpᵀ·scaling)·Vp`` for prepared prompt keys/values (see :func:`prepare_prompt_kv`): ``[B, H, T, d]``.

    ``softcap``: the layer's logit soft-capping (Gemma 2), applied to the prompt scores as the layer applies it to
    the token scores. ``mask``: ``[B, K]`` booleans, True at the prompt positions that exist, for per-example
    prompts padded to one length (a batch mixing adapters of different K); the others get no weight at all.

    No mask: every query sees every prompt key. The softmax is computed in float32, as HF eager attention does.
    Two exact formulations, chosen by shape for speed (measured on CPU, SmolLM2 shape, K=10):

    - many queries (training, prefill): scores laid out ``[..., K, T]``, so the softmax over the K prompt keys
      runs along contiguous T; 3.6x faster forward than an SDPA call over K keys, whose kernel is built for long
      key sequences, and faster than ``[..., T, K]`` scores, whose softmax rows are only K long;
    - one query per sequence (a decoding step): one ``scaled_dot_product_attention`` call. With one prompt for the
      whole batch, the B rows are passed as the B queries of one sequence against the ``[H, K, d]`` prompt, never
      copied per row: in a 30-layer decoding loop at 16 rows this costs 63 µs per layer and step against 80 µs for
      the prompt expanded to every row (8 rows: 48 vs 53 µs; 64 rows: 169 vs 260 µs).
    """
    if key.dim() == 4 and key.shape[0] != query.shape[0]:
        raise ZinitValueError(f"per-example prompt batch {key.shape[0]} does not match the query batch {query.shape[0]}")
    if query.shape[-2] == 1 and softcap is None:  # a decoding step: one fused kernel call
        return DecodingStep(key, gated_value, mask=mask)(query, scaling)
    # scores [..., H, K, T] = einsum("h k d, b h t d -> b h k t"), written as a matmul: on CPU einsum (torch's or
    # einops') is 2.9x slower here (1.1 ms vs 0.39 ms at batch 4x256, 9 heads, K=10)
    scores = softcap_scores(torch.matmul(key * scaling, query.transpose(-1, -2)), softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-2, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs.transpose(-1, -2), gated_value)


class DecodingStep:
    """The prompt term of a decoding step (one query per row, no soft-capping) on prompt keys/values prepared once:
    a decoding loop keeps one per adapted layer on its KV cache and calls it at every step, so a step runs one
    ``scaled_dot_product_attention`` call with nothing else to decide. ``step(query, scaling)`` is ``[B, H, 1, d]``,
    what :func:`prompt_attention` computes.

    ``key``/``gated_value``: one prompt for every row ``[H, K, d]`` (as :func:`prepare_prompt_kv` makes it, the gate
    folded into the values): the B rows are passed as the B queries of one sequence against it, never copied per row.
    Or one prompt per row ``[B, H, K, d]`` (a batch mixing adapters). ``mask``: ``[B, K]`` booleans, True at the
    prompt positions that exist (prompts of different K padded to one length); None when all exist.

    >>> g = torch.Generator().manual_seed(0)
    >>> key, value = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    >>> query = torch.randn(2, 4, 1, 8, generator=g)
    >>> step = DecodingStep(key, value)  # one prompt (4 heads, K=3) for both rows
    >>> many = prompt_attention(query.expand(2, 4, 5, 8), key, value, 0.35)  # the many-query formulation
    >>> torch.allclose(step(query, 0.35), many[:, :, :1], atol=1e-6)
    True
    """

    __slots__ = ("key", "value", "mask", "shared")

    def __init__(self, key: Tensor, gated_value: Tensor, *, mask: Tensor | None = None) -> None:
        self.shared = key.dim() == 3 and mask is None
        if key.dim() == 3 and mask is not None:  # one prompt, a mask per row: as one prompt per row
            shape = (mask.shape[0], *key.shape)
            key, gated_value = key.expand(shape), gated_value.expand(shape)
        self.key = key[None] if self.shared else key
        self.value = gated_value[None] if self.shared else gated_value
        self.mask = None if mask is None else mask[:, None, None, :]

    def __call__(self, query: Tensor, scaling: float) -> Tensor:
        if self.shared:  # the rows are one sequence's queries: [1, H, B, d] against [1, H, K, d]
            rows = query.permute(2, 1, 0, 3)
            if rows.device.type != "cpu":  # fused GPU kernels have returned wrong results for permuted inputs
                rows = rows.contiguous()  # (pytorch#181133 MPS, #112577 CUDA mem-efficient); B·H·d values, cheap
            return F.scaled_dot_product_attention(rows, self.key, self.value, scale=scaling).permute(2, 1, 0, 3)
        return F.scaled_dot_product_attention(query, self.key, self.value, attn_mask=self.mask, scale=scaling)


def joint_mask(mask: Tensor | None, prompt_len: int, q_len: int, kv_len: int, causal: bool,
               device: torch.device | str | None = None) -> Tensor | None:
    """The attention mask over ``[K prompt keys; S token keys]`` for a ``gate="none"`` layer: the token columns as
    ``mask`` has them, and K columns before them that every query sees.

    ``mask``: the implementation's own (``[..., T, S]`` booleans, True = attend, or additive floats, 0 = attend), or
    None. ``causal``: whether a None mask stands for a causal one (SDPA's ``is_causal``: query i sees keys 0..i,
    aligned top-left as SDPA and transformers' cropping of an empty static cache do), which cannot be expressed on a
    longer key sequence, so the mask is built, on ``device``; otherwise None (every query sees every key) stays None.

    >>> joint_mask(None, 2, 3, 3, causal=True)[0, 0].int()
    tensor([[1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1]], dtype=torch.int32)
    >>> joint_mask(torch.tensor([[0.0, -1e9]]), 1, 1, 2, causal=False)
    tensor([[ 0.0000e+00,  0.0000e+00, -1.0000e+09]])
    """
    if mask is None:
        if not causal:
            return None
        tokens = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        return torch.cat([torch.ones(q_len, prompt_len, dtype=torch.bool, device=device), tokens], dim=-1)[None, None]
    if not isinstance(mask, Tensor):
        raise ZinitValueError(f"gate='none' joins the prompt keys to an attention mask given as a tensor; this attention "
                         f"gives a {type(mask).__name__}: use an implementation with tensor masks (Hugging Face: "
                         "attn_implementation='sdpa' or 'eager'), or gate='head' or 'layer'")
    pad_shape = (*mask.shape[:-1], prompt_len)
    pad = (torch.ones(pad_shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool
           else torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device))
    return torch.cat([pad, mask], dim=-1)
