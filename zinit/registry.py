"""Backbone specs and their registry.

A backbone tells zinit four things about one model family: whether a model belongs to it, where its attention
modules are (one per layer, bottom to top), its sizes, how to project a prompt through a layer's own frozen key
and value projections, and how to hook the gated prompt term into the layer's attention. Everything else
(parameters, gates, saving, converting) is zinit's and the same for every family.

Backbones are registered on import. The ``zinit.backbones`` package that ships with zinit (the repository's
``backbones/`` folder) and every module named by a
``zinit.backbones`` entry point are imported the first time the registry is consulted, so a user never has to
import them. A new family is one file with one :func:`register_backbone` call (see README, "Adding a backbone").
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Sequence

from torch import Tensor, nn

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "zinit.backbones"
BUILTIN_PACKAGE = "zinit.backbones"


@dataclass(frozen=True)
class Dims:
    """Sizes of one backbone instance, as zinit needs them."""

    hidden_size: int  #: C, the width of the prompt (input width of the key/value projections)
    num_heads: int  #: H, query heads (one gate each with ``gate="head"``)
    num_kv_heads: int  #: key/value heads (< H with grouped-query attention)
    head_dim: int  #: d
    num_layers: int  #: number of layers (attention modules) the model has


@dataclass(frozen=True)
class Backbone:
    """How zinit adapts one model family.

    Attributes:
        name: registry key, e.g. ``"llama"``.
        matches: ``model -> bool``; must be cheap and must not import heavy libraries the model cannot be from.
        attention_modules: ``model -> [attention module of layer 0, 1, ...]``; the adapter of layer n hangs on the n-th.
        dims: ``model -> Dims``.
        project: ``(attention module, prompt [..., K, C]) -> (keys, values)``, each ``[..., Hkv, K, d]``, through the
            layer's own frozen key/value projections, with no positional encoding.
        install: ``(model, attention modules to adapt) -> None``; routes those modules' attention through
            :meth:`zinit.prompts.LayerAdapter.attend`. Must leave every other module computing exactly as before.
        uninstall: ``(model, attention modules) -> None``; undoes ``install`` completely.
        description: one line for listings and error messages.
        generic: a catch-all for a whole library (the ``hf`` backbone takes any transformers model): consulted only
            when no other backbone matches the model.
        peft_targets: module names the PEFT methods that ``zinit compare`` runs through peft should target, for a
            family peft has no defaults for (peft knows every transformers model type; a timm ViT it does not):
            ``(("lora", ("qkv",)), ("ia3", ("qkv", "fc2")), ("ia3_feedforward", ("fc2",)))``.
        joint_softmax: the backbone computes ``gate="none"`` adapters: where
            :func:`zinit.joint_prompt_kv` gives prompt keys/values for a module, its attention concatenates
            them before the token keys/values, lets every query see them and runs one softmax over both. A backbone
            without it (the default) is refused ``gate="none"`` by :func:`zinit.inject`.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    attention_modules: Callable[[nn.Module], Sequence[nn.Module]]
    dims: Callable[[nn.Module], Dims]
    project: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
    install: Callable[[nn.Module, Sequence[nn.Module]], None]
    uninstall: Callable[[nn.Module, Sequence[nn.Module]], None]
    description: str = ""
    generic: bool = False
    peft_targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    joint_softmax: bool = False

    def peft_target(self, method: str) -> list[str] | None:
        """The module names :attr:`peft_targets` gives for ``method`` (None: use peft's own defaults)."""
        found = dict(self.peft_targets).get(method)
        return None if found is None else list(found)


_REGISTRY: dict[str, Backbone] = {}
_discovered = False


def register_backbone(backbone: Backbone, *, override: bool = False) -> Backbone:
    """Add a backbone to the registry and return it.

    Registering a name twice raises unless ``override=True`` (which replaces the earlier spec).

    >>> import zinit
    >>> spec = zinit.get_backbone("llama")
    >>> zinit.register_backbone(spec, override=True).name
    'llama'
    """
    if not isinstance(backbone, Backbone):
        raise TypeError(f"register_backbone takes a zinit.Backbone, got {type(backbone).__name__}")
    if backbone.name in _REGISTRY and not override and _REGISTRY[backbone.name] is not backbone:
        raise ValueError(
            f"a backbone named {backbone.name!r} is already registered; pick another name or pass override=True"
        )
    _REGISTRY[backbone.name] = backbone
    return backbone


def unregister_backbone(name: str) -> Backbone:
    """Remove the backbone registered as ``name`` and return it (a ValueError lists the names otherwise).

    >>> import zinit
    >>> spec = zinit.register_backbone(zinit.get_backbone("llama"), override=True)
    >>> unregister_backbone("llama") is spec and "llama" not in zinit.backbones()
    True
    >>> zinit.register_backbone(spec).name
    'llama'
    """
    backbone = get_backbone(name)
    del _REGISTRY[name]
    return backbone


def load_plugins(package: str, group: str) -> object:
    """Import the built-in ``package`` and every module named by an entry point of ``group``; returns the package.

    A plug-in that fails to import is logged and skipped: it must not take the built-in ones down with it. Shared by
    the backbone and the recipe registries."""
    module = importlib.import_module(package)
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - logged, named
            log.warning("zinit: could not load the %s entry point %r (%s): %s", group, ep.name, ep.value, exc)
    return module


def _discover() -> None:
    """Import the built-in backbones package and every ``zinit.backbones`` entry point, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    load_plugins(BUILTIN_PACKAGE, ENTRY_POINT_GROUP)


def backbones() -> list[str]:
    """Names of the registered backbones, sorted.

    >>> import zinit
    >>> [n for n in ("llama", "roberta", "vit") if n in zinit.backbones()]
    ['llama', 'roberta', 'vit']
    """
    _discover()
    return sorted(_REGISTRY)


def get_backbone(name: str) -> Backbone:
    """The backbone registered as ``name``; a ValueError lists the registered names otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def find_backbone(model: nn.Module) -> Backbone:
    """The registered backbone whose ``matches`` accepts ``model`` (a generic one only when no other does).

    Raises ValueError naming the model's class, the registered backbones, and how to register a new one.
    """
    _discover()
    found = [b for b in _REGISTRY.values() if not b.generic and b.matches(model)]
    if not found:
        found = [b for b in _REGISTRY.values() if b.generic and b.matches(model)]
    if len(found) == 1:
        return found[0]
    cls = type(model)
    if not found:
        raise ValueError(
            f"zinit has no backbone for {cls.__module__}.{cls.__qualname__}; registered backbones: "
            f"{', '.join(sorted(_REGISTRY))}. Pass backbone=NAME to force one, or add a backbone: one file calling "
            f"zinit.register_backbone(zinit.Backbone(...)) (README: 'Adding a backbone')."
        )
    raise ValueError(
        f"several backbones match {cls.__qualname__}: {', '.join(b.name for b in found)}; pass backbone=NAME"
    )
