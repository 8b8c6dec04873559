"""The docstring examples of zinit.backbones, zinit.recipes, zinit.methods and zinit.benchmarks (the repository's
backbones/, recipes/, methods/ and benchmarks/ folders, installed under the zinit namespace).

pytest's own --doctest-modules collects files by path, which would import these folders a second time under their
folder names (and register every built-in backbone twice); here each module is imported by its installed name.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import zinit.backbones
import zinit.benchmarks
import zinit.methods
import zinit.recipes

PACKAGES = (zinit.backbones, zinit.recipes, zinit.methods, zinit.benchmarks)
MODULES = sorted([package.__name__ for package in PACKAGES] + [
    info.name for package in PACKAGES for info in pkgutil.iter_modules(package.__path__, package.__name__ + ".")])


def test_every_package_is_listed():
    assert {"zinit.backbones.vit", "zinit.recipes.alpaca", "zinit.methods", "zinit.methods.compare",
            "zinit.benchmarks.speed"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
