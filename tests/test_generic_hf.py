"""The generic Hugging Face backbone (``zinit.hfauto``, registered as ``hf``) and the coverage sweep's fixed subset.

The sweep (``python -m zinit.benchmarks.coverage``) runs every family transformers ships; CI runs this subset, which
covers each key path the issue names: separate projections (Gemma, StarCoder2), GPT-2's fused ``c_attn`` Conv1D,
GPT-NeoX's fused ``query_key_value``, Phi-3's fused ``qkv_proj`` with GQA, partial rotary (Phi), a per-head key norm
(Qwen3, Gemma 3), a whole-projection key norm (OLMo 2), logit soft-capping (Gemma 2), a pre-scaled query (OPT), the
BERT-likes and both CLIP towers; each row's prompt keys against the key path written out (``reference.written_out_kv``).

Refusals are checked on what the installed transformers does, never on a family name: the families whose attention
does not dispatch through AttentionInterface are chosen by inspecting their modeling files, and hand-made models
(an attention with its own softmax, one with a token shift before its keys) keep each refusal tested whatever a
transformers release moves.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import zinit
from zinit import hfauto
from zinit.benchmarks import coverage

class ToyConfig(PretrainedConfig):
    """A hand-made transformers config: a model no transformers release can move onto (or off) AttentionInterface."""

    model_type = "zinit_toy"

    def __init__(self, hidden_size: int = 32, num_attention_heads: int = 4, num_hidden_layers: int = 2,
                 vocab_size: int = 50, **kwargs) -> None:
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.num_hidden_layers, self.vocab_size = num_hidden_layers, vocab_size
        super().__init__(**kwargs)


class OwnSoftmaxAttention(nn.Module):
    """Attention computing its own softmax, never looking a function up in AttentionInterface."""

    shift = False

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(config.hidden_size, config.hidden_size)
                                                              for _ in range(4))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shifted = x + nn.functional.pad(x, (0, 0, 1, 0))[:, :-1] if self.shift else x  # a token shift: keys see t-1
        shape = (*x.shape[:2], -1, self.head_dim)
        return (self.q_proj(x).view(shape).transpose(1, 2), self.k_proj(shifted).view(shape).transpose(1, 2),
                self.v_proj(x).view(shape).transpose(1, 2))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        q, k, v = self._qkv(hidden_states)
        out = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, -1) @ v
        return self.o_proj(out.transpose(1, 2).flatten(2)), None


class DispatchingAttention(OwnSoftmaxAttention):
    """The same attention, dispatching through AttentionInterface as transformers' families do."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        q, k, v = self._qkv(hidden_states)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        out, _ = function(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.flatten(2)), None


class ShiftingAttention(DispatchingAttention):
    """Dispatching, with a token shift before its key projection: each row's key mixes in the row before it."""

    shift = True


def toy_model(attention: type[nn.Module]) -> PreTrainedModel:
    """A two-layer transformers model (a ``PreTrainedModel``) whose layers hold one ``attention`` each, SDPA."""

    class ToyLayer(nn.Module):
        def __init__(self, config: ToyConfig) -> None:
            super().__init__()
            self.self_attn = attention(config)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.self_attn(x)[0]

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig
        _supports_sdpa = True

        def __init__(self, config: ToyConfig) -> None:
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.layers = nn.ModuleList(ToyLayer(config) for _ in range(config.num_hidden_layers))
            self.post_init()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    return ToyModel(ToyConfig(attn_implementation="sdpa")).eval()


SUBSET = ("gpt2", "gpt_neox", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "qwen3", "olmo2", "starcoder2", "opt",
          "xlm-roberta", "electra", "clip_text_model", "clip_vision_model")


@pytest.mark.parametrize("family", SUBSET)
def test_coverage_subset_passes_every_check(family):
    kind = dict(coverage.families()).get(family, "causal")
    row = coverage.check(family, kind)
    assert row.result == "pass", row
    assert row.checks["zero_init"] <= 1e-6 and row.checks["reference"] <= 1e-5 and row.checks["save_load"] == 0
    assert row.checks["gates_open_effect"] > 1e-4  # the reference comparison is about a prompt term that matters
    # the prompt keys against the family's key path written out (not the layer's forward), and keys that matter
    assert row.key_path == "independent" and row.checks["prompt_kv"] <= 1e-5, row
    assert row.checks["prompt_key_size"] > coverage.MIN_KEY
    if kind == "causal":
        assert row.checks["generate"] <= 1e-4


@pytest.mark.parametrize("row_name, name, extra", coverage.TIMM, ids=[t[0] for t in coverage.TIMM])
def test_coverage_timm_rows(row_name, name, extra):
    """timm: every VisionTransformer variant passes (qk-norm keys through k_norm, registers, layer scale); the
    families with attention of their own (EVA's RoPE, BEiT's relative bias, Swin's windows) are refused."""
    row = coverage.check_timm(row_name, name, extra)
    if any(k in name for k in ("eva", "beit", "swin")):
        assert row.result == "refused" and "zinit has no backbone for timm.models." in row.reason, row
    else:
        assert row.result == "pass" and row.backbone == "vit", row
        assert row.checks["reference"] <= 1e-5 and row.checks["gates_open_effect"] > 0  # deit3: layer scale 1e-5


def _modeling_source(family: str) -> str | None:
    """The text of the installed transformers' modeling file of ``family`` (None if it has none of that name)."""
    import importlib.util
    from pathlib import Path

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(family)
    spec = importlib.util.find_spec("transformers")
    path = Path(spec.origin).parent / "models" / module / f"modeling_{module}.py"
    return path.read_text() if path.is_file() else None


def _families_outside_attention_interface() -> list[str]:
    """Causal-LM families of the installed transformers whose modeling file defines attention classes but never
    looks one up in AttentionInterface (an inspection of the source text, independent of zinit's): the families
    zinit must refuse. Chosen at run time, so a family that moves onto the interface (Falcon in 5.25) leaves it."""
    import re

    found = []
    for family, kind in coverage.families():
        source = _modeling_source(family) if kind == "causal" else None
        if source and re.search(r"^class \w*Attention\w*\(nn\.Module\)", source, re.M) \
                and "ALL_ATTENTION_FUNCTIONS" not in source and "get_interface(" not in source:
            found.append(family)
    return found


def _refused_untouched(model: torch.nn.Module, match: str) -> str:
    with pytest.raises(hfauto.Unsupported, match=match) as refusal:
        zinit.inject(model, 1, K=4)
    assert not zinit.is_injected(model)
    assert all(p.requires_grad for p in model.parameters())  # left exactly as it was
    return str(refusal.value)


def test_families_whose_attention_does_not_dispatch_are_refused_with_the_reason():
    """Two families (the first that build tiny) chosen by inspecting the installed transformers, not named here."""
    import inspect

    checked = []
    for family in _families_outside_attention_interface():
        try:
            model = coverage.build(family, "causal")
        except Exception:  # noqa: BLE001 - a config the sweep cannot make tiny: the next family
            continue
        classes = {type(m) for m in model.modules() if type(m).__name__.endswith("Attention")}
        if not classes or any("ALL_ATTENTION_FUNCTIONS" in inspect.getsource(c) for c in classes):
            continue  # the built model holds attention of another file that does dispatch
        _refused_untouched(model, "dispatches through transformers' AttentionInterface")
        checked.append(family)
        if len(checked) == 2:
            break
    if not checked:
        pytest.skip("every causal-LM family of this transformers dispatches its attention through AttentionInterface"
                    " (the hand-made model below keeps the refusal tested)")


def test_a_hand_made_attention_outside_attention_interface_is_refused_with_the_reason():
    """A check that cannot vanish with a transformers release: the same tiny model, once with an attention that
    computes its own softmax (refused, naming its class) and once dispatching through AttentionInterface (adapted)."""
    reason = _refused_untouched(toy_model(OwnSoftmaxAttention), "dispatches through transformers' AttentionInterface")
    assert "OwnSoftmaxAttention" in reason
    twin = zinit.inject(toy_model(DispatchingAttention), 1, K=4)
    assert zinit.injection(twin).backbone.name == "hf"


def test_falcon_is_checked_like_any_other_family():
    """Falcon (on AttentionInterface from transformers 5.25) passes every check with its fused query_key_value
    written out, or, where its attention does not dispatch, is refused saying so."""
    import inspect

    from transformers.models.falcon import modeling_falcon

    row = coverage.check("falcon", "causal")
    if "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon.FalconAttention.forward):
        assert row.result == "pass" and row.key_path == "independent", row
    else:
        assert row.result == "refused" and "AttentionInterface" in row.reason, row


def test_a_layer_that_mixes_prompt_rows_is_refused_with_the_reason():
    """A token shift before the key projection (as RWKV-likes and ZAYA's convolution do) gives a row a key that
    depends on the row before it: there is no key of one prompt row alone, so zinit refuses; the same model without
    the shift is adapted."""
    reason = _refused_untouched(toy_model(ShiftingAttention), "mixes the rows of a sequence before its attention")
    assert "ShiftingAttention" in reason and "key" in reason and "the row before it" in reason
    zinit.inject(toy_model(DispatchingAttention), 2, K=4)


def test_zaya_is_refused_because_its_convolution_mixes_prompt_rows():
    """ZAYA's causal convolution over the sequence mixes prompt row j with the rows before it (keys and values)."""
    from transformers import CONFIG_MAPPING

    if "zaya" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no ZAYA")
    _refused_untouched(coverage.build("zaya", "causal"), "ZayaAttention mixes the rows of a sequence")


def test_tiny_models_exercise_a_non_zero_key_path():
    """Attention parameters init leaves at 0 are drawn by the sweep's build: ZAYA's per-head key scale (its keys
    were all exactly 0), Gemma 3's offset k_norm weight; the keys of every layer are then clearly non-zero."""
    import reference
    from transformers import CONFIG_MAPPING

    families = [f for f in ("zaya", "gemma3_text") if f in CONFIG_MAPPING]
    for family in families:
        model = coverage.build(family, "causal")
        for name, p in model.named_parameters():
            if ".self_attn." in name and not name.endswith("bias"):
                assert p.any(), f"{family}: {name} is all zero"
        for layer in model.model.layers:  # the layer's own forward on a prompt: the reference's capture route
            key, _ = reference.prompt_kv_at_position_0(model, layer.self_attn, torch.randn(3, model.config.hidden_size))
            assert key.abs().max() > 0.1, family


def test_the_sweep_fails_a_model_whose_prompt_keys_are_all_zero():
    """Keys of ~0 prove nothing about a key path: a row with them fails, whatever else agrees."""
    base = coverage.build("qwen3", "causal")
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.k_norm.weight.zero_()  # every key exactly 0, tokens' and prompt's alike
    row = coverage.Row("qwen3", "causal", "fail")
    coverage._run_checks(base, "causal", 2, 4, row)
    assert row.result == "fail" and "prompt keys all ~0" in row.reason, row
    assert row.checks["reference"] <= 1e-5  # everything else agrees: only the key check catches it


def test_the_headline_counts_each_family_once():
    rows = [coverage.Row("bert", "causal", "pass", key_path="independent"),
            coverage.Row("bert", "encoder", "pass", key_path="independent"),
            coverage.Row("electra", "causal", "pass", key_path="independent"),
            coverage.Row("electra", "encoder", "fail", key_path="independent"),
            coverage.Row("odd", "causal", "pass", key_path="capture: a k_conv"),
            coverage.Row("bloom", "causal", "refused")]
    head = coverage.format_markdown(rows).splitlines()[0]
    assert head.startswith("2 pass, 1 refused with a reason, 1 fail, 0 skipped (tiny config not buildable here), "
                           "of 4 families (6 rows: 2 families are checked both as causal LMs and as encoders")
    assert "independent (written-out) key path: 1 of the 2 passing families; through the capture route: 1" in head


def _prompt_keys(model, n=1, K=3):
    attn = zinit.layer_adapters(model)[n]
    prompt = torch.randn(K, model.config.hidden_size, dtype=torch.float64).float()
    key, value = hfauto.project(zinit.find_backbone(model).attention_modules(model)[n], prompt)
    return attn, prompt, key, value


def test_prompt_keys_go_through_each_familys_own_key_path():
    """The capture against the key path written out by hand for four families (what a hand-written spec would
    do): a key norm skipped, or a fused projection split wrongly, would show here."""
    torch.manual_seed(0)
    qwen3 = zinit.inject(coverage.build("qwen3", "causal"), 2, K=3)  # per-head RMS norm on keys (k_norm)
    attn = qwen3.model.layers[1].self_attn
    with torch.no_grad():
        attn.k_norm.weight.uniform_(0.5, 2.0)
    _, prompt, key, value = _prompt_keys(qwen3)
    d = attn.head_dim
    by_hand = attn.k_norm(attn.k_proj(prompt).view(3, -1, d)).transpose(0, 1)
    assert torch.allclose(key, by_hand, atol=1e-6) and not torch.allclose(key, attn.k_proj(prompt).view(3, -1, d)
                                                                           .transpose(0, 1), atol=1e-3)
    assert torch.allclose(value, attn.v_proj(prompt).view(3, -1, d).transpose(0, 1), atol=1e-6)

    olmo2 = zinit.inject(coverage.build("olmo2", "causal"), 2, K=3)  # RMS norm over the whole projected key
    attn = olmo2.model.layers[1].self_attn
    _, prompt, key, _ = _prompt_keys(olmo2)
    assert torch.allclose(key, attn.k_norm(attn.k_proj(prompt)).view(3, -1, attn.head_dim).transpose(0, 1), atol=1e-6)

    gpt2 = zinit.inject(coverage.build("gpt2", "causal"), 2, K=3)  # fused c_attn (Conv1D): q | k | v
    attn = gpt2.transformer.h[1].attn
    _, prompt, key, value = _prompt_keys(gpt2)
    _, k, v = attn.c_attn(prompt).split(attn.split_size, dim=-1)
    assert torch.allclose(key, k.view(3, attn.num_heads, -1).transpose(0, 1), atol=1e-6)
    assert torch.allclose(value, v.view(3, attn.num_heads, -1).transpose(0, 1), atol=1e-6)

    neox = zinit.inject(coverage.build("gpt_neox", "causal"), 2, K=3)  # fused query_key_value, per head q|k|v
    attn = neox.gpt_neox.layers[1].attention
    _, prompt, key, value = _prompt_keys(neox)
    qkv = attn.query_key_value(prompt).view(3, -1, 3 * attn.head_size).transpose(0, 1)
    assert torch.allclose(key, qkv.chunk(3, dim=-1)[1], atol=1e-6)
    assert torch.allclose(value, qkv.chunk(3, dim=-1)[2], atol=1e-6)


def test_soft_capped_layers_cap_the_prompt_scores_too():
    """Gemma 2 with a small cap and large prompt scores: zinit equals the reference that caps the prompt scores as the
    layer caps its token scores, and clearly differs from one that does not."""
    import reference
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma2")
    coverage._shrink(config)
    config.attn_logit_softcapping = 0.5
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    pristine = copy.deepcopy(base)
    model = zinit.inject(base, 2, K=4)
    adapters = zinit.layer_adapters(model)
    with torch.no_grad():
        for a in adapters.values():
            a.gate.fill_(1.5)
            a.prompt.mul_(8)  # large prompt scores, where the cap bites
    ids = torch.randint(3, 60, (2, 6))
    outputs = {}
    for cap_prompt in (True, False):
        ref = copy.deepcopy(pristine)
        reference.install_reference(ref, [layer.self_attn for layer in ref.model.layers],
                                    [a.prompt for a in adapters.values()], [a.gate for a in adapters.values()], "tanh",
                                    cap_prompt=cap_prompt)
        with torch.no_grad():
            outputs[cap_prompt] = ref(input_ids=ids).logits
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    assert (ours - outputs[True]).abs().max() <= 1e-5
    assert (ours - outputs[False]).abs().max() > 1e-4  # 10x the tolerance above: capping is not a rounding matter


def test_specific_backbones_win_and_the_generic_one_takes_the_rest():
    llama = coverage.build("llama", "causal")
    assert zinit.find_backbone(llama).name == "llama"
    assert zinit.find_backbone(coverage.build("bert", "encoder")).name == "roberta"
    assert zinit.find_backbone(coverage.build("qwen3", "causal")).name == "hf"
    assert zinit.get_backbone("hf").generic and not zinit.get_backbone("llama").generic


def test_a_model_with_two_towers_is_refused_naming_them():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig()
    for sub in (config.text_config, config.vision_config):
        coverage._shrink(sub)
    model = CLIPModel(config)
    with pytest.raises(hfauto.Unsupported, match=r"2 layer stacks \(text_model.encoder.layers, "
                                                 r"vision_model.encoder.layers\)"):
        zinit.inject(model, 1, K=4)
    tower = zinit.inject(model.text_model, 1, K=4)  # one tower is one model
    assert zinit.injection(tower).backbone.name == "hf"


def _opened(family: str, gate: float, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny injected model with every gate at ``gate``, input ids, and its logits."""
    torch.manual_seed(0)
    model = zinit.inject(coverage.build(family, "causal"), 2, K=4)
    with torch.no_grad():
        for a in zinit.layer_adapters(model).values():
            a.gate.fill_(gate)
    ids = torch.randint(3, 60, (batch, 6))
    with torch.no_grad():
        return model, ids, model(input_ids=ids).logits


def test_projecting_never_touches_the_module_other_threads_run():
    """The capture runs a shallow copy whose config names the capture function; a token forward of the real module
    in another thread, forced to run while a capture is paused inside its attention call, is unaffected."""
    model, ids, expected = _opened("qwen3", 1.0, 1)
    inside, resume = threading.Event(), threading.Event()
    original = hfauto._capture

    def paused(*args, **kwargs):
        out = original(*args, **kwargs)
        if threading.current_thread().name == "projector":
            inside.set()
            assert resume.wait(30)
        return out

    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(hfauto.CAPTURE, paused)
    try:
        attn = model.model.layers[1].self_attn
        worker = threading.Thread(target=lambda: hfauto.project(attn, torch.randn(4, 64)), name="projector")
        worker.start()
        assert inside.wait(30)
        with torch.no_grad():
            during = model(input_ids=ids).logits  # the real module, while the copy sits in the capture
        resume.set()
        worker.join(30)
    finally:
        AttentionInterface.register(hfauto.CAPTURE, original)
    assert torch.equal(during, expected)


def test_generic_models_copy_pickle_and_run_under_inference_mode():
    model, ids, expected = _opened("gpt2", 0.7, 2)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, expected)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert pickle.loads(pickle.dumps(zinit.injection(model).dims)) == zinit.injection(loaded).dims
    with torch.no_grad():
        for other in (twin, loaded):
            assert torch.equal(other(input_ids=ids).logits, expected)
        zinit.layer_adapters(twin)[1].gate.fill_(0.0)  # the copy has its own adapter
        assert torch.equal(model(input_ids=ids).logits, expected)
    zinit.eject(model)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, expected)
    assert all(not hasattr(m, "_zinit_position0") for m in model.modules())


def test_a_rope_that_scales_attention_puts_the_prompt_at_position_0_with_its_scale():
    """YaRN multiplies cos and sin (so every token key) by its attention factor: such a LLaMA goes to the generic
    backbone, whose prompt keys carry the factor as a token's at position 0 would, and match the reference."""
    import reference
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    assert base.model.rotary_emb.attention_scaling > 1.1
    pristine = copy.deepcopy(base)
    model = zinit.inject(base, 2, K=4)
    assert zinit.injection(model).backbone.name == "hf"
    adapters = zinit.layer_adapters(model)
    with torch.no_grad():
        for a in adapters.values():
            a.gate.fill_(1.0)
    attn = model.model.layers[1].self_attn
    key, _ = hfauto.project(attn, adapters[1].prompt)
    plain = attn.k_proj(adapters[1].prompt).view(4, 2, 16).transpose(0, 1)
    assert torch.allclose(key, plain * base.model.rotary_emb.attention_scaling, atol=1e-6)
    ref = copy.deepcopy(pristine)
    reference.install_reference(ref, [layer.self_attn for layer in ref.model.layers],
                                [a.prompt for a in adapters.values()], [a.gate for a in adapters.values()], "tanh")
    ids = torch.randint(3, 60, (2, 6))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-5


def test_a_hybrid_models_attention_layers_are_its_adapted_layers():
    """Qwen3-Next mixes linear-attention and attention layers: layer n is its n-th attention layer."""
    model = coverage.build("qwen3_next", "causal")
    stack = model.model.layers
    with_attention = [i for i, layer in enumerate(stack) if hasattr(layer, "self_attn")]
    assert 0 < len(with_attention) < len(stack)
    zinit.inject(model, 1, K=4)
    adapted = [i for i, layer in enumerate(stack) if hasattr(getattr(layer, "self_attn", None), "zinit_adapter")]
    assert adapted == with_attention[-1:]
    assert zinit.injection(model).dims.num_layers == len(with_attention)
