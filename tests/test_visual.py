"""The multimodal path: an image token added to every adapted layer's prompt, per example (docs/design.md §1)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import zinit
from reference import llama_layer, vit_layer
from test_equivalence import Capture, _max_diff
from tiny import clone, padded_batch, randomize_adapter, tiny_llama, tiny_vit

D = 12


def _randomize_projection(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.zinit_visual_proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def _naive_tokens(model, features):
    """fc2(gelu(fc1(f))) in float64, written out."""
    proj = model.zinit_visual_proj
    h = features.double() @ proj.fc1.weight.double().T + proj.fc1.bias.double()
    return F.gelu(h) @ proj.fc2.weight.double().T + proj.fc2.bias.double()


def test_zero_init_image_changes_nothing_until_trained():
    model = zinit.inject(tiny_llama(), 3, K=5, visual_dim=D)
    ids, mask = padded_batch("left")
    feats = torch.randn(ids.shape[0], D)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with zinit.visual_features(model, feats):
            seen = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert _max_diff(seen[keep], plain[keep]) <= 1e-6

    model.train()
    opt = torch.optim.AdamW(zinit.trainable_parameters(model), lr=5e-2)
    for _ in range(5):
        with zinit.visual_features(model, feats):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.zinit_visual_proj.fc1.weight.grad.abs().sum() > 0  # the projection is trained
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with zinit.visual_features(model, feats):
            seen = model(input_ids=ids, attention_mask=mask).logits
        with zinit.visual_features(model, feats, has_image=[False] * ids.shape[0]):
            none = model(input_ids=ids, attention_mask=mask).logits
    assert _max_diff(seen[keep], plain[keep]) > 1e-3
    assert _max_diff(none[keep], plain[keep]) <= 1e-5  # examples without an image get no visual term


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)])
def test_llama_visual_path_matches_reference(heads, kv_heads):
    model = zinit.inject(tiny_llama(heads=heads, kv_heads=kv_heads), [1, 3], K=5, visual_dim=D, visual_hidden=16)
    randomize_adapter(model)
    _randomize_projection(model)
    ids, mask = padded_batch("left")
    B = ids.shape[0]
    feats = torch.randn(B, D)
    has_image = [True] * (B - 1) + [False]
    layers = model.model.layers
    cap = Capture([layers[n].self_attn for n in (1, 3)])
    with torch.no_grad(), zinit.visual_features(model, feats, has_image):
        model(input_ids=ids, attention_mask=mask)
    cap.close()
    tokens = _naive_tokens(model, feats)
    for n in (1, 3):
        attn = layers[n].self_attn
        _, kwargs, output = cap.last(attn)
        cos, sin = kwargs["position_embeddings"]
        a = zinit.layer_adapters(model)[n]
        for b in range(B):
            prompt = a.prompt.double() + (tokens[b] if has_image[b] else 0.0)  # P + image token, every position
            row = slice(b, b + 1) if cos.shape[0] > 1 else slice(0, 1)  # positions may be shared by the batch
            want = llama_layer(attn, kwargs["hidden_states"][b:b + 1], cos[row], sin[row], mask[b:b + 1],
                               prompt, a.gate, a.gate_fn)
            keep = mask[b:b + 1].bool()
            assert _max_diff(output[0][b:b + 1][keep], want[keep]) <= 1e-5


def test_vit_visual_path_matches_reference(images):
    model = zinit.inject(tiny_vit(), [2, 3], K=4, visual_dim=D)
    randomize_adapter(model)
    _randomize_projection(model)
    feats = torch.randn(images.shape[0], D)
    attn = model.blocks[3].attn
    cap = Capture([attn])
    with torch.no_grad(), zinit.visual_features(model, feats):
        model(images)
    cap.close()
    args, _, output = cap.last(attn)
    a = zinit.layer_adapters(model)[3]
    tokens = _naive_tokens(model, feats)
    for b in range(images.shape[0]):
        want = vit_layer(attn, args[0][b:b + 1], a.prompt.double() + tokens[b], a.gate, a.gate_fn)
        assert _max_diff(output[b:b + 1], want) <= 1e-5


def test_generate_uses_the_features_and_the_cache_never_serves_old_images():
    model = zinit.inject(tiny_llama(), 3, K=5, visual_dim=D)
    randomize_adapter(model)
    _randomize_projection(model)
    ids, mask = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    outs = []
    for seed in (0, 1, 0):  # new tensors may reuse freed memory: the cache must key on the block, not the address
        feats = torch.randn(ids.shape[0], D, generator=torch.Generator().manual_seed(seed)) * 3
        with torch.no_grad(), zinit.visual_features(model, feats):
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
            model.generate(ids, **kwargs)
    assert _max_diff(outs[0], outs[2]) == 0.0 and _max_diff(outs[0], outs[1]) > 1e-3
    feats = torch.randn(1, D)
    with torch.no_grad(), zinit.visual_features(model, feats):  # one row per prompt, beams repeat it
        beams = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, num_beams=2, do_sample=False,
                               pad_token_id=0)
    assert beams.shape == (1, ids.shape[1] + 4)


def test_threads_see_their_own_features():
    model = zinit.inject(tiny_llama(), 3, K=5, visual_dim=D)
    randomize_adapter(model)
    _randomize_projection(model)
    ids, mask = padded_batch("right")
    feats = [torch.randn(ids.shape[0], D, generator=torch.Generator().manual_seed(s)) * 3 for s in range(4)]
    with torch.no_grad():
        want = []
        for f in feats:
            with zinit.visual_features(model, f):
                want.append(model(input_ids=ids, attention_mask=mask).logits)
    got, errors = {}, []
    barrier = threading.Barrier(len(feats))

    def work(i):
        try:
            with torch.no_grad(), zinit.visual_features(model, feats[i]):
                barrier.wait()  # every thread is inside its block before any forward runs
                for _ in range(3):
                    got[i] = model(input_ids=ids, attention_mask=mask).logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(feats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(len(feats)):
        assert _max_diff(got[i], want[i]) <= 1e-6


def test_save_load_and_errors(tmp_path):
    model = zinit.inject(tiny_vit(), 2, K=4, visual_dim=D, visual_hidden=8)
    keys = [k for k in zinit.adapter_state_dict(model) if k.startswith("visual_proj.")]
    assert keys == ["visual_proj.fc1.weight", "visual_proj.fc1.bias", "visual_proj.fc2.weight", "visual_proj.fc2.bias"]
    assert sum(p.numel() for p in zinit.trainable_parameters(model)) == 2 * (4 * 48 + 3) + D * 8 + 8 + 8 * 48 + 48
    randomize_adapter(model)
    _randomize_projection(model)
    folder = zinit.save_adapter(model, tmp_path / "a")
    fresh = zinit.load_adapter(tiny_vit(), folder)
    images, feats = torch.randn(2, 3, 32, 32), torch.randn(2, D)
    with torch.no_grad():
        with zinit.visual_features(model, feats):
            want = model(images)
        with zinit.visual_features(fresh, feats):
            assert torch.equal(fresh(images), want)
    with pytest.raises(ValueError, match=r"image features must be a tensor \[batch, 12\], got \(2, 5\)"):
        with zinit.visual_features(model, torch.randn(2, 5)):
            pass
    with pytest.raises(ValueError, match=r"has_image has shape \(3,\); expected \(2,\)"):
        with zinit.visual_features(model, feats, has_image=[True] * 3):
            pass
    with pytest.raises(ValueError, match="features were given for 2 examples, but the forward has a batch of 3"):
        with torch.no_grad(), zinit.visual_features(model, feats):
            model(torch.randn(3, 3, 32, 32))
    with pytest.raises(ValueError, match="injected without visual_dim"):
        with zinit.visual_features(zinit.inject(tiny_vit(), 1, K=2), feats):
            pass
    with pytest.raises(ValueError, match="visual_dim=0 must be an int >= 1"):
        zinit.inject(tiny_vit(), 1, K=2, visual_dim=0)
    with pytest.raises(ValueError, match="visual_hidden=0 must be an int >= 1"):
        zinit.inject(tiny_vit(), 1, K=2, visual_dim=4, visual_hidden=0)
    zinit.eject(model)
    assert not hasattr(model, "zinit_visual_proj")
    assert list(clone(model).state_dict()) == list(tiny_vit().state_dict())
