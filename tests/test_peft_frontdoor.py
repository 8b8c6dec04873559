"""peft as a front door: zinit registered as a peft method (zinit.integrations.peft), and zinit.convert.to_peft /
from_peft between zinit and stock peft's adaption prompt, both ways."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import zinit
from tiny import clone, randomize_adapter, tiny_llama, tokens

peft = pytest.importorskip("peft")
zp = pytest.importorskip("zinit.integrations.peft")

from peft import PeftConfig, PeftModel, PeftType, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

K = 3


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _zinit_keys(layers, prefix="base_model.model.model.") -> set[str]:
    return {f"{prefix}layers.{n}.self_attn.zinit_adapter.{w}" for n in layers for w in ("prompt", "gate")}


@pytest.fixture(scope="module")
def base():
    return tiny_llama("llama", 4, 2, layers=4)


@pytest.fixture(scope="module")
def ids():
    return tokens(2, 9)


@pytest.fixture
def trained(base):
    """A peft model through the front door (gate per head, tanh: zinit's default) with random non-zero weights."""
    model = get_peft_model(clone(base), zp.ZinitConfig(layers=2, K=K, task_type="CAUSAL_LM"))
    randomize_adapter(model.get_base_model())
    return model


# ---------------------------------------------------------------- the computation is zinit's


@pytest.mark.parametrize("options, task_type", [
    (dict(layers=2), "CAUSAL_LM"),
    (dict(layers=[0, 2], gate="layer", gate_fn="identity"), None),
    (dict(layers=2, gate_init="random"), "CAUSAL_LM"),
    (dict(layers=2, gate="none"), "CAUSAL_LM"),
], ids=["top2-head-tanh-causal_lm", "list-layer-identity-no_task", "random-gate-init", "no-gate"])
def test_get_peft_model_computes_what_inject_computes(base, ids, options, task_type):
    model = get_peft_model(clone(base), zp.ZinitConfig(K=K, task_type=task_type, **options))
    assert type(model.base_model) is zp.ZinitModel
    starts_as_base = torch.equal(_logits(model, ids), _logits(base, ids))
    assert starts_as_base is (options.get("gate_init") != "random" and options.get("gate") != "none")
    randomize_adapter(model.get_base_model())
    reference = zinit.inject(clone(base), options["layers"], K, **{k: v for k, v in options.items() if k != "layers"})
    zinit.load_adapter_state_dict(reference, zinit.adapter_state_dict(model.get_base_model()))
    got = _logits(model, ids)
    assert _max_diff(got, _logits(reference, ids)) <= 1e-6
    assert _max_diff(got, _logits(base, ids)) > 1e-3  # the gates are open: the adapter changes the output
    assert not any(p.requires_grad for n, p in model.named_parameters() if "zinit_adapter" not in n)


def test_print_trainable_parameters_counts_what_zinit_trains(trained, capsys):
    expected = sum(p.numel() for p in zinit.trainable_parameters(trained.get_base_model()))
    assert expected == 2 * (K * 32 + 4)
    trainable, total = trained.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == sum(p.numel() for p in trained.get_base_model().parameters())
    trained.print_trainable_parameters()
    assert f"trainable params: {expected:,d} || all params: {total:,d}" in capsys.readouterr().out


# ---------------------------------------------------------------- save_pretrained / from_pretrained


def test_save_pretrained_writes_only_prompts_and_gates_and_from_pretrained_reproduces(trained, ids, tmp_path):
    want = _logits(trained, ids)
    trained.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("peft_type", "layers", "K", "gate", "gate_fn", "backbone", "task_type")} == {
        "peft_type": "ZINIT", "layers": 2, "K": K, "gate": "head", "gate_fn": "tanh", "backbone": None,
        "task_type": "CAUSAL_LM"}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == _zinit_keys((2, 3))  # no base weight
    assert {tuple(v.shape) for k, v in tensors.items() if k.endswith("prompt")} == {(K, 32)}
    assert {tuple(v.shape) for k, v in tensors.items() if k.endswith("gate")} == {(4,)}
    assert set(peft.get_peft_model_state_dict(trained)) == set(tensors)

    config = PeftConfig.from_pretrained(tmp_path)  # peft finds the class from "peft_type": "ZINIT"
    assert type(config) is zp.ZinitConfig and (config.layers, config.K, config.gate) == (2, K, "head")

    loaded = PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=4), tmp_path)
    assert type(loaded.base_model) is zp.ZinitModel
    assert _max_diff(_logits(loaded, ids), want) <= 1e-6
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode, as peft loads by default

    again = PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=4), tmp_path, is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == trained.get_nb_trainable_parameters()[0]
    lean = PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=4), tmp_path, low_cpu_mem_usage=True)
    assert _max_diff(_logits(lean, ids), want) <= 1e-5  # same tensors, other memory alignment


@pytest.mark.parametrize("options", [dict(gate_init="random"), dict(gate="none")], ids=["random-gate-init", "no-gate"])
def test_gate_variants_save_and_load_through_peft(base, ids, tmp_path, options):
    model = get_peft_model(clone(base), zp.ZinitConfig(layers=2, K=K, task_type="CAUSAL_LM", **options))
    want = _logits(model, ids)  # untrained: a random gate (or no gate) already moves the output
    assert _max_diff(want, _logits(base, ids)) > 1e-4
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: saved[k] for k in options} == options
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    names = ("prompt",) if options.get("gate") == "none" else ("prompt", "gate")
    assert set(tensors) == {k for k in _zinit_keys((2, 3)) if k.rsplit(".", 1)[1] in names}
    torch.manual_seed(123)  # a fresh random gate on load, overwritten by the saved one
    loaded = PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=4), tmp_path)
    assert {k: getattr(loaded.peft_config["default"], k) for k in options} == options
    assert _max_diff(_logits(loaded, ids), want) <= 1e-6
    with loaded.disable_adapter():
        assert torch.equal(_logits(loaded, ids), _logits(base, ids))


def test_from_pretrained_into_a_model_the_adapter_does_not_fit(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    with pytest.raises(KeyError, match=r"does not fit this model.*missing keys.*layers\.4"):
        PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=5), tmp_path)  # top 2 are now layers 3, 4
    with pytest.raises(ValueError, match=r"has shape \(3, 32\), but this model's adapter expects \(3, 48\)"):
        PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=4, hidden=48), tmp_path)


# ---------------------------------------------------------------- training


def test_optimizer_steps_through_the_peft_model_train_only_prompts_and_gates(base, ids):
    model = get_peft_model(clone(base), zp.ZinitConfig(layers=2, K=K, task_type="CAUSAL_LM"))
    frozen = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "zinit_adapter" not in k}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    gates = [a.gate for a in zinit.layer_adapters(model.get_base_model()).values()]
    assert all(g.abs().min() > 0 for g in gates)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    reference = zinit.inject(clone(base), 2, K)
    zinit.load_adapter_state_dict(reference, zinit.adapter_state_dict(model.get_base_model()))
    assert _max_diff(_logits(model, ids), _logits(reference, ids)) <= 1e-6


def test_trainer_saves_adapter_only_checkpoints_and_resumes(base, ids, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{"input_ids": tokens(1, 8, seed=i)[0], "labels": tokens(1, 8, seed=i)[0]} for i in range(8)]

    class AtStart(TrainerCallback):  # the model as training starts: after a resume has loaded the checkpoint
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.logits = _logits(model, ids)

    def run(steps, resume=None):
        model = get_peft_model(clone(base), zp.ZinitConfig(layers=2, K=K, task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, save_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=10)
        start = AtStart()
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[start])
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer, start.logits

    model, _, _ = run(2)
    checkpoint = tmp_path / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert set(load_file(checkpoint / "adapter_model.safetensors")) == _zinit_keys((2, 3))
    assert all(a.gate.abs().min() > 0 for a in zinit.layer_adapters(model.get_base_model()).values())
    loaded = PeftModel.from_pretrained(tiny_llama("llama", 4, 2, layers=4), checkpoint)
    assert _max_diff(_logits(loaded, ids), _logits(model, ids)) <= 1e-6

    # resuming loads the checkpoint's adapter (through PeftModel.load_adapter) into a fresh model, whose gates are 0
    _, trainer, at_start = run(3, resume=str(checkpoint))
    assert trainer.state.global_step == 3
    assert _max_diff(at_start, _logits(model, ids)) <= 1e-6


# ---------------------------------------------------------------- what peft's BaseTuner would do, zinit's way


def test_disable_adapter_is_the_base_model_and_unload_gives_it_back(base, ids, trained):
    adapted = _logits(trained, ids)
    with trained.disable_adapter():
        assert torch.equal(_logits(trained, ids), _logits(base, ids))
        assert trained.get_model_status().enabled is False
    assert torch.equal(_logits(trained, ids), adapted)
    assert trained.get_model_status().enabled is True
    model = trained.unload()
    assert not zinit.is_injected(model) and not hasattr(model, "peft_config")
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(p.requires_grad for p in model.parameters())  # as before get_peft_model
    assert torch.equal(_logits(model, ids), _logits(base, ids))


def test_merge_and_a_second_adapter_are_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="cannot be merged into the base weights.*unload()"):
        trained.merge_and_unload()
    with pytest.raises(ValueError, match="one adapter per model.*zinit.add_adapter"):
        trained.add_adapter("other", zp.ZinitConfig(layers=1, K=2))
    assert list(trained.peft_config) == ["default"]  # peft rolled the refused adapter back
    trained.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="one adapter per model"):
        trained.load_adapter(tmp_path, "other")
    assert zinit.injection(trained.get_base_model()).K == K  # the first adapter is untouched
    with pytest.raises(RuntimeError, match="already injected with zinit; call zinit.eject"):
        get_peft_model(zinit.inject(tiny_llama("llama", 4, 2, layers=4), 1, 2), zp.ZinitConfig(layers=1, K=2))


@pytest.mark.parametrize("options, error, match", [
    (dict(layers=2, K=0), ValueError, r"K=0 must be an int >= 1"),
    (dict(layers=9, K=K), ValueError, r"layers=9 is out of range: this model has 4 layers"),
    (dict(layers=2, K=K, gate="row"), ValueError, r"gate='row' must be one of"),
    (dict(layers=2, K=K, gate_fn="relu"), ValueError, r"gate_fn='relu' must be one of"),
    (dict(layers=2, K=K, gate_init="ones"), ValueError, r"gate_init='ones'"),
    (dict(layers=2, K=K, backbone="gpt9"), (KeyError, ValueError), r"gpt9"),
], ids=["K0", "layers-out-of-range", "bad-gate", "bad-gate_fn", "bad-gate_init",
    "unknown-backbone"])
def test_bad_config_is_refused_by_zinit_inject_and_the_model_is_left_as_it_was(base, options, error, match):
    model = clone(base)
    with pytest.raises(error, match=match):
        get_peft_model(model, zp.ZinitConfig(**options))
    assert not zinit.is_injected(model) and all(p.requires_grad for p in model.parameters())


def test_zinit_config_carries_an_adapter_config_and_takes_its_defaults_and_help(base):
    """ZinitConfig's option fields are AdapterConfig's (the ones peft can hold), with the same defaults and help: if
    either dataclass changes an option, this fails until both agree. Its injection goes through the AdapterConfig."""
    from dataclasses import fields

    adapter = {f.name: f for f in fields(zinit.AdapterConfig)}
    ours = {f.name: f for f in fields(zp.ZinitConfig) if f.name in adapter}
    assert tuple(ours) == zp.OPTIONS
    for name, f in ours.items():
        assert (f.default, f.metadata["help"]) == (adapter[name].default, adapter[name].metadata["help"]), name
    assert zp.ZinitConfig().adapter == zinit.AdapterConfig()
    config = zp.ZinitConfig(layers=[3, 2], K=4, gate="layer", gate_fn="identity", gate_init="random",
                            backbone="llama")
    assert config.adapter == zinit.AdapterConfig(layers=(2, 3), K=4, gate="layer", gate_fn="identity",
                                                 gate_init="random", backbone="llama")
    model = get_peft_model(clone(base), zp.ZinitConfig(K=K)).get_base_model()  # every layer, as AdapterConfig()
    assert zinit.injection(model).config == zinit.AdapterConfig(layers=(0, 1, 2, 3), K=K, backbone="llama")


# ---------------------------------------------------------------- registration


def test_registration_is_idempotent_and_replaces_a_reloaded_module():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType("ZINIT") is PeftType.ZINIT is zp.ZINIT and "ZINIT" in list(PeftType)
    zp.register()
    zp.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ZINIT"] is zp.ZinitConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ZINIT"] is zp.ZinitModel and PEFT_TYPE_TO_PREFIX_MAPPING["ZINIT"] == "zinit_"

    stale = type("ZinitConfig", (zp.ZinitConfig,), {"__module__": zp.__name__})  # what a reload leaves behind
    foreign = type("ZinitConfig", (zp.ZinitConfig,), {"__module__": "someone_else"})
    try:
        PEFT_TYPE_TO_CONFIG_MAPPING[zp.ZINIT] = stale
        zp.register()
        assert PEFT_TYPE_TO_CONFIG_MAPPING["ZINIT"] is zp.ZinitConfig
        PEFT_TYPE_TO_CONFIG_MAPPING[zp.ZINIT] = foreign
        with pytest.raises(RuntimeError, match="already has a method named 'zinit' .registered by someone_else"):
            zp.register()
    finally:
        PEFT_TYPE_TO_CONFIG_MAPPING[zp.ZINIT] = zp.ZinitConfig
        PEFT_TYPE_TO_TUNER_MAPPING[zp.ZINIT] = zp.ZinitModel
        PEFT_TYPE_TO_PREFIX_MAPPING[zp.ZINIT] = zp.PREFIX

    config = zp.ZinitConfig(layers=(1, 2), K=4, gate="layer")
    assert config.layers == [1, 2]  # as JSON gives it back
    assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config)
    assert PeftConfig.from_peft_type(**json.loads(json.dumps(config.to_dict()))) == config


# ---------------------------------------------------------------- zinit <-> stock peft adaption prompt


def _stock_peft(base, L):
    return get_peft_model(clone(base), peft.AdaptionPromptConfig(adapter_len=K, adapter_layers=L,
                                                                  task_type="CAUSAL_LM"))


def test_an_adapter_trained_through_the_front_door_loads_into_stock_peft(base, ids):
    model = get_peft_model(clone(base), zp.ZinitConfig(layers=2, K=K, gate="layer", gate_fn="identity"))
    randomize_adapter(model.get_base_model())
    inner = model.get_base_model()
    state = zinit.convert.to_peft(zinit.adapter_state_dict(inner), zinit.injection(inner).config,
                                  zinit.injection(inner).dims)
    assert set(state) == {f"base_model.model.model.layers.{n}.self_attn.adaption_{w}" for n in (2, 3)
                          for w in ("prompt", "gate")}
    stock = _stock_peft(base, 2)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in
                                                      peft.get_peft_model_state_dict(stock).items()}
    result = peft.set_peft_model_state_dict(stock, state)
    assert result.unexpected_keys == []
    want = _logits(model, ids)
    assert _max_diff(_logits(stock, ids), want) <= 1e-5
    assert _max_diff(want, _logits(base, ids)) > 1e-3


def test_stock_peft_adaption_prompt_converts_to_zinit_and_back(base, ids, tmp_path):
    stock = _stock_peft(base, 3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "adaption_" in name:  # gates too: non-zero, so the prompts count
                p.copy_(torch.randn(p.shape, generator=g))
    state = peft.get_peft_model_state_dict(stock)
    canonical = zinit.convert.from_peft(state)
    model = zinit.inject(clone(base), 3, K, gate="layer", gate_fn="identity")
    zinit.load_adapter_state_dict(model, canonical)
    want = _logits(stock, ids)
    assert _max_diff(_logits(model, ids), want) <= 1e-5
    assert _max_diff(want, _logits(base, ids)) > 1e-3
    folder = zinit.save_adapter(model, tmp_path)  # a saved adapter converts from its zinit.json fields
    back = zinit.convert.to_peft(zinit.adapter_state_dict(model), zinit.read_adapter_config(folder))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


DIMS = zinit.Dims(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, num_layers=4)


def _config(**changes) -> zinit.AdapterConfig:
    fields = dict(backbone="llama", layers=(2, 3), K=K, gate="layer", gate_fn="identity")
    return zinit.AdapterConfig(**{**fields, **changes})


def _state(config) -> dict[str, torch.Tensor]:
    gate = (DIMS.num_heads,) if config.gate == "head" else (1,)
    return {f"layers.{n}.{w}": torch.ones(shape) for n in config.layers
            for w, shape in (("prompt", (config.K, DIMS.hidden_size)), ("gate", gate))}


REPRESENTABLE = r'gate="layer", gate_fn="identity" and layers=L'


@pytest.mark.parametrize("changes, error, match", [
    (dict(gate="head", gate_fn="tanh"), ValueError, r"gate='head', gate_fn='tanh'.*" + REPRESENTABLE),
    (dict(gate="layer", gate_fn="tanh"), ValueError, r"gate_fn='tanh'.*" + REPRESENTABLE),
    (dict(gate="head", gate_fn="identity"), ValueError, r"gate='head'.*" + REPRESENTABLE),
    (dict(layers=(1, 3)), ValueError, r"layers \[1, 3\].*always adapts the top L layers \(\[2, 3\]"),
    (dict(visual_dim=6, visual_hidden=8), ValueError, r"visual projection"),
    (dict(train_modules=("lm_head",)), ValueError, r"train_modules \['lm_head'\]"),
    (dict(backbone="vit"), ValueError, r"'vit' backbone.*LLaMA/Mistral"),
], ids=["head-tanh", "layer-tanh", "head-identity", "not-top-layers", "visual", "train_modules", "vit"])
def test_to_peft_refuses_what_stock_peft_cannot_compute(changes, error, match):
    config = _config(**changes)
    with pytest.raises(error, match=match):
        zinit.convert.to_peft(_state(config), config, DIMS)


def test_to_peft_refuses_bad_input():
    config = _config()
    state = _state(config)
    assert len(zinit.convert.to_peft(state, config, DIMS, prefix="base_model.model.")) == 4
    with pytest.raises(KeyError, match=r"missing keys \['layers.2.gate'\], unexpected keys \['layers.1.gate'\]"):
        zinit.convert.to_peft({**{k: v for k, v in state.items() if k != "layers.2.gate"},
                               "layers.1.gate": torch.ones(1)}, config, DIMS)
    with pytest.raises(ValueError, match=r"layers.3.gate has shape \(4,\), but its config says \(1,\)"):
        zinit.convert.to_peft({**state, "layers.3.gate": torch.ones(4)}, config, DIMS)
    with pytest.raises(TypeError, match="config must be the adapter's AdapterConfig"):
        zinit.convert.to_peft(state, "llama")
    with pytest.raises(TypeError, match=r"needs the model's sizes beside an AdapterConfig"):
        zinit.convert.to_peft(state, config)
    with pytest.raises(ValueError, match=r"needs the adapter's resolved config"):
        zinit.convert.to_peft(state, zinit.AdapterConfig(layers=2, gate="layer", gate_fn="identity"), DIMS)
    with pytest.raises(ValueError, match="not a zinit adapter description"):
        zinit.convert.to_peft(state, {"layers": [2, 3]})
    with pytest.raises(ValueError, match="prefix='base_model' must be a key prefix ending in '.'"):
        zinit.convert.to_peft(state, config, DIMS, prefix="base_model")
