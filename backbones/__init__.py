"""zinit's built-in backbones, one model family per file, installed as ``zinit.backbones``.

Importing this package imports every module in it, and each module registers its backbone with
:func:`zinit.register_backbone`. zinit imports it on first use of the registry (:data:`zinit.registry.BACKBONES`), so
users never do; :func:`zinit.list_backbones` lists the registered names.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
