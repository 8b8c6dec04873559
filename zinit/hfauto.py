"""The generic Hugging Face backbone: any transformers model whose attention dispatches through ``AttentionInterface``.

What differs between families is how a hidden state becomes keys and values before position encoding: separate or
fused projections (``k_proj``/``v_proj``, GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, Phi-3's
``qkv_proj``), biases, a norm on each head's key (Qwen3, Gemma 3) or on the whole projected key (OLMo 2). Rather than
re-implementing each path (and risking silently wrong keys when one is missed), zinit runs the prompt through **the
layer's own attention forward**, with the model's own position embeddings at position 0 (RoPE at position 0 rotates
nothing; a RoPE variant that also scales attention, such as YaRN, keeps its scale), and takes the keys and values
that forward hands to the attention kernel. The prompt keys are then, by construction, the keys a token would have
at the one position where position encoding changes nothing but the model's attention temperature. The layer's query is the one its own forward computed (already rotated, already
normalised, pre-scaled where the family pre-scales it), as for every zinit backbone.

How it works: a shallow copy of the attention module (same weights, same submodules) whose ``config`` reads
``_attn_implementation = "zinit_capture"``, a registered attention function that records ``(query, key, value)``
and returns zeros. The module itself is never changed, so concurrent forwards are unaffected.

Position 0 is computed per layer: a model whose layers differ in their rotary (``config.layer_types``, e.g. OLMo 3's
YaRN on its full-attention layers only, Gemma 3's local and global RoPE) gives each layer the (cos, sin) at position
0 of its own layer type, exactly as its own forward hands that layer its position embeddings.

Layout discovery (:func:`analyse`, once per model): the layer stack is the ``nn.ModuleList`` whose every element
holds exactly one self-attention module that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (cross-attention
modules are left alone); every layer is captured on three random two-row prompts, (a, b), (c, b) and (a, d), which
gives the head counts and head size (and proves that routing by ``config._attn_implementation`` reaches the module).
Row b's keys and values must not change with the row before it, nor row a's with the row after it: a layer that mixes
the rows of a sequence before its attention (a causal convolution over the sequence, a token shift: ZAYA) gives a
row a key that depends on the rows around it, so a prompt row has no key of its own, and the model is refused. A
model that does not fit is refused with :class:`Unsupported`, whose message names what is missing; zinit never
adapts a layer approximately.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .errors import ZinitValueError
from . import hf
from .hf import base_config
from .registry import Backbone, Dims

CAPTURE = "zinit_capture"
#: Where the capture function records (query, key, value, kwargs): set around one forward of the shallow copy, in
#: this thread and context only (a forward that does not pass its ``**kwargs`` on is captured as well).
_RECORDS: contextvars.ContextVar[list | None] = contextvars.ContextVar("zinit_capture_records", default=None)
#: Names of a forward's KV-cache argument across families.
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class Unsupported(ZinitValueError):
    """zinit cannot adapt this model exactly; the message names what is missing."""


def _capture(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
             **kwargs: Any) -> tuple[Tensor, None]:
    records = _RECORDS.get()
    if records is None:
        raise RuntimeError("zinit_capture is zinit's internal attention function; it is never a model's own")
    records.append((query, key, value, kwargs))
    batch, heads, length = query.shape[:3]
    return query.new_zeros(batch, length, heads, value.shape[-1]), None


_registered = threading.Lock()


def _register_capture() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    with _registered:
        if CAPTURE not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(CAPTURE, _capture)


class _CaptureConfig:
    """A config view whose ``_attn_implementation`` is the capture function; everything else is the real config."""

    _attn_implementation = CAPTURE

    def __init__(self, base: Any) -> None:
        self.__dict__["_zinit_base"] = base

    def __getattr__(self, name: str) -> Any:
        if name == "_zinit_base":
            raise AttributeError(name)
        return getattr(self._zinit_base, name)


@functools.cache
def _dispatches(cls: type) -> bool:
    """Whether ``cls.forward`` calls an attention function looked up in transformers' AttentionInterface."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "get_interface(" in source


@functools.cache
def _forward_params(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.forward).parameters)


def _is_cross(name: str, module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "cross" in name.lower() or "encoder_attn" in name


def _self_attention(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a layer that dispatch by their config's ``_attn_implementation``."""
    return [(name, m) for name, m in layer.named_modules()
            if name and _dispatches(type(m)) and not _is_cross(name, m)
            and hasattr(base_config(getattr(m, "config", None)), "_attn_implementation")]


@dataclass(frozen=True)
class Layout:
    """Where a model's adapted modules are and how to call them: found once per model by :func:`analyse`."""

    layers: str  #: path of the layer stack (``model.model.layers`` → ``"model.layers"``)
    attention: str  #: path of the self-attention module inside a layer (``"self_attn"``)
    #: the lowest layer's (cos, sin) at position 0, ``[rotary dim]``; None: no RoPE (each layer's: ``positions0``)
    position0: tuple[Tensor, Tensor] | None
    dims: Dims
    attention_class: str
    attention_layers: tuple[int, ...] = ()  #: positions in the stack of the layers with attention (all but hybrids')
    #: each attention layer's own (cos, sin) at position 0 (its layer type's rotary), bottom to top
    positions0: tuple[tuple[Tensor, Tensor] | None, ...] = ()


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, Layout]" = weakref.WeakKeyDictionary()


def _text_config(model: nn.Module) -> Any:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Layer stacks: module lists whose layers hold one self-attention module each, or none (a hybrid model's
    linear-attention or state-space layers), and at least one does."""
    found = []
    for name, m in model.named_modules():
        counts = [len(_self_attention(layer)) for layer in m] if isinstance(m, nn.ModuleList) else []
        if counts and max(counts) == 1:
            if not any(name.startswith(other + ".") for other, _ in found):  # not a stack inside a found one
                found.append((name, m))
    return found


def _layer_type(model: nn.Module, layer: nn.Module, position: int) -> str | None:
    """The layer type whose position embeddings the model hands the layer at ``position`` of its stack: the layer's
    own ``attention_type`` where it has one (Gemma 3, ModernBERT), else ``config.layer_types[position]`` (OLMo 3,
    ...), else None (one rotary for every layer)."""
    own = getattr(layer, "attention_type", None)
    if isinstance(own, str):
        return own
    types = getattr(_text_config(model), "layer_types", None)
    if isinstance(types, (list, tuple)) and position < len(types):
        return types[position]
    return None


def _position0(model: nn.Module, attention: nn.Module, width: int, layer_type: str | None = None
               ) -> tuple[Tensor, Tensor] | None:
    """The model's own rotary (cos, sin) at position 0 for layers of ``layer_type``, ``[rotary dim]`` each, or None
    when ``attention``'s forward takes no position embeddings. A rotary that scales attention (YaRN) scales cos."""
    if "position_embeddings" not in _forward_params(type(attention)):
        return None
    rotaries = [m for name, m in model.named_modules() if name.split(".")[-1] in ("rotary_emb", "rotary_embedding")]
    if not rotaries:
        raise Unsupported(f"{type(attention).__qualname__} takes position_embeddings, but the model has no rotary_emb "
                          "module to compute them at position 0")
    rotary = rotaries[0]
    param = next(attention.parameters())
    dummy = torch.zeros(1, 1, width, dtype=torch.float32, device=param.device)
    kwargs: dict[str, Any] = {}
    params = _forward_params(type(rotary))
    if "layer_type" in params:
        types = getattr(rotary, "rope_type", None)
        if isinstance(types, dict) and layer_type not in types:  # a layer type with no RoPE (Ergo's full layers):
            return None  # the model hands these layers no position embeddings
        kwargs["layer_type"] = layer_type
    try:
        with torch.no_grad():
            cos, sin = rotary(dummy, torch.zeros(1, 1, dtype=torch.long, device=param.device), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure is a reason to refuse, named
        kind = f" for layer type {layer_type!r}" if "layer_type" in kwargs else ""
        raise Unsupported(f"cannot compute the position embeddings at position 0{kind} with "
                          f"{type(rotary).__qualname__}: {type(exc).__name__}: {exc}") from None
    if not isinstance(cos, Tensor) or not isinstance(sin, Tensor) or cos.shape != sin.shape:
        raise Unsupported(f"{type(rotary).__qualname__} does not return (cos, sin) tensors of one shape")
    if sin.abs().max() != 0:
        raise Unsupported(f"{type(rotary).__qualname__} rotates position 0 (sin ≠ 0): zinit cannot place the prompt "
                          "at no position")
    return cos.reshape(-1, cos.shape[-1])[0].float().cpu(), sin.reshape(-1, sin.shape[-1])[0].float().cpu()


#: How far a prompt row's key/value may move when the other row of its two-row sequence changes, relative to its
#: size: the captures compared have one shape and one row order, so a layer that keeps rows apart gives equal bits.
_MIXING_TOLERANCE = 1e-6


def _row_mixing(module: nn.Module, width: int, position0: tuple[Tensor, Tensor] | None
                ) -> tuple[tuple[Tensor, Tensor, Tensor, dict], str | None]:
    """Capture three two-row sequences of random rows, (a, b), (c, b) and (a, d); return the first capture and, if
    a row's key or value changes with the row beside it (b's with its predecessor, a's with its successor: the layer
    mixes a sequence's rows before its attention), the reason to refuse, else None.

    Exact: the three captures have one shape, every row sits at position 0 and in the same place, so a layer that
    keeps rows apart computes row b (and row a) with the very same operations twice. The rows are random (a fixed
    generator of their own; the global RNG is untouched) so that every path of the key projection carries signal."""
    floats = [p for p in module.parameters() if p.is_floating_point()]  # none in a 4-bit layer (uint8 weights)
    param = floats[0] if floats else next(module.parameters())
    dtype = param.dtype if floats else torch.float32
    g = torch.Generator().manual_seed(0)
    a, b, c, d = torch.randn(4, 1, 1, width, generator=g).to(device=param.device, dtype=dtype)
    first = capture(module, torch.cat([a, b], dim=1), position0)
    before = capture(module, torch.cat([c, b], dim=1), position0)  # b after another row
    after = capture(module, torch.cat([a, d], dim=1), position0)  # a before another row
    for name, index in (("key", 1), ("value", 2)):
        for row, other, moved in ((1, before, "the row before it"), (0, after, "the row after it")):
            mine, theirs = first[index][0, :, row].float(), other[index][0, :, row].float()
            gap = (mine - theirs).abs().max().item()
            if gap > _MIXING_TOLERANCE * mine.abs().max().item():
                return first, (
                    f"{type(module).__qualname__} mixes the rows of a sequence before its attention: the {name} of "
                    f"a prompt row changes by {gap:.2g} (its size: {mine.abs().max().item():.2g}) when {moved} "
                    "changes, as with a convolution or token shift over the sequence. A prompt row then has no "
                    f"{name} of its own, and zinit's prompt keys and values are each one row's, at no position")
    return first, None


def capture(attention: nn.Module, hidden: Tensor, position0: tuple[Tensor, Tensor] | None
            ) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Run ``attention``'s own forward on ``hidden`` ``[B, T, C]`` with every row at position 0 (``position0``: the
    model's (cos, sin) there) and return the ``(query, key, value, kwargs)`` it hands to the attention kernel
    (``[B, H(kv), T, d]`` each)."""
    _register_capture()
    clone = copy.copy(attention)  # same parameters and submodules; its own config attribute
    clone.config = _CaptureConfig(base_config(attention.config))
    params = _forward_params(type(attention))
    records: list = []
    kwargs: dict[str, Any] = {"hidden_states": hidden}
    if "attention_mask" in params:
        kwargs["attention_mask"] = None
    for name in _CACHE_ARGS:
        if name in params:
            kwargs[name] = None
    if "position_ids" in params:  # position 0: RoPE applied inside the module rotates nothing there
        kwargs["position_ids"] = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if position0 is not None:
        shape = (hidden.shape[0], hidden.shape[1], position0[0].shape[-1])
        kwargs["position_embeddings"] = tuple(t.to(hidden.device, hidden.dtype).expand(shape) for t in position0)
    elif "position_embeddings" in params:  # a layer the model gives no position embeddings (a NoPE layer type)
        kwargs["position_embeddings"] = None
    token = _RECORDS.set(records)
    try:
        type(attention).forward(clone, **kwargs)  # not the module's __call__: no hooks of the real module run
    finally:
        _RECORDS.reset(token)
    if len(records) != 1:
        raise Unsupported(f"{type(attention).__qualname__}'s forward called the attention function {len(records)} "
                          "times (expected once): zinit cannot tell which keys are the layer's")
    return records[0]


def _legacy_stacks(model: nn.Module, chosen: str) -> list[str]:
    """Other layer stacks of the model whose layers hold attention modules that do not dispatch (a composite model
    with a tower zinit cannot reach, e.g. GIT's text decoder beside its vision encoder)."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or not len(m) or name == chosen or name.startswith(chosen + "."):
            continue
        if chosen.startswith(name + "."):
            continue
        legacy = {type(x).__qualname__ for layer in m for x in layer.modules()
                  if type(x).__name__.endswith("Attention") and not _dispatches(type(x))}
        if legacy and not any(_self_attention(layer) for layer in m):
            out.append(f"{name}: {', '.join(sorted(legacy))}")
    return out


def _find_stack(model: nn.Module, cls: str, layers: str | None) -> tuple[str, nn.ModuleList]:
    """The layer stack (its path and modules): the one at the declared path ``layers``, else the one found."""
    layers_declared = layers
    if layers is not None:
        try:
            stack = model.get_submodule(layers)
        except AttributeError:
            raise Unsupported(f"zinit cannot adapt {cls}: it has no layer stack at the declared path {layers!r}") from None
        stacks = [(layers, stack)]
    else:
        stacks = _stacks(model)
    if not stacks:
        attention_like = sorted({type(m).__qualname__ for m in model.modules() if "Attention" in type(m).__name__})
        raise Unsupported(
            f"zinit cannot adapt {cls}: no layer stack whose layers each hold one self-attention module that "
            "dispatches through transformers' AttentionInterface (attention classes here: "
            f"{', '.join(attention_like) or 'none'}); zinit's prompt term joins the attention there")
    if len(stacks) > 1:
        raise Unsupported(
            f"zinit cannot adapt {cls} as one model: it has {len(stacks)} layer stacks "
            f"({', '.join(name for name, _ in stacks)}); inject into the tower you want (e.g. model.{stacks[0][0]} "
            "belongs to one submodule: pass that submodule)")
    path, found = stacks[0]
    if layers_declared is None:
        others = _legacy_stacks(model, path)
        if others:
            raise Unsupported(
                f"zinit cannot adapt {cls} as one model: besides {path}, it has layers whose attention does not "
                f"dispatch through transformers' AttentionInterface ({', '.join(others)}); inject into a tower whose "
                "attention all goes through it")
    return path, found


def _find_attention(cls: str, path: str, layers: nn.ModuleList, attention: str | None
                    ) -> tuple[list[tuple[str, nn.Module]], tuple[int, ...]]:
    """Each attention layer's (name, self-attention module), and the positions of those layers in the stack: the
    module at the declared path ``attention`` in every layer, else each layer's one self-attention module (a hybrid
    model's layers without attention carry no adapter)."""
    if attention is not None:
        try:
            modules = [(attention, layer.get_submodule(attention)) for layer in layers]
        except AttributeError:
            raise Unsupported(f"zinit cannot adapt {cls}: a layer of {path} has no module at {attention!r}") from None
        if not _dispatches(type(modules[0][1])):
            raise Unsupported(f"zinit cannot adapt {cls}: {type(modules[0][1]).__qualname__} at {attention!r} does not "
                              "dispatch through transformers' AttentionInterface")
        return modules, tuple(range(len(layers)))
    # layer n is the n-th attention layer
    found = [(i, _self_attention(layer)) for i, layer in enumerate(layers)]
    positions = tuple(i for i, f in found if f)
    modules = [f[0] for _, f in found if f]
    return modules, positions


def _positions0(model: nn.Module, layers: nn.ModuleList, modules: list[tuple[str, nn.Module]],
                stack_positions: tuple[int, ...], width: int) -> list[tuple[Tensor, Tensor] | None]:
    """Each attention layer's (cos, sin) at position 0: its own layer type's rotary, computed once per type."""
    by_type: dict[str | None, tuple[Tensor, Tensor] | None] = {}
    positions0 = []
    for i, (_, module) in zip(stack_positions, modules):  # each layer its own layer type's rotary at position 0
        layer_type = _layer_type(model, layers[i], i)
        if layer_type not in by_type:
            by_type[layer_type] = _position0(model, module, width, layer_type)
        positions0.append(by_type[layer_type])
    return positions0


def _head_shapes(cls: str, modules: list[tuple[str, nn.Module]], positions0: list[tuple[Tensor, Tensor] | None],
                 width: int) -> tuple[int, int, int, int, int, int]:
    """Capture every layer (refusing one that mixes rows) and return the one (query heads, key heads, key size,
    value heads, value size, query size) they all share."""
    shapes = set()
    for (_, module), position0 in zip(modules, positions0):
        try:
            with torch.no_grad():
                (query, key, value, _), mixing = _row_mixing(module, width, position0)
        except Unsupported:
            raise
        except Exception as exc:  # noqa: BLE001 - named in the refusal
            raise Unsupported(f"zinit cannot adapt {cls}: a forward of {type(module).__qualname__} on a prompt "
                              f"of width {width} failed ({type(exc).__name__}: {exc})") from None
        if mixing is not None:
            raise Unsupported(f"zinit cannot adapt {cls}: {mixing}")
        shapes.add((query.shape[1], key.shape[1], key.shape[-1], value.shape[1], value.shape[-1], query.shape[-1]))
    if len(shapes) != 1:
        raise Unsupported(f"zinit cannot adapt {cls}: its layers differ in head counts or sizes {sorted(shapes)}")
    return shapes.pop()


def _dims(cls: str, width: int, shape: tuple[int, int, int, int, int, int], num_layers: int) -> Dims:
    """The model's :class:`Dims` from the layers' shared head shape; refused when zinit's prompt cannot fit it."""
    heads, kv_heads, key_dim, value_heads, value_dim, query_dim = shape
    if value_heads != kv_heads or value_dim != key_dim or query_dim != key_dim:
        raise Unsupported(f"zinit cannot adapt {cls}: queries, keys and values differ in shape (query head size "
                          f"{query_dim}, key {kv_heads}×{key_dim}, value {value_heads}×{value_dim}); zinit's prompt "
                          "values need the keys' head layout")
    if heads % kv_heads:
        raise Unsupported(f"zinit cannot adapt {cls}: {heads} query heads are not a multiple of {kv_heads} key heads")
    return Dims(hidden_size=width, num_heads=heads, num_kv_heads=kv_heads, head_dim=key_dim, num_layers=num_layers)


def analyse(model: nn.Module, layers: str | None = None, attention: str | None = None) -> Layout:
    """Find (once per model) the layer stack, each layer's self-attention module and the sizes; raises
    :class:`Unsupported` naming the reason when zinit cannot adapt the model exactly.

    ``layers`` / ``attention``: declared paths (the stack in the model, the attention module in a layer) instead of
    the ones introspection finds (see :func:`family`)."""
    layout = _LAYOUTS.get(model)
    if layout is not None:
        return layout
    cls = type(model).__qualname__
    path, stack = _find_stack(model, cls, layers)
    width = getattr(_text_config(model), "hidden_size", None)
    modules, stack_positions = _find_attention(cls, path, stack, attention)
    names = {name for name, _ in modules}
    if len(names) != 1:
        raise Unsupported(f"zinit cannot adapt {cls}: its layers keep their attention under different names "
                          f"({', '.join(sorted(names))})")
    first = modules[0][1]
    if not isinstance(width, int):
        raise Unsupported(f"zinit cannot adapt {cls}: its config has no integer hidden_size")
    positions0 = _positions0(model, stack, modules, stack_positions, width)
    dims = _dims(cls, width, _head_shapes(cls, modules, positions0, width), len(modules))
    layout = Layout(path, next(iter(names)), positions0[0], dims, type(first).__qualname__, stack_positions,
                    tuple(positions0))
    _LAYOUTS[model] = layout
    return layout


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's self-attention module, bottom to top."""
    layout = analyse(model)
    stack = model.get_submodule(layout.layers)
    return [stack[i].get_submodule(layout.attention) for i in layout.attention_layers]


def attention_modules_of(analysed: Any) -> Any:
    def modules(model: nn.Module) -> list[nn.Module]:
        layout = analysed(model)
        stack = model.get_submodule(layout.layers)
        return [stack[i].get_submodule(layout.attention) for i in layout.attention_layers]

    return modules


def dims(model: nn.Module) -> Dims:
    """The sizes zinit needs, from one capture per layer (:func:`analyse`)."""
    return analyse(model).dims


def family(name: str, model_types: Sequence[str], *, layers: str | None = None, attention: str | None = None,
           description: str = "") -> Backbone:
    """A backbone for the Hugging Face families ``model_types`` (``config.model_type``) in a few declarative
    lines: where the layer stack and each layer's attention module are (or None: found by introspection), the rest
    (sizes, the prompt's key path, the hook) as the generic ``hf`` backbone does it. Register it with
    :func:`zinit.register_backbone`; it wins over the generic backbone for those model types.

    >>> import zinit
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> spec = zinit.register_backbone(family("gpt2-declared", ["gpt2"], layers="transformer.h", attention="attn"))
    >>> model = zinit.inject(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)), 1, K=4)
    >>> zinit.injection(model).backbone.name, zinit.injection(model).dims.num_heads
    ('gpt2-declared', 4)
    >>> _ = zinit.registry.unregister_backbone("gpt2-declared")  # back to the generic backbone for GPT-2
    """
    types = tuple(model_types)

    def analysed(model: nn.Module) -> Layout:
        return analyse(model, layers, attention)

    def install_(model: nn.Module, modules: Sequence[nn.Module]) -> None:
        analysed(model)
        install(model, list(modules))

    return Backbone(
        name=name,
        matches=lambda model: getattr(getattr(model, "config", None), "model_type", None) in types,
        attention_modules=attention_modules_of(analysed),
        dims=lambda model: analysed(model).dims,
        project=project, install=install_, uninstall=uninstall,
        description=description or f"Hugging Face {', '.join(types)} (declared paths, the generic key path)",
        joint_softmax=True,  # gate='none': zinit.hf joins the prompt keys (sdpa, eager)
    )


def project(attention: nn.Module, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt ``[..., K, C]`` → keys, values ``[..., Hkv, K, d]`` through the layer's own forward at position 0."""
    lead = prompt.shape[:-2]
    hidden = prompt.reshape(-1, *prompt.shape[-2:])
    _, key, value, _ = capture(attention, hidden, attention.__dict__.get("_zinit_position0"))
    return key.reshape(*lead, *key.shape[1:]), value.reshape(*lead, *value.shape[1:])


def install(model: nn.Module, modules: list[nn.Module]) -> None:
    """:func:`zinit.hf.install`, after recording on each module its own layer's position embeddings at position 0."""
    layout = analyse(model)
    stack = model.get_submodule(layout.layers)
    own = {id(stack[i].get_submodule(layout.attention)): p0
           for i, p0 in zip(layout.attention_layers, layout.positions0)}
    for m in modules:
        if id(m) not in own:
            raise ValueError(f"{type(m).__qualname__} is not one of the attention modules zinit found in "
                             f"{type(model).__qualname__} ({layout.layers}.*.{layout.attention}); pass those")
        m.__dict__["_zinit_position0"] = own[id(m)]
    hf.install(model, modules)


def uninstall(model: nn.Module, modules: list[nn.Module]) -> None:
    """:func:`zinit.hf.uninstall`, then forget each module's recorded position embeddings."""
    hf.uninstall(model, modules)
    for m in modules:
        m.__dict__.pop("_zinit_position0", None)
