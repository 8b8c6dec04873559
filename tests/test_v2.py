"""LLaMA-Adapter V2's additions (inject(bias_scale=..., train_norms=...)): they start as the identity on every backbone
family, compute what a litgpt-style reference computes (linears replaced by y = s·(Wx + b) modules, written here),
train under fused AdamW without touching a frozen weight, survive copies, pickles and inference_mode, save and load
(zinit.json format_version 3), eject to the exact base, convert to and from litgpt's adapter_v2 naming, and count
Llama-2-7B's trainable parameters as the formula and litgpt's published figure say."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from torch import nn

import zinit
from reference import gated_attention, install_reference
from tiny import edit_adapter_config, tiny_encoder, tiny_llama, tiny_vit, tokens
from zinit.methods import registry as M

V2 = {"bias_scale": True, "train_norms": True}


class RefV2Linear(nn.Module):
    """litgpt's AdapterV2Linear, written from its definition: ``scale * (linear(x) + bias)``."""

    def __init__(self, linear: nn.Module, bias: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.linear, self.b, self.s = linear, bias.detach().clone(), scale.detach().clone()

    def forward(self, x):
        return self.s * (self.linear(x) + self.b)


def _randomize_v2(model, seed=5):
    """Every trainable tensor of a V2 adapter away from its start: prompts, gates (open), biases, scales, norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in zinit.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _reference(base, model):
    """A never-injected copy of ``base`` computing ``model``'s V2 additions litgpt's way (each linear wrapped, each
    norm holding the trained values); the prompts and gates come separately."""
    ref = copy.deepcopy(base)
    state, inj = zinit.adapter_state_dict(model), zinit.injection(model)
    for name in inj.linears:
        parent, _, child = name.rpartition(".")
        holder = ref.get_submodule(parent) if parent else ref
        setattr(holder, child, RefV2Linear(ref.get_submodule(name), state[f"linears.{name}.bias"],
                                           state[f"linears.{name}.scale"]))
    with torch.no_grad():
        for name in inj.norms:
            for pname, p in ref.get_submodule(name).named_parameters(recurse=False):
                p.copy_(state[f"norms.{name}.{pname}"])
    return ref


@pytest.mark.parametrize("family", ["llama", "vit", "roberta"])
@pytest.mark.parametrize("scope", [True, "all"])
def test_v2_starts_as_the_base_model_bit_for_bit(family, scope):
    base = {"llama": tiny_llama, "vit": tiny_vit, "roberta": lambda: tiny_encoder("roberta")}[family]().eval()
    x = torch.randn(2, 3, 32, 32) if family == "vit" else tokens(2, 9)
    run = (lambda m: m(x)) if family == "vit" else (lambda m: m(input_ids=x).logits if family == "llama"
                                                     else m(input_ids=x).last_hidden_state)
    with torch.no_grad():
        want = run(base)
        model = zinit.inject(copy.deepcopy(base), 2, 4, bias_scale=scope, train_norms=True)
        assert torch.equal(run(model), want)
    inj = zinit.injection(model)
    assert inj.linears and inj.norms and inj.config.bias_scale == ("blocks" if scope is True else "all")
    head = {"llama": "lm_head", "vit": "head", "roberta": "pooler.dense"}[family]
    assert (head in inj.linears) == (scope == "all")  # "blocks": only the transformer blocks' linear layers


def test_v2_llama_matches_a_litgpt_style_reference_with_open_gates():
    base = tiny_llama().eval()
    model = zinit.inject(copy.deepcopy(base), 2, 4, bias_scale="all", train_norms=True)
    _randomize_v2(model)
    ref = _reference(base, model)
    adapters = zinit.layer_adapters(model)
    install_reference(ref, [ref.model.layers[n].self_attn for n in adapters],
                      [a.prompt.detach() for a in adapters.values()], [a.gate for a in adapters.values()], "tanh")
    x, mask = tokens(2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        ours, want = model(input_ids=x, attention_mask=mask).logits, ref(input_ids=x, attention_mask=mask).logits
        plain = zinit.inject(copy.deepcopy(base), 2, 4)  # the same prompts and gates without the V2 additions
        zinit.load_adapter_state_dict(plain, {k: v for k, v in zinit.adapter_state_dict(model).items()
                                              if k.startswith("layers.")})
        without = plain(input_ids=x, attention_mask=mask).logits
    assert (ours - want)[mask.bool()].abs().max() <= 1e-5
    assert (ours - without).abs().max() > 1e-2  # the additions are really in the computation


def test_v2_vit_prompt_keys_go_through_the_qkv_bias_and_scale():
    """timm's ViT projects prompts from a slice of the fused qkv weight itself: the k and v thirds of the bias/scale
    must apply there too (a naive float64 layer, written here, agrees; one without them would not)."""
    model = zinit.inject(tiny_vit().eval(), 1, 3, bias_scale=True)
    _randomize_v2(model)
    n, adapter = next(iter(zinit.layer_adapters(model).items()))
    attn = model.blocks[n].attn
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    x, H = seen["x"].double(), attn.num_heads
    qkv_bs, proj_bs = attn.qkv.zinit_bias_scale, attn.proj.zinit_bias_scale

    def lin(t, mod, bs, rows=slice(None)):
        y = t @ mod.weight[rows].double().T + mod.bias[rows].double()
        return bs.scale[rows].double() * (y + bs.bias[rows].double())

    C = x.shape[-1]
    heads = lambda t: t.unflatten(-1, (H, -1)).transpose(-2, -3)  # noqa: E731
    q, k, v = (heads(lin(x, attn.qkv, qkv_bs, slice(i * C, (i + 1) * C))) for i in range(3))
    P = adapter.prompt.detach().double()
    kp, vp = (heads(lin(P, attn.qkv, qkv_bs, slice(i * C, (i + 1) * C))) for i in (1, 2))
    out = gated_attention(q, k, v, kp, vp, adapter.gate.detach(), "tanh", attn.scale, None)
    want = lin(out.transpose(1, 2).flatten(2), attn.proj, proj_bs)
    assert (seen["out"].double() - want).abs().max() <= 1e-5


def test_v2_trains_under_fused_adamw_copies_and_ejects_to_the_exact_base():
    base = tiny_llama().eval()
    model = zinit.inject(copy.deepcopy(base), 2, 4, **V2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = zinit.trainable_parameters(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    opt = torch.optim.AdamW(trainable, lr=1e-2, fused=True)  # HF Trainer's default optimizer
    x = tokens(2, 9)
    model.train()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    state = zinit.adapter_state_dict(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    name = zinit.injection(model).linears[0]
    assert not torch.equal(state[f"linears.{name}.scale"], torch.ones_like(state[f"linears.{name}.scale"]))
    norm = zinit.injection(model).norms[0]
    assert not torch.equal(state[f"norms.{norm}.weight"], base.get_submodule(norm).weight)
    with torch.no_grad():
        trained = model(input_ids=x).logits
        twin = copy.deepcopy(model)  # its own vectors: zeroing them changes the copy only
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        unpickled = torch.load(buffer, weights_only=False)
        assert torch.equal(twin(input_ids=x).logits, trained)
        assert torch.equal(unpickled(input_ids=x).logits, trained)
        for key, value in zinit.adapter_state_dict(twin).items():
            if key.startswith("linears.") and key.endswith(".scale"):  # the copy's own scales, nothing else
                value.zero_()
        assert not torch.equal(twin(input_ids=x).logits, trained)
        assert torch.equal(model(input_ids=x).logits, trained)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=x).logits, trained)
    zinit.eject(model)
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())  # norms put back
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_v2_saves_and_loads_as_format_version_3(tmp_path):
    base = tiny_llama().eval()
    model = zinit.inject(copy.deepcopy(base), 2, 4, bias_scale="all", train_norms=True)
    _randomize_v2(model)
    folder = zinit.save_adapter(model, tmp_path / "a")
    saved = json.loads((folder / "zinit.json").read_text())
    assert saved["format_version"] == 3 and saved["bias_scale"] == "all" and saved["train_norms"] is True
    fresh = zinit.load_adapter(copy.deepcopy(base), folder)
    x = tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)
    plain = json.loads((zinit.save_adapter(zinit.inject(copy.deepcopy(base), 2, 4), tmp_path / "p")
                        / "zinit.json").read_text())
    assert plain["format_version"] == 1 and "bias_scale" not in plain and "train_norms" not in plain
    edit_adapter_config(folder, format_version=2)  # as if a version-2 zinit could read it: it would drop them
    with pytest.raises(ValueError, match="format_version.*3 for bias_scale"):
        zinit.load_adapter(copy.deepcopy(base), folder)
    edit_adapter_config(folder, format_version=3, bias_scale="some")
    with pytest.raises(ValueError, match="bias_scale.*null, \"blocks\" or \"all\""):
        zinit.load_adapter(copy.deepcopy(base), folder)


def test_v2_bad_options_and_named_adapters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="bias_scale='some' must be False, True"):
        zinit.inject(tiny_llama(), 2, 4, bias_scale="some")
    with pytest.raises(ValueError, match="train_norms='yes' must be True or False"):
        zinit.inject(tiny_llama(), 2, 4, train_norms="yes")
    folder = zinit.save_adapter(zinit.inject(tiny_llama(), 2, 4, **V2), tmp_path / "v2")
    with pytest.raises(ValueError, match="bias/scale or trained norms"):
        zinit.add_adapter(tiny_llama(), "v2", folder)


def test_litgpt_adapter_v2_naming_round_trips_and_refuses_what_litgpt_cannot_hold():
    base = tiny_llama(layers=3).eval()
    model = zinit.inject(copy.deepcopy(base), 2, 4, gate_fn="identity", bias_scale="all", train_norms=True)
    _randomize_v2(model)
    state, config, dims = zinit.adapter_state_dict(model), zinit.injection(model).config, zinit.injection(model).dims
    lit = zinit.convert.to_litgpt(state, config, dims)
    H, Hkv, d, C, inter, V = 4, 2, 8, 32, 64, 96
    assert lit["transformer.h.2.attn.gating_factor"].shape == (1, 1, H, 1)
    assert lit["transformer.h.0.attn.qkv.adapter_bias"].shape == ((H + 2 * Hkv) * d,)  # every layer, adapted or not
    assert torch.equal(lit["transformer.h.0.attn.qkv.adapter_scale"][H * d:(H + Hkv) * d],
                       state["linears.model.layers.0.self_attn.k_proj.scale"])  # [q | k | v], litgpt's layout
    assert lit["transformer.h.1.mlp.fc_1.adapter_bias"].shape == (inter,)  # fc_1 = gate_proj
    assert torch.equal(lit["transformer.h.1.mlp.fc_2.adapter_bias"], state["linears.model.layers.1.mlp.up_proj.bias"])
    assert torch.equal(lit["transformer.ln_f.weight"], state["norms.model.norm.weight"])
    assert lit["lm_head.adapter_scale"].shape == (V,)
    assert "transformer.h.0.attn.adapter_wte.weight" not in lit  # layer 0 is not adapted
    # what litgpt's own adapter_filter trains is exactly what is here
    litgpt_filter = ("adapter_wte", "gating_factor", "adapter_scale", "adapter_bias", "norm_1", "norm_2", "ln_f")
    assert all(any(s in k for s in litgpt_filter) for k in lit)
    assert sum(v.numel() for v in lit.values()) == sum(v.numel() for v in state.values())
    back = zinit.convert.from_litgpt({f"_forward_module.{k}": v for k, v in lit.items()}, config, dims)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="gate_fn='tanh'.*raw gating_factor"):
        zinit.convert.to_litgpt(state, config.replace(gate_fn="tanh"), dims)
    with pytest.raises(ValueError, match='bias_scale="blocks".*LM head'):
        zinit.convert.to_litgpt(state, config.replace(bias_scale="blocks"), dims)
    with pytest.raises(KeyError, match="lacks.*transformer.h.0.attn.qkv.adapter_bias"):
        zinit.convert.from_litgpt({k: v for k, v in lit.items() if "h.0.attn.qkv.adapter_bias" not in k}, config, dims)
    # litgpt's v1 adapter: prompts and raw gates only
    v1 = zinit.inject(copy.deepcopy(base), 2, 4, gate_fn="identity")
    v1_config = zinit.injection(v1).config
    v1_lit = zinit.convert.to_litgpt(zinit.adapter_state_dict(v1), v1_config, dims)
    assert sorted(v1_lit) == sorted(f"transformer.h.{n}.attn.{w}" for n in (1, 2)
                                    for w in ("adapter_wte.weight", "gating_factor"))
    with pytest.raises(KeyError, match="no place for"):
        zinit.convert.from_litgpt(lit, v1_config, dims)


def _meta_llama2_7b():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg), cfg


@pytest.mark.parametrize("options, litgpt_name", [({}, "adapter"), ({"bias_scale": "all", "train_norms": True},
                                                                     "adapter_v2"), (V2, None)])
def test_llama2_7b_trainable_counts_match_the_formula_and_litgpt(options, litgpt_name, capsys):
    """litgpt publishes 1,229,760 (adapter) and 4,279,744 (adapter_v2) trainable parameters for Llama-2-7B. zinit's
    V2 default (bias_scale=True: the blocks' linear layers) leaves out the LM head's bias and scale, 2 × 32,000."""
    model, cfg = _meta_llama2_7b()
    zinit.inject(model, 30, 10, **options)
    count = sum(p.numel() for p in zinit.trainable_parameters(model))
    L, K, C, H, n, inter, V = 30, 10, 4096, 32, 32, 11008, 32000
    formula = L * K * C + L * H  # prompts and per-head gates of the top 30 layers
    if options:
        formula += n * 2 * (3 * C + C + 2 * inter + C)  # bias + scale of q, k, v, o, gate, up, down in every layer
        formula += (2 * n + 1) * C  # two RMSNorms per layer and the final one
        if options["bias_scale"] == "all":
            formula += 2 * V  # the LM head's bias and scale
    published = {"adapter": 1_229_760, "adapter_v2": 4_279_744}
    print(f"Llama-2-7B, zinit.inject(model, 30, 10, {options}): {count:,} trainable parameters")
    assert count == formula
    if litgpt_name:
        assert count == published[litgpt_name]
    else:
        assert count == published["adapter_v2"] - 2 * V == 4_215_744
    assert "trainable parameters" in capsys.readouterr().out


def test_zinit_v2_method_prepares_the_v2_adapter():
    ctx = M.MethodContext("alpaca", 2, 3)
    model = M.prepare("zinit_v2", tiny_llama(), ctx)
    inj = zinit.injection(model)
    assert inj.config.bias_scale == "blocks" and inj.config.train_norms
    per_layer = 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)  # bias + scale on q, k, v (2 KV heads of 8), o, gate, up, down
    assert M.trainable_count(model) == 2 * (3 * 32 + 4) + 4 * per_layer + 9 * 32
    assert M.defaults_of("zinit_v2") == "zinit" and M.zinit_config("zinit_v2") == zinit.AdapterConfig(**V2)
    assert math.isclose(M.recipe_blr("vtab", "zinit_v2"), M.recipe_blr("vtab", "zinit"))


def test_v2_bf16_model_trains_its_norms_in_float32_and_ejects_to_the_bf16_base():
    """An Adam step of 1e-3 cannot move a bf16 weight near 1 (its resolution there is 2^-7): the norms train in
    float32, their outputs cast back, so the model still starts bit-for-bit as the bf16 base."""
    base = tiny_llama().to(torch.bfloat16).eval()
    x = tokens(2, 9)
    model = zinit.inject(copy.deepcopy(base), 2, 4, **V2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    norm = zinit.injection(model).norms[0]
    weight = model.get_submodule(norm).weight
    assert weight.dtype == torch.float32 and all(p.dtype == torch.float32 for p in zinit.trainable_parameters(model))
    opt = torch.optim.AdamW(zinit.trainable_parameters(model), lr=1e-3)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert (weight - base.get_submodule(norm).weight.float()).abs().max() > 5e-4  # a bf16 weight would not move
    zinit.eject(model)
    assert model.get_submodule(norm).weight.dtype == torch.bfloat16
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("first, then", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                         (torch.bfloat16, torch.float32)], ids=["f32-bf16", "bf16-f16", "bf16-f32"])
def test_v2_survives_a_dtype_cast_after_inject(first, then):
    """``model.to(dtype)`` after inject (build, inject, then move and cast): the model computes what the cast base
    computes, bit for bit, the bias/scale vectors and the norms still train in float32 (the norms' first forward
    after the cast may run under inference_mode), and eject gives back the cast base, dtypes and values."""
    base = tiny_llama().to(first).eval()
    x = tokens(2, 9)
    model = zinit.inject(copy.deepcopy(base), 2, 4, **V2).to(then)
    cast = copy.deepcopy(base).to(then)
    inj = zinit.injection(model)
    assert {model.get_submodule(n).zinit_bias_scale.scale.dtype for n in inj.linears} == {torch.float32}
    with torch.inference_mode():
        assert torch.equal(model(input_ids=x).logits, cast(input_ids=x).logits)
    norms = [model.get_submodule(n).weight for n in inj.norms]
    assert {w.dtype for w in norms} == {torch.float32}
    before = [w.detach().clone() for w in norms]
    opt = torch.optim.AdamW(zinit.trainable_parameters(model), lr=1e-3, weight_decay=0.0)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert min((w - b).abs().max().item() for w, b in zip(norms, before)) > 5e-4  # a bf16/fp16 1.0 would not move
    zinit.eject(model)
    assert {k: (v.dtype, v.shape) for k, v in model.state_dict().items()} == {
        k: (v.dtype, v.shape) for k, v in cast.state_dict().items()}
    assert all(torch.equal(v, cast.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _tie_norms(model):
    layer = model.model.layers[1]
    layer.post_attention_layernorm.weight = layer.input_layernorm.weight  # tied, as some checkpoints tie them
    return model


@pytest.mark.parametrize("first, then", [(torch.float32, None), (torch.bfloat16, None),
                                         (torch.float32, torch.bfloat16)], ids=["f32", "bf16", "f32-then-bf16"])
def test_v2_norms_that_share_one_weight_train_and_save_it_once(tmp_path, first, then):
    base = _tie_norms(tiny_llama()).to(first).eval()
    x = tokens(2, 9)
    model = zinit.inject(copy.deepcopy(base), 2, 4, train_norms=True)
    if then is not None:
        model.to(then)
        base = copy.deepcopy(base).to(then)
    with torch.no_grad():  # both norms cast their output back, the second one too
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    params = zinit.trainable_parameters(model)
    assert len(params) == len({id(p) for p in params})
    _randomize_v2(model)
    folder = zinit.save_adapter(model, tmp_path / "a")
    loaded = zinit.load_adapter(_tie_norms(tiny_llama()).to(then or first), folder)
    state = zinit.adapter_state_dict(loaded)
    assert "norms.model.layers.1.input_layernorm.weight" in state
    assert "norms.model.layers.1.post_attention_layernorm.weight" not in state
    assert all(torch.equal(v, zinit.adapter_state_dict(model)[k]) for k, v in state.items())
    zinit.eject(model)
    assert all(torch.equal(v, base.state_dict()[k]) and v.dtype == base.state_dict()[k].dtype
               for k, v in model.state_dict().items())


def test_v2_eject_restores_each_norms_own_dtype_in_a_mixed_precision_model_frozen_before_eject():
    """A bf16 base that keeps some layers in float32 (as transformers' keep_in_fp32 modules do), and a user who
    freezes everything before eject: each norm goes back to the dtype it had, not to a neighbour's."""
    base = tiny_llama().to(torch.bfloat16).eval()
    for layer in base.model.layers:
        layer.self_attn.q_proj.float()
    model = zinit.inject(copy.deepcopy(base), 2, 4, **V2)
    model.requires_grad_(False)
    zinit.eject(model)
    assert {k: v.dtype for k, v in model.state_dict().items()} == {k: v.dtype for k, v in base.state_dict().items()}


def test_v2_leaves_an_inner_injection_alone_and_litgpt_needs_the_top_layers():
    model = tiny_llama()
    zinit.inject(model.model, 2, 4, bias_scale=True)
    hooked = [n for n, m in model.named_modules() if hasattr(m, "zinit_bias_scale")]
    with pytest.raises(RuntimeError, match="already has a zinit bias/scale"):
        zinit.inject(model, 1, 4, bias_scale=True)
    assert [n for n, m in model.named_modules() if hasattr(m, "zinit_bias_scale")] == hooked  # nothing undone
    low = zinit.inject(tiny_llama(), [0, 1], 4, gate_fn="identity")
    with pytest.raises(ValueError, match=r"litgpt adapts the layers from adapter_start_layer up.*\[2, 3\]"):
        zinit.convert.to_litgpt(zinit.adapter_state_dict(low), zinit.injection(low).config, zinit.injection(low).dims)


def test_v2_concurrent_first_forwards_after_a_cast_upcast_a_norm_once(monkeypatch):
    """Serving threads' first forwards after ``model.to(bf16)``: the second thread reaches the upcast while the first
    is inside it (forced with events, not hoped for by a loop), waits, and finds the norm float32 already."""
    import threading

    from zinit import v2

    model = zinit.inject(tiny_llama(), 2, 4, train_norms=True).to(torch.bfloat16)
    norm = model.get_submodule(zinit.injection(model).norms[0])
    inside, go, waiting = threading.Event(), threading.Event(), threading.Event()
    calls = []
    real = v2._to_float32

    def slow(module, low):
        calls.append(low)
        inside.set()
        assert go.wait(30)
        real(module, low)

    class Spy:  # the lock, telling the test when a thread queues on it
        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            if self.lock.locked():
                waiting.set()
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()

    monkeypatch.setattr(v2, "_to_float32", slow)
    monkeypatch.setattr(v2, "_UPCAST_LOCK", Spy())
    first = threading.Thread(target=v2.norm_precision_hook, args=(norm, ()))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=v2.norm_precision_hook, args=(norm, ()))
    second.start()
    assert waiting.wait(30)  # the second thread saw bf16 and queued for the lock
    go.set()
    first.join(30)
    second.join(30)
    assert calls == [torch.bfloat16] and norm.weight.dtype == torch.float32
