"""The Alpaca recipe against the official code where the README says "official": evaluation precision, batch
grouping, and a re-run of a finished run."""

from __future__ import annotations

import contextlib

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
