"""LLaMA family on Hugging Face transformers: LLaMA 1/2/3, Mistral, Qwen2 (and SmolLM2, which is a LLaMA).

Hooked through transformers' AttentionInterface (``zinit.hf``): the layer's query arrives already rotated by RoPE,
the prompt keys come straight from ``k_proj(prompt)`` and carry no position. Grouped-query attention: the prompt
has ``num_key_value_heads`` key/value heads, shared by query heads exactly as the token keys are. KV-cached
``generate()`` needs nothing special: the prompt term depends only on the current queries.
"""

from __future__ import annotations

from torch import Tensor, nn

from zinit import hf
from zinit.registry import Backbone, Dims, register_backbone

MODEL_TYPES = ("llama", "mistral", "qwen2")


def _matches(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    # a RoPE variant that scales attention (YaRN) scales the keys of every position: the generic backbone, which
    # projects prompts at position 0 with the model's own rotary, takes those models
    plain = getattr(getattr(base, "rotary_emb", None), "attention_scaling", 1.0) == 1.0
    return getattr(config, "model_type", None) in MODEL_TYPES and hasattr(base, "layers") and plain


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.base_model.layers]


def _dims(model: nn.Module) -> Dims:
    c = model.config
    attn = model.base_model.layers[0].self_attn
    return Dims(
        hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=attn.head_dim,
        num_layers=len(model.base_model.layers),
    )


def _project(attn: nn.Module, prompt: Tensor) -> tuple[Tensor, Tensor]:
    def heads(x: Tensor) -> Tensor:  # "... k (h d) -> ... h k d", a view
        return x.unflatten(-1, (-1, attn.head_dim)).transpose(-2, -3)

    return heads(attn.k_proj(prompt)), heads(attn.v_proj(prompt))


register_backbone(
    Backbone(
        name="llama",
        matches=_matches,
        attention_modules=_attention_modules,
        dims=_dims,
        project=_project,
        install=hf.install,
        uninstall=hf.uninstall,
        description="Hugging Face LLaMA / Mistral / Qwen2 (causal LM or base model), GQA and RoPE",
        joint_softmax=True,  # gate='none': zinit.hf joins the prompt keys (sdpa, eager)
    )
)
