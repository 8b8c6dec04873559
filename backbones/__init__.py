"""zinit's built-in backbones, one model family per file, installed as ``zinit.backbones``.

Importing this package imports every module in it, and each module registers its backbone with
:func:`zinit.register_backbone`. zinit imports it on first use of the registry, so users never do.

Once imported, ``zinit.backbones`` names this package; calling it, ``zinit.backbones()``, still lists the registered
backbone names (:func:`zinit.registry.backbones`), as it did before the package was loaded.
"""

import importlib
import pkgutil
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self) -> list[str]:
        from zinit.registry import backbones

        return backbones()


sys.modules[__name__].__class__ = _CallablePackage

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
