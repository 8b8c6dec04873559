"""Many named adapters on one frozen model (zinit.add_adapter / use_adapters): each row of a mixed batch computes
what its adapter loaded alone computes, a row with no adapter is the base model, for forward, cached generate() with
left padding and beams, and training; adding or removing one adapter never touches another."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

import zinit
from tiny import padded_batch, randomize_adapter, tiny_encoder, tiny_llama, tiny_vit

#: three adapters of different K, layer sets and gate options
SPECS = {"a": dict(layers=2, K=3), "b": dict(layers=[0, 2], K=5, gate="layer", gate_fn="identity"),
         "c": dict(layers=[1], K=2)}


def _saved(make, tmp_path, seed_base: int = 10) -> dict[str, object]:
    """Each adapter of SPECS trained-looking (random prompts, open gates) on its own copy of the base, saved."""
    folders = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        model = zinit.inject(make(), spec["layers"], spec["K"], gate=spec.get("gate", "head"),
                             gate_fn=spec.get("gate_fn", "tanh"))
        randomize_adapter(model, seed=seed_base + i, scale=0.8)
        folders[name] = zinit.save_adapter(model, tmp_path / name)
    return folders


def _alone(make, folder):
    return zinit.load_adapter(make(), folder)


def _bank(make, folders):
    model = make()
    for name, folder in folders.items():
        zinit.add_adapter(model, name, folder)
    return model


ROWS = ["a", "b", None]  # padded_batch has 3 rows


def test_each_row_of_a_mixed_batch_equals_its_adapter_alone_and_none_is_the_base(tmp_path):
    folders = _saved(tiny_llama, tmp_path)
    model = _bank(tiny_llama, folders)
    for side in ("left", "right"):
        ids, mask = padded_batch(side)
        with torch.no_grad():
            base = tiny_llama()(input_ids=ids, attention_mask=mask).logits
            for rows in (ROWS, ["c", "a", "b"], ["b", "b", "a"]):
                with zinit.use_adapters(model, rows):
                    mixed = model(input_ids=ids, attention_mask=mask).logits
                for r, name in enumerate(rows):
                    want = base if name is None else _alone(tiny_llama, folders[name])(
                        input_ids=ids, attention_mask=mask).logits
                    keep = mask[r].bool()
                    if name is None:
                        assert torch.equal(mixed[r][keep], want[r][keep])  # exactly the base model
                    else:
                        assert (mixed[r][keep] - want[r][keep]).abs().max() <= 1e-5, (side, rows, r)
                assert (mixed - base).abs().max() > 1e-2  # the adapters do something
            with zinit.use_adapters(model, "c"):  # one name for every row: the single-adapter path
                every = model(input_ids=ids, attention_mask=mask).logits
            assert torch.allclose(every, _alone(tiny_llama, folders["c"])(input_ids=ids, attention_mask=mask).logits,
                                  atol=1e-6)
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)  # outside a block: the base


def test_mixed_generate_with_cache_left_padding_and_beams_equals_each_adapter_alone(tmp_path):
    folders = _saved(tiny_llama, tmp_path)
    model = _bank(tiny_llama, folders)
    ids, mask = padded_batch("left")
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}):
        with torch.no_grad(), zinit.use_adapters(model, ROWS):
            mixed = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kwargs)
        for r, name in enumerate(ROWS):
            solo = tiny_llama() if name is None else _alone(tiny_llama, folders[name])
            with torch.no_grad():
                want = solo.generate(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1], max_new_tokens=6,
                                     pad_token_id=0, **kwargs)
            assert torch.equal(mixed[r], want[0]), (kwargs, name)


def test_a_bf16_mixed_generate_is_bit_identical_to_each_adapter_alone(tmp_path):
    """bf16 (what a GPU server runs): every decoding step's logits of each row of a mixed batch are bit-identical to
    the same batch through its adapter alone, so a request's tokens never depend on which adapters share its batch
    (a mixed step that gated its output instead of its values rounded twice and changed greedy tokens)."""
    folders = _saved(tiny_llama, tmp_path)
    model = _bank(tiny_llama, folders).to(torch.bfloat16)
    ids, mask = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    for rows in (ROWS, ["c", "a", "b"]):
        with torch.no_grad(), zinit.use_adapters(model, rows):
            mixed = model.generate(input_ids=ids, **kwargs)
        for r, name in enumerate(rows):
            solo = (tiny_llama() if name is None else _alone(tiny_llama, folders[name])).to(torch.bfloat16)
            with torch.no_grad():
                want = solo.generate(input_ids=ids, **kwargs)
            assert torch.equal(mixed.sequences[r], want.sequences[r]), (rows, name)
            for step, (got, ref) in enumerate(zip(mixed.logits, want.logits)):
                assert torch.equal(got[r], ref[r]), (rows, name, step)


@pytest.mark.parametrize("rows", ["a", ["a", "b", None]], ids=["one-adapter-route", "mixed-route"])
@pytest.mark.parametrize("replace", [True, False], ids=["replaced", "removed"])
def test_a_decoding_step_after_an_adapter_is_replaced_or_removed_never_serves_the_old_one(rows, replace):
    """An adapter removed (or removed and added again with other weights) between two decoding steps of one cache,
    inside one use_adapters block: the next step computes what a fresh cache holding the same token keys computes
    (the new adapter, or no term for a removed one), never the prompts kept from the old adapter."""
    from transformers import DynamicCache

    def randomized(name: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in zinit.bank.named_adapter_layers(model, name).values():
                layer.prompt.copy_(torch.randn(layer.prompt.shape, generator=g))
                layer.gate.copy_(torch.randn(layer.gate.shape, generator=g))

    model = tiny_llama()
    zinit.add_adapter(model, "a", layers=[2], K=3)
    zinit.add_adapter(model, "b", layers=[1, 2], K=5)
    randomized("a", 3)
    randomized("b", 4)
    ids, nxt = torch.randint(1, 60, (3, 6)), torch.randint(1, 60, (3, 1))
    cache = DynamicCache()
    with torch.no_grad(), zinit.use_adapters(model, rows):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        tokens = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        before = model(input_ids=nxt, past_key_values=DynamicCache(ddp_cache_data=tokens), use_cache=True).logits
        zinit.remove_adapter(model, "a")
        if replace:
            zinit.add_adapter(model, "a", layers=[2], K=3)
            randomized("a", 99)
        step = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
        fresh = model(input_ids=nxt, past_key_values=DynamicCache(ddp_cache_data=tokens), use_cache=True).logits
    torch.testing.assert_close(step, fresh, rtol=0, atol=1e-6)
    assert (step - before).abs().max() > 1e-3  # the change is visible: the old adapter's prompts are not served


@pytest.mark.parametrize("rows", [["a", "b"], "b"], ids=["mixed-route", "one-adapter-route"])
def test_a_cache_reused_across_requests_does_not_keep_a_removed_adapter_alive(rows):
    """A server reusing one KV cache across requests (a StaticCache and reset()): the prompts kept on it for an
    adapter that is then removed are dropped at the next request's prefill, so unloading adapters frees them."""
    import gc
    import weakref

    from transformers import DynamicCache

    model = tiny_llama()
    for name in "abc":
        zinit.add_adapter(model, name, layers=[1, 2], K=3)
    ids = torch.randint(1, 60, (2, 6))
    cache = DynamicCache()
    with torch.no_grad(), zinit.use_adapters(model, rows):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    removed = [weakref.ref(a) for a in zinit.bank.named_adapter_layers(model, "b").values()]
    zinit.remove_adapter(model, "b")
    with torch.no_grad(), zinit.use_adapters(model, ["a", "c"] if isinstance(rows, list) else "c"):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    gc.collect()
    assert all(ref() is None for ref in removed)
    assert len(cache._zinit_prompt_kv) <= 2 + 2 * 2  # this layer's bank entries and the two kept adapters'


def test_decoding_steps_reuse_the_mixed_prompt_projection_and_match_a_full_forward(tmp_path):
    """Prompt keys/values are projected by the prefill and reused by the one-token steps (as for one adapter); the
    cached decoding equals a full forward at every step."""
    folders = _saved(tiny_llama, tmp_path)
    model = _bank(tiny_llama, folders)
    calls = []
    for adapter_layers in (zinit.bank.named_adapter_layers(model, n) for n in folders):
        for a in adapter_layers.values():
            real = a._project
            a._project = lambda attn, p, real=real: calls.append(1) or real(attn, p)
    ids, mask = padded_batch("left")
    with torch.no_grad(), zinit.use_adapters(model, ROWS):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        projected_once = len(calls)
        full_mask = torch.cat([mask, torch.ones(3, 5, dtype=mask.dtype)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # what generate() uses for left-padded rows
        full = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits
    assert projected_once == 3 + 1  # layers of a (2, 3) and b (0, 2) used by the batch, each projected once
    for step, scores in enumerate(out.scores):
        assert (scores - full[:, ids.shape[1] - 1 + step]).abs().max() <= 1e-4


def test_vit_and_roberta_rows_mix_exactly(tmp_path, images):
    images = torch.cat([images, images.flip(0)])[:3]
    for make, run in ((tiny_vit, lambda m: m(images)),
                      (lambda: tiny_encoder("roberta", "base"),
                       lambda m: m(input_ids=padded_batch("right")[0],
                                   attention_mask=padded_batch("right")[1]).last_hidden_state)):
        folders = _saved(make, tmp_path / make.__name__)
        model = _bank(make, folders)
        with torch.no_grad():
            with zinit.use_adapters(model, ROWS):
                mixed = run(model)
            base = run(make())
            for r, name in enumerate(ROWS):
                want = base if name is None else run(_alone(make, folders[name]))
                assert (mixed[r] - want[r]).abs().max() <= 1e-5


def test_multi_task_training_sends_each_rows_gradient_to_its_adapter_only():
    """A mixed batch trains several adapters at once: each adapter's gradient is the one its own rows give alone."""
    model = tiny_llama()
    for name, spec in SPECS.items():
        zinit.add_adapter(model, name, **spec)
        with torch.no_grad():
            for a in zinit.bank.named_adapter_layers(model, name).values():
                a.gate.fill_(0.5)
    ids, mask = padded_batch("right")
    labels = ids.masked_fill(mask == 0, -100)

    def grads(rows, select):
        model.zero_grad(set_to_none=True)
        with zinit.use_adapters(model, rows):
            logits = model(input_ids=ids[select], attention_mask=mask[select]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[select][:, 1:].flatten(),
                                                 reduction="sum")
        loss.backward()
        return {n: [None if p.grad is None else p.grad.clone() for p in zinit.adapter_parameters(model, n)]
                for n in SPECS}

    mixed = grads(["a", "b", "a"], [0, 1, 2])
    only_a, only_b = grads("a", [0, 2]), grads("b", [1])
    for got, want in zip(mixed["a"], only_a["a"]):
        assert torch.allclose(got, want, atol=1e-5)
    for got, want in zip(mixed["b"], only_b["b"]):
        assert torch.allclose(got, want, atol=1e-5)
    assert all(g is None for g in mixed["c"])  # unused: no gradient at all
    assert all(not p.requires_grad for n, p in model.named_parameters() if "zinit_bank" not in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "zinit_bank" not in n)


def test_adding_and_removing_never_touches_the_others(tmp_path):
    folders = _saved(tiny_llama, tmp_path)
    model = tiny_llama()
    base_keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    zinit.add_adapter(model, "a", folders["a"])
    ids, mask = padded_batch("right")
    with torch.no_grad(), zinit.use_adapters(model, "a"):
        before = model(input_ids=ids, attention_mask=mask).logits
    params_a = [p.data_ptr() for p in zinit.adapter_parameters(model, "a")]
    zinit.add_adapter(model, "b", folders["b"])
    zinit.add_adapter(model, "c", folders["c"])
    own = sum(p.numel() for n in SPECS for p in zinit.adapter_parameters(model, n))
    assert own == sum(p.numel() for n, p in model.named_parameters() if "zinit_bank" in n)  # nothing shared, no copy
    assert own == 2 * (3 * 32 + 4) + 2 * (5 * 32 + 1) + (2 * 32 + 4)
    zinit.remove_adapter(model, "b")
    assert [p.data_ptr() for p in zinit.adapter_parameters(model, "a")] == params_a
    with torch.no_grad(), zinit.use_adapters(model, "a"):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert zinit.adapter_names(model) == ["a", "c"]
    zinit.remove_adapter(model, "a")
    zinit.remove_adapter(model, "c")
    assert list(model.state_dict()) == base_keys and zinit.adapter_names(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(getattr(layer.self_attn.config, "_zinit_base", None) for layer in model.model.layers)


def test_a_named_adapter_saves_as_an_ordinary_adapter_folder(tmp_path):
    model = tiny_llama()
    zinit.add_adapter(model, "fresh", layers=[1, 3], K=4)
    with torch.no_grad():
        for a in zinit.bank.named_adapter_layers(model, "fresh").values():
            a.gate.fill_(0.3)
    folder = zinit.save_adapter(model, tmp_path / "fresh", name="fresh")
    alone = zinit.load_adapter(tiny_llama(), folder)
    assert zinit.injection(alone).config == zinit.bank.named_adapter_config(model, "fresh")
    ids, mask = padded_batch("right")
    with torch.no_grad(), zinit.use_adapters(model, "fresh"):
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              alone(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    with pytest.raises(ValueError, match="no named adapters|no adapter named"):
        zinit.save_adapter(tiny_llama(), tmp_path / "x", name="fresh")


def test_threads_with_different_choices_never_see_each_other():
    """Thread A is held inside its forward (a barrier in layer 2) while thread B runs a forward with another choice."""
    model = tiny_llama()
    zinit.add_adapter(model, "a", layers=2, K=3)
    zinit.add_adapter(model, "b", layers=2, K=3)
    for name, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for ad in zinit.bank.named_adapter_layers(model, name).values():
                ad.prompt.copy_(torch.randn(ad.prompt.shape, generator=g))
                ad.gate.fill_(0.7)
    ids, mask = padded_batch("right")
    with torch.no_grad():
        want = {}
        for name in ("a", "b"):
            with zinit.use_adapters(model, name):
                want[name] = model(input_ids=ids, attention_mask=mask).logits
    inside, resume = threading.Event(), threading.Event()

    def pause(module, args, kwargs):
        if threading.current_thread().name == "A":
            inside.set()
            assert resume.wait(10)

    handle = model.model.layers[2].register_forward_pre_hook(pause, with_kwargs=True)
    got = {}

    def run(name):
        with torch.no_grad(), zinit.use_adapters(model, name):
            got[name] = model(input_ids=ids, attention_mask=mask).logits

    a = threading.Thread(target=run, args=("a",), name="A")
    a.start()
    assert inside.wait(10)
    run("b")  # while A is paused mid-forward
    resume.set()
    a.join(10)
    handle.remove()
    assert torch.equal(got["a"], want["a"]) and torch.equal(got["b"], want["b"])


def test_copies_pickles_and_inference_mode(tmp_path):
    folders = _saved(tiny_llama, tmp_path)
    model = _bank(tiny_llama, folders)
    ids, mask = padded_batch("left")
    with torch.no_grad(), zinit.use_adapters(model, ROWS):
        want = model(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode(), zinit.use_adapters(model, ROWS):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, want)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert zinit.adapter_names(twin) == ["a", "b", "c"]
        with torch.no_grad(), zinit.use_adapters(twin, ROWS):
            assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, want)
        with torch.no_grad(), zinit.use_adapters(model, ROWS):  # the original's block is not the copy's
            assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits, tiny_llama()(
                input_ids=ids, attention_mask=mask).logits)


def test_bad_input_is_refused_with_the_fix(tmp_path):
    folders = _saved(tiny_llama, tmp_path)
    model = _bank(tiny_llama, {"a": folders["a"]})
    with pytest.raises(ValueError, match="already on this model"):
        zinit.add_adapter(model, "a", folders["b"])
    with pytest.raises(KeyError, match=r"no adapter named 'zz' on this model; it has \['a'\]"):
        with zinit.use_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="batch of 3"):
        with torch.no_grad(), zinit.use_adapters(model, ["a", None]):
            model(input_ids=padded_batch("right")[0])
    with pytest.raises(ValueError, match="adapter name"):
        zinit.add_adapter(model, "../x", layers=1, K=2)
    with pytest.raises(RuntimeError, match="named adapters"):
        zinit.inject(model, 1, K=2)
    with pytest.raises(ValueError, match="injected with one adapter"):
        zinit.add_adapter(zinit.inject(tiny_llama(), 1, K=2), "a", folders["a"])
    with pytest.raises(ValueError, match="mismatch on hidden_size"):
        zinit.add_adapter(tiny_llama(hidden=64), "a", folders["a"])
    with pytest.raises(ValueError, match="saved for backbone 'llama'"):
        zinit.add_adapter(tiny_vit(), "a", folders["a"])
    with pytest.raises(ValueError, match="image features or a task head"):
        vis = zinit.save_adapter(zinit.inject(tiny_llama(), 1, K=2, visual_dim=4), tmp_path / "vis")
        zinit.add_adapter(tiny_llama(), "v", vis)
    with pytest.raises(FileNotFoundError):
        zinit.add_adapter(tiny_llama(), "gone", tmp_path / "nothing")
    fresh = tiny_llama()
    with pytest.raises(FileNotFoundError):  # a failed add leaves the model as it was
        zinit.add_adapter(fresh, "gone", tmp_path / "nothing")
    assert all(p.requires_grad for p in fresh.parameters()) and zinit.adapter_names(fresh) == []


@pytest.mark.parametrize("K", [2 ** 40, 4_000_000])
def test_zinit_json_is_checked_against_the_weights_before_anything_is_allocated(tmp_path, monkeypatch, K):
    """K sizes the prompts: an edited zinit.json (K=2**40, K=4e6) is refused by comparing it with the weights' shapes
    before any adapter tensor is allocated, even if the file reader let it through (its own check switched off)."""
    import zinit.io
    from zinit import bank
    from tiny import edit_adapter_config

    folder = zinit.save_adapter(zinit.inject(tiny_llama(), 2, 3), tmp_path / "a")
    edit_adapter_config(folder, K=K)
    monkeypatch.setattr(zinit.io, "check_weights", lambda *args, **kwargs: None, raising=False)
    allocated = []

    class Recording(bank.LayerAdapter):
        def __init__(self, K, *args, **kwargs):
            allocated.append(K)
            raise MemoryError(f"allocated a prompt of K={K}")

    monkeypatch.setattr(bank, "LayerAdapter", Recording)
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"shape \[3, 32\].*K={K}.*correct K in zinit.json"):
        zinit.add_adapter(model, "a", folder)
    assert allocated == [] and zinit.adapter_names(model) == []


def test_prepare_then_install_is_add_adapter(tmp_path):
    """prepare_adapter reads and builds without touching the model; install_adapter attaches the result, re-checking
    the name (another adapter of that name may have come in between)."""
    from zinit import bank, io

    folders = _saved(tiny_llama, tmp_path)
    model, ref = tiny_llama(), _bank(tiny_llama, {"a": folders["a"]})
    prepared = io.prepare_adapter(model, "a", folders["a"])
    assert zinit.adapter_names(model) == [] and all(p.requires_grad for p in model.parameters())  # not frozen yet
    assert list(model.state_dict()) == list(tiny_llama().state_dict())  # nothing attached yet
    bank.install_adapter(model, prepared)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), zinit.use_adapters(model, "a"), zinit.use_adapters(ref, "a"):
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    again = io.prepare_adapter(tiny_llama(), "a", folders["b"])
    with pytest.raises(ValueError, match="already on this model"):
        bank.install_adapter(model, again)
