"""Shared fixtures; the model builders live in tiny.py."""

import json
import os
import signal

import pytest
import torch

from tiny import alpaca_records, save_tiny_causal_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))
# A suite started as a background job (`cmd &` in a script) inherits SIGINT ignored, and so would every child
# process: zinit then rightly leaves Ctrl-C alone, and the tests of what Ctrl-C does could not run. They model a
# foreground terminal, so SIGINT is switched back on here (children get the default action at exec); the
# background case has its own test (test_run_reliability.py).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config):
    """Which installed versions differ from constraints.txt (the ones the suite last passed with): a run on newer
    releases (`bash setup.sh --latest`) says so in its first lines."""
    from importlib import metadata
    from pathlib import Path

    pins = Path(__file__).resolve().parent.parent / "constraints.txt"
    if not pins.is_file():
        return "versions: no constraints.txt beside the tests"
    differ = []
    for line in pins.read_text().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name, pinned = line.split("==", 1)
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            differ.append(f"{name} {installed} (pinned {pinned})")
    if not differ:
        return "versions: exactly constraints.txt"
    return "versions differing from constraints.txt: " + ", ".join(differ)


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
