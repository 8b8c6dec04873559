"""Issue 11, items 1-6: the adapter under the ways people really run models.

1. no stale prompt after any way of changing weights (fused/foreach AdamW, SGD, .data edits, load_state_dict,
   dtype round trips, eject + inject, a wrapper that changes k/v outputs, peft's disable_adapter);
2. torch.inference_mode (features, adapters created or loaded inside it);
3. every attention implementation transformers accepts (flash-attention 2 through a stand-in package, hub kernels,
   flex, eager, sdpa), set_attn_implementation after inject, continuous batching (generate_batch);
4. no race between threads (forced interleavings, not luck);
5. copies: deepcopy, torch.save / torch.load of the whole model (also in a fresh process), DataParallel replicas;
6. casts after inject, with and without images.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import zinit
from tiny import padded_batch, randomize_adapter, tiny_encoder, tiny_llama, tiny_vit, tokens

D = 12


def _llama(visual: bool = False, **kw):
    model = zinit.inject(tiny_llama(**kw), 3, K=5, visual_dim=D if visual else None)
    randomize_adapter(model, scale=0.5)
    if visual:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.zinit_visual_proj.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def _fresh_logits(model, ids, mask):
    """What the model computes now, through the path that can hold no state: a forward with gradients on."""
    with torch.enable_grad():
        return model(input_ids=ids, attention_mask=mask).logits.detach()


def _eval_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _generate_logits(model, ids, mask, n=4):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def _generate_matches_full_forward(model, ids, mask, n=4):
    """Greedy generate() (KV cache, prompt K/V reused across steps) gives, step by step, the logits of a full
    forward with gradients on (no reuse of anything)."""
    seqs, logits = _generate_logits(model, ids, mask, n)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], n, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.enable_grad():
        full = model(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits.detach()
    want = full[:, ids.shape[1] - 1: ids.shape[1] - 1 + n]
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 1. No stale prompt, whatever changed the weights


def _step(model, opt, ids, mask):
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw_foreach", "adamw_for_loop", "sgd"])
def test_train_eval_train_eval_never_serves_an_old_prompt(optimizer):
    model = _llama()
    ids, mask = padded_batch("left")
    params = zinit.trainable_parameters(model)
    opt = {
        "adamw_fused": lambda: torch.optim.AdamW(params, lr=0.05, fused=True),  # HF Trainer's default
        "adamw_foreach": lambda: torch.optim.AdamW(params, lr=0.05, foreach=True),
        "adamw_for_loop": lambda: torch.optim.AdamW(params, lr=0.05, foreach=False),
        "sgd": lambda: torch.optim.SGD(params, lr=0.5),
    }[optimizer]()
    for _ in range(2):  # train -> eval -> train -> eval
        _step(model, opt, ids, mask)
        torch.testing.assert_close(_eval_logits(model, ids, mask), _fresh_logits(model, ids, mask),
                                   rtol=0, atol=0)
        _generate_matches_full_forward(model, ids, mask)


def _data_copy(model):
    for a in zinit.layer_adapters(model).values():
        a.prompt.data.copy_(a.prompt.data * 0.5)
        a.gate.data.fill_(0.7)


def _data_inplace_frozen(model):
    model.model.layers[3].self_attn.k_proj.weight.data.mul_(1.5)  # a base weight, through .data


def _no_grad_data_edit(model):
    with torch.no_grad():
        for a in zinit.layer_adapters(model).values():
            a.prompt.data.add_(1.0)


def _load_state_dict(model):
    state = {k: v.clone() * 0.9 if "zinit_adapter" in k or "v_proj" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _load_adapter_state(model):
    zinit.load_adapter_state_dict(model, {k: -v for k, v in zinit.adapter_state_dict(model).items()})


def _dtype_round_trip(model):
    with torch.no_grad():
        for a in zinit.layer_adapters(model).values():
            a.prompt.mul_(1.001)  # values that a half round trip changes
    model.half().float()


def _eject_inject(model):
    zinit.eject(model)
    zinit.inject(model, 3, K=5)
    randomize_adapter(model, seed=9, scale=0.5)


class _Scaled(nn.Module):
    """A wrapper another library might put around k_proj/v_proj: changes outputs, no parameter changes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.scale = inner, 1.0

    def forward(self, x):
        return self.inner(x) * self.scale


def _wrapped_projection(model):
    for layer in model.model.layers:
        layer.self_attn.v_proj = _Scaled(layer.self_attn.v_proj)


CHANGES = {
    "data_copy_fill": _data_copy,
    "data_inplace_frozen": _data_inplace_frozen,
    "no_grad_data_edit": _no_grad_data_edit,
    "load_state_dict": _load_state_dict,
    "load_adapter_state_dict": _load_adapter_state,
    "half_float_round_trip": _dtype_round_trip,
    "eject_inject": _eject_inject,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_way_of_changing_weights_is_seen_by_the_next_eval_and_generate(change):
    model = _llama()
    ids, mask = padded_batch("left")
    before = _eval_logits(model, ids, mask)
    _generate_logits(model, ids, mask)  # evaluation and generation ran before the change
    CHANGES[change](model)
    after = _eval_logits(model, ids, mask)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _fresh_logits(model, ids, mask), rtol=0, atol=0)
    _generate_matches_full_forward(model, ids, mask)


def test_a_wrapper_that_changes_kv_outputs_without_touching_a_parameter():
    model = _llama()
    _wrapped_projection(model)
    ids, mask = padded_batch("left")
    before = _eval_logits(model, ids, mask)
    _generate_logits(model, ids, mask)
    for layer in model.model.layers:
        layer.self_attn.v_proj.scale = 3.0
    after = _eval_logits(model, ids, mask)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, _fresh_logits(model, ids, mask), rtol=0, atol=0)
    _generate_matches_full_forward(model, ids, mask)


def test_peft_disable_adapter_around_a_zinit_model():
    peft = pytest.importorskip("peft")
    model = _llama()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["k_proj", "v_proj"],
                                                       init_lora_weights=False))
    ids, mask = padded_batch("left")
    with torch.no_grad():
        on = lora(input_ids=ids, attention_mask=mask).logits
        with lora.disable_adapter():
            off = lora(input_ids=ids, attention_mask=mask).logits
        again = lora(input_ids=ids, attention_mask=mask).logits
    assert not torch.equal(on, off) and torch.equal(on, again)
    with lora.disable_adapter(), torch.enable_grad():
        fresh_off = lora(input_ids=ids, attention_mask=mask).logits.detach()
    torch.testing.assert_close(off, fresh_off, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 2. torch.inference_mode


def test_inference_mode_gives_what_no_grad_gives_with_images_and_generate():
    model = _llama(visual=True)
    ids, mask = padded_batch("left")
    feats = torch.randn(ids.shape[0], D)
    runs = {}
    for name, mode in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        with mode():
            with zinit.visual_features(model, feats):  # features made inside the mode
                logits = model(input_ids=ids, attention_mask=mask).logits
                seqs = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            plain = model(input_ids=ids, attention_mask=mask).logits
        runs[name] = (logits, seqs, plain)
    for a, b in zip(runs["no_grad"], runs["inference"]):
        assert torch.equal(a, b)


def test_adapter_created_and_loaded_inside_inference_mode(tmp_path):
    trained = _llama(visual=True)
    zinit.save_adapter(trained, tmp_path)
    ids, mask = padded_batch("left")
    feats = torch.randn(ids.shape[0], D)
    with torch.no_grad(), zinit.visual_features(trained, feats):
        want = trained(input_ids=ids, attention_mask=mask).logits
    with torch.inference_mode():
        created = zinit.inject(tiny_llama(), 3, K=5, visual_dim=D)  # inference tensors as parameters
        with zinit.visual_features(created, feats):
            created(input_ids=ids, attention_mask=mask)
            created.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        loaded = zinit.load_adapter(tiny_llama(), tmp_path)
        with zinit.visual_features(loaded, feats):
            got = loaded(input_ids=ids, attention_mask=mask).logits
            loaded.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# 3. Every attention implementation

FAKE_FLASH = '''
"""A stand-in for the flash-attn package, built on SDPA: enough to drive transformers' flash code path on CPU."""
import torch
import torch.nn.functional as F

__version__ = "2.8.3"
calls = []


def _attend(q, k, v, softmax_scale, causal):  # [T, H, d] / [S, Hkv, d], causal aligned bottom-right as flash
    calls.append(q.shape[0])
    H, Hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    mask = None
    if causal:
        T, S = q.shape[0], k.shape[0]
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=softmax_scale)
    return out.transpose(0, 1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = cu_seqlens_q[i], cu_seqlens_q[i + 1], cu_seqlens_k[i], cu_seqlens_k[i + 1]
        outs.append(_attend(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale, causal))
    return torch.cat(outs)


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("not used by these tests")
'''


@pytest.fixture
def fake_flash(tmp_path, monkeypatch):
    """Install the stand-in `flash_attn` package and make transformers believe flash-attention 2 is available."""
    import transformers.modeling_flash_attention_utils as fa

    pkg = tmp_path / "fake_flash" / "flash_attn"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_FLASH)
    (pkg / "bert_padding.py").write_text("from transformers.modeling_flash_attention_utils import "
                                          "_pad_input as pad_input, _unpad_input as unpad_input\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setattr(fa, "is_flash_attn_2_available", lambda *a, **k: True)
    monkeypatch.setattr(fa, "_loaded_implementation", None)
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    import flash_attn

    yield flash_attn
    monkeypatch.setattr(fa, "_loaded_implementation", None)


def _with_implementation(base, name):
    model = copy.deepcopy(base)
    model.config._attn_implementation = name
    return model


def test_flash_attention_2_keeps_working_after_inject(fake_flash):
    base = tiny_llama()
    ids, mask = padded_batch("left")
    sdpa = _llama()
    flash = copy.deepcopy(sdpa)
    flash.config._attn_implementation = "flash_attention_2"
    plain_flash = _with_implementation(base, "flash_attention_2")
    keep = mask.bool()
    with torch.no_grad():
        # the stand-in is exact: flash and sdpa agree on the plain model (real rows; padded rows are undefined)
        torch.testing.assert_close(plain_flash(input_ids=ids, attention_mask=mask).logits[keep],
                                   base(input_ids=ids, attention_mask=mask).logits[keep], rtol=1e-5, atol=1e-5)
        fake_flash.calls.clear()
        got = flash(input_ids=ids, attention_mask=mask).logits
        assert fake_flash.calls, "the flash path was not taken"
        want = sdpa(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    seq_flash = flash.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seq_sdpa = sdpa.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(seq_flash, seq_sdpa)
    # training through the flash path reaches the prompt and the gate
    flash.train()
    flash(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in zinit.trainable_parameters(flash))


def test_hub_kernel_implementation_keeps_working_after_inject(fake_flash, monkeypatch):
    """A `kernels-community/...` name: transformers loads the kernel by the name it reads from the module's config."""
    import transformers.integrations.hub_kernels as hub
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = "kernels-community/zinit-test-flash"
    monkeypatch.setattr(hub, "load_and_register_attn_kernel", lambda repo, *a, **k: fake_flash if repo == name
                        else pytest.fail(f"kernel {repo!r} was requested, not {name!r}"))
    AttentionInterface.register(name, flash_attention_forward)  # what loading a hub kernel registers
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    try:
        sdpa = _llama()
        hub_model = copy.deepcopy(sdpa)
        hub_model.config._attn_implementation = name
        ids, mask = padded_batch("left")
        keep = mask.bool()
        with torch.no_grad():
            fake_flash.calls.clear()
            got = hub_model(input_ids=ids, attention_mask=mask).logits
            assert fake_flash.calls
            torch.testing.assert_close(got[keep], sdpa(input_ids=ids, attention_mask=mask).logits[keep],
                                       rtol=1e-5, atol=1e-5)
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_set_attn_implementation_after_inject_keeps_the_adapter(implementation):
    model = _llama()
    ids, mask = padded_batch("left")
    want = _eval_logits(model, ids, mask)
    keep = mask.bool()  # fully padded query rows are undefined and differ between kernels
    other = {"eager": "sdpa", "sdpa": "eager"}[implementation]
    model.set_attn_implementation(other)
    model.set_attn_implementation(implementation)
    model.set_attn_implementation(other)
    assert model.config._attn_implementation == other
    torch.testing.assert_close(_eval_logits(model, ids, mask)[keep], want[keep], rtol=1e-5, atol=1e-5)
    plain = zinit.eject(copy.deepcopy(model))
    assert not torch.allclose(_eval_logits(plain, ids, mask), want, atol=1e-3)  # the adapter is what differs


@pytest.mark.slow
def test_flex_attention_after_inject():
    model = _llama()
    ids, mask = padded_batch("right")
    keep = mask.bool()
    want = _eval_logits(model, ids, mask)
    model.set_attn_implementation("flex_attention")
    torch.testing.assert_close(_eval_logits(model, ids, mask)[keep], want[keep], rtol=1e-4, atol=1e-4)


def test_continuous_batching_keeps_the_adapter():
    from transformers import GenerationConfig

    model = _llama()
    with torch.no_grad():
        for a in zinit.layer_adapters(model).values():
            a.gate.mul_(4)  # wide-open gates, so the adapter decides the tokens
    plain = zinit.eject(copy.deepcopy(model))
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    batch = model.generate_batch(inputs=prompts, generation_config=gc, progress_bar=False)
    got = [batch[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    solo = [model.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist() for p in prompts]
    base = [plain.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist() for p in prompts]
    assert got == solo
    assert got != base


# ---------------------------------------------------------------------------------------------------------------
# 4. Threads


def test_two_threads_in_the_same_layer_at_once_each_get_their_own_image_prompt(monkeypatch):
    """Forced interleaving: both threads are inside the same adapter's prompt projection together (a barrier in
    the projection), and every attribute the adapter sets during a forward waits for the other thread too, which
    is exactly the window where a shared per-adapter cache hands one thread the other's prompt."""
    model = _llama(visual=True)
    ids, mask = padded_batch("left")
    feats = [torch.randn(ids.shape[0], D, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        want = []
        for f in feats:
            with zinit.visual_features(model, f):
                want.append(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                           pad_token_id=0, output_logits=True, return_dict_in_generate=True))

    barrier = threading.Barrier(2, timeout=20)
    adapter = zinit.layer_adapters(model)[3]
    project = adapter._project
    met: set[tuple[str, int]] = set()

    def meet_once(where):  # each worker thread meets the other once at each place: the prefill of layer 3
        key = (where, threading.get_ident())
        if threading.current_thread() is not threading.main_thread() and key not in met:
            met.add(key)
            barrier.wait()

    def meeting_projection(attn, prompt):
        meet_once("projection")
        return project(attn, prompt)

    monkeypatch.setattr(adapter, "_project", meeting_projection)
    original_setattr = type(adapter).__setattr__

    def meeting_setattr(self, name, value):
        original_setattr(self, name, value)
        if self is adapter:
            meet_once("setattr")

    monkeypatch.setattr(type(adapter), "__setattr__", meeting_setattr)
    results, errors = [None, None], []

    def run(i):
        try:
            with torch.no_grad(), zinit.visual_features(model, feats[i]):
                results[i] = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for got, expected in zip(results, want):
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.logits, expected.logits):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# 5. Copies


def _families(images, visual=True):
    llama = _llama(visual=visual)
    ids, mask = padded_batch("left")
    feats = torch.randn(ids.shape[0], D)

    def run_llama(m):
        with torch.no_grad():
            if not visual:
                return m(input_ids=ids, attention_mask=mask).logits
            with zinit.visual_features(m, feats):
                a = m(input_ids=ids, attention_mask=mask).logits
            return torch.cat([a, m(input_ids=ids, attention_mask=mask).logits])

    vit = zinit.inject(tiny_vit(), 2, K=3, train_modules=["head"])
    randomize_adapter(vit)
    enc = zinit.inject(tiny_encoder("roberta", "qa"), 2, K=3)
    randomize_adapter(enc)
    x = tokens(2, 7)
    with torch.no_grad():
        return {
            "llama": (llama, run_llama),
            "vit": (vit, lambda m: m(images)),
            "roberta": (enc, lambda m: torch.cat(m(input_ids=x, attention_mask=torch.ones_like(x))[:2])),
        }


@pytest.mark.parametrize("family", ["llama", "vit", "roberta"])
def test_deepcopy_and_whole_model_torch_save_compute_what_the_original_computes(family, images):
    model, run = _families(images)[family]
    want = run(model)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert zinit.is_injected(other)
        torch.testing.assert_close(run(other), want, rtol=0, atol=0)
        with torch.no_grad():  # they are copies: changing one changes nothing in the original
            for a in zinit.layer_adapters(other).values():
                a.gate.add_(1.0)
        assert not torch.equal(run(other), want)
    torch.testing.assert_close(run(model), want, rtol=0, atol=0)
    zinit.eject(copied)  # a copy ejects on its own
    torch.testing.assert_close(run(model), want, rtol=0, atol=0)


def test_whole_model_torch_load_in_a_fresh_process(tmp_path, images):
    """A process that never imported zinit's hooks: the pickled model brings everything it needs."""
    families = _families(images)
    for name, (model, run) in families.items():
        torch.save({"model": model, "want": run(model)}, tmp_path / f"{name}.pt")
    torch.save(images, tmp_path / "images.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny import padded_batch, tokens
        images = torch.load({str(tmp_path / "images.pt")!r})
        ids, mask = padded_batch("left")
        x = tokens(2, 7)
        for name in ("llama", "vit", "roberta"):
            saved = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
            m = saved["model"]
            with torch.no_grad():
                if name == "llama":
                    got = m(input_ids=ids, attention_mask=mask).logits
                    want = saved["want"][ids.shape[0]:]
                elif name == "vit":
                    got, want = m(images), saved["want"]
                else:
                    got = torch.cat(m(input_ids=x, attention_mask=torch.ones_like(x))[:2])
                    want = saved["want"]
            assert torch.equal(got, want), name
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def _cpu_replica(module: nn.Module) -> nn.Module:
    """What torch.nn.parallel.replicate builds for one device (it needs CUDA devices, so its steps are reproduced
    here): each module copied with ``_replicate_for_data_parallel`` (a shallow copy of its __dict__), children
    rewired, and each parameter set as a plain attribute holding a new tensor (the broadcast copy)."""
    memo: dict[int, nn.Module] = {}
    for m in module.modules():
        memo[id(m)] = m._replicate_for_data_parallel()
    for m in module.modules():
        replica = memo[id(m)]
        for name, child in m._modules.items():
            if child is not None:
                setattr(replica, name, memo[id(child)])
        for name, p in m._parameters.items():
            if p is None:
                replica._parameters[name] = None
            else:
                setattr(replica, name, p.detach().clone())
        for name, b in m._buffers.items():
            if b is not None:
                replica._buffers[name] = b.clone()
    return memo[id(module)]


@pytest.mark.parametrize("family", ["llama", "vit", "roberta"])
def test_data_parallel_replicas_run_their_own_weights(family, images):
    """(Image features are per thread, and DataParallel runs replicas in threads of its own: replicas run
    text-only; torchrun/DDP, which zinit's trainer uses, has no such limit.)"""
    model, run = _families(images, visual=False)[family]
    want = run(model)
    replica = _cpu_replica(model)
    torch.testing.assert_close(run(replica), want, rtol=0, atol=0)
    with torch.no_grad():  # the original changes after replication (as the next optimizer step does)
        for p in model.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(run(replica), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 6. Casts after inject


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_casting_after_inject_works_with_and_without_images(dtype):
    model = _llama(visual=True)
    ids, mask = padded_batch("left")
    feats = torch.randn(ids.shape[0], D)
    keep = mask.bool()
    with torch.no_grad():
        with zinit.visual_features(model, feats):
            want_img = model(input_ids=ids, attention_mask=mask).logits
        want = model(input_ids=ids, attention_mask=mask).logits
    cast = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        with zinit.visual_features(cast, feats):
            got_img = cast(input_ids=ids, attention_mask=mask).logits
            cast.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        got = cast(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == got_img.dtype == dtype
    tol = {torch.float64: 1e-5, torch.float16: 0.05, torch.bfloat16: 0.3}[dtype]
    torch.testing.assert_close(got_img[keep].float(), want_img[keep], rtol=0, atol=tol)
    torch.testing.assert_close(got[keep].float(), want[keep], rtol=0, atol=tol)
    cast.train()  # and it trains in that dtype
    with zinit.visual_features(cast, feats):
        cast(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert cast.zinit_visual_proj.fc1.weight.grad is not None


@pytest.mark.parametrize("family", ["vit", "roberta"])
def test_casting_vit_and_encoders_after_inject(family, images):
    if family == "vit":  # with image features
        model = zinit.inject(tiny_vit(), 2, K=3, visual_dim=D)
        feats = torch.randn(images.shape[0], D)

        def run(m):
            with zinit.visual_features(m, feats):
                return m(images.to(m.cls_token.dtype))
    else:
        model = zinit.inject(tiny_encoder("roberta", "cls"), 2, K=3)
        x = tokens(2, 7)

        def run(m):
            return m(input_ids=x, attention_mask=torch.ones_like(x)).logits
    randomize_adapter(model)
    with torch.no_grad():
        want = run(model)
        for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.3)):
            got = run(copy.deepcopy(model).to(dtype))
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)


def test_a_reset_static_cache_never_serves_the_prompt_of_old_weights():
    """A preallocated StaticCache kept for serving, reset between requests, while the adapter is swapped."""
    from transformers import StaticCache

    model = _llama(layers=3)
    ids = tokens(1, 6)
    cache = StaticCache(config=model.config, max_cache_len=32)
    want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                      past_key_values=cache), want)
    _load_adapter_state(model)  # the adapter changes; the cache object is kept
    cache.reset()
    with torch.no_grad():
        got = model(input_ids=ids, past_key_values=cache).logits
    torch.testing.assert_close(got, model(input_ids=ids, use_cache=False).logits.detach(), rtol=0, atol=1e-6)
    cache.reset()
    again = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, past_key_values=cache)
    assert torch.equal(again, model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_a_new_turn_on_a_kept_cache_projects_the_prompt_afresh():
    model = _llama(layers=3)
    first, second = tokens(1, 6, seed=1), tokens(1, 4, seed=2)
    with torch.no_grad():
        cache = model(input_ids=first, use_cache=True).past_key_values
        _data_copy(model)  # a weight change no version counter sees
        snapshot = copy.deepcopy(cache)  # a copy of a cache keeps the token K/V, not the prompt K/V
        got = model(input_ids=second, past_key_values=cache).logits
        want = model(input_ids=second, past_key_values=snapshot).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_attention_forward_without_kwargs_still_works_through_the_hf_hook():
    """A user's backbone on an attention class whose forward takes no **kwargs: no scope (so no prompt reuse while
    decoding), but no crash and the same outputs."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class NoKwargsAttention(LlamaAttention):
        # the layer passes its KV cache as ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)
        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                    past_key_values=None, position_ids=None, use_cache=None, cache_position=None):
            return super().forward(hidden_states, position_embeddings, attention_mask,
                                   cache if cache is not None else past_key_values)

    model = _llama(layers=4)
    ids, mask = padded_batch("left")
    want = _generate_logits(model, ids, mask)
    for layer in model.model.layers:
        layer.self_attn.__class__ = NoKwargsAttention
    zinit.eject(model)
    zinit.inject(model, 3, K=5)
    randomize_adapter(model, scale=0.5)
    got = _generate_logits(model, ids, mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
