"""The prompt's key path, checked against one written out by hand (``reference.written_out_kv``), never through the
layer's own forward, and each layer's own rotary at position 0.

The coverage sweep builds each family with its default config; these tests build the variants it does not (Falcon's
three ``query_key_value`` layouts, GPT-BigCode without multi-query, StableLM / Cohere / Phi key norms, OLMoE's
``clip_qkv``, Falcon-H1's ``key_multiplier``, YaRN with partial rotary), and OLMo 3 with YaRN on its full-attention
layers only, where one position-0 rotary for every layer left the full layers' prompt keys without their scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reference
import zinit
from zinit import hfauto
from zinit.benchmarks import coverage

#: YaRN with factor 8: cos and sin (so every token key) carry the attention scale 0.1·ln 8 + 1 = 1.208.
YARN = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16}
YARN_SCALE = 0.1 * torch.log(torch.tensor(8.0)).item() + 1


def tiny(family: str, **overrides) -> nn.Module:
    """A tiny random causal LM of ``family`` (the sweep's sizes) with config ``overrides``; skips when this
    transformers has no such family."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    if family not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {family}")
    config = AutoConfig.for_model(family)
    coverage._shrink(config, causal=True)
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    coverage.wake_zero_parameters(model)
    return model


def keys_against_written_out(model: nn.Module, K: int = 3) -> tuple[list[float], list[str], list[torch.Tensor]]:
    """Inject every layer; zinit's prompt keys/values against the written-out ones of a pristine copy, per layer:
    the gaps, the reference's routes and zinit's keys."""
    pristine = copy.deepcopy(model)
    n = zinit.find_backbone(model).dims(model).num_layers
    zinit.inject(model, n, K=K)
    ours = zinit.find_backbone(model).attention_modules(model)
    theirs = zinit.find_backbone(pristine).attention_modules(pristine)
    prompt = torch.randn(K, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    gaps, routes, keys = [], [], []
    with torch.no_grad():
        for mine, pristine_attn in zip(ours, theirs):
            key, value = hfauto.project(mine, prompt)
            ref_key, ref_value, route = reference.prompt_kv(pristine, pristine_attn, prompt)
            gaps.append(max((key.double() - ref_key).abs().max().item(),
                            (value.double() - ref_value).abs().max().item()))
            routes.append(route)
            keys.append(key)
    return gaps, routes, keys


VARIANTS = {
    "falcon new architecture (grouped q | k | v)": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon per-head interleave": ("falcon", {"multi_query": False}),
    "falcon multi-query": ("falcon", {"multi_query": True}),
    "falcon alibi": ("falcon", {"alibi": True}),
    "gpt_bigcode per-head interleave": ("gpt_bigcode", {"multi_query": False}),
    "stablelm per-head layer norms": ("stablelm", {"qk_layernorm": True}),
    "cohere [Hkv, d] key norm": ("cohere", {"use_qk_norm": True}),
    "phi key norm, yarn on half the head": ("phi", {"qk_layernorm": True,
                                                    "rope_parameters": dict(YARN, partial_rotary_factor=0.5)}),
    "glm yarn on half the head": ("glm", {"rope_parameters": dict(YARN, partial_rotary_factor=0.5)}),
    "qwen3 yarn": ("qwen3", {"rope_parameters": YARN}),
    "olmoe clip_qkv after its whole-key norm": ("olmoe", {"clip_qkv": 0.05}),
    "falcon_h1 key_multiplier": ("falcon_h1", {"key_multiplier": 0.5}),
    "jetmoe tiled key heads": ("jetmoe", {}),
    "gpt_oss yarn on both halves": ("gpt_oss", {}),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_zinits_prompt_keys_equal_the_key_path_written_out(variant):
    family, overrides = VARIANTS[variant]
    gaps, routes, _ = keys_against_written_out(tiny(family, **overrides))
    assert routes == ["independent"] * len(routes), routes
    assert max(gaps) <= 1e-5, gaps


def test_the_written_out_path_and_the_capture_route_agree():
    """The reference's two routes agree where both apply (a reference check of the reference)."""
    model = tiny("phi", qk_layernorm=True, rope_parameters=dict(YARN, partial_rotary_factor=0.5))
    prompt = torch.randn(3, model.config.hidden_size)
    for attn in (layer.self_attn for layer in model.model.layers):
        key, value, route = reference.prompt_kv(model, attn, prompt)
        captured_key, captured_value, captured = reference.prompt_kv(model, attn, prompt, independent=False)
        assert route == "independent" and captured == "capture: asked for"
        assert torch.allclose(key, captured_key, atol=1e-6) and torch.allclose(value, captured_value, atol=1e-6)


def test_a_key_path_part_the_reference_does_not_know_takes_the_capture_route_named():
    """An attention module with a submodule of its own (here a convolution beside ``k_proj``) is never claimed as
    written out: the reference names the part and takes the capture route."""
    from test_generic_hf import DispatchingAttention, toy_model

    class WithExtra(DispatchingAttention):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.k_conv = nn.Conv1d(4, 4, 1)

    model = toy_model(WithExtra)
    _, _, route = reference.prompt_kv(model, model.layers[0].self_attn, torch.randn(3, 32))
    assert route.startswith("capture: ") and "k_conv (Conv1d)" in route


def _olmo3_yarn_on_full_layers() -> nn.Module:
    """OLMo 3, a sliding layer below a full one, YaRN (scale 1.208) on the full-attention layers only."""
    model = tiny("olmo3", layer_types=["sliding_attention", "full_attention"],
                 rope_parameters={"full_attention": dict(YARN), "sliding_attention": {"rope_type": "default",
                                                                                       "rope_theta": 10000.0}})
    rotary = model.model.rotary_emb
    assert rotary.full_attention_attention_scaling == pytest.approx(YARN_SCALE)
    assert rotary.sliding_attention_attention_scaling == 1.0
    return model


def test_each_layer_gets_its_own_layer_types_rotary_at_position_0():
    """OLMo 3: the full-attention layer's prompt keys carry YaRN's 1.208 as its token keys do; the sliding layer's
    do not (one position-0 rotary from layer_types[0] for every layer left the full layer's unscaled)."""
    model = _olmo3_yarn_on_full_layers()
    pristine = copy.deepcopy(model)
    gaps, routes, keys = keys_against_written_out(model)
    assert routes == ["independent", "independent"] and max(gaps) <= 1e-5, gaps
    prompt = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for layer, key, scale in zip(pristine.model.layers, keys, (1.0, YARN_SCALE)):
        attn = layer.self_attn
        with torch.no_grad():
            plain = attn.k_norm(attn.k_proj(prompt)).view(3, -1, attn.head_dim).transpose(0, 1)
        assert torch.allclose(key, plain * scale, atol=1e-5), (layer.self_attn.layer_idx, scale)


def test_olmo3_with_yarn_on_full_layers_passes_the_sweeps_checks():
    """The whole model with open gates against the reference (independent key path), cached generation included."""
    row = coverage.Row("olmo3 yarn", "causal", "fail")
    coverage._run_checks(_olmo3_yarn_on_full_layers(), "causal", 2, 4, row)
    assert row.result == "pass" and row.key_path == "independent", row


def test_the_references_capture_route_is_per_layer_type_too():
    """The reference's capture route (for a key path it cannot write out) also gives each layer its own rotary."""
    model = _olmo3_yarn_on_full_layers()
    attn = model.model.layers[1].self_attn  # full attention
    prompt = torch.randn(3, model.config.hidden_size)
    key, _ = reference.prompt_kv_at_position_0(model, attn, prompt)
    with torch.no_grad():
        plain = attn.k_norm(attn.k_proj(prompt)).view(3, -1, attn.head_dim).transpose(0, 1).double()
    assert torch.allclose(key, plain * YARN_SCALE, atol=1e-5)
