"""Dynamic padding with length-grouped batches vs the official pad-everything-to-512, on the same data.

    python -m zinit.benchmarks.padding [--model PATH] [--batch-size 4] [--repeats 3] [--json OUT.json]

Default: the embedded SmolLM2-135M-Instruct (zinit adapter on all 30 layers, K=10) on the bundled instruction set.
Three ways to batch the same examples, timed interleaved (A B C A B C ...) on full training steps
(forward + backward + AdamW step), reporting real (non-pad) tokens per second:

  official   random batches, every batch padded to --max-seq-len (as alpaca_finetuning_v1)
  dynamic    random batches, each padded to its longest example
  grouped    length-grouped batches (zinit's default), each padded to its longest example
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import zinit
from zinit.lm import load_model
from zinit.recipes.instructions import EMBEDDED_TRAIN, load_records, tokenize
from zinit.train import causal_lm_loss
from zinit.train.data import epoch_batches, pad_collate


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: embedded SmolLM2-135M-Instruct")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per method (after one warm-up step each)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(args.model, torch.device("cpu"))
    zinit.inject(model, layers=min(30, zinit.find_backbone(model).dims(model).num_layers), K=10)
    model.train()
    opt = torch.optim.AdamW(zinit.trainable_parameters(model), lr=1e-4)
    items = tokenize(load_records(EMBEDDED_TRAIN), tok, args.max_seq_len)
    lengths = [len(x["input_ids"]) for x in items]
    plans = {
        "official": (epoch_batches(lengths, args.batch_size, 1, 0, 0, group_by_length=False), args.max_seq_len),
        "dynamic": (epoch_batches(lengths, args.batch_size, 1, 0, 0, group_by_length=False), None),
        "grouped": (epoch_batches(lengths, args.batch_size, 1, 0, 0, group_by_length=True), None),
    }
    times: dict[str, list[float]] = {k: [] for k in plans}
    tokens: dict[str, list[int]] = {k: [] for k in plans}
    padded: dict[str, list[int]] = {k: [] for k in plans}
    for rep in range(args.repeats + 1):
        for name, (steps, pad_to) in plans.items():
            batch = pad_collate([items[i] for i in steps[rep][0]], tok.pad_token_id, pad_to)
            start = time.perf_counter()
            loss, count = causal_lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if rep:  # the first round is warm-up
                times[name].append(elapsed)
                tokens[name].append(int(count))
                padded[name].append(batch["input_ids"].numel())
    rows = {}
    for name in plans:
        rate = sum(tokens[name]) / sum(times[name])
        rows[name] = {"real_tokens_per_s": rate, "median_step_s": statistics.median(times[name]),
                      "min_step_s": min(times[name]), "max_step_s": max(times[name]),
                      "pad_fraction": 1 - sum(tokens[name]) / sum(padded[name])}
    base = rows["official"]["real_tokens_per_s"]
    print(f"{'batching':10s} {'real tok/s':>11s} {'step s (median, min-max)':>26s} {'padding':>8s} {'vs official':>12s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['real_tokens_per_s']:11.0f} {r['median_step_s']:10.2f} ({r['min_step_s']:.2f}-"
              f"{r['max_step_s']:.2f})      {r['pad_fraction']:7.0%} {r['real_tokens_per_s'] / base:11.1f}x")
    result = {"model": args.model or "embedded SmolLM2-135M-Instruct", "batch_size": args.batch_size,
              "max_seq_len": args.max_seq_len, "repeats": args.repeats, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
