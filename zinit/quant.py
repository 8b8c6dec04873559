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

>>> sorted(SCHEMES)
['bnb-int8', 'int8', 'nf4']
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch


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


SCHEMES: dict[str, Scheme] = {
    s.name: s for s in (
        Scheme("int8", "torchao", 8, "torchao weight-only int8 (CPU and GPU)", _torchao_int8),
        Scheme("nf4", "bitsandbytes", 4, "bitsandbytes 4-bit NF4, double quantization (GPU; CPU with "
               "bitsandbytes >= 0.46)", _bnb_nf4),
        Scheme("bnb-int8", "bitsandbytes", 8, "bitsandbytes LLM.int8() (GPU; slow on CPU)", _bnb_int8),
    )
}


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``; a ValueError lists the schemes otherwise, and an ImportError names the package
    to install when its backend is missing.

    >>> get_scheme("int8").bits
    8
    """
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization {name!r}; choose among {', '.join(SCHEMES)}")
    scheme = SCHEMES[name]
    if importlib.util.find_spec(scheme.package) is None:
        raise ImportError(f"--quantize {name} needs the package {scheme.package!r}, which is not installed: "
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
