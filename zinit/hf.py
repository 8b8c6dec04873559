"""The Hugging Face hook: zinit as a transformers ``AttentionInterface`` implementation.

transformers ≥ 5 dispatches attention of LLaMA/Mistral/Qwen2/BERT/RoBERTa (and most other families) through
``ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation)``, called as
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kw)`` with the query already rotated
and the keys/values already concatenated with the KV cache.

zinit routes only the *adapted* attention modules, and leaves the model's config alone:

- each adapted module's ``config`` becomes an :class:`AdaptedConfig`, a view of the model's own config whose
  ``_attn_implementation`` reads ``"zinit_" + <the model's current implementation>``. The model's config (what
  masks, ``generate()``, ``save_pretrained`` and other modules read) keeps its real value, so the attention mask is
  the implementation's own, sibling models built from the same config are untouched, and a later
  ``model.set_attn_implementation(...)`` (or transformers' continuous batching switching to paged attention) keeps
  the adapter: the view follows the config and registers the wrapper of the new implementation on first use.
- the wrapper ``zinit_<name>`` (1) calls the implementation ``<name>`` itself, so token attention stays on the
  model's own kernel (SDPA, flash-attention 2/3, flex, hub kernels, paged), then (2) adds the gated prompt term
  computed from the same ``query`` (the layer's own, never recomputed). Implementations that read
  ``module.config._attn_implementation`` themselves (the flash family picks its kernel by that name) are handed a
  view of the module whose ``config`` is the model's real one.
- a forward pre-hook passes the layer's KV cache (``cache``; ``past_key_values`` before transformers 5.24) to the
  wrapper as the *scope* of the prompt keys/values: the one-token decoding steps of a KV cache reuse the prompt
  keys/values its last multi-token call projected (see :meth:`zinit.prompts.LayerAdapter.attend`).
- ``gate="none"`` (one softmax over prompt and tokens): the wrapper puts the prompt keys/values before the layer's
  keys/values (cache included), widens the mask by K columns every query may see
  (:func:`zinit.attention.joint_mask`) and calls the implementation on the K + S keys, so the model's own kernel
  computes the joint softmax exactly (its scaling, soft-capping, dropout, attention sinks and GQA included). Done
  for ``"sdpa"`` and ``"eager"``, whose masks are plain tensors; the flash family (which may derive sequence
  boundaries from position ids), flex (block masks), paged and hub kernels are refused at inject time and at call
  time.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .attention import joint_mask
from .errors import ZinitStateError, ZinitValueError
from .prompts import ADAPTER_ATTR, joint_prompt_kv, prompt_term
from .v2 import remove_hook

PREFIX = "zinit_"
#: Keyword under which the pre-hook hands the layer's KV cache (the prompt K/V scope) to the wrapper.
SCOPE_KWARG = "zinit_scope"
#: Names under which a layer's forward receives its KV cache: ``cache`` from transformers 5.24 on (which still maps
#: the older ``past_key_values`` to it until 5.40), ``past_key_values`` before, ``past_key_value`` in older families.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
#: Implementations that never read ``module.config``: they are called with the module itself.
_CONFIG_FREE = frozenset({"sdpa", "eager"})
#: Implementations that compute ``gate="none"`` (prompt keys joined to the token keys): their masks are tensors.
JOINT_IMPLEMENTATIONS = ("sdpa", "eager")


class AdaptedConfig:
    """``module.config`` of an adapted attention module: the model's config, seen through zinit.

    Every attribute reads and writes the model's config, except ``_attn_implementation``, which reads
    ``"zinit_" + config._attn_implementation`` so that the module's own dispatch finds zinit's wrapper of whatever
    implementation the model has *now*. Copies and pickles of a model keep it (it reduces to its config).
    """

    def __init__(self, base: Any) -> None:
        self.__dict__["_zinit_base"] = base  # the one attribute of its own; every other one is the config's

    @property
    def _attn_implementation(self) -> str:
        return attention_name(self._zinit_base._attn_implementation or "eager")

    def __getattr__(self, name: str) -> Any:  # called only for names this object does not have itself
        if name == "_zinit_base":  # while unpickling, before __init__ ran
            raise AttributeError(name)
        return getattr(self._zinit_base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._zinit_base, name, value)

    def __reduce__(self) -> tuple:
        return (AdaptedConfig, (self._zinit_base,))

    def __repr__(self) -> str:
        return f"AdaptedConfig({self._zinit_base!r})"


class _BaseView:
    """The attention module as a non-zinit implementation must see it: the same module with the model's own config
    (flash-attention reads ``module.config._attn_implementation`` to pick its kernel)."""

    def __init__(self, module: nn.Module, config: Any) -> None:
        self._module = module
        self.config = config

    def __getattr__(self, name: str) -> Any:  # called only for names other than _module and config
        if name == "_module":
            raise AttributeError(name)
        return getattr(self._module, name)


def base_config(config: Any) -> Any:
    """The model's own config behind an :class:`AdaptedConfig` (or ``config`` itself)."""
    return config._zinit_base if isinstance(config, AdaptedConfig) else config


@functools.cache
def _eager_for(cls: type) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of the class's own modeling file (what transformers uses for "eager").

    Looked up once per attention class: the wrapper runs in every attention call of the model."""
    fn = getattr(sys.modules[cls.__module__], "eager_attention_forward", None)
    if fn is None:
        raise ZinitStateError(f"{cls.__qualname__}'s module has no eager_attention_forward to delegate to")
    return fn


def _make_wrapper(original: str) -> Callable[..., tuple[Tensor, Any]]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config_free = original in _CONFIG_FREE

    def zinit_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
    ) -> tuple[Tensor, Any]:
        scope = kwargs.pop(SCOPE_KWARG, None)
        base = ALL_ATTENTION_FUNCTIONS.get_interface(original, None) or _eager_for(type(module))
        target = module if config_free else _BaseView(module, base_config(module.config))
        joint = joint_prompt_kv(module, query, scope=scope)
        if joint is not None:  # gate="none": one softmax over [prompt; tokens], on the implementation's own kernel
            _check_joint(module, original)
            if kwargs.get("position_bias") is not None:
                raise ZinitValueError(f"{type(module).__qualname__} passes a position bias to its attention, which zinit "
                                 "cannot extend to the prompt keys of gate='none'; use gate='head' or 'layer'")
            prompt_key, prompt_value = joint
            K = prompt_key.shape[-2]
            causal = original == "sdpa" and _sdpa_causal(module, query, attention_mask, kwargs)
            attention_mask = joint_mask(attention_mask, K, query.shape[-2], key.shape[-2], causal, query.device)
            key = torch.cat([prompt_key.to(key.dtype), key], dim=-2)
            value = torch.cat([prompt_value.to(value.dtype), value], dim=-2)
            out, weights = base(target, query, key, value, attention_mask, **kwargs)
            return out, (weights[..., K:] if isinstance(weights, Tensor) else weights)  # the tokens' columns
        out, weights = base(target, query, key, value, attention_mask, **kwargs)
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = module.scaling
        # a soft-capped layer (Gemma 2) caps the prompt scores as it caps the token scores
        term = prompt_term(module, query, scaling, scope=scope, softcap=kwargs.get("softcap"))
        if term is None:
            return out, weights
        # every implementation returns [B, T, H, d]; the query (and the prompt term) is [B, H, T, d]
        return out + term.transpose(1, 2).to(out.dtype), weights

    zinit_attention.__name__ = f"zinit_{original}_attention"
    return zinit_attention


def _sdpa_causal(module: nn.Module, query: Tensor, attention_mask: Any, kwargs: dict[str, Any]) -> bool:
    """Whether transformers' SDPA function would apply a causal mask of its own (``is_causal``) to this call: it does
    with no mask, more than one query and a causal module (or ``is_causal=True`` passed)."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return attention_mask is None and query.shape[-2] > 1 and bool(is_causal)


def _check_joint(module: nn.Module, implementation: str) -> None:
    if implementation not in JOINT_IMPLEMENTATIONS:
        raise ZinitValueError(
            f"gate='none' joins the prompt keys to the token keys inside the attention kernel, which zinit does for "
            f"the {' and '.join(map(repr, JOINT_IMPLEMENTATIONS))} implementations; {type(module).__qualname__} "
            f"uses {implementation!r}: load the model with attn_implementation='sdpa' (or call "
            "model.set_attn_implementation('sdpa')), or use gate='head' or 'layer', which every implementation runs")


#: ``{implementation: its wrapper's name}``, for the wrappers registered: every adapted attention call looks its
#: implementation up (through :class:`AdaptedConfig`), so after the first one this is one dict read.
_NAMES: dict[str, str] = {}


def attention_name(original: str) -> str:
    """Register (once) and return the zinit wrapper's name for the attention implementation ``original``."""
    name = _NAMES.get(original)
    if name is not None:
        return name
    if original.startswith(PREFIX):
        raise ZinitStateError(f"attention implementation {original!r} is already zinit's: eject the model first")
    name = PREFIX + original
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if name not in ALL_ATTENTION_FUNCTIONS:  # the public mapping: registered functions of every file
        AttentionInterface.register(name, _make_wrapper(original))
    _NAMES[original] = name
    return name


def _scope_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Forward pre-hook of an adapted module: hand its KV cache (if any) to the wrapper as the prompt K/V scope.

    The module's forward passes its ``**kwargs`` on to the attention implementation (checked by :func:`install`)."""
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is not None:
        kwargs[SCOPE_KWARG] = cache
    return args, kwargs


def _passes_kwargs(module: nn.Module) -> bool:
    try:
        params = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def install(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Route the attention of ``modules`` (``model``'s adapted layers) through zinit's wrapper.

    Each module dispatches by its own ``config._attn_implementation`` (the model's config, or the sub-config of its
    tower in a composite model); that config gets the :class:`AdaptedConfig` view. A ``gate="none"`` adapter on a
    module whose implementation cannot compute it (see :data:`JOINT_IMPLEMENTATIONS`) is refused here."""
    for m in modules:
        config = base_config(getattr(m, "config", None))
        if not hasattr(config, "_attn_implementation"):
            raise ZinitStateError(
                f"{type(m).__qualname__} has no config with an _attn_implementation; zinit's attention hook cannot "
                "reach it"
            )
        attention_name(config._attn_implementation or "eager")  # fail here, not in the first forward
        adapter = m._modules.get(ADAPTER_ATTR)
        if adapter is not None and adapter.gate is None:
            _check_joint(m, config._attn_implementation or "eager")
    for m in modules:
        m.config = AdaptedConfig(base_config(m.config))
        if _passes_kwargs(m):  # otherwise no scope: the prompt is projected on every call, decoding steps too
            m.register_forward_pre_hook(_scope_hook, with_kwargs=True)


def uninstall(model: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Give ``modules`` back the model's config and remove the scope hook: exactly as before :func:`install`."""
    for m in modules:
        m.config = base_config(m.config)
        remove_hook(m, _scope_hook, pre=True)
