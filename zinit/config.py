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

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from ._version import __version__
from .attention import GATE_FUNCTIONS
from .registry import Dims

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
    K: int  #: prompt length
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

    @classmethod
    def for_model(cls, backbone: str, dims: Dims, layers: tuple[int, ...], K: int, **options: Any) -> "AdapterConfig":
        """The configuration of an adapter on a model of sizes ``dims`` (``options``: the other fields)."""
        return cls(backbone=backbone, **{f: getattr(dims, f) for f in DIM_FIELDS}, layers=tuple(layers), K=K,
                   **options)

    @property
    def dims(self) -> Dims:
        """The model sizes this adapter fits."""
        return Dims(**{f: getattr(self, f) for f in DIM_FIELDS})

    def inject_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`zinit.inject` (after ``layers`` and ``K``) that build this adapter."""
        return {"gate": self.gate, "gate_fn": self.gate_fn, "gate_init": self.gate_init, "backbone": self.backbone,
                "train_modules": list(self.train_modules), "visual_dim": self.visual_dim,
                "visual_hidden": self.visual_hidden if self.visual_hidden is not None else 128,
                "bias_scale": self.bias_scale or False, "train_norms": self.train_norms}

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
            raise ValueError(f"{source} is not a zinit adapter description (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version", 0)
        if not _is_int(version):
            raise _field_error(source, "format_version", f"an int (this zinit reads versions up to {FORMAT_VERSION})",
                               version)
        if version > FORMAT_VERSION:
            raise ValueError(f"{source} has format_version {version}, newer than this zinit ({__version__}) reads "
                             f"({FORMAT_VERSION}); upgrade zinit")
        required = ["backbone", "layers", "K", "gate", "gate_fn", *DIM_FIELDS]
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"{source} lacks the fields {missing}; {_AGAIN}")
        _check(data, source)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["layers"] = tuple(values["layers"])
        values["train_modules"] = tuple(values.get("train_modules", ()))
        if values.get("visual_dim") is None:
            values["visual_dim"] = values["visual_hidden"] = None
        if values["gate"] == "none" and version < 2:  # hand-edited: the version says a reader may ignore it
            raise _field_error(source, "format_version", "2 for gate \"none\" (which older zinit cannot compute)",
                               version)
        if (values.get("bias_scale") is not None or values.get("train_norms")) and version < 3:
            raise _field_error(source, "format_version", "3 for bias_scale / train_norms (which older zinit would "
                               "drop)", version)
        return cls(**values)

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


def _field_error(source: str, key: str, want: str, value: Any) -> ValueError:
    return ValueError(f"{source}: field {key!r} must be {want}, got {json.dumps(value)} ({type(value).__name__}); "
                      f"correct it or {_AGAIN}")


def _check(data: Mapping[str, Any], source: str) -> None:
    """Types and ranges of every field; errors name the field, the value and the fix."""
    if not isinstance(data["backbone"], str):
        raise _field_error(source, "backbone", "a backbone name such as \"llama\"", data["backbone"])
    for key in DIM_FIELDS:
        if not _is_int(data[key]) or data[key] < 1:
            raise _field_error(source, key, "an int >= 1", data[key])
    layers, depth = data["layers"], data["num_layers"]
    if (not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(n) and 0 <= n < depth for n in layers)
            or len(set(layers)) != len(layers)):
        raise _field_error(source, "layers", f"a non-empty list of distinct layer indices in 0..{depth - 1}", layers)
    if not _is_int(data["K"]) or data["K"] < 1:
        raise _field_error(source, "K", "an int >= 1 (the prompt length)", data["K"])
    if data["gate"] not in GATE_KINDS:
        raise _field_error(source, "gate", f"one of {list(GATE_KINDS)}", data["gate"])
    if data["gate_fn"] not in GATE_FUNCTIONS:
        raise _field_error(source, "gate_fn", f"one of {list(GATE_FUNCTIONS)}", data["gate_fn"])
    gate_init = data.get("gate_init", "zero")
    if gate_init not in GATE_INITS:
        raise _field_error(source, "gate_init", f"one of {list(GATE_INITS)}", gate_init)
    if gate_init != "zero" and data["gate"] == "none":
        raise _field_error(source, "gate_init", "\"zero\" with gate \"none\" (there is no gate to initialise)",
                           gate_init)
    if data.get("bias_scale") not in BIAS_SCALES:
        raise _field_error(source, "bias_scale", "null, \"blocks\" or \"all\"", data.get("bias_scale"))
    if not isinstance(data.get("train_norms", False), bool):
        raise _field_error(source, "train_norms", "true or false", data.get("train_norms"))
    modules = data.get("train_modules", [])
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, str) for m in modules):
        raise _field_error(source, "train_modules", "a list of submodule names", modules)
    for key in ("visual_dim", "visual_hidden"):
        value = data.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise _field_error(source, key, "an int >= 1 or null", value)
    if "weights_bytes" in data and (not _is_int(data["weights_bytes"]) or data["weights_bytes"] < 0):
        raise _field_error(source, "weights_bytes", "the size of adapter.safetensors in bytes", data["weights_bytes"])
    save_id = data.get("save_id")
    if save_id is not None and not (isinstance(save_id, str) and save_id):
        raise _field_error(source, "save_id", "the id of the save that wrote zinit.json and adapter.safetensors (a "
                           "string, also in the weights' safetensors metadata)", save_id)
    sha = data.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise _field_error(source, "weights_sha256", "the sha256 of adapter.safetensors (64 hex digits)", sha)


def resolve_layers(layers: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The adapted layer indices, ascending, from an int L (the top L layers) or explicit indices; errors name the
    bad value and the model's layer range."""
    if isinstance(layers, (bool, str)):
        raise TypeError(f"layers={layers!r}: pass an int L (the top L layers) or a list of layer indices")
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ValueError(
                f"layers={layers} is out of range: this model has {num_layers} layers, so L must be in 1..{num_layers}"
            )
        return tuple(range(num_layers - layers, num_layers))
    try:
        chosen = list(layers)
    except TypeError:
        raise TypeError(f"layers={layers!r}: pass an int L (the top L layers) or a list of layer indices") from None
    if not chosen:
        raise ValueError("layers=[] is empty: pass at least one layer index, or an int L for the top L layers")
    for n in chosen:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"layer index {n!r} is not an int")
        if not 0 <= n < num_layers:
            raise ValueError(f"layer index {n} is out of range: this model has layers 0..{num_layers - 1}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"layers={chosen} names a layer twice")
    return tuple(sorted(chosen))


def check_options(K: int, gate: str, gate_fn: str, gate_init: str = "zero") -> None:
    """Check the prompt length and the gate options; errors name the bad value and the choices."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K={K!r} must be an int >= 1 (the prompt length; the paper uses 10)")
    if gate not in GATE_KINDS:
        raise ValueError(f"gate={gate!r} is not one of {GATE_KINDS}")
    if gate_fn not in GATE_FUNCTIONS:
        raise ValueError(f"gate_fn={gate_fn!r} is not one of {GATE_FUNCTIONS}")
    if gate_init not in GATE_INITS:
        raise ValueError(f"gate_init={gate_init!r} is not one of {GATE_INITS}")
    if gate == "none" and (gate_init != "zero" or gate_fn != "tanh"):
        bad = f"gate_init={gate_init!r}" if gate_init != "zero" else f"gate_fn={gate_fn!r}"
        raise ValueError(f"gate='none' has no gate, so {bad} does not apply: drop it, or use gate='head' or 'layer'")


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
