"""Any Hugging Face transformers model whose attention dispatches through ``AttentionInterface``: GPT-2, GPT-NeoX,
Phi, Phi-3, Gemma 1/2/3, Qwen3, OLMo 2, StarCoder2, CLIP towers, the BERT-likes and many more (README, "Supported
backbones", lists what the coverage sweep measured).

Generic (:mod:`zinit.hfauto`): the layer stack and each layer's self-attention module are found by introspection,
and the prompt keys and values come out of the layer's own attention forward at position 0, with the rotary of that
layer's own type (RoPE rotates nothing there; YaRN's attention scale is kept), so they go through exactly the key path
the tokens go through (fused projections, biases, key norms) minus the rotation. A model it cannot adapt exactly is
refused with the reason (e.g. a layer that mixes a sequence's rows before its attention, so no prompt row has a key of
its own). The specific backbones (``llama``,
``roberta``) win where they match; this one is consulted only when none does.
"""

from __future__ import annotations

from torch import nn

from zinit import hfauto
from zinit.registry import Backbone, register_backbone


def _is_transformers_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


register_backbone(
    Backbone(
        name="hf",
        matches=_is_transformers_model,
        attention_modules=hfauto.attention_modules,
        dims=hfauto.dims,
        project=hfauto.project,
        install=hfauto.install,
        uninstall=hfauto.uninstall,
        description="any Hugging Face model whose attention goes through AttentionInterface (found by introspection)",
        generic=True,
        joint_softmax=True,  # gate='none': zinit.hf joins the prompt keys (sdpa, eager)
    )
)
