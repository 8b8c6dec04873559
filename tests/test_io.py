"""Adapter files, state dicts and eject: round trips are exact, and bad input is refused without damage."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import zinit
from tiny import clone, padded_batch, randomize_adapter, tiny_encoder, tiny_llama, tiny_vit


def _families(images):
    ids, mask = padded_batch("right")
    return [
        ("llama", tiny_llama, lambda m: m(input_ids=ids, attention_mask=mask).logits),
        ("vit", tiny_vit, lambda m: m(images)),
        ("roberta", lambda: tiny_encoder("roberta", "qa"),
         lambda m: m(input_ids=ids, attention_mask=mask).start_logits),
    ]


def test_save_load_into_fresh_model_gives_identical_outputs(tmp_path, images):
    for name, build, run in _families(images):
        model = zinit.inject(build(), [1, 2], K=5)
        randomize_adapter(model)
        folder = zinit.save_adapter(model, tmp_path / name)
        config = json.loads((folder / "zinit.json").read_text())
        assert config["backbone"] == name and config["layers"] == [1, 2] and config["K"] == 5
        assert {"format_version", "hidden_size", "num_heads", "num_kv_heads", "num_layers", "gate", "gate_fn",
                "zinit_version"} <= set(config)
        stored = load_file(str(folder / "adapter.safetensors"))
        assert sorted(stored) == ["layers.1.gate", "layers.1.prompt", "layers.2.gate", "layers.2.prompt"]

        fresh = zinit.load_adapter(build(), folder)  # injects from zinit.json
        with torch.no_grad():
            assert torch.equal(run(fresh), run(model))
        again = zinit.load_adapter(fresh, folder)  # an injected model with the same layout loads in place
        assert again is fresh


def test_eject_restores_a_never_injected_model(images):
    for _, build, run in _families(images):
        pristine = build()
        pristine.get_submodule(next(n for n, _ in pristine.named_modules() if n)).requires_grad_(False)
        flags = {n: p.requires_grad for n, p in pristine.named_parameters()}
        model = zinit.inject(clone(pristine), 2, K=3)
        randomize_adapter(model)
        zinit.eject(model)
        assert not zinit.is_injected(model)
        want, got = pristine.state_dict(), model.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        with torch.no_grad():
            assert torch.equal(run(model), run(pristine))
        zinit.inject(model, 1, K=2)  # and it can be injected again


def test_adapter_state_dict_keys_and_strict_loading():
    model = zinit.inject(tiny_llama(), [0, 3], K=4, gate="layer")
    state = zinit.adapter_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.prompt": (4, 32), "layers.0.gate": (1,), "layers.3.prompt": (4, 32), "layers.3.gate": (1,)}
    good = {k: v.clone() for k, v in state.items()}

    missing = dict(good)
    del missing["layers.3.gate"]
    with pytest.raises(KeyError, match=r"missing keys \['layers.3.gate'\]"):
        zinit.load_adapter_state_dict(model, missing)
    with pytest.raises(KeyError, match=r"unexpected keys \['layers.2.gate'\]"):
        zinit.load_adapter_state_dict(model, {**good, "layers.2.gate": torch.zeros(1)})
    before = {k: v.clone() for k, v in zinit.adapter_state_dict(model).items()}
    bad = {**{k: torch.ones_like(v) for k, v in good.items()}, "layers.3.prompt": torch.zeros(5, 32)}
    with pytest.raises(ValueError, match=r"'layers.3.prompt' has shape \(5, 32\).*expects \(4, 32\)"):
        zinit.load_adapter_state_dict(model, bad)
    after = zinit.adapter_state_dict(model)  # a refused state changes nothing, not even the keys that fitted
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_adapter_refuses_a_model_of_other_sizes(tmp_path):
    folder = zinit.save_adapter(zinit.inject(tiny_llama(hidden=32), 2, K=3), tmp_path / "a")
    with pytest.raises(ValueError, match="hidden_size: the adapter .* has hidden_size=32, the model has hidden_size=64"):
        zinit.load_adapter(tiny_llama(hidden=64), folder)
    with pytest.raises(ValueError, match="num_layers=4, the model has num_layers=6"):
        zinit.load_adapter(tiny_llama(layers=6), folder)
    with pytest.raises(ValueError, match="num_kv_heads=2, the model has num_kv_heads=4"):
        zinit.load_adapter(tiny_llama(kv_heads=4), folder)
    with pytest.raises(ValueError, match="saved for backbone 'llama'"):
        zinit.load_adapter(tiny_vit(), folder)
    other = zinit.inject(tiny_llama(), 2, K=4)
    with pytest.raises(ValueError, match="mismatch on K"):
        zinit.load_adapter(other, folder)


def test_load_adapter_bad_files_leave_the_model_uninjected(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="zinit.json"):
        zinit.load_adapter(model, tmp_path)
    folder = zinit.save_adapter(zinit.inject(tiny_llama(), 2, K=3), tmp_path / "a")
    (folder / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter.safetensors cannot be read as safetensors"):
        zinit.load_adapter(model, folder)
    assert not zinit.is_injected(model)  # the failed load rolled its injection back
    (folder / "zinit.json").write_text("{not json")
    with pytest.raises(ValueError, match="zinit.json is not valid JSON"):
        zinit.load_adapter(model, folder)


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = zinit.inject(tiny_llama(), 2, K=3)
    folder = zinit.save_adapter(model, tmp_path)
    good = (folder / "adapter.safetensors").read_bytes()
    randomize_adapter(model)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("zinit.io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        zinit.save_adapter(model, folder)
    assert (folder / "adapter.safetensors").read_bytes() == good
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors", "zinit.json"]  # no temp file left


def test_models_sharing_one_config_inject_and_eject_independently():
    """HF models built from one config object share it; zinit's routing must not leak between them."""
    from transformers import LlamaForCausalLM

    first = tiny_llama()
    second = LlamaForCausalLM(first.config).eval()
    second.load_state_dict(first.state_dict())
    ids, mask = padded_batch("right")
    run = lambda m: m(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    with torch.no_grad():
        plain = run(second)
        zinit.inject(first, 2, K=3)
        randomize_adapter(first)
        assert not torch.equal(run(first), plain)
        assert torch.equal(run(second), plain)  # the sibling is untouched
        assert first.config._attn_implementation == "sdpa"  # the shared config keeps its value: only the
        assert first.model.layers[3].self_attn.config._attn_implementation == "zinit_sdpa"  # adapted modules route
        assert second.model.layers[3].self_attn.config._attn_implementation == "sdpa"
        zinit.inject(second, 2, K=3)
        randomize_adapter(second)
        zinit.eject(first)
        assert torch.equal(run(first), plain)
        assert not torch.equal(run(second), plain)  # the sibling's adapter is still on
        zinit.eject(second)
        assert all(layer.self_attn.config is first.config for m in (first, second) for layer in m.model.layers)
        assert torch.equal(run(second), plain)


def test_train_modules_train_save_and_load_with_the_adapter(tmp_path):
    model = zinit.inject(tiny_vit(), 2, K=3, train_modules=["head"])
    head_keys = {"modules.head.weight": (10, 48), "modules.head.bias": (10,)}
    state = zinit.adapter_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith("modules.")} == head_keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable and len(trainable) == 2 * 2 + 2
    assert sum(p.numel() for p in zinit.trainable_parameters(model)) == 2 * (3 * 48 + 3) + 10 * 48 + 10
    randomize_adapter(model)
    with torch.no_grad():
        model.head.weight.normal_()
    folder = zinit.save_adapter(model, tmp_path / "a")
    assert json.loads((folder / "zinit.json").read_text())["train_modules"] == ["head"]
    fresh = zinit.load_adapter(tiny_vit(), folder)  # the same base weights, its own random head replaced
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(images), model(images))
    with pytest.raises(ValueError, match=r"'modules.head.weight' has shape \(10, 48\).*expects \(5, 48\)"):
        zinit.load_adapter(tiny_vit(num_classes=5), folder)
    ejected = zinit.eject(model)
    assert not any(p.requires_grad is False for p in ejected.parameters())  # flags restored (all were trainable)


def test_train_modules_errors_name_the_module():
    with pytest.raises(ValueError, match=r"no submodule 'classifier' \(its children: \[.*'head'"):
        zinit.inject(tiny_vit(), 2, K=3, train_modules=["classifier"])
    with pytest.raises(TypeError, match=r"pass a list of submodule names, e.g. \['head'\]"):
        zinit.inject(tiny_vit(), 2, K=3, train_modules="head")
    with pytest.raises(ValueError, match="has no parameters"):
        zinit.inject(tiny_vit(), 2, K=3, train_modules=["head_drop"])


def test_one_adapter_config_from_inject_to_the_file_and_back(tmp_path):
    """inject builds one AdapterConfig; the model carries it, zinit.json stores it, load_adapter rebuilds the same."""
    model = zinit.inject(tiny_vit(), [1, 3], K=3, gate="layer", gate_fn="identity", train_modules=["head"],
                         visual_dim=6, visual_hidden=5)
    config = zinit.injection(model).config
    assert isinstance(config, zinit.AdapterConfig)
    assert (config.layers, config.K, config.gate, config.gate_fn, config.train_modules, config.visual_dim,
            config.visual_hidden) == ((1, 3), 3, "layer", "identity", ("head",), 6, 5)
    assert zinit.injection(model).dims == zinit.find_backbone(model).dims(model)  # the sizes sit beside the config
    assert not hasattr(config, "hidden_size") and config.backbone == "vit"
    assert zinit.injection(model).layers == (1, 3)  # the record reads the config's fields
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        zinit.injection(model).nonsense
    folder = zinit.save_adapter(model, tmp_path / "a")
    on_disk = json.loads((folder / "zinit.json").read_text())
    assert zinit.AdapterConfig.from_json(on_disk) == (config, zinit.injection(model).dims)
    assert zinit.injection(zinit.load_adapter(tiny_vit(), folder)).config == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.K = 4


def test_load_adapter_compares_the_whole_config_and_names_each_difference(tmp_path):
    folder = zinit.save_adapter(zinit.inject(tiny_vit(), 2, K=3, train_modules=["head"]), tmp_path / "a")
    with pytest.raises(ValueError, match=r"mismatch on gate_fn: .* has gate_fn=tanh, the model is injected with "
                                         r"gate_fn=identity; eject it first"):
        zinit.load_adapter(zinit.inject(tiny_vit(), 2, K=3, gate_fn="identity", train_modules=["head"]), folder)
    with pytest.raises(ValueError, match=r"mismatch on train_modules: .* has train_modules=\['head'\], the model is "
                                         r"injected with train_modules=\[\]"):
        zinit.load_adapter(zinit.inject(tiny_vit(), 2, K=3), folder)
    with pytest.raises(ValueError, match=r"mismatch on layers: .* \(also K\)"):
        zinit.load_adapter(zinit.inject(tiny_vit(), 3, K=4, train_modules=["head"]), folder)


def test_a_zinit_json_of_an_earlier_version_still_loads(tmp_path):
    """Files written before train_modules and the visual projection existed (and before format_version) load."""
    model = zinit.inject(tiny_llama(), 2, K=3)
    folder = zinit.save_adapter(model, tmp_path / "a")
    old = json.loads((folder / "zinit.json").read_text())
    for key in ("train_modules", "format_version", "weights_bytes", "weights_sha256"):
        old.pop(key)
    (folder / "zinit.json").write_text(json.dumps(old))
    loaded = zinit.load_adapter(tiny_llama(), folder)
    assert zinit.injection(loaded).config == zinit.injection(model).config
    assert all(torch.equal(a, b) for a, b in zip(zinit.adapter_state_dict(loaded).values(),
                                                 zinit.adapter_state_dict(model).values()))
