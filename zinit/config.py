"""One adapter configuration: the options :func:`zinit.inject` takes, the injected model carries, ``zinit.json``
stores and :func:`zinit.load_adapter` compares, as a whole; independent of any model, as peft's ``LoraConfig``.

An :class:`AdapterConfig` holds every injection option (layers, K, gate, gate function, gate initialisation,
trained submodules, visual projection, V2's bias/scale and norms, the backbone to force). It is frozen, compares by
value and checks every field when it is made. Applied to a model (:meth:`AdapterConfig.bind`) it is *resolved*:
the backbone named, ``layers`` the ascending tuple of adapted indices; the model's sizes (a
:class:`~zinit.registry.Dims`) sit beside it, never in it. ``zinit.json`` stores both, flat (the backbone, the five
sizes, then the options): :meth:`AdapterConfig.to_json` takes the sizes, :meth:`AdapterConfig.from_json` gives back
a :class:`FittedConfig` ``(config, dims)``. Files written by older zinit versions, which lack the later optional
fields, keep loading, and the bytes written for an adapter are those earlier versions wrote.

Schema versions: a file says the lowest version its features need (:meth:`AdapterConfig.format_version`), so an
older zinit reads every adapter it can compute correctly and refuses, with "upgrade zinit", one it cannot:

- 1: every adapter with a gate (``gate="head"`` / ``"layer"``), whatever its ``gate_init``; a zinit that predates
  ``gate_init`` ignores the field, which only records how the gate started (the weights hold where it is now).
- 2: ``gate="none"`` (prompt keys joined to the tokens' softmax), which a version-1 reader would compute wrongly.
- 3: LLaMA-Adapter V2's ``bias_scale`` / ``train_norms``, which a version-2 reader would silently drop.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from torch import nn

from ._version import __version__
from .attention import GATE_FUNCTIONS
from .cliargs import layer_count, option, prompt_length
from .errors import ZinitValueError
from .registry import Backbone, Dims, find_backbone, get_backbone

#: The files of an adapter folder: the weights, the description (this configuration, as JSON) and the card.
WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "zinit.json"
#: The adapter card written beside them (the Hub shows it as the repo's model card; see :mod:`zinit.hub`).
CARD_NAME = "README.md"
#: What ``zinit.json`` says it is.
FORMAT = "zinit-adapter"
#: The newest schema version this zinit reads (a file is written with the lowest version its features need).
FORMAT_VERSION = 3
#: ``"head"``: one gate per query head (the paper); ``"layer"``: one per layer (peft); ``"none"``: no gate, the prompt
#: keys joined to the tokens' keys in one softmax (plain prefix attention with the same parameters).
GATE_KINDS = ("head", "layer", "none")
#: How a gate starts: ``"zero"`` (the method: the adapted model starts as the base model) or ``"random"`` (the
#: paper's random-init ablation); see :class:`zinit.LayerAdapter`.
GATE_INITS = ("zero", "random")
#: ``bias_scale`` values once normalised: off (None), the linear layers of the transformer blocks, every linear layer.
BIAS_SCALES = (None, "blocks", "all")
#: How an instruction is put to the model an adapter was trained on (``zinit.json``'s ``"prompt_format"``, written by
#: the recipes): ``"alpaca"``, the verbatim Stanford Alpaca prompt (the paper's; any model), or ``"chat"``, one user
#: turn in the tokenizer's own chat template followed by the assistant's turn (as TRL's SFT trains a chat model).
#: ``zinit generate`` and ``zinit serve`` prompt the adapter the same way (:mod:`zinit.lm`).
PROMPT_FORMATS = ("alpaca", "chat")


def check_prompt_format(prompt_format: Any) -> str:
    """``prompt_format`` itself after checking it is one of :data:`PROMPT_FORMATS` (a
    :class:`~zinit.errors.ZinitValueError` naming the value otherwise)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ZinitValueError(f"prompt format {prompt_format!r} is not one of {list(PROMPT_FORMATS)}")
    return prompt_format

#: The ``zinit.json`` fields that describe the model an adapter fits (the :class:`~zinit.registry.Dims` of its
#: backbone), written between the backbone and the options.
DIM_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_layers")

_AGAIN = "save the adapter again (zinit.save_adapter) or restore the folder from a copy"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _help(text: str, **cli: Any) -> dict[str, Any]:
    """A field's metadata: its one-line ``help`` (what peft's ``ZinitConfig`` shows too) and, given ``cli``
    (:func:`zinit.cliargs.option`'s arguments), its command-line option."""
    return {"help": text, **(option(**cli) if cli else {})}


@dataclass(frozen=True)
class AdapterConfig:
    """Every option of a zinit adapter, independent of any model: ``AdapterConfig()`` is the paper's method on every
    layer with K=10. :meth:`bind` resolves it against a model (backbone named, layers an ascending tuple) and gives
    the model's sizes beside it; :func:`zinit.inject` does that, and ``zinit.injection(model).config`` is the
    resolved config, which injects any model of a fitting depth and backbone.

    >>> import zinit
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = zinit.inject(LlamaForCausalLM(cfg), zinit.AdapterConfig(layers=2, K=5))
    >>> config, dims = zinit.injection(model).config, zinit.injection(model).dims
    >>> config.layers, config.K, config.gate, config.backbone, dims.hidden_size
    ((1, 2), 5, 'head', 'llama', 32)
    >>> zinit.AdapterConfig.from_json(config.to_json(dims)) == (config, dims)
    True
    """

    #: an int L (the top L layers), explicit layer indices (kept ascending), or None (every layer); resolved to the
    #: indices by :meth:`bind`. The recipes' ``--layers`` option is declared here.
    layers: int | tuple[int, ...] | None = field(default=None, metadata=_help(
        "An int L (the top L layers), a list of layer indices (0 = bottom layer), or None (every layer)",
        flag="--layers", type_=layer_count, help_="adapt the top L layers, capped at the depth (default %(default)s)",
        default=30))
    #: prompt length (also the recipes' ``--K`` option, declared here)
    K: int = field(default=10, metadata=_help("Prompt length (the paper uses 10)", flag="--K", type_=prompt_length,
                                              help_="prompt length (default %(default)s)"))
    gate: str = field(default="head", metadata=_help(
        "'head' (one gate per query head), 'layer' (one per layer) or 'none' (no gate: prefix attention)"))
    gate_fn: str = field(default="tanh", metadata=_help("'tanh' (the paper) or 'identity' (a raw gate)"))
    train_modules: tuple[str, ...] = field(default=(), metadata=_help(
        "Submodules trained and saved with the adapter (a task head)"))
    visual_dim: int | None = field(default=None, metadata=_help(
        "Width of per-example image features (None: text only)"))
    visual_hidden: int | None = field(default=None, metadata=_help(
        "Hidden width of the visual projection (set exactly when visual_dim is)"))
    gate_init: str = field(default="zero", metadata=_help(
        "'zero' (the method) or 'random' (the paper's ablation)"))
    #: LLaMA-Adapter V2: a learnable bias/scale on the linear layers of the blocks (``"blocks"``, also given as True)
    #: or of the whole model (``"all"``); None (or False): off
    bias_scale: str | None = field(default=None, metadata=_help(
        "LLaMA-Adapter V2's bias/scale: 'blocks' (or True), 'all', or None (off)"))
    train_norms: bool = field(default=False, metadata=_help("LLaMA-Adapter V2: train the normalisation layers"))
    backbone: str | None = field(default=None, metadata=_help(
        "zinit backbone name; None detects it from the model"))

    def __post_init__(self) -> None:
        """Normalise (``bias_scale`` True/False to ``"blocks"``/None, lists to tuples, explicit layers ascending), then
        check every field (:func:`check_fields`: the one place the rules live)."""
        if self.bias_scale is True or self.bias_scale is False:
            object.__setattr__(self, "bias_scale", "blocks" if self.bias_scale else None)
        if isinstance(self.layers, Iterable) and not isinstance(self.layers, (str, bytes)):
            object.__setattr__(self, "layers", tuple(self.layers))  # any collection or generator of indices, read once
        check_fields({f.name: getattr(self, f.name) for f in fields(self)})
        if isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))
        object.__setattr__(self, "train_modules", tuple(self.train_modules))

    @property
    def resolved(self) -> bool:
        """Whether this config names its backbone and its layers' indices (what :meth:`bind` gives)."""
        return self.backbone is not None and isinstance(self.layers, tuple)

    def bind(self, model: nn.Module) -> "FittedConfig":
        """This config resolved against ``model``, with the model's sizes: the backbone (``backbone``, or the one
        detected) named, ``layers`` resolved to ascending indices against the model's depth
        (:func:`resolve_layers`), ``train_modules`` checked against its submodules. What :func:`zinit.inject` and
        :func:`zinit.add_adapter` do with a config; the model is not changed.

        >>> import timm, zinit
        >>> config, dims = zinit.AdapterConfig(layers=2, K=4).bind(timm.create_model("vit_tiny_patch16_224"))
        >>> config.layers, config.backbone, dims.num_layers
        ((10, 11), 'vit', 12)
        """
        spec = get_backbone(self.backbone) if self.backbone is not None else find_backbone(model)
        dims = spec.dims(model)
        check_train_modules(model, self.train_modules)
        resolved = self.replace(backbone=spec.name, layers=resolve_layers(self.layers, dims.num_layers))
        return FittedConfig(resolved, dims)

    def differences(self, other: "AdapterConfig") -> dict[str, tuple[Any, Any]]:
        """``{field: (this value, other value)}`` for every field where the two differ (empty: equal)."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}

    def format_version(self) -> int:
        """The lowest schema version that describes this adapter (see the module docstring): 3 with V2's
        ``bias_scale``/``train_norms`` and 2 for ``gate="none"``, which an older zinit must refuse, else 1, which
        every zinit since the first reads.

        >>> import zinit
        >>> cfg = zinit.AdapterConfig()
        >>> [cfg.replace(**o).format_version() for o in ({}, {"gate_init": "random"}, {"gate": "none"},
        ...                                              {"bias_scale": "blocks"}, {"train_norms": True})]
        [1, 1, 2, 3, 3]
        """
        if self.bias_scale is not None or self.train_norms:
            return 3
        return 2 if self.gate == "none" else 1

    def to_json(self, dims: Dims) -> dict[str, Any]:
        """The ``zinit.json`` fields of this resolved config on a model of sizes ``dims``: format, schema version
        (:meth:`format_version`), the backbone, the sizes, then every option (tuples as lists; the visual fields only
        with a visual projection, ``gate_init`` only when it is not ``"zero"``, V2's only when on), so a default
        adapter's description is exactly what earlier versions wrote.

        >>> from zinit.registry import Dims
        >>> AdapterConfig(layers=(3,), K=4, backbone="llama").to_json(Dims(64, 4, 2, 16, 4))
        ... # doctest: +NORMALIZE_WHITESPACE
        {'format': 'zinit-adapter', 'format_version': 1, 'backbone': 'llama', 'hidden_size': 64, 'num_heads': 4,
         'num_kv_heads': 2, 'head_dim': 16, 'num_layers': 4, 'layers': [3], 'K': 4, 'gate': 'head',
         'gate_fn': 'tanh', 'train_modules': []}
        """
        if not self.resolved:
            raise ZinitValueError(f"to_json needs a resolved config (backbone {self.backbone!r}, layers "
                                  f"{self.layers!r}): config.bind(model) names the backbone and the layers' indices")
        out: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version(), "backbone": self.backbone,
                               **{key: getattr(dims, key) for key in DIM_FIELDS}}
        for key, value in asdict(self).items():
            if key == "backbone" or (key in ("visual_dim", "visual_hidden") and self.visual_dim is None):
                continue
            if (key, value) in (("gate_init", "zero"), ("bias_scale", None), ("train_norms", False)):
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "adapter description") -> "FittedConfig":
        """Read and check the fields :meth:`to_json` writes (extra keys, such as the weights' size and digest, are
        ignored): the resolved config and the sizes of the model it fits. Errors name ``source``, the field, the bad
        value and the fix."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ZinitValueError(f"{source} is not a zinit adapter description (no \"format\": \"{FORMAT}\")")
        version = _file_version(data, source)
        required = ["backbone", "layers", "K", "gate", "gate_fn", *DIM_FIELDS]
        missing = [key for key in required if key not in data]
        if missing:
            raise ZinitValueError(f"{source} lacks the fields {missing}; {_AGAIN}")
        _check_file_fields(data, source)
        for key, test, want in _file_rules(data):
            if key in data and not test(data[key]):
                raise _field_error(source, key, want, data[key])
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        if values.get("visual_dim") is None:
            values["visual_dim"] = values["visual_hidden"] = None
        elif values.get("visual_hidden") is None:  # files that recorded only visual_dim: the default hidden width
            values["visual_hidden"] = 128
        try:
            config = cls(**values)
        except FieldError as exc:
            raise exc.at(source) from None
        if values["gate"] == "none" and version < 2:  # hand-edited: the version says a reader may ignore it
            raise _field_error(source, "format_version", "2 for gate \"none\" (which older zinit cannot compute)",
                               version)
        if (values.get("bias_scale") is not None or values.get("train_norms")) and version < 3:
            raise _field_error(source, "format_version", "3 for bias_scale / train_norms (which older zinit would "
                               "drop)", version)
        return FittedConfig(config, Dims(**{key: data[key] for key in DIM_FIELDS}))

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with ``changes`` applied (checked as a new config is)."""
        return replace(self, **changes)


class FittedConfig(NamedTuple):
    """A resolved :class:`AdapterConfig` and the sizes of the model it fits: what :meth:`AdapterConfig.bind` gives
    and :meth:`AdapterConfig.from_json` reads (``config, dims = AdapterConfig.from_json(data)``)."""

    config: AdapterConfig
    dims: Dims

    def to_json(self) -> dict[str, Any]:
        """``config.to_json(dims)``."""
        return self.config.to_json(self.dims)


def _file_version(data: Mapping[str, Any], source: str) -> int:
    """``zinit.json``'s ``format_version`` (0 when absent), checked: an int this zinit reads."""
    version = data.get("format_version", 0)
    if not _is_int(version):
        raise _field_error(source, "format_version", f"an int (this zinit reads versions up to {FORMAT_VERSION})",
                           version)
    if version > FORMAT_VERSION:
        raise ZinitValueError(f"{source} has format_version {version}, newer than this zinit ({__version__}) reads "
                              f"({FORMAT_VERSION}); upgrade zinit")
    return version


def _field_error(source: str, key: str, want: str, value: Any) -> ZinitValueError:
    return ZinitValueError(f"{source}: field {key!r} must be {want}, got {json.dumps(value, default=repr)} "
                           f"({type(value).__name__}); correct it or {_AGAIN}")


class FieldError(ZinitValueError):
    """A field of an :class:`AdapterConfig` breaks its rule: ``key=value must be want`` (or the ``why`` of a rule
    between fields); :meth:`at` gives the message for a field read from a file."""

    def __init__(self, key: str, want: str, value: Any, why: str | None = None) -> None:
        super().__init__(why or f"{key}={value!r} must be {want}")
        self.key, self.want, self.value = key, want, value

    def at(self, source: str) -> ZinitValueError:
        """The same error for a field of the file ``source``, naming the fix."""
        return _field_error(source, self.key, self.want, self.value)


def _int_at_least_1(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _file_rules(data: Mapping[str, Any]) -> list[tuple[str, Callable[[Any], bool], str]]:
    """``(field, test, what it must be)`` for the fields of ``zinit.json`` that a resolved config on a model of its
    sizes has (the backbone, the sizes, the layers' indices within the depth, ``bias_scale`` as written), in the
    order they are checked; the options then meet :func:`check_fields` through :class:`AdapterConfig`."""
    depth = data.get("num_layers")
    span = f"0..{depth - 1}" if _int_at_least_1(depth) else "0..num_layers-1"
    return [
        ("backbone", lambda v: isinstance(v, str) and bool(v), "a backbone name such as \"llama\""),
        *[(key, _int_at_least_1, "an int >= 1") for key in DIM_FIELDS],
        ("layers", lambda v: (isinstance(v, (list, tuple)) and bool(v) and all(_is_int(n) and 0 <= n < depth for n in v)
                              and len(set(v)) == len(v)),
         f"a non-empty list of distinct layer indices in {span}"),
        ("bias_scale", lambda v: v in BIAS_SCALES, "null, \"blocks\" or \"all\""),
        ("train_modules", lambda v: isinstance(v, (list, tuple)) and all(isinstance(m, str) for m in v),
         "a list of submodule names"),
    ]


def _rules() -> list[tuple[str, Callable[[Any], bool], str]]:
    """``(field, test, what it must be)`` for every option but ``layers`` and ``train_modules`` (their own checks
    raise :func:`resolve_layers`'s errors), in the order they are checked."""
    return [
        ("K", _int_at_least_1, "an int >= 1 (the prompt length)"),
        ("gate", lambda v: v in GATE_KINDS, f"one of {list(GATE_KINDS)}"),
        ("gate_fn", lambda v: v in GATE_FUNCTIONS, f"one of {list(GATE_FUNCTIONS)}"),
        ("gate_init", lambda v: v in GATE_INITS, f"one of {list(GATE_INITS)}"),
        ("bias_scale", lambda v: v in BIAS_SCALES, "False, True (= 'blocks': the linear layers of the transformer "
                                                   "blocks) or 'all' (every linear layer, the LM head too)"),
        ("train_norms", lambda v: isinstance(v, bool), "True or False"),
        ("visual_dim", lambda v: v is None or _int_at_least_1(v), "an int >= 1 (the width of the image features) or "
                                                                    "null"),
        ("visual_hidden", lambda v: v is None or _int_at_least_1(v), "an int >= 1 (the projection MLP's hidden "
                                                                       "width) or null"),
        ("backbone", lambda v: v is None or (isinstance(v, str) and bool(v)),
         "a backbone name such as \"llama\", or None (detected from the model)"),
    ]


def check_fields(values: Mapping[str, Any]) -> None:
    """Check an adapter configuration's options (``{field: value}``), each against its one rule, then the rules
    between fields; a :class:`FieldError` names the field, the value and what it must be (``layers`` and
    ``train_modules`` raise :func:`resolve_layers`'s and :func:`check_train_modules`' errors). What
    :class:`AdapterConfig` runs on construction; rules that need the model (a layer index below its depth) wait for
    :meth:`AdapterConfig.bind`."""
    if "layers" in values and values["layers"] is not None:
        check_layers(values["layers"])
    if "train_modules" in values:
        _check_names(values["train_modules"])
    for key, test, want in _rules():
        if key in values and not test(values[key]):
            raise FieldError(key, want, values[key])
    if (values.get("visual_dim") is None) != (values.get("visual_hidden") is None):
        key = "visual_hidden"
        raise FieldError(key, "set exactly when visual_dim is (the visual projection's hidden width)", values.get(key),
                         f"visual_dim={values.get('visual_dim')!r} and visual_hidden={values.get(key)!r}: give both "
                         "(the projection's input and hidden widths) or neither")
    if values.get("gate") == "none":
        for key, default in (("gate_init", "zero"), ("gate_fn", "tanh")):
            if values.get(key, default) != default:
                raise FieldError(key, f"{default!r} with gate 'none' (there is no gate)", values[key],
                                 f"gate='none' has no gate, so {key}={values[key]!r} does not apply: drop it, or use "
                                 "gate='head' or 'layer'")


def _check_file_fields(data: Mapping[str, Any], source: str) -> None:
    """The fields ``zinit.json`` records about its weights file beside the configuration."""
    if "weights_bytes" in data and (not _is_int(data["weights_bytes"]) or data["weights_bytes"] < 0):
        raise _field_error(source, "weights_bytes", "the size of adapter.safetensors in bytes", data["weights_bytes"])
    save_id = data.get("save_id")
    if save_id is not None and not (isinstance(save_id, str) and save_id):
        raise _field_error(source, "save_id", "the id of the save that wrote zinit.json and adapter.safetensors (a "
                           "string, also in the weights' safetensors metadata)", save_id)
    prompt_format = data.get("prompt_format")
    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise _field_error(source, "prompt_format", f"the prompt format the adapter was trained with, one of "
                           f"{list(PROMPT_FORMATS)}", prompt_format)
    sha = data.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise _field_error(source, "weights_sha256", "the sha256 of adapter.safetensors (64 hex digits)", sha)


def changed_options(function: Callable[..., Any], given: Mapping[str, Any]) -> list[str]:
    """The names in ``given`` whose value is not ``function``'s default for that keyword, sorted: the options a call
    passed beside a config (or an adapter folder) that already says every option.

    >>> def f(config, *, K=None, gate="head"): ...
    >>> changed_options(f, {"K": None, "gate": "layer"})
    ['gate']
    """
    defaults = inspect.signature(function).parameters
    return sorted(key for key, value in given.items() if value != defaults[key].default)


_LAYERS_KINDS = "pass an int L (the top L layers) or a list of layer indices"


def check_layers(layers: int | Sequence[int]) -> None:
    """Check ``layers`` as far as it can be without a model: an int L >= 1, or a non-empty sequence of distinct
    non-negative int indices (a TypeError for the wrong kind of value, a ValueError for a wrong one)."""
    if isinstance(layers, (bool, str)):
        raise TypeError(f"layers={layers!r}: {_LAYERS_KINDS}")
    if isinstance(layers, int):
        if layers < 1:
            raise ZinitValueError(f"layers={layers} is out of range: L (the top L layers) must be >= 1")
        return
    try:
        chosen = list(layers)
    except TypeError:
        raise TypeError(f"layers={layers!r}: {_LAYERS_KINDS}") from None
    if not chosen:
        raise ZinitValueError("layers=[] is empty: pass at least one layer index, or an int L for the top L layers")
    for n in chosen:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"layer index {n!r} is not an int")
        if n < 0:
            raise ZinitValueError(f"layer index {n} is out of range: layer indices are 0 (the bottom layer) or more")
    if len(set(chosen)) != len(chosen):
        raise ZinitValueError(f"layers={chosen} names a layer twice")


def resolve_layers(layers: int | Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """The adapted layer indices, ascending, from an int L (the top L layers), explicit indices or None (every
    layer) on a model of ``num_layers`` layers; errors name the bad value and the model's layer range
    (:func:`check_layers` first)."""
    if layers is None:
        return tuple(range(num_layers))
    if isinstance(layers, int) and not isinstance(layers, bool) and not 1 <= layers <= num_layers:
        raise ZinitValueError(
            f"layers={layers} is out of range: this model has {num_layers} layers, so L must be in 1..{num_layers}"
        )
    check_layers(layers)
    if isinstance(layers, int):
        return tuple(range(num_layers - layers, num_layers))
    for n in layers:
        if n >= num_layers:
            raise ZinitValueError(f"layer index {n} is out of range: this model has layers 0..{num_layers - 1}")
    return tuple(sorted(layers))


def _check_names(names: Any) -> None:
    """``train_modules`` without a model: a list of distinct submodule names."""
    if isinstance(names, str):
        raise TypeError(f"train_modules={names!r}: pass a list of submodule names, e.g. [{names!r}]")
    if not isinstance(names, (list, tuple)) or not all(isinstance(m, str) for m in names):
        raise FieldError("train_modules", "a list of submodule names", names)
    if len(set(names)) != len(names):
        raise ZinitValueError(f"train_modules={list(names)} names a module twice")


def check_train_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Each of ``names`` is a submodule of ``model`` with parameters (what a task head trained with the adapter
    must be); the error names the model's children."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ZinitValueError(
                f"train_modules: {type(model).__name__} has no submodule {name!r} (its children: {children})"
            ) from None
        if not any(True for _ in module.parameters()):
            raise ZinitValueError(f"train_modules: submodule {name!r} ({type(module).__name__}) has no parameters")


def layer_shapes(config: AdapterConfig, dims: Dims) -> dict[str, tuple[int, ...]]:
    """The per-layer tensors an adapter described by the resolved ``config`` on a model of sizes ``dims`` has, with
    their shapes: ``layers.{n}.prompt`` ``[K, hidden_size]`` and, unless ``gate="none"``, ``layers.{n}.gate``
    ``[num_heads]`` (``gate="head"``) or ``[1]`` (``gate="layer"``), for each adapted layer n.

    >>> import zinit
    >>> from zinit.registry import Dims
    >>> layer_shapes(zinit.AdapterConfig(layers=(3,), K=10, gate="layer"), Dims(64, 4, 2, 16, 4))
    {'layers.3.prompt': (10, 64), 'layers.3.gate': (1,)}
    """
    out: dict[str, tuple[int, ...]] = {}
    for n in resolve_layers(config.layers, dims.num_layers):
        out[f"layers.{n}.prompt"] = (config.K, dims.hidden_size)
        if config.gate != "none":
            out[f"layers.{n}.gate"] = (dims.num_heads if config.gate == "head" else 1,)
    return out


def check_fits(config: AdapterConfig, dims: Dims, model: nn.Module, source: str | os.PathLike[str],
               fix: str = "load it into the model it was trained on") -> Backbone:
    """The backbone of the adapter ``config`` on a model of sizes ``dims`` (both read from ``source``), after checking
    that it accepts ``model`` and that the model's sizes are the adapter's; each error names the field, both values
    and ``fix``. Shared by :func:`zinit.load_adapter` and :func:`zinit.add_adapter` (a file's sizes against the
    model's; a config alone has none: it takes the model's)."""
    spec = get_backbone(config.backbone)
    if not spec.matches(model):
        raise ZinitValueError(f"the adapter in {source} was saved for backbone {config.backbone!r}, "
                              f"which does not accept a {type(model).__qualname__}: {fix}")
    have = spec.dims(model)
    for key in DIM_FIELDS:
        if getattr(dims, key) != getattr(have, key):
            raise ZinitValueError(f"adapter/model mismatch on {key}: the adapter in {source} has {key}="
                                  f"{getattr(dims, key)}, the model has {key}={getattr(have, key)}; {fix}")
    return spec
