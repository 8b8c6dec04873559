"""The recipe protocol and the recipe registry: what ``zinit train``, ``zinit eval`` and ``zinit compare`` iterate over.

A recipe is one task (Alpaca, ScienceQA, VTAB-1k, SQuAD, or a user's own) described by a :class:`Recipe`: its name,
the options and the function of its ``train`` command (and optionally of its ``eval`` command), and what
``zinit compare`` needs to compare fine-tuning methods through it (the metrics it writes, how to set a method's
learning rate, how to carve a validation split for ``--lr-grid``).

Recipes are registered on import, as backbones are. The built-in recipes are the explicit list in ``zinit.recipes``
(the repository's ``recipes/`` folder); zinit imports that package, and every module named by a ``zinit.recipes``
entry point, the first time the registry is consulted. zinit's core never imports a recipe by name. A new recipe is
one file with one :func:`register_recipe` call (README, "Adding a recipe"), exposed by an entry point:

.. code-block:: toml

    [project.entry-points."zinit.recipes"]
    mytask = "my_package.my_recipe"
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .registry import Registry

ENTRY_POINT_GROUP = "zinit.recipes"
BUILTIN_PACKAGE = "zinit.recipes"


@dataclass(frozen=True)
class Recipe:
    """One task zinit can train (and score, and compare methods on).

    Attributes:
        name: the command's name, ``zinit train NAME``; lowercase letters, digits, ``_`` and ``-``.
        description: one line for ``zinit train -h``.
        task: what the model learns: ``"causal_lm"``, ``"image_classification"``, ``"question_answering"`` (or a new
            kind); fine-tuning methods key their default learning rates by it.
        add_train_args: ``parser -> None``, the options of ``zinit train NAME``. It must take ``--output`` and
            ``--method`` (``zinit compare`` passes both); ``zinit.recipes.common`` declares the shared options once.
        run_train: ``args -> exit status``. It writes ``summary.json`` (the metrics below, trainable parameters,
            adapter size, peak memory) into ``--output``; a method the model cannot take writes
            ``not_applicable.json`` and exits 3 (``zinit.recipes.common.TrainingRun`` does both).
        add_eval_args / run_eval: ``zinit eval NAME`` (None: the recipe has no eval command).
        eval_description: one line for ``zinit eval -h``.
        metrics: the metrics of ``summary.json`` that ``zinit compare`` tabulates, headline first (higher is better).
        throughput_unit: what a training step's throughput counts, for ``zinit compare``'s table.
        blr: the default base learning rate of a fine-tuning method on this recipe, by method name
            (``lr = blr · global batch / 256``); see :meth:`base_lr` for the whole lookup.
        default_blr: the base learning rate of a method with no entry in ``blr`` and none of its own for this recipe
            or its task (``Method.blr``).
        resolve_blr: ``args -> base lr or None``, for a default that depends on the run's options (the Alpaca
            recipe's embedded run); None from it falls back to :meth:`base_lr`.
        lr_flag: the option that sets the base learning rate.
        lr_grid_flag: set when the recipe chooses the learning rate itself on its own validation split, given a
            comma-separated list in this option (VTAB's ``--blr-grid``): ``zinit compare --lr-grid`` then passes the
            grid there instead of running each value.
        validation_args: ``(recipe options, scratch folder) -> recipe options`` of a run that trains on part of the
            training data and scores a validation split instead of the evaluation data (``zinit compare
            --lr-grid``). None (and no ``lr_grid_flag``): the recipe cannot select a learning rate.
        compare_args: options ``zinit compare`` adds to every run of this recipe (e.g. skip a score it does not use).
        paper: ``args -> {row label: {metric: value}}``, the published numbers ``zinit compare`` shows below its
            measured rows for a run with options ``args`` (e.g. SQuAD's per version); None: no published numbers.
    """

    name: str
    description: str
    task: str
    add_train_args: Callable[[argparse.ArgumentParser], None]
    run_train: Callable[[argparse.Namespace], int]
    add_eval_args: Callable[[argparse.ArgumentParser], None] | None = None
    run_eval: Callable[[argparse.Namespace], int] | None = None
    eval_description: str = ""
    metrics: tuple[str, ...] = ()
    throughput_unit: str = "tokens/s"
    blr: Mapping[str, float] = field(default_factory=dict)
    default_blr: float | None = None
    resolve_blr: Callable[[argparse.Namespace], float | None] | None = None
    lr_flag: str = "--blr"
    lr_grid_flag: str | None = None
    validation_args: Callable[[Sequence[str], Path], list[str]] | None = None
    compare_args: tuple[str, ...] = ()
    paper: Callable[[argparse.Namespace], Mapping[str, Mapping[str, float]]] | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name) or self.name != self.name.lower():
            raise ValueError(f"recipe name {self.name!r}: use lowercase letters, digits, '_' and '-' (it becomes "
                             "`zinit train NAME`)")
        if (self.add_eval_args is None) != (self.run_eval is None):
            raise ValueError(f"recipe {self.name!r}: give both add_eval_args and run_eval, or neither")
        for method, value in self.blr.items():
            if not value > 0:
                raise ValueError(f"recipe {self.name!r}: blr[{method!r}] = {value!r} must be > 0")
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "compare_args", tuple(self.compare_args))

    @property
    def headline(self) -> str | None:
        """The metric ``zinit compare`` ranks by (the first of :attr:`metrics`), or None."""
        return self.metrics[0] if self.metrics else None

    def base_lr(self, method: str, method_blr: Mapping[str, float] | None = None,
                args: argparse.Namespace | None = None) -> float | None:
        """The default base learning rate of ``method`` on this recipe, the first found of: :attr:`resolve_blr` of
        the run's options ``args``; the recipe's table :attr:`blr`; the method's own value (``method_blr``, its
        ``Method.blr``) for this recipe's name, then for its task; :attr:`default_blr`.

        >>> r = Recipe("toy", "a toy", "causal_lm", lambda p: None, lambda a: 0, blr={"lora": 2e-3}, default_blr=0.01)
        >>> r.base_lr("lora"), r.base_lr("ia3", {"toy": 5e-3}), r.base_lr("ia3", {"causal_lm": 0.1}), r.base_lr("full")
        (0.002, 0.005, 0.1, 0.01)
        """
        if args is not None and self.resolve_blr is not None:
            value = self.resolve_blr(args)
            if value is not None:
                return value
        if method in self.blr:
            return self.blr[method]
        for key in (self.name, self.task):
            if method_blr and key in method_blr:
                return method_blr[key]
        return self.default_blr


#: The recipe registry: the ``zinit.recipes`` package (its ``BUILTIN`` list gives their order) and ``zinit.recipes``
#: entry points.
RECIPES: Registry[Recipe] = Registry("recipe", Recipe, package=BUILTIN_PACKAGE, group=ENTRY_POINT_GROUP,
                                     how_to_add="add one: README, 'Adding a recipe'")


def register_recipe(recipe: Recipe, *, override: bool = False) -> Recipe:
    """Add a recipe to the registry (so ``zinit train/eval/compare NAME`` run it) and return it.

    Registering a name twice raises unless ``override=True`` (which replaces the earlier recipe).

    >>> import zinit
    >>> toy = zinit.Recipe("toy-doc", "a recipe that trains nothing", "causal_lm", lambda p: None, lambda a: 0)
    >>> zinit.register_recipe(toy).name in zinit.list_recipes()
    True
    """
    return RECIPES.register(recipe, override=override)


def list_recipes() -> list[str]:
    """Names of the registered recipes: the built-in ones in their listed order, then the others as registered.

    >>> import zinit
    >>> zinit.list_recipes()[:4]
    ['alpaca', 'scienceqa', 'vtab', 'squad']
    """
    return RECIPES.names()


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; a ValueError lists the registered names otherwise.

    >>> import zinit
    >>> zinit.get_recipe("squad").metrics
    ('f1', 'exact')
    """
    return RECIPES.get(name)
