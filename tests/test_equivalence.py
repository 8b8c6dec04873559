"""zinit computes exactly the method: zero-init invariance, equivalence to a naive reference, and to peft."""

from __future__ import annotations

import pytest
import torch

import zinit
from reference import encoder_layer, llama_layer, vit_layer
from tiny import clone, padded_batch, randomize_adapter, tiny_encoder, tiny_llama, tiny_vit, tokens

LLAMA_SHAPES = [  # (model_type, heads, kv_heads)
    ("llama", 4, 2),  # grouped-query attention
    ("llama", 4, 4),  # multi-head, as LLaMA-7B
    ("mistral", 4, 1),
    ("qwen2", 4, 2),  # q/k/v biases
]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


class Capture:
    """Records (args, kwargs, output) of each call of the given modules."""

    def __init__(self, modules):
        self.calls = {id(m): [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook(m), with_kwargs=True) for m in modules]

    def _hook(self, module):
        def hook(_m, args, kwargs, output):
            self.calls[id(module)].append((args, kwargs, output))

        return hook

    def last(self, module):
        return self.calls[id(module)][-1]

    def close(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------- zero-init invariance


@pytest.mark.parametrize("model_type,heads,kv_heads", LLAMA_SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_zero_init_matches_base_with_padding(model_type, heads, kv_heads, side):
    base = tiny_llama(model_type, heads, kv_heads)
    ids, mask = padded_batch(side)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        model = zinit.inject(clone(base), layers=3, K=5)
        got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert _max_diff(got[keep], want[keep]) <= 1e-6


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_zero_init_generate_same_tokens(attn):
    base = tiny_llama(attn_implementation=attn)
    ids, mask = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = base.generate(ids, **kwargs)
    model = zinit.inject(clone(base), layers=3, K=5)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_vit_zero_init_matches_base(images):
    for base in (tiny_vit(), tiny_vit(distilled=True)):
        with torch.no_grad():
            want = base(images)
            got = zinit.inject(clone(base), layers=2, K=4)(images)
        assert _max_diff(got, want) <= 1e-6


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
@pytest.mark.parametrize("head", ["base", "qa"])
def test_encoder_zero_init_matches_base_with_padding(model_type, head):
    base = tiny_encoder(model_type, head)
    ids, mask = padded_batch("right")
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask)
        got = zinit.inject(clone(base), layers=2, K=4)(input_ids=ids, attention_mask=mask)
    field = "last_hidden_state" if head == "base" else "start_logits"
    keep = mask.bool()
    assert _max_diff(getattr(got, field)[keep], getattr(want, field)[keep]) <= 1e-6


# ---------------------------------------------------------------- naive reference


def _adapter_args(model, n):
    a = zinit.layer_adapters(model)[n]
    return a.prompt, a.gate, a.gate_fn


@pytest.mark.parametrize("model_type,heads,kv_heads", LLAMA_SHAPES)
@pytest.mark.parametrize("gate,gate_fn", [("head", "tanh"), ("layer", "identity")])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_matches_reference(model_type, heads, kv_heads, gate, gate_fn, attn):
    model = zinit.inject(tiny_llama(model_type, heads, kv_heads, attn_implementation=attn), [1, 3], K=5,
                         gate=gate, gate_fn=gate_fn)
    randomize_adapter(model)
    ids, mask = padded_batch("left")
    layers = model.model.layers
    cap = Capture([layers[n].self_attn for n in (1, 3)])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    cap.close()
    keep = mask.bool()
    for n in (1, 3):
        attn_module = layers[n].self_attn
        _, kwargs, output = cap.last(attn_module)
        cos, sin = kwargs["position_embeddings"]
        prompt, gate, gate_fn = _adapter_args(model, n)
        want = llama_layer(attn_module, kwargs["hidden_states"], cos, sin, mask, prompt, gate, gate_fn)
        assert _max_diff(output[0][keep], want[keep]) <= 1e-5
        closed = llama_layer(attn_module, kwargs["hidden_states"], cos, sin, mask, prompt, torch.zeros(1), "identity")
        assert _max_diff(want[keep], closed[keep]) > 1e-3  # the prompt term is really switched on


def test_vit_matches_reference(images):
    model = zinit.inject(tiny_vit(), [0, 2, 3], K=4)
    randomize_adapter(model)
    attns = [model.blocks[n].attn for n in (0, 2, 3)]
    cap = Capture(attns)
    with torch.no_grad():
        model(images)
    cap.close()
    for n, attn in zip((0, 2, 3), attns):
        args, _, output = cap.last(attn)
        assert _max_diff(output, vit_layer(attn, args[0], *_adapter_args(model, n))) <= 1e-5


def test_vit_eager_path_matches_reference(images):
    model = zinit.inject(tiny_vit(), 2, K=4)
    for block in model.blocks:
        block.attn.fused_attn = False
    randomize_adapter(model)
    attn = model.blocks[3].attn
    cap = Capture([attn])
    with torch.no_grad():
        model(images)
    args, _, output = cap.last(attn)
    assert _max_diff(output, vit_layer(attn, args[0], *_adapter_args(model, 3))) <= 1e-5


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_encoder_matches_reference(model_type, attn):
    base = tiny_encoder(model_type, "cls")
    base.config._attn_implementation = attn
    model = zinit.inject(base, 2, K=4, gate="head", gate_fn="identity")
    randomize_adapter(model)
    ids, mask = padded_batch("right")
    layers = model.base_model.encoder.layer
    attns = [layers[n].attention.self for n in (1, 2)]
    cap = Capture(attns)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    cap.close()
    for n, a in zip((1, 2), attns):
        args, kwargs, output = cap.last(a)
        hidden = args[0] if args else kwargs["hidden_states"]
        want = encoder_layer(a, hidden, mask, *_adapter_args(model, n))
        assert _max_diff(output[0], want) <= 1e-5


# ---------------------------------------------------------------- peft


def test_peft_adaption_prompt_equivalence():
    peft = pytest.importorskip("peft")
    base = tiny_llama("llama", 4, 2, layers=4)
    K, L = 6, 3
    peft_model = peft.get_peft_model(clone(base), peft.AdaptionPromptConfig(adapter_len=K, adapter_layers=L,
                                                                             task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "adaption_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    ids = tokens(2, 11)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    state = zinit.convert.from_peft(peft_model.state_dict())
    assert sorted(state) == [f"layers.{n}.{w}" for n in (1, 2, 3) for w in ("gate", "prompt")]
    model = zinit.inject(clone(base), L, K, gate="layer", gate_fn="identity")
    zinit.load_adapter_state_dict(model, state)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert _max_diff(got, want) <= 1e-5
    assert _max_diff(got, base(input_ids=ids).logits) > 1e-3


def test_official_v1_converter_on_tiny_config():
    base = tiny_llama("llama", 4, 4, layers=5, hidden=32)
    K, adapted = 3, (2, 3, 4)
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(len(adapted) * K, 32, generator=g)
    official = {"adapter_query.weight": queries}
    for n in adapted:
        official[f"layers.{n}.attention.gate"] = torch.randn(1, 4, 1, 1, generator=g)
    official["tok_embeddings.weight"] = torch.zeros(4, 32)  # frozen base keys are ignored
    state = zinit.convert.from_llama_adapter_v1(official)
    model = zinit.inject(base, len(adapted), K, gate="head", gate_fn="identity")
    zinit.load_adapter_state_dict(model, state)
    adapters = zinit.layer_adapters(model)
    for i, n in enumerate(adapted):  # row block i belongs to the i-th adapted layer, bottom to top
        assert torch.equal(adapters[n].prompt, queries[i * K:(i + 1) * K])
        assert torch.equal(adapters[n].gate, official[f"layers.{n}.attention.gate"].view(4))
    with pytest.raises(ValueError, match="adapter_query"):
        zinit.convert.from_llama_adapter_v1({"layers.1.attention.gate": torch.zeros(1, 4, 1, 1)})
    with pytest.raises(ValueError, match="rows must be L·K"):
        zinit.convert.from_llama_adapter_v1({"adapter_query.weight": torch.zeros(5, 32), **{
            f"layers.{n}.attention.gate": torch.zeros(1, 4, 1, 1) for n in adapted}})
