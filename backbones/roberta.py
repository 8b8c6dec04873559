"""BERT and RoBERTa on Hugging Face transformers (``*Model`` and every ``*For*`` head).

Hooked through transformers' AttentionInterface (``zinit.hf``) on each layer's self-attention
(``encoder.layer[n].attention.self``, separate ``query``/``key``/``value`` linears). The padding mask applies to
token keys only; prompt keys are seen by every token, padding or not. Cross-attention modules (decoder configs)
carry no adapter and are left as they are.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from zinit import hf
from zinit.registry import Backbone, Dims, register_backbone

MODEL_TYPES = ("bert", "roberta")


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.encoder.layer


def _matches(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in MODEL_TYPES and hasattr(
        getattr(model, "base_model", None), "encoder"
    )


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.attention.self for layer in _encoder_layers(model)]


def _dims(model: nn.Module) -> Dims:
    c = model.config
    attn = _encoder_layers(model)[0].attention.self
    return Dims(
        hidden_size=c.hidden_size,
        num_heads=attn.num_attention_heads,
        num_kv_heads=attn.num_attention_heads,
        head_dim=attn.attention_head_size,
        num_layers=len(_encoder_layers(model)),
    )


def _project(attn: nn.Module, prompt: Tensor) -> tuple[Tensor, Tensor]:
    def heads(x: Tensor) -> Tensor:
        return rearrange(x, "... k (h d) -> ... h k d", h=attn.num_attention_heads)

    return heads(attn.key(prompt)), heads(attn.value(prompt))


register_backbone(
    Backbone(
        name="roberta",
        matches=_matches,
        attention_modules=_attention_modules,
        dims=_dims,
        project=_project,
        install=hf.install,
        uninstall=hf.uninstall,
        description="Hugging Face BERT / RoBERTa (base model and every task head), padding mask on tokens only",
        joint_softmax=True,  # gate='none': zinit.hf joins the prompt keys (sdpa, eager)
    )
)
