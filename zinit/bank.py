"""Many named adapters on one frozen model, chosen per row of a batch.

One frozen base model carries any number of small adapters (the paper's "experts" plugged in per use), each with its
own K, layers and gate options, all for the same base. :func:`use_adapters` chooses, for every forward or
``generate()`` inside it, which adapter each row of the batch uses (or none: the base model), so one batch can mix
requests of different adapters::

    zinit.add_adapter(model, "math", "out/math/adapter")      # a zinit.save_adapter folder
    zinit.add_adapter(model, "poems", "out/poems/adapter")
    with zinit.use_adapters(model, ["math", "poems", None]):   # row 2: the base model
        out = model.generate(**batch)

How a mixed batch is computed (exact, and about as fast as a batch of one adapter): the token attention is the
model's own and shared by every row; at each adapted layer the prompt keys and values of the adapters the batch uses
are projected once, padded to the longest K, and gathered per row (``[B, H, K, d]``), so the prompt term is one small
attention for the whole batch (a decoding step: one SDPA call, kept ready on the KV cache). Padded prompt positions
are masked out of the softmax; a row whose adapter does not adapt this layer (or that uses none) gets a zero term,
exactly. Each row's output is therefore what that adapter loaded alone computes, and a row with no adapter is the
base model's.

An adapter costs its own parameters only (its prompts and gates). Adding or removing one never touches the others.
Adapters are added and removed between forwards, not during one (the server does that on its scheduling thread).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import quant
from .attention import DecodingStep, prompt_attention
from .config import AdapterConfig, layer_shapes
from .errors import ZinitKeyError, ZinitValueError
from .prompts import BANK_ATTR, STORE_ATTR, LayerAdapter, PromptStore
from .registry import Backbone, Dims, get_backbone
from .state import (AdapterState, Route, Routing, abandon, adapter_state, attach, canonical_state,
                    copy_adapter_state, freeze, release)


class BankLayer(nn.Module):
    """The named adapters of one attention module (``adapters[name]`` is a :class:`~zinit.LayerAdapter`)."""

    def __init__(self, routing: Routing) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._routing = routing

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"

    def attend(self, query: Tensor, attention: nn.Module, scaling: float, scope: object | None = None,
               softcap: float | None = None) -> Tensor | None:
        """The prompt term ``[B, H, T, d]`` of each row's adapter at this layer, or None when no row uses one."""
        route = self._routing.current()
        if route is None or (route.names is None and route.every is None):  # no block, or the base model for all
            return None
        rows = route.rows(query.shape[0])
        decoding = scope is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        store = PromptStore.on(scope) if decoding else None
        # what a kept step depends on: each row's adapter, dtype, device and this layer's adapters (one removed,
        # replaced or added since the step was kept must never be served from it); only a decoding loop keeps one
        stamp = (rows, query.dtype, query.device, tuple(self.adapters._modules.values())) if store is not None else ()
        if store is not None and softcap is None and query.shape[-2] == 1:  # a step of a loop that kept its prompts
            entry = store.get(self)  # one read: another thread's write can never be half-seen
            if entry is not None and entry[0] == stamp:
                return entry[1](query, scaling)
        used = [name for name in dict.fromkeys(rows) if name is not None and name in self.adapters]
        if not used:
            return None
        if len(used) == 1 and all(name == used[0] for name in rows):  # one adapter for the whole batch
            adapter = self.adapters[used[0]]
            out = adapter.attend(query, attention, scaling, scope=scope, softcap=softcap)
            kept = store.get(adapter) if store is not None else None  # what this call kept on the cache
            if kept is not None and kept[3] is not None:  # its decoding steps start here, as for a mixed batch
                self._keep(store, stamp, kept[3])
            return out
        key, value, mask = self._mixed(rows, used, attention, query, scope)
        if store is not None:  # kept for the decoding steps of this loop (the same rows and adapters)
            self._keep(store, stamp, DecodingStep(key, value, mask=mask))
        return prompt_attention(query, key, value, scaling, softcap, mask=mask)

    def _keep(self, store: PromptStore, stamp: tuple, step: DecodingStep) -> None:
        """Keep ``step`` on a KV cache's store for this layer's decoding steps, and drop what the store keeps for the
        adapters that left this layer since its last step was kept: a cache reused across requests (a server's
        ``StaticCache`` and ``reset()``) must not hold removed adapters and their prompts alive."""
        old = store.get(self)
        if old is not None:
            for adapter in old[0][3]:
                if adapter not in stamp[3]:
                    store.pop(adapter, None)
        store[self] = (stamp, step)

    def _mixed(self, rows: tuple[str | None, ...], used: list[str], attention: nn.Module, query: Tensor,
               scope: object | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Each row's prompt keys and gated values ``[B, H, Kmax, d]`` (its adapter's, padded to the longest K of the
        batch; zeros for a row with no adapter at this layer) and the mask of real positions ``[B, Kmax]`` (None
        when every K is the same). Each adapter's keys and values are prepared exactly as when it is alone (the gate
        folded into the values for every query head), so each row's term is the one that adapter alone computes:
        bit for bit in bf16 (tested with ``torch.equal`` on CPU), to float32 rounding in float32 (the attention
        kernel's order of summation depends on the layout: one prompt for the batch, or one per row). They are kept
        on the KV cache ``scope`` as the adapter alone keeps them, so the decoding steps of a new choice of rows on
        the same cache gather them again without projecting them again (the rule of
        :meth:`~zinit.LayerAdapter.attend`: every multi-token call projects afresh, one-token calls reuse what the
        cache keeps). A decoding loop keeps the result (as a :class:`~zinit.attention.DecodingStep`) on its KV
        cache, so a decoding step gathers nothing."""
        prepared = [self.adapters[name]._kv(query, attention, scope) for name in used]  # [H, K_a, d] each
        slots = {name: slot for slot, name in enumerate(used)}
        longest = max(k.shape[-2] for k, _ in prepared)
        if all(name in slots for name in rows) and all(k.shape[-2] == longest for k, _ in prepared):
            # the usual case (every row has an adapter here, all of one K): one copy per row, nothing to mask
            chosen = [prepared[slots[name]] for name in rows]
            return torch.stack([k for k, _ in chosen]), torch.stack([v for _, v in chosen]), None
        keys = [nn.functional.pad(k, (0, 0, 0, longest - k.shape[-2])) for k, _ in prepared]
        values = [nn.functional.pad(v, (0, 0, 0, longest - v.shape[-2])) for _, v in prepared]
        keys.append(torch.zeros_like(keys[0]))  # the slot of a row with no adapter here: a zero term, exactly
        values.append(torch.zeros_like(values[0]))
        mask = torch.ones(len(used) + 1, longest, dtype=torch.bool, device=query.device)
        for slot, (k, _) in enumerate(prepared):
            mask[slot, k.shape[-2]:] = False
        index = torch.tensor([slots.get(name, len(used)) for name in rows], device=query.device)
        return torch.stack(keys)[index], torch.stack(values)[index], None if bool(mask.all()) else mask[index]


def named_state(model: nn.Module) -> AdapterState:
    """The :class:`~zinit.state.AdapterState` of a model that has named adapters; a clear error otherwise."""
    state = adapter_state(model)
    if state is None or not state.named:
        raise ZinitValueError("this model has no named adapters: add one with zinit.add_adapter(model, name, folder)")
    return state


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters added to ``model``, in the order they were added (empty when there are none).

    >>> import zinit, timm
    >>> vit = timm.create_model("vit_tiny_patch16_224")
    >>> zinit.adapter_names(zinit.add_adapter(vit, "a", layers=2, K=4))
    ['a']
    """
    state = adapter_state(model)
    return state.named if state is not None else []


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or any(c in name for c in "./\\\0") \
            or name != name.strip():
        raise ZinitValueError(f"adapter name {name!r}: use a non-empty string of at most 128 characters without '.', '/', "
                         "'\\' or surrounding spaces (e.g. 'math-v2')")
    return name


@dataclass
class PreparedAdapter:
    """A named adapter read, checked and built but not attached yet (:func:`prepare_adapter`): its modules hold their
    weights already, so :func:`install_adapter` only attaches them (a quick step a server runs between forwards)."""

    name: str
    spec: Backbone
    config: AdapterConfig  #: resolved against the model (:meth:`~zinit.AdapterConfig.bind`)
    layers: dict[int, LayerAdapter]  #: the adapter of each adapted layer, bottom to top


#: Why an adapter cannot be one of several named adapters, by the option that makes it single-adapter only.
SINGLE_ONLY = {
    "gate": "gate='none' (its prompt keys join each layer's token softmax, which cannot differ per row of a mixed "
            "batch, so named adapters are gated: gate='head' or 'layer')",
    "features": "image features or a task head (visual_dim / train_modules; named adapters are prompts and gates "
                "only)",
    "v2": "LLaMA-Adapter V2's bias/scale or trained norms (bias_scale / train_norms), which change the shared base "
          "model's layers for every row",
}


def single_only(config: AdapterConfig) -> str | None:
    """Why the adapter ``config`` describes can only be alone on its model (:data:`SINGLE_ONLY`), or None."""
    if config.gate == "none":
        return SINGLE_ONLY["gate"]
    if config.visual_dim is not None or config.train_modules:
        return SINGLE_ONLY["features"]
    if config.bias_scale is not None or config.train_norms:
        return SINGLE_ONLY["v2"]
    return None


def new_adapter_config(model: nn.Module, layers: int | Sequence[int], K: int, *, gate: str = "head",
                       gate_fn: str = "tanh", backbone: str | None = None, gate_init: str = "zero") -> AdapterConfig:
    """The configuration of a new zero-init named adapter (its backbone: ``backbone``, else the one the model's
    adapters already use, else detected when it is built), after checking every option."""
    state = adapter_state(model)
    if backbone is None and state is not None:
        backbone = state.backbone.name
    config = AdapterConfig(layers=layers, K=K, gate=gate, gate_fn=gate_fn, gate_init=gate_init, backbone=backbone)
    why = single_only(config)
    if why is not None:
        raise ZinitValueError(f"a named adapter cannot have {why}: inject it alone with zinit.inject")
    return config


def _check_free(model: nn.Module, name: str) -> AdapterState | None:
    """The model's adapter state (None when it has none yet), after checking that ``name`` can be added to it."""
    _check_name(name)
    state = adapter_state(model)
    if state is not None and state.active is not None:
        raise ZinitValueError("this model is injected with one adapter (zinit.inject / load_adapter); named adapters "
                              "go on a model without one: zinit.eject(model) first, or save that adapter and add it "
                              "by name")
    if state is not None and name in state.configs:
        raise ZinitValueError(f"an adapter named {name!r} is already on this model; remove it first "
                              "(zinit.remove_adapter) or pick another name")
    return state


def _check_shapes(config: AdapterConfig, dims: Dims, tensors: Mapping[str, Tensor], source: str) -> None:
    """The tensors of an adapter against the shapes its configuration implies, before anything of those sizes is
    allocated: K and the gate of an adapter file are untrusted until its weights agree with them (a K of 2**40 must
    be an error, not an allocation), even if the file reader's own check (:func:`zinit.io.check_weights`) let them
    through."""
    expected = layer_shapes(config, dims)
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    if missing or unexpected:
        raise ZinitKeyError(f"adapter weights in {source} do not fit its zinit.json (layers {list(config.layers)}, "
                            f"K={config.K}, gate={config.gate!r}): missing keys {missing}, unexpected keys "
                            f"{unexpected}; make the two agree or save the adapter again")
    for key, shape in expected.items():
        value = tensors[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ZinitValueError(f"adapter weights in {source}: {key!r} is not a floating-point tensor; save the "
                                  "adapter again (zinit writes float32)")
        if tuple(value.shape) != shape:
            field_ = "K" if key.endswith(".prompt") else "gate"
            raise ZinitValueError(f"adapter weights in {source}: {key!r} has shape {list(value.shape)}, but zinit.json "
                                  f"(K={config.K}, hidden_size={dims.hidden_size}, gate={config.gate!r}) says "
                                  f"{list(shape)}; correct {field_} in zinit.json or save the adapter again")


def build_adapter(model: nn.Module, name: str, config: AdapterConfig, tensors: Mapping[str, Tensor] | None = None,
                  source: str | os.PathLike[str] = "the given state") -> PreparedAdapter:
    """Build the named adapter ``config`` describes for ``model`` (resolved against it: :meth:`AdapterConfig.bind`;
    a config that names no backbone takes the one the model's adapters use), with ``tensors``' values, checked
    strictly against ``config`` before anything is allocated, or zero-init, without touching the model;
    :func:`install_adapter` attaches it. The sizes are the model's (:func:`zinit.config.check_fits` checks a file's
    against them); ``source`` names the tensors' origin in errors."""
    state = _check_free(model, name)
    why = single_only(config)
    if why is not None:
        raise ZinitValueError(f"adapter {name!r} has {why}: load it alone with zinit.load_adapter")
    if config.backbone is None and state is not None:
        config = config.replace(backbone=state.backbone.name)
    config, dims = config.bind(model)
    spec = get_backbone(config.backbone)
    if state is not None and spec.name != state.backbone.name:
        raise ZinitValueError(f"this model's adapters use backbone {state.backbone.name!r}; the adapter {name!r} uses "
                              f"{spec.name!r}: add adapters of one backbone to a model")
    if tensors is not None:
        _check_shapes(config, dims, tensors, str(source))
    modules = spec.attention_modules(model)
    built: dict[int, LayerAdapter] = {}
    for n in config.layers:
        device = next(modules[n].parameters()).device
        built[n] = LayerAdapter(config.K, dims.hidden_size, dims.num_heads, gate=config.gate,
                                gate_fn=config.gate_fn, project=spec.project, device=device,
                                gate_init=config.gate_init)
    if tensors is not None:
        copy_adapter_state(canonical_state(built), tensors, config.layers)
    return PreparedAdapter(name, spec, config, built)


def install_adapter(model: nn.Module, prepared: PreparedAdapter) -> nn.Module:
    """Attach an adapter built for ``model`` (:func:`build_adapter`, :func:`zinit.io.prepare_adapter`; the model is
    frozen on the first one); returns the model. Quick (no file, no allocation of the adapter's tensors): what a
    server runs between forwards. The name and backbone are checked again (another adapter may have been added since
    it was prepared)."""
    name, spec, config = prepared.name, prepared.spec, prepared.config
    _check_free(model, name)
    state, created = freeze(model, spec)
    modules = spec.attention_modules(model)
    added: list[nn.Module] = []
    new_layers = [n for n in config.layers if n not in state.installed]
    try:
        for n in config.layers:
            attention = modules[n]
            if BANK_ATTR not in attention._modules:
                attention.add_module(BANK_ATTR, BankLayer(state.routing))
            attention._modules[BANK_ATTR].adapters[name] = prepared.layers[n]
            added.append(attention)
        spec.install(model, [modules[n] for n in new_layers])
        quant.keep_autograd(model)  # a 4-bit base repacked for inference would train nothing (zinit.quant)
    except BaseException:
        for attention in added:
            del attention._modules[BANK_ATTR].adapters[name]
            if not len(attention._modules[BANK_ATTR].adapters):
                delattr(attention, BANK_ATTR)
        abandon(model, state, created)
        raise
    state.installed.update(new_layers)
    attach(model, state, name, config)
    return model


def named_adapter_layers(model: nn.Module, name: str) -> dict[int, LayerAdapter]:
    """``{layer index: LayerAdapter}`` of the named adapter ``name``, bottom to top."""
    state = named_state(model)
    if name not in state.named:
        raise ZinitKeyError(f"no adapter named {name!r} on this model; it has {state.named}")
    modules = state.backbone.attention_modules(model)
    return {n: modules[n]._modules[BANK_ATTR].adapters[name] for n in state.configs[name].layers}


def carry_prompts(model: nn.Module, source: object, target: object, names: Iterable[str | None]) -> None:
    """Keep on the KV cache ``target`` the prompt keys and values that the named adapters ``names`` of ``model``
    kept on the KV cache ``source`` (see :meth:`zinit.LayerAdapter.attend`), for the decoding steps of ``target``.

    A serving engine rebuilds its KV cache whenever rows join or leave its batch (the tensors of the rows that go on,
    in a new cache object, which starts with no kept prompts): without this, every such step would project the
    prompts of every adapter in the batch again. The rows that go on are the same decoding loops, so they reuse what
    their loop kept, exactly as on ``source``; each entry's stamp still decides whether it serves. Entries ``target``
    already holds win (a fresh prefill's). Only the adapters in ``names`` (unknown names and None skipped) and the
    injected adapter, which every row uses, are carried: a long-running loop never holds the prompts of adapters
    its rows no longer use, or that were removed."""
    kept = getattr(source, STORE_ATTR, None)
    if not isinstance(kept, PromptStore) or not kept:
        return
    state = adapter_state(model)
    store = PromptStore.on(target)
    if state is None or store is None:
        return
    wanted: list[LayerAdapter | None] = []
    if state.active is not None:  # the injected adapter, which every row uses
        wanted += state.active_layers(model).values()
    for name in dict.fromkeys(names):
        if name is not None and name in state.named:
            wanted += named_adapter_layers(model, name).values()
    for adapter in wanted:
        entry = kept.get(adapter)
        if entry is not None and adapter not in store:
            store[adapter] = entry


def named_adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    """The :class:`~zinit.AdapterConfig` of the named adapter ``name``."""
    named_adapter_layers(model, name)  # the error names the adapters there are
    return named_state(model).configs[name]


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The prompts and gates of the named adapter ``name``, bottom to top: what an optimizer should get to train it.

    >>> import torch, timm, zinit
    >>> vit = zinit.add_adapter(timm.create_model("vit_tiny_patch16_224"), "a", layers=2, K=4)
    >>> opt = torch.optim.AdamW(zinit.adapter_parameters(vit, "a"), lr=1e-2)
    >>> [tuple(p.shape) for p in zinit.adapter_parameters(vit, "a")]
    [(4, 192), (3,), (4, 192), (3,)]
    """
    return [p for a in named_adapter_layers(model, name).values() for p in (a.prompt, a.gate)]


def named_adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The canonical state (``layers.{n}.prompt`` / ``layers.{n}.gate``) of the named adapter ``name``: the keys
    :func:`zinit.adapter_state_dict` gives for the same adapter injected alone."""
    return canonical_state(named_adapter_layers(model, name))


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the named adapter ``name`` (the others are untouched); after the last one the model is exactly as it
    was before the first :func:`zinit.add_adapter` (hooks removed, ``requires_grad`` restored). Returns the model.

    >>> import zinit, timm
    >>> vit = timm.create_model("vit_tiny_patch16_224")
    >>> keys = list(vit.state_dict())
    >>> _ = zinit.add_adapter(vit, "a", layers=2, K=4)
    >>> list(zinit.remove_adapter(vit, "a").state_dict()) == keys
    True
    """
    state = named_state(model)
    layers = named_adapter_layers(model, name)
    modules = state.backbone.attention_modules(model)
    still = {n for other, config in state.configs.items() if other != name for n in config.layers}
    unused = [n for n in layers if n not in still]
    state.backbone.uninstall(model, [modules[n] for n in unused])
    for n in layers:
        holder = modules[n]._modules[BANK_ATTR]
        del holder.adapters[name]
        if not len(holder.adapters):
            delattr(modules[n], BANK_ATTR)
    state.installed.difference_update(unused)
    release(model, state, name)
    return model


@contextmanager
def use_adapters(model: nn.Module, names: str | None | Sequence[str | None]) -> Iterator[None]:
    """Choose the adapter of each row for every forward and ``generate()`` of ``model`` inside the block.

    ``names`` is one name (every row), None (the base model) or one name-or-None per row of the batch (``generate()``
    with beams repeats each row's choice over its beams). Outside any block a model with named adapters computes the
    base model. Blocks are per thread / asyncio task (a ContextVar) and nest (the innermost wins).

    >>> import torch, timm, zinit
    >>> vit = zinit.add_adapter(timm.create_model("vit_tiny_patch16_224"), "a", layers=2, K=4)
    >>> x = torch.randn(2, 3, 224, 224)
    >>> with torch.no_grad():
    ...     base = vit(x)
    ...     with zinit.use_adapters(vit, ["a", None]):  # gates start at 0: both rows are the base model's
    ...         mixed = vit(x)
    >>> torch.equal(base, mixed)
    True
    """
    state = named_state(model)
    if names is None or isinstance(names, str):
        chosen: tuple[str | None, ...] | None = None
        every = names
        check = [names]
    else:
        chosen = tuple(names)
        every = None
        check = list(chosen)
        if not chosen:
            raise ZinitValueError("use_adapters got an empty list: give one adapter name (or None) per row")
    unknown = sorted({n for n in check if n is not None and n not in state.named}, key=str)
    bad = [n for n in check if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"use_adapters: adapter names are strings or None, got {bad[0]!r}")
    if unknown:
        raise ZinitKeyError(f"no adapter named {', '.join(map(repr, unknown))} on this model; it has "
                       f"{state.named} (add one with zinit.add_adapter)")
    token = state.routing.var.set(Route(chosen, every))
    try:
        yield
    finally:
        state.routing.var.reset(token)
