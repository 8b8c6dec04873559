"""Fine-tuning methods a recipe can train with, for ``zinit compare``: zinit and the methods the paper compares against.

A method is a :class:`Method` registered with :func:`register_method`: a ``prepare(model, ctx)`` that makes the
right parameters trainable (and returns the model, or a wrapper such as a peft model), and default base learning
rates by task (or by recipe). A method that cannot take a recipe's model raises :class:`NotApplicable` with the reason, which
``zinit compare`` reports as "n/a". Adding a method is one :func:`register_method` call (see README).

Built in: ``zinit``, and its two ablations ``zinit_random`` (the gate starts drawn at random instead of 0) and
``zinit_nogate`` (no gate: the prompt keys join the tokens' softmax, plain prefix attention with the same
parameters), which every recipe treats as zinit (its lr, its special cases: :func:`defaults_of`), as it treats
``zinit_v2`` (zinit plus LLaMA-Adapter V2's bias/scale on the blocks' linear layers and trained norms); through peft,
``lora`` (r=8 on the query and value projections), ``ia3``, ``prefix`` and ``prompt`` tuning and
``adaption_prompt`` (peft's LLaMA-Adapter); ``vpt`` (VPT-deep for timm ViTs, written here); ``bitfit`` (biases only),
``linear`` (the task head only) and ``full`` fine-tuning. Methods that add a task-specific
head train it too (``ctx.head``). This is the one registry of methods: ``zinit compare`` and the speed benchmark
(``zinit bench``) both prepare models through :func:`prepare`. peft's target modules come from peft's own defaults for
the model type, or from :data:`PEFT_TARGETS` where peft has none (timm ViTs).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from einops import repeat
from torch import nn

import zinit
from zinit.files import atomic_write, write_json
from zinit.errors import ZinitKeyError
from zinit.registry import Registry

SUMMARY_NAME = "summary.json"
NOT_APPLICABLE_NAME = "not_applicable.json"
#: Exit status of ``zinit train --method M`` when M cannot take the recipe's model.
NOT_APPLICABLE_EXIT = 3


class NotApplicable(Exception):
    """This method cannot take this model; the message says why."""


@dataclass
class MethodContext:
    """What a recipe tells a method: the recipe, the zinit-style depth/length settings and the task head."""

    recipe: str
    layers: int  #: adapt (or prompt) the top L layers where the method has such a setting
    K: int  #: prompt / virtual-token length where the method has one
    head: Sequence[str] = ()  #: names of new task-head submodules that every method trains
    #: "causal_lm", "image_classification", "question_answering" or "sequence_classification"
    task: str = "causal_lm"


@dataclass
class Method:
    """A registered fine-tuning method."""

    name: str
    prepare: Callable[[nn.Module, MethodContext], nn.Module]
    #: default base lr (lr = blr·batch/256) by recipe name or by task (:attr:`zinit.Recipe.task`), the name first;
    #: a recipe's own table wins over both (:meth:`zinit.Recipe.base_lr`)
    blr: dict[str, float] = field(default_factory=dict)
    description: str = ""
    #: the method this one is a variant of: recipes give it that method's defaults and special cases (its base lr in
    #: a recipe's own table, the embedded Alpaca run's lr, VTAB's lr grid, ScienceQA's image path), see
    #: :func:`defaults_of`
    variant_of: str | None = None
    #: zinit and its variants: the adapter they inject (its layers, K and task head are the run's, see
    #: :func:`zinit_method`); None for every other method
    adapter: zinit.AdapterConfig | None = None


#: The methods registry (the one registry type, :class:`zinit.Registry`): the built-in methods register below, a
#: user's own with :func:`register_method` from their file, which a ``zinit.methods`` entry point names so that every
#: process (``zinit compare`` runs each method in its own) imports it on first use of the registry.
METHODS: Registry[Method] = Registry("method", Method, group="zinit.methods",
                                     how_to_add="add one with register_method: README, 'Comparing methods'")


def register_method(method: Method, *, override: bool = False) -> Method:
    """Add a method (``override=True`` replaces one of the same name); returns it."""
    return METHODS.register(method, override=override)


def list_methods() -> list[str]:
    """Names of the registered methods, in the order they were registered."""
    return METHODS.names()


def get_method(name: str) -> Method:
    """The method registered as ``name``; a ValueError lists the registered names otherwise."""
    return METHODS.get(name)


def prepare(name: str, model: nn.Module, ctx: MethodContext) -> nn.Module:
    """Apply method ``name`` to ``model`` (raises :class:`NotApplicable` with the reason), then the one precision
    policy of every method (:func:`train_in_float32`)."""
    return train_in_float32(get_method(name).prepare(model, ctx))


#: Floating-point dtypes too coarse for the optimizer's small steps (a bf16 weight near 1 moves only in steps of
#: 2^-8, so most AdamW updates of a small lr round away).
LOW_PRECISION = (torch.bfloat16, torch.float16)
_COMPUTE_DTYPE = "_zinit_compute_dtype"  # a module's own dtype before its parameters were upcast
_AUTOCASTS = "_zinit_autocasts"  # the autocast contexts its forwards are in (a stack: a forward may recurse)


def train_in_float32(model: nn.Module) -> nn.Module:
    """Every method's precision policy: the parameters it trains are float32 master weights, whatever the base's dtype,
    and the model still computes in the base's dtype. Returns ``model``.

    On GPU causal LMs load in bf16 (:func:`zinit.lm.load_model`). zinit's prompts and gates, peft's LoRA/IA3
    adapters and prompt/prefix embeddings are created float32 already; full fine-tuning, BitFit and peft's adaption
    prompt would train the model's own bf16 tensors, and AdamW stepping a bf16 tensor rounds most small updates
    away (the run trains far fewer weights than its row says). Here each trainable parameter in a dtype of
    :data:`LOW_PRECISION` becomes float32 in place (the same Parameter object, so anything holding it sees the
    change), frozen parameters keep their dtype (the base's memory is unchanged), and each module that owns an
    upcast parameter, and every module above it, runs its forward under autocast to the dtype the parameter had. So
    the model computes in the base's dtype as the trainer's bf16 autocast has it compute on GPU (mixed-precision
    training with float32 master weights: the standard AMP recipe), and it runs wherever it is called from: the
    trainer, an evaluation without autocast, ``generate`` entering below a peft wrapper, a CPU. A model whose
    trainable parameters are float32 already (zinit, LoRA, ...; any float32 model) is left exactly as it is.
    """
    upcast: dict[int, torch.dtype] = {}
    for p in model.parameters():
        if p.requires_grad and p.dtype in LOW_PRECISION and id(p) not in upcast:
            upcast[id(p)] = p.dtype
            p.data = p.data.float()
    if not upcast:
        return model
    compute: dict[str, torch.dtype] = {}  # module name -> its compute dtype: the owners and their ancestors
    for name, module in model.named_modules():
        owned = [upcast[id(p)] for p in module.parameters(recurse=False) if id(p) in upcast]
        if owned:
            parts = name.split(".") if name else []
            for depth in range(len(parts), -1, -1):
                compute.setdefault(".".join(parts[:depth]), owned[0])
    for name, module in model.named_modules():
        if name in compute and _COMPUTE_DTYPE not in module.__dict__:
            module.__dict__[_COMPUTE_DTYPE] = compute[name]
            module.register_forward_pre_hook(_enter_autocast)
            module.register_forward_hook(_exit_autocast, always_call=True)
    return model


def _enter_autocast(module: nn.Module, _args: tuple) -> None:
    """Forward pre-hook of :func:`train_in_float32`: autocast to the module's original dtype on its device."""
    device = next(module.parameters()).device
    context = torch.autocast(device.type, dtype=module.__dict__[_COMPUTE_DTYPE])
    context.__enter__()
    module.__dict__.setdefault(_AUTOCASTS, []).append(context)


def _exit_autocast(module: nn.Module, _args: tuple, _output: Any) -> None:
    """Forward hook of :func:`train_in_float32` (always called, an exception included): leave that autocast."""
    stack = module.__dict__.get(_AUTOCASTS)
    if stack:
        stack.pop().__exit__(None, None, None)


def defaults_of(name: str) -> str:
    """The method whose defaults a recipe gives ``name``: its :attr:`Method.variant_of`, or itself.

    >>> defaults_of("zinit_random"), defaults_of("zinit_nogate"), defaults_of("lora")
    ('zinit', 'zinit', 'lora')
    """
    return get_method(name).variant_of or name


def is_zinit(name: str) -> bool:
    """Whether ``name`` is zinit or one of its variants (a recipe's zinit-only paths apply, e.g. ScienceQA's images)."""
    return defaults_of(name) == "zinit"


def zinit_config(name: str) -> zinit.AdapterConfig:
    """The :class:`~zinit.AdapterConfig` of zinit or a zinit variant (its options; a run sets the layers, K and task
    head), for a recipe that injects itself (ScienceQA, with its visual projection).

    >>> zinit_config("zinit") == zinit.AdapterConfig(), zinit_config("zinit_random").gate_init
    (True, 'random')
    >>> zinit_config("zinit_nogate").gate, zinit_config("zinit_v2").bias_scale, zinit_config("zinit_v2").train_norms
    ('none', 'blocks', True)
    """
    config = get_method(name).adapter
    if config is None:
        raise ValueError(f"method {name!r} does not inject zinit (zinit_config is for zinit and its variants)")
    return config


def recipe_blr(recipe: str, method: str, args: Any = None) -> float | None:
    """The default base lr of ``method`` on ``recipe`` (:meth:`zinit.Recipe.base_lr`), a variant looked up in the
    recipe's own table (and by the recipe's ``resolve_blr``) under the method it is a variant of."""
    return zinit.get_recipe(recipe).base_lr(defaults_of(method), get_method(method).blr, args)


def _family(model: nn.Module) -> str:
    try:
        return zinit.find_backbone(model).name
    except Exception:  # noqa: BLE001 - any model the registry does not know
        return type(model).__name__


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _train_heads(model: nn.Module, ctx: MethodContext) -> None:
    for name in ctx.head:
        model.get_submodule(name).requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# the methods


def _adapted_layers(model: nn.Module, ctx: MethodContext) -> int:
    """``--layers`` L, or every layer of a model with fewer (said on stderr: a sweep over L would otherwise show
    two values that trained the same thing)."""
    depth = zinit.find_backbone(model).dims(model).num_layers
    if ctx.layers > depth:
        print(f"note: --layers {ctx.layers} is more than the model's {depth} layers: adapting all {depth}",
              file=sys.stderr, flush=True)
    return min(ctx.layers, depth)


def _injecting(adapter: zinit.AdapterConfig) -> Callable[[nn.Module, MethodContext], nn.Module]:
    """The ``prepare`` of a zinit method: inject ``adapter`` with the run's layers (:func:`_adapted_layers`), K and
    task head."""

    def prepare_(model: nn.Module, ctx: MethodContext) -> nn.Module:
        config = adapter.replace(layers=_adapted_layers(model, ctx), K=ctx.K, train_modules=tuple(ctx.head))
        try:
            return zinit.inject(model, config)
        except ValueError as exc:  # a backbone or attention kernel that cannot join the prompt keys: say so
            if config.gate == "none" and str(exc).startswith("gate='none'"):
                raise NotApplicable(str(exc)) from None
            raise

    return prepare_


def zinit_method(name: str, adapter: zinit.AdapterConfig, description: str, **settings: Any) -> Method:
    """A zinit method (``adapter``: its options, declared once) at zinit's learning rates; every one but zinit itself
    is a variant of zinit (:attr:`Method.variant_of`).

    >>> zinit_method("zinit_layergate", zinit.AdapterConfig(gate="layer"), "one gate per layer").variant_of
    'zinit'
    """
    settings = {"blr": {_IMG: 1e-2, _QA: 1e-2}, "variant_of": None if name == "zinit" else "zinit", **settings}
    return Method(name, _injecting(adapter), description=description, adapter=adapter, **settings)


_PEFT_TASK = {"causal_lm": "CAUSAL_LM", "question_answering": "QUESTION_ANS", "sequence_classification": "SEQ_CLS",
              "image_classification": None}


#: Target modules of the peft methods for backbones peft has no defaults for: ``{backbone: {method: modules}}``.
#: timm ViTs: LoRA on the fused q/k/v projection, IA3 on it and the MLP output (:func:`register_peft_targets`).
PEFT_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "vit": {"lora": ("qkv",), "ia3": ("qkv", "fc2"), "ia3_feedforward": ("fc2",)},
}


def register_peft_targets(backbone: str, **targets: Sequence[str]) -> None:
    """Declare the modules peft's methods target on models of ``backbone`` (a family peft has no defaults for), e.g.
    ``register_peft_targets("mymodel", lora=["q_proj", "v_proj"], ia3=["k_proj", "v_proj", "down_proj"],
    ia3_feedforward=["down_proj"])``; a method not named keeps peft's defaults.

    >>> register_peft_targets("vit", lora=["qkv"])
    >>> PEFT_TARGETS["vit"]["lora"], PEFT_TARGETS["vit"]["ia3"]
    (('qkv',), ('qkv', 'fc2'))
    """
    PEFT_TARGETS.setdefault(backbone, {}).update({method: tuple(modules) for method, modules in targets.items()})


def _targets(model: nn.Module, method: str) -> list[str] | None:
    """Target modules of a peft method: what :data:`PEFT_TARGETS` declares for the model's backbone, else None,
    which lets peft pick its own defaults for the model type (and name the model type if it has none)."""
    try:
        backbone = zinit.find_backbone(model).name
    except ValueError:  # a model no backbone takes: peft's defaults, or its own error
        return None
    found = PEFT_TARGETS.get(backbone, {}).get(method)
    return None if found is None else list(found)


def _peft_class(name: str) -> Any:
    try:
        import peft
    except ImportError:
        raise NotApplicable("peft is not installed (pip install peft, or pip install -e .[test])") from None
    return getattr(peft, name)


def _peft(model: nn.Module, config: Any) -> nn.Module:
    _freeze(model)
    return _peft_class("get_peft_model")(model, config)


def _peft_targeted(model: nn.Module, config: Any) -> nn.Module:
    try:
        return _peft(model, config)
    except ValueError as exc:  # no default targets for this model type: peft says so
        if "target_modules" not in str(exc):
            raise
        raise NotApplicable(f"no {type(config).__name__} target modules known for {_family(model)}: {exc}") from None


def _lora(model: nn.Module, ctx: MethodContext) -> nn.Module:
    return _peft_targeted(model, _peft_class("LoraConfig")(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=_targets(model, "lora"),
        modules_to_save=list(ctx.head) or None, task_type=_PEFT_TASK[ctx.task]))


def _ia3_targets(model: nn.Module) -> tuple[list[str] | None, list[str] | None]:
    """IA3's target and feed-forward modules as the IA3 paper places them: keys, values and the FFN's inner activation
    (the input of the FFN's output layer). From :data:`PEFT_TARGETS` or peft's defaults for the model type,
    with one correction: peft's BERT/RoBERTa default ``output.dense`` also matches each attention block's output
    projection (``attention.output.dense``), whose input (the attention's context) the paper does not scale; a
    feed-forward match inside an attention module is dropped. Returns full module names, or (None, None) to let peft
    name the model type it has no defaults for."""
    targets, feedforward = _targets(model, "ia3"), _targets(model, "ia3_feedforward")
    if targets is None:
        from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                          TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets, feedforward = TARGETS.get(model_type), FEEDFORWARD.get(model_type)
        if targets is None:
            return None, None

    def matches(name: str, suffixes: Sequence[str]) -> bool:
        return any(name == t or name.endswith("." + t) for t in suffixes)

    def in_attention(name: str) -> bool:
        return any("attention" in part or part in ("attn", "self_attn") for part in name.split(".")[:-1])

    names = [n for n, _ in model.named_modules() if n and matches(n, targets)]
    ffn = [n for n in names if matches(n, feedforward or []) and not in_attention(n)]
    names = [n for n in names if not (matches(n, feedforward or []) and in_attention(n))]
    return names, ffn


def _ia3(model: nn.Module, ctx: MethodContext) -> nn.Module:
    targets, feedforward = _ia3_targets(model)
    return _peft_targeted(model, _peft_class("IA3Config")(
        target_modules=targets, feedforward_modules=feedforward,
        modules_to_save=list(ctx.head) or None, task_type=_PEFT_TASK[ctx.task]))


def _prompt_learning(kind: str) -> Callable[[nn.Module, MethodContext], nn.Module]:
    def prepare_(model: nn.Module, ctx: MethodContext) -> nn.Module:
        if _PEFT_TASK[ctx.task] is None:
            raise NotApplicable(f"peft's {kind} tuning needs a Hugging Face transformers model; "
                                f"{type(model).__name__} is not one (for a ViT use vpt)")
        if kind == "prompt" and ctx.task == "question_answering":
            raise NotApplicable("peft prompt tuning prepends K virtual tokens to a QA model's input, so its start/end "
                                "logits have T+K positions and every answer position is off by K")
        cls = _peft_class("PrefixTuningConfig" if kind == "prefix" else "PromptTuningConfig")
        model = _peft(model, cls(task_type=_PEFT_TASK[ctx.task], num_virtual_tokens=ctx.K))
        if kind == "prefix" and ctx.task == "question_answering":
            _accept_past_key_values(model)
        if ctx.task == "causal_lm":
            _generate_with_cache_argument(model)
        for name in ctx.head:  # peft trains a copy of a QA/classification head itself; any other head directly
            head = model.get_submodule(f"base_model.{name}")
            if not any(p.requires_grad for p in head.parameters()):
                head.requires_grad_(True)
        return model

    return prepare_


def _peft_cache_name() -> str:
    """The name under which the installed peft passes a cache to transformers and reads it back.

    peft up to 0.21 always says ``past_key_values``; peft 0.22 asks transformers and says ``cache`` from transformers
    5.24 on (``peft.import_utils.get_transformers_cache_name``). The two shims below bridge the rename only where
    peft still uses the old name: on a peft that knows the new one, they would hand it the name it no longer reads."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:  # peft <= 0.21
        return "past_key_values"
    return get_transformers_cache_name()


def _accept_past_key_values(peft_model: nn.Module) -> None:
    """Let peft's question-answering prefix tuning run on transformers >= 5.24.

    peft (0.21) passes the prefix to the encoder as ``past_key_values=`` and first checks that the encoder's
    ``forward`` signature names that argument; transformers 5.24 renamed it ``cache`` (still accepting the old name
    until 5.40), so the check refuses a model that would run. Where the encoder's forward takes ``cache`` and not
    ``past_key_values``, its instance gets a forward with an explicit ``past_key_values`` that passes it on as
    ``cache``: the computation is exactly what peft does on earlier transformers. A peft that itself passes ``cache``
    (0.22 with transformers >= 5.24) is left alone."""
    import inspect

    if _peft_cache_name() != "past_key_values":
        return
    name = getattr(peft_model, "transformer_backbone_name", None)
    if not name:
        return
    encoder = peft_model.base_model.get_submodule(name)
    params = inspect.signature(encoder.forward).parameters
    if "past_key_values" in params or "cache" not in params:
        return
    original = encoder.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    encoder.forward = forward


def _generate_with_cache_argument(peft_model: nn.Module) -> None:
    """Make peft's prompt learning (prefix and prompt tuning) generate with its virtual tokens on transformers >= 5.24.

    peft (0.21) reads and writes the generation cache under the name ``past_key_values`` in the inputs its
    ``prepare_inputs_for_generation`` gets from the model's; transformers 5.24 renamed that entry ``cache``. peft then
    never sees the cache, so it injects the prompt again at every step: prefix tuning's prefix goes in as
    ``past_key_values=`` beside generate's ``cache=`` and the model keeps ``cache``, dropping the prefix (the
    untuned model's output), and prompt tuning prepends its K virtual tokens again to every new token. Where the
    model's own preparation returns ``cache`` (and no ``past_key_values``), this instance's
    ``prepare_inputs_for_generation`` hands peft the cache under the old name and gives the model back the result
    under the new one: what peft does on earlier transformers. Training forwards are not concerned (peft's forward
    passes the prefix as ``past_key_values=``, which the model still accepts as ``cache`` until transformers 5.40).
    A peft that itself reads ``cache`` (0.22 with transformers >= 5.24) is left alone.
    """
    if _peft_cache_name() != "past_key_values":
        return
    cls_prepare = type(peft_model).prepare_inputs_for_generation

    def prepare_inputs_for_generation(*args: Any, **kwargs: Any) -> dict[str, Any]:
        model_prepare = peft_model.base_model_prepare_inputs_for_generation
        renamed = False

        def old_names(*a: Any, **kw: Any) -> dict[str, Any]:
            nonlocal renamed
            inputs = model_prepare(*a, **kw)
            if "cache" in inputs and "past_key_values" not in inputs:
                inputs["past_key_values"] = inputs.pop("cache")
                renamed = True
            return inputs

        peft_model.base_model_prepare_inputs_for_generation = old_names
        try:
            inputs = cls_prepare(peft_model, *args, **kwargs)
        finally:
            peft_model.base_model_prepare_inputs_for_generation = model_prepare
        if renamed and "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    peft_model.prepare_inputs_for_generation = prepare_inputs_for_generation


def _adaption_prompt(model: nn.Module, ctx: MethodContext) -> nn.Module:
    if _family(model) != "llama" or ctx.task != "causal_lm":
        raise NotApplicable("peft's adaption prompt supports LLaMA/Mistral causal LMs only")
    AdaptionPromptConfig = _peft_class("AdaptionPromptConfig")
    return _peft(model, AdaptionPromptConfig(adapter_len=ctx.K, adapter_layers=_adapted_layers(model, ctx),
                                             task_type="CAUSAL_LM"))


class VPTDeep(nn.Module):
    """VPT-deep (Jia et al. 2022): K learned tokens inserted after the class token at every block's input,
    replaced block by block. Initialised uniformly as VPT (xavier, fan = 3·patch² + C)."""

    def __init__(self, model: nn.Module, K: int) -> None:
        super().__init__()
        depth, width = len(model.blocks), model.embed_dim
        patch = model.patch_embed.patch_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.prompts = nn.Parameter(torch.empty(depth, K, width).uniform_(-bound, bound))
        self.K, self.prefix = K, getattr(model, "num_prefix_tokens", 1)

    def hook(self, index: int) -> Callable:
        def pre_hook(_block: nn.Module, args: tuple) -> tuple:
            x = args[0]
            prompt = repeat(self.prompts[index].to(x.dtype), "k c -> b k c", b=x.shape[0])
            # [class (and register) tokens | K prompt tokens | patches]; from block 1 on the previous block's K
            # prompt outputs are replaced (VPT-deep)
            rest = x[:, self.prefix:] if index == 0 else x[:, self.prefix + self.K:]
            return (torch.cat([x[:, :self.prefix], prompt, rest], dim=1), *args[1:])

        return pre_hook


def _vpt(model: nn.Module, ctx: MethodContext) -> nn.Module:
    if _family(model) != "vit":
        raise NotApplicable("VPT-deep inserts tokens into a timm ViT's blocks; this model is not a timm ViT")
    _freeze(model)
    vpt = VPTDeep(model, ctx.K)
    model.add_module("vpt", vpt)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(vpt.hook(i))
    _train_heads(model, ctx)
    return model


def _bitfit(model: nn.Module, ctx: MethodContext) -> nn.Module:
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if not biases:
        raise NotApplicable(f"{type(model).__name__} has no bias parameters (BitFit trains biases only)")
    _freeze(model)
    for p in biases:
        p.requires_grad_(True)
    _train_heads(model, ctx)
    return model


def _linear(model: nn.Module, ctx: MethodContext) -> nn.Module:
    if not ctx.head:
        raise NotApplicable("this recipe has no separate task head (a causal LM's head is its vocabulary projection)")
    _freeze(model)
    _train_heads(model, ctx)
    return model


def _full(model: nn.Module, ctx: MethodContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


#: Default base lrs by task (a recipe's :attr:`zinit.Recipe.task`), each tuned on the embedded demo of a recipe of
#: that task; a recipe may override one (:attr:`zinit.Recipe.blr`). zinit has none for causal LMs: the recipes' own
#: defaults are the official ones (Alpaca and ScienceQA 9e-3; the embedded Alpaca run 0.6).
_LM, _IMG, _QA = "causal_lm", "image_classification", "question_answering"
for _m in (
    zinit_method("zinit", zinit.AdapterConfig(), "zero-init gated prompts (this library)"),
    Method("lora", _lora, {_LM: 0.032, _IMG: 4e-3, _QA: 2e-3},
           "LoRA r=8 on the query/value projections (a timm ViT's fused qkv: keys too)"),
    Method("ia3", _ia3, {_LM: 0.1, _IMG: 1e-2, _QA: 1e-2},
           "IA3 on keys, values and the FFN's inner activation (a timm ViT's fused qkv: queries too)"),
    Method("prefix", _prompt_learning("prefix"), {_LM: 0.32, _QA: 1e-2}, "peft prefix tuning, K tokens"),
    Method("prompt", _prompt_learning("prompt"), {_LM: 1.0, _QA: 1e-2}, "peft prompt tuning, K tokens"),
    Method("adaption_prompt", _adaption_prompt, {_LM: 0.3}, "peft's LLaMA-Adapter (one gate per layer)"),
    Method("vpt", _vpt, {_IMG: 1e-2}, "VPT-deep: K learned tokens at every block (K fixed to the run's --K)"),
    Method("bitfit", _bitfit, {_LM: 0.032, _IMG: 4e-3, _QA: 2e-3}, "biases only"),
    Method("linear", _linear, {_IMG: 1e-2, _QA: 1e-2}, "the task head only"),
    Method("full", _full, {_LM: 6.4e-4, _IMG: 1e-4, _QA: 1e-4}, "every parameter"),
    # the paper's ablations, with zinit's lrs (only the gate differs); listed after the methods zinit is compared to
    zinit_method("zinit_random", zinit.AdapterConfig(gate_init="random"),
                 "zinit with the gate drawn at random, N(0, 1), instead of 0"),
    zinit_method("zinit_nogate", zinit.AdapterConfig(gate="none"),
                 "zinit's prompts without a gate, joined to the tokens' softmax (prefix attention)"),
    # LLaMA-Adapter V2's additions on top of zinit, at zinit's lrs
    zinit_method("zinit_v2", zinit.AdapterConfig(bias_scale=True, train_norms=True),
                 "zinit + LLaMA-Adapter V2: bias/scale on every block's linear layers, trained norms"),
):
    register_method(_m)


# ---------------------------------------------------------------------------------------------------------------
# what a recipe reads from a prepared model


def token_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits ``[B, T, V]`` of the input's own T tokens, whatever the method put before them.

    peft's prompt tuning prepends its K virtual tokens inside the model, so a forward on ``[B, T]`` ids returns
    ``[B, K + T, V]`` logits whose first K positions belong to no input token; every other method returns
    ``[B, T, V]``. Position ``t`` of the result is input token ``t`` for every method, so a recipe can index it with
    the input's attention mask (e.g. the last real token of a right-padded row is ``attention_mask.sum(1) - 1``).

    >>> token_logits(torch.zeros(2, 3 + 5, 7), torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 7])
    """
    T = input_ids.shape[1]
    if logits.dim() != 3 or logits.shape[0] != input_ids.shape[0] or logits.shape[1] < T:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not cover input ids of shape "
                         f"{tuple(input_ids.shape)}: expected [B, (virtual tokens +) T, vocab]; pass the logits of "
                         "a forward on these ids")
    return logits[:, logits.shape[1] - T:]


# ---------------------------------------------------------------------------------------------------------------
# what a recipe writes


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_trained(model: nn.Module, folder: str | Path, prompt_format: str | None = None) -> Path:
    """zinit: :func:`zinit.save_adapter` (recording ``prompt_format``, the format the recipe prompted it in). Other
    methods: their trainable tensors in ``trainable.safetensors``."""
    folder = Path(folder)
    if zinit.is_injected(model):
        return zinit.save_adapter(model, folder, command=sys.argv, prompt_format=prompt_format)
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    atomic_write(folder / "trainable.safetensors", lambda tmp: save_file(tensors, tmp))
    return folder


def load_trained(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load what :func:`save_trained` wrote back into the same prepared model (strict on names and shapes)."""
    folder = Path(folder)
    if zinit.is_injected(model):
        return zinit.load_adapter(model, folder)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / "trainable.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the weights zinit train --method M writes for methods other "
                                "than zinit)")
    try:
        saved = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} cannot be read as safetensors: {exc}; train again") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        raise ZinitKeyError(f"{folder / 'trainable.safetensors'} does not fit this model: missing "
                       f"{sorted(params.keys() - saved.keys())[:5]}, unexpected {sorted(saved.keys() - params.keys())[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return model


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float | None]:
    """Peak memory of this process in MiB, both kinds, labelled: ``gpu`` (CUDA ``max_memory_allocated`` on
    ``device``, None when it is not a GPU) and ``host`` (peak resident set size). Never one standing in for the other:
    on GPU a method's footprint is its GPU memory, while the host holds the process's libraries and data.

    >>> sorted(peak_memory_mb(torch.device("cpu"))), peak_memory_mb(torch.device("cpu"))["gpu"]
    (['gpu', 'host'], None)
    """
    gpu = (torch.cuda.max_memory_allocated(device) / 2**20
           if device is not None and device.type == "cuda" else None)
    return {"gpu": gpu, "host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def write_summary(out: str | Path, method: str, metrics: dict[str, float], trainable: int, adapter_dir: str | Path,
                  device: torch.device | None = None) -> None:
    """``summary.json``: what ``zinit compare`` tabulates for one method's run of a recipe."""
    adapter_dir = Path(adapter_dir)
    # the weights and their description, not the adapter card (README.md) beside them
    size = sum(p.stat().st_size for p in adapter_dir.rglob("*") if p.is_file() and p.suffix != ".md"
               ) if adapter_dir.exists() else 0
    write_json(Path(out) / SUMMARY_NAME, {"method": method, "metrics": metrics, "trainable_parameters": trainable,
                                          "adapter_bytes": size, "peak_memory_mb": peak_memory_mb(device)})  # {gpu, host}


def write_not_applicable(out: str | Path, method: str, reason: str) -> int:
    """Record that ``method`` cannot take the recipe's model; returns the exit status to use."""
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / NOT_APPLICABLE_NAME, {"method": method, "reason": reason})
    print(f"{method}: n/a ({reason})")
    return NOT_APPLICABLE_EXIT


def method_name(text: str) -> str:
    """argparse ``type=`` for ``--method``: a registered method's name."""
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(METHODS)}")
    return text


def add_method_arg(p: Any) -> None:
    """Add ``--method`` (checked against the registered methods) to a recipe's parser."""
    p.add_argument("--method", default="zinit", type=method_name,
                   help="fine-tuning method (default zinit): " + ", ".join(list_methods()) + " (see zinit compare)")
