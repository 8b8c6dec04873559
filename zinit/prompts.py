"""The learnable parameters of one adapted layer: its prompt and its gate."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .attention import gate_values, prepare_prompt_kv, prompt_attention

GATE_KINDS = ("head", "layer")

#: Name of the submodule that holds a layer's adapter, on that layer's attention module.
ADAPTER_ATTR = "zinit_adapter"


class LayerAdapter(nn.Module):
    """Prompt ``[K, C]`` (initialised N(0, 1)) and gate (``[H]`` or ``[1]``, initialised to exactly 0) of one layer.

    Parameters are kept in float32 whatever the model's dtype (they are what the optimizer updates, and a bf16
    gate could not take the small steps that open it); they are cast to the attention's compute dtype on use.

    Args:
        K: prompt length.
        hidden_size: C, the input width of the layer's key/value projections.
        num_heads: query heads H.
        gate: ``"head"`` (one gate per query head, the paper) or ``"layer"`` (one scalar, as peft).
        gate_fn: ``"tanh"`` (paper) or ``"identity"`` (official v1 inference, peft, litgpt).
        project: the backbone's ``(attention module, prompt) -> (keys, values)``.
        device: where to create the parameters (the model's device; ``"meta"`` works).
    """

    def __init__(
        self,
        K: int,
        hidden_size: int,
        num_heads: int,
        *,
        gate: str,
        gate_fn: str,
        project: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]],
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(K, hidden_size, device=device, dtype=torch.float32))
        self.gate = nn.Parameter(
            torch.zeros(num_heads if gate == "head" else 1, device=device, dtype=torch.float32)
        )
        self.gate_kind = gate
        self.gate_fn = gate_fn
        self.num_heads = num_heads
        self._project = project
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def extra_repr(self) -> str:
        K, C = self.prompt.shape
        return f"K={K}, hidden_size={C}, heads={self.num_heads}, gate={self.gate_kind!r}, gate_fn={self.gate_fn!r}"

    def gate_values(self) -> Tensor:
        """The per-head multiplier ``[H]`` (``tanh(gate)`` or ``gate``, broadcast for a layer gate)."""
        return gate_values(self.gate, self.gate_fn, self.num_heads)

    def prompt_kv(self, attention: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Prompt keys and values ``[Hkv, K, d]`` through ``attention``'s own frozen projections."""
        return self._project(attention, self.prompt.to(dtype))

    def _prepared(self, attention: nn.Module, query: Tensor) -> tuple[Tensor, Tensor]:
        key, value = self.prompt_kv(attention, query.dtype)
        return prepare_prompt_kv(key, value, self.gate_values(), self.num_heads, query.dtype)

    def attend(self, query: Tensor, attention: nn.Module, scaling: float) -> Tensor:
        """The gated prompt term ``[B, H, T, d]`` for the layer's query ``[B, H, T, d]``.

        With gradients enabled (training), prompt keys/values are projected on every call, i.e. once per forward
        of the layer, so the graph reaches the prompt and gate. Without gradients (evaluation, ``generate()``) they
        are projected once and reused until a parameter of the layer changes: the cache is keyed on the storage
        and version counter of every parameter of the attention module (prompt, gate, projections), which any
        in-place update (an optimizer step, ``load_state_dict``, ``.to()``) changes.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            key, value = self._prepared(attention, query)
        else:
            stamp = (query.dtype, query.device, *((p.data_ptr(), p._version) for p in attention.parameters()))
            if self._cache is None or self._cache[0] != stamp:
                self._cache = (stamp, *self._prepared(attention, query))
            _, key, value = self._cache
        return prompt_attention(query, key, value, scaling)
