"""zinit as a peft method: ``get_peft_model(model, ZinitConfig(layers=L, K=K))``.

Importing this module registers zinit with peft (``peft.utils.register_peft_method``, name ``"zinit"``, prefix
``"zinit_"``); from then on peft's own tools work on zinit adapters: ``get_peft_model``, ``print_trainable_parameters``,
``PeftModel.save_pretrained`` (``adapter_config.json`` with ``"peft_type": "ZINIT"`` and ``adapter_model.safetensors``
holding only the prompts and gates, under peft's keys ``base_model.model.<module path>.zinit_adapter.prompt`` /
``.gate``), ``PeftModel.from_pretrained`` / ``load_adapter``, ``disable_adapter()``, ``unload()``, and
``transformers.Trainer`` (adapter-only checkpoints, ``resume_from_checkpoint``).

transformers' own adapter methods work on a plain model too (``PreTrainedModel.load_adapter(folder)``,
``add_adapter(ZinitConfig(...))``, ``set_adapter``, ``disable_adapters`` / ``enable_adapters``, ``active_adapters``,
``get_adapter_state_dict``, ``delete_adapter``, ``save_pretrained``, and ``AutoModelForCausalLM.from_pretrained`` of an
adapter folder): each adapted layer carries a :class:`ZinitLayerStatus` (peft's ``BaseTunerLayer``, which those
methods look for) in the model's ``peft_zinit`` ModuleDict. transformers renames checkpoint keys on load with peft's
``build_peft_weight_mapping``, which puts the adapter's name after peft's prefix (``...zinit_adapter.default.prompt``);
zinit's parameters carry no adapter name, so this module wraps that function to leave zinit's keys as they are (other
methods' mappings are untouched). A prompt or gate the checkpoint does not fill (an adapter trained on another model)
is an error at the first forward, never a silently unadapted layer.

In a new process, import this module before loading: peft finds the config class by ``peft_type`` in the registry
this import fills, and has no hook to find it otherwise (without the import, peft stops with ``KeyError: 'ZINIT'``).
``save_pretrained`` therefore writes :data:`CARD_LINE` as the first line of the folder's ``README.md`` card.

The computation is literally zinit's: :class:`ZinitModel` calls :func:`zinit.inject` on the wrapped model, so
``zinit.adapter_state_dict(peft_model.get_base_model())`` and every other zinit function work on it too.

One adapter per model through this door: peft switches adapters by name, zinit's many-adapter serving
(:func:`zinit.add_adapter`, :func:`zinit.use_adapters`) picks them per row, and the two do not mix; a second
``add_adapter`` / ``load_adapter`` name is refused. Prompts cannot be merged into base weights: ``merge_and_unload()``
raises, ``unload()`` gives the base model back.

peft's (0.21, 0.22) ``register_peft_method`` accepts only names already in its ``PeftType`` enum, which has no public
way to grow; this module adds the member ``PeftType.ZINIT`` (value ``"ZINIT"``, what ``adapter_config.json`` stores) the way
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

import functools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zinit.errors import ZinitImportError, ZinitKeyError, ZinitStateError

try:
    import peft as _peft
    from peft import PeftConfig, PeftType
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import register_peft_method
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ZinitImportError("zinit.integrations.peft needs peft >= 0.21: pip install 'peft>=0.21'") from exc

import zinit
from zinit.prompts import ADAPTER_ATTR
from zinit.v2 import remove_hook

# peft >= 0.21 asks the tuner class which state-dict entries are its own (BaseTuner._get_adapter_state_dict and
# friends); older versions select keys by prefix and insert the adapter name into them on load, which would silently
# load nothing into zinit's parameters (their names carry no adapter name).
if not hasattr(BaseTuner, "_remap_adapter_state_dict_for_load"):  # pragma: no cover - depends on the environment
    raise ZinitImportError(f"zinit.integrations.peft needs peft >= 0.21 (found {_peft.__version__}): pip install -U peft")

__all__ = ["CARD_LINE", "NAME", "OPTIONS", "PREFIX", "STATUS_ATTR", "ZinitConfig", "ZinitLayerStatus", "ZinitModel",
           "register", "write_card_line"]

#: The method's name in peft's registry (``PeftType.ZINIT``).
NAME = "zinit"
#: peft's per-method prefix: the attribute that holds a layer's adapter is ``zinit_adapter``.
PREFIX = "zinit_"
#: The model's ``nn.ModuleDict`` of :class:`ZinitLayerStatus` (one per adapted layer, keyed by layer index). Its name
#: must not contain :data:`PREFIX`: ``PreTrainedModel.delete_adapter`` (peft's ``delete_adapter``) skips modules whose
#: path does.
STATUS_ATTR = "peft_zinit"
#: The first line of the body of the ``README.md`` card that ``save_pretrained`` writes beside a zinit adapter: peft
#: has no way to find zinit's config class in a process that has not imported this module.
CARD_LINE = ("**zinit adapter:** run `import zinit.integrations.peft` (`pip install zinit peft`) before "
             "`PeftModel.from_pretrained` or `model.load_adapter` on this folder; without that import peft stops with "
             "`KeyError: 'ZINIT'`.")
#: A zinit parameter in a state dict (``...self_attn.zinit_adapter.prompt`` / ``.gate``).
_KEY = re.compile(rf"(?:^|\.){ADAPTER_ATTR}\.(?:prompt|gate)$")
#: What peft puts in front of the wrapped model's keys.
_WRAPPER = "base_model.model."
#: Set on a :class:`ZinitConfig` by transformers' ``load_adapter`` (through :func:`_keep_zinit_keys`): the adapter
#: about to be injected gets its values from a checkpoint.
_FROM_CHECKPOINT = "_zinit_from_checkpoint"
#: The adapter card's file name (peft's and the Hub's).
_CARD = "README.md"


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


#: The :class:`~zinit.AdapterConfig` options a :class:`ZinitConfig` carries, as flat fields (peft's
#: ``adapter_config.json``): the ones a peft adapter can have (V2's bias/scale and norms, image features and task
#: heads change the model beyond what peft's ``disable_adapter()`` undoes).
OPTIONS = ("layers", "K", "gate", "gate_fn", "gate_init", "backbone")
_ADAPTER_FIELDS = {f.name: f for f in fields(zinit.AdapterConfig)}


def _option(name: str) -> Any:
    """The :class:`ZinitConfig` field of the :class:`~zinit.AdapterConfig` option ``name``: its default and help text
    (so the two cannot drift)."""
    return field(default=_ADAPTER_FIELDS[name].default, metadata={"help": _ADAPTER_FIELDS[name].metadata["help"]})


@dataclass
class ZinitConfig(PeftConfig):
    """The peft configuration of a zinit adapter: the options of an :class:`~zinit.AdapterConfig`
    (:attr:`adapter`), flat as peft stores them, with its defaults; :func:`zinit.inject` applies it (a bad value is
    refused by ``get_peft_model`` with zinit's own message).

    Saved as ``adapter_config.json`` beside the weights (``"peft_type": "ZINIT"``, ``"layers"``, ``"K"``, ``"gate"``,
    ``"gate_fn"``, ``"gate_init"``, ``"backbone"`` and peft's common fields), and read back by
    ``PeftModel.from_pretrained``.

    The paper's gate ablations go through this door too (``gate="none"``, ``gate_init="random"``, as
    :func:`zinit.inject`); LLaMA-Adapter V2's bias/scale and norm tuning do not (they change base modules in place,
    which peft's ``disable_adapter()`` would not undo): use ``zinit.inject(..., bias_scale=True, train_norms=True)``
    and :func:`zinit.save_adapter` for those.

    Args (the :class:`~zinit.AdapterConfig` fields of :data:`OPTIONS`, with their defaults):
        layers: an int L (the top L layers), a list of layer indices (0 = bottom layer), or None (every layer).
        K: prompt length (the paper uses 10).
        gate: ``"head"`` (one gate per query head, the paper), ``"layer"`` (one per layer, as peft's adaption prompt)
            or ``"none"`` (no gate: the prompt keys join the tokens' softmax, plain prefix attention).
        gate_fn: ``"tanh"`` (the paper) or ``"identity"`` (a raw gate). ``gate="layer", gate_fn="identity"`` with an
            int ``layers`` is the variant :func:`zinit.convert.to_peft` converts to stock peft's adaption prompt.
        gate_init: ``"zero"`` (the method: the adapted model starts as the base model) or ``"random"`` (the paper's
            random-init ablation; the drawn gate is saved with the prompts, so a loaded model computes what was saved).
        backbone: a zinit backbone name (``zinit.list_backbones()``) instead of detecting it from the model.

    >>> config = ZinitConfig(layers=2, K=10, task_type="CAUSAL_LM")
    >>> config.peft_type.value, config.gate, config.gate_fn, config.gate_init
    ('ZINIT', 'head', 'tanh', 'zero')
    >>> config.adapter == zinit.AdapterConfig(layers=2, K=10)
    True
    """

    layers: int | list[int] | None = _option("layers")
    K: int = _option("K")
    gate: str = _option("gate")
    gate_fn: str = _option("gate_fn")
    gate_init: str = _option("gate_init")
    backbone: str | None = _option("backbone")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ZINIT
        if isinstance(self.layers, (tuple, range)):  # what JSON gives back, so a loaded config compares equal
            self.layers = list(self.layers)

    @property
    def adapter(self) -> zinit.AdapterConfig:
        """The :class:`~zinit.AdapterConfig` these fields describe (checked as any config is when made)."""
        return zinit.AdapterConfig(**{name: getattr(self, name) for name in OPTIONS})

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """peft's ``save_pretrained`` (``adapter_config.json``), then :func:`write_card_line`: the folder's
        ``README.md`` card says in its first line that loading needs ``import zinit.integrations.peft``.

        ``PeftModel.save_pretrained`` and transformers' ``save_pretrained`` of a model with an adapter both call this.

        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> ZinitConfig(layers=2, K=10).save_pretrained(folder)
        >>> open(f"{folder}/README.md").read().split("---")[2].strip().splitlines()[0] == CARD_LINE
        True
        """
        super().save_pretrained(save_directory, **kwargs)
        write_card_line(save_directory)


def write_card_line(folder: str | os.PathLike[str]) -> Path:
    """Make :data:`CARD_LINE` the first line of the body of ``folder/README.md`` (after its YAML metadata) and add
    the tag ``zinit``; a folder without a card gets a short one. Idempotent; returns the card's path.

    peft reads an adapter's ``adapter_config.json`` and looks its ``peft_type`` up in a registry that only an import
    of this module fills; peft offers no hook (no entry point, no field read before that look-up) through which a
    process that never imported zinit could find it. The card is where a person (or the Hub page) sees the fix.

    >>> import tempfile
    >>> path = write_card_line(write_card_line(tempfile.mkdtemp()).parent)
    >>> from huggingface_hub import ModelCard
    >>> card = ModelCard.load(path)
    >>> card.text.strip().splitlines()[0] == CARD_LINE, card.text.count(CARD_LINE), card.data.tags
    (True, 1, ['zinit'])
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(folder) / _CARD
    if path.is_file():
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='peft').to_yaml()}\n---\n")
    body = [line for line in card.text.splitlines() if line.strip() != CARD_LINE]
    while body and not body[0].strip():
        body.pop(0)
    card.text = "\n" + "\n".join([CARD_LINE, "", *body]).rstrip("\n") + "\n"
    tags = list(card.data.tags or [])
    if NAME not in tags:
        card.data.tags = sorted([*tags, NAME])
    card.save(path)
    return path


class ZinitLayerStatus(nn.Module, BaseTunerLayer):
    """peft's view of one adapted layer: the ``BaseTunerLayer`` that peft's and transformers' adapter methods look
    for in the model (``set_adapter``, ``enable_adapters`` / ``disable_adapters``, ``active_adapters``,
    ``delete_adapter``, ``requires_grad_`` after a load, ``get_layer_status``), acting on zinit's
    :class:`~zinit.LayerAdapter` of that layer. It holds no tensors, so the model's state dict does not change.

    Disabled (``enable_adapters(False)``), or not among the active adapters (``set_adapter`` of other names), the
    layer's adapter is out of its attention module (the module's ``zinit_adapter`` entry is None: the layer computes
    what the base model computes) and kept here until it is enabled again. Entries are replaced, never added or
    removed, so this is safe inside the ``named_modules()`` loop that calls it.

    :class:`ZinitModel` makes one per adapted layer, in the model's ``peft_zinit`` ModuleDict (keyed by layer index).

    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = get_peft_model(LlamaForCausalLM(cfg), ZinitConfig(layers=[0, 2], K=4)).get_base_model()
    >>> status = model.peft_zinit["2"]
    >>> status
    ZinitLayerStatus(model.layers.2.self_attn.zinit_adapter, adapter='default')
    >>> status.enable_adapters(False)
    >>> model.model.layers[2].self_attn.zinit_adapter is None, status.adapter is not None
    (True, True)
    """

    def __init__(self, adapter_name: str, module_name: str, attention: nn.Module, model: nn.Module) -> None:
        nn.Module.__init__(self)
        self._active_adapter: str | list[str] = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.adapter_name = adapter_name
        self.module_name = module_name
        self.deleted = False
        # plain references, not submodules: both belong to the model already
        self.__dict__["_attention"] = attention
        self.__dict__["_model"] = model
        self.__dict__["_stash"] = None  # the layer's adapter while it is out of its attention module

    @property
    def adapter(self) -> nn.Module | None:
        """The layer's :class:`~zinit.LayerAdapter` (in its attention module or kept here), None once deleted."""
        if self.deleted:
            return None
        live = self._attention._modules.get(ADAPTER_ATTR)
        return live if live is not None else self._stash

    def _get_available_adapters(self) -> set[str]:
        return set() if self.deleted else {self.adapter_name}

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        pass  # holds no tensors (zinit creates the adapter on its layer's device)

    def enable_adapters(self, enabled: bool) -> None:
        """Put the layer's adapter back (``True``, if its name is active) or take it out (``False``)."""
        self._disable_adapters = not enabled
        self._sync()

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``: this layer's adapter computes if its name is among them (trainable unless
        ``inference_mode``, as peft's layers), and is out of the model otherwise."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapter = names
        self._sync()
        self._set_requires_grad(self.adapter_name in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Deleting the adapter removes it from the whole model (:func:`zinit.eject`): the base model is back."""
        if adapter_name == self.adapter_name and not self.deleted:
            _remove(self._model, purge=False)

    def requires_grad_(self, requires_grad: bool = True) -> ZinitLayerStatus:
        """Train (or freeze) the layer's prompt and gate; transformers' ``load_adapter`` freezes the adapter so."""
        self._set_requires_grad(requires_grad)
        return self

    def _set_requires_grad(self, requires_grad: bool) -> None:
        adapter = self.adapter
        if adapter is not None:
            for p in adapter.parameters():
                p.requires_grad_(requires_grad)

    def _sync(self) -> None:
        """Put the adapter in or out of its attention module, as the enabled flag and the active names say."""
        if self.deleted:
            return
        modules = self._attention._modules
        live = modules.get(ADAPTER_ATTR)
        if self._disable_adapters or self.adapter_name not in self.active_adapters:
            if live is not None:
                self.__dict__["_stash"] = live
                modules[ADAPTER_ATTR] = None
        elif live is None and self._stash is not None:
            modules[ADAPTER_ATTR] = self._stash
            self.__dict__["_stash"] = None

    def extra_repr(self) -> str:
        return f"{self.module_name}.{ADAPTER_ATTR}, adapter={self.adapter_name!r}" + (", deleted" if self.deleted
                                                                                     else "")


def _statuses(model: nn.Module) -> list[ZinitLayerStatus]:
    container = model._modules.get(STATUS_ATTR)
    return [s for s in container.values() if isinstance(s, ZinitLayerStatus)] if container is not None else []


def _ours(model: nn.Module) -> bool:
    """Whether ``model.peft_zinit`` is this module's (a ModuleDict of statuses, or the None a deletion left)."""
    if STATUS_ATTR not in model._modules:
        return False
    container = model._modules[STATUS_ATTR]
    return container is None or (isinstance(container, nn.ModuleDict)
                                 and all(isinstance(s, ZinitLayerStatus) for s in container.values()))


def _remove(model: nn.Module, *, purge: bool) -> None:
    """Remove the peft adapter from ``model``: every layer's adapter back in place, then :func:`zinit.eject`, then the
    statuses (``purge``) or, inside a ``named_modules()`` loop (transformers' ``delete_adapter``), only marked deleted
    with the ModuleDict's entry set to None (replacing an entry is safe there, removing one is not)."""
    for status in _statuses(model):
        status._disable_adapters = False
        status._active_adapter = [status.adapter_name]
        status._sync()
    remove_hook(model, _check_loaded, pre=True)
    if zinit.is_injected(model):
        zinit.eject(model)
    for status in _statuses(model):
        status.deleted = True
        status._active_adapter = []
    if STATUS_ATTR in model._modules:
        if purge:
            delattr(model, STATUS_ATTR)
        else:
            model._modules[STATUS_ATTR] = None


def _check_loaded(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a model whose zinit adapter transformers' ``load_adapter`` filled: every prompt and gate
    must have got a value (they wait on the meta device until then); then the hook removes itself."""
    missing = [f"{s.module_name}.{ADAPTER_ATTR}.{name}" for s in _statuses(model) if s.adapter is not None
               for name, p in s.adapter.named_parameters() if p.is_meta]
    if missing:
        state = zinit.injection(model)
        raise ValueError(
            f"the zinit adapter that model.load_adapter(...) loaded has no value for {_few(missing)}: the checkpoint "
            "holds no tensor of that name and shape (the keys it held instead are the unexpected_keys / "
            "mismatched_keys of what load_adapter returned, and of transformers' load report). It was trained on "
            f"another model: this one gets layers {list(state.layers)} with K={state.K} and hidden size "
            f"{state.dims.hidden_size}. Load it into the base model it was trained on "
            "(PeftModel.from_pretrained(model, folder) names every key that does not fit)"
        )
    remove_hook(model, _check_loaded, pre=True)


class ZinitModel(BaseTuner):
    """peft's tuner for zinit: injects through :func:`zinit.inject` and keeps one adapter.

    Created by ``get_peft_model`` / ``PeftModel.from_pretrained`` (or by transformers' ``load_adapter`` /
    ``add_adapter`` through peft's ``inject_adapter_in_model``), not by hand. Beyond peft's ``BaseTuner`` it differs in
    what zinit cannot do: a second adapter name is refused (use :func:`zinit.add_adapter` for many adapters on one
    model), and ``merge_and_unload()`` / ``merge_adapter()`` raise, since a prompt attention is no weight delta.
    ``disable_adapter_layers()`` takes the adapters out of their attention modules until ``enable_adapter_layers()``
    (what ``PeftModel.disable_adapter()`` calls): the model is then exactly the base model.

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

    # ------------------------------------------------------------------ injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Inject the adapter ``adapter_name`` of ``self.peft_config`` with :func:`zinit.inject` (peft's hook), and
        give each adapted layer its :class:`ZinitLayerStatus`."""
        config = self.peft_config[adapter_name]
        from_checkpoint = bool(config.__dict__.pop(_FROM_CHECKPOINT, False))
        try:
            others = [name for name in self.peft_config if name != adapter_name]
            if others:
                raise ValueError(
                    f"zinit through peft holds one adapter per model, and this one already has {others}: cannot add "
                    f"{adapter_name!r}. For several adapters on one frozen model use zinit.add_adapter(model, name, "
                    "folder_or_layers) and zinit.use_adapters(model, names) (a different adapter per row of a batch)"
                )
            if hasattr(model, STATUS_ATTR) and not _ours(model):
                raise ZinitStateError(f"the model already has an attribute {STATUS_ATTR!r}; zinit's peft method needs "
                                   "that name")
            zinit.inject(model, config.adapter)
        except BaseException:
            # transformers' load_adapter / add_adapter go through a fresh tuner whose peft_config is the model's own
            # dict: take the refused name out of it again (PeftModel.add_adapter does the same for its copy)
            if self.peft_config.get(adapter_name) is config:
                del self.peft_config[adapter_name]
            raise
        state = zinit.injection(model)
        modules = self._attention_modules()
        names = {id(m): n for n, m in model.named_modules()}
        self.targeted_module_names = [names[id(m)] for m in modules]
        statuses = nn.ModuleDict({str(n): ZinitLayerStatus(adapter_name, names[id(m)], m, model)
                                  for n, m in zip(state.layers, modules)})
        if STATUS_ATTR in model._modules:
            delattr(model, STATUS_ATTR)  # what a deleted adapter left (see _remove)
        model.add_module(STATUS_ATTR, statuses)
        if from_checkpoint:
            # transformers loads the values next; a prompt or gate it finds none for stays on the meta device and
            # _check_loaded refuses the first forward (its load report only warns about unexpected keys)
            for status in statuses.values():
                status.adapter.to("meta")
            model.register_forward_pre_hook(_check_loaded, prepend=True)
        if config.inference_mode:
            self._set_trainable(False)

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("ZinitModel injects through zinit.inject (inject_adapter), never module by module")

    def _attention_modules(self) -> list[nn.Module]:
        state = zinit.injection(self.model)
        modules = state.backbone.attention_modules(self.model)
        return [modules[n] for n in state.layers]

    def _set_trainable(self, requires_grad: bool) -> None:
        for status in _statuses(self.model):
            status._set_requires_grad(requires_grad)

    def _check_name(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"adapter {unknown or names} does not exist; this model has {list(self.peft_config)}")

    # ------------------------------------------------------------------ peft's adapter management

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` active (it is the only one): trainable, or frozen with ``inference_mode=True``."""
        self._check_name(adapter_name)
        for status in _statuses(self.model):
            status.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch training of the adapter's prompts and gates on or off."""
        self._check_name(adapter_names)
        self._set_trainable(requires_grad)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for status in _statuses(self.model):
            status.enable_adapters(enabled)

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
        _remove(self.model, purge=True)
        if "peft_config" in self.model.__dict__:
            del self.model.peft_config
        self.targeted_module_names = []
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
                             "disable_adapter() / disable_adapters(), or after unload() / delete_adapter()? Save with "
                             "the adapter in place")
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
            raise ZinitKeyError(
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


# ---------------------------------------------------------------------------------------------------------------
# transformers' load_adapter


def _renames_into_adapter_name(transform: Any, adapter_name: str) -> bool:
    """Whether ``transform`` is the renaming peft's ``build_peft_weight_mapping`` adds for zinit's prefix
    (``(zinit_[^.]*)`` -> ``\\1.<adapter name>``)."""
    from transformers.core_model_loading import WeightRenaming

    return (isinstance(transform, WeightRenaming)
            and any(PREFIX in source for source in transform.source_patterns)
            and all(target.endswith(f".{adapter_name}") for target in transform.target_patterns))


def _keep_zinit_keys(build: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    """peft's ``build_peft_weight_mapping`` (the key renamings transformers' ``load_adapter`` applies to a
    checkpoint), without the one that would put the adapter's name into zinit's keys, for a :class:`ZinitConfig`;
    unchanged for every other method. Also marks the config: the adapter injected next is filled from a checkpoint."""

    @functools.wraps(build)
    def build_peft_weight_mapping(weight_conversions: Any, adapter_name: str, peft_config: Any = None
                                  ) -> list[Any]:
        mapping = build(weight_conversions, adapter_name, peft_config=peft_config)
        if getattr(peft_config, "peft_type", None) != ZINIT:
            return mapping
        peft_config.__dict__[_FROM_CHECKPOINT] = True
        return [t for t in mapping if not _renames_into_adapter_name(t, adapter_name)]

    build_peft_weight_mapping._zinit = True  # type: ignore[attr-defined]
    return build_peft_weight_mapping


def _route_transformers_loading() -> None:
    """Wrap peft's ``build_peft_weight_mapping`` with :func:`_keep_zinit_keys` (once; a reload wraps the original
    again). transformers imports it from its module at each ``load_adapter`` call, so the wrapper is what it gets."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # pragma: no cover - transformers < 5 renames no keys on load
        return
    build = conversion.build_peft_weight_mapping
    while getattr(build, "_zinit", False):
        build = build.__wrapped__
    conversion.build_peft_weight_mapping = _keep_zinit_keys(build)


def register() -> None:
    """Register zinit with peft (``peft.utils.register_peft_method``), and route transformers' ``load_adapter`` key
    renaming around zinit's keys (see the module's docstring); done on import, and idempotent.

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

    _route_transformers_loading()
    peft_type = _extend_peft_type(NAME.upper())
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if config_cls is ZinitConfig and tuner_cls is ZinitModel:
        return
    if config_cls is not None or tuner_cls is not None:
        if {getattr(c, "__module__", None) for c in (config_cls, tuner_cls) if c is not None} != {__name__}:
            owner = (config_cls or tuner_cls).__module__
            raise ZinitStateError(f"peft already has a method named {NAME!r} (registered by {owner}); zinit cannot "
                               "register under that name")
        for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
                        PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)  # this module's earlier classes (a reload)
    register_peft_method(name=NAME, config_cls=ZinitConfig, model_cls=ZinitModel, prefix=PREFIX)


register()
