"""What every recipe shares: its common command-line options, declared once, and the skeleton of a training run.

A recipe's ``add_train_args`` picks the shared options it takes with :func:`add_flags` (giving its own defaults)
and adds only the options particular to its task. Its ``run_train`` goes through a :class:`TrainingRun`:

.. code-block:: python

    def run_train(args):
        with TrainingRun("squad", args) as run:             # process group, device; n/a methods end here (exit 3)
            model, tokenizer = load_model(args.model, run.device)
            model = run.prepare(model, head=["qa_outputs"], task="question_answering")
            task = Task(...)                                 # the recipe's data, collate and loss
            with run.hold():                                 # one run at a time writes --output
                result = train(model, task, run.config())    # TrainConfig from the shared options
                if run.is_main:
                    metrics = evaluate(...)                  # the recipe's own metric
                    run.finish(model, metrics)               # adapter/ + summary.json (what zinit compare reads)
        return run.status

The pieces stay separate calls, so a recipe whose protocol differs (VTAB's grid of runs, ScienceQA's choice of the
best validation epoch) uses the ones that fit and writes the rest itself.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

import zinit
from zinit.cliargs import options_of, positive_int
from zinit.quant import QUANTIZE_FLAG
from zinit.train import TrainConfig
from zinit.train import dist as D
from zinit.train.lock import hold_output

from zinit.methods import registry as methods

#: The options several recipes take, each declared once: name -> (flag, argparse keywords). The trainer's settings
#: come from :class:`zinit.train.TrainConfig`'s own fields (each declares its flag, type and help beside its default,
#: :func:`zinit.cliargs.option`), as do :class:`zinit.AdapterConfig`'s ``--layers`` and ``--K``; the others are
#: declared here. A recipe sets its own default with ``add_flags(p, "epochs", epochs=20.0)``; ``%(default)s`` in a
#: help text shows it.
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "output": ("--output", {"required": True, "help": "output folder (re-running the command there resumes)"}),
    "method": ("--method", {}),  # methods.add_method_arg: checked against the registered methods
    **options_of(zinit.AdapterConfig),  # --layers, --K
    **options_of(TrainConfig),
    "max_seq_len": ("--max-seq-len", {"type": positive_int, "default": 512,
                                      "help": "truncate examples to this many tokens (default %(default)s)"}),
    "eval_batch_size": ("--eval-batch-size", {"type": positive_int, "default": 16,
                                              "help": "examples per evaluation batch (default %(default)s)"}),
    "quantize": QUANTIZE_FLAG,
    "no_progress": ("--no-progress", {"action": "store_true", "help": "no progress bars"}),
}
#: The shared options of a recipe's train command that the trainer reads (see :meth:`TrainingRun.config`).
TRAIN_FLAGS = ("output", "layers", "K", "epochs", "max_steps", "warmup_epochs", "batch_size", "grad_accum", "blr",
               "weight_decay", "save_every", "save_every_minutes", "seed", "device", "no_progress", "method")


def add_flags(p: argparse.ArgumentParser, *names: str, **settings: Any) -> None:
    """Add the shared options ``names`` (keys of :data:`FLAGS`) to ``p``. A keyword named like an option sets its
    default (``epochs=20.0``), or, given a dict, replaces any of its argparse keywords (``epochs={"default": None,
    "help": "..."}``).

    >>> p = argparse.ArgumentParser()
    >>> add_flags(p, "K", "epochs", "no_progress", epochs=20.0)
    >>> vars(p.parse_args(["--K", "4"]))
    {'K': 4, 'epochs': 20.0, 'no_progress': False}
    """
    unknown = set(names) - FLAGS.keys() | set(settings) - set(names)
    if unknown:
        raise ValueError(f"add_flags: unknown or unlisted options {sorted(unknown)}; shared options: {sorted(FLAGS)}")
    for name in names:
        if name == "method":
            methods.add_method_arg(p)
            continue
        flag, kwargs = FLAGS[name]
        kwargs = dict(kwargs)
        if name in settings:
            value = settings[name]
            kwargs.update(value if isinstance(value, dict) else {"default": value})
        p.add_argument(flag, **kwargs)


def add_train_flags(p: argparse.ArgumentParser, *, skip: Sequence[str] = (), **settings: Any) -> None:
    """Every option of :data:`TRAIN_FLAGS` but ``skip`` (those the recipe's parser has already), with the recipe's
    defaults as :func:`add_flags` takes them."""
    add_flags(p, *(name for name in TRAIN_FLAGS if name not in skip), **settings)


def base_lr(recipe: str, method: str, args: argparse.Namespace | None = None) -> float | None:
    """The default base learning rate of ``method`` on ``recipe`` for a run with options ``args``
    (:meth:`zinit.Recipe.base_lr`)."""
    return methods.recipe_blr(recipe, method, args)


class TrainingRun:
    """One ``zinit train RECIPE`` run: its process group and device, its method, the trainer settings from the shared
    options, the output folder's lock, and the files ``zinit compare`` reads (``summary.json``, or
    ``not_applicable.json`` with exit status 3 when the method cannot take the model).

    Use it as a context manager around the run; afterwards :attr:`status` is the command's exit status. On leaving
    the block normally every process meets at a barrier and the process group is closed.
    """

    def __init__(self, recipe: str, args: argparse.Namespace) -> None:
        self.recipe, self.args = recipe, args
        self.method: str = getattr(args, "method", "zinit")
        self.env = D.setup(getattr(args, "device", None))
        self.out = Path(args.output)
        self.status = 0
        self.layers: int | None = None

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def progress(self) -> bool:
        """Progress bars on: this is rank 0 and ``--no-progress`` was not given."""
        return self.env.is_main and not getattr(self.args, "no_progress", False)

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, methods.NotApplicable):
            self.status = methods.write_not_applicable(self.out, self.method, str(exc))
            return True
        if kind is None:
            D.barrier()
            D.cleanup()
        return False

    def prepare(self, model: nn.Module, *, head: Sequence[str] = (), task: str = "causal_lm") -> nn.Module:
        """Apply ``--method`` to ``model`` with ``--layers`` (capped at the model's depth) and ``--K``, after seeding
        with ``--seed``; returns the prepared model. A method that cannot take the model raises
        :class:`~zinit.methods.NotApplicable`, which ends the ``with`` block as "n/a"."""
        self.layers = min(self.args.layers, zinit.find_backbone(model).dims(model).num_layers)
        torch.manual_seed(self.args.seed)
        return methods.prepare(self.method, model, methods.MethodContext(self.recipe, self.layers, self.args.K,
                                                                         head=list(head), task=task))

    def blr(self) -> float:
        """``--blr``, or the method's default on this recipe (:func:`base_lr`)."""
        if self.args.blr is not None:
            return self.args.blr
        value = base_lr(self.recipe, self.method, self.args)
        if value is None:
            raise ValueError(f"recipe {self.recipe!r} has no default base lr for method {self.method!r}: pass --blr")
        return value

    def config(self, **overrides: Any) -> TrainConfig:
        """The trainer settings from the shared options (and :meth:`blr`); ``overrides`` win."""
        a = self.args
        settings: dict[str, Any] = {name: getattr(a, name) for name in options_of(TrainConfig) if name != "blr"}
        settings.update(output=str(self.out), progress=not a.no_progress)
        settings.update(overrides)
        if "blr" not in settings:
            settings["blr"] = self.blr()
        return TrainConfig(**settings)

    def describe(self, model: nn.Module, what: str, data: str) -> None:
        """Print the run's first line on rank 0: the recipe, the model, the method and its trainable count, the data.
        """
        if self.is_main:
            how = f"method {self.method}"
            if methods.is_zinit(self.method) and self.layers is not None:
                how = f"top {self.layers} layers, K={self.args.K}" + (f" ({self.method})" if self.method != "zinit"
                                                                      else "")
            print(f"zinit train {self.recipe}: {what}, {how}: {methods.trainable_count(model):,} trainable parameters; "
                  f"{data}", flush=True)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the output folder's lock (rank 0; every rank learns the outcome) for training, saving and evaluation:
        one run at a time writes it (:func:`zinit.train.lock.hold_output`)."""
        with hold_output(self.out, self.env):
            yield

    def finish(self, model: nn.Module, metrics: dict[str, float], adapter: str | Path | None = None,
               save: bool = True, prompt_format: str | None = None) -> Path:
        """Rank 0: save what the method trained into ``adapter`` (default ``OUTPUT/adapter``; ``save=False`` when the
        recipe saved it already; ``prompt_format``: the format it was prompted in, recorded in ``zinit.json``) and
        write ``summary.json`` with ``metrics`` for ``zinit compare``."""
        folder = Path(adapter) if adapter is not None else self.out / "adapter"
        if save:
            methods.save_trained(model, folder, prompt_format)
        methods.write_summary(self.out, self.method, metrics, methods.trainable_count(model), folder, self.device)
        return folder
