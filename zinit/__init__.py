"""zinit: zero-init gated prompt attention (LLaMA-Adapter) for any transformer.

>>> import timm, zinit
>>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False), layers=4, K=10)
>>> sum(p.numel() for p in zinit.trainable_parameters(vit))  # 4·10·192 + 4·3
7692
"""

from . import convert, hub, quant
from .bank import adapter_names, adapter_parameters, remove_adapter, use_adapters
from ._version import __version__
from .inject import (
    Injection,
    adapter_state_dict,
    eject,
    inject,
    injection,
    is_injected,
    layer_adapters,
    load_adapter_state_dict,
    trainable_parameters,
    visual_features,
)
from .io import add_adapter, load_adapter, push_adapter, read_adapter_config, save_adapter
from .config import AdapterConfig, FittedConfig
from .prompts import LayerAdapter, VisualProjection, joint_prompt_kv, prompt_term
from .recipe import Recipe, get_recipe, list_recipes, register_recipe
from .registry import Backbone, Dims, Registry, find_backbone, get_backbone, list_backbones, register_backbone

__all__ = [
    "AdapterConfig",
    "Backbone",
    "Dims",
    "FittedConfig",
    "Injection",
    "LayerAdapter",
    "Recipe",
    "Registry",
    "VisualProjection",
    "__version__",
    "adapter_names",
    "adapter_parameters",
    "add_adapter",
    "adapter_state_dict",
    "convert",
    "hub",
    "quant",
    "eject",
    "find_backbone",
    "get_backbone",
    "get_recipe",
    "inject",
    "injection",
    "is_injected",
    "joint_prompt_kv",
    "layer_adapters",
    "list_backbones",
    "list_recipes",
    "load_adapter",
    "load_adapter_state_dict",
    "prompt_term",
    "push_adapter",
    "read_adapter_config",
    "register_backbone",
    "register_recipe",
    "remove_adapter",
    "save_adapter",
    "trainable_parameters",
    "use_adapters",
    "visual_features",
]
