"""The Hugging Face hook: zinit as a transformers ``AttentionInterface`` implementation.

transformers ≥ 5 dispatches attention of LLaMA/Mistral/Qwen2/BERT/RoBERTa (and most other families) through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, called as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)`` with the query already rotated
and the keys/values already concatenated with the KV cache. zinit registers, for the implementation a model
had (``sdpa``, ``eager``, ``flash_attention_2``, ...), a wrapper named ``zinit_<that name>`` that

1. calls that very implementation, so token attention stays on the model's own fast kernel, then
2. if the module carries a :class:`~zinit.prompts.LayerAdapter`, adds the gated prompt term computed from the
   same ``query`` (the layer's own, never recomputed).

Modules without an adapter (layers that are not adapted, cross-attention) go through untouched.

transformers builds attention masks through ``AttentionMaskInterface`` keyed by the same name, and a name with no
mask function gets *no mask at all*; so the wrapper's name is registered there with the original's mask function.
"""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from .prompts import ADAPTER_ATTR

PREFIX = "zinit_"


@functools.cache
def _eager_for(cls: type) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of the class's own modeling file (what transformers uses for "eager").

    Looked up once per attention class: the wrapper runs in every attention call of the model."""
    fn = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{cls.__qualname__}'s module has no eager_attention_forward to delegate to")
    return fn


def _make_wrapper(original: str) -> Callable[..., tuple[Tensor, Any]]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def zinit_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> tuple[Tensor, Any]:
        base = ALL_ATTENTION_FUNCTIONS.get_interface(original, None) or _eager_for(type(module))
        out, weights = base(module, query, key, value, attention_mask, **kwargs)
        adapter = module._modules.get(ADAPTER_ATTR)
        if adapter is None:
            return out, weights
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = module.scaling
        # every implementation returns [B, T, H, d]; the query (and the prompt term) is [B, H, T, d]
        prompt_term = adapter.attend(query, module, scaling)
        return out + prompt_term.transpose(1, 2).to(out.dtype), weights

    zinit_attention.__name__ = f"zinit_{original}_attention"
    return zinit_attention


def attention_name(original: str) -> str:
    """Register (once) and return the zinit wrapper's name for the attention implementation ``original``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if original.startswith(PREFIX):
        raise RuntimeError(f"attention implementation {original!r} is already zinit's: eject the model first")
    name = PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(original))
    if original in ALL_MASK_ATTENTION_FUNCTIONS and name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


# Models built from one config object share it, so routing one model through zinit routes its siblings too.
# That is harmless (modules without an adapter pass straight through the wrapper), but the original name may only
# come back when the last injected model on that config is ejected: count them, per config object.
_routed: dict[int, tuple[weakref.ref, int]] = {}


def _users(config: Any) -> int:
    ref, count = _routed.get(id(config), (None, 0))
    return count if ref is not None and ref() is config else 0


def install(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Route ``model``'s attention through zinit's wrapper of its current implementation."""
    config = model.config
    for m in modules:
        if m.config is not config:
            raise RuntimeError(
                f"{type(m).__qualname__} does not share the model's config; zinit's attention hook cannot reach it"
            )
    current = config._attn_implementation or "eager"
    if not current.startswith(PREFIX):
        config._attn_implementation = attention_name(current)
    _routed[id(config)] = (weakref.ref(config), _users(config) + 1)


def uninstall(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Give ``model`` back the attention implementation it had before :func:`install`."""
    config = model.config
    name = config._attn_implementation or ""
    if not name.startswith(PREFIX):
        raise RuntimeError(
            f"config._attn_implementation is {name!r}, not zinit's: it was changed after zinit.inject "
            "(e.g. by set_attn_implementation); set it back to the zinit_ name before ejecting"
        )
    left = _users(config) - 1  # a deep copy of an injected model has a config of its own, counted as 0 here
    if left > 0:
        _routed[id(config)] = (weakref.ref(config), left)
        return
    _routed.pop(id(config), None)
    config._attn_implementation = name[len(PREFIX):]
