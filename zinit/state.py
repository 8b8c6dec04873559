"""The adapter state of a model: one record, whatever adapters the model carries.

A model zinit has touched carries one :class:`AdapterState` (``model._zinit``). It holds the backbone, the model's
sizes (``dims``, beside the configurations, which hold none), every base parameter's ``requires_grad`` from before
the first adapter froze it, and the resolved configuration of each adapter by name, in the order they were added:

- :func:`zinit.inject` / :func:`zinit.load_adapter` add one adapter under :data:`DEFAULT_ADAPTER` and make it the
  *active* one: every row of every forward uses it. Only an adapter alone on its model may use the options that change
  what the whole model computes (image features, a trained task head, ``gate="none"``, V2's bias/scale and trained
  norms); its layers sit in each attention module's ``zinit_adapter`` slot, so its parameter names are those every
  earlier zinit and peft file use.
- :func:`zinit.add_adapter` adds named adapters (``zinit_bank`` slot of each adapted attention), chosen per row by
  :func:`zinit.use_adapters`; outside such a block they compute nothing (the base model).

Every adapter is added through :func:`freeze` (the first one records the flags and freezes the model) and removed
through :func:`release` (the last one gives the flags back and takes the record away), and the canonical keys of an
adapter's tensors (``layers.{n}.prompt`` / ``layers.{n}.gate``) are written by :func:`canonical_state` alone.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .config import DIM_FIELDS, AdapterConfig
from .errors import ZinitKeyError, ZinitValueError
from .prompts import ADAPTER_ATTR, LayerAdapter, VisualInput
from .registry import Backbone, Dims

#: Attribute of a model that holds its :class:`AdapterState`.
STATE_ATTR = "_zinit"
#: The name of the adapter :func:`zinit.inject` adds (the one adapter of the model, used by every row).
DEFAULT_ADAPTER = "default"


class Routing:
    """Which adapter each row uses while a :func:`zinit.use_adapters` block runs: a ContextVar, so threads and asyncio
    tasks running forwards of the same model each see their own choice. Copies and pickles get a fresh one."""

    def __init__(self) -> None:
        self.var: ContextVar[Route | None] = ContextVar(f"zinit_route_{id(self)}", default=None)

    def __reduce__(self) -> tuple:
        return (Routing, ())

    def __deepcopy__(self, memo: dict) -> "Routing":
        return Routing()

    def current(self) -> "Route | None":
        """The choice of the innermost active block, or None."""
        return self.var.get()


@dataclass(frozen=True)
class Route:
    """The choice of one :func:`zinit.use_adapters` block: one name (or None) per row, or one for every row."""

    names: tuple[str | None, ...] | None  #: per row (None: ``every`` for all rows)
    every: str | None = None

    def rows(self, batch: int) -> tuple[str | None, ...]:
        """The name of each of ``batch`` rows (``generate()`` with beams repeats each row's choice)."""
        if self.names is None:
            return (self.every,) * batch
        if batch == len(self.names):
            return self.names
        if batch % len(self.names):
            raise ZinitValueError(f"use_adapters names {len(self.names)} rows, but the forward has a batch of {batch}; "
                                  "give one name (or None) per row")
        repeat = batch // len(self.names)
        return tuple(name for name in self.names for _ in range(repeat))


@dataclass
class AdapterState:
    """Every adapter of a model and what adding them changed; kept on the model as ``model._zinit``.

    ``config`` and the config's fields (``.layers``, ``.K`` ...) read through to the active adapter's resolved
    configuration (the one :func:`zinit.inject` added), as the record of earlier versions did; the model's sizes are
    ``dims``, beside every configuration.
    """

    backbone: Backbone
    dims: Dims
    requires_grad: dict[str, bool]  #: each base parameter's flag before the first adapter froze it
    routing: Routing = field(default_factory=Routing)
    #: each adapter's resolved configuration (:meth:`AdapterConfig.bind`), by name, in the order they were added
    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: str | None = None  #: the adapter every row uses (inject's); None: rows choose with use_adapters
    installed: set[int] = field(default_factory=set)  #: layers whose attention the backbone's hook routes
    # What only an adapter alone on its model may change (the active one):
    visual: VisualInput | None = None  #: where zinit.visual_features puts the current image tokens
    #: qualified names of the linear layers with a learnable bias/scale (``bias_scale``), in model order
    linears: tuple[str, ...] = ()
    #: qualified names of the normalisation layers trained in place (``train_norms``), in model order
    norms: tuple[str, ...] = ()
    #: the values those norms' parameters had before inject, put back by eject (``{name.param: tensor}``)
    norm_originals: dict[str, Tensor] | None = None

    @property
    def config(self) -> AdapterConfig:
        """The active adapter's configuration (what its ``zinit.json`` stores)."""
        if self.active is None:
            raise ZinitValueError("this model has no zinit adapter: call zinit.inject(model, layers, K) first")
        return self.configs[self.active]

    def active_layers(self, model: nn.Module) -> dict[int, LayerAdapter | None]:
        """``{layer index: LayerAdapter}`` of the active adapter on ``model`` (the one this state belongs to), bottom
        to top; None for a layer whose adapter is set aside (peft's ``disable_adapter()``)."""
        modules = self.backbone.attention_modules(model)
        return {n: modules[n]._modules.get(ADAPTER_ATTR) for n in self.config.layers}

    @property
    def named(self) -> list[str]:
        """The names of the adapters rows choose per forward (every adapter but the active one), in order."""
        return [name for name in self.configs if name != self.active]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; a record pickled by zinit before the one adapter state (an ``Injection``: one ``config``, no
        ``configs``) becomes the state of that one active adapter, and configurations pickled when they still held
        the model's sizes (:func:`split_sizes`) give them to ``dims``."""
        if "configs" not in state and "config" in state:
            config = state.pop("config")
            state.update(routing=Routing(), configs={DEFAULT_ADAPTER: config}, active=DEFAULT_ADAPTER,
                         installed=set(config.layers))
        for name, config in list(state.get("configs", {}).items()):
            state["configs"][name], dims = split_sizes(config)
            if dims is not None:
                state.setdefault("dims", dims)
        self.__dict__.update(state)

    def __getattr__(self, name: str) -> Any:  # only for names this record does not hold itself
        configs, active = self.__dict__.get("configs"), self.__dict__.get("active")
        config = configs.get(active) if configs is not None and active is not None else None
        if config is None or name.startswith("_") or not hasattr(config, name):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(config, name)


def split_sizes(config: AdapterConfig) -> tuple[AdapterConfig, Dims | None]:
    """A configuration unpickled from zinit before the model's sizes left :class:`AdapterConfig` (they come back as
    stray attributes) as the configuration alone and those sizes (None for a configuration of this zinit)."""
    stray = {key: config.__dict__.pop(key) for key in DIM_FIELDS if key in config.__dict__}
    return config, (Dims(**stray) if len(stray) == len(DIM_FIELDS) else None)


def adapter_state(model: nn.Module) -> AdapterState | None:
    """The model's :class:`AdapterState`, or None when it carries no adapter."""
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, AdapterState) else None


def freeze(model: nn.Module, spec: Backbone) -> tuple[AdapterState, bool]:
    """The model's state (made now, with every parameter's ``requires_grad`` recorded and then frozen, when the model
    carries no adapter yet) and whether it was made now. The one place a model gets frozen; :func:`release` (or
    :func:`abandon` after a failed add) undoes it."""
    state = adapter_state(model)
    if state is not None:
        if spec.name != state.backbone.name:
            raise ZinitValueError(f"this model's adapters use backbone {state.backbone.name!r}, not {spec.name!r}: "
                                  "add adapters of one backbone to a model")
        return state, False
    state = AdapterState(spec, spec.dims(model), {n: p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    return state, True


def attach(model: nn.Module, state: AdapterState, name: str, config: AdapterConfig) -> None:
    """Record an adapter that was added (the last step of an add, after everything else succeeded)."""
    state.configs[name] = config
    setattr(model, STATE_ATTR, state)


def restore_flags(model: nn.Module, state: AdapterState) -> None:
    """Give every base parameter its ``requires_grad`` from before the first adapter."""
    for pname, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(pname, p.requires_grad))


def abandon(model: nn.Module, state: AdapterState, created: bool) -> None:
    """Undo :func:`freeze` after an add failed: a state made by that add goes, with the flags it took."""
    if created:
        restore_flags(model, state)


def release(model: nn.Module, state: AdapterState, name: str) -> None:
    """Forget the adapter ``name`` (its modules already removed); after the last one the flags come back and the
    model carries no state."""
    del state.configs[name]
    if state.active == name:
        state.active = None
    if not state.configs:
        restore_flags(model, state)
        delattr(model, STATE_ATTR)


def canonical_state(adapters: Mapping[int, LayerAdapter]) -> dict[str, Tensor]:
    """The canonical keys of the layers' tensors: ``layers.{n}.prompt`` ``[K, C]`` and ``layers.{n}.gate`` ``[H]`` or
    ``[1]`` (none with ``gate="none"``), detached views of the parameters, bottom to top. The one writer of these
    keys: saved files, state dicts and strict loads all go through it."""
    out: dict[str, Tensor] = {}
    for n, adapter in adapters.items():
        out[f"layers.{n}.prompt"] = adapter.prompt.detach()
        if adapter.gate is not None:
            out[f"layers.{n}.gate"] = adapter.gate.detach()
    return out


def copy_adapter_state(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], layers: Sequence[int]) -> None:
    """Copy ``state`` into the tensors ``expected`` (canonical keys -> views of the adapter's parameters), strictly:
    the same keys, floating-point tensors, the same shapes; nothing is copied unless everything fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ZinitKeyError(
            f"adapter state does not fit this model: {'; '.join(parts)}. The model's adapter has layers "
            f"{list(layers)} (keys layers.N.prompt / layers.N.gate)"
        )
    for key, target in expected.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ZinitValueError(f"adapter state key {key!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            dtype = str(value.dtype).replace("torch.", "")
            raise ZinitValueError(f"adapter state key {key!r} has dtype {dtype}; expected a floating-point tensor "
                                  "(zinit stores float32)")
        if tuple(value.shape) != tuple(target.shape):
            raise ZinitValueError(f"adapter state key {key!r} has shape {tuple(value.shape)}, but this model expects "
                                  f"{tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
