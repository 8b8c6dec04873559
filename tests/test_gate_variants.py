"""Gate variants of inject (issue 16): zero-init (the default), random-init (``gate_init="random"``) and no gate
(``gate="none"``: the prompt keys join the tokens' softmax, prefix attention). For each: the naive float64 reference
(tests/reference.py) on every backbone family, parameter counts, save/load and the file format; for no gate also
KV-cached ``generate()`` and the refusals; the ``zinit_random`` / ``zinit_nogate`` methods of ``zinit compare``."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import zinit
from reference import encoder_layer, install_reference, llama_layer, timm_attention_layer, vit_layer
from tiny import DELETE, clone, edit_adapter_config, padded_batch, tiny_encoder, tiny_llama, tiny_vit, tokens
from zinit.benchmarks import coverage
from zinit.methods import registry as M

VARIANTS = {  # name -> inject options
    "zero": {},
    "random": {"gate_init": "random"},
    "none": {"gate": "none"},
}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _randomize_prompts(model, seed: int = 1) -> None:
    """Random prompts (the gates stay as the variant drew them) and, for the zero gate, open gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in zinit.layer_adapters(model).values():
            adapter.prompt.copy_(torch.randn(adapter.prompt.shape, generator=g))
            if adapter.gate is not None and adapter.gate_init == "zero":
                adapter.gate.copy_(torch.randn(adapter.gate.shape, generator=g))


def _args(model, n):
    a = zinit.layer_adapters(model)[n]
    return a.prompt, a.gate, a.gate_fn


class Capture:
    """(args, kwargs, output) of the last call of each module."""

    def __init__(self, modules):
        self.last = {}
        self.handles = [m.register_forward_hook(self._hook(m), with_kwargs=True) for m in modules]

    def _hook(self, module):
        def hook(_m, args, kwargs, output):
            self.last[id(module)] = (args, kwargs, output)

        return hook

    def __getitem__(self, module):
        return self.last[id(module)]

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- the default is unchanged


def test_default_is_zero_init_and_writes_what_earlier_versions_wrote(tmp_path):
    base = tiny_llama()
    ids, mask = padded_batch("left")
    torch.manual_seed(3)
    model = zinit.inject(clone(base), 2, K=5)
    torch.manual_seed(3)
    explicit = zinit.inject(clone(base), 2, K=5, gate="head", gate_init="zero")
    for a, b in zip(zinit.layer_adapters(model).values(), zinit.layer_adapters(explicit).values()):
        assert torch.equal(a.prompt, b.prompt) and torch.equal(a.gate, torch.zeros(4)) and torch.equal(b.gate, a.gate)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           explicit(input_ids=ids, attention_mask=mask).logits)
    config = zinit.injection(model).config
    assert config.gate_init == "zero" and config.format_version() == 1
    saved = json.loads((zinit.save_adapter(model, tmp_path) / "zinit.json").read_text())
    assert saved["format_version"] == 1 and "gate_init" not in saved  # the fields zinit wrote before, plus save_id
    assert set(saved) == {"format", "format_version", "backbone", "hidden_size", "num_heads", "num_kv_heads",
                          "head_dim", "num_layers", "layers", "K", "gate", "gate_fn", "train_modules", "zinit_version",
                          "weights_bytes", "weights_sha256", "save_id"}  # (which earlier versions ignore)


# ---------------------------------------------------------------- random-init gate


@pytest.mark.parametrize("gate,width", [("head", 4), ("layer", 1)])
def test_random_init_draws_the_gate_from_a_standard_normal_right_after_the_prompt(gate, width):
    base = tiny_llama()  # (which seeds torch itself)
    torch.manual_seed(7)
    model = zinit.inject(base, [1, 3], K=5, gate=gate, gate_init="random")
    torch.manual_seed(7)
    for adapter in zinit.layer_adapters(model).values():  # bottom to top, prompt then gate, one generator
        assert torch.equal(adapter.prompt, torch.randn(5, 32))
        assert torch.equal(adapter.gate, torch.randn(width))
    counts = sum(p.numel() for p in zinit.trainable_parameters(model))
    assert counts == 2 * 5 * 32 + 2 * width  # L·K·C + L·H (or L): the same parameters as zinit's
    assert zinit.injection(model).config.gate_init == "random"
    assert "gate_init='random'" in repr(zinit.layer_adapters(model)[1])


def test_random_init_differs_from_the_base_model_at_step_0():
    base = tiny_llama()
    ids, mask = padded_batch("left")
    keep = mask.bool()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        zero = zinit.inject(clone(base), 3, K=5)(input_ids=ids, attention_mask=mask).logits
        rand = zinit.inject(clone(base), 3, K=5, gate_init="random")(input_ids=ids, attention_mask=mask).logits
    assert _max_diff(zero[keep], want[keep]) <= 1e-6  # the method: the base model until the gates move
    assert _max_diff(rand[keep], want[keep]) > 1e-2  # the ablation: it is not


# ---------------------------------------------------------------- the naive reference, every variant, every family


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type,heads,kv_heads", [("llama", 4, 2), ("mistral", 4, 1)])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", None])  # None: no padding, so SDPA gets no mask (its own is_causal)
def test_llama_matches_the_reference(variant, model_type, heads, kv_heads, attn, side):
    model = zinit.inject(tiny_llama(model_type, heads, kv_heads, attn_implementation=attn), [1, 3], K=5,
                         **VARIANTS[variant])
    _randomize_prompts(model)
    ids, mask = padded_batch(side) if side else (tokens(3, 9), None)
    layers = model.model.layers
    cap = Capture([layers[n].self_attn for n in (1, 3)])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    cap.close()
    keep = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    for n in (1, 3):
        module = layers[n].self_attn
        _, kwargs, output = cap[module]
        cos, sin = kwargs["position_embeddings"]
        want = llama_layer(module, kwargs["hidden_states"], cos, sin, mask, *_args(model, n))
        assert _max_diff(output[0][keep], want[keep]) <= 1e-5
        plain = llama_layer(module, kwargs["hidden_states"], cos, sin, mask, _args(model, n)[0], torch.zeros(1),
                            "identity")
        assert _max_diff(want[keep], plain[keep]) > 1e-3  # the prompt really changes the layer


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_vit_matches_the_reference(variant, fused, images):
    model = zinit.inject(tiny_vit(), [0, 3], K=4, **VARIANTS[variant])
    for block in model.blocks:
        block.attn.fused_attn = fused
    _randomize_prompts(model)
    attns = [model.blocks[n].attn for n in (0, 3)]
    cap = Capture(attns)
    with torch.no_grad():
        model(images)
    cap.close()
    for n, attn in zip((0, 3), attns):
        args, _, output = cap[attn]
        assert _max_diff(output, vit_layer(attn, args[0], *_args(model, n))) <= 1e-5


def test_vit_qk_norm_without_gate_matches_the_reference(images):
    """The prompt keys of gate='none' go through k_norm as the tokens' do."""
    model = zinit.inject(tiny_vit(qk_norm=True), 1, K=4, gate="none")
    _randomize_prompts(model)
    attn = model.blocks[3].attn
    with torch.no_grad():
        attn.k_norm.weight.uniform_(0.5, 2.0)
    cap = Capture([attn])
    with torch.no_grad():
        model(images)
    args, _, output = cap[attn]
    assert _max_diff(output, timm_attention_layer(attn, args[0], *_args(model, 3))) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model_type,attn", [("roberta", "sdpa"), ("roberta", "eager"), ("bert", "sdpa")])
@pytest.mark.parametrize("padded", [True, False])
def test_encoder_matches_the_reference(variant, model_type, attn, padded):
    base = tiny_encoder(model_type, "cls")
    base.config._attn_implementation = attn
    model = zinit.inject(base, 2, K=4, **VARIANTS[variant])
    _randomize_prompts(model)
    ids, mask = padded_batch("right") if padded else (tokens(3, 9), torch.ones(3, 9, dtype=torch.long))
    layers = model.base_model.encoder.layer
    attns = [layers[n].attention.self for n in (1, 2)]
    cap = Capture(attns)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    cap.close()
    keep = mask.bool()
    for n, a in zip((1, 2), attns):
        args, kwargs, output = cap[a]
        hidden = args[0] if args else kwargs["hidden_states"]
        want = encoder_layer(a, hidden, mask, *_args(model, n))
        assert _max_diff(output[0][keep], want[keep]) <= 1e-5


def _generic_case(family: str):
    base = coverage.build(family, "causal")
    ids, mask = padded_batch("left")
    ids = ids % 57 + 3  # inside the tiny vocabularies (coverage's inputs: 3..59)
    return base, ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["gpt2", "qwen3"])  # fused Conv1D c_attn / per-head key norm with RoPE and GQA
def test_generic_hf_backbone_matches_the_reference(variant, family):
    base, ids, mask = _generic_case(family)
    pristine = copy.deepcopy(base)
    model = zinit.inject(base, 2, K=4, **VARIANTS[variant])
    assert zinit.injection(model).backbone.name == "hf"
    _randomize_prompts(model)
    adapters = zinit.layer_adapters(model)
    reference = copy.deepcopy(pristine)
    reference.set_attn_implementation("eager")  # the prefix reference reads eager's materialised masks
    attns = [zinit.find_backbone(reference).attention_modules(reference)[n] for n in adapters]
    install_reference(reference, attns, [a.prompt for a in adapters.values()], [a.gate for a in adapters.values()],
                      zinit.injection(model).gate_fn)
    keep = mask.bool()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
        plain = pristine(input_ids=ids, attention_mask=mask).logits
    assert _max_diff(got[keep], want[keep]) <= 1e-5
    assert _max_diff(got[keep], plain[keep]) > 1e-3


# ---------------------------------------------------------------- no gate: KV cache, training, counts, refusals


def _cached_vs_full(model, ids, mask, steps: int = 5) -> float:
    """Greedy cached generate(): the largest gap between each step's logits and a full forward's (real rows)."""
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], steps - 1, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # as generate() numbers them
        full = model(input_ids=gen.sequences[:, :-1], attention_mask=full_mask, position_ids=positions).logits
    cached = torch.stack(gen.logits, dim=1)
    return _max_diff(cached, full[:, ids.shape[1] - 1:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_gate_generate_with_kv_cache_equals_full_forwards(attn):
    base = tiny_llama(attn_implementation=attn)
    ids, mask = padded_batch("left")
    model = zinit.inject(clone(base), 3, K=5, gate="none")
    assert _cached_vs_full(model, ids, mask) <= 1e-4
    with torch.no_grad():  # and the prompt keys matter
        out = model(input_ids=ids, attention_mask=mask, output_attentions=attn == "eager")
        assert _max_diff(out.logits[mask.bool()], base(input_ids=ids, attention_mask=mask).logits[mask.bool()]) > 1e-2
    if attn == "eager":  # attention weights keep the tokens' layout (the prompt columns are left out)
        assert [tuple(a.shape) for a in out.attentions] == [(3, 4, 9, 9)] * 4


def test_no_gate_generate_on_the_generic_backbone_equals_full_forwards():
    base, ids, mask = _generic_case("qwen3")
    model = zinit.inject(base, 2, K=4, gate="none")
    assert _cached_vs_full(model, ids, mask) <= 1e-4


def test_no_gate_counts_and_trains_the_prompts_only(tmp_path):
    model = zinit.inject(tiny_llama(), 3, K=5, gate="none")
    params = zinit.trainable_parameters(model)
    assert sum(p.numel() for p in params) == 3 * 5 * 32  # L·K·C, no gates
    assert all(a.gate is None for a in zinit.layer_adapters(model).values())
    assert sorted(zinit.adapter_state_dict(model)) == [f"layers.{n}.prompt" for n in (1, 2, 3)]
    before = [p.detach().clone() for p in params]
    ids = tokens(2, 8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.layers.{n}.self_attn.zinit_adapter.prompt" for n in (1, 2, 3)]


def test_no_gate_is_refused_where_it_cannot_be_exact(tmp_path):
    with pytest.raises(ValueError, match="gate='none' has no gate, so gate_init='random' does not apply"):
        zinit.inject(tiny_llama(), 2, K=4, gate="none", gate_init="random")
    with pytest.raises(ValueError, match="gate_fn='identity' does not apply"):
        zinit.inject(tiny_llama(), 2, K=4, gate="none", gate_fn="identity")
    with pytest.raises(ValueError, match=r"gate_init='uniform' must be one of \['zero', 'random'\]"):
        zinit.inject(tiny_llama(), 2, K=4, gate_init="uniform")
    # an attention implementation whose masks are not tensors: refused at inject time, the model left as it was
    flash = tiny_llama()
    flash.config._attn_implementation = "flash_attention_2"  # (no flash-attn package here; the refusal comes first)
    with pytest.raises(ValueError, match="uses 'flash_attention_2': load the model with attn_implementation='sdpa'"):
        zinit.inject(flash, 2, K=4, gate="none")
    assert not zinit.is_injected(flash) and all(p.requires_grad for p in flash.parameters())
    assert not any(type(m.config).__name__ == "AdaptedConfig" for m in flash.modules() if hasattr(m, "config"))
    # ... and at call time, if the implementation changes after inject (a user's own kernel: SDPA under another name)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("gate_variants_kernel", sdpa_attention_forward)
    AttentionMaskInterface.register("gate_variants_kernel", sdpa_mask)
    model = zinit.inject(tiny_llama(), 2, K=4, gate="none")
    model.config._attn_implementation = "gate_variants_kernel"
    with pytest.raises(ValueError, match="uses 'gate_variants_kernel'"):
        model(input_ids=tokens(1, 4))
    # a backbone that does not declare joint softmax
    spec = zinit.register_backbone(dataclasses.replace(zinit.get_backbone("vit"), name="vit-gated-only",
                                                       joint_softmax=False))
    try:
        with pytest.raises(ValueError, match="backbone 'vit-gated-only' does not do"):
            zinit.inject(tiny_vit(), 2, K=4, gate="none", backbone=spec.name)
    finally:
        zinit.registry.unregister_backbone(spec.name)
    # prompt_term is the gated adapters' call
    vit = zinit.inject(tiny_vit(), 1, K=4, gate="none")
    with pytest.raises(ValueError, match="no separate prompt term"):
        zinit.prompt_term(vit.blocks[3].attn, torch.randn(1, 3, 5, 16), 0.25)
    with pytest.raises(ValueError, match="has no gate"):
        zinit.layer_adapters(vit)[3].gate_values()
    # named adapters are gated
    with pytest.raises(ValueError, match="named adapters are gated"):
        zinit.add_adapter(tiny_vit(), "a", layers=2, K=4, gate="none")
    folder = zinit.save_adapter(vit, tmp_path / "nogate")
    with pytest.raises(ValueError, match="has gate='none'.*named adapters are gated.*load it alone with zinit.load_adapter"):
        zinit.add_adapter(tiny_vit(), "a", folder)


def test_named_adapters_take_a_random_init_gate(images):
    vit = tiny_vit()
    torch.manual_seed(5)
    zinit.add_adapter(vit, "r", layers=2, K=4, gate_init="random")
    gates = [p for p in zinit.adapter_parameters(vit, "r") if p.ndim == 1]
    assert all(g.abs().min() > 0 for g in gates)
    assert zinit.bank.named_adapter_config(vit, "r").gate_init == "random"
    with torch.no_grad():
        base = vit(images)
        with zinit.use_adapters(vit, "r"):
            assert _max_diff(vit(images), base) > 1e-3


# ---------------------------------------------------------------- save / load and the file format


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip(variant, tmp_path, images):
    model = zinit.inject(tiny_vit(), 2, K=4, train_modules=["head"], **VARIANTS[variant])
    _randomize_prompts(model)
    folder = zinit.save_adapter(model, tmp_path / variant)
    saved = json.loads((folder / "zinit.json").read_text())
    keys = sorted(load_file(str(folder / "adapter.safetensors")))
    if variant == "none":
        assert saved["format_version"] == 2 and saved["gate"] == "none" and "gate_init" not in saved
        assert not any(k.endswith(".gate") for k in keys)
    else:
        assert saved["format_version"] == 1 and saved.get("gate_init", "zero") == variant
        assert {"layers.2.gate", "layers.3.gate"} <= set(keys)
    fresh = zinit.load_adapter(tiny_vit(), folder)
    assert zinit.injection(fresh).config == zinit.injection(model).config
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    zinit.load_adapter(fresh, folder)  # into a model injected alike: the configs compare equal


def test_gate_options_are_compared_on_load(tmp_path):
    folder = zinit.save_adapter(zinit.inject(tiny_vit(), 2, K=4, gate_init="random"), tmp_path / "random")
    with pytest.raises(ValueError, match="mismatch on gate_init: the adapter in .* has gate_init=random, the model is "
                                         "injected with gate_init=zero"):
        zinit.load_adapter(zinit.inject(tiny_vit(), 2, K=4), folder)
    nogate = zinit.save_adapter(zinit.inject(tiny_vit(), 2, K=4, gate="none"), tmp_path / "none")
    with pytest.raises(ValueError, match="mismatch on gate: .* has gate=none, the model is injected with gate=head"):
        zinit.load_adapter(zinit.inject(tiny_vit(), 2, K=4), nogate)


_rewrite = edit_adapter_config


def test_files_of_older_zinit_load_and_older_zinit_refuses_no_gate_files(tmp_path, images, monkeypatch):
    random = zinit.inject(tiny_vit(), 2, K=4, gate_init="random")
    folder = zinit.save_adapter(random, tmp_path / "old")
    _rewrite(folder, gate_init=DELETE, format_version=DELETE)  # as the first zinit wrote it: no gate_init, no version
    old = zinit.load_adapter(tiny_vit(), folder)
    assert zinit.injection(old).config.gate_init == "zero"  # how the gate started is unknown; where it is, is not
    with torch.no_grad():
        assert torch.equal(old(images), random(images))

    nogate = zinit.save_adapter(zinit.inject(tiny_vit(), 2, K=4, gate="none"), tmp_path / "none")
    default = zinit.save_adapter(zinit.inject(tiny_vit(), 2, K=4), tmp_path / "default")
    randomized = zinit.save_adapter(random, tmp_path / "random")
    monkeypatch.setattr(zinit.config, "FORMAT_VERSION", 1)  # a zinit that knows version 1 only
    with pytest.raises(ValueError, match="has format_version 2, newer than this zinit .* reads \\(1\\); upgrade zinit"):
        zinit.load_adapter(tiny_vit(), nogate)
    for readable in (default, randomized):  # what it can compute, it reads
        zinit.load_adapter(tiny_vit(), readable)
    monkeypatch.undo()

    _rewrite(nogate, format_version=1)  # hand-edited down: a version-1 reader would compute it wrongly
    with pytest.raises(ValueError, match="field 'format_version' must be 2 for gate \"none\""):
        zinit.load_adapter(tiny_vit(), nogate)
    _rewrite(default, gate_init="uniform")
    with pytest.raises(ValueError, match="field 'gate_init' must be one of \\['zero', 'random'\\], got \"uniform\""):
        zinit.read_adapter_config(default)


# ---------------------------------------------------------------- methods for zinit compare / zinit train --method


CONTEXTS = {
    "llama": (tiny_llama, M.MethodContext("alpaca", 2, 3), 2 * 3 * 32, 2 * 4),
    "vit": (tiny_vit, M.MethodContext("vtab", 2, 3, head=["head"], task="image_classification"),
            2 * 3 * 48 + 48 * 10 + 10, 2 * 3),
    "roberta": (lambda: tiny_encoder("roberta", "qa"),
                M.MethodContext("squad", 2, 3, head=["qa_outputs"], task="question_answering"), 2 * 3 * 32 + 66, 2 * 4),
}


@pytest.mark.parametrize("family", list(CONTEXTS))
def test_variant_methods_prepare_their_variant(family):
    build, ctx, prompts, gates = CONTEXTS[family]
    for method, options, count in (("zinit_random", {"gate_init": "random"}, prompts + gates),
                                   ("zinit_nogate", {"gate": "none"}, prompts)):
        model = M.prepare(method, build(), ctx)
        config = zinit.injection(model).config
        assert (config.gate, config.gate_init) == (options.get("gate", "head"), options.get("gate_init", "zero"))
        assert M.trainable_count(model) == count
        assert M.is_zinit(method) and M.defaults_of(method) == "zinit"
        assert M.zinit_config(method) == zinit.AdapterConfig(**options)


def test_variant_methods_take_zinits_learning_rates():
    from zinit.cli import build_parser

    for recipe, args in (("alpaca", []), ("alpaca", ["--model", "x", "--data", "y"]), ("scienceqa", ["--data", "x"]),
                         ("squad", []), ("vtab", ["--task", "dtd", "--data", "x"])):
        parsed = {m: build_parser().parse_args(["train", recipe, *args, "--method", m, "--output", "-"])
                  for m in ("zinit", "zinit_random", "zinit_nogate")}
        want = M.recipe_blr(recipe, "zinit", parsed["zinit"])
        assert want is not None
        for m in ("zinit_random", "zinit_nogate"):
            assert M.recipe_blr(recipe, m, parsed[m]) == want, (recipe, args, m)
    assert M.recipe_blr("alpaca", "zinit_nogate", build_parser().parse_args(
        ["train", "alpaca", "--method", "zinit_nogate", "--output", "-"])) == 0.6  # the embedded run's
    assert M.recipe_blr("scienceqa", "zinit_random") == 9e-3  # the recipe's own table, under zinit's name
    with pytest.raises(ValueError, match="does not inject zinit"):
        M.zinit_config("lora")


def test_zinit_train_with_a_variant_method(tmp_path, tiny_model_dir, alpaca_file, capsys):
    from zinit.cli import main as cli

    out = tmp_path / "run"
    assert cli(["train", "alpaca", "--method", "zinit_nogate", "--output", str(out), "--model", str(tiny_model_dir),
                "--data", str(alpaca_file), "--layers", "2", "--K", "4", "--epochs", "1", "--batch-size", "8",
                "--skip-eval-before", "--no-progress", "--device", "cpu"]) == 0
    assert "top 2 layers, K=4 (zinit_nogate): 256 trainable parameters" in capsys.readouterr().out
    saved = json.loads((out / "adapter" / "zinit.json").read_text())
    assert saved["gate"] == "none" and saved["format_version"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "zinit_nogate" and summary["trainable_parameters"] == 2 * 4 * 32


def test_more_layers_than_the_model_has_adapts_all_and_says_so(capsys):
    model = M.prepare("zinit", tiny_llama(), M.MethodContext("alpaca", 32, 3))
    assert zinit.injection(model).layers == (0, 1, 2, 3)
    assert "--layers 32 is more than the model's 4 layers: adapting all 4" in capsys.readouterr().err
    M.prepare("zinit", tiny_llama(), M.MethodContext("alpaca", 4, 3))
    assert "note:" not in capsys.readouterr().err
