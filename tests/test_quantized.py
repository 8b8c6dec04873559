"""A quantized frozen base (zinit.quant, ``--quantize``): torchao weight-only int8 and bitsandbytes 4-bit / LLM.int8
loaded through transformers' own ``quantization_config``, on a tiny random LLaMA saved to disk (as people load
models: ``from_pretrained(folder, quantization_config=...)``). The adapter stays float32; its prompt keys and values
go through the layers' own quantized k/v projections.

Each test is skipped only when the backend its scheme needs is missing (torchao for ``int8``, bitsandbytes for
``nf4`` and ``bnb-int8``), so one missing backend never hides the other's tests.

bitsandbytes packs a 4-bit weight for its CPU inference kernel (no autograd) only on CPUs with AVX512-BF16; the
``cpu_repack`` fixture makes it do so on any CPU, so the evaluate-then-train tests take that path everywhere."""

from __future__ import annotations

import contextlib

import importlib
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

import zinit
from zinit import quant

from reference import install_reference
from tiny import alpaca_records, randomize_adapter, save_tiny_causal_lm, subprocess_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # bitsandbytes' CPU casts, torchao's notices


BACKENDS = ("torchao", "bitsandbytes")


@cache
def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def needs(*names: str) -> pytest.MarkDecorator:
    """Skip unless the backend of each scheme in ``names`` imports."""
    missing = sorted({quant.SCHEMES[n].package for n in names} - {p for p in BACKENDS if _importable(p)})
    return pytest.mark.skipif(bool(missing), reason=f"needs {' and '.join(missing)}, which is not installed")


def schemes(*names: str) -> list:
    """``names`` as parameters, each skipped on its own when its backend is missing."""
    return [pytest.param(name, marks=needs(name)) for name in names]


ALL = ("int8", "nf4", "bnb-int8")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 64 wide: bitsandbytes >= 0.50.2 packs 4-bit weights for its CPU kernel in blocks of 64 input features, so a
    # linear layer narrower than that cannot be quantized on CPU (real models are hundreds wide)
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_q"), layers=3, hidden=64)


class _PackedKernel(torch.autograd.Function):
    """A stand-in for bitsandbytes' AVX512-BF16 ``gemv_4bit``: bfloat16 math on the weight the layer held when it was
    packed (:func:`_weight_the_packed_kernel_reads`), the result in the input's dtype as the kernel returns it, and, as
    that opaque kernel under torch's fallback for operators without autograd, an output in the graph whose backward
    gives its input nothing."""

    @staticmethod
    def forward(ctx, A, weight):
        return torch.nn.functional.linear(A.to(torch.bfloat16), weight.to(torch.bfloat16)).to(A.dtype)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _weight_the_packed_kernel_reads(data, state):
    """The weight bitsandbytes' packed kernel computes with, from a layer's codes and state just before packing: the
    codes, and the block scales as packing keeps them (double quantization undone, rounded to bfloat16). Recomputed at
    every pack, so a repack after zinit's unpack (:func:`zinit.quant.unpack_for_autograd`) computes with what that
    unpack gave back."""
    import copy

    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise

    state = copy.deepcopy(state)
    if state.nested:
        state.absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        state.nested = False
    state.absmax = state.absmax.to(torch.bfloat16).float()
    return dequantize_4bit(data, state)


@pytest.fixture
def cpu_repack(monkeypatch):
    """bitsandbytes packs a 4-bit weight for its CPU inference kernel (``gemv_4bit``, no autograd) on the first
    eval-mode forward without grad, but only where ``has_avx512bf16()``: make that true for the Linear4bit layers
    built from here on, whatever the CPU, and count the packs (the list returned).

    bitsandbytes registers that kernel at import only on such a CPU; elsewhere ``gemv_4bit`` is its default kernel,
    which dequantizes with plain torch ops (so autograd flows through it) and does not read the packed layout. There,
    :class:`_PackedKernel` takes its place for packed weights, with the real kernel's contract."""
    packs: list[int] = []
    if not _importable("bitsandbytes"):
        return packs
    from bitsandbytes import functional
    from bitsandbytes.nn import modules

    real = modules._convert_weight_packed_for_cpu
    stand_in = not functional.has_avx512bf16()

    def counting(data, state, *args, **kwargs):
        packs.append(1)
        weight = _weight_the_packed_kernel_reads(data, state) if stand_in else None
        data, state = real(data, state, *args, **kwargs)
        state.test_packed_weight = weight
        return data, state

    if stand_in:
        real_gemv = functional.gemv_4bit

        def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
            if not getattr(state, "packing_format_for_cpu", False):
                return real_gemv(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
            return _PackedKernel.apply(A, state.test_packed_weight)

        monkeypatch.setattr(functional, "gemv_4bit", gemv_4bit)
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(modules, "_convert_weight_packed_for_cpu", counting)
    return packs


def load(folder, scheme):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **quant.load_kwargs(scheme, torch.device("cpu")))
    return model.eval()


def ids(seed=0):
    return torch.randint(4, 90, (2, 11), generator=torch.Generator().manual_seed(seed))


def k_proj_weight(model):
    return model.model.layers[-1].self_attn.k_proj.weight


WEIGHT_TYPES = {"int8": "Int8Tensor", "nf4": "Params4bit", "bnb-int8": "Int8Params"}


@pytest.mark.parametrize("scheme", schemes(*ALL))
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


@pytest.mark.parametrize("scheme", schemes("int8", "nf4"))
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


@needs("int8")
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


@needs("nf4")
def test_an_adapter_trained_on_a_quantized_base_loads_into_the_float_base(folder, tmp_path):
    model = zinit.inject(load(folder, "nf4"), layers=2, K=4)
    randomize_adapter(model, seed=4)
    zinit.save_adapter(model, tmp_path / "adapter")
    fresh = zinit.load_adapter(load(folder, None), tmp_path / "adapter")
    state = zinit.adapter_state_dict(model)
    assert all(torch.equal(v, state[k]) for k, v in zinit.adapter_state_dict(fresh).items())


@needs("int8")
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
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'; registered quantization schemes: int8, nf4, bnb-int8"):
        quant.get_scheme("int3")


# ---------------------------------------------------------------- evaluate, then train (issue 24)


def _gates(adapter_folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return [v for k, v in load_file(str(adapter_folder / "adapter.safetensors")).items() if "gate" in k]


@pytest.mark.parametrize("scheme", schemes(*ALL))
def test_train_alpaca_evaluates_then_trains_on_every_scheme(folder, tmp_path, cpu_repack, scheme):
    """``zinit train alpaca --quantize S --eval-data ...`` as users run it: it scores the held-out set first (eval
    mode, no grad, greedy generation), then trains; the training loss falls and the gates open. With nf4 that first
    evaluation packs the 4-bit weights for bitsandbytes' CPU inference kernel, which has no autograd: before the fix
    the whole run trained nothing (every gradient None, the gates stayed at 0), without a word."""
    from zinit.cli import main

    data, heldout, out = tmp_path / "train.json", tmp_path / "heldout.json", tmp_path / "run"
    data.write_text(json.dumps(alpaca_records(8)))
    heldout.write_text(json.dumps(alpaca_records(1)))
    assert main(["train", "alpaca", "--model", str(folder), "--data", str(data), "--eval-data", str(heldout),
                 "--output", str(out), "--quantize", scheme, "--layers", "2", "--K", "4", "--max-steps", "4",
                 "--epochs", "3", "--warmup-epochs", "0", "--batch-size", "4", "--blr", "8", "--device", "cpu",
                 "--no-progress"]) == 0
    if scheme == "nf4":
        assert cpu_repack  # the evaluation before tuning did pack the weights: this is the path of the issue
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and sum(losses[-2:]) < sum(losses[:2]) - 0.2, losses  # the last two batches vs the first
    assert all(g.abs().min() > 0 for g in _gates(out / "adapter"))  # every gate of every layer moved from 0


@needs("nf4")
@pytest.mark.parametrize("add", ["inject", "add_adapter"])
def test_zinit_inject_alone_keeps_a_4bit_base_trainable_after_an_evaluation(folder, cpu_repack, add):
    """A library user who never heard of keep_autograd: inject (or add a named adapter), evaluate without grad (the
    weights get packed for bitsandbytes' inference kernel), then a plain torch loop: every prompt and gate gets a
    gradient, because inject / add_adapter hook the 4-bit layers themselves."""
    model = load(folder, "nf4")
    if add == "inject":
        zinit.inject(model, layers=2, K=4)
        params = zinit.trainable_parameters(model)
    else:
        zinit.add_adapter(model, "a", layers=2, K=4)
        params = [p for p in model.parameters() if p.requires_grad]
    x = ids(3)
    with zinit.use_adapters(model, "a") if add == "add_adapter" else contextlib.nullcontext():
        with torch.no_grad():
            model(input_ids=x)
        assert quant.packed_for_cpu(model)  # the evaluation packed them, as bitsandbytes does
        model.train()
        model(input_ids=x, labels=x).loss.backward()
    assert params and all(p.grad is not None for p in params)


@needs("nf4")
@pytest.mark.parametrize("evaluate", ["no_grad", "inference_mode", "generate", "cpu_without_avx512_bf16"])
def test_keep_autograd_trains_a_4bit_base_after_any_evaluation(folder, cpu_repack, evaluate):
    """A library user's loop: inject, keep_autograd, evaluate (any way that runs without grad), train. Evaluation
    keeps bitsandbytes' fast packed kernel; every training forward runs on the autograd kernel; an evaluation after
    training packs again and, the gates being closed, computes exactly what the first one did."""
    model = load(folder, "nf4")
    if evaluate == "cpu_without_avx512_bf16":  # what bitsandbytes decides on such a CPU (at load): never pack
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    model = zinit.inject(model, layers=2, K=4)  # inject hooks the 4-bit layers itself (keep_autograd below: a no-op)
    assert quant.keep_autograd(model) == 3 * 7 and quant.keep_autograd(model) == 3 * 7  # idempotent
    x = ids(5)

    def run_evaluation():
        model.eval()
        if evaluate == "inference_mode":
            with torch.inference_mode():
                return model(input_ids=x).logits.clone()
        with torch.no_grad():
            if evaluate == "generate":
                model.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)
            return model(input_ids=x).logits

    first = run_evaluation()
    packed = len(quant.packed_for_cpu(model))
    assert packed == (0 if evaluate == "cpu_without_avx512_bf16" else 3 * 7)
    state = {k: v.clone() for k, v in zinit.adapter_state_dict(model).items()}
    assert torch.equal(run_evaluation(), first)
    params = zinit.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=5e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert quant.packed_for_cpu(model) == []
    moved = zinit.adapter_state_dict(model)
    assert all(not torch.equal(moved[k], v) for k, v in state.items())
    zinit.load_adapter_state_dict(model, state)  # the gates closed again: the base model's function
    assert torch.equal(run_evaluation(), first)
    assert len(quant.packed_for_cpu(model)) == packed


@needs("nf4")
@pytest.mark.parametrize("double_quant", [True, False])
def test_unpacking_gives_the_autograd_kernel_exactly_the_weights_the_packed_kernel_used(cpu_repack, double_quant):
    """The 4-bit codes are reordered losslessly and the block scales kept as the packed kernel held them (the loaded
    ones rounded to bfloat16), so training sees the weights inference uses, and packing again gives back the very
    same packed tensors (no drift over evaluate/train cycles). bitsandbytes' own inverse re-quantizes the scales
    (and scrambles them without double quantization), which is why zinit does not use it for them."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, module=layer)
    layer.weight._quantize("cpu")
    codes = layer.weight.data.clone()
    expected = _weight_the_packed_kernel_reads(codes, layer.weight.quant_state)

    quant.keep_autograd(layer)
    layer.eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)
    assert quant.is_packed_for_cpu(layer)
    packed = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()

    x.requires_grad_(True)
    layer(x).sum().backward()  # eval mode, grad on: unpacked before the forward, and x gets its gradient
    assert not quant.is_packed_for_cpu(layer)
    assert torch.equal(layer.weight.data, codes)
    unpacked = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(unpacked, expected)
    assert torch.allclose(x.grad, unpacked.sum(0).expand(3, -1), atol=1e-5)
    with torch.no_grad():
        layer(x.detach())
    assert torch.equal(layer.weight.data, packed[0]) and torch.equal(layer.weight.quant_state.absmax, packed[1])


@needs("nf4")
def test_the_trainer_names_packed_4bit_layers_when_no_gradient_arrives(folder, tmp_path, cpu_repack, monkeypatch):
    """Without keep_autograd (switched off here, as in a trainer written before it), the step after an evaluation
    gets no gradient at all: the trainer's guard stops the run at step 1 and names the layers at fault."""
    from zinit.train import NoGradient, Task, TrainConfig, causal_lm_loss, train
    from zinit.train.data import pad_collate

    monkeypatch.setattr(quant, "keep_autograd", lambda model: 0)
    model = zinit.inject(load(folder, "nf4"), layers=2, K=4)
    with torch.no_grad():
        model(input_ids=ids())
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}] * 8
    task = Task(examples=examples, collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss)
    with pytest.raises(NoGradient, match=r"step 1: none of the 4 trainable parameters received a gradient.*"
                                         r"21 bitsandbytes 4-bit layer\(s\) of this model \(e\.g\. model\.layers\.0\."
                                         r"self_attn\.q_proj\) are in bitsandbytes' CPU inference layout.*"
                                         r"zinit\.quant\.keep_autograd\(model\)"):
        train(model, task, TrainConfig(output=str(tmp_path), max_steps=2, batch_size=4, progress=False))


# ---------------------------------------------------------------- one backend missing (issue 24, item 5)


@needs("int8")
def test_torchao_tests_run_when_bitsandbytes_is_missing():
    """This file run in a fresh interpreter where bitsandbytes cannot be imported (``sys.modules[name] = None``
    makes ``import`` fail and ``find_spec`` return None, as for a package that is not installed): a torchao test
    still runs and passes, a bitsandbytes one is skipped, naming it. (The mirror case, torchao hidden, is the same
    code path; one fresh interpreter costs ~10 s of CPU, so only the case the issue reported is kept here.)"""
    here = Path(__file__).name
    tests = [f"{here}::test_training_on_an_int8_base_moves_only_the_float32_adapter",  # torchao's
             f"{here}::test_an_adapter_trained_on_a_quantized_base_loads_into_the_float_base"]  # bitsandbytes'
    code = ("import sys; sys.modules['bitsandbytes'] = None; import pytest; "
            f"sys.exit(pytest.main(['-p', 'no:cacheprovider', '-q', '-rs', *{tests!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed, 1 skipped" in proc.stdout and "needs bitsandbytes, which is not installed" in proc.stdout, \
        proc.stdout[-3000:]
