"""AdapterConfig is the adapter's options only, made without a model; the model's sizes (Dims) sit beside it, and
zinit.json stays the flat file every earlier zinit wrote and reads."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zinit
from zinit.errors import ZinitValueError
from zinit.methods import registry as M

from tiny import tiny_llama, tiny_vit

#: ``zinit.json`` as zinit wrote it before the sizes left AdapterConfig (commit 044adc0, the parent of this change),
#: without the fields that differ per save (save_id, weights_bytes, weights_sha256, zinit_version), for the adapters
#: :data:`MAKERS` inject. The writer must keep producing exactly these bytes.
EARLIER = {
    "llama_default": """{
  "format": "zinit-adapter",
  "format_version": 1,
  "backbone": "llama",
  "hidden_size": 32,
  "num_heads": 4,
  "num_kv_heads": 2,
  "head_dim": 8,
  "num_layers": 4,
  "layers": [
    2,
    3
  ],
  "K": 3,
  "gate": "head",
  "gate_fn": "tanh",
  "train_modules": []
}""",
    "llama_nogate": """{
  "format": "zinit-adapter",
  "format_version": 2,
  "backbone": "llama",
  "hidden_size": 32,
  "num_heads": 4,
  "num_kv_heads": 2,
  "head_dim": 8,
  "num_layers": 4,
  "layers": [
    0,
    2
  ],
  "K": 4,
  "gate": "none",
  "gate_fn": "tanh",
  "train_modules": []
}""",
    "llama_v2_random": """{
  "format": "zinit-adapter",
  "format_version": 3,
  "backbone": "llama",
  "hidden_size": 32,
  "num_heads": 4,
  "num_kv_heads": 2,
  "head_dim": 8,
  "num_layers": 4,
  "layers": [
    3
  ],
  "K": 2,
  "gate": "layer",
  "gate_fn": "identity",
  "train_modules": [],
  "gate_init": "random",
  "bias_scale": "blocks",
  "train_norms": true
}""",
    "vit_head_visual": """{
  "format": "zinit-adapter",
  "format_version": 1,
  "backbone": "vit",
  "hidden_size": 48,
  "num_heads": 3,
  "num_kv_heads": 3,
  "head_dim": 16,
  "num_layers": 4,
  "layers": [
    1,
    3
  ],
  "K": 3,
  "gate": "head",
  "gate_fn": "tanh",
  "train_modules": [
    "head"
  ],
  "visual_dim": 6,
  "visual_hidden": 5
}""",
}
MAKERS = {
    "llama_default": (tiny_llama, dict(layers=2, K=3)),
    "llama_nogate": (tiny_llama, dict(layers=[0, 2], K=4, gate="none")),
    "llama_v2_random": (tiny_llama, dict(layers=1, K=2, gate="layer", gate_fn="identity", gate_init="random",
                                         bias_scale=True, train_norms=True)),
    "vit_head_visual": (tiny_vit, dict(layers=[1, 3], K=3, train_modules=["head"], visual_dim=6, visual_hidden=5)),
}
VOLATILE = ("save_id", "weights_bytes", "weights_sha256", "zinit_version")


def test_a_config_needs_no_model():
    """peft's LoraConfig style: every option has a default, AdapterConfig() is the paper's method on every layer."""
    config = zinit.AdapterConfig()
    assert (config.layers, config.K, config.gate, config.gate_fn, config.gate_init, config.backbone) == (
        None, 10, "head", "tanh", "zero", None)
    assert not config.resolved and config.format_version() == 1
    assert zinit.AdapterConfig(layers=[5, 1]).layers == (1, 5) and zinit.AdapterConfig(layers=3).layers == 3
    assert zinit.AdapterConfig(bias_scale=True) == zinit.AdapterConfig(bias_scale="blocks")  # True means "blocks"
    assert zinit.AdapterConfig(bias_scale=False) == zinit.AdapterConfig()
    with pytest.raises(TypeError, match=r"layers='top': pass an int L"):
        zinit.AdapterConfig(layers="top")
    with pytest.raises(ZinitValueError, match=r"layers=0 is out of range: L \(the top L layers\) must be >= 1"):
        zinit.AdapterConfig(layers=0)
    with pytest.raises(TypeError, match=r"train_modules='head': pass a list of submodule names"):
        zinit.AdapterConfig(train_modules="head")
    with pytest.raises(ZinitValueError, match="to_json needs a resolved config"):
        config.to_json(zinit.Dims(32, 4, 2, 8, 4))
    model = tiny_llama()
    resolved, dims = config.bind(model)
    assert resolved == config.replace(layers=(0, 1, 2, 3), backbone="llama") and resolved.resolved
    assert dims == zinit.find_backbone(model).dims(model) and not zinit.is_injected(model)  # bind changes nothing
    with pytest.raises(ZinitValueError, match="train_modules: LlamaForCausalLM has no submodule 'head'"):
        config.replace(train_modules=("head",)).bind(model)


def test_one_config_injects_models_of_different_sizes():
    """The sizes come from each model: one config (and the resolved config of one model) injects models of other
    widths, head counts and depths; the top L layers are each model's own."""
    config = zinit.AdapterConfig(layers=2, K=5, gate="layer")
    small, big = tiny_llama(hidden=32, layers=4), tiny_llama(hidden=64, heads=8, kv_heads=4, layers=6)
    for model, width, top in ((small, 32, (2, 3)), (big, 64, (4, 5))):
        zinit.inject(model, config)
        state = zinit.injection(model)
        assert state.config == config.replace(layers=top, backbone="llama")
        assert state.dims.hidden_size == width and state.dims.num_layers == len(model.model.layers)
        assert [tuple(p.shape) for p in zinit.trainable_parameters(model)] == [(5, width), (1,)] * 2
    again = zinit.inject(tiny_llama(hidden=64, heads=8, kv_heads=4, layers=6), zinit.injection(big).config)
    assert zinit.injection(again).config == zinit.injection(big).config  # a resolved config is options too
    wider = zinit.inject(tiny_llama(hidden=48, heads=6, kv_heads=3, layers=6), zinit.injection(big).config)
    assert zinit.injection(wider).dims.hidden_size == 48  # same depth, other sizes: they are the model's
    with pytest.raises(ZinitValueError, match=r"layer index 4 is out of range: this model has layers 0\.\.3"):
        zinit.inject(tiny_llama(layers=4), zinit.injection(big).config)  # the layers are indices: too deep here
    named = zinit.add_adapter(tiny_llama(hidden=64, heads=8, kv_heads=4, layers=6), "a", config)
    assert zinit.bank.named_adapter_config(named, "a") == config.replace(layers=(4, 5), backbone="llama")


@pytest.mark.parametrize("name", list(EARLIER))
def test_zinit_json_is_byte_for_byte_what_earlier_zinit_wrote_and_reads_back(name, tmp_path):
    """The writer gives the bytes zinit wrote when the sizes were fields of AdapterConfig (so every earlier zinit
    reads new files), and a file of that text (no save id: an older zinit's, with edited weights) loads, giving the
    config and sizes it describes."""
    build, options = MAKERS[name]
    model = zinit.inject(build(), **options)
    folder = zinit.save_adapter(model, tmp_path / "new")
    written = json.loads((folder / "zinit.json").read_text())
    assert json.dumps({k: v for k, v in written.items() if k not in VOLATILE}, indent=2) == EARLIER[name]
    state = zinit.injection(model)
    assert json.dumps(state.config.to_json(state.dims), indent=2) == EARLIER[name]
    old = tmp_path / "old"
    old.mkdir()
    (old / "zinit.json").write_text(EARLIER[name] + "\n")
    save_file({k: v.contiguous() for k, v in zinit.adapter_state_dict(model).items()}, str(old / "adapter.safetensors"))
    fitted = zinit.AdapterConfig.from_json(zinit.read_adapter_config(old))
    assert fitted == (state.config, state.dims) and isinstance(fitted, zinit.FittedConfig)
    assert json.dumps(fitted.to_json(), indent=2) == EARLIER[name]
    loaded = zinit.load_adapter(build(), old)
    assert zinit.injection(loaded).config == state.config and zinit.injection(loaded).dims == state.dims
    assert all(torch.equal(a, b) for a, b in zip(zinit.adapter_state_dict(loaded).values(),
                                                 zinit.adapter_state_dict(model).values()))


def test_a_file_keeps_its_own_rules():
    """zinit.json is stricter than a config made in Python: its layers are indices within its depth and its
    bias_scale is written out ("blocks", not true); each error names the field, the value and the fix."""
    data = json.loads(EARLIER["llama_v2_random"])
    for key, value, want in (("layers", 2, "a non-empty list of distinct layer indices in 0..3"),
                             ("layers", [4], "a non-empty list of distinct layer indices in 0..3"),
                             ("bias_scale", True, 'null, "blocks" or "all"'),
                             ("hidden_size", 0, "an int >= 1"),
                             ("K", "10", r"an int >= 1 \(the prompt length\)")):
        with pytest.raises(ZinitValueError, match=rf"f.json: field '{key}' must be {want}, got .*correct it or save"):
            zinit.AdapterConfig.from_json({**data, key: value}, "f.json")


def test_the_methods_registry_declares_each_zinit_variant_once():
    """Each zinit method carries its AdapterConfig (Method.adapter); its prepare injects exactly that config with the
    run's layers, K and task head, and the registry's source names each variant's options once."""
    zinit_methods = ["zinit", "zinit_random", "zinit_nogate", "zinit_v2"]
    assert all(M.is_zinit(name) for name in zinit_methods)
    assert all(M.get_method(name).adapter is None for name in ("lora", "adaption_prompt", "vpt", "full"))
    ctx = M.MethodContext("alpaca", 2, 3)
    for name in zinit_methods:
        assert M.zinit_config(name) is M.get_method(name).adapter
        model = M.prepare(name, tiny_llama(), ctx)
        assert zinit.injection(model).config == M.zinit_config(name).replace(layers=(2, 3), K=3, backbone="llama")
    source = Path(inspect.getsourcefile(M)).read_text()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", getattr(node.func, "id", None)) == "AdapterConfig"]
    options = [(k.arg, ast.literal_eval(k.value)) for call in calls for k in call.keywords]
    assert sorted(options) == sorted({*options})  # no option written twice
    assert "inject_options" not in source and "zinit_options" not in source


def test_layer_indices_given_as_a_range_or_a_generator_are_read_once_into_a_tuple():
    import zinit

    configs = [zinit.AdapterConfig(layers=v) for v in (range(1, 3), (i for i in (2, 1)), [2, 1], (1, 2))]
    assert all(c == configs[-1] and c.layers == (1, 2) for c in configs)
