"""Every Python example in README.md runs as written (on random weights, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    """Run as written; what an example registers (a backbone, a recipe) is gone after it, as in a fresh process."""
    from zinit import recipe, registry

    recipe.list_recipes(), registry.list_backbones()  # the built-ins first, so the snapshot holds them
    monkeypatch.setattr(registry.BACKBONES, "_items", dict(registry.BACKBONES._items))
    monkeypatch.setattr(recipe.RECIPES, "_items", dict(recipe.RECIPES._items))
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": f"readme_{index}"})


def test_every_test_the_reliability_section_cites_exists():
    """The Reliability table names the test behind each row; a renamed or deleted test must not leave a stale row."""
    text = README.read_text()
    section = text[text.index("## Reliability"):text.index("## Tests")]
    files = {"hardening": "test_hardening.py", "run": "test_run_reliability.py", "bad_input": "test_bad_input.py",
             "files": "test_files.py"}
    cited = re.findall(r"`(\w+)::(test_\w+?)(?:\[[^`]*\])?`", section)
    assert len(cited) >= 40
    here = Path(__file__).resolve().parent
    defined = {k: set(re.findall(r"^def (test_\w+)", (here / f).read_text(), flags=re.M)) for k, f in files.items()}
    missing = [f"{k}::{name}" for k, name in cited if name not in defined[k]]
    assert not missing, missing
