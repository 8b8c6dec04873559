"""LLaMA-Adapter V2's additions (Gao et al. 2023), as options of :func:`zinit.inject`: a learnable bias and scale on
linear layers, ``y = s ⊙ (W x + b)`` with ``b = 0`` and ``s = 1`` at the start, and trainable normalisation layers.

Both start as the identity, so a model injected with them still computes exactly what the base model computes until
training moves something. Neither touches a base weight:

- Bias/scale: each chosen linear layer gets a small submodule (:class:`BiasScale`, attribute
  :data:`BIAS_SCALE_ATTR`) with the two vectors, and a forward hook, :func:`bias_scale_hook`, a module-level function
  that finds them through the module it is called on, so copies (``copy.deepcopy``, pickle) of the model use their
  own vectors. The prompt keys/values go through the same hooked projections (a backbone that slices a fused weight
  itself applies :func:`apply_bias_scale` to its slice), as they do in litgpt's ``adapter_v2``.
- Norms: the normalisation layers' own weights (and biases) are trained in place, as litgpt and the official code
  train them; :func:`zinit.inject` keeps a copy of their values and :func:`zinit.eject` puts it back. In a bf16 or
  fp16 model they are trained in float32 (an Adam step of 1e-3 does not move a bf16 weight near 1), their output
  cast back to the dtype the layer gave before (:func:`train_norms_in_float32`); eject restores the dtype too.

Both stay float32 through a later ``model.to(torch.bfloat16)`` / ``.half()``: the bias/scale vectors are not cast
(:meth:`BiasScale._apply`), and a trained norm found below float32 at its next forward is put back to float32 (its
values as the cast left them, so the model still computes what the cast base computes) by
:func:`norm_precision_hook`. Eject gives each norm the dtype it was last seen in, or the model's new one if the
model was cast since (told by a frozen parameter of the norm's dtype that each norm remembers).

Which layers: ``bias_scale="blocks"`` (or True) takes every linear layer inside the transformer blocks (attention
and MLP projections of every layer, adapted or not: the paper's "linear layers"); ``"all"`` also the linear layers
outside them (the LM head, a pooler), which litgpt's ``adapter_v2`` includes, whose Llama-2-7B count of 4,279,744
has the LM head's 2 × 32,000. ``train_norms`` takes every module whose class name ends in ``Norm`` (LayerNorm,
RMSNorm, LlamaRMSNorm ...) and holds parameters: those of the blocks and the final one (and an embedding norm where
the model has one, as BERT/RoBERTa do). Modules listed in ``train_modules`` (trained whole) and zinit's own are never
taken.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from .errors import ZinitStateError

#: Attribute of a linear layer under which its :class:`BiasScale` hangs.
BIAS_SCALE_ATTR = "zinit_bias_scale"
#: ``bias_scale`` scopes: the linear layers of the transformer blocks, or every linear layer of the model.
BIAS_SCALE_SCOPES = ("blocks", "all")


_LOW = (torch.float16, torch.bfloat16)


class BiasScale(nn.Module):
    """The learnable bias ``[out]`` (zeros) and scale ``[out]`` (ones) of one linear layer: ``y = scale ⊙ (W x +
    bias)`` (after the layer's own bias, if it has one), kept in float32 whatever the base's dtype, also through a
    later ``model.to(torch.bfloat16)`` or ``.half()`` (device moves and ``.double()`` apply as usual).

    >>> m = BiasScale(4).to(torch.bfloat16)
    >>> m.scale.dtype, m.double().scale.dtype
    (torch.float32, torch.float64)
    """

    def __init__(self, features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features, device=device))
        self.scale = nn.Parameter(torch.ones(features, device=device))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        def keep_precision(t: Tensor) -> Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in _LOW:
                return t.to(out.device)  # the move, not the cast: an optimizer step of 1e-3 must still move a 1.0
            return out

        return super()._apply(keep_precision, recurse)

    def extra_repr(self) -> str:
        return f"features={self.bias.numel()}"


def apply_bias_scale(output: Tensor, bias_scale: BiasScale, features: slice | None = None) -> Tensor:
    """``scale ⊙ (output + bias)`` over the last dimension, in ``output``'s dtype; ``features`` selects a slice of
    the vectors, for a backbone that computes part of a fused projection itself (the k and v thirds of a ViT's qkv)."""
    bias, scale = bias_scale.bias, bias_scale.scale
    if features is not None:
        bias, scale = bias[features], scale[features]
    return (output + bias.to(output.dtype)) * scale.to(output.dtype)


def bias_scale_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """The forward hook of a linear layer with a :class:`BiasScale` (looked up on the module itself)."""
    return apply_bias_scale(output, module._modules[BIAS_SCALE_ATTR])


def remove_hook(module: nn.Module, hook: object, pre: bool = False) -> None:
    """Remove every registration of the function ``hook`` from ``module``'s forward hooks (``pre``: forward
    pre-hooks), with torch's per-handle side entries; found by identity, not by handle, so a copy's come off too."""
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    sides = ((module._forward_pre_hooks_with_kwargs,) if pre else
             (module._forward_hooks_with_kwargs, module._forward_hooks_always_called))
    for key in [k for k, h in hooks.items() if h is hook]:
        del hooks[key]
        for side in sides:
            side.pop(key, None)


#: Attribute of a normalisation layer trained in float32 in a lower-precision model: the dtype its parameters had.
NORM_DTYPE_ATTR = "zinit_norm_dtype"


def norm_dtype_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """The forward hook of a trained norm upcast to float32 in a bf16/fp16 model: its output in the dtype the
    original layer gave (its parameters' dtype promoted with the input's), so the rest of the model sees what it
    saw before; the float32 parameters let an optimizer move them by steps smaller than bf16 resolves. A norm that
    was float32 all along is left alone."""
    dtype = module.__dict__.get(NORM_DTYPE_ATTR)
    if dtype is None or not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
        return output
    return output.to(torch.promote_types(args[0].dtype, dtype))


#: Attribute of a trained norm: ``(name, dtype)`` of a frozen parameter that had the norm's dtype when it was last
#: seen below float32, so eject can tell whether the model was cast since (the norm's own dtype no longer says).
NORM_REF_ATTR = "zinit_norm_reference"
#: Attribute of a trained norm that shares a parameter with other trained norms (tied): those norms.
NORM_PEERS_ATTR = "zinit_norm_peers"
_UPCAST_LOCK = threading.Lock()  # one thread upcasts a norm found cast down; the others wait, then see float32


def _low_precision(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters(recurse=False) if p.dtype in _LOW), None)


def _to_float32(module: nn.Module, low: torch.dtype) -> None:
    """``module``'s own parameters to float32 in place (the same Parameter objects), its output cast back to
    ``low`` by :func:`norm_dtype_hook` (and so the output of the norms it shares a parameter with); under
    ``torch.inference_mode`` too, as ordinary (trainable) tensors."""
    for norm in (module, *module.__dict__.get(NORM_PEERS_ATTR, ())):
        norm.__dict__[NORM_DTYPE_ATTR] = low
        ref = norm.__dict__.get(NORM_REF_ATTR)
        if ref is not None:
            norm.__dict__[NORM_REF_ATTR] = (ref[0], low)  # the reference was cast with the norm
    with torch.inference_mode(False), torch.no_grad():
        module.float()


def norm_precision_hook(module: nn.Module, args: tuple) -> None:
    """The forward pre-hook of every trained norm: parameters found below float32 (the model was cast with
    ``model.to(torch.bfloat16)`` / ``.half()`` after inject) go back to float32, with the new dtype as the one
    :func:`norm_dtype_hook` casts the output to. A check of one or two dtypes on every other call; the upcast itself
    runs under a lock, so concurrent first forwards (serving threads) do it once."""
    if _low_precision(module) is not None:
        with _UPCAST_LOCK:
            low = _low_precision(module)  # again: another thread may have done it meanwhile
            if low is not None:
                _to_float32(module, low)


def train_norms_in_float32(model: nn.Module, norms: list[tuple[str, nn.Module]]) -> None:
    """Make each norm's parameters trainable; those in a lower precision than float32 become float32 (in place:
    the same Parameter objects) with :func:`norm_dtype_hook` casting the output back, and every norm gets
    :func:`norm_precision_hook` for a cast after inject. Each norm also remembers a frozen parameter of its dtype
    (for :func:`restore_norms`) and the norms it shares a parameter with. Undone by :func:`restore_norms`."""
    trained = {id(p) for _, m in norms for p in m.parameters(recurse=False)}
    reference: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.requires_grad and id(p) not in trained:
            reference.setdefault(p.dtype, name)
    owners: dict[int, list[nn.Module]] = {}
    for _, module in norms:
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    lows = [_low_precision(module) for _, module in norms]  # all before any upcast: tied norms see the same
    for (_, module), low in zip(norms, lows):
        dtype = low or next(module.parameters(recurse=False)).dtype
        if dtype in reference:
            module.__dict__[NORM_REF_ATTR] = (reference[dtype], dtype)
        peers = {id(m): m for p in module.parameters(recurse=False) for m in owners[id(p)] if m is not module}
        if peers:
            module.__dict__[NORM_PEERS_ATTR] = list(peers.values())
    for (_, module), low in zip(norms, lows):
        if low is not None:
            _to_float32(module, low)
        module.register_forward_pre_hook(norm_precision_hook)
        module.register_forward_hook(norm_dtype_hook)
        module.requires_grad_(True)


def _restored_dtype(model: nn.Module, module: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm trained in float32 goes back to: the one it was last seen in (``dtype``), or, when its
    reference parameter changed dtype since (the model was cast to float32, say), the reference's new one."""
    ref = module.__dict__.pop(NORM_REF_ATTR, None)
    if ref is None:
        return dtype
    try:
        now = model.get_parameter(ref[0]).dtype
    except AttributeError:  # the reference is gone (a module replaced since): the dtype last seen
        return dtype
    return dtype if now == ref[1] else now


def restore_norms(model: nn.Module, names: Sequence[str]) -> None:
    """Undo :func:`train_norms_in_float32` on the norms ``names``: hooks off and, for those trained in float32 in a
    lower-precision model, their dtype back (:func:`_restored_dtype`; the values are the caller's to restore)."""
    modules = [model.get_submodule(name) for name in names]
    targets = []
    for module in modules:
        remove_hook(module, norm_precision_hook, pre=True)
        remove_hook(module, norm_dtype_hook)
        module.__dict__.pop(NORM_PEERS_ATTR, None)
        dtype = module.__dict__.pop(NORM_DTYPE_ATTR, None)
        targets.append(None if dtype is None else _restored_dtype(model, module, dtype))
        module.__dict__.pop(NORM_REF_ATTR, None)
    for module, dtype in zip(modules, targets):  # after every lookup: no restored norm is another's reference
        if dtype is not None:
            module.to(dtype)


def bias_scale_of(module: nn.Module) -> BiasScale | None:
    """The :class:`BiasScale` of a linear layer, or None (a backbone projecting prompts from a sliced weight asks)."""
    found = module._modules.get(BIAS_SCALE_ATTR)
    return found if isinstance(found, BiasScale) else None


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear and its subclasses (bitsandbytes' Linear4bit/Linear8bitLt; torchao keeps nn.Linear), and the
    # Conv1D of GPT-2-style transformers models (a linear layer with the weight transposed)
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else int(module.nf)


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Norm") and any(True for _ in module.parameters(recurse=False))


def block_names(model: nn.Module, attention_modules: list[nn.Module]) -> list[str]:
    """The qualified names of the transformer blocks: for each attention module, its ancestor that is an element of
    a ``ModuleList``/``Sequential`` (``model.layers.3``, ``blocks.3``, ``roberta.encoder.layer.3``), else its parent.
    """
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for attention in attention_modules:
        name = names[id(attention)]
        parts = name.split(".")
        block = ".".join(parts[:-1])
        for j in range(len(parts) - 1, 0, -1):
            if isinstance(model.get_submodule(".".join(parts[:j])), (nn.ModuleList, nn.Sequential)):
                block = ".".join(parts[:j + 1])
                break
        out.append(block)
    return out


def _excluded(name: str, skip: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(name == s or name.startswith(s + ".") for s in skip) or any(p.startswith("zinit_") for p in parts)


def select_linears(model: nn.Module, scope: str, blocks: list[str], skip: tuple[str, ...] = ()
                   ) -> Iterator[tuple[str, nn.Module]]:
    """The linear layers ``bias_scale=scope`` takes: ``(qualified name, module)`` in model order."""
    for name, module in model.named_modules():
        if not _is_linear(module) or _excluded(name, skip):
            continue
        if scope == "all" or any(name.startswith(b + ".") for b in blocks):
            yield name, module


def select_norms(model: nn.Module, skip: tuple[str, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """The normalisation layers ``train_norms=True`` trains: ``(qualified name, module)`` in model order."""
    for name, module in model.named_modules():
        if _is_norm(module) and not _excluded(name, skip):
            yield name, module


def install_bias_scale(linears: list[tuple[str, nn.Module]]) -> None:
    """Give each linear layer its :class:`BiasScale` and hook (undone by :func:`uninstall_bias_scale`); nothing is
    installed if one of them has a bias/scale already (an inner model injected on its own)."""
    taken = [name for name, module in linears if BIAS_SCALE_ATTR in module._modules]
    if taken:
        raise ZinitStateError(f"{taken[0]} already has a zinit bias/scale (a submodule injected on its own?): eject that "
                           "first")
    for name, module in linears:
        device = next(module.parameters()).device
        module.add_module(BIAS_SCALE_ATTR, BiasScale(_out_features(module), device))
        module.register_forward_hook(bias_scale_hook)


def uninstall_bias_scale(model: nn.Module, names: Sequence[str]) -> None:
    """Remove the :class:`BiasScale` and its hook from the linear layers ``names`` of ``model`` (found by attribute,
    not by hook handle, so a copy's come off too); other modules' (an inner model's own injection) stay."""
    for name in names:
        module = model.get_submodule(name)
        if BIAS_SCALE_ATTR in module._modules:
            remove_hook(module, bias_scale_hook)
            delattr(module, BIAS_SCALE_ATTR)
