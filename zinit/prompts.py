"""The learnable parameters of one adapted layer (its prompt and its gate), and the optional visual projection that
adds a per-example image token to every layer's prompt (docs/design.md §1, multimodal).

Two calls reach an adapter from a backbone's attention: :func:`prompt_term` (the gated prompt term, added to the
layer's attention output: ``gate="head"`` / ``"layer"``) and :func:`joint_prompt_kv` (the prompt keys and values a
``gate="none"`` adapter joins to the layer's token keys, for the layer's own softmax).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import DecodingStep, gate_values, prepare_prompt_kv, prompt_attention
from .errors import ZinitValueError

#: Name of the submodule that holds a layer's adapter, on that layer's attention module.
ADAPTER_ATTR = "zinit_adapter"
#: Name of the submodule, on an attention module, that holds that layer's named adapters (:mod:`zinit.bank`).
BANK_ATTR = "zinit_bank"
#: Name of the model-level submodule that holds the visual projection (``inject(..., visual_dim=D)``).
VISUAL_ATTR = "zinit_visual_proj"


class VisualProjection(nn.Module):
    """The learnable MLP that maps global image features ``[B, D]`` (e.g. multi-scale CLIP class tokens,
    concatenated) to one image token ``[B, C]``, which is added to every position of every adapted layer's prompt.

    ``Linear(D, hidden) → GELU → Linear(hidden, C)``, float32 like the prompts. Gates start at 0, so at step 0 the
    image changes nothing, whatever this projection outputs.
    """

    def __init__(self, visual_dim: int, hidden_size: int, hidden: int = 128,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(visual_dim, hidden, device=device, dtype=torch.float32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden_size, device=device, dtype=torch.float32)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, D]`` features → ``[B, C]`` tokens, computed in the projection's own dtype (float32 unless the
        model was cast after inject)."""
        return self.fc2(self.act(self.fc1(features.to(self.fc1.weight.dtype))))


class VisualInput:
    """Where the image tokens of the current forward live while a ``zinit.visual_features`` block runs.

    A :class:`contextvars.ContextVar`, so two threads (or asyncio tasks) running forwards of the same model with
    different images each see their own tokens.
    """

    def __init__(self) -> None:
        self.var: ContextVar[tuple[int, Tensor] | None] = ContextVar(f"zinit_visual_{id(self)}", default=None)

    # A ContextVar can be neither copied nor pickled, and its values belong to the running threads: a copy of a
    # model (deepcopy, torch.save, a replica) gets a fresh one, with no active block.
    def __reduce__(self) -> tuple:
        return (VisualInput, ())

    def __deepcopy__(self, memo: dict) -> "VisualInput":
        return VisualInput()

    def current(self) -> tuple[int, Tensor] | None:
        """``(serial, tokens [B, C])`` of the innermost active block, or None. The serial number is unique per
        block, so a prompt cache keyed on it can never mistake new tokens for freed ones at the same address."""
        return self.var.get()


class LayerAdapter(nn.Module):
    """Prompt ``[K, C]`` (initialised N(0, 1)) and gate (``[H]`` or ``[1]``, initialised to exactly 0) of one layer.

    Gate variants (the paper's ablations, docs/design.md §1):

    - ``gate_init="random"``: the gate is drawn from N(0, 1), one value per gate element, right after the prompt and
      from the same generator (torch's global one: ``torch.manual_seed`` makes both reproducible). N(0, 1) because
      the paper does not say how its "rand-init attention" ablation draws the gate, and the official code
      (``alpaca_finetuning_v1``) draws its one randomly initialised adapter parameter, the prompt (an ``nn.Embedding``),
      from N(0, 1): the gate is drawn like the rest of the adapter, so ``tanh(gate)`` starts well away from 0
      (mean ``|tanh(g)|`` ≈ 0.6) and the model does not start as the base model. Everything else is unchanged.
    - ``gate="none"``: no gate parameter at all (``self.gate`` is None); the prompt keys and values join the layer's
      token keys and values in one softmax (prefix attention with the same parameters), through
      :meth:`joint_kv` and the backbone. The one public implementation of the paper's ablation (Diep et al., ICML
      2025, "On Zero-Initialized Attention", the ``random_init`` switch of its ``llama/model.py``) computes exactly
      this: one softmax over ``[prompt; tokens]``, no gate.

    Parameters are created in float32 whatever the model's dtype (they are what the optimizer updates, and a bf16
    gate could not take the small steps that open it) and cast to the attention's compute dtype on use. A later
    ``model.to(dtype)`` casts them with the rest of the model, which works too (for training, prefer autocast).

    Args:
        K: prompt length.
        hidden_size: C, the input width of the layer's key/value projections.
        num_heads: query heads H.
        gate: ``"head"`` (one gate per query head, the paper), ``"layer"`` (one scalar, as peft) or ``"none"``.
        gate_fn: ``"tanh"`` (paper) or ``"identity"`` (official v1 inference, peft, litgpt).
        gate_init: ``"zero"`` (the method) or ``"random"`` (N(0, 1), see above).
        project: the backbone's ``(attention module, prompt) -> (keys, values)``.
        device: where to create the parameters (the model's device; ``"meta"`` works).
        visual: the model's :class:`VisualInput` when it was injected with ``visual_dim``; while image tokens
            ``[B, C]`` are set, the prompt of example b is ``P + token_b`` (repeated over the K positions).
    """

    def __init__(
        self,
        K: int,
        hidden_size: int,
        num_heads: int,
        *,
        gate: str,
        gate_fn: str,
        project: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
        device: torch.device | str | None = None,
        visual: VisualInput | None = None,
        gate_init: str = "zero",
    ) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(K, hidden_size, device=device, dtype=torch.float32))
        if gate == "none":
            self.register_parameter("gate", None)
        else:
            shape = num_heads if gate == "head" else 1
            start = (torch.randn(shape, device=device, dtype=torch.float32) if gate_init == "random"
                     else torch.zeros(shape, device=device, dtype=torch.float32))
            self.gate = nn.Parameter(start)
        self.gate_kind = gate
        self.gate_fn = gate_fn
        self.gate_init = gate_init
        self.num_heads = num_heads
        self._project = project
        self._visual = visual

    def extra_repr(self) -> str:
        K, C = self.prompt.shape
        text = f"K={K}, hidden_size={C}, heads={self.num_heads}, gate={self.gate_kind!r}"
        if self.gate is not None:
            text += f", gate_fn={self.gate_fn!r}"
            if self.gate_init != "zero":
                text += f", gate_init={self.gate_init!r}"
        return text

    def gate_values(self) -> Tensor:
        """The per-head multiplier ``[H]`` (``tanh(gate)`` or ``gate``, broadcast for a layer gate); an error for
        ``gate="none"``, which has no gate."""
        if self.gate is None:
            raise ZinitValueError("this adapter was injected with gate='none': it has no gate (its prompt keys join the "
                             "tokens' softmax)")
        return gate_values(self.gate, self.gate_fn, self.num_heads)

    def prompt_kv(self, attention: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Prompt keys and values ``[Hkv, K, d]`` through ``attention``'s own frozen projections."""
        return self._project(attention, self.prompt.to(dtype))

    def _image_tokens(self, batch: int) -> tuple[int, Tensor | None]:
        current = self._visual.current() if self._visual is not None else None
        if current is None:
            return 0, None
        serial, tokens = current
        if tokens.shape[0] == batch:
            return serial, tokens
        if batch % tokens.shape[0]:
            raise ZinitValueError(f"image features were given for {tokens.shape[0]} examples, but the forward has a batch "
                             f"of {batch}; pass one feature row per example")
        return serial, tokens.repeat_interleave(batch // tokens.shape[0], dim=0)  # generate() with beams

    def _prepared(self, attention: nn.Module, query: Tensor, tokens: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gated: keys and gated values for every query head ``[(B,) H, K, d]``. ``gate="none"``: the keys and values
        as projected, ``[(B,) Hkv, K, d]`` (the layer's own kernel shares KV heads as it does for its tokens)."""
        if tokens is None:
            key, value = self.prompt_kv(attention, query.dtype)
        else:  # one prompt per example: P + image token, [B, K, C]
            key, value = self._project(attention, (self.prompt + tokens[:, None, :]).to(query.dtype))
        if self.gate is None:
            return key, value
        return prepare_prompt_kv(key, value, self.gate_values(), self.num_heads, query.dtype)

    def _kv(self, query: Tensor, attention: nn.Module, scope: object | None) -> tuple[Tensor, Tensor]:
        serial, tokens = self._image_tokens(query.shape[0])
        if scope is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._prepared(attention, query, tokens)
        return self._scoped(scope, attention, query, tokens, serial)

    def attend(self, query: Tensor, attention: nn.Module, scaling: float, scope: object | None = None,
               softcap: float | None = None) -> Tensor:
        """The gated prompt term ``[B, H, T, d]`` for the layer's query ``[B, H, T, d]`` (``softcap``: the layer's
        logit soft-capping, applied to the prompt scores too).

        The prompt keys/values are projected through ``attention``'s own frozen projections on every call (once
        per forward of the layer), so they always reflect the current parameters, however those were changed (an
        optimizer step, fused or not, a ``.data`` edit, ``load_state_dict``, a dtype round trip, another library
        wrapping the projections). The one exception is a decoding loop: ``scope`` is the layer's KV cache
        (``past_key_values`` of ``generate()``); without gradients the prompt keys/values projected by the call that
        filled it (the prefill, any call with more than one new token) are kept on that cache object and reused by
        its one-token decoding steps, as the token keys/values of earlier steps are. Every multi-token call (a new
        ``generate()`` on a reused or ``reset()`` cache, a new chat turn, assisted-decoding verification) projects
        afresh. Nothing is stored on the adapter: forwards in several threads never share state.

        A cache kept across a weight change holds keys/values of the old weights anyway (the token ones too); give
        a decoding loop that starts after such a change a new cache, or a prefill of more than one token.

        A ``gate="none"`` adapter has no separate term: its backbone joins :meth:`joint_kv` to the token keys.
        """
        if scope is not None and softcap is None and query.shape[-2] == 1:  # a decoding step: one kernel call
            step = self._kept_step(scope, query)
            if step is not None:
                return step(query, scaling)
        if self.gate is None:
            raise ZinitValueError("a gate='none' adapter has no separate prompt term: its prompt keys and values join the "
                             "layer's token keys (zinit.joint_prompt_kv); this backbone called prompt_term")
        key, value = self._kv(query, attention, scope)
        return prompt_attention(query, key, value, scaling, softcap)

    def _kept_step(self, scope: object, query: Tensor) -> DecodingStep | None:
        """The :class:`DecodingStep` kept on ``scope`` by the call that filled it, if it still serves ``query`` (the
        same dtype, device and image features, no gradients, not compiling); None otherwise."""
        store = getattr(scope, STORE_ATTR, None)
        entry = store.get(self) if isinstance(store, PromptStore) else None
        if entry is None or entry[3] is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        serial, tokens = self._image_tokens(query.shape[0]) if self._visual is not None else (0, None)
        return entry[3] if entry[0] == _stamp(query, serial, tokens) else None

    def joint_kv(self, query: Tensor, attention: nn.Module, scope: object | None = None) -> tuple[Tensor, Tensor]:
        """``gate="none"``: the prompt keys and values ``[B, Hkv, K, d]`` (in the query's dtype, no positional
        encoding, the image token added where a :func:`zinit.visual_features` block is active) that the layer joins
        to its token keys and values for one softmax. Projected once per call, or kept on ``scope`` for the
        one-token decoding steps of a KV cache exactly as :meth:`attend` keeps a gated adapter's."""
        if self.gate is not None:
            raise ZinitValueError(f"this adapter has a {self.gate_kind!r} gate: its prompt term is zinit.prompt_term, "
                             "added to the attention output; joint_kv is for gate='none'")
        key, value = self._kv(query, attention, scope)
        if key.dim() == 3:  # one prompt for the batch
            batch = query.shape[0]
            key, value = key.expand(batch, *key.shape), value.expand(batch, *value.shape)
        return key, value

    def _scoped(self, scope: object, attention: nn.Module, query: Tensor, tokens: Tensor | None,
                serial: int) -> tuple[Tensor, Tensor]:
        """Prompt keys/values stored on ``scope`` (a KV cache) for this adapter, or projected and stored there."""
        store = PromptStore.on(scope)
        if store is None:  # a cache object that takes no attributes: no reuse
            return self._prepared(attention, query, tokens)
        stamp = _stamp(query, serial, tokens)
        entry = store.get(self)  # one read: another thread's write can never be half-seen
        if query.shape[-2] == 1 and entry is not None and entry[0] == stamp:  # a decoding step
            return entry[1], entry[2]
        key, value = self._prepared(attention, query, tokens)
        # a gated adapter's decoding steps go straight to the kept DecodingStep (see attend)
        store[self] = (stamp, key, value, None if self.gate is None else DecodingStep(key, value))
        return key, value


def _stamp(query: Tensor, serial: int, tokens: Tensor | None) -> tuple:
    """What prompt keys/values kept on a KV cache depend on besides the weights: the query's dtype and device and the
    image features (their block's serial number and batch)."""
    return query.dtype, query.device, serial, None if tokens is None else tokens.shape[0]


def prompt_term(module: nn.Module, query: Tensor, scaling: float, *, scope: object | None = None,
                softcap: float | None = None) -> Tensor | None:
    """The gated prompt term ``[B, H, T, d]`` that zinit adds to the attention output of ``module``, or None when
    ``module`` carries no adapter: the one call a backbone makes (README, "Adding a backbone").

    Args:
        module: an attention module of the model (the n-th of the backbone's ``attention_modules``).
        query: that module's own query ``[B, H, T, d]``, exactly as its token attention uses it (already rotated by
            RoPE, normalised, pre-scaled: whatever the family does).
        scaling: the module's score scale (usually ``d ** -0.5``).
        scope: the layer's KV cache during a decoding loop (prompt keys/values are then projected once per
            ``generate()`` call instead of once per step; see :meth:`LayerAdapter.attend`), else None.
        softcap: the layer's logit soft-capping, if it has one (Gemma 2).

    The term is in the query's dtype and layout; add it to the attention output before the heads are merged and the
    output projection runs. With the gates at zero it is exactly zero. On a model with named adapters
    (:func:`zinit.add_adapter`) it is each row's adapter's term, as :func:`zinit.use_adapters` chose.

    >>> import torch, timm, zinit
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224"), layers=1, K=4)
    >>> q = torch.randn(2, 3, 5, 64)
    >>> zinit.prompt_term(vit.blocks[11].attn, q, 64 ** -0.5).abs().max().item()  # gates start at 0
    0.0
    >>> zinit.prompt_term(vit.blocks[0].attn, q, 64 ** -0.5) is None  # layer 0 is not adapted
    True
    """
    adapter = module._modules.get(ADAPTER_ATTR)
    if adapter is None:
        adapter = module._modules.get(BANK_ATTR)  # named adapters, chosen per row
        if adapter is None:
            return None
    return adapter.attend(query, module, scaling, scope=scope, softcap=softcap)


def joint_prompt_kv(module: nn.Module, query: Tensor, *, scope: object | None = None
                    ) -> tuple[Tensor, Tensor] | None:
    """The prompt keys and values ``[B, Hkv, K, d]`` that a ``gate="none"`` adapter on ``module`` joins to the
    module's token keys and values, or None when ``module`` carries no such adapter (none at all, or a gated one:
    then :func:`prompt_term` is the call).

    A backbone that supports ``gate="none"`` (``Backbone(joint_softmax=True)``) concatenates them before its token
    keys/values, lets every query see the K prompt positions (they carry no causal or padding mask and no position),
    and runs its own attention kernel on the longer sequence: prefix attention, one softmax over prompt and tokens.
    ``query`` is the module's own (its batch, dtype and device are used); ``scope`` as for :func:`prompt_term`.

    >>> import torch, timm, zinit
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224"), layers=1, K=4, gate="none")
    >>> key, value = zinit.joint_prompt_kv(vit.blocks[11].attn, torch.randn(2, 3, 5, 64))
    >>> tuple(key.shape), zinit.joint_prompt_kv(vit.blocks[0].attn, torch.randn(2, 3, 5, 64))
    ((2, 3, 4, 64), None)
    """
    adapter = module._modules.get(ADAPTER_ATTR)
    if adapter is None or adapter.gate is not None:
        return None
    return adapter.joint_kv(query, module, scope=scope)


#: Attribute of a KV cache object under which the prompt keys/values of its decoding loop are kept.
STORE_ATTR = "_zinit_prompt_kv"


class PromptStore(dict):
    """``{adapter: (stamp, key, value, decoding step)}`` kept on one KV cache (a :class:`~zinit.bank.BankLayer`
    keeps ``(stamp, decoding step)``). A copy or a pickle of the cache gets an empty store
    (the prompt is projected again on its next use), so copying a cache never copies adapters."""

    @staticmethod
    def on(scope: object) -> "PromptStore | None":
        """The store kept on the KV cache ``scope``, made on first use; None for a cache that takes no attributes."""
        store = getattr(scope, STORE_ATTR, None)
        if not isinstance(store, PromptStore):
            store = PromptStore()
            try:
                setattr(scope, STORE_ATTR, store)
            except (AttributeError, TypeError):
                return None
        return store

    def __reduce__(self) -> tuple:
        return (PromptStore, ())

    def __deepcopy__(self, memo: dict) -> "PromptStore":
        return PromptStore()

    def __copy__(self) -> "PromptStore":
        return PromptStore()
