"""timm Vision Transformers: ``VisionTransformer`` of any size and its subclasses (DeiT, distilled DeiT).

timm's ``Attention`` computes q, k, v with one fused ``qkv`` linear and calls SDPA itself, so there is no
dispatch point to hook: the adapted blocks' attention modules become instances of a subclass (``ZinitAttention``,
undone by eject) whose forward, :func:`_zinit_forward`, is timm's forward with the gated prompt term added to the
attention output before ``norm``/``proj``. Prompt keys/values are the k and v slices of the fused ``qkv`` applied to
the prompt (with the layer's ``k_norm``, Identity unless the model uses qk-norm). Bidirectional: no mask on the
prompt part. ``gate="none"``: the prompt keys/values go before the tokens' and timm's own attention (SDPA or eager)
runs one softmax over both, any ``attn_mask`` widened by K columns every query sees.
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from zinit.attention import joint_mask
from zinit.prompts import joint_prompt_kv, prompt_term
from zinit.registry import Backbone, Dims, register_backbone
from zinit.v2 import apply_bias_scale, bias_scale_of


def _matches(model: nn.Module) -> bool:
    if "timm" not in sys.modules:  # a model can only be a timm ViT if timm is loaded
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [block.attn for block in model.blocks]


def _dims(model: nn.Module) -> Dims:
    attn = model.blocks[0].attn
    return Dims(
        hidden_size=attn.qkv.in_features,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_heads,
        head_dim=attn.head_dim,
        num_layers=len(model.blocks),
    )


def _project(attn: nn.Module, prompt: Tensor) -> tuple[Tensor, Tensor]:
    width = attn.num_heads * attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(prompt, weight[width:], None if bias is None else bias[width:])  # the k and v thirds of qkv
    bias_scale = bias_scale_of(attn.qkv)
    if bias_scale is not None:  # LLaMA-Adapter V2's bias/scale on qkv (zinit.inject(bias_scale=True)): its k, v thirds
        kv = apply_bias_scale(kv, bias_scale, slice(width, None))
    key, value = rearrange(kv, "... k (two h d) -> two ... h k d", two=2, h=attn.num_heads)
    return attn.k_norm(key), value


def _token_attention(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    """timm's own token attention, fused (SDPA) or eager as the module is configured."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0, is_causal=is_causal
        )
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    scores = (q * attn.scale) @ k.transpose(-2, -1)
    scores = maybe_add_mask(scores, resolve_self_attn_mask(q.shape[-2], scores, attn_mask, is_causal))
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


def _zinit_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``Attention.forward`` plus the gated prompt term (docs/design.md §1)."""
    B, N, _ = x.shape
    out_gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    joint = joint_prompt_kv(self, q)
    if joint is not None:  # gate="none": one softmax over [prompt; tokens]
        attn_mask = joint_mask(attn_mask, joint[0].shape[-2], N, N, is_causal, q.device)
        k, v = torch.cat([joint[0].to(k.dtype), k], dim=-2), torch.cat([joint[1].to(v.dtype), v], dim=-2)
        out = _token_attention(self, q, k, v, attn_mask, False)
    else:
        out = _token_attention(self, q, k, v, attn_mask, is_causal)
        term = prompt_term(self, q, self.scale)
        if term is not None:
            out = out + term.to(out.dtype)
    out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
    out = self.norm(out)
    if out_gate is not None:
        out = out * out_gate
    return self.proj_drop(self.proj(out))


def _adapted_class(cls: type) -> type:
    """The subclass of timm's ``Attention`` class ``cls`` whose forward is :func:`_zinit_forward`.

    Adapted blocks get this class (``attn.__class__``), not a bound method on the instance: a class attribute is
    what copies (deepcopy, pickle, ``torch.save`` of the whole model) and ``nn.DataParallel`` replicas (which copy
    the instance ``__dict__``) need to run their own weights. The class is reachable as this module's
    ``ZinitAttention`` (see :func:`__getattr__`), which is how pickle finds it again in a fresh process.
    """
    global _ADAPTED
    with _LOCK:
        if _ADAPTED is None:
            _ADAPTED = type("ZinitAttention", (cls,), {
                "forward": _zinit_forward, "__module__": __name__,
                "__doc__": "timm Attention with zinit's gated prompt term (zinit.backbones vit).",
            })
    return _ADAPTED


_ADAPTED: type | None = None
_LOCK = threading.Lock()


def __getattr__(name: str) -> type:  # PEP 562: ZinitAttention is made on first use (timm is imported lazily)
    if name == "ZinitAttention":
        from timm.layers import Attention

        return _adapted_class(Attention)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _install(model: nn.Module, modules: list[nn.Module]) -> None:
    from timm.layers import Attention

    for attn in modules:
        if type(attn) is not Attention:
            raise TypeError(
                f"zinit's vit backbone adapts timm.layers.Attention, but this model's block uses "
                f"{type(attn).__module__}.{type(attn).__qualname__}; register a backbone for it"
            )
    adapted = _adapted_class(Attention)
    for attn in modules:
        attn.__class__ = adapted


def _uninstall(model: nn.Module, modules: list[nn.Module]) -> None:
    from timm.layers import Attention

    for attn in modules:  # by name, so a class made before an importlib.reload of this module is undone too
        cls = type(attn)
        if cls.__name__ == "ZinitAttention" and cls.__bases__ == (Attention,):
            attn.__class__ = Attention


register_backbone(
    Backbone(
        name="vit",
        matches=_matches,
        attention_modules=_attention_modules,
        dims=_dims,
        project=_project,
        install=_install,
        uninstall=_uninstall,
        description="timm VisionTransformer / DeiT (fused qkv, class token, bidirectional)",
        joint_softmax=True,  # gate='none': the prompt keys join timm's own attention
    )
)
