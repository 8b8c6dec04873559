"""File modes: everything zinit writes through ``zinit.files.atomic_write`` (adapters, JSON, training checkpoints, other
methods' weights) gets the mode a plain ``open(path, "w")`` would give a new file, 0o666 less the umask, so another
user or a serving process can read it; never the 0o600 of the temporary file it was written to."""

from __future__ import annotations

import os
import stat

import pytest
import torch

import zinit
import zinit.files
from tiny import tiny_llama
from zinit.files import atomic_write, write_json
from zinit.train.checkpoint import save_checkpoint


@pytest.fixture
def set_umask():
    """Set the process umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_saved_files_get_the_umask_mode(tmp_path, set_umask, mask, mode):
    set_umask(mask)
    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    folder = zinit.save_adapter(model, tmp_path / "adapter")
    write_json(tmp_path / "report.json", {"ok": True})
    checkpoint = save_checkpoint(tmp_path, {"step": 1, "trainable": {"x": torch.zeros(2)}})
    files = [folder / "adapter.safetensors", folder / "zinit.json", tmp_path / "report.json", checkpoint]
    assert {str(f.relative_to(tmp_path)): _mode(f) for f in files} == {
        str(f.relative_to(tmp_path)): mode for f in files}


def test_other_methods_weights_get_the_umask_mode(tmp_path, set_umask):
    from zinit.methods import registry as methods

    set_umask(0o022)
    model = tiny_llama(layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    folder = methods.save_trained(model, tmp_path / "linear")
    assert _mode(folder / "trainable.safetensors") == 0o644


def test_a_replaced_file_gets_the_umask_mode_not_the_old_files(tmp_path, set_umask):
    """A private earlier file (0o600, e.g. written by an older zinit) is replaced by one with the umask's mode."""
    set_umask(0o022)
    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    folder = zinit.save_adapter(model, tmp_path / "adapter")
    for name in ("adapter.safetensors", "zinit.json"):
        os.chmod(folder / name, 0o600)
    zinit.save_adapter(model, folder)
    assert _mode(folder / "adapter.safetensors") == _mode(folder / "zinit.json") == 0o644
    path = tmp_path / "plain.txt"
    path.write_text("old")
    os.chmod(path, 0o600)
    atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new" and _mode(path) == 0o644


def test_umask_is_read_without_changing_it(set_umask, monkeypatch):
    set_umask(0o027)
    assert zinit.files.current_umask() == 0o027 and zinit.files.default_file_mode() == 0o640
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    assert zinit.files.current_umask() == 0o027
    if os.path.exists("/proc/self/status"):
        assert calls == []  # Linux: read from /proc, the process umask is never touched

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(zinit.files, "open", no_proc, raising=False)  # the fallback: set and restore under a lock
    assert zinit.files.current_umask() == 0o027 and calls == [0o077, 0o027]
    monkeypatch.undo()
    assert zinit.files.current_umask() == 0o027
