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
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from torch import Tensor, nn

from .errors import ZinitKeyError, ZinitValueError

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
    joint_softmax: bool = False


def load_plugins(package: str | None, group: str | None) -> object:
    """Import the built-in ``package`` (if any) and every module named by an entry point of ``group`` (if any);
    returns the package (None without one).

    A plug-in that fails to import is logged and skipped: it must not take the built-in ones down with it."""
    module = importlib.import_module(package) if package is not None else None
    for ep in entry_points(group=group) if group is not None else ():
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - logged, named
            log.warning("zinit: could not load the %s entry point %r (%s): %s", group, ep.name, ep.value, exc)
    return module


T = TypeVar("T")


class Registry(Generic[T]):
    """Named things of one kind, registered by the files that define them (timm's ``register_model`` /
    ``list_models`` style): the one registry type behind backbones, recipes, methods and quantization schemes.

    A registry with a ``package`` imports it (and every module named by an entry point of ``group``) the first time it
    is consulted, so its built-ins and a user's plug-ins are there without an import; the package's ``BUILTIN`` list,
    if it has one, gives the built-ins' order in :meth:`names`. Items are anything with a ``name`` attribute, of the
    registry's type.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Colour:
    ...     name: str
    >>> colours = Registry("colour", Colour)
    >>> colours.register(Colour("red")).name, colours.names(), "red" in colours
    ('red', ['red'], True)
    >>> colours.get("blue")
    Traceback (most recent call last):
    zinit.errors.ZinitValueError: unknown colour 'blue'; registered colours: red
    """

    def __init__(self, kind: str, item_type: type, *, package: str | None = None, group: str | None = None,
                 sort: bool = False, how_to_add: str = "") -> None:
        self.kind, self.item_type, self.package, self.group = kind, item_type, package, group
        self.sort, self.how_to_add = sort, how_to_add
        self._items: dict[str, T] = {}
        self._builtin: tuple[str, ...] = ()
        self._discovered = package is None and group is None

    def _type_name(self) -> str:
        """How the item type is reached: ``zinit.Backbone`` when zinit exports it, else its module path."""
        name = self.item_type.__qualname__
        exported = getattr(sys.modules.get("zinit"), name, None) is self.item_type
        return f"zinit.{name}" if exported else f"{self.item_type.__module__}.{name}"

    def _discover(self) -> None:
        """Import the built-in package and the entry points, once."""
        if self._discovered:
            return
        self._discovered = True
        module = load_plugins(self.package, self.group)
        self._builtin = tuple(getattr(module, "BUILTIN", ()))

    def register(self, item: T, *, override: bool = False) -> T:
        """Add ``item`` under its name and return it; a name registered twice raises unless ``override=True``
        (which replaces the earlier item)."""
        if not isinstance(item, self.item_type):
            raise TypeError(f"the {self.kind} registry takes a {self._type_name()}, got {type(item).__name__}")
        name = item.name  # type: ignore[attr-defined]
        if name in self._items and not override and self._items[name] is not item:
            raise ZinitValueError(f"a {self.kind} named {name!r} is already registered; pick another name or pass "
                                  "override=True")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> T:
        """Remove the item registered as ``name`` and return it."""
        item = self.get(name)
        del self._items[name]
        return item

    def get(self, name: str) -> T:
        """The item registered as ``name``; a ValueError lists the registered names otherwise."""
        self._discover()
        if name not in self._items:
            raise ZinitValueError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {', '.join(self.names())}"
                                  + (f" ({self.how_to_add})" if self.how_to_add else ""))
        return self._items[name]

    def names(self) -> list[str]:
        """The registered names: sorted for a sorted registry, else the built-ins in their listed order and then the
        others in the order they were registered."""
        self._discover()
        if self.sort:
            return sorted(self._items)
        builtin = [name for name in self._builtin if name in self._items]
        return builtin + [name for name in self._items if name not in builtin]

    def values(self) -> list[T]:
        """The registered items, in :meth:`names` order."""
        return [self._items[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._discover()
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        try:
            return self.get(name)
        except ZinitValueError as exc:  # a mapping's lookup raises KeyError (ZinitKeyError is one), with the names
            raise ZinitKeyError(str(exc)) from None

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


#: The backbone registry: the ``zinit.backbones`` package and ``zinit.backbones`` entry points, sorted by name.
BACKBONES: Registry[Backbone] = Registry("backbone", Backbone, package=BUILTIN_PACKAGE, group=ENTRY_POINT_GROUP,
                                         sort=True, how_to_add="add one: README, 'Adding a backbone'")


def register_backbone(backbone: Backbone, *, override: bool = False) -> Backbone:
    """Add a backbone to the registry and return it.

    Registering a name twice raises unless ``override=True`` (which replaces the earlier spec).

    >>> import zinit
    >>> spec = zinit.get_backbone("llama")
    >>> zinit.register_backbone(spec, override=True).name
    'llama'
    """
    return BACKBONES.register(backbone, override=override)


def unregister_backbone(name: str) -> Backbone:
    """Remove the backbone registered as ``name`` and return it (a ValueError lists the names otherwise).

    >>> import zinit
    >>> spec = zinit.register_backbone(zinit.get_backbone("llama"), override=True)
    >>> unregister_backbone("llama") is spec and "llama" not in zinit.list_backbones()
    True
    >>> zinit.register_backbone(spec).name
    'llama'
    """
    return BACKBONES.unregister(name)


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted.

    >>> import zinit
    >>> [n for n in ("llama", "roberta", "vit") if n in zinit.list_backbones()]
    ['llama', 'roberta', 'vit']
    """
    return BACKBONES.names()


def get_backbone(name: str) -> Backbone:
    """The backbone registered as ``name``; a ValueError lists the registered names otherwise."""
    return BACKBONES.get(name)


def find_backbone(model: nn.Module) -> Backbone:
    """The registered backbone whose ``matches`` accepts ``model`` (a generic one only when no other does).

    Raises ValueError naming the model's class, the registered backbones, and how to register a new one.
    """
    registered = BACKBONES.values()
    found = [b for b in registered if not b.generic and b.matches(model)]
    if not found:
        found = [b for b in registered if b.generic and b.matches(model)]
    if len(found) == 1:
        return found[0]
    cls = type(model)
    if not found:
        raise ZinitValueError(
            f"zinit has no backbone for {cls.__module__}.{cls.__qualname__}; registered backbones: "
            f"{', '.join(BACKBONES.names())}. Pass backbone=NAME to force one, or add a backbone: one file calling "
            f"zinit.register_backbone(zinit.Backbone(...)) (README: 'Adding a backbone')."
        )
    raise ZinitValueError(
        f"several backbones match {cls.__qualname__}: {', '.join(b.name for b in found)}; pass backbone=NAME"
    )
