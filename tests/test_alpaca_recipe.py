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
