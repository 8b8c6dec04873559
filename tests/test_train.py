"""The trainer and the Alpaca recipe: schedule, loss masking, resume after SIGKILL, torchrun, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zinit
from zinit import lm
from zinit.recipes import instructions
from tiny import char_tokenizer, subprocess_env, tiny_llama
from zinit.train import Task, TrainConfig, TrainingDiverged, causal_lm_loss, lr_at, scaled_lr, train
from zinit.train.data import epoch_batches, pad_collate

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- schedule and optimizer


def test_schedule_values_match_the_official_formula():
    peak = scaled_lr(9e-3, 8 * 4)
    assert peak == pytest.approx(9e-3 * 32 / 256)
    total, warmup = 100, 40
    assert lr_at(0, total, warmup, peak) == 0.0
    assert lr_at(10, total, warmup, peak) == pytest.approx(peak * 10 / 40)
    assert lr_at(40, total, warmup, peak) == pytest.approx(peak)
    assert lr_at(70, total, warmup, peak) == pytest.approx(peak * 0.5)  # half-way through the cosine
    assert lr_at(85, total, warmup, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 45 / 60)))
    assert lr_at(100, total, warmup, peak) == pytest.approx(0.0, abs=1e-15)


def test_trainer_logs_the_scheduled_lr_and_decays_only_prompts(tmp_path):
    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    examples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}] * 16
    task = Task(examples=examples, collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss)
    config = TrainConfig(output=str(tmp_path), epochs=5, warmup_epochs=2, batch_size=4, blr=0.5, progress=False)
    result = train(model, task, config)
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))  # 16 / 4 = 4 steps per epoch, 5 epochs
    peak = 0.5 * 4 / 256
    for r in records:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, 20, 8, peak))
        assert {"loss", "tokens_per_s", "gates"} <= set(r) and len(r["gates"]) == 2
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    decays = [g["weight_decay"] for g in saved["optimizer"]["param_groups"]]
    assert decays == [0.02, 0.0]
    sizes = [[tuple(saved["trainable"][n].shape) for n in names] for names in ([0, 2], [1, 3])
             for names in [[list(saved["trainable"])[i] for i in names]]]
    assert sizes == [[(3, 32), (3, 32)], [(4,), (4,)]]  # prompts decayed, gates not
    assert {p.name for p in result.plots} == {"loss_lr.png", "gates.png"}


def test_length_grouped_batches_are_deterministic_and_cover_each_example_once():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    a = epoch_batches(lengths, 4, 2, epoch=3, seed=7)
    assert a == epoch_batches(lengths, 4, 2, epoch=3, seed=7)
    assert a != epoch_batches(lengths, 4, 2, epoch=4, seed=7)
    flat = [i for step in a for batch in step for i in batch]
    assert len(flat) == len(set(flat)) == 96 and all(len(step) == 2 for step in a)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for step in a for b in step)
    assert spread < 0.25 * sum(max(lengths) - min(lengths) for step in a for b in step)  # batches of like lengths


# ---------------------------------------------------------------- data and loss masking


def test_loss_masking_ignores_prompt_and_padding_tokens():
    tok = char_tokenizer()
    records = [{"instruction": "Say yes.", "input": "", "output": "yes"},
               {"instruction": "Reverse the word.", "input": "cat", "output": "tac"}]
    items = instructions.tokenize(records, tok, 512)
    for r, item in zip(records, items):
        prompt = tok(lm.format_prompt(r["instruction"], r["input"]))["input_ids"]
        answer = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert item["input_ids"] == prompt + answer
        assert item["labels"] == [-100] * len(prompt) + answer
    batch = pad_collate(items, tok.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()

    model = tiny_llama(hidden=32)
    model.resize_token_embeddings(len(tok))
    loss, count = causal_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = []
    for row, item in enumerate(items):
        for t, label in enumerate(item["labels"]):
            if label != -100:
                manual.append(torch.nn.functional.cross_entropy(logits[row, t - 1], torch.tensor(label)))
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), rel=1e-5)
    assert count == sum(len(x["input_ids"]) for x in items)
    noisy = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77))
    assert causal_lm_loss(model, noisy)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    prompt_changed = dict(batch, input_ids=batch["input_ids"].clone())
    prompt_changed["input_ids"][0, 5] = 42  # a prompt token is input, never a target
    assert torch.equal(prompt_changed["labels"], batch["labels"])


def test_alpaca_prompt_templates_are_verbatim():
    assert lm.format_prompt("Do X.", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Input:\nctx"
        "\n\n### Response:")
    assert lm.format_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:")


def test_bundled_instruction_set_is_reproducible_and_disjoint():
    from zinit.recipes import make_instructions

    train_set, heldout = make_instructions.make()
    assert train_set == instructions.load_records(instructions.EMBEDDED_TRAIN)
    assert heldout == instructions.load_records(instructions.EMBEDDED_HELDOUT)
    seen = {(r["instruction"], r["input"]) for r in train_set}
    assert not any((r["instruction"], r["input"]) in seen for r in heldout)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("content,message", [
    (None, r"alpaca_data.json does not exist"),
    ("[{", r"alpaca_data.json is not valid JSON"),
    ("{}", r"non-empty JSON list"),
    (json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]), r"record 1 has no string 'output'"),
    (json.dumps([{"output": "b"}]), r"record 0 has no string 'instruction'"),
    (json.dumps(["text"]), r"record 0 is a str"),
])
def test_bad_data_files_name_the_file_and_record(tmp_path, content, message):
    path = tmp_path / "alpaca_data.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        instructions.load_records(path)


def _tiny_task(n=16):
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}] * n
    return Task(examples=examples, collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss,
                fingerprint={"data": "x"})


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    train(zinit.inject(tiny_llama(layers=2), 2, K=3), _tiny_task(),
          TrainConfig(output=str(tmp_path), max_steps=2, batch_size=4, progress=False))
    with pytest.raises(ValueError, match=r"another configuration \(blr: checkpoint 0.009 vs now 0.5"):
        train(zinit.inject(tiny_llama(layers=2), 2, K=3), _tiny_task(),
              TrainConfig(output=str(tmp_path), max_steps=2, batch_size=4, blr=0.5, progress=False))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value, count = causal_lm_loss(model, batch)
        return (value * float("nan") if calls["n"] == 5 else value), count

    task = _tiny_task()
    task.loss = loss
    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 5"):
        train(model, task, TrainConfig(output=str(tmp_path), max_steps=8, batch_size=4, save_every=2,
                                       progress=False))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4
    assert all(torch.isfinite(p).all() for p in zinit.trainable_parameters(model))


def test_too_little_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"3 training examples are fewer than one optimizer step needs"):
        train(zinit.inject(tiny_llama(layers=2), 1, K=2), _tiny_task(3),
              TrainConfig(output=str(tmp_path), batch_size=4, progress=False))


# ---------------------------------------------------------------- resume and distributed


def _run_script(out, *extra):
    proc = subprocess.run([sys.executable, str(HERE / "train_script.py"), str(out), *extra], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    return proc


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_sigkill_and_resume_ends_with_the_same_adapter(tmp_path):
    straight = _result(_run_script(tmp_path / "straight"))
    killed = _run_script(tmp_path / "resumed", "--kill-at", "7")
    assert killed.returncode == -9  # really SIGKILLed, after the checkpoint of step 6
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 6
    resumed = _result(_run_script(tmp_path / "resumed"))
    assert resumed["resumed_from"] == 6 and resumed["steps"] == straight["steps"] == 10
    for key, value in straight["adapter"].items():
        diff = (torch.tensor(resumed["adapter"][key]) - torch.tensor(value)).abs().max().item()
        assert diff <= 1e-6, key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the re-done step is logged once


def _torchrun(port, model_dir, data, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "zinit", "train", "alpaca", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data),
           "--output", str(out), "--layers", "2", "--K", "4", "--warmup-epochs", "1", "--blr", "8",
           "--batch-size", "2", "--no-progress", "--device", "cpu", *extra]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_torchrun_two_processes_alpaca_recipe(tmp_path, tiny_model_dir, alpaca_file):
    out = tmp_path / "run"
    _torchrun(29731, tiny_model_dir, alpaca_file, out, "--epochs", "8", "--save-every", "5")
    config = json.loads((out / "train_config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch"] == 4 and config["total_steps"] == 48
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 48
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # deterministic: 5.1 -> 3.2 here
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"]
    for name in ("loss_lr.png", "gates.png", "checkpoint.pt", "eval_before.json"):
        assert (out / name).exists(), name
    from transformers import AutoModelForCausalLM

    model = zinit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert zinit.injection(model).layers == (1, 2)


def test_fsdp2_sharded_run_matches_the_replicated_run(tmp_path, tiny_model_dir, alpaca_file):
    """FSDP2 shards the frozen model; the adapter it trains must be the one the replicated run trains."""
    from safetensors.torch import load_file

    _torchrun(29732, tiny_model_dir, alpaca_file, tmp_path / "plain", "--epochs", "2")
    _torchrun(29733, tiny_model_dir, alpaca_file, tmp_path / "fsdp", "--epochs", "2", "--fsdp")
    plain = load_file(str(tmp_path / "plain" / "adapter" / "adapter.safetensors"))
    sharded = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter.safetensors"))
    assert plain.keys() == sharded.keys()
    for key in plain:
        assert (plain[key] - sharded[key]).abs().max().item() <= 1e-6, key
    report = json.loads((tmp_path / "fsdp" / "report.json").read_text())
    assert report["after"]["n"] == 24  # the held-out evaluation ran on the sharded model too


def test_generate_command_answers_with_an_adapter(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    model = zinit.inject(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 2, K=4)
    zinit.save_adapter(model, tmp_path / "adapter")
    from zinit.cli import main

    args = ["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"), "--greedy",
            "--max-new-tokens", "5", "--device", "cpu", "Reverse the word.", "--input", "cat"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == greedy  # greedy is deterministic
    assert main(args[:5] + args[6:]) == 0  # the paper's sampling (top-p 0.75, temperature 0.1)


def test_padding_benchmark_runs_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    from zinit.benchmarks import padding

    result = padding.main(["--model", str(tiny_model_dir), "--repeats", "1", "--max-seq-len", "256",
                           "--json", str(tmp_path / "padding.json")])
    assert set(result["rows"]) == {"official", "dynamic", "grouped"}
    assert result["rows"]["official"]["pad_fraction"] > result["rows"]["grouped"]["pad_fraction"]
    assert json.loads((tmp_path / "padding.json").read_text())["rows"]
    assert "vs official" in capsys.readouterr().out
