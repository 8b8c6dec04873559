"""One adapter configuration: what :func:`zinit.inject` builds, the injected model carries, ``zinit.json`` stores
and :func:`zinit.load_adapter` compares, as a whole.

An :class:`AdapterConfig` names the backbone, the model sizes the adapter fits (hidden size, heads, KV heads, head
size, layer count) and every injection option (layers, K, gate, gate function, gate initialisation, trained
submodules, visual projection). It is frozen, compares by value, and round-trips through JSON with a schema version;
files written by older zinit versions, which lack the later optional fields, keep loading.

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
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from ._version import __version__
from .attention import GATE_FUNCTIONS
from .cliargs import option, prompt_length
from .errors import ZinitValueError
from .registry import Backbone, Dims, get_backbone

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
#: ``bias_scale`` values: off (None), the linear layers of the transformer blocks, every linear layer.
BIAS_SCALES = (None, "blocks", "all")
#: How an instruction is put to the model an adapter was trained on (``zinit.json``'s ``"prompt_format"``, written by
#: the recipes): ``"alpaca"``, the verbatim Stanford Alpaca prompt (the paper's; any model), or ``"chat"``, one user
#: turn in the tokenizer's own chat template followed by the assistant's turn (as TRL's SFT trains a chat model).
#: ``zinit generate`` and ``zinit serve`` prompt the adapter the same way (:mod:`zinit.lm`).
PROMPT_FORMATS = ("alpaca", "chat")
#: The fields that describe the model an adapter fits (the :class:`~zinit.registry.Dims` of its backbone).
DIM_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_layers")

_AGAIN = "save the adapter again (zinit.save_adapter) or restore the folder from a copy"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AdapterConfig:
    """Everything that defines a zinit adapter except its weights.

    >>> import zinit
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> config = zinit.injection(zinit.inject(LlamaForCausalLM(cfg), layers=2, K=5)).config
    >>> config.layers, config.K, config.gate
    ((1, 2), 5, 'head')
    >>> zinit.AdapterConfig.from_json(config.to_json()) == config
    True
    """

    backbone: str  #: registry name of the backbone (``"llama"``, ``"vit"``, ``"hf"`` ...)
    hidden_size: int  #: C, the prompt width
    num_heads: int  #: query heads H
    num_kv_heads: int  #: key/value heads
    head_dim: int  #: d
    num_layers: int  #: layers the model has
    layers: tuple[int, ...]  #: adapted layer indices, ascending
    #: prompt length (also the recipes' ``--K`` option, declared here)
    K: int = field(metadata=option("--K", prompt_length, "prompt length (default %(default)s)", default=10))
    gate: str = "head"  #: ``"head"`` (one gate per query head), ``"layer"`` or ``"none"`` (no gate: one softmax)
    gate_fn: str = "tanh"  #: ``"tanh"`` or ``"identity"`` (unused by ``gate="none"``)
    train_modules: tuple[str, ...] = ()  #: submodules trained and saved with the adapter (a task head)
    visual_dim: int | None = None  #: width of the image features (None: text only)
    visual_hidden: int | None = None  #: hidden width of the visual projection (None without ``visual_dim``)
    gate_init: str = "zero"  #: ``"zero"`` (the method) or ``"random"`` (the ablation); ``"zero"`` for ``gate="none"``
    #: LLaMA-Adapter V2: a learnable bias/scale on the linear layers of the blocks (``"blocks"``) or of the whole
    #: model (``"all"``); None: off
    bias_scale: str | None = None
    train_norms: bool = False  #: LLaMA-Adapter V2: the normalisation layers are trained

    def __post_init__(self) -> None:
        """Check every field (:func:`check_fields`: the one place the rules live); lists become tuples, the layers
        ascending."""
        check_fields({f.name: getattr(self, f.name) for f in fields(self)})
        object.__setattr__(self, "layers", tuple(sorted(self.layers)))
        object.__setattr__(self, "train_modules", tuple(self.train_modules))

    @classmethod
    def for_model(cls, backbone: str, dims: Dims, layers: tuple[int, ...], K: int, **options: Any) -> "AdapterConfig":
        """The configuration of an adapter on a model of sizes ``dims`` (``options``: the other fields)."""
        return cls(backbone=backbone, **{f: getattr(dims, f) for f in DIM_FIELDS}, layers=tuple(layers), K=K,
                   **options)

    @classmethod
    def on_model(cls, model: nn.Module, spec: "Backbone", layers: int | Sequence[int], K: int,
                 **options: Any) -> "AdapterConfig":
        """The configuration of an adapter on ``model`` of backbone ``spec``, its sizes read from the model and
        ``layers`` (an int L for the top L layers, or indices) resolved against its depth (``options``: the other
        fields). What :func:`zinit.inject` and :func:`zinit.add_adapter` build from their keyword arguments."""
        dims = spec.dims(model)
        return cls.for_model(spec.name, dims, resolve_layers(layers, dims.num_layers), K, **options)

    @property
    def dims(self) -> Dims:
        """The model sizes this adapter fits."""
        return Dims(**{f: getattr(self, f) for f in DIM_FIELDS})

    def differences(self, other: "AdapterConfig") -> dict[str, tuple[Any, Any]]:
        """``{field: (this value, other value)}`` for every field where the two differ (empty: equal)."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}

    def format_version(self) -> int:
        """The lowest schema version that describes this adapter (see the module docstring): 3 with V2's
        ``bias_scale``/``train_norms`` and 2 for ``gate="none"``, which an older zinit must refuse, else 1, which
        every zinit since the first reads.

        >>> import zinit
        >>> cfg = zinit.AdapterConfig("llama", 64, 4, 2, 16, 4, (2, 3), K=10)
        >>> [cfg.replace(**o).format_version() for o in ({}, {"gate_init": "random"}, {"gate": "none"},
        ...                                              {"bias_scale": "blocks"}, {"train_norms": True})]
        [1, 1, 2, 3, 3]
        """
        if self.bias_scale is not None or self.train_norms:
            return 3
        return 2 if self.gate == "none" else 1

    def to_json(self) -> dict[str, Any]:
        """The ``zinit.json`` fields: format, schema version (:meth:`format_version`), then every field (tuples as
        lists; the visual fields only with a visual projection, and ``gate_init`` only when it is not ``"zero"``,
        so a default adapter's description is exactly what earlier versions wrote)."""
        out: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version()}
        for key, value in asdict(self).items():
            if key in ("visual_dim", "visual_hidden") and self.visual_dim is None:
                continue
            if (key, value) in (("gate_init", "zero"), ("bias_scale", None), ("train_norms", False)):
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "adapter description") -> "AdapterConfig":
        """Read and check the fields :meth:`to_json` writes (extra keys, such as the weights' size and digest, are
        ignored). Errors name ``source``, the field, the bad value and the fix."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ZinitValueError(f"{source} is not a zinit adapter description (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version", 0)
        if not _is_int(version):
            raise _field_error(source, "format_version", f"an int (this zinit reads versions up to {FORMAT_VERSION})",
                               version)
        if version > FORMAT_VERSION:
            raise ZinitValueError(f"{source} has format_version {version}, newer than this zinit ({__version__}) reads "
                             f"({FORMAT_VERSION}); upgrade zinit")
        required = ["backbone", "layers", "K", "gate", "gate_fn", *DIM_FIELDS]
        missing = [key for key in required if key not in data]
        if missing:
            raise ZinitValueError(f"{source} lacks the fields {missing}; {_AGAIN}")
        _check_file_fields(data, source)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
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
        return config

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


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


def _rules(values: Mapping[str, Any]) -> list[tuple[str, Callable[[Any], bool], str]]:
    """``(field, test, what it must be)`` for every field, in the order they are checked."""
    depth = values.get("num_layers")
    span = f"0..{depth - 1}" if _is_int(depth) else "0..num_layers-1"
    return [
        ("backbone", lambda v: isinstance(v, str) and bool(v), "a backbone name such as \"llama\""),
        *[(key, _int_at_least_1, "an int >= 1") for key in DIM_FIELDS],
        ("layers", lambda v: (isinstance(v, (list, tuple)) and bool(v) and all(_is_int(n) and 0 <= n < depth for n in v)
                              and len(set(v)) == len(v)),
         f"a non-empty list of distinct layer indices in {span}"),
        ("K", _int_at_least_1, "an int >= 1 (the prompt length)"),
        ("gate", lambda v: v in GATE_KINDS, f"one of {list(GATE_KINDS)}"),
        ("gate_fn", lambda v: v in GATE_FUNCTIONS, f"one of {list(GATE_FUNCTIONS)}"),
        ("gate_init", lambda v: v in GATE_INITS, f"one of {list(GATE_INITS)}"),
        ("bias_scale", lambda v: v in BIAS_SCALES, "null, \"blocks\" or \"all\""),
        ("train_norms", lambda v: isinstance(v, bool), "True or False"),
        ("train_modules", lambda v: isinstance(v, (list, tuple)) and all(isinstance(m, str) for m in v),
         "a list of submodule names"),
        ("visual_dim", lambda v: v is None or _int_at_least_1(v), "an int >= 1 (the width of the image features) or "
                                                                    "null"),
        ("visual_hidden", lambda v: v is None or _int_at_least_1(v), "an int >= 1 (the projection MLP's hidden "
                                                                       "width) or null"),
    ]


def check_fields(values: Mapping[str, Any]) -> None:
    """Check an adapter configuration's fields (``{field: value}``), each against its one rule, then the rules
    between fields; a :class:`FieldError` names the field, the value and what it must be. Shared by
    :class:`AdapterConfig` (which runs it on construction) and ``zinit.json`` (through it)."""
    for key, test, want in _rules(values):
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


def resolve_layers(layers: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The adapted layer indices, ascending, from an int L (the top L layers) or explicit indices; errors name the
    bad value and the model's layer range."""
    if isinstance(layers, (bool, str)):
        raise TypeError(f"layers={layers!r}: pass an int L (the top L layers) or a list of layer indices")
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ZinitValueError(
                f"layers={layers} is out of range: this model has {num_layers} layers, so L must be in 1..{num_layers}"
            )
        return tuple(range(num_layers - layers, num_layers))
    try:
        chosen = list(layers)
    except TypeError:
        raise TypeError(f"layers={layers!r}: pass an int L (the top L layers) or a list of layer indices") from None
    if not chosen:
        raise ZinitValueError("layers=[] is empty: pass at least one layer index, or an int L for the top L layers")
    for n in chosen:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"layer index {n!r} is not an int")
        if not 0 <= n < num_layers:
            raise ZinitValueError(f"layer index {n} is out of range: this model has layers 0..{num_layers - 1}")
    if len(set(chosen)) != len(chosen):
        raise ZinitValueError(f"layers={chosen} names a layer twice")
    return tuple(sorted(chosen))


def layer_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The per-layer tensors an adapter described by ``config`` has, with their shapes: ``layers.{n}.prompt``
    ``[K, hidden_size]`` and, unless ``gate="none"``, ``layers.{n}.gate`` ``[num_heads]`` (``gate="head"``) or
    ``[1]`` (``gate="layer"``), for each adapted layer n.

    >>> import zinit
    >>> layer_shapes(zinit.AdapterConfig("llama", 64, 4, 2, 16, 4, (3,), K=10, gate="layer"))
    {'layers.3.prompt': (10, 64), 'layers.3.gate': (1,)}
    """
    out: dict[str, tuple[int, ...]] = {}
    for n in config.layers:
        out[f"layers.{n}.prompt"] = (config.K, config.hidden_size)
        if config.gate != "none":
            out[f"layers.{n}.gate"] = (config.num_heads if config.gate == "head" else 1,)
    return out


def check_fits(config: AdapterConfig, model: nn.Module, source: str | os.PathLike[str],
               fix: str = "load it into the model it was trained on") -> "Backbone":
    """The backbone of the adapter ``config`` (read from ``source``), after checking that it accepts ``model`` and
    that the model's sizes are the adapter's; each error names the field, both values and ``fix``. Shared by
    :func:`zinit.inject` (given a config), :func:`zinit.load_adapter` and :func:`zinit.add_adapter`."""
    spec = get_backbone(config.backbone)
    if not spec.matches(model):
        raise ZinitValueError(f"the adapter in {source} was saved for backbone {config.backbone!r}, "
                         f"which does not accept a {type(model).__qualname__}: {fix}")
    dims = spec.dims(model)
    for key in DIM_FIELDS:
        if getattr(config, key) != getattr(dims, key):
            raise ZinitValueError(f"adapter/model mismatch on {key}: the adapter in {source} has {key}="
                             f"{getattr(config, key)}, the model has {key}={getattr(dims, key)}; {fix}")
    return spec
