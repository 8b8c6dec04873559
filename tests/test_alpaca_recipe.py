"""The Alpaca recipe against the official code where the README says "official": evaluation precision, batch
grouping, and a re-run of a finished run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tiny import alpaca_records
from zinit.lm import load_model
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

    def fake_train(model, task, config):
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
    assert [r["step"] for r in records if "eval_loss" in r] == [0, first["steps"]]  # once each

    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert cli(command) == 0
    assert "this run finished earlier" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files
