"""zinit's built-in recipes, one task per file, installed as ``zinit.recipes``.

:data:`BUILTIN` is the one list of them: importing this package imports each, and each registers itself with
:func:`zinit.register_recipe`; ``zinit train``, ``zinit eval`` and ``zinit compare`` list whatever the registry holds
(these, then any recipe a ``zinit.recipes`` entry point names). The package's other modules are shared by the recipes
and never import one: ``common`` (options and the run skeleton), ``instructions`` (Alpaca-format data), ``published``
(datasets as the Hub publishes them, converted once into each recipe's official layout) and ``vision`` (timm ViT
loading). The fine-tuning methods a run applies, and the ``zinit compare`` / ``zinit ablate`` drivers, are
:mod:`zinit.methods`.
"""

import importlib

#: The built-in recipes, in the order ``zinit train -h`` lists them.
BUILTIN = ("alpaca", "scienceqa", "vtab", "squad")

for _name in BUILTIN:
    importlib.import_module(f"{__name__}.{_name}")
