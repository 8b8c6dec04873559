"""Fine-tuning methods and the drivers that compare them through a recipe, installed as ``zinit.methods``.

- :mod:`zinit.methods.registry`: the methods registry (:data:`METHODS`, a :class:`zinit.Registry`) and the built-in
  methods (zinit and its ablations, peft's LoRA / IA3 / prefix / prompt tuning / adaption prompt, VPT-deep, BitFit,
  linear probe, full fine-tuning); :func:`prepare` applies one to a model. A new method is one file calling
  :func:`register_method`, found by a ``zinit.methods`` entry point; a zinit variant is
  ``register_method(zinit_method(name, AdapterConfig(...), description))``, its options declared once.
- :mod:`zinit.methods.compare`: ``zinit compare RECIPE --methods ...``, one table.
- :mod:`zinit.methods.ablate`: ``zinit ablate RECIPE``, the paper's ablations over seeds.

Recipes depend on this package (a run applies its ``--method`` through :func:`prepare`); it knows no recipe by name.

>>> from zinit.methods import get_method, list_methods
>>> list_methods()[:3], get_method("lora").name
(['zinit', 'lora', 'ia3'], 'lora')
"""

from .registry import (
    METHODS,
    Method,
    MethodContext,
    NotApplicable,
    get_method,
    list_methods,
    prepare,
    register_method,
    register_peft_targets,
    zinit_config,
    zinit_method,
)

__all__ = ["METHODS", "Method", "MethodContext", "NotApplicable", "get_method", "list_methods", "prepare",
           "register_method", "register_peft_targets", "zinit_config", "zinit_method"]
