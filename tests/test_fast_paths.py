"""Fast paths stay exact: cached prompt K/V in evaluation and generation, torch.compile, gradient checkpointing,
bf16 autocast."""

from __future__ import annotations

import json

import pytest
import torch

import zinit
from tiny import clone, padded_batch, randomize_adapter, tiny_encoder, tiny_llama, tiny_vit, tokens


class CountProjections:
    """Counts calls of every adapter's prompt projection."""

    def __init__(self, model):
        self.calls = 0
        for adapter in zinit.layer_adapters(model).values():
            inner = adapter._project

            def counted(attn, prompt, inner=inner):
                self.calls += 1
                return inner(attn, prompt)

            adapter._project = counted


def test_generation_projects_the_prompt_once_not_per_token():
    model = zinit.inject(tiny_llama(layers=4), 3, K=5)
    randomize_adapter(model, scale=0.5)
    counter = CountProjections(model)
    ids, mask = padded_batch("left")
    model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert counter.calls == 3  # once per adapted layer for the whole generation, not 3 × 10


def test_cached_and_uncached_paths_agree_exactly():
    model = zinit.inject(tiny_llama(), 3, K=5)
    randomize_adapter(model, scale=0.5)
    ids, mask = padded_batch("right")
    run = lambda: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    fresh = run().detach()  # gradients on: projected in the call
    with torch.no_grad():
        first, second = run(), run()  # projected once, then reused
    assert torch.equal(first, fresh) and torch.equal(second, fresh)
    with torch.inference_mode():
        assert torch.equal(run(), fresh)


def test_cache_follows_every_parameter_change():
    model = zinit.inject(tiny_llama(), 3, K=5)
    randomize_adapter(model, scale=0.5)
    ids, mask = padded_batch("right")

    def check():
        with torch.no_grad():
            cached = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(cached, model(input_ids=ids, attention_mask=mask).logits.detach())

    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # fill the cache
    opt = torch.optim.SGD(zinit.trainable_parameters(model), lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()  # in-place update of prompts and gates
    check()
    zinit.load_adapter_state_dict(model, {k: v * 0.5 for k, v in zinit.adapter_state_dict(model).items()})
    check()
    with torch.no_grad():  # a frozen projection changed in place (e.g. load_state_dict of the base model)
        model.model.layers[3].self_attn.k_proj.weight.mul_(1.5)
    check()
    model.to(torch.float64)  # new storage for every parameter
    ids64 = ids
    with torch.no_grad():
        out = model(input_ids=ids64, attention_mask=mask).logits
    assert out.dtype == torch.float64 and torch.equal(out, model(input_ids=ids64, attention_mask=mask).logits.detach())


def test_gradient_checkpointing_gives_the_same_gradients():
    base = zinit.inject(tiny_llama(), 3, K=5)
    randomize_adapter(base, scale=0.5)
    ckpt = clone(base)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = padded_batch("right")
    grads = []
    for model in (base, ckpt):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append([p.grad for p in zinit.trainable_parameters(model)])
    for a, b in zip(*grads):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "vit", "roberta"])
def test_cpu_bf16_autocast_keeps_zero_init_and_trains(family, images):
    if family == "llama":
        base, call = tiny_llama(), lambda m: m(input_ids=tokens(2, 7)).logits
    elif family == "vit":
        base, call = tiny_vit(), lambda m: m(images)
    else:
        base, call = tiny_encoder("roberta", "cls"), lambda m: m(input_ids=tokens(2, 7)).logits
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = call(base)
    model = zinit.inject(clone(base), 2, K=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(call(model), want)
    randomize_adapter(model, scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = call(model).float().pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in zinit.trainable_parameters(model))


@pytest.mark.slow
def test_torch_compile_matches_eager_without_graph_breaks_in_the_adapter():
    torch._dynamo.reset()
    model = zinit.inject(tiny_llama(layers=2), 2, K=4)
    randomize_adapter(model, scale=0.5)
    ids, mask = padded_batch("right")
    run = lambda m: m(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    want = run(model)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in zinit.trainable_parameters(model)]
    model.zero_grad(set_to_none=True)

    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model)
    got = run(compiled)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got.sum().backward()
    for p, g in zip(zinit.trainable_parameters(model), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(run(compiled), want, rtol=1e-4, atol=1e-5)


def test_speed_benchmark_runs_every_suite_on_tiny_shapes(tmp_path, capsys, monkeypatch):
    """The benchmark is a tool people rerun: every suite must work end to end (timings are not asserted)."""
    monkeypatch.chdir(tmp_path)  # memory children run `python -m zinit.benchmarks.speed`: from anywhere
    from zinit.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny", "--L", "3", "--K", "4", "--repeats", "1", "--seq", "16", "--batch", "2",
                 "--new-tokens", "4", "--gen-batches", "1", "--scaling-lengths", "16", "--vit-model",
                 "vit_tiny_patch16_224", "--vit-batch", "1", "--tiny-roberta", "--roberta-seq", "8",
                 "--bases", "int8", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) >= {"train", "infer", "generate", "adapters", "engine", "memory", "scaling", "quantized",
                            "vit", "roberta"}
    assert set(results["adapters"][0]["tokens_per_s"]) == {"base model", "one adapter", "8 adapters mixed",
                                                           "one at a time", "peft LoRA 8 mixed"}
    assert set(results["engine"][0]["tokens_per_s"]) == {"static generate", "transformers CB", "engine, no adapter",
                                                         "engine, 8 mixed", "staggered, no adapter",
                                                         "staggered, 8 mixed"}
    assert sum(results["engine"][0]["staggered_tokens"]) == 16 * 4  # rows leave one by one, the same total
    train = results["train"][0]
    assert set(train["seconds"]) == {"floor", "zinit", "zinit_generic", "adaption_prompt", "lora"}
    assert train["trainable"]["zinit"] == 3 * 4 * 64 + 3 * 4 and train["trainable"]["floor"] == 64
    assert set(results["memory"][0]["mb"]) == {"floor", "zinit", "adaption_prompt", "lora"}
    quantized = results["quantized"][0]  # one base, to keep the suite short: tests/test_quantized.py has the rest
    assert set(quantized["seconds"]) == set(quantized["peak_mb"]) == set(quantized["weights_mb"]) == {"int8"}
    assert 0 < quantized["weights_mb"]["int8"] < quantized["peak_mb"]["int8"]
    assert "vs floor" in capsys.readouterr().out


def test_decoding_steps_match_a_full_forward_with_open_gates():
    """Each cached decoding step (one query per sequence, its own code path) gives the logits a full forward gives."""
    model = zinit.inject(tiny_llama(layers=4), 3, K=5)
    randomize_adapter(model, scale=0.5)
    ids, mask = padded_batch("left")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], 6, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() uses for left-padded rows
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_a_decoding_steps_prompt_term_is_each_rows_own_attention(rows, dtype):
    """The decoding-step kernel (one query per row; the rows passed as the queries of one sequence when they share
    the prompt; a shared prompt with a mask per row; one prompt per row with padded positions masked) against each
    row's attention written out, for a contiguous query and one strided as a model's attention hands it over."""
    from zinit.attention import prompt_attention

    gen = torch.Generator().manual_seed(rows)
    heads, K, d, scaling = 3, 4, 8, 0.3  # not SDPA's default 1/sqrt(d)
    query = torch.randn(rows, heads, 1, d, generator=gen).to(dtype)
    shared_key, shared_value = (torch.randn(heads, K, d, generator=gen).to(dtype) for _ in range(2))
    per_row_key, per_row_value = (torch.randn(rows, heads, K, d, generator=gen).to(dtype) for _ in range(2))
    real = torch.ones(rows, K, dtype=torch.bool)
    real[0, K - 1:] = False  # row 0's prompt is one position shorter (a mixed batch of different K)

    def expected(q, b, key, value, keep):
        scores = (q[b].float() @ key.float().transpose(-1, -2)) * scaling  # [H, 1, K]
        scores = scores.masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ value.float()  # [H, 1, d]

    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    strided = torch.randn(rows, 1, heads, d, generator=gen).to(dtype).transpose(1, 2)  # as a model's query arrives
    every = torch.ones(K, dtype=torch.bool)
    cases = [(query, shared_key, shared_value, None), (strided, shared_key, shared_value, None),
             (query, shared_key, shared_value, real), (query, per_row_key, per_row_value, real)]
    for q, key, value, mask in cases:
        out = prompt_attention(q, key, value, scaling, mask=mask)
        assert out.shape == (rows, heads, 1, d) and out.dtype == dtype
        for b in range(rows):
            want = expected(q, b, key if key.dim() == 3 else key[b], value if value.dim() == 3 else value[b],
                            every if mask is None else mask[b])
            torch.testing.assert_close(out[b].float(), want, **tol)


def test_decode_cost_times_every_decoding_call_of_the_prompt_term(tmp_path):
    """benchmarks/decode_cost.py (the in-situ split of a decoding step's adapter cost) times each adapted layer's
    prompt term at every decoding step, none of the base model's, replays it under the measured route, and leaves
    the wrapper as it found it, also when the timed run raises."""
    import zinit.hf
    import zinit.prompts
    from zinit.benchmarks.decode_cost import _Tally, _timed_prompt_term, main

    out = tmp_path / "cost.json"
    main(["--shape", "tiny", "--layers", "3", "--rows", "2", "--rounds", "1", "--new-tokens", "3", "--adapters", "2",
          "--json", str(out)])
    result = json.loads(out.read_text())[0]
    assert result["layers"] == 3 and result["hidden_size"] == 64  # the tiny shape's width, 3 of its 4 layers
    assert result["base_layer_us"] > 0
    rows = result["rows_of"]
    assert set(rows) == {"base model", "adapters carried, none used", "one adapter", "2 adapters mixed"}
    assert rows["base model"]["decode_calls"] == 0 and "prompt_term_us_in_situ" not in rows["base model"]
    for key in ("adapters carried, none used", "one adapter", "2 adapters mixed"):
        assert rows[key]["decode_calls"] == (3 - 1) * result["layers"]  # the prefill makes the first token
        assert rows[key]["prompt_term_us_in_situ"] > 0 and rows[key]["prompt_term_us_alone"] > 0
        assert rows[key]["computes_a_term"] == (key != "adapters carried, none used")
    assert zinit.hf.prompt_term is zinit.prompts.prompt_term
    with pytest.raises(RuntimeError, match="boom"), _timed_prompt_term(_Tally()):
        raise RuntimeError("boom")
    assert zinit.hf.prompt_term is zinit.prompts.prompt_term
