"""Where a decoding step's adapter cost goes: zinit's prompt term timed inside a real ``generate()`` loop, and the
same calls timed alone, against the base model's own decoder layer.

The ``adapters`` suite of :mod:`zinit.benchmarks.speed` gives the end-to-end ratio (decoding with adapters vs the
base model). This splits it: for one adapter on every row and for N adapters mixed over the rows, the time spent in
zinit's prompt term per adapted layer and decoding step *in situ* (the ``generate()`` of the whole model, every
call of the attention wrapper's ``prompt_term`` timed), the same term replayed alone in a tight loop on the very
same inputs (caches warm), and the base model's own decoder layer per decoding step (timed by hooks) for scale::

    python -m zinit.benchmarks.decode_cost --shape smollm2 --rows 8,16 --threads 2
    python -m zinit.benchmarks.decode_cost --shape llama7b --layers 2 --rows 16   # LLaMA-7B's width, 2 of its layers

It patches the attention wrapper's reference to ``prompt_term`` while it runs (a diagnostic, not a library path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import torch

import zinit
import zinit.hf

from .speed import SHAPES, _named_zinit_adapters, llama


@dataclass
class _Tally:
    """Calls timed: how many, their seconds in all, and the last call's inputs (kept for the replay alone)."""

    calls: int = 0
    seconds: float = 0.0
    last: tuple[tuple, dict] | None = None


@contextmanager
def _timed_prompt_term(tally: _Tally) -> Iterator[None]:
    """Time every decoding-step call (one query per row) of the wrapper's prompt term, whatever it raises."""
    inner = zinit.hf.prompt_term

    def timed(module, query, scaling, **kwargs):
        start = time.perf_counter()
        out = inner(module, query, scaling, **kwargs)
        if query.shape[-2] == 1:
            tally.calls += 1
            tally.seconds += time.perf_counter() - start
            tally.last = ((module, query, scaling), kwargs)
        return out

    zinit.hf.prompt_term = timed
    try:
        yield
    finally:
        zinit.hf.prompt_term = inner


@contextmanager
def _timed_layers(model: torch.nn.Module, record: list[float]) -> Iterator[None]:
    """Time each decoder layer's forward at the decoding steps (one new token per row), by forward hooks (every
    model timed carries them, so their few µs weigh on every row alike)."""
    started: list[float] = []

    def before(module, args, kwargs):
        started.append(time.perf_counter())

    def after(module, args, kwargs, output):
        took = time.perf_counter() - started.pop()
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:
            record.append(took)

    handles = []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _alone_us(call: tuple[tuple, dict], repeats: int = 300) -> tuple[float, bool]:
    """Microseconds per call of the same prompt term on the same inputs, replayed in a tight loop (best of 3), and
    whether the replay computed a term (it runs under the route of the measured rows)."""
    args, kwargs = call
    best = float("inf")
    with torch.no_grad():
        computed = zinit.hf.prompt_term(*args, **kwargs) is not None
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(repeats):
                zinit.hf.prompt_term(*args, **kwargs)
            best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e6, computed


def measure(shape: str, rows: int, new_tokens: int, prompt_len: int, adapters: int, K: int, rounds: int,
            layers: int | None = None) -> dict:
    """The ``generate()`` seconds of the base model, of the adapted model serving the base (route None), one adapter
    and ``adapters`` mixed (medians of ``rounds`` interleaved rounds), and the prompt term's µs per adapted layer and
    decoding step in situ and alone; every layer adapted."""
    base = llama(shape, None, torch.float32, "cpu", layers)
    layers = zinit.find_backbone(base).dims(base).num_layers
    model, names = _named_zinit_adapters(base, adapters, layers, K)
    prompt = torch.randint(0, base.config.vocab_size, (rows, prompt_len))
    mixed = [names[i % len(names)] for i in range(rows)]
    routes: dict[str, Any] = {"base model": False, "adapters carried, none used": None, "one adapter": names[0]}
    if len(set(mixed)) > 1:
        routes[f"{len(set(mixed))} adapters mixed"] = mixed

    def generate(route: Any) -> None:
        target = base if route is False else model
        with torch.no_grad(), (nullcontext() if route is False else zinit.use_adapters(model, route)):
            target.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    seconds: dict[str, list[float]] = {k: [] for k in routes}
    in_situ: dict[str, list[float]] = {k: [] for k in routes}
    tallies: dict[str, _Tally] = {}
    layer_us: list[float] = []
    for round_ in range(rounds + 1):  # round 0 warms up
        for key, route in routes.items():
            tally, layer_times = _Tally(), []
            with _timed_prompt_term(tally), _timed_layers(base if route is False else model, layer_times):
                start = time.perf_counter()
                generate(route)
                took = time.perf_counter() - start
            if round_:
                seconds[key].append(took)
                if tally.calls:
                    in_situ[key].append(tally.seconds / tally.calls * 1e6)
                if route is False:
                    layer_us.append(sum(layer_times) / len(layer_times) * 1e6)
            tallies[key] = tally
    out: dict[str, Any] = {"shape": shape, "hidden_size": base.config.hidden_size, "rows": rows, "layers": layers,
                           "new_tokens": new_tokens, "K": K, "threads": torch.get_num_threads(), "rows_of": {}}
    base_s = statistics.median(seconds["base model"])
    for key in routes:
        took = statistics.median(seconds[key])
        row = {"seconds": took, "vs_base": base_s / took, "decode_calls": tallies[key].calls}
        if in_situ[key]:
            with zinit.use_adapters(model, routes[key]):
                alone, computed = _alone_us(tallies[key].last)
            row |= {"prompt_term_us_in_situ": statistics.median(in_situ[key]), "prompt_term_us_alone": alone,
                    "computes_a_term": computed}
        out["rows_of"][key] = row
    # the base model's own decoder layer per decoding step (its whole forward: attention, MLP, norms), for scale
    out["base_layer_us"] = statistics.median(layer_us)
    return out


def print_report(result: dict) -> None:
    print(f"\n[{result['shape']} (width {result['hidden_size']}), {result['rows']} rows x {result['new_tokens']} new "
          f"tokens, {result['layers']} layers adapted, K={result['K']}, {result['threads']} threads]  the base "
          f"model's decoder layer: {result['base_layer_us']:.0f} µs per decoding step")
    print(f"  {'':30s} {'generate s':>10s} {'vs base':>8s}   prompt term per layer and decoding step")
    for key, row in result["rows_of"].items():
        term = ""
        if "prompt_term_us_in_situ" in row:
            situ, alone = row["prompt_term_us_in_situ"], row["prompt_term_us_alone"]
            term = (f"{situ:7.1f} µs in situ ({situ / result['base_layer_us']:.1%} of the layer), {alone:6.1f} µs "
                    f"alone")
        print(f"  {key:30s} {row['seconds']:10.3f} {row['vs_base']:7.3f}x   {term}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="layers of the shape to build (default: all of them)")
    p.add_argument("--rows", default="8,16", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    for name in ("rounds", "new_tokens", "adapters", "K") + (("threads",) if a.threads is not None else ()):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: give at least 1")
    if a.prompt_len < 2:  # a 1-token prompt's prefill would count as a decoding step
        p.error(f"--prompt-len {a.prompt_len}: give at least 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = []
    for rows in (int(r) for r in a.rows.split(",")):
        results.append(measure(a.shape, rows, a.new_tokens, a.prompt_len, a.adapters, a.K, a.rounds, a.layers))
        print_report(results[-1])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
