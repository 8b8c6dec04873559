"""A quantized frozen base (zinit.quant, ``--quantize``): torchao weight-only int8 and bitsandbytes 4-bit / LLM.int8
loaded through transformers' own ``quantization_config``, on a tiny random LLaMA saved to disk (as people load
models: ``from_pretrained(folder, quantization_config=...)``). The adapter stays float32; its prompt keys and values
go through the layers' own quantized k/v projections."""

from __future__ import annotations

import json

import pytest
import torch

import zinit
from zinit import quant

from reference import install_reference
from tiny import alpaca_records, randomize_adapter, save_tiny_causal_lm

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' CPU casts, torchao's notices


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 64 wide: bitsandbytes >= 0.50.2 packs 4-bit weights for its CPU kernel in blocks of 64 input features, so a
    # linear layer narrower than that cannot be quantized on CPU (real models are hundreds wide)
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_q"), layers=3, hidden=64)


def load(folder, scheme):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **quant.load_kwargs(scheme, torch.device("cpu")))
    return model.eval()


def ids(seed=0):
    return torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(seed))


def k_proj_weight(model):
    return model.model.layers[-1].self_attn.k_proj.weight


WEIGHT_TYPES = {"int8": "Int8Tensor", "nf4": "Params4bit", "bnb-int8": "Int8Params"}


@pytest.mark.parametrize("scheme", ["int8", "nf4", "bnb-int8"])
def test_zero_init_on_a_quantized_base_computes_the_quantized_model_exactly(folder, scheme):
    model = load(folder, scheme)
    assert type(k_proj_weight(model)).__name__ == WEIGHT_TYPES[scheme] and quant.is_quantized(model)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        tokens = model.generate(input_ids=x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    zinit.inject(model, layers=2, K=4)
    params = zinit.trainable_parameters(model)
    assert all(p.dtype == torch.float32 for p in params)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    assert type(k_proj_weight(model)).__name__ == WEIGHT_TYPES[scheme]  # inject left the base quantized
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
        assert torch.equal(model.generate(input_ids=x, max_new_tokens=5, do_sample=False, pad_token_id=0), tokens)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_open_gates_on_a_quantized_base_match_the_naive_reference(folder, scheme):
    """The prompt term goes through the quantized projections: a float64 naive reference that projects the prompt
    with the same quantized modules agrees; one that projected with the fp32 weights would not (checked too)."""
    model = zinit.inject(load(folder, scheme), layers=2, K=4)
    randomize_adapter(model, seed=3)
    adapters = zinit.layer_adapters(model)
    ref = load(folder, scheme)
    attns = [ref.model.layers[n].self_attn for n in adapters]
    install_reference(ref, attns, [a.prompt.detach() for a in adapters.values()],
                      [a.gate for a in adapters.values()], "tanh")
    x = ids(1)
    with torch.no_grad():
        ours, want = model(input_ids=x).logits, ref(input_ids=x).logits
        plain = zinit.inject(load(folder, None), layers=2, K=4)
        zinit.load_adapter_state_dict(plain, zinit.adapter_state_dict(model))
        fp32 = plain(input_ids=x).logits
    assert torch.allclose(ours, want, atol=2e-4, rtol=1e-4), (ours - want).abs().max()
    assert not torch.allclose(ours, fp32, atol=2e-4, rtol=1e-4)  # the quantization is really in the computation


def test_training_on_an_int8_base_moves_only_the_float32_adapter(folder):
    model = zinit.inject(load(folder, "int8"), layers=2, K=4)
    frozen = {n: p.dequantize().clone() if hasattr(p, "dequantize") else p.detach().clone()
              for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(zinit.trainable_parameters(model), lr=5e-2, fused=True)  # HF Trainer's default
    x = ids(2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(a.gate.abs().max() > 0 for a in zinit.layer_adapters(model).values())
    assert all(p.dtype == torch.float32 for p in zinit.trainable_parameters(model))
    for n, p in model.named_parameters():
        if n in frozen:
            now = p.dequantize() if hasattr(p, "dequantize") else p.detach()
            assert torch.equal(now, frozen[n]), n


def test_an_adapter_trained_on_a_quantized_base_loads_into_the_float_base(folder, tmp_path):
    model = zinit.inject(load(folder, "nf4"), layers=2, K=4)
    randomize_adapter(model, seed=4)
    zinit.save_adapter(model, tmp_path / "adapter")
    fresh = zinit.load_adapter(load(folder, None), tmp_path / "adapter")
    state = zinit.adapter_state_dict(model)
    assert all(torch.equal(v, state[k]) for k, v in zinit.adapter_state_dict(fresh).items())


def test_quantize_option_of_train_and_generate(folder, tmp_path, capsys, monkeypatch):
    from zinit.cli import main

    loaded = []
    real = quant.load_kwargs

    def spy(name, device):
        loaded.append(name)
        return real(name, device)

    monkeypatch.setattr(quant, "load_kwargs", spy)
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps(alpaca_records(8)))
    out = tmp_path / "run"
    assert main(["train", "alpaca", "--model", str(folder), "--data", str(data), "--output", str(out),
                 "--quantize", "int8", "--layers", "2", "--K", "4", "--max-steps", "2", "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0
    adapter = out / "adapter"
    assert zinit.read_adapter_config(adapter)["K"] == 4 and loaded == ["int8"]
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--adapter", str(adapter), "--quantize", "int8", "--greedy",
                 "--max-new-tokens", "3", "--device", "cpu", "Say yes."]) == 0
    assert loaded == ["int8", "int8"]
    with pytest.raises(SystemExit) as bad:  # an unknown scheme is refused before anything loads
        main(["generate", "--model", str(folder), "--quantize", "int3", "Say yes."])
    assert bad.value.code == 2 and "int3" in capsys.readouterr().err


def test_missing_backend_names_the_package_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ImportError, match=r"needs the package 'bitsandbytes'.*zinit\[quant\]"):
        quant.load_kwargs("nf4", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown quantization 'int3'; choose among"):
        quant.get_scheme("int3")
