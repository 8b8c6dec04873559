"""A bounded load test of ``zinit serve`` on loopback: concurrency 1, 4 and 16, each request of a random one of N
adapters, reporting tokens/s, p50/p95 latency and failed requests, side by side in one run.

    python -m zinit.benchmarks.serve                          # SmolLM2-135M shape (random weights), 8 adapters
    python -m zinit.benchmarks.serve --model embedded          # the embedded real SmolLM2-135M-Instruct
    python -m zinit.benchmarks.serve --concurrency 1,4,16 --requests 32 --max-tokens 32 --json serve.json

The server runs in this process (uvicorn on 127.0.0.1, a free port); clients are threads with httpx. Every level
sends a fixed number of requests (``--requests``, at least the concurrency) and stops after ``--max-seconds`` at the
latest; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from typing import Any

import torch

import zinit
from zinit.files import write_json


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    from zinit import lm

    if args.model == "embedded":
        return lm.load_model(None, torch.device("cpu"))
    if args.model:
        return lm.load_model(args.model, torch.device("cpu"))
    from transformers import LlamaConfig, LlamaForCausalLM

    from .speed import SHAPES

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096,
                                         tie_word_embeddings=True)).eval()
    return model, _IdTokenizer(model.config.vocab_size)


class _IdTokenizer:
    """For a random-weight shape: text is a list of ids written as words ("17 4 99")."""

    eos_token_id = None
    chat_template = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [int(w) % self.vocab for w in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids) + " "


def _level(url: str, concurrency: int, total: int, names: list[str], args: argparse.Namespace,
           prompts: list[str]) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    tokens = [0]
    failures: list[str] = []
    todo = list(range(total))
    lock = threading.Lock()
    deadline = time.monotonic() + args.max_seconds
    rng = random.Random(concurrency)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=args.max_seconds) as c:
            while time.monotonic() < deadline:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                    name = rng.choice(names)
                start = time.monotonic()
                try:
                    r = c.post("/v1/completions", json={"model": name, "prompt": prompts[i % len(prompts)],
                                                        "max_tokens": args.max_tokens, "temperature": 0})
                    body = r.json()
                    ok = r.status_code == 200
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    ok, body = False, {"error": {"message": repr(exc)}}
                with lock:
                    if ok:
                        latencies.append(time.monotonic() - start)
                        tokens[0] += body["usage"]["completion_tokens"]
                    else:
                        failures.append(str(body.get("error", body))[:200])

    start = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))] if latencies else float("nan")
    return {"concurrency": concurrency, "requests": len(latencies), "failed": len(failures),
            "failures": failures[:3], "tokens_per_s": tokens[0] / wall if wall else 0.0,
            "p50_s": statistics.median(latencies) if latencies else float("nan"), "p95_s": p95, "wall_s": wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m zinit.benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'embedded', a model folder, or none: a random-weight --shape")
    p.add_argument("--shape", default="smollm2", help="random-weight LLaMA shape of zinit.benchmarks.speed")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--L", type=int, default=30)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=600.0, help="each level stops after this long at most")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import uvicorn

    from zinit.serve import Engine
    from zinit.serve.app import Server, create_app

    model, tokenizer = _model(args)
    depth = zinit.find_backbone(model).dims(model).num_layers
    names = [f"adapter{i}" for i in range(args.adapters)]
    for name in names:
        zinit.add_adapter(model, name, layers=min(args.L, depth), K=args.K)
        with torch.no_grad():
            for prm in zinit.adapter_parameters(model, name):
                if prm.ndim <= 1:
                    prm.fill_(0.1)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    engine = Engine(model, eos_token_ids=eos, max_batch=args.max_batch, max_queue=1024)
    server = Server(engine, tokenizer, max_tokens=args.max_tokens, context=4096)
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning")
    http = uvicorn.Server(config)
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"
    rng = random.Random(0)
    if isinstance(tokenizer, _IdTokenizer):
        prompts = [" ".join(str(rng.randrange(tokenizer.vocab)) for _ in range(args.prompt_tokens)) for _ in range(8)]
    else:
        prompts = [f"Question {i}: write a short sentence about the number {i}." for i in range(8)]
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"zinit serve load test: {args.adapters} adapters, {args.max_tokens} tokens per request, "
          f"{torch.get_num_threads()} threads, requests per level {args.requests}", flush=True)
    print(f"  {'concurrency':>11s} {'requests':>8s} {'failed':>6s} {'tokens/s':>9s} {'p50 s':>7s} {'p95 s':>7s}")
    results = []
    try:
        for c in levels:
            r = _level(url, c, max(args.requests, c), names, args, prompts)
            results.append(r)
            print(f"  {c:11d} {r['requests']:8d} {r['failed']:6d} {r['tokens_per_s']:9.1f} {r['p50_s']:7.2f} "
                  f"{r['p95_s']:7.2f}", flush=True)
            for f in r["failures"]:
                print(f"    failed: {f}")
    finally:
        http.should_exit = True
        thread.join(60)
    out = {"adapters": args.adapters, "max_tokens": args.max_tokens, "levels": results}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
