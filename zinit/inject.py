"""inject / eject, and access to what was injected (adapters, trainable parameters, canonical state dicts).

Gate variants (the paper's ablations; the defaults are the method):

- ``gate_init="random"``: the gate starts drawn from N(0, 1) instead of 0 (see :class:`zinit.LayerAdapter` for
  why that distribution); the adapted model then differs from the base model from the first step.
- ``gate="none"``: no gate at all; each adapted layer's prompt keys/values (the same projections, no positional
  encoding) join its token keys/values in one softmax: plain prefix attention, every query seeing the K prompt
  keys and the tokens its mask allows. ``L·K·C`` parameters. The token attention stays on the layer's own kernel,
  run on the K + S keys: on Hugging Face models the ``"sdpa"`` and ``"eager"`` implementations (others are
  refused here, naming the fix), on timm ViTs fused or not. Not for named adapters (:func:`zinit.add_adapter`).

LLaMA-Adapter V2's additions (:mod:`zinit.v2`), both starting as the identity, so the model still starts as the
base model: ``bias_scale=True`` gives every linear layer of the transformer blocks a learnable bias and scale,
``y = s ⊙ (W x + b)`` with ``b = 0``, ``s = 1`` (``"all"``: every linear layer of the model, the LM head too, as
litgpt's ``adapter_v2``); ``train_norms=True`` trains the normalisation layers' own weights (put back by
:func:`eject`). Not for named adapters.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import quant, v2
from .bank import remove_adapter as remove_named
from .config import AdapterConfig, changed_options
from .errors import ZinitStateError, ZinitValueError
from .prompts import ADAPTER_ATTR, VISUAL_ATTR, LayerAdapter, VisualInput, VisualProjection
from .registry import Backbone, Dims, get_backbone
from .state import (DEFAULT_ADAPTER, STATE_ATTR, AdapterState, abandon, adapter_state, attach, canonical_state,
                    copy_adapter_state, freeze, release)

#: The record :func:`inject` leaves on a model: its :class:`~zinit.state.AdapterState` (one record for every adapter).
Injection = AdapterState

__all__ = ["Injection", "STATE_ATTR", "adapter_state_dict", "copy_adapter_state", "eject", "inject", "injection",
           "is_injected", "layer_adapters", "load_adapter_state_dict", "trainable_parameters", "visual_features"]


def inject(
    model: nn.Module,
    layers: int | Sequence[int] | AdapterConfig,
    K: int | None = None,
    *,
    gate: str = "head",
    gate_fn: str = "tanh",
    backbone: str | None = None,
    train_modules: Sequence[str] = (),
    visual_dim: int | None = None,
    visual_hidden: int = 128,
    gate_init: str = "zero",
    bias_scale: bool | str = False,
    train_norms: bool = False,
) -> nn.Module:
    """Turn a frozen transformer into a zero-init prompt-adapted one, in place, and return it.

    Every base parameter is frozen; each adapted layer gets a learnable prompt ``[K, C]`` (N(0, 1)) and a gate that
    starts at exactly 0, so until training moves the gates the model computes what it computed before.

    The paper's gate ablations (``gate_init="random"``, ``gate="none"``) and LLaMA-Adapter V2's additions
    (``bias_scale``, ``train_norms``) are options; the module docstring says what each computes.

    Args:
        model: a Hugging Face LLaMA/Mistral/Qwen2, RoBERTa/BERT model or a timm ViT/DeiT (see
            :func:`zinit.list_backbones`).
        layers: an int L (the top L layers, the paper's choice) or explicit layer indices (0 = bottom layer); or an
            :class:`~zinit.AdapterConfig`, which says everything else, so no other option is given: one built
            without a model (``zinit.AdapterConfig(layers=2, K=10)``), or ``zinit.injection(other).config`` (any
            model of a fitting depth and backbone; the sizes are always ``model``'s own).
        K: prompt length (the paper uses 10).
        gate: ``"head"`` (one gate per query head), ``"layer"`` (one per layer, as peft) or ``"none"`` (no gate,
            one joint softmax).
        gate_fn: ``"tanh"`` (paper) or ``"identity"`` (raw gate: official v1 inference, peft, litgpt); not with
            ``gate="none"``.
        backbone: registry name to use instead of detecting it from the model.
        train_modules: names of submodules (``model.get_submodule`` paths, e.g. ``"head"`` of a timm ViT or
            ``"qa_outputs"`` of a question-answering model) that stay trainable and are saved and loaded with the
            adapter under ``modules.{name}.{parameter}``: a new task head, as peft's ``modules_to_save``.
        visual_dim: width D of per-example image features (e.g. 3 CLIP class tokens: 3·1024). Adds a trainable
            MLP ``D → visual_hidden → C`` (``visual_proj.*`` in the adapter) whose output token is added to every
            adapted layer's prompt; pass the features of a forward with :func:`visual_features`.
        visual_hidden: hidden width of that MLP (default 128).
        gate_init: ``"zero"`` (the method) or ``"random"`` (the ablation: N(0, 1)); not with ``gate="none"``.
        bias_scale: False (default), True or ``"blocks"`` (the linear layers of every transformer block), or
            ``"all"`` (every linear layer, heads included): a learnable bias and scale on each (LLaMA-Adapter V2).
        train_norms: train every normalisation layer (LLaMA-Adapter V2).

    Returns:
        ``model`` itself, whose only trainable parameters are now the prompts and gates (and ``train_modules``).

    Example:
        >>> import torch, zinit
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = zinit.inject(LlamaForCausalLM(cfg), layers=2, K=10)
        >>> sum(p.numel() for p in zinit.trainable_parameters(model))  # 2·10·64 + 2·4
        1288
        >>> nogate = zinit.inject(LlamaForCausalLM(cfg), layers=2, K=10, gate="none")
        >>> sum(p.numel() for p in zinit.trainable_parameters(nogate))  # 2·10·64, no gates
        1280
        >>> v2 = zinit.inject(LlamaForCausalLM(cfg), layers=2, K=10, bias_scale=True, train_norms=True)
        >>> # 1288 + bias/scale on 7 linears of each of the 4 layers: 4·2·(64+32+32+64+128+128+64), + 9 norms of 64
        >>> sum(p.numel() for p in zinit.trainable_parameters(v2))
        5960
        >>> again = zinit.inject(LlamaForCausalLM(cfg), zinit.injection(v2).config)  # the same adapter, as a config
        >>> zinit.injection(again).config == zinit.injection(v2).config
        True
    """
    options = {"gate": gate, "gate_fn": gate_fn, "train_modules": train_modules, "visual_dim": visual_dim,
               "visual_hidden": visual_hidden, "gate_init": gate_init, "bias_scale": bias_scale,
               "train_norms": train_norms}
    if isinstance(layers, AdapterConfig):
        extra = changed_options(inject, {**options, "K": K, "backbone": backbone,
                                         "train_modules": tuple(train_modules)})
        if extra:
            raise ZinitValueError(f"inject(model, config) takes every option from the AdapterConfig; drop {extra} "
                                  "(or change them with config.replace(...))")
        return _inject(model, layers)
    if K is None:
        raise ZinitValueError("inject needs K (the prompt length, e.g. inject(model, layers=2, K=10)) or an "
                              "AdapterConfig as its second argument")
    if visual_dim is None:
        options["visual_hidden"] = None  # the hidden width belongs to a visual projection
    return _inject(model, AdapterConfig(layers=layers, K=K, backbone=backbone, **options))


def _inject(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Give ``model`` the adapter ``config`` describes (the body of :func:`inject`)."""
    if is_injected(model):
        raise ZinitStateError("this model is already injected with zinit; call zinit.eject(model) first to re-inject")
    if adapter_state(model) is not None:
        raise ZinitStateError("this model carries named adapters (zinit.add_adapter); inject one into a model without "
                              "them, or add this one by name: zinit.add_adapter(model, name, layers=..., K=...)")
    config, dims = config.bind(model)  # the backbone, the layers' indices and the task head, against the model
    spec = get_backbone(config.backbone)
    if config.gate == "none" and not spec.joint_softmax:
        raise ZinitValueError(f"gate='none' joins the prompt keys into the layer's own softmax, which backbone "
                              f"{spec.name!r} does not do (Backbone.joint_softmax is False); use gate='head' or 'layer'")
    if config.visual_dim is not None and hasattr(model, VISUAL_ATTR):
        raise ZinitValueError(f"the model already has an attribute {VISUAL_ATTR!r}; zinit needs that name")
    modules = list(spec.attention_modules(model))
    linears, norms = _v2_targets(model, config, modules)
    originals = {f"{n}.{pn}": p.detach().clone() for n, m in norms for pn, p in m.named_parameters(recurse=False)}
    targets = [modules[n] for n in config.layers]
    visual = VisualInput() if config.visual_dim is not None else None
    state, created = freeze(model, spec)
    try:
        _attach(model, spec, config, dims, targets, visual)
        v2.install_bias_scale(linears)
        v2.train_norms_in_float32(model, norms)
        spec.install(model, targets)
        quant.keep_autograd(model)  # a 4-bit base repacked for inference would train nothing (zinit.quant)
    except BaseException:  # leave the model exactly as it was given
        v2.uninstall_bias_scale(model, [n for n, _ in linears])
        v2.restore_norms(model, [n for n, _ in norms])
        for attention in targets:
            if ADAPTER_ATTR in attention._modules:
                delattr(attention, ADAPTER_ATTR)
        if visual is not None and VISUAL_ATTR in model._modules:
            delattr(model, VISUAL_ATTR)
        abandon(model, state, created)
        raise
    state.active, state.installed = DEFAULT_ADAPTER, set(config.layers)
    state.visual, state.norm_originals = visual, originals
    state.linears, state.norms = tuple(n for n, _ in linears), tuple(n for n, _ in norms)
    attach(model, state, DEFAULT_ADAPTER, config)
    return model


def _v2_targets(model: nn.Module, config: AdapterConfig, modules: list[nn.Module]
                ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """The linear layers that get V2's bias/scale and the norms V2 trains (both empty without V2)."""
    extra = config.train_modules
    linears = (list(v2.select_linears(model, config.bias_scale, v2.block_names(model, modules), extra))
               if config.bias_scale is not None else [])
    norms = list(v2.select_norms(model, extra)) if config.train_norms else []
    if config.train_norms and not norms:
        raise ZinitValueError(f"train_norms=True, but {type(model).__name__} has no normalisation layer (a module "
                              "whose class name ends in 'Norm' with parameters); drop train_norms")
    if any(v2.BIAS_SCALE_ATTR in m._modules for _, m in linears):
        raise ZinitStateError("a linear layer of this model already has a zinit bias/scale (a submodule injected on "
                              "its own?): eject that first")
    return linears, norms


def _attach(model: nn.Module, spec: Backbone, config: AdapterConfig, dims: Dims, targets: list[nn.Module],
            visual: VisualInput | None) -> None:
    """Hang each adapted layer's adapter on its attention, the visual projection on the model, and make the task
    head trainable."""
    for attention in targets:
        device = next(attention.parameters()).device
        attention.add_module(ADAPTER_ATTR, LayerAdapter(
            config.K, dims.hidden_size, dims.num_heads, gate=config.gate, gate_fn=config.gate_fn,
            project=spec.project, device=device, visual=visual, gate_init=config.gate_init))
    if visual is not None:
        device = next(targets[0].parameters()).device
        model.add_module(VISUAL_ATTR, VisualProjection(config.visual_dim, dims.hidden_size, config.visual_hidden,
                                                       device))
    for name in config.train_modules:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


_SERIAL = itertools.count(1)


@contextmanager
def visual_features(model: nn.Module, features: Tensor, has_image: Tensor | Sequence[bool] | None = None
                    ) -> Iterator[Tensor]:
    """Use per-example image features for every forward (and ``generate()``) of ``model`` inside the block.

    The features go through the model's visual projection once, on entry (inside autograd when gradients are on,
    so a ``backward()`` inside the block trains the projection); the resulting token of example b is added to the
    prompt of every adapted layer for that example. Blocks are per thread / asyncio task (a ContextVar), so
    concurrent forwards with different images do not see each other's; blocks nest (the innermost wins).

    Args:
        model: a model injected with ``visual_dim=D``.
        features: ``[B, D]``, one row per example of the batch (rows of examples without an image are ignored).
        has_image: ``[B]`` booleans; examples marked False get no visual term at all (default: all True).

    Yields the image tokens ``[B, C]`` (zero rows for examples without an image).

    Not compatible with gradient checkpointing (its recomputation runs outside the block), nor with
    ``nn.DataParallel`` (its replicas run in threads of their own, which do not see the block): train with
    torchrun (DDP), as zinit's trainer does. Works under ``torch.no_grad`` and ``torch.inference_mode`` alike.

    Example:
        >>> import torch, timm, zinit
        >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224"), layers=2, K=4, visual_dim=6)
        >>> x = torch.randn(2, 3, 224, 224)
        >>> with torch.no_grad(), zinit.visual_features(vit, torch.randn(2, 6), has_image=[True, False]) as tokens:
        ...     out = vit(x)
        >>> tuple(tokens.shape), tokens[1].abs().max().item()
        ((2, 192), 0.0)
    """
    state = injection(model)
    if state.visual is None:
        raise ZinitValueError("this model was injected without visual_dim: call zinit.inject(model, L, K, visual_dim=D)")
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] != state.visual_dim:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ZinitValueError(f"image features must be a tensor [batch, {state.visual_dim}], got {shape}")
    projection = model.get_submodule(VISUAL_ATTR)
    device = next(projection.parameters()).device
    features = features.to(device)
    tokens = projection(torch.nan_to_num(features))
    if has_image is not None:
        mask = torch.as_tensor(has_image, dtype=torch.bool, device=device)
        if mask.shape != (features.shape[0],):
            raise ZinitValueError(f"has_image has shape {tuple(mask.shape)}; expected ({features.shape[0]},), one per row")
        tokens = torch.where(mask[:, None], tokens, torch.zeros_like(tokens))
    token = state.visual.var.set((next(_SERIAL), tokens))
    try:
        yield tokens
    finally:
        state.visual.var.reset(token)


def _extra_parameters(model: nn.Module, state: Injection) -> dict[str, nn.Parameter]:
    """``visual_proj.*`` and ``modules.{name}.*`` parameters, under their canonical adapter keys."""
    out = {}
    if state.visual is not None:
        out.update({f"visual_proj.{n}": p for n, p in model.get_submodule(VISUAL_ATTR).named_parameters()})
    out.update({f"modules.{name}.{pname}": p for name in state.train_modules
                for pname, p in model.get_submodule(name).named_parameters()})
    for name in state.linears:
        bias_scale = model.get_submodule(name).get_submodule(v2.BIAS_SCALE_ATTR)
        out.update({f"linears.{name}.bias": bias_scale.bias, f"linears.{name}.scale": bias_scale.scale})
    seen: set[int] = set()  # a Parameter two norms share (tied) is listed, saved and trained once
    for name in state.norms:
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[f"norms.{name}.{pname}"] = p
    return out


def is_injected(model: nn.Module) -> bool:
    """Whether :func:`inject` (or :func:`zinit.load_adapter`) has given ``model`` its one adapter (and :func:`eject`
    has not removed it). A model with named adapters only (:func:`zinit.add_adapter`) is not injected."""
    state = adapter_state(model)
    return state is not None and state.active is not None


def injection(model: nn.Module) -> Injection:
    """The adapter state of an injected model (its :class:`~zinit.state.AdapterState`; ``.config`` is the adapter's
    configuration); a clear error otherwise."""
    state = adapter_state(model)
    if state is None or state.active is None:
        raise ZinitValueError("this model has no zinit adapter: call zinit.inject(model, layers, K) first")
    return state


def layer_adapters(model: nn.Module) -> dict[int, LayerAdapter]:
    """``{layer index: LayerAdapter}`` of an injected model, bottom to top.

    Raises a ValueError when the adapters are switched off by peft's ``disable_adapter()`` or transformers'
    ``disable_adapters()`` (each layer's adapter set aside): enable them first."""
    adapters = injection(model).active_layers(model)
    if any(a is None for a in adapters.values()):
        raise ZinitValueError("the zinit adapters of this model are disabled (peft's disable_adapter() or transformers' "
                         "disable_adapters()): enable them first (enable_adapters(), or leave the disable_adapter() "
                         "block)")
    return adapters


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters zinit trains (prompts and gates, then any ``train_modules``), in canonical order: what an
    optimizer should get.

    >>> import zinit, timm
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False), layers=2, K=4)
    >>> [tuple(p.shape) for p in zinit.trainable_parameters(vit)]
    [(4, 192), (3,), (4, 192), (3,)]
    """
    params = [p for a in layer_adapters(model).values() for p in (a.prompt, a.gate) if p is not None]
    return params + list(_extra_parameters(model, injection(model)).values())


def eject(model: nn.Module) -> nn.Module:
    """Remove everything :func:`inject` added (or every named adapter :func:`zinit.add_adapter` added) and restore
    each parameter's ``requires_grad``; returns ``model``.

    Afterwards the model's state_dict, parameters and outputs are those of a never-injected model.

    >>> import zinit, timm
    >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    >>> keys = list(vit.state_dict())
    >>> list(zinit.eject(zinit.inject(vit, 2, 4)).state_dict()) == keys
    True
    """
    state = adapter_state(model)
    if state is None:
        raise ZinitValueError("this model has no zinit adapter: call zinit.inject(model, layers, K) first")
    for name in state.named:
        remove_named(model, name)
    if state.active is not None:
        _remove_injected(model, state)
    return model


def _remove_injected(model: nn.Module, state: AdapterState) -> None:
    """Take out what :func:`inject` added: the layers' adapters, the visual projection, V2's changes (trained norms
    get their values back), then the state's record of the adapter."""
    modules = state.backbone.attention_modules(model)
    targets = [modules[n] for n in state.layers]
    state.backbone.uninstall(model, targets)
    for attention in targets:
        delattr(attention, ADAPTER_ATTR)
    if state.visual is not None:
        delattr(model, VISUAL_ATTR)
    v2.uninstall_bias_scale(model, state.linears)
    v2.restore_norms(model, state.norms)
    with torch.no_grad():  # trained norms get their values back (none to give after an inject on the meta device)
        for key, value in (state.norm_originals or {}).items():
            if not value.is_meta:
                model.get_parameter(key).copy_(value)
    state.installed.clear()
    state.visual, state.linears, state.norms, state.norm_originals = None, (), (), None
    release(model, state, state.active)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under canonical keys ``layers.{n}.prompt`` ``[K, C]`` and ``layers.{n}.gate`` ``[H]``/``[1]``
    (none with ``gate="none"``; ``visual_proj.*`` with ``visual_dim``, ``modules.{name}.{parameter}`` for each of
    inject's ``train_modules``).

    ``n`` is the backbone's own layer index. Tensors are detached views of the parameters (as ``state_dict``).
    """
    out = canonical_state(layer_adapters(model))
    for key, p in _extra_parameters(model, injection(model)).items():
        out[key] = p.detach()
    return out


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy a canonical adapter state into an injected model. Strict: every key must be present with its exact shape.

    Raises:
        KeyError: a missing or unexpected key (named, with the keys this model expects).
        ValueError: a wrong shape (naming the key, the given shape and the expected one).
    """
    copy_adapter_state(adapter_state_dict(model), state, injection(model).layers)
