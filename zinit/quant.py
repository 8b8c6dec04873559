"""A quantized frozen base: the quantization schemes ``--quantize`` names, each a documented Hugging Face
``quantization_config`` (transformers' ``TorchAoConfig`` / ``BitsAndBytesConfig``) passed to ``from_pretrained``.

zinit needs nothing special from a quantized model: the base is frozen anyway, and a layer's prompt keys and values
go through that layer's own (now quantized) ``k_proj`` / ``v_proj``, exactly as its tokens do. The adapter stays
float32 (its parameters are created in float32 and are the only ones the optimizer sees); gradients reach the
prompts through the quantized projections' input gradient, which both backends implement.

Schemes (:data:`SCHEMES`):

- ``int8``: torchao weight-only int8 (per-channel scales), activations in the model's dtype. Runs on CPU and GPU.
- ``nf4``: bitsandbytes 4-bit NormalFloat with double quantization (QLoRA's setting), computing in bf16 on a GPU
  and float32 on CPU. bitsandbytes >= 0.46 runs it on CPU too (slowly); on a GPU it is the usual 4-bit path.
- ``bnb-int8``: bitsandbytes LLM.int8() (8-bit weights, outlier columns in fp16). GPU-first; its CPU path casts
  activations to fp16 and is slow.

Training after inference on a 4-bit base (:func:`keep_autograd`): on a CPU with AVX512-BF16, bitsandbytes 0.50
repacks a 4-bit weight, for good, on its first eval-mode forward whose input needs no grad, and from then on runs
it through ``gemv_4bit``, a kernel without autograd: the backward pass silently stops at that layer, so the prompts
and gates get no gradient. The trainer (:func:`zinit.train.train`) calls :func:`keep_autograd` before its first
step, so ``zinit train ... --quantize nf4`` trains even after its evaluation before tuning; call it yourself before
a training loop of your own.

>>> sorted(SCHEMES)
['bnb-int8', 'int8', 'nf4']
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import ZinitImportError
from .registry import Registry


@dataclass(frozen=True)
class Scheme:
    """One way to load a quantized base."""

    name: str
    package: str  #: the module it needs (``torchao`` / ``bitsandbytes``)
    bits: int  #: weight bits (storage of the linear layers' weights)
    description: str
    make: Callable[[torch.device], Any]  #: ``device -> quantization_config`` for ``from_pretrained``


def _torchao_int8(device: torch.device) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _bnb_nf4(device: torch.device) -> Any:
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _bnb_int8(device: torch.device) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


#: The quantization schemes (the one registry type, :class:`zinit.Registry`): ``SCHEMES["nf4"]``, ``"int8" in
#: SCHEMES``, ``sorted(SCHEMES)``; a new backend is one ``SCHEMES.register(Scheme(...))``.
SCHEMES: Registry[Scheme] = Registry("quantization scheme", Scheme)
for _scheme in (
    Scheme("int8", "torchao", 8, "torchao weight-only int8 (CPU and GPU)", _torchao_int8),
    Scheme("nf4", "bitsandbytes", 4, "bitsandbytes 4-bit NF4, double quantization (GPU; CPU with "
           "bitsandbytes >= 0.46)", _bnb_nf4),
    Scheme("bnb-int8", "bitsandbytes", 8, "bitsandbytes LLM.int8() (GPU; slow on CPU)", _bnb_int8),
):
    SCHEMES.register(_scheme)


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``; a ValueError lists the schemes otherwise, and an ImportError names the package
    to install when its backend is missing.

    >>> get_scheme("int8").bits
    8
    """
    scheme = SCHEMES.get(name)
    if importlib.util.find_spec(scheme.package) is None:
        raise ZinitImportError(f"--quantize {name} needs the package {scheme.package!r}, which is not installed: "
                          f"pip install 'zinit[quant]' (or pip install {scheme.package})")
    return scheme


def load_kwargs(name: str | None, device: torch.device) -> dict[str, Any]:
    """The extra ``from_pretrained`` keywords that load a base quantized with scheme ``name`` onto ``device``
    (``{}`` for None): its ``quantization_config`` and a ``device_map`` (quantized weights are placed while they
    load; such a model cannot be moved with ``.to()`` afterwards).

    >>> sorted(load_kwargs("int8", torch.device("cpu")))
    ['device_map', 'quantization_config']
    >>> load_kwargs(None, torch.device("cpu"))
    {}
    """
    if name is None:
        return {}
    scheme = get_scheme(name)
    index = device.index if device.index is not None else 0
    return {"quantization_config": scheme.make(device),
            "device_map": {"": index if device.type == "cuda" else device.type}}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` was loaded with a ``quantization_config`` (transformers marks such models)."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    method = getattr(config, "quant_method", None)
    return config is not None and getattr(method, "value", method) != "gguf"  # GGUF weights load dequantized


#: The ``--quantize`` option, declared once for ``zinit generate``, ``zinit serve`` and the causal-LM recipes.
QUANTIZE_FLAG: tuple[str, dict[str, Any]] = ("--quantize", {
    "choices": sorted(SCHEMES), "default": None,
    "help": "load the frozen base quantized: int8 (torchao weight-only, CPU/GPU), nf4 (bitsandbytes 4-bit), "
            "bnb-int8 (bitsandbytes LLM.int8); the adapter stays float32 (default: not quantized)"})


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really stores: for a tensor subclass that holds its data in inner tensors (torchao's
    quantized weights: int8 data plus scales), the sum over those; else ``numel · element_size``."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` as stored (quantized weights at their real size; the
    quantization constants of bitsandbytes' 4-bit weights, about 0.5 % more, are not counted).

    >>> weight_bytes(torch.nn.Linear(4, 2))  # 8 + 2 float32
    40
    """
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


# --- bitsandbytes 4-bit on CPU: keep the training path on a kernel with autograd -------------------------------------
#
# bitsandbytes 0.50, Linear4bit.forward (bitsandbytes/nn/modules.py):
#     if (x.device.type == "cpu" and self.support_avx512bf16_for_cpu and not self.training
#             and x.requires_grad == False and not getattr(quant_state, "packing_format_for_cpu", False)):
#         self.weight.data, quant_state = _convert_weight_packed_for_cpu(self.weight.data, quant_state)
# and matmul_4bit (bitsandbytes/autograd/_functions.py), for any later call, in any mode:
#     if A.device.type == "cpu" and getattr(quant_state, "packing_format_for_cpu", False):
#         result = F.gemv_4bit(A, B, out=out, state=quant_state)      # a custom op with no autograd kernel
# ``support_avx512bf16_for_cpu`` is ``has_avx512bf16()`` (the CPU feature), read at construction. The packed kernel
# is bitsandbytes' fast path for decoding (one thread, bitsandbytes 0.50.2, a float32 input of M rows: 4.5x faster
# than the unpacked one for a 576x1536 layer at M=1, 38x at 4096x4096; but 2x slower at M=512), so the repack is
# kept for every forward without grad, as bitsandbytes decides it, and undone, exactly, for any forward with grad.

#: The attribute of a Linear4bit that remembers its own repack setting once :func:`keep_autograd` hooked it.
_REPACK_ATTR = "_zinit_cpu_repack"


def _linear4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every bitsandbytes ``Linear4bit`` in ``model`` (none when bitsandbytes was never
    imported: then no module of the process can be one)."""
    if sys.modules.get("bitsandbytes") is None:  # not imported (or blocked: None)
        return []
    from bitsandbytes.nn import Linear4bit

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]


def is_packed_for_cpu(module: nn.Module) -> bool:
    """Whether ``module`` (a bitsandbytes ``Linear4bit``) holds its weight in bitsandbytes' CPU inference layout,
    the one ``gemv_4bit`` reads, which has no autograd."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def packed_for_cpu(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit layers of ``model`` whose weight is in the CPU inference layout now (no
    autograd through them); empty for any other model.

    >>> packed_for_cpu(torch.nn.Linear(4, 2))
    []
    """
    return [name for name, m in _linear4bit_layers(model) if is_packed_for_cpu(m)]


def unpack_for_autograd(module: nn.Module) -> None:
    """Put the weight of a bitsandbytes ``Linear4bit`` that bitsandbytes packed for its CPU inference kernel back
    into the layout its autograd kernel (``MatMul4Bit``) reads; a no-op for a weight that is not packed.

    Exact: the dequantized weight afterwards is the one the packed kernel computed with. The 4-bit codes are only
    reordered (bitsandbytes' own inverse), and the block scales are kept as the packed kernel held them (bfloat16,
    not double-quantized: the memory of the packed form). bitsandbytes' own inverse, which ``.cuda()`` and
    ``state_dict()`` use, re-quantizes those scales to 8 bits (it changes the weights slightly, and scrambles them
    when the weight had no double quantization), so it is not used for them.
    """
    if not is_packed_for_cpu(module):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    state = weight.quant_state
    scales = state.absmax  # [in_features / blocksize, out_features]: the packed kernel's layout of the block scales
    state.original_nested = False  # keeps bitsandbytes' inverse from re-quantizing them
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = scales.t().reshape(-1).clone()  # [out, in / blocksize] flattened, as dequantize_4bit reads it
    state.nested = False
    weight.data = data
    weight.quant_state = state
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = state


def _autograd_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Before each forward of a hooked Linear4bit: with grad enabled, the weight must be in the autograd layout
    (unpacked now if an inference forward packed it) and must not be packed; without grad (``torch.no_grad``,
    ``torch.inference_mode``, ``generate``), bitsandbytes packs it as it would have."""
    grad = torch.is_grad_enabled()
    module.support_avx512bf16_for_cpu = getattr(module, _REPACK_ATTR) and not grad
    if grad:
        with torch.no_grad():
            unpack_for_autograd(module)


def keep_autograd(model: nn.Module) -> int:
    """Keep every forward with grad of ``model``'s bitsandbytes 4-bit layers on a kernel with autograd; returns how
    many layers are hooked (0 for a model without any, e.g. a torchao or bitsandbytes int8 base). Idempotent.

    Why: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for good on its first eval-mode forward
    whose input needs no grad, and afterwards multiplies by it with ``gemv_4bit``, which has no autograd; a training
    step after any evaluation then leaves the prompts and gates without gradients. A hooked layer still repacks for
    forwards without grad (``torch.no_grad``, ``torch.inference_mode``, ``generate``: bitsandbytes' fast inference
    kernel, kept), and is unpacked, exactly (:func:`unpack_for_autograd`), before any forward with grad, then not
    repacked while grad stays on. A weight an evaluation packed before this call is unpacked on the next forward
    with grad too. On other CPUs and on GPUs nothing is ever packed, and the hook does nothing.

    What changes: forwards without grad compute as bitsandbytes alone computes them. Forwards with grad take
    bitsandbytes' training path (``MatMul4Bit`` in the compute dtype), where bitsandbytes alone, in eval mode, would
    have packed a layer whose input needs no grad and run it in bfloat16. A weight packed once keeps the block
    scales of its packed form (bfloat16) in both layouts, so training and inference use the same weights. The hooks
    stay on the modules (also after :func:`zinit.eject`).

    :func:`zinit.train.train` calls this before its first step; call it yourself before a training loop of your own
    on a 4-bit base.

    >>> keep_autograd(torch.nn.Linear(4, 2))
    0
    """
    layers = _linear4bit_layers(model)
    for _, module in layers:
        if not hasattr(module, _REPACK_ATTR):
            setattr(module, _REPACK_ATTR, bool(getattr(module, "support_avx512bf16_for_cpu", False)))
            module.register_forward_pre_hook(_autograd_pre_hook)
    return len(layers)
