"""The Alpaca recipe against the official code where the README says "official": evaluation precision, batch
grouping, and a re-run of a finished run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tiny import alpaca_records
from zinit.lm import load_model
import zinit
from zinit.recipes import alpaca


def test_evaluation_runs_in_the_trainers_precision(monkeypatch, tiny_model_dir):
    """Every forward of the held-out evaluation (teacher-forced loss and greedy generation) runs inside
    ``zinit.train.dist.autocast`` (bf16 autocast on CUDA), as the other recipes evaluate and as the model trained."""
    inside = []
    depth = [0]

    @contextlib.contextmanager
    def recording(device):
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(alpaca.D, "autocast", recording)
    model, tokenizer = load_model(str(tiny_model_dir), torch.device("cpu"))
    model.register_forward_pre_hook(lambda module, args: inside.append(depth[0] > 0))
    alpaca.evaluate(model, tokenizer, alpaca_records(4), max_seq_len=64, batch_size=2, max_new_tokens=2)
    assert len(inside) >= 4 and all(inside), inside  # 2 loss batches + 2 generation batches of 2+ forwards


@pytest.mark.parametrize("flags, grouped", [([], True), (["--pad-to-max"], False),
                                            (["--pad-to-max", "--group-by-length"], True),
                                            (["--no-group-by-length"], False)])
def test_length_grouping_is_an_option_off_under_pad_to_max(tmp_path, tiny_model_dir, alpaca_file, monkeypatch,
                                                           flags, grouped):
    """``--pad-to-max`` restores the official batches: random order, every batch padded to the full length (length
    grouping off); ``--group-by-length`` / ``--no-group-by-length`` choose either way."""
    from zinit.cli import main as cli

    seen = {}

    def fake_train(model, task, config, callbacks=()):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(alpaca, "train", fake_train)
    with pytest.raises(SystemExit):
        cli(["train", "alpaca", "--model", str(tiny_model_dir), "--data", str(alpaca_file), "--output",
             str(tmp_path / "out"), "--layers", "1", "--K", "2", "--max-seq-len", "256", "--no-progress", "--device",
             "cpu", *flags])
    assert seen["config"].group_by_length is grouped
    assert seen["config"].pad_to == (256 if "--pad-to-max" in flags else None)


def test_running_a_finished_run_again_changes_nothing(tmp_path, tiny_model_dir, alpaca_file, capsys):
    """A run killed during its final evaluation (its report not yet written) and run again reports the last step's
    real loss (stored in the checkpoint, not NaN) and writes each evaluation record once; once the report exists, the
    same command says the run is finished and changes no file."""
    import json

    from zinit.cli import main as cli

    out = tmp_path / "out"
    command = ["train", "alpaca", "--model", str(tiny_model_dir), "--data", str(alpaca_file), "--eval-data",
               str(alpaca_file), "--output", str(out), "--layers", "1", "--K", "2", "--epochs", "1", "--batch-size",
               "8", "--max-seq-len", "256", "--no-progress", "--device", "cpu"]
    assert cli(command) == 0
    first = json.loads((out / "report.json").read_text())
    assert first["final_train_loss"] == first["final_train_loss"]  # not NaN

    (out / "report.json").unlink()  # as if killed during the final evaluation
    assert cli(command) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["final_train_loss"] == first["final_train_loss"] and again["steps"] == first["steps"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "eval_loss" in r]
    assert steps == [r["step"] for r in first["heldout_curve"]] == sorted(set(steps))  # once each
    assert steps[0] == 0 and steps[-1] == first["steps"]

    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert cli(command) == 0
    assert "this run finished earlier" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def chat_model_dir(tmp_path):
    """The tiny LLaMA with a chat template (a chat model, as the embedded SmolLM2-Instruct)."""
    from tiny import save_tiny_causal_lm
    from transformers import AutoTokenizer

    folder = save_tiny_causal_lm(tmp_path / "chat_model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("flag, expected", [([], "chat"), (["--prompt-format", "alpaca"], "alpaca")])
def test_a_chat_model_trains_through_its_template_and_the_adapter_records_it(tmp_path, chat_model_dir, alpaca_file,
                                                                              capsys, flag, expected):
    """A base with a chat template trains on one user turn of that template (TRL's SFT), the answer and EOS the only
    targets; ``zinit.json`` records the format, and ``zinit generate`` prompts the adapter the same way (an older
    adapter recording none gets the Alpaca prompt it was trained on)."""
    import json

    from zinit import lm
    from zinit.cli import main as cli

    out = tmp_path / "out"
    seen = {}
    real_train = alpaca.train

    def spy(model, task, config, callbacks=()):
        seen["task"] = task
        return real_train(model, task, config, callbacks=callbacks)

    mp = pytest.MonkeyPatch()
    mp.setattr(alpaca, "train", spy)
    try:
        assert cli(["train", "alpaca", "--model", str(chat_model_dir), "--data", str(alpaca_file), "--output",
                    str(out), "--layers", "1", "--K", "2", "--epochs", "1", "--batch-size", "8", "--max-seq-len",
                    "256", "--no-progress", "--device", "cpu", *flag]) == 0
    finally:
        mp.undo()
    _, tokenizer = load_model(str(chat_model_dir), torch.device("cpu"))
    record = json.loads(alpaca_file.read_text())[1]  # one with an input
    prompt = lm.format_prompt(record["instruction"], record["input"], expected, tokenizer)
    assert prompt.startswith("<|im_start|>user\n") == (expected == "chat")
    special = lm.adds_special_tokens(expected)
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    answer_ids = tokenizer(prompt + record["output"], add_special_tokens=special)["input_ids"][len(prompt_ids):]
    item = seen["task"].examples[1]
    assert item["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert item["labels"] == [-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    # a chat run's checkpoint says so; an Alpaca run's is what every run before the option wrote (those resume)
    assert seen["task"].fingerprint.get("prompt_format", "alpaca") == expected
    assert ("prompt_format" in seen["task"].fingerprint) == (expected == "chat")
    description = zinit.read_adapter_config(out / "adapter")
    assert description["prompt_format"] == expected

    asked = []
    real_answer = lm.answer
    mp = pytest.MonkeyPatch()
    mp.setattr(lm, "answer", lambda *a, **k: asked.append(k["prompt_format"]) or real_answer(*a, **k))
    try:
        for extra in ([], ["--prompt-format", "alpaca"]):
            assert cli(["generate", "Say yes.", "--model", str(chat_model_dir), "--adapter", str(out / "adapter"),
                        "--greedy", "--max-new-tokens", "2", "--device", "cpu", *extra]) == 0
        legacy = {k: v for k, v in description.items() if k != "prompt_format"}
        (out / "adapter" / "zinit.json").write_text(json.dumps(legacy))
        assert cli(["generate", "Say yes.", "--model", str(chat_model_dir), "--adapter", str(out / "adapter"),
                    "--greedy", "--max-new-tokens", "2", "--device", "cpu"]) == 0
        assert cli(["generate", "Say yes.", "--model", str(chat_model_dir), "--greedy", "--max-new-tokens", "2",
                    "--device", "cpu"]) == 0
    finally:
        mp.undo()
    assert asked == [expected, "alpaca", "alpaca", "chat"]


def test_the_held_out_curve_is_scored_while_training_and_survives_a_resume(tmp_path, tiny_model_dir, alpaca_file):
    """``--eval-every N`` scores the held-out loss every N steps (teacher forced, the same number the final evaluation
    reports at the last step); the points land in report.json and metrics.jsonl between the before and after scores,
    each step once, also when the run is interrupted and resumed."""
    import json

    from zinit.cli import main as cli

    out = tmp_path / "out"
    command = ["train", "alpaca", "--model", str(tiny_model_dir), "--data", str(alpaca_file), "--eval-data",
               str(alpaca_file), "--output", str(out), "--layers", "1", "--K", "2", "--epochs", "2", "--batch-size",
               "4", "--max-seq-len", "256", "--no-progress", "--device", "cpu", "--eval-every", "4", "--blr", "0.5"]
    calls, real = [], alpaca.heldout_loss

    def dies_at_step_8(*a, **k):  # the before-score, step 4, then the run is killed while scoring step 8
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(alpaca, "heldout_loss", dies_at_step_8)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            cli(command)
    finally:
        mp.undo()
    assert [r["step"] for r in json.loads((out / "heldout_curve.json").read_text())] == [4]
    assert cli(command) == 0  # resumed from its last checkpoint: the steps after it run (and are scored) again
    report = json.loads((out / "report.json").read_text())
    curve = report["heldout_curve"]
    assert [r["step"] for r in curve] == [0, 4, 8, report["steps"]] and report["steps"] == 12
    assert curve[0]["eval_loss"] == report["before"]["loss"] and curve[-1]["eval_loss"] == report["after"]["loss"]
    assert curve[2]["eval_loss"] < curve[0]["eval_loss"]  # it learns: the curve is the model's, not a constant
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8, 12]

    (out / "checkpoint.pt").unlink()  # the error's advice for another configuration: start afresh, same folder
    (out / "report.json").unlink()
    assert cli([*command[:-4], "--eval-every", "3", "--blr", "0.5"]) == 0
    fresh = json.loads((out / "report.json").read_text())["heldout_curve"]
    assert [r["step"] for r in fresh] == [0, 3, 6, 9, 12]  # none of the earlier run's points


@pytest.mark.parametrize("grad_accum, every", [(1, 3), (2, 1), (4, 1)])
def test_the_default_curve_spacing_is_half_an_epoch_of_optimizer_steps(grad_accum, every):
    import argparse

    args = argparse.Namespace(fsdp=False, eval_every=None)
    # 24 examples, batch 4, one process: 6 micro-batches per epoch, 6 / grad_accum optimizer steps
    assert alpaca._curve_every(args, {"batch_size": 4}, 24, 1, grad_accum) == every
    assert alpaca._curve_every(argparse.Namespace(fsdp=True, eval_every=5), {"batch_size": 4}, 24, 1, 1) == 0
