"""Parameters, gradients and dtypes: what an optimizer sees and what backward touches."""

from __future__ import annotations

import pytest
import torch

import zinit
from tiny import clone, padded_batch, randomize_adapter, tiny_encoder, tiny_llama, tiny_vit, tokens


def _count(model) -> int:
    return sum(p.numel() for p in zinit.trainable_parameters(model))


def _requires_grad(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("build,L,C,H", [
    (lambda: tiny_llama(layers=4, heads=4, kv_heads=2), 3, 32, 4),
    (lambda: tiny_vit(depth=4), 2, 48, 3),
    (lambda: tiny_encoder("roberta", "qa"), 2, 32, 4),
])
@pytest.mark.parametrize("K", [1, 7])
def test_parameter_count_is_LKC_plus_LH(build, L, C, H, K):
    model = zinit.inject(build(), L, K)
    assert _count(model) == L * K * C + L * H
    assert _requires_grad(model) == _count(model)  # everything of the base model is frozen
    layer_gated = zinit.inject(zinit.eject(model), L, K, gate="layer")
    assert _count(layer_gated) == L * K * C + L


def test_llama_7b_shape_on_meta_device_has_1_229_760_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    zinit.inject(model, layers=30, K=10)
    assert _count(model) == 30 * 10 * 4096 + 30 * 32 == 1_229_760
    assert _requires_grad(model) == 1_229_760
    assert zinit.injection(model).layers == tuple(range(2, 32))


def _loss_and_backward(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.loss


def test_gradients_reach_every_prompt_and_gate_and_no_base_parameter():
    model = zinit.inject(tiny_llama(), 2, K=4)
    randomize_adapter(model, scale=0.5)
    model.train()
    _loss_and_backward(model, *padded_batch("right"))
    for n, adapter in zinit.layer_adapters(model).items():
        for name, p in (("prompt", adapter.prompt), ("gate", adapter.gate)):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {n} {name} got no gradient"
    base = [name for name, p in model.named_parameters() if "zinit_adapter" not in name]
    assert base and all(dict(model.named_parameters())[name].grad is None for name in base)


def test_at_zero_init_gates_get_gradient_and_prompts_get_exactly_zero():
    """The signature of zero-init: the gate opens first, and only then can prompts learn."""
    model = zinit.inject(tiny_llama(), 2, K=4).train()
    _loss_and_backward(model, *padded_batch("right"))
    for adapter in zinit.layer_adapters(model).values():
        assert adapter.gate.grad.abs().sum() > 0
        assert adapter.prompt.grad is not None and adapter.prompt.grad.abs().sum() == 0


@pytest.mark.parametrize("family", ["llama", "vit", "roberta"])
def test_layers_below_the_lowest_adapted_layer_run_no_backward(family, images):
    if family == "llama":
        model, blocks = tiny_llama(layers=5), None
        blocks = model.model.layers
        run = lambda: model(input_ids=tokens(2, 6)).logits.sum()  # noqa: E731
    elif family == "vit":
        model = tiny_vit(depth=5)
        blocks = model.blocks
        run = lambda: model(images).sum()  # noqa: E731
    else:
        model = tiny_encoder("roberta", "cls", layers=5)
        blocks = model.base_model.encoder.layer
        run = lambda: model(input_ids=tokens(2, 6)).logits.sum()  # noqa: E731
    zinit.inject(model, [2, 4], K=3)
    randomize_adapter(model)
    seen = {}
    for i, block in enumerate(blocks):
        block.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    run().backward()
    assert seen == {0: False, 1: False, 2: True, 3: True, 4: True}


def test_train_eval_train_keeps_gradients_flowing():
    """A cached prompt from an eval pass must never stand in for the trainable one (litgpt's stale-cache bug)."""
    model = zinit.inject(tiny_llama(), 2, K=4)
    randomize_adapter(model, scale=0.5)
    batch = padded_batch("right")
    reference = clone(model).train()
    _loss_and_backward(reference, *batch)
    want = [p.grad.clone() for p in zinit.trainable_parameters(reference)]

    model.train()
    _loss_and_backward(model, *batch)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch[0], attention_mask=batch[1])
        model.generate(batch[0][:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # an optimizer step between passes changes the parameters in place
        for p in zinit.trainable_parameters(model):
            p.add_(0.0)
    model.train()
    _loss_and_backward(model, *batch)
    got = [p.grad for p in zinit.trainable_parameters(model)]
    assert all(g is not None for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_optimizer_steps_change_outputs_and_open_gates():
    model = zinit.inject(tiny_llama(), 2, K=4).train()
    opt = torch.optim.AdamW(zinit.trainable_parameters(model), lr=1e-2)
    batch = padded_batch("right")
    losses = []
    for _ in range(8):
        opt.zero_grad()
        losses.append(_loss_and_backward(model, *batch).item())
        opt.step()
    assert losses[-1] < losses[0]
    assert all(a.gate.abs().max() > 0 for a in zinit.layer_adapters(model).values())


@pytest.mark.parametrize("family", ["llama", "vit", "roberta"])
def test_bf16_model_keeps_fp32_adapter_and_zero_init(family, images):
    if family == "llama":
        base, x = tiny_llama(), dict(input_ids=tokens(2, 6))
    elif family == "vit":
        base, x = tiny_vit(), images.bfloat16()
    else:
        base, x = tiny_encoder("roberta", "cls"), dict(input_ids=tokens(2, 6))
    base = base.to(torch.bfloat16)
    call = (lambda m: m(**x)) if isinstance(x, dict) else (lambda m: m(x))
    out = lambda r: r if isinstance(r, torch.Tensor) else r.logits  # noqa: E731
    with torch.no_grad():
        want = out(call(base))
    model = zinit.inject(clone(base), 2, K=4)
    assert all(p.dtype == torch.float32 for p in zinit.trainable_parameters(model))
    with torch.no_grad():
        got = out(call(model))
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    randomize_adapter(model, scale=0.5)
    loss = out(call(model)).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in zinit.trainable_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
