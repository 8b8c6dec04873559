"""Speed and memory of zinit against its peers and against the floor, measured side by side in one process.

    python -m zinit.benchmarks.speed                      # every suite, CPU, random weights (also: zinit bench)
    python -m zinit.benchmarks.speed --suite train --shape mha --repeats 7 --json out.json
    python -m zinit.benchmarks.speed --device cuda --dtype bfloat16 --suite train --shape llama7b   # on a GPU

Every timing is interleaved (A B C A B C ...) after one warm-up round, and reported as median (min-max) with the
ratio to the reference row. Suites:

  train      training step (forward + backward + AdamW step on the adapter parameters) of zinit, peft adaption
             prompt (same K and L), peft LoRA (r=8 on q,v) and the floor: the same frozen model with one trainable
             zero bias added to the input of the lowest adapted layer, so the backward pass reaches exactly as deep
             and no adapter math is done. The least any adapter can cost.
  infer      inference forward of zinit vs the base model.
  generate   greedy generation with KV cache (batch 1 and 8, --new-tokens tokens): zinit, peft adaption prompt, base.
  adapters   N requests on one model carrying N named adapters (--adapters, default 8), greedy decoding: one batch
             mixing the N adapters vs a batch of one adapter vs the base model vs the N requests one at a time,
             and vs peft LoRA's mixed batch (N LoRA adapters r=8 on q,v; generate(adapter_names=[...])).
  engine     zinit serve's engine on 16 requests (16-48 prompt tokens, --new-tokens each), no adapter and mixing
             --adapters adapters, vs one static left-padded generate() batch and transformers' continuous batching
             (generate_batch) of the base model.
  memory     peak memory of a training step of each method, in a fresh subprocess per method: on CPU the
             process's peak RSS during the step (VmHWM reset just before it), so it includes the model; on CUDA
             torch.cuda.max_memory_allocated.
  scaling    zinit vs floor training step at sequence lengths 128, 512, 2048 (batch 1).
  quantized  zinit training step on the same checkpoint loaded four ways (--bases): float32, bfloat16, torchao int8
             weight-only and bitsandbytes NF4 (zinit.quant, what --quantize loads), interleaved in one process, plus
             each one's weight footprint and peak memory of a step in a fresh subprocess (as the memory suite).
  vit        timm ViT-B/16 training step (random weights): zinit vs peft LoRA on qkv vs floor.
  roberta    RoBERTa-base training step (random weights): zinit vs peft prefix tuning vs floor.

LLaMA shapes (random weights): ``smollm2`` (30 layers, hidden 576, 9 heads, 3 KV heads), ``mha`` (the same with
9 KV heads, multi-head as LLaMA-7B), ``llama7b`` (32 layers, hidden 4096, 32 heads; GPU only), or ``--model PATH``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

import zinit
from zinit import quant
from zinit.serve.engine import Engine, Request, left_padded
from zinit.methods import registry as methods

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152),
    "mha": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=9, vocab_size=49152),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


# ---------------------------------------------------------------- models and methods


def llama(shape: str, model_path: str | None, dtype: torch.dtype, device: str, layers: int | None = None) -> nn.Module:
    """A random-weight LLaMA of ``SHAPES[shape]`` (or the checkpoint ``model_path``), with ``layers`` layers instead
    of the shape's own when given (the width, and so each layer's cost, stays the shape's)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model_path:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    sizes = SHAPES[shape] | ({} if layers is None else {"num_hidden_layers": layers})
    cfg = LlamaConfig(**sizes, max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def _blocks(model: nn.Module) -> nn.Module:
    return zinit.find_backbone(model).attention_modules(model)


class _ZeroBias(nn.Module):
    def __init__(self, width: int, device, dtype):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width, device=device, dtype=dtype))


def _layer_of(model: nn.Module, attention: nn.Module) -> nn.Module:
    """The layer (transformer block) that holds ``attention``: its nearest ancestor that is an element of the layer
    stack, i.e. whose name ends in an index (``model.layers.3``, ``blocks.3``, ``encoder.layer.3``)."""
    names = {id(m): n for n, m in model.named_modules()}
    parts = names[id(attention)].split(".")
    for end in range(len(parts), 0, -1):
        if parts[end - 1].isdigit():
            return model.get_submodule(".".join(parts[:end]))
    raise ValueError(f"{names[id(attention)]} is in no indexed layer stack")


def apply_floor(model: nn.Module, L: int) -> nn.Module:
    """Freeze everything, then add one trainable zero bias to the input of the lowest of the top L layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    spec = zinit.find_backbone(model)
    dims = spec.dims(model)
    first = _layer_of(model, spec.attention_modules(model)[dims.num_layers - L])
    p = next(model.parameters())
    first.zinit_floor = _ZeroBias(dims.hidden_size, p.device, p.dtype)

    def hook(module, args, kwargs):
        if args:
            return (args[0] + module.zinit_floor.bias, *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + module.zinit_floor.bias
        return args, kwargs

    first.register_forward_pre_hook(hook, with_kwargs=True)
    return model


#: What the benchmark's own names mean; every other name is a method of zinit compare's registry
#: (zinit.methods), prepared exactly as a recipe prepares it.
REFERENCES = ("base", "floor", "zinit_generic")


def apply_method(name: str, model: nn.Module, L: int, K: int, task: str = "causal_lm") -> nn.Module:
    """``model`` (a private copy) prepared with ``name``: a reference (``base``: untouched; ``floor``: see
    :func:`apply_floor`; ``zinit_generic``: zinit through the generic ``hf`` backbone) or a registered method
    (``zinit``, ``adaption_prompt``, ``lora``, ``prefix`` ...) for a model of ``task``."""
    if name == "base":
        return model
    if name == "floor":
        return apply_floor(model, L)
    if name == "zinit_generic":  # the same adapter through the generic hf backbone (prompt K/V by the layer's forward)
        return zinit.inject(model, L, K, backbone="hf")
    return methods.prepare(name, model, methods.MethodContext(recipe="bench", layers=L, K=K, task=task))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, dict[str, Any]]:
    """Run each function once as warm-up, then ``repeats`` rounds, alternately in order (A B C) and reversed (C B A)
    so that no method always runs right after the same one; seconds per call: median, min, max, and each round's
    (``rounds``, for :func:`paired`)."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        for name in names if round_ % 2 == 0 else names[::-1]:
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v} for k, v in times.items()}


def paired(stats: dict[str, dict[str, Any]], method: str, reference: str) -> float:
    """How many times as fast ``method`` ran as ``reference`` (same work): the median over rounds of the two's ratio
    within one round of :func:`interleaved`, where both ran within seconds of each other, so the slow minutes of a
    shared machine weigh on both alike (a ratio of two medians can pair a quiet minute with a loaded one)."""
    return statistics.median(r / m for m, r in zip(stats[method]["rounds"], stats[reference]["rounds"]))


def train_step_fn(model: nn.Module, make_loss: Callable[[nn.Module], torch.Tensor], autocast) -> Callable[[], None]:
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        with autocast():
            loss = make_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _autocast(device: str, dtype: torch.dtype):
    if device.startswith("cuda") and dtype == torch.bfloat16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    from contextlib import nullcontext

    return nullcontext


def lm_loss(batch: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    return lambda m: m(input_ids=batch, labels=batch).loss


def report(title: str, stats: dict[str, dict[str, float]], reference: str, unit: str = "s",
           extra: dict[str, str] | None = None) -> list[str]:
    label = "time vs " + reference  # a time ratio (the summary lines below a table give speed ratios)
    width = max(12, len(label))
    lines = [f"\n{title}", f"  {'method':18s} {'median ' + unit:>12s} {'(min-max)':>22s} {label:>{width}s}"]
    for name, s in stats.items():
        note = f"  {extra[name]}" if extra and name in extra else ""
        ratio = 1 / paired(stats, name, reference)  # this method's time over the reference's, round by round
        lines.append(f"  {name:18s} {s['median']:12.4f} ({s['min']:9.4f}-{s['max']:9.4f}) {ratio:{width - 1}.3f}x"
                     + note)
    print("\n".join(lines), flush=True)
    return lines


# ---------------------------------------------------------------- suites


def suite_train(args, shape: str) -> dict:
    dtype = getattr(torch, args.dtype)
    base = llama(shape, args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=args.device)
    methods = ["floor", "zinit", "zinit_generic", "adaption_prompt", "lora"]
    models = {m: apply_method(m, copy.deepcopy(base), L, args.K) for m in methods}
    del base
    ac = _autocast(args.device, dtype)
    stats = interleaved({m: train_step_fn(models[m], lm_loss(batch), ac) for m in methods}, args.repeats, args.device)
    params = {m: str(sum(p.numel() for p in trainable(models[m]))) + " params" for m in methods}
    report(f"train step [{shape}, batch {args.batch}x{args.seq}, L={L}, K={args.K}, {args.device} {args.dtype}]",
           stats, "floor", extra=params)
    z, a = stats["zinit"]["median"], stats["adaption_prompt"]["median"]
    print(f"  zinit / peft adaption prompt = {1 / paired(stats, 'zinit', 'adaption_prompt'):.3f} (time, median of the "
          f"rounds' ratios); tokens/s: zinit {args.batch * args.seq / z:.0f}, peft {args.batch * args.seq / a:.0f}")
    return {"shape": shape, "batch": args.batch, "seq": args.seq, "L": L, "K": args.K, "seconds": stats,
            "trainable": {m: sum(p.numel() for p in trainable(models[m])) for m in methods}}


def suite_infer(args, shape: str) -> dict:
    dtype = getattr(torch, args.dtype)
    base = llama(shape, args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=args.device)
    models = {"base": base, "zinit": apply_method("zinit", copy.deepcopy(base), L, args.K)}
    ac = _autocast(args.device, dtype)

    def fwd(m):
        def run():
            with torch.no_grad(), ac():
                m(input_ids=batch)
        return run

    stats = interleaved({k: fwd(m) for k, m in models.items()}, args.repeats, args.device)
    report(f"inference forward [{shape}, batch {args.batch}x{args.seq}]", stats, "base")
    return {"shape": shape, "seconds": stats}


def suite_generate(args, shape: str) -> dict:
    dtype = getattr(torch, args.dtype)
    base = llama(shape, args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    models = {m: apply_method(m, copy.deepcopy(base), L, args.K) for m in ("zinit", "adaption_prompt")}
    with torch.no_grad():  # nonzero gates, so every adapter really computes its prompt path
        for m in models.values():
            for p in trainable(m):
                if p.ndim <= 1:
                    p.fill_(0.1)
    models = {"base": base, **models}
    for m in models.values():
        m.eval()
    out = {}
    for b in args.gen_batches:
        prompt = torch.randint(0, base.config.vocab_size, (b, args.gen_prompt), device=args.device)

        def gen(m, prompt=prompt):
            def run():
                with torch.no_grad():
                    m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
            return run

        stats = interleaved({k: gen(m) for k, m in models.items()}, max(1, args.repeats // 2), args.device)
        rate = {k: {q: b * args.new_tokens / s[q] for q in ("median", "min", "max")} for k, s in stats.items()}
        report(f"greedy generation [{shape}, batch {b}, {args.new_tokens} new tokens]", stats, "base",
               extra={k: f"{rate[k]['median']:.1f} tokens/s" for k in rate})
        print(f"  zinit tokens/s = {paired(stats, 'zinit', 'base'):.3f} x base, "
              f"{paired(stats, 'zinit', 'adaption_prompt'):.2f} x peft adaption prompt (medians of the rounds' ratios)")
        out[str(b)] = {"seconds": stats, "tokens_per_s": rate}
    return {"shape": shape, "batches": out}


def _memory_child(args) -> None:
    """Run in a fresh process: build one method (on the ``--memory-base`` load of ``--model``, with one), take two
    training steps, print peak memory as JSON."""
    dtype = getattr(torch, args.dtype)
    if args.memory_base:
        base = load_base(args.model, args.memory_base, args.device)
    else:
        base = llama(args.shapes[0], args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    model = apply_method(args.memory_child, base, L, args.K)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=args.device)
    step = train_step_fn(model, lm_loss(batch), _autocast(args.device, dtype))
    step()  # first step: optimizer state and lazily allocated buffers exist from here on
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _trim_heap()  # what loading freed (a quantized load frees its float weights) leaves the RSS baseline
    setup = _rss_mb("VmRSS")
    _reset_peak_rss()
    step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else _rss_mb("VmHWM")
    print("MEMORY " + json.dumps({"peak_mb": peak, "before_step_mb": setup}))


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (ru_maxrss would include the forked parent's pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so the RSS is what the
    process holds, not what it once held; a no-op where libc has no ``malloc_trim``."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs), so the peak is the training step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _named_zinit_adapters(base: nn.Module, n: int, L: int, K: int) -> tuple[nn.Module, list[str]]:
    """A copy of ``base`` carrying ``n`` named zinit adapters with open gates (so each computes its prompt term)."""
    model = copy.deepcopy(base)
    names = [f"adapter{i}" for i in range(n)]
    for name in names:
        zinit.add_adapter(model, name, layers=L, K=K)
        with torch.no_grad():
            for p in zinit.adapter_parameters(model, name):
                if p.ndim <= 1:
                    p.fill_(0.1)
    return model, names


def _peft_lora_adapters(base: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``base`` carrying one peft LoRA adapter (r=8 on q, v) per name, B non-zero so each computes."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    return model.eval()


def _greedy(m: nn.Module, rows: torch.Tensor, new_tokens: int, route: Any = False, **kwargs: Any) -> None:
    """Greedy decoding of exactly ``new_tokens`` tokens, inside ``zinit.use_adapters(m, route)`` unless False."""
    from contextlib import nullcontext

    with torch.no_grad(), (zinit.use_adapters(m, route) if route is not False else nullcontext()):
        m.generate(input_ids=rows, attention_mask=torch.ones_like(rows), do_sample=False, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, pad_token_id=0, **kwargs)


def suite_adapters(args, shape: str) -> dict:
    """Decode throughput of N requests on one frozen model carrying N named adapters (zinit.add_adapter): one batch
    mixing all N adapters vs one batch of N requests of one adapter vs the base model alone (a copy with no adapter
    at all) vs serving the N requests one at a time, each with its adapter; and the peer's mixed batch: peft LoRA
    (r=8 on q, v) with N adapters, ``generate(adapter_names=[...])``, the one mixed-batch path a peer ships."""
    dtype = getattr(torch, args.dtype)
    base = llama(shape, args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    n = args.adapters
    model, names = _named_zinit_adapters(base, n, L, args.K)
    lora = _peft_lora_adapters(base, names)
    prompt = torch.randint(0, base.config.vocab_size, (n, args.gen_prompt), device=args.device)
    new = args.new_tokens
    fns = {
        "base model": lambda: _greedy(base, prompt, new),
        "one adapter": lambda: _greedy(model, prompt, new, names[0]),
        f"{n} adapters mixed": lambda: _greedy(model, prompt, new, names),
        "one at a time": lambda: [_greedy(model, prompt[i:i + 1], new, names[i]) for i in range(n)],
        f"peft LoRA {n} mixed": lambda: _greedy(lora, prompt, new, adapter_names=names),
    }
    stats = interleaved(fns, max(1, args.repeats // 2), args.device)
    rate = {k: n * new / s["median"] for k, s in stats.items()}
    report(f"many adapters, greedy decoding [{shape}, {n} requests x {new} new tokens, L={L}, "
           f"K={args.K}]", stats, "one adapter", extra={k: f"{rate[k]:.1f} tokens/s" for k in rate})
    mixed = f"{n} adapters mixed"
    print(f"  mixed batch = {paired(stats, mixed, 'one adapter'):.3f} x one-adapter batch, "
          f"{paired(stats, mixed, 'one at a time'):.2f} x one at a time, {paired(stats, mixed, 'base model'):.3f} x "
          f"base model, {paired(stats, mixed, f'peft LoRA {n} mixed'):.3f} x peft LoRA mixed (medians of the "
          f"{len(stats[mixed]['rounds'])} rounds' ratios)")
    return {"requests": n, "seconds": stats, "tokens_per_s": rate,
            "mixed_vs": {k: paired(stats, mixed, k) for k in stats if k != mixed}}


def _engine_run(model: nn.Module, prompts: list[list[int]], adapters: list[str | None],
                new_tokens: int | list[int]) -> None:
    """The requests through zinit serve's engine (stepped on this thread, no server): every row admitted at
    the first step, decoded to exactly ``new_tokens`` tokens (no end-of-sequence token; one count per request
    makes rows finish at different steps, and the batch shrink under the others)."""
    engine = Engine(model, eos_token_ids=[], max_batch=len(prompts), max_queue=len(prompts),
                    prefill_tokens=sum(map(len, prompts)))
    counts = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    done: list[str] = []
    for ids, adapter, count in zip(prompts, adapters, counts):
        engine.submit(Request(prompt=ids, adapter=adapter, max_tokens=count,
                              on_token=lambda token, reason: done.append(reason) if reason else None))
    while engine.step():
        pass
    if done != ["length"] * len(prompts):
        raise RuntimeError(f"the engine finished {done}, not {len(prompts)} x length")


def _static_run(model: nn.Module, prompts: list[list[int]], new_tokens: int) -> None:
    """The same requests as one left-padded ``generate()`` batch (static batching: what the engine must match)."""
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=0)


def _cb_run(model: nn.Module, prompts: list[list[int]], new_tokens: int) -> None:
    """transformers' own continuous batching (``generate_batch``, its paged cache) of the base model, its cache
    sized for these requests and a step's tokens for all their prompts (as the engine's ``prefill_tokens``): by
    default it sizes the cache from free memory, which on CPU spends seconds zeroing gigabytes per call."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    paged = ContinuousBatchingConfig(num_blocks=4 * len(prompts), max_batch_tokens=sum(map(len, prompts)))
    with torch.no_grad():
        out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=paged,
                                   progress_bar=False)
    if len(out) != len(prompts):
        raise RuntimeError(f"generate_batch answered {len(out)} of {len(prompts)} requests")


def suite_engine(args, shape: str) -> dict:
    """zinit serve's engine against static batching and transformers' continuous batching, on the same 16 requests
    (prompts of 16-48 tokens, ``--new-tokens`` greedy tokens each): one left-padded ``generate()`` batch of the base
    model (static), ``generate_batch`` of the base model (transformers CB), the engine with no adapter, and the
    engine mixing ``--adapters`` adapters over the requests. Then the engine's two again with requests that want
    from a quarter to 1.75 times ``--new-tokens`` (about the same total), so rows leave the batch one by one as in real
    serving (each departure rebuilds the KV cache)."""
    dtype = getattr(torch, args.dtype)
    base = llama(shape, args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    model, names = _named_zinit_adapters(base, args.adapters, L, args.K)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 49, (16,), generator=gen).tolist()
    prompts = [torch.randint(1, base.config.vocab_size, (t,), generator=gen).tolist() for t in lengths]
    new = args.new_tokens
    mixing = [names[i % len(names)] for i in range(len(prompts))]
    staggered = [max(1, round(new * (0.25 + 1.5 * i / (len(prompts) - 1)))) for i in range(len(prompts))]
    fns = {
        "static generate": lambda: _static_run(base, prompts, new),
        "transformers CB": lambda: _cb_run(base, prompts, new),
        "engine, no adapter": lambda: _engine_run(base, prompts, [None] * len(prompts), new),
        f"engine, {len(names)} mixed": lambda: _engine_run(model, prompts, mixing, new),
        "staggered, no adapter": lambda: _engine_run(base, prompts, [None] * len(prompts), staggered),
        f"staggered, {len(names)} mixed": lambda: _engine_run(model, prompts, mixing, staggered),
    }
    stats = interleaved(fns, max(1, args.repeats // 2), args.device)
    rate = {k: (sum(staggered) if k.startswith("staggered") else len(prompts) * new) / s["median"]
            for k, s in stats.items()}
    report(f"serving engine, greedy [{shape}, 16 requests of 16-48 prompt tokens x {new} new tokens, L={L}, "
           f"K={args.K}]", stats, "static generate", extra={k: f"{rate[k]:.1f} tokens/s" for k in rate})
    engine, mixed = "engine, no adapter", f"engine, {len(names)} mixed"
    print(f"  engine = {paired(stats, engine, 'static generate'):.3f} x static generate, "
          f"{paired(stats, engine, 'transformers CB'):.2f} x transformers CB; {len(names)} adapters mixed = "
          f"{paired(stats, mixed, engine):.3f} x the engine with no adapter; rows leaving one by one: "
          f"{paired(stats, f'staggered, {len(names)} mixed', 'staggered, no adapter'):.3f} x (medians of the "
          f"{len(stats[mixed]['rounds'])} rounds' ratios)")
    return {"requests": len(prompts), "seconds": stats, "tokens_per_s": rate, "staggered_tokens": staggered,
            "engine_vs": {k: paired(stats, engine, k) for k in stats if k != engine},
            "mixed_vs_engine": paired(stats, mixed, engine),
            "staggered_mixed_vs_engine": paired(stats, f"staggered, {len(names)} mixed", "staggered, no adapter")}


def _peak_memory(args, shape: str, method: str, model: str | None, base: str | None = None) -> dict[str, float]:
    """Peak memory of two training steps of ``method`` in a fresh subprocess (see :func:`_memory_child`)."""
    cmd = [sys.executable, "-m", "zinit.benchmarks.speed", "--memory-child", method, "--shape", shape,
           "--batch", str(args.batch), "--seq", str(args.seq), "--L", str(args.L), "--K", str(args.K),
           "--device", args.device, "--dtype", args.dtype] + (["--model", model] if model else []) + (
           ["--memory-base", base] if base else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
    if line is None:
        raise RuntimeError(f"memory child for {method} {base or ''} failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("MEMORY "):])


def suite_memory(args, shape: str) -> dict:
    results = {}
    for method in ("floor", "zinit", "adaption_prompt", "lora"):
        results[method] = _peak_memory(args, shape, method, args.model)
    floor = results["floor"]["peak_mb"]
    what = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS during a step, fresh process"
    print(f"\npeak training memory [{shape}, batch {args.batch}x{args.seq}] ({what})")
    for method, r in results.items():
        print(f"  {method:18s} {r['peak_mb']:10.0f} MB {r['peak_mb'] / floor:8.3f}x floor")
    return {"shape": shape, "what": what, "mb": results}


def suite_scaling(args, shape: str) -> dict:
    dtype = getattr(torch, args.dtype)
    base = llama(shape, args.model, dtype, args.device)
    L = min(args.L, zinit.find_backbone(base).dims(base).num_layers)
    models = {m: apply_method(m, copy.deepcopy(base), L, args.K) for m in ("floor", "zinit")}
    ac = _autocast(args.device, dtype)
    out = {}
    for T in args.scaling_lengths:
        batch = torch.randint(0, base.config.vocab_size, (1, T), device=args.device)
        stats = interleaved({m: train_step_fn(models[m], lm_loss(batch), ac) for m in models},
                            max(1, args.repeats // 2), args.device)
        report(f"scaling: train step [{shape}, batch 1x{T}]", stats, "floor")
        out[str(T)] = stats
    return {"shape": shape, "seconds": out}


#: The loads of one checkpoint the quantized suite compares: two float dtypes and the schemes of zinit.quant.
BASES = ("float32", "bfloat16", "int8", "nf4", "bnb-int8")


def load_base(folder: str, base: str, device: str) -> nn.Module:
    """The checkpoint in ``folder`` loaded as ``base``: ``float32`` / ``bfloat16`` weights, or quantized with a
    :mod:`zinit.quant` scheme through ``from_pretrained(quantization_config=...)``, as ``--quantize`` loads it."""
    from transformers import AutoModelForCausalLM

    if base in ("float32", "bfloat16"):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, base)).to(device).eval()
    kwargs = quant.load_kwargs(base, torch.device(device))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def suite_quantized(args, shape: str) -> dict:
    """zinit's training step and memory on one checkpoint loaded as each of ``--bases`` (a random-weight ``shape``
    saved to a temporary folder, or ``--model``)."""
    import tempfile

    unknown = [b for b in args.bases if b not in BASES]
    if unknown:
        raise SystemExit(f"unknown --bases {unknown}; choose among {', '.join(BASES)}")
    with tempfile.TemporaryDirectory(prefix="zinit-bench-") as tmp:
        folder = args.model
        if folder is None:
            folder = tmp
            llama(shape, None, torch.float32, "cpu").save_pretrained(folder)
        models, skipped = {}, {}
        for base in args.bases:
            try:
                model = load_base(folder, base, args.device)
            except ImportError as exc:  # a backend that is not installed: a row "n/a" with the reason
                skipped[base] = str(exc)
                continue
            L = min(args.L, zinit.find_backbone(model).dims(model).num_layers)
            models[base] = apply_method("zinit", model, L, args.K)
        if not models:
            raise SystemExit(f"zinit bench: no base of --bases {','.join(args.bases)} could be loaded: "
                             + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
        first = next(iter(models.values()))
        batch = torch.randint(0, first.config.vocab_size, (args.batch, args.seq), device=args.device)
        footprint = {b: quant.weight_bytes(m) / 2**20 for b, m in models.items()}
        stats = interleaved({b: train_step_fn(m, lm_loss(batch), _autocast(args.device, torch.float32))
                             for b, m in models.items()}, max(1, args.repeats // 2), args.device)
        del models, first
        memory = {b: _peak_memory(args, shape, "zinit", folder, b) for b in stats}
        peak = {b: m["peak_mb"] for b, m in memory.items()}
        held = {b: m["before_step_mb"] for b, m in memory.items()}
    reference = "float32" if "float32" in stats else next(iter(stats))
    report(f"zinit train step on a quantized base [{args.model or shape}, batch {args.batch}x{args.seq}, "
           f"L={L}, K={args.K}, {args.device}]", stats, reference,
           extra={b: f"weights {footprint[b]:5.0f} MB ({footprint[b] / footprint[reference]:.3f}x), process "
                     f"{held[b]:5.0f} MB before the step, peak {peak[b]:5.0f} MB ({peak[b] / peak[reference]:.3f}x)"
                  for b in stats})
    for base, why in skipped.items():
        print(f"  {base:18s} n/a: {why}")
    return {"shape": args.model or shape, "seconds": stats, "weights_mb": footprint, "before_step_mb": held,
            "peak_mb": peak, "n/a": skipped}


def suite_vit(args) -> dict:
    import timm

    torch.manual_seed(0)
    base = timm.create_model(args.vit_model, pretrained=False, num_classes=100).to(args.device).eval()
    L = min(args.L, len(base.blocks))
    images = torch.randn(args.vit_batch, 3, 224, 224, device=args.device)
    labels = torch.randint(0, 100, (args.vit_batch,), device=args.device)
    loss = lambda m: nn.functional.cross_entropy(m(images), labels)  # noqa: E731
    models = {m: apply_method(m, copy.deepcopy(base), L, args.K, "image_classification")
              for m in ("floor", "zinit", "lora")}
    stats = interleaved({m: train_step_fn(models[m], loss, _autocast(args.device, getattr(torch, args.dtype)))
                         for m in models}, max(1, args.repeats // 2), args.device)
    report(f"ViT train step [{args.vit_model}, batch {args.vit_batch}, L={L}, K={args.K}]", stats, "floor",
           extra={m: f"{sum(p.numel() for p in trainable(models[m]))} params" for m in models})
    return {"model": args.vit_model, "seconds": stats}


def suite_roberta(args) -> dict:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(num_labels=2) if not args.tiny_roberta else RobertaConfig(
        num_labels=2, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    base = RobertaForSequenceClassification(cfg).to(args.device).eval()
    L = min(args.L, cfg.num_hidden_layers)
    ids = torch.randint(5, cfg.vocab_size, (args.batch, args.roberta_seq), device=args.device)
    labels = torch.randint(0, 2, (args.batch,), device=args.device)
    loss = lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss  # noqa: E731
    models, skipped = {}, {}
    for m in ("floor", "zinit", "prefix"):
        try:
            models[m] = apply_method(m, copy.deepcopy(base), L, args.K, "sequence_classification")
            loss(models[m]).backward()  # peft's prefix tuning may not support this transformers version
            models[m].zero_grad(set_to_none=True)
        except Exception as exc:  # reported as n/a with the reason, not silently dropped
            skipped[m] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            models.pop(m, None)
    stats = interleaved({m: train_step_fn(models[m], loss, _autocast(args.device, getattr(torch, args.dtype)))
                         for m in models}, max(1, args.repeats // 2), args.device)
    report(f"RoBERTa train step [{'tiny' if args.tiny_roberta else 'base'}, batch {args.batch}x{args.roberta_seq}, "
           f"L={L}, K={args.K}]", stats, "floor",
           extra={m: f"{sum(p.numel() for p in trainable(models[m]))} params" for m in models})
    for m, why in skipped.items():
        print(f"  {m:18s} n/a: {why}")
    return {"seconds": stats, "n/a": skipped}


SUITES = ("train", "infer", "generate", "adapters", "engine", "memory", "scaling", "quantized", "vit", "roberta")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="zinit bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", help=f"comma-separated among {', '.join(SUITES)} (default all)")
    p.add_argument("--shape", dest="shapes", default="smollm2,mha", help="LLaMA shapes (default smollm2,mha)")
    p.add_argument("--model", default=None, help="a Hugging Face checkpoint instead of a random-weight shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--L", type=int, default=30)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-prompt", type=int, default=32)
    p.add_argument("--gen-batches", default="1,8")
    p.add_argument("--adapters", type=int, default=8, help="named adapters (and requests) of the adapters suite")
    p.add_argument("--scaling-lengths", default="128,512,2048")
    p.add_argument("--vit-model", default="vit_base_patch16_224")
    p.add_argument("--vit-batch", type=int, default=4)
    p.add_argument("--roberta-seq", type=int, default=128)
    p.add_argument("--tiny-roberta", action="store_true", help="a 4-layer RoBERTa (for smoke tests)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--bases", default=",".join(BASES[:4]),
                   help=f"loads of the quantized suite, among {', '.join(BASES)} (default %(default)s)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-base", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    args.bases = [b for b in args.bases.split(",") if b]
    args.scaling_lengths = [int(t) for t in args.scaling_lengths.split(",")]
    if args.memory_child:
        _memory_child(args)
        return {}
    suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise SystemExit(f"unknown suite(s) {sorted(unknown)}; choose among {', '.join(SUITES)}")
    print(f"zinit bench: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"dtype {args.dtype}, repeats {args.repeats} (interleaved, after one warm-up round)")
    results: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                               "threads": torch.get_num_threads()}
    per_shape = {"train": suite_train, "infer": suite_infer, "generate": suite_generate, "adapters": suite_adapters,
                 "engine": suite_engine, "memory": suite_memory, "scaling": suite_scaling, "quantized": suite_quantized}
    for suite in suites:
        if suite in per_shape:
            shapes = args.shapes if suite in ("train", "memory") else args.shapes[:1]
            results[suite] = [per_shape[suite](args, shape) for shape in shapes]
        elif suite == "vit":
            results["vit"] = suite_vit(args)
        elif suite == "roberta":
            results["roberta"] = suite_roberta(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
