"""Bad input, row by row (issue 11, item 9): every public function and ``zinit`` command given a missing, empty or
corrupt file, an adapter for another model, a bad number, a non-image, a full disk or Ctrl-C stops with one clear
line that names the bad value and the fix, and nothing good on disk is lost.

CLI rows run in-process through ``zinit.cli.main``: an input error prints ``zinit: error: <message>`` on stderr and
returns 2; a bad option is argparse's ``... error: argument --X: ...`` and SystemExit 2. README's "Reliability"
section lists every row with the test that checks it.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zinit
from tiny import DELETE, edit_adapter_config, randomize_adapter, run_cli, tiny_encoder, tiny_llama, tiny_vit
from zinit.cli import main

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# helpers


def run(args, capsys):
    """Run ``zinit ARGS`` in-process: (exit status, stderr)."""
    status, _, err = run_cli(args, capsys)
    return status, err


def assert_error_line(status, err, pattern):
    """Exit status 2, no traceback, and the error is one line ``zinit: error: ...`` matching ``pattern``."""
    assert "Traceback" not in err, err[-3000:]
    assert "zinit: error: " in err, err[-3000:]
    line = err[err.index("zinit: error: "):].rstrip("\n")
    assert "\n" not in line, line
    assert status == 2, (status, line)
    assert re.search(pattern, line), (pattern, line)
    assert not line.startswith("zinit: error: '"), line  # a KeyError's message, not its repr
    return line


def assert_usage_error(status, err, option, pattern):
    """argparse's own refusal: SystemExit 2 and ``... error: argument OPTION: <pattern>``."""
    assert status == 2, (status, err[-2000:])
    last = err.strip().splitlines()[-1]
    assert re.search(rf"error: argument {re.escape(option)}: {pattern}", last), last


@pytest.fixture
def model_for(tiny_model_dir):
    """A fresh copy of the tiny causal LM saved in ``tiny_model_dir`` (3 layers, hidden 32, 4 heads / 2 KV heads)."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def adapter(tmp_path, model_for):
    """A saved adapter for the tiny model: layers [1, 2], K=4, random prompts and gates."""
    model = zinit.inject(model_for(), 2, K=4)
    randomize_adapter(model)
    return zinit.save_adapter(model, tmp_path / "adapter")


_config = edit_adapter_config


def _weights(folder, change):
    """Rewrite adapter.safetensors with ``change(tensors)`` through ``safetensors.torch.save_file`` (no metadata), as
    a user's script editing the adapter would; zinit.json is left as it was."""
    tensors = load_file(str(folder / "adapter.safetensors"))
    save_file(change(dict(tensors)), str(folder / "adapter.safetensors"))
    return folder


def _write(name, data):
    def mutate(folder):
        target = folder / name
        target.write_bytes(data(target.read_bytes()) if callable(data) else data)
        return folder
    return mutate


def _unlink(name):
    def mutate(folder):
        (folder / name).unlink()
        return folder
    return mutate


def _other_methods_folder(folder):
    other = folder.parent / "linear"
    other.mkdir()
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(other / "trainable.safetensors"))
    return other


#: The save id of the weights :func:`_other_adapters_weights` writes.
OTHER_SAVE = "feedface" * 4


def _other_adapters_weights(folder):
    """Same shapes, other values: the weights of a second save (another save id), under the first save's
    zinit.json."""
    tensors = load_file(str(folder / "adapter.safetensors"))
    save_file({k: v + 1 for k, v in tensors.items()}, str(folder / "adapter.safetensors"),
              metadata={"format": "zinit-adapter", "save_id": OTHER_SAVE})
    return folder


# ---------------------------------------------------------------------------------------------------------------
# adapter folders: missing, empty, corrupt, wrong types, wrong tensors


ADAPTER_ROWS = [
    ("no such folder", lambda f: f.parent / "missing", FileNotFoundError,
     r"adapter folder \S*missing does not exist"),
    ("folder without zinit.json", _unlink("zinit.json"), FileNotFoundError,
     r"adapter description \S*zinit.json does not exist \(a zinit adapter folder holds zinit.json and "),
    ("the weights file instead of the folder", lambda f: f / "adapter.safetensors", NotADirectoryError,
     r"adapter folder \S*adapter.safetensors is a file: pass the folder that holds zinit.json"),
    ("another method's folder", _other_methods_folder, FileNotFoundError,
     r"\S*linear holds trainable.safetensors \(the weights of another fine-tuning method.*not a zinit adapter"),
    ("zinit.json empty", _write("zinit.json", b""), ValueError,
     r"zinit.json is empty \(0 bytes\); save the adapter again"),
    ("zinit.json not JSON", _write("zinit.json", b"{not json"), ValueError,
     r"zinit.json is not valid JSON: .*; save the adapter again"),
    ("zinit.json binary", _write("zinit.json", b"\xff\xfe\x00\x81 binary"), ValueError,
     r"zinit.json is not valid JSON \(not UTF-8 text\); save the adapter again"),
    ('"K": "10"', lambda f: _config(f, K="10"), ValueError,
     r"zinit.json: field 'K' must be an int >= 1 \(the prompt length\), got \"10\" \(str\); correct it or save"),
    ('"K": -3', lambda f: _config(f, K=-3), ValueError, r"field 'K' must be an int >= 1 .*got -3 \(int\)"),
    ('"K": 0', lambda f: _config(f, K=0), ValueError, r"field 'K' must be an int >= 1 .*got 0 \(int\)"),
    ('"layers": "all"', lambda f: _config(f, layers="all"), ValueError,
     r"field 'layers' must be a non-empty list of distinct layer indices in 0..2, got \"all\" \(str\)"),
    ('"layers": [1, 7]', lambda f: _config(f, layers=[1, 7]), ValueError,
     r"field 'layers' must be .* in 0..2, got \[1, 7\] \(list\)"),
    ('"hidden_size": "32"', lambda f: _config(f, hidden_size="32"), ValueError,
     r"field 'hidden_size' must be an int >= 1, got \"32\" \(str\)"),
    ('"gate": "token"', lambda f: _config(f, gate="token"), ValueError,
     r"field 'gate' must be one of \['head', 'layer', 'none'\], got \"token\""),
    ('"train_modules": "lm_head"', lambda f: _config(f, train_modules="lm_head"), ValueError,
     r"field 'train_modules' must be a list of submodule names, got \"lm_head\""),
    ("zinit.json without K", lambda f: _config(f, K=DELETE), ValueError,
     r"zinit.json lacks the fields \['K'\]; save the adapter again"),
    ("zinit.json from a newer zinit", lambda f: _config(f, format_version=99), ValueError,
     r"format_version 99, newer than this zinit .*; upgrade zinit"),
    ("adapter.safetensors missing", _unlink("adapter.safetensors"), FileNotFoundError,
     r"adapter.safetensors does not exist \(the folder has zinit.json but no weights\); save the adapter again"),
    ("adapter.safetensors zero bytes", _write("adapter.safetensors", b""), ValueError,
     r"adapter.safetensors cannot be read as safetensors: the file is empty \(0 bytes\); it is 0 bytes, "
     r"zinit.json records \d+; save the adapter again"),
    ("adapter.safetensors truncated", _write("adapter.safetensors", lambda data: data[:-16]), ValueError,
     r"adapter.safetensors cannot be read as safetensors: .*; it is \d+ bytes, zinit.json records \d+"),
    ("adapter.safetensors random bytes", _write("adapter.safetensors", lambda data: os.urandom(len(data))),
     ValueError, r"adapter.safetensors cannot be read as safetensors: .*; save the adapter again"),
    ("adapter.safetensors of another save", _other_adapters_weights, ValueError,
     r"adapter.safetensors and \S+zinit.json are from different saves \(adapter.safetensors has save_id "
     rf"{OTHER_SAVE}, zinit.json has save_id [0-9a-f]{{32}}\): a save into \S+ was interrupted between its two "
     r"renames, or one of the files was copied from another adapter folder; save the adapter again "
     r"\(zinit.save_adapter\), or copy both files of one save into the folder; if you wrote adapter.safetensors "
     r"yourself \(averaging or editing adapters\), write it without metadata \(safetensors.torch.save_file\(tensors, "
     r"path\)\) or with metadata=\{'save_id': '[0-9a-f]{32}'\}$"),
    ("a tensor of dtype int64", lambda f: _weights(f, lambda t: {**t, "layers.1.prompt": torch.ones(4, 32).long()}),
     ValueError, r"adapter.safetensors: tensor 'layers.1.prompt' has dtype int64; adapter tensors are floating point"),
    ("an extra key", lambda f: _weights(f, lambda t: {**t, "layers.0.prompt": torch.zeros(4, 32)}), KeyError,
     r"adapter.safetensors does not fit zinit.json beside it: unexpected keys \['layers.0.prompt'\] \(zinit.json "
     r"lists layers \[1, 2\]: to add a layer's adapter, add its index to 'layers' there\); make the two agree"),
    ("a missing key", lambda f: _weights(f, lambda t: {k: v for k, v in t.items() if k != "layers.2.gate"}),
     KeyError, r"adapter.safetensors does not fit zinit.json beside it: missing keys \['layers.2.gate'\] "
     r"\(zinit.json describes layers \[1, 2\] with K=4, gate='head': keys layers.N.prompt \[4, 32\] and "
     r"layers.N.gate \[4\]\); make the two agree: add or remove those tensors, or correct zinit.json"),
    ("a layer's tensors deleted", lambda f: _weights(f, lambda t: {k: v for k, v in t.items() if ".2." not in k}),
     KeyError, r"adapter.safetensors: no tensors for layer 2 \(missing keys \['layers.2.prompt', 'layers.2.gate'\]\), "
     r"which zinit.json beside it lists in 'layers': \[1, 2\]; to drop that layer's adapter, remove 2 from 'layers' "
     r"in zinit.json too; to switch it off and keep the file whole, keep its tensors and set its gate "
     r"\(layers.2.gate\) to zeros"),
    ("a tensor of another shape", lambda f: _weights(f, lambda t: {**t, "layers.1.prompt": torch.zeros(5, 32)}),
     ValueError, r"adapter.safetensors: tensor 'layers.1.prompt' has shape \[5, 32\]; zinit.json beside it \(K=4, "
     r"hidden_size=32\) says \[4, 32\]; write the tensor in that shape, or correct K in zinit.json"),
]


@pytest.mark.parametrize("mutate,error,pattern", [row[1:] for row in ADAPTER_ROWS],
                         ids=[row[0] for row in ADAPTER_ROWS])
def test_bad_adapter_folder(adapter, model_for, tiny_model_dir, capsys, mutate, error, pattern):
    path = mutate(adapter)
    model = model_for()
    with pytest.raises(error, match=pattern):
        zinit.load_adapter(model, path)
    assert not zinit.is_injected(model)  # a failed load leaves the model as it was
    status, err = run(["generate", "--model", tiny_model_dir, "--adapter", path, "--greedy", "--max-new-tokens", "1",
                       "--device", "cpu", "Say yes."], capsys)
    assert_error_line(status, err, pattern)


# ---------------------------------------------------------------------------------------------------------------
# an adapter for another model


def _llama(**changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    args = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2)
    args.update(changes)
    return LlamaForCausalLM(LlamaConfig(**args))


OTHER_MODEL_ROWS = [
    ("other hidden size", lambda: _llama(hidden_size=64),
     r"adapter/model mismatch on hidden_size: the adapter in \S+ has hidden_size=64, the model has hidden_size=32; "
     r"load it into the model it was trained on"),
    ("other head count", lambda: _llama(num_attention_heads=8, num_key_value_heads=2),
     r"mismatch on num_heads: .* has num_heads=8, the model has num_heads=4"),
    ("other layer count", lambda: _llama(num_hidden_layers=5),
     r"mismatch on num_layers: .* has num_layers=5, the model has num_layers=3"),
    ("other backbone", lambda: tiny_vit(),
     r"the adapter in \S+ was saved for backbone 'vit', which does not accept a LlamaForCausalLM: load it into the "
     r"model it was trained on"),
]


@pytest.mark.parametrize("build,pattern", [row[1:] for row in OTHER_MODEL_ROWS], ids=[r[0] for r in OTHER_MODEL_ROWS])
def test_adapter_for_another_model(tmp_path, model_for, tiny_model_dir, capsys, build, pattern):
    folder = zinit.save_adapter(zinit.inject(build(), 2, K=4), tmp_path / "other")
    model = model_for()
    with pytest.raises(ValueError, match=pattern):
        zinit.load_adapter(model, folder)
    assert not zinit.is_injected(model)
    status, err = run(["generate", "--model", tiny_model_dir, "--adapter", folder, "--greedy", "--max-new-tokens",
                       "1", "--device", "cpu", "Say yes."], capsys)
    assert_error_line(status, err, pattern)


# ---------------------------------------------------------------------------------------------------------------
# numbers on the command line: zero, negative, huge, nan / inf


VT = ["train", "vtab", "--task", "svhn", "--data", "nowhere", "--output", "nowhere"]
SQ = ["train", "squad", "--output", "nowhere"]
SA = ["train", "scienceqa", "--data", "nowhere", "--output", "nowhere"]
INT1 = r"must be an int >= 1, got "
K_RULE = r"must be an int in 1\.\.4096 \(the prompt length per layer; the paper uses 10\), got "
LAYERS_RULE = r"must be an int >= 1 \(the number of top layers to adapt; more than the model has means all\), got "
OPTION_ROWS = [
    (["demo", "--layers", "0"], "--layers", LAYERS_RULE + "0"),
    (["demo", "--K", "0"], "--K", K_RULE + "0"),
    (["demo", "--steps", "-1"], "--steps", INT1 + "-1"),
    (["demo", "--lr", "nan"], "--lr", r"must be a number > 0, got nan"),
    (VT + ["--layers", "-2"], "--layers", LAYERS_RULE + "-2"),
    (VT + ["--K", "0"], "--K", K_RULE + "0"),
    (VT + ["--K", "100000"], "--K", K_RULE + "100000"),
    (VT + ["--K", "ten"], "--K", K_RULE + "ten"),
    (VT + ["--epochs", "-1"], "--epochs", r"must be a number > 0, got -1"),
    (VT + ["--epochs", "inf"], "--epochs", r"must be a number > 0, got inf"),
    (VT + ["--warmup-epochs", "-1"], "--warmup-epochs", r"must be a number >= 0, got -1"),
    (VT + ["--batch-size", "0"], "--batch-size", INT1 + "0"),
    (VT + ["--img-size", "0"], "--img-size", INT1 + "0"),
    (VT + ["--num-classes", "1"], "--num-classes", r"must be an int >= 2 \(the class count\), got 1"),
    (VT + ["--method", "bogus"], "--method", r"unknown method 'bogus'; choose from zinit, lora"),
    (SQ + ["--layers", "0"], "--layers", LAYERS_RULE + "0"),
    (SQ + ["--K", "-1"], "--K", K_RULE + "-1"),
    (SQ + ["--epochs", "0"], "--epochs", r"must be a number > 0, got 0"),
    (SQ + ["--max-steps", "0"], "--max-steps", INT1 + "0"),
    (SQ + ["--batch-size", "-4"], "--batch-size", INT1 + "-4"),
    (SQ + ["--grad-accum", "0"], "--grad-accum", INT1 + "0"),
    (SQ + ["--blr", "-0.1"], "--blr", r"must be a number > 0, got -0.1"),
    (SQ + ["--weight-decay", "-1"], "--weight-decay", r"must be a number >= 0, got -1"),
    (SQ + ["--max-length", "0"], "--max-length", INT1 + "0"),
    (SQ + ["--threshold", "nan"], "--threshold", r"must be a finite number, got nan"),
    (SQ + ["--save-every", "0"], "--save-every", INT1 + "0"),
    (["eval", "squad", "--adapter", "a", "--data", "d", "--n-best", "0"], "--n-best", INT1 + "0"),
    (SA + ["--K", "0"], "--K", K_RULE + "0"),
    (SA + ["--max-steps", "-5"], "--max-steps", INT1 + "-5"),
    (SA + ["--batch-size", "0"], "--batch-size", INT1 + "0"),
    (SA + ["--blr", "0"], "--blr", r"must be a number > 0, got 0"),
    (SA + ["--epochs", "nan"], "--epochs", r"must be a number > 0, got nan"),
    (SA + ["--limit", "0"], "--limit", INT1 + "0"),
    (SA + ["--visual-hidden", "0"], "--visual-hidden", INT1 + "0"),
    (SA + ["--max-seq-len", "0"], "--max-seq-len", INT1 + "0"),
    (["eval", "scienceqa", "--data", "d", "--adapter", "a", "--eval-batch-size", "0"], "--eval-batch-size",
     INT1 + "0"),
]


@pytest.mark.parametrize("args,option,pattern", OPTION_ROWS, ids=[" ".join(r[0][:2] + r[0][-2:]) for r in OPTION_ROWS])
def test_bad_number_is_refused_before_anything_loads(capsys, args, option, pattern):
    status, err = run(args, capsys)
    assert_usage_error(status, err, option, pattern)


#: zinit train alpaca / zinit generate (recipes/alpaca.py): the validators of zinit/cliargs.py, applied as the
#: recipes above apply them.
ALPACA_ROWS = [
    (["--layers", "0"], "--layers", LAYERS_RULE + "0"),
    (["--K", "0"], "--K", K_RULE + "0"),
    (["--K", "100000"], "--K", K_RULE + "100000"),
    (["--epochs", "-1"], "--epochs", r"must be a number > 0, got -1"),
    (["--epochs", "nan"], "--epochs", r"must be a number > 0, got nan"),
    (["--batch-size", "0"], "--batch-size", INT1 + "0"),
    (["--max-steps", "0"], "--max-steps", INT1 + "0"),
    (["--grad-accum", "0"], "--grad-accum", INT1 + "0"),
    (["--blr", "-1"], "--blr", r"must be a number > 0, got -1"),
    (["--weight-decay", "-1"], "--weight-decay", r"must be a number >= 0, got -1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs", r"must be a number >= 0, got -1"),
    (["--max-seq-len", "0"], "--max-seq-len", INT1 + "0"),
    (["--save-every", "0"], "--save-every", INT1 + "0"),
    (["--save-every-minutes", "-1"], "--save-every-minutes", r"must be a number >= 0, got -1"),
]
GENERATE_ROWS = [
    (["--max-new-tokens", "0"], "--max-new-tokens", INT1 + "0"),
    (["--temperature", "-1"], "--temperature", r"must be a number > 0, got -1"),
    (["--top-p", "0"], "--top-p", r"must be a number in \(0, 1\], got 0"),
    (["--top-p", "1.5"], "--top-p", r"must be a number in \(0, 1\], got 1.5"),
]
@pytest.mark.parametrize("extra,option,pattern", ALPACA_ROWS, ids=[" ".join(r[0]) for r in ALPACA_ROWS])
def test_bad_number_for_alpaca_is_refused_before_anything_loads(capsys, extra, option, pattern):
    from zinit.cli import build_parser

    with pytest.raises(SystemExit) as stop:  # parsing only: today these values reach the trainer (or crash it)
        build_parser().parse_args(["train", "alpaca", "--output", "nowhere", *extra])
    assert_usage_error(stop.value.code, capsys.readouterr().err, option, pattern)


@pytest.mark.parametrize("extra,option,pattern", GENERATE_ROWS, ids=[" ".join(r[0]) for r in GENERATE_ROWS])
def test_bad_number_for_generate_is_refused_before_anything_loads(capsys, extra, option, pattern):
    from zinit.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["generate", "Say yes.", *extra])
    assert_usage_error(stop.value.code, capsys.readouterr().err, option, pattern)


def test_lists_and_pairs_of_numbers(tmp_path, capsys):
    """Values checked after parsing: still one line, before any model or data is loaded."""
    from test_vtab import write_task

    write_task(tmp_path / "vtab", "svhn", classes=3)
    vt = ["train", "vtab", "--task", "svhn", "--data", tmp_path / "vtab", "--output", tmp_path / "out",
          "--model", "vit_tiny_patch16_224", "--img-size", "32", "--no-progress", "--device", "cpu"]
    rows = [
        (vt + ["--blr-grid=-1"],
         r"--blr-grid '-1': -1 is not allowed; expected comma-separated base learning rates > 0"),
        (vt + ["--blr-grid", "1e-3,fast"], r"--blr-grid '1e-3,fast': 'fast' is not a number"),
        (vt + ["--wd-grid", ","], r"--wd-grid is empty: expected comma-separated weight decays >= 0"),
        (vt + ["--seeds", "0,0"], r"--seeds '0,0' names a seed twice"),
        (vt + ["--seeds", "1.5"], r"--seeds '1.5': 1.5 is not allowed; expected comma-separated whole numbers >= 0"),
        ([*vt[:2], "--task", ",", *vt[4:]], r"--task ',' names no task"),
        (vt + ["--model", "vit_nonexistent_patch99"], r"--model 'vit_nonexistent_patch99' is not a timm model name"),
        (SQ + ["--max-length", "384", "--doc-stride", "400"],
         r"--doc-stride 400 must be smaller than --max-length 384 \(windows overlap by the stride\)"),
    ]
    for args, pattern in rows:
        status, err = run(args, capsys)
        assert_error_line(status, err, pattern)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# model folders, data files, images


def _without_tokenizer(folder, model):
    model.save_pretrained(folder)
    return folder


def test_model_folder_without_tokenizer_for_squad_and_scienceqa(tmp_path, adapter, capsys):
    from zinit.recipes import make_squad_demo

    make_squad_demo.make(tmp_path / "squad", 2, 2)
    bare = _without_tokenizer(tmp_path / "bare", tiny_encoder("roberta", "qa"))
    status, err = run(["eval", "squad", "--model", bare, "--adapter", adapter, "--data",
                       tmp_path / "squad" / "dev-v1.1.json", "--device", "cpu"], capsys)
    assert_error_line(status, err, rf"--model {re.escape(str(bare))} has no tokenizer \(none of tokenizer.json, "
                                   r"tokenizer_config.json, tokenizer.model, ...\): save the base model's tokenizer")
    status, err = run(["train", "squad", "--model", tmp_path / "no" / "such" / "model", "--data", tmp_path / "squad",
                       "--output", tmp_path / "out", "--device", "cpu"], capsys)
    assert_error_line(status, err, r"--model \S+/no/such/model: no such folder")
    status, err = run(["eval", "scienceqa", "--model", bare, "--adapter", adapter, "--data", tmp_path], capsys)
    assert_error_line(status, err, r"--model \S+bare has no tokenizer")
    status, err = run(["eval", "squad", "--adapter", tmp_path / "gone", "--data", tmp_path / "gone.json"], capsys)
    assert_error_line(status, err, r"adapter folder \S+gone does not exist")  # before the model loads


def test_model_folder_without_tokenizer_for_generate_and_alpaca(tmp_path, alpaca_file, capsys):
    bare = _without_tokenizer(tmp_path / "bare", tiny_llama(layers=2))
    status, err = run(["generate", "--model", bare, "--device", "cpu", "Say yes."], capsys)
    assert_error_line(status, err, r"--model \S+bare has no tokenizer")
    status, err = run(["train", "alpaca", "--model", bare, "--data", alpaca_file, "--output", tmp_path / "out",
                       "--device", "cpu"], capsys)
    assert_error_line(status, err, r"--model \S+bare has no tokenizer")


def test_empty_and_malformed_data_files(tmp_path, tiny_model_dir, adapter, capsys):
    from zinit.recipes import scienceqa, squad

    empty = tmp_path / "empty.json"
    empty.write_text("")
    status, err = run(["train", "alpaca", "--model", tiny_model_dir, "--data", empty, "--output", tmp_path / "out",
                       "--device", "cpu"], capsys)
    assert_error_line(status, err, r"Alpaca data file \S+empty.json is empty \(0 bytes\)")

    bad = tmp_path / "dev-v1.1.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": ["a paragraph as a string"]}]}))
    with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\] must be an object with 'context' and a 'qas'"):
        squad.load_squad(bad)
    status, err = run(["eval", "squad", "--model", "unused", "--adapter", adapter, "--data", bad], capsys)
    assert_error_line(status, err, r"dev-v1.1.json: data\[0\].paragraphs\[0\] must be an object")
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "q", "question": "?", "answers": ["c"]}]}]}]}))
    with pytest.raises(ValueError, match=r"question q has an answer without text/answer_start"):
        squad.load_squad(bad)

    root = tmp_path / "sqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps({"1": "a problem as a string"}))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["1"]}))
    with pytest.raises(ValueError, match=r"pid 1 in problems.json is a str, not an object"):
        scienceqa.load_scienceqa(root).split("train")


def test_an_image_that_is_not_an_image_vtab(tmp_path, capsys):
    from test_vtab import write_task

    task = write_task(tmp_path / "vtab", "svhn", classes=3)
    broken = task / "images" / "train800" / "3.jpg"
    broken.write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    status, err = run(["train", "vtab", "--task", "svhn", "--data", tmp_path / "vtab", "--output", out, "--model",
                       "vit_tiny_patch16_224", "--img-size", "32", "--epochs", "1", "--batch-size", "4",
                       "--no-progress", "--device", "cpu"], capsys)
    assert_error_line(status, err, rf"image {re.escape(str(broken))} cannot be decoded: .*; replace the file with the "
                                   r"image, or remove its line from the split file")
    assert not (out / "svhn" / "search").exists()  # nothing trained


def test_an_image_that_is_not_an_image_scienceqa(tmp_path, capsys):
    from test_scienceqa import write_release

    root = write_release(tmp_path / "sqa")
    problems = json.loads((root / "problems.json").read_text())
    pid = next(p for p in json.loads((root / "pid_splits.json").read_text())["train"] if problems[p]["image"])
    broken = root / "images" / "train" / pid / "image.png"
    broken.write_bytes(b"\x89PNG but not really")
    status, err = run(["train", "scienceqa", "--data", root, "--visual-encoder", "timm:vit_tiny_patch16_224",
                       "--output", tmp_path / "out", "--no-progress", "--device", "cpu"], capsys)
    assert_error_line(status, err, rf"pid {pid}: image {re.escape(str(broken))} cannot be decoded: .*; replace the "
                                   r"file with the image, or set the problem's \"image\" to null")
    assert not list((root / "zinit_features").rglob("*.safetensors"))  # no half-filled feature cache


def test_a_damaged_feature_cache_is_computed_again(tmp_path, capsys):
    from zinit.recipes import scienceqa as sqa
    from test_scienceqa import write_release

    data = sqa.load_scienceqa(write_release(tmp_path / "sqa", n_train=6))
    pids = data.split("train")
    encoder = sqa.ImageEncoder("timm:vit_tiny_patch16_224", layers=[12])
    first = sqa.image_features(data, "train", pids, encoder, tmp_path / "cache", progress=False)
    cache = next((tmp_path / "cache").rglob("train.safetensors"))
    cache.write_bytes(cache.read_bytes()[:40])  # a copy cut short
    capsys.readouterr()
    again = sqa.image_features(data, "train", pids, encoder, tmp_path / "cache", progress=False)
    assert again.keys() == first.keys() and all(torch.allclose(again[p], first[p], atol=1e-5) for p in first)
    assert f"the image feature cache {cache} cannot be read" in capsys.readouterr().err
    assert load_file(str(cache)).keys() == first.keys()  # and the cache is whole again


# ---------------------------------------------------------------------------------------------------------------
# a full disk, Ctrl-C and a crash while saving


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _saved_pair(tmp_path):
    """An injected model, its adapter saved in a folder (the earlier adapter), and then changed (the new one)."""
    model = zinit.inject(tiny_llama(layers=3), 2, K=3)
    randomize_adapter(model, seed=1)
    folder = zinit.save_adapter(model, tmp_path / "adapter")
    earlier = {name: (folder / name).read_bytes() for name in ("adapter.safetensors", "zinit.json", "README.md")}
    randomize_adapter(model, seed=2)
    return model, folder, earlier


def _assert_intact(folder, earlier):
    assert sorted(p.name for p in folder.iterdir()) == sorted(earlier)  # no temporary file left behind
    assert {name: (folder / name).read_bytes() for name in earlier} == earlier
    zinit.load_adapter(tiny_llama(layers=3), folder)  # and it loads


def _fail_in_weights(raise_):
    def patch(monkeypatch):
        def half_then_fail(tensors, path, metadata=None):
            Path(path).write_bytes(b"half a file")
            raise_()
        monkeypatch.setattr("zinit.io.save_file", half_then_fail)
    return patch


def _fail_in_description(raise_):
    def patch(monkeypatch):
        real = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name.startswith(".zinit.json."):
                real(self, "{\"half\":")
                raise_()
            return real(self, *args, **kwargs)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    return patch


def _fail_between_renames(raise_):
    def patch(monkeypatch):
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith("zinit.json"):
                raise_()
            return real(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", replace)
    return patch


def _ctrl_c():
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", [_fail_in_weights, _fail_in_description], ids=["weights", "description"])
def test_disk_full_during_save_adapter_keeps_the_earlier_adapter(tmp_path, monkeypatch, where):
    model, folder, earlier = _saved_pair(tmp_path)
    where(_enospc)(monkeypatch)
    with pytest.raises(OSError, match=rf"disk full \(no space left on the device\) while saving the adapter to "
                                      rf"{re.escape(str(folder))}; the adapter there before, if any, is unchanged: "
                                      r"free some space and save again") as caught:
        zinit.save_adapter(model, folder)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _assert_intact(folder, earlier)


@pytest.mark.parametrize("where", [_fail_in_weights, _fail_in_description, _fail_between_renames],
                         ids=["inside the weights write", "inside the description write", "between the two renames"])
def test_ctrl_c_during_save_adapter_keeps_the_earlier_adapter(tmp_path, monkeypatch, where):
    model, folder, earlier = _saved_pair(tmp_path)
    where(_ctrl_c)(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        zinit.save_adapter(model, folder)
    monkeypatch.undo()
    _assert_intact(folder, earlier)


def test_an_error_between_the_two_renames_keeps_the_pair_consistent(tmp_path, monkeypatch):
    model, folder, earlier = _saved_pair(tmp_path)
    new = {k: v.clone() for k, v in zinit.adapter_state_dict(model).items()}
    _fail_between_renames(lambda: _enospc())(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        zinit.save_adapter(model, folder)
    monkeypatch.undo()
    _assert_intact(folder, earlier)  # the earlier weights are back under the earlier description
    zinit.save_adapter(model, folder)  # and the next save goes through
    loaded = zinit.adapter_state_dict(zinit.load_adapter(tiny_llama(layers=3), folder))
    assert all(torch.equal(loaded[k], new[k]) for k in new)


CRASH = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[2])
    import zinit
    from tiny import randomize_adapter, tiny_llama
    model = zinit.inject(tiny_llama(layers=3), 2, K=3)
    randomize_adapter(model, seed=1)
    zinit.save_adapter(model, sys.argv[1])                      # the earlier adapter
    randomize_adapter(model, seed=2)
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith("zinit.json"):
            os._exit(9)                                         # killed between the two renames: no cleanup at all
        return real(src, dst)
    os.replace = replace
    zinit.save_adapter(model, sys.argv[1])
""")


def test_a_crash_between_the_two_renames_is_detected_and_either_adapter_can_be_restored(tmp_path):
    folder = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(folder), str(TESTS)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]
    expected = {}
    for seed in (1, 2):
        model = zinit.inject(tiny_llama(layers=3), 2, K=3)
        randomize_adapter(model, seed=seed)
        expected[seed] = zinit.adapter_state_dict(model)
    with pytest.raises(ValueError, match=r"adapter.safetensors and \S+zinit.json are from different saves "
                                         r"\(adapter.safetensors has save_id [0-9a-f]{32}, zinit.json has save_id "
                                         r"[0-9a-f]{32}\): a save into \S+ was interrupted between its two renames, "
                                         r"or one of the files was copied from another adapter folder; "
                                         r"(.zinit.json.\S+.tmp describes these weights: rename it to zinit.json to "
                                         r"use them; .adapter.safetensors.\S+.tmp holds the weights zinit.json "
                                         r"describes: rename it to adapter.safetensors to restore the earlier "
                                         r"adapter)$") as caught:
        zinit.load_adapter(tiny_llama(layers=3), folder)
    names = re.findall(r"(\.\S+\.tmp) ", str(caught.value))
    description, weights = (folder / names[0]), (folder / names[1])

    import shutil

    for seed, (leftover, target) in ((1, (weights, "adapter.safetensors")), (2, (description, "zinit.json"))):
        copy = tmp_path / f"restored{seed}"
        shutil.copytree(folder, copy)
        (copy / leftover.name).rename(copy / target)  # what the message says to do
        loaded = zinit.adapter_state_dict(zinit.load_adapter(tiny_llama(layers=3), copy))
        assert all(torch.equal(loaded[k], expected[seed][k]) for k in loaded), seed


def test_disk_full_in_json_and_checkpoint_writes_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from zinit.files import write_json
    from zinit.train.checkpoint import load_checkpoint, save_checkpoint

    write_json(tmp_path / "report.json", {"run": 1})
    save_checkpoint(tmp_path, {"step": 3})
    real_write = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        return _enospc() if self.name.startswith(".report") else real_write(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises(OSError, match=rf"disk full .* while writing {re.escape(str(tmp_path / 'report.json'))}; what "
                                      r"was there before is unchanged"):
        write_json(tmp_path / "report.json", {"run": 2})
    with pytest.raises(OSError, match=r"disk full .* while writing \S+checkpoint.pt; what was there before"):
        save_checkpoint(tmp_path, {"step": 4})
    monkeypatch.undo()
    assert json.loads((tmp_path / "report.json").read_text()) == {"run": 1}
    assert load_checkpoint(tmp_path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "report.json"]


def test_cli_disk_full_is_one_line_naming_the_folder(monkeypatch, capsys):
    monkeypatch.setattr("zinit.io.save_file", _enospc)
    status, err = run(["demo", "--steps", "1"], capsys)
    assert_error_line(status, err, r"disk full \(no space left on the device\) while saving the adapter to /\S+; the "
                                   r"adapter there before, if any, is unchanged: free some space and save again")


# ---------------------------------------------------------------------------------------------------------------
# the command's top level


def test_ctrl_c_is_130_with_one_line_and_system_exit_passes_through(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zinit, "save_adapter", interrupted)
    status, err = run(["demo", "--steps", "1"], capsys)
    assert status == 130 and err.strip().splitlines()[-1] == "zinit: interrupted (Ctrl-C)" and "Traceback" not in err

    class Stopped(SystemExit):  # what a training run raises after checkpointing on SIGINT / SIGTERM
        pass

    def stopped(*args, **kwargs):
        raise Stopped(143)

    monkeypatch.setattr(zinit, "save_adapter", stopped)
    with pytest.raises(Stopped) as caught:
        main(["demo", "--steps", "1"])
    assert caught.value.code == 143


def test_bugs_keep_their_traceback_and_zinit_debug_shows_every_one(monkeypatch, tmp_path, tiny_model_dir, capsys):
    args = ["generate", "--model", tiny_model_dir, "--adapter", tmp_path / "missing", "--device", "cpu", "Say yes."]
    status, err = run(args, capsys)  # an input error: one line
    assert_error_line(status, err, r"adapter folder \S+missing does not exist")
    monkeypatch.setenv("ZINIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="missing does not exist"):  # the same error, with its traceback
        main([str(a) for a in args])
    monkeypatch.delenv("ZINIT_DEBUG")

    from zinit import lm

    for bug in (lambda args: {}["a key"], lambda args: 1 / 0, lambda args: None.shape):
        monkeypatch.setattr(lm, "run_generate", bug)
        with pytest.raises((KeyError, ZeroDivisionError, AttributeError)):
            main(["generate", "Say yes."])


# ---------------------------------------------------------------------------------------------------------------
# zinit compare and the demo-data scripts


def test_compare_checks_its_options_and_the_recipes_before_any_run(tmp_path, capsys):
    out = tmp_path / "out"
    vt = ["--task", "svhn", "--data", tmp_path / "nowhere"]
    rows = [
        (["compare", "vtab", "--methods", "zinit", "--output", out, "--nproc", "0", *vt], "--nproc", INT1 + "0"),
        (["compare", "vtab", "--methods", "zinit,linear", "--output", out, *vt, "--K", "0"], "--K", K_RULE + "0"),
    ]
    for args, option, pattern in rows:
        status, err = run(args, capsys)
        assert_usage_error(status, err, option, pattern)
    for args, pattern in [
        (["compare", "alpaca", "--methods", "zinit,bogus", "--output", out], r"--methods: unknown method 'bogus'; "
                                                                              r"choose from zinit, lora"),
        (["compare", "alpaca", "--methods", "zinit", "--output", out, "--lr-grid", "1,abc"],
         r"--lr-grid '1,abc': 'abc' is not a number"),
        (["compare", "alpaca", "--methods", "zinit", "--output", out, "--lr-grid=-1"],
         r"--lr-grid '-1': -1 is not allowed; expected comma-separated multiples > 0"),
    ]:
        status, err = run(args, capsys)
        assert status == 2 and re.search(pattern, err.strip().splitlines()[-1]), err[-2000:]
    assert not out.exists()  # no run was started


@pytest.mark.parametrize("module,args,option", [
    ("make_vtab_demo", ["--size", "0"], "--size"),
    ("make_scienceqa_demo", ["--val", "0"], "--val"),
    ("make_squad_demo", ["--train-paragraphs", "-1"], "--train-paragraphs"),
])
def test_demo_data_scripts_refuse_bad_counts(tmp_path, capsys, module, args, option):
    import importlib

    script = importlib.import_module(f"zinit.recipes.{module}")
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path / "out"), *args])
    assert_usage_error(stop.value.code, capsys.readouterr().err, option, INT1 + args[1])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# public functions: adapter state and trainer settings


@pytest.mark.parametrize("value,pattern", [
    (torch.ones(3, 32, dtype=torch.long), r"adapter state key 'layers.3.prompt' has dtype int64; expected a floating"),
    ([[0.0] * 32] * 3, r"adapter state key 'layers.3.prompt' is a list, not a tensor"),
], ids=["int64 tensor", "a list"])
def test_load_adapter_state_dict_refuses_non_float_values(value, pattern):
    model = zinit.inject(tiny_llama(), [3], K=3)
    state = {k: v.clone() for k, v in zinit.adapter_state_dict(model).items()}
    with pytest.raises(ValueError, match=pattern):
        zinit.load_adapter_state_dict(model, {**state, "layers.3.prompt": value})


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("grad_accum", 0), ("epochs", -1.0),
                                         ("epochs", float("nan")), ("warmup_epochs", -1.0)])
def test_train_refuses_bad_settings_before_the_first_step(tmp_path, field, value):
    from zinit.train import Task, TrainConfig, causal_lm_loss, train
    from zinit.train.data import pad_collate

    items = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}] * 8
    task = Task(examples=items, lengths=[4] * 8, collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss,
                fingerprint={"t": 1})
    config = TrainConfig(output=str(tmp_path / "run"), max_steps=1, batch_size=2, progress=False)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"{field}={value!r} must be"):
        train(zinit.inject(tiny_llama(layers=2), 2, K=3), task, config)


def test_a_failed_restore_keeps_the_earlier_weights_on_disk(tmp_path, monkeypatch):
    """The description's rename fails and so does putting the earlier weights back (a second Ctrl-C, EIO): the
    earlier weights must survive under their backup name, not be deleted."""
    import zinit.io as zio

    model = zinit.inject(tiny_llama(), 2, K=3)
    zinit.save_adapter(model, tmp_path)
    good = (tmp_path / "adapter.safetensors").read_bytes()
    randomize_adapter(model)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if str(dst).endswith("zinit.json") or ".previous.tmp" in str(src):
            raise KeyboardInterrupt
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(zio.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        zinit.save_adapter(model, tmp_path)
    monkeypatch.setattr(zio.os, "replace", real_replace)
    kept = [p for p in tmp_path.iterdir() if p.name.endswith(".previous.tmp")]
    assert len(kept) == 1 and kept[0].read_bytes() == good
