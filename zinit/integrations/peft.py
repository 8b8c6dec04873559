"""zinit as a peft method: ``get_peft_model(model, ZinitConfig(layers=L, K=K))``.

Importing this module registers zinit with peft (``peft.utils.register_peft_method``, name ``"zinit"``, prefix
``"zinit_"``); from then on peft's own tools work on zinit adapters: ``get_peft_model``, ``print_trainable_parameters``,
``PeftModel.save_pretrained`` (``adapter_config.json`` with ``"peft_type": "ZINIT"`` and ``adapter_model.safetensors``
holding only the prompts and gates, under peft's keys ``base_model.model.<module path>.zinit_adapter.prompt`` /
``.gate``), ``PeftModel.from_pretrained`` / ``load_adapter``, ``disable_adapter()``, ``unload()``, and
``transformers.Trainer`` (adapter-only checkpoints, ``resume_from_checkpoint``). Import it before
``PeftModel.from_pretrained`` in a new process: peft finds the config class by ``peft_type`` in the registry this
import fills.

The computation is literally zinit's: :class:`ZinitModel` calls :func:`zinit.inject` on the wrapped model, so
``zinit.adapter_state_dict(peft_model.get_base_model())`` and every other zinit function work on it too.

One adapter per model through this door: peft switches adapters by name, zinit's many-adapter serving
(:func:`zinit.add_adapter`, :func:`zinit.use_adapters`) picks them per row, and the two do not mix; a second
``add_adapter`` / ``load_adapter`` name is refused. Prompts cannot be merged into base weights: ``merge_and_unload()``
raises, ``unload()`` gives the base model back.

peft 0.21's ``register_peft_method`` accepts only names already in its ``PeftType`` enum, which has no public way to
grow; this module adds the member ``PeftType.ZINIT`` (value ``"ZINIT"``, what ``adapter_config.json`` stores) the way
``aenum.extend_enum`` does, unless the installed peft already has it.

>>> import zinit.integrations.peft as zp
>>> from peft import get_peft_model
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
...                   num_attention_heads=4, num_key_value_heads=2)
>>> peft_model = get_peft_model(LlamaForCausalLM(cfg), zp.ZinitConfig(layers=2, K=5, task_type="CAUSAL_LM"))
>>> peft_model.get_nb_trainable_parameters()[0]  # 2 layers · (5·32 prompt + 4 gates)
328
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

try:
    import peft as _peft
    from peft import PeftConfig, PeftType
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import register_peft_method
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("zinit.integrations.peft needs peft >= 0.21: pip install 'peft>=0.21'") from exc

import zinit
from zinit.prompts import ADAPTER_ATTR

# peft >= 0.21 asks the tuner class which state-dict entries are its own (BaseTuner._get_adapter_state_dict and
# friends); older versions select keys by prefix and insert the adapter name into them on load, which would silently
# load nothing into zinit's parameters (their names carry no adapter name).
if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):  # pragma: no cover - depends on the environment
    raise ImportError(f"zinit.integrations.peft needs peft >= 0.21 (found {_peft.__version__}): pip install -U peft")

__all__ = ["NAME", "PREFIX", "ZinitConfig", "ZinitLayerStatus", "ZinitModel", "register"]

#: The method's name in peft's registry (``PeftType.ZINIT``).
NAME = "zinit"
#: peft's per-method prefix: the attribute that holds a layer's adapter is ``zinit_adapter``.
PREFIX = "zinit_"
#: A zinit parameter in a state dict (``...self_attn.zinit_adapter.prompt`` / ``.gate``).
_KEY = re.compile(rf"(?:^|\.){ADAPTER_ATTR}\.(?:prompt|gate)$")
#: What peft puts in front of the wrapped model's keys.
_WRAPPER = "base_model.model."


def _extend_peft_type(name: str) -> PeftType:
    """``PeftType[name]``, added to peft's enum first if this peft does not have it (as ``aenum.extend_enum``)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


ZINIT = _extend_peft_type(NAME.upper())


@dataclass
class ZinitConfig(PeftConfig):
    """The peft configuration of a zinit adapter: the options of :func:`zinit.inject`, which also checks them (a bad
    value is refused by ``get_peft_model`` with zinit's own message).

    Saved as ``adapter_config.json`` beside the weights (``"peft_type": "ZINIT"``, ``"layers"``, ``"K"``, ``"gate"``,
    ``"gate_fn"``, ``"gate_init"``, ``"backbone"`` and peft's common fields), and read back by
    ``PeftModel.from_pretrained``.

    The paper's gate ablations go through this door too (``gate="none"``, ``gate_init="random"``, as
    :func:`zinit.inject`); LLaMA-Adapter V2's bias/scale and norm tuning do not (they change base modules in place,
    which peft's ``disable_adapter()`` would not undo): use ``zinit.inject(..., bias_scale=True, train_norms=True)``
    and :func:`zinit.save_adapter` for those.

    Args:
        layers: an int L (the top L layers) or a list of layer indices (0 = bottom layer).
        K: prompt length (the paper uses 10).
        gate: ``"head"`` (one gate per query head, the paper), ``"layer"`` (one per layer, as peft's adaption prompt)
            or ``"none"`` (no gate: the prompt keys join the tokens' softmax, plain prefix attention).
        gate_fn: ``"tanh"`` (the paper) or ``"identity"`` (a raw gate). ``gate="layer", gate_fn="identity"`` with an
            int ``layers`` is the variant :func:`zinit.convert.to_peft` converts to stock peft's adaption prompt.
        gate_init: ``"zero"`` (the method: the adapted model starts as the base model) or ``"random"`` (the paper's
            random-init ablation; the drawn gate is saved with the prompts, so a loaded model computes what was saved).
        backbone: a zinit backbone name (``zinit.backbones()``) instead of detecting it from the model.

    >>> config = ZinitConfig(layers=2, K=10, task_type="CAUSAL_LM")
    >>> config.peft_type.value, config.gate, config.gate_fn, config.gate_init
    ('ZINIT', 'head', 'tanh', 'zero')
    """

    layers: int | list[int] | None = field(
        default=None, metadata={"help": "An int L (the top L layers) or a list of layer indices (0 = bottom)"}
    )
    K: int | None = field(default=None, metadata={"help": "Prompt length (the paper uses 10)"})
    gate: str = field(default="head", metadata={
        "help": "'head' (one gate per query head), 'layer' (one per layer) or 'none' (no gate: prefix attention)"})
    gate_fn: str = field(default="tanh", metadata={"help": "'tanh' (the paper) or 'identity' (a raw gate)"})
    gate_init: str = field(default="zero", metadata={"help": "'zero' (the method) or 'random' (the paper's ablation)"})
    backbone: str | None = field(default=None, metadata={"help": "zinit backbone name; None detects it from the model"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ZINIT
        if isinstance(self.layers, (tuple, range)):  # what JSON gives back, so a loaded config compares equal
            self.layers = list(self.layers)


class ZinitLayerStatus(nn.Module, BaseTunerLayer):
    """What peft's ``get_layer_status`` / ``get_model_status`` (and so ``PeftModel.disable_adapter()``) see of one
    adapted layer. zinit's own :class:`~zinit.LayerAdapter` is no peft layer; this stand-in holds no tensors and
    only reports the layer's state (enabled, the adapter's name, never merged). :class:`ZinitModel` makes one per
    adapted layer.

    >>> ZinitLayerStatus("default", "model.layers.2.self_attn")
    ZinitLayerStatus(model.layers.2.self_attn.zinit_adapter)
    """

    def __init__(self, adapter_name: str, module_name: str) -> None:
        nn.Module.__init__(self)
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.module_name = module_name

    def _get_available_adapters(self) -> set[str]:
        return set(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        pass  # holds no tensors (zinit creates the adapter on its layer's device)

    def extra_repr(self) -> str:
        return f"{self.module_name}.{ADAPTER_ATTR}"


class ZinitModel(BaseTuner):
    """peft's tuner for zinit: injects through :func:`zinit.inject` and keeps one adapter.

    Created by ``get_peft_model`` / ``PeftModel.from_pretrained``, not by hand. Beyond peft's ``BaseTuner`` it
    differs in what zinit cannot do: a second adapter name is refused (use :func:`zinit.add_adapter` for many
    adapters on one model), and ``merge_and_unload()`` / ``merge_adapter()`` raise, since a prompt attention is no
    weight delta. ``disable_adapter_layers()`` takes the adapters out of their attention modules until
    ``enable_adapter_layers()`` (what ``PeftModel.disable_adapter()`` calls): the model is then exactly the base model.

    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> tuner = get_peft_model(LlamaForCausalLM(cfg), ZinitConfig(layers=[0, 2], K=4)).base_model
    >>> type(tuner).__name__, tuner.targeted_module_names
    ('ZinitModel', ['model.layers.0.self_attn', 'model.layers.2.self_attn'])
    """

    prefix: str = PREFIX
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}
    _zinit_stash: list[tuple[nn.Module, nn.Module]] | None = None  # adapters taken out by disable_adapter_layers

    # ------------------------------------------------------------------ injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Inject the adapter ``adapter_name`` of ``self.peft_config`` with :func:`zinit.inject` (peft's hook)."""
        config = self.peft_config[adapter_name]
        others = [name for name in self.peft_config if name != adapter_name]
        if others:
            raise ValueError(
                f"zinit through peft holds one adapter per model, and this one already has {others}: cannot add "
                f"{adapter_name!r}. For several adapters on one frozen model use zinit.add_adapter(model, name, "
                "folder_or_layers) and zinit.use_adapters(model, names) (a different adapter per row of a batch)"
            )
        zinit.inject(model, config.layers, config.K, gate=config.gate, gate_fn=config.gate_fn,
                     gate_init=config.gate_init, backbone=config.backbone)
        names = {id(m): n for n, m in model.named_modules()}
        self.targeted_module_names = [names[id(m)] for m in self._attention_modules()]
        self.zinit_status = nn.ModuleList(ZinitLayerStatus(adapter_name, n) for n in self.targeted_module_names)
        if config.inference_mode:
            self._set_trainable(False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("ZinitModel injects through zinit.inject (inject_adapter), never module by module")

    def _attention_modules(self) -> list[nn.Module]:
        state = zinit.injection(self.model)
        modules = state.backbone.attention_modules(self.model)
        return [modules[n] for n in state.layers]

    def _set_trainable(self, requires_grad: bool) -> None:
        for p in zinit.trainable_parameters(self.model):
            p.requires_grad_(requires_grad)

    def _check_name(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"adapter {unknown or names} does not exist; this model has {list(self.peft_config)}")

    # ------------------------------------------------------------------ peft's adapter management

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` active (it is the only one); ``inference_mode=True`` freezes it."""
        self._check_name(adapter_name)
        if inference_mode:
            self._set_trainable(False)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch training of the adapter's prompts and gates on or off."""
        self._check_name(adapter_names)
        self._set_trainable(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if enabled and self._zinit_stash is not None:
            for attention, adapter in self._zinit_stash:
                attention.add_module(ADAPTER_ATTR, adapter)
            self._zinit_stash = None
        elif not enabled and self._zinit_stash is None:
            modules = self._attention_modules()
            self._zinit_stash = [(m, m._modules.pop(ADAPTER_ATTR)) for m in modules]
        for status in self._statuses():
            status._disable_adapters = not enabled

    def _statuses(self) -> list[ZinitLayerStatus]:
        return list(self._modules.get("zinit_status") or ())

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter (:func:`zinit.eject`); the wrapped model is the base model again."""
        self._check_name(adapter_name)
        self._unload()
        del self.peft_config[adapter_name]
        self.active_adapter = []

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(_NO_MERGE)

    def unmerge_adapter(self) -> None:
        raise ValueError(_NO_MERGE)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Refused: prompts cannot be merged into the base weights (see the error)."""
        raise ValueError(_NO_MERGE)

    def unload(self) -> nn.Module:
        """The base model, with everything zinit added removed (:func:`zinit.eject`) and its ``requires_grad``
        flags restored."""
        return self._unload()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: list[str] | None = None) -> nn.Module:
        if merge:
            raise ValueError(_NO_MERGE)
        return self._unload()

    def _unload(self) -> nn.Module:
        self._enable_adapter_layers(True)
        if zinit.is_injected(self.model):
            zinit.eject(self.model)
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        self.targeted_module_names = []
        self.zinit_status = nn.ModuleList()
        return self.model

    # ------------------------------------------------------------------ peft's state-dict hooks (classmethods)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]
                                ) -> dict[str, torch.Tensor]:
        """The prompts and gates among ``state_dict`` (peft's keys, ``...zinit_adapter.prompt`` / ``.gate``)."""
        out = {k: v for k, v in state_dict.items() if _KEY.search(k)}
        if not out:
            raise ValueError("no zinit prompts or gates in the model's state dict: saving inside "
                             "disable_adapter(), or after unload()? Save with the adapter in place")
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # zinit's parameter names carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check the checkpoint's prompts and gates against the model's, strictly (peft's own load ignores keys that
        do not fit); other entries pass through to peft."""
        expected = {k.removeprefix(_WRAPPER): v for k, v in model.state_dict().items() if _KEY.search(k)}
        given = {k.removeprefix(_WRAPPER): v for k, v in state_dict.items() if _KEY.search(k)}
        missing = [k for k in expected if k not in given]
        unexpected = [k for k in given if k not in expected]
        if missing or unexpected:
            raise KeyError(
                f"the checkpoint's zinit adapter does not fit this model's (layers={config.layers!r}, K={config.K}): "
                f"missing keys {_few(missing)}, unexpected keys {_few(unexpected)}; load it into the kind of base "
                "model it was trained on"
            )
        for key, target in expected.items():
            value = given[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, but this model's adapter "
                                 f"expects {tuple(target.shape)}: the adapter was trained on a model of other sizes")
        return state_dict


_NO_MERGE = ("a zinit adapter cannot be merged into the base weights: its prompts are K extra keys and values in a "
             "second, gated softmax of every adapted layer, not a weight delta. Keep the PeftModel (or "
             "zinit.save_adapter(peft_model.get_base_model(), folder) for zinit's own format), or call unload() for "
             "the base model without the adapter")


def _few(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]} (+{len(keys) - n} more)" if len(keys) > n else str(keys)


def register() -> None:
    """Register zinit with peft (``peft.utils.register_peft_method``); done on import, and idempotent.

    A second call does nothing; after a reload of this module (``importlib.reload``, IPython's autoreload) the new
    classes replace the old ones. Another package's method under the name ``"zinit"`` is an error.

    >>> from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    >>> register(); PEFT_TYPE_TO_CONFIG_MAPPING["ZINIT"] is ZinitConfig
    True
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    peft_type = _extend_peft_type(NAME.upper())
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if config_cls is ZinitConfig and tuner_cls is ZinitModel:
        return
    if config_cls is not None or tuner_cls is not None:
        if {getattr(c, "__module__", None) for c in (config_cls, tuner_cls) if c is not None} != {__name__}:
            owner = (config_cls or tuner_cls).__module__
            raise RuntimeError(f"peft already has a method named {NAME!r} (registered by {owner}); zinit cannot "
                               "register under that name")
        for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
                        PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)  # this module's earlier classes (a reload)
    register_peft_method(name=NAME, config_cls=ZinitConfig, model_cls=ZinitModel, prefix=PREFIX)


register()
