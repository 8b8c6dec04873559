"""Shared fixtures; the model builders live in tiny.py."""

import json
import os

import pytest
import torch

from tiny import alpaca_records, save_tiny_causal_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(alpaca_records()))
    return path
