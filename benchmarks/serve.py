"""A bounded load test of ``zinit serve`` on loopback: concurrency 1, 4 and 16, each request of a random one of N
adapters, reporting tokens/s, p50/p95 latency and failed requests, side by side in one run.

    python -m zinit.benchmarks.serve                          # SmolLM2-135M shape (random weights), 8 adapters
    python -m zinit.benchmarks.serve --model embedded          # the embedded real SmolLM2-135M-Instruct
    python -m zinit.benchmarks.serve --concurrency 1,4,16 --requests 32 --max-tokens 32 --json serve.json

The server runs in this process (uvicorn on 127.0.0.1, a free port); clients are threads with httpx. Every level
sends a fixed number of requests (``--requests``, at least the concurrency) and stops after ``--max-seconds`` at the
latest; nothing leaves the machine.

``--faults`` is the load-and-faults mode: one level (default 1,000 requests at concurrency 16) over the adapters, the
base model and one extra adapter that a churn thread loads (``POST /v1/adapters`` from the server's adapters folder)
and unloads (``DELETE``) every ``--churn-seconds``; a request plan drawn from ``--seed``:

- 85 %: well-formed greedy requests, completions or chat, streamed or not, of one of ``--prompts`` prompts;
- 10 %: streams the client cuts after reading a few events;
- 5 %: malformed or over-limit requests (bad JSON, a wrong type, an unknown model, a body over ``--max-body-bytes``
  with and without a Content-Length, ``temperature`` -1, ``seed`` 2**64, an unsupported parameter, ``max_tokens``
  over the limit, a prompt over the context), each of which must get its documented 4xx in OpenAI's error shape.

It reports failed well-formed requests, how many greedy answers are identical to ``generate()`` of that adapter (or
the base model) for that prompt alone (references computed before the load, under ``zinit.use_adapters``), the
status every bad kind got, p50/p95 latency, tokens/s and the process's resident memory over the first and the last
200 requests. A random-weight shape is rescaled to unit-variance weights and the adapters' gates opened to 0.5 in this
mode, so that greedy answers differ between adapters and argmax has clear margins (the comparison then means
something).

    python -m zinit.benchmarks.serve --faults --shape small --max-tokens 16      # 1,000 requests, concurrency 16
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import zinit
from zinit import lm
from zinit.files import write_json
from zinit.serve import Engine

from .speed import SHAPES


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.model == "embedded":
        return lm.load_model(None, torch.device("cpu"))
    if args.model:
        return lm.load_model(args.model, torch.device("cpu"))
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPES, **EXTRA_SHAPES}[args.shape], max_position_embeddings=4096,
                                         tie_word_embeddings=True)).eval()
    return model, _IdTokenizer(model.config.vocab_size)


#: Shapes of this benchmark beyond zinit.benchmarks.speed's: ``small`` serves fast enough on a 2-core CPU for the
#: 1,000-request fault run (about 6.6M parameters).
EXTRA_SHAPES = {
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096),
}


class _IdTokenizer:
    """For a random-weight shape: text is a list of ids written as words ("17 4 99")."""

    eos_token_id = None
    chat_template = "ids"  #: messages become their ids, each after a role marker (:meth:`apply_chat_template`)

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [int(w) % self.vocab for w in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids) + " "

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int]:
        markers = {"system": 1, "user": 2, "assistant": 3}
        ids: list[int] = []
        for m in messages:
            ids += [markers.get(m["role"], 4)] + self(m["content"])["input_ids"]
        return ids + ([3] if add_generation_prompt else [])


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


# ---------------------------------------------------------------- fault mode

#: The malformed or over-limit requests of ``--faults``, each with the status zinit serve documents for it.
BAD_KINDS = {
    "bad JSON": 400,
    "wrong type (max_tokens \"many\")": 400,
    "unknown model": 404,
    "body over --max-body-bytes": 413,
    "body over --max-body-bytes, chunked": 413,
    "temperature -1": 400,
    "seed 2**64": 400,
    "unsupported parameter (logit_bias)": 400,
    "max_tokens over the limit": 400,
    "prompt over the context": 400,
}
#: The adapter the churn thread loads and unloads.
CHURN = "churned"
BASE = "base"
CONTEXT = 4096


def _rss_mb() -> float:
    """This process's resident memory in MiB (server and clients: they share the process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        return float("nan")


def _plan(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    """The request plan, the same for the same seed: exactly 10 % cut streams and 5 % bad requests (by default),
    shuffled; the bad ones cycle through :data:`BAD_KINDS`."""
    rng = random.Random(args.seed)
    n = args.requests
    n_cut, n_bad = round(args.cut_fraction * n), round(args.bad_fraction * n)
    kinds = ["cut"] * n_cut + ["bad"] * n_bad + ["ok"] * (n - n_cut - n_bad)
    rng.shuffle(kinds)
    bad = list(BAD_KINDS)
    plan: list[dict[str, Any]] = []
    bads = 0
    for i, kind in enumerate(kinds):
        prompt = rng.randrange(args.prompts)
        item: dict[str, Any] = {"i": i, "kind": kind, "prompt": prompt, "chat": prompt % 2 == 1}
        if kind == "bad":
            item.update(bad=bad[bads % len(bad)], model=rng.choice(names), stream=False)
            bads += 1
        else:
            item["model"] = rng.choice(names + [BASE] + ([CHURN] if kind == "ok" else []))
            item["stream"] = kind == "cut" or rng.random() < 0.5
            if kind == "cut":
                item["cut_after"] = rng.randint(1, 3)
        plan.append(item)
    return plan


def _fault_prompts(tokenizer: Any, args: argparse.Namespace) -> list[str]:
    rng = random.Random(args.seed + 1)
    if isinstance(tokenizer, _IdTokenizer):  # lengths vary, so rows are left-padded against each other
        return [" ".join(str(rng.randrange(5, tokenizer.vocab))
                         for _ in range(rng.randint(max(1, args.prompt_tokens // 2), args.prompt_tokens)))
                for _ in range(args.prompts)]
    topics = ["the sea", "a small town", "autumn", "a red bicycle", "coffee", "the moon", "rain", "a library"]
    return [f"Write one sentence about {topics[i % len(topics)]} and the number {i}." for i in range(args.prompts)]


def _prompt_ids(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _body(item: dict[str, Any], prompts: list[str], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": item["model"], "max_tokens": max_tokens, "temperature": 0}
    text = prompts[item["prompt"]]
    if item["chat"]:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if item.get("stream"):
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _open_gates(model: Any, name: str, value: float) -> None:
    with torch.no_grad():
        for prm in zinit.adapter_parameters(model, name):
            if prm.ndim <= 1:
                prm.fill_(value)


def _unit_scale(model: Any, seed: int = 0) -> None:
    """Linear weights N(0, 1/fan_in), embeddings N(0, 1): a random model whose greedy answers vary (the library init,
    std 0.02, makes every logit nearly equal, so argmax repeats one token and flips on rounding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))


def _references(model: Any, tokenizer: Any, pairs: list[tuple[str, int, bool]], prompts: list[str],
                max_tokens: int, eos: list[int]) -> dict[tuple[str, int], str]:
    """``(model, prompt) -> text``: greedy ``generate()`` of that adapter (or the base model) for that prompt alone,
    routed by ``zinit.use_adapters`` (not by the serving engine)."""
    from transformers import GenerationConfig

    model.generation_config.eos_token_id = eos or None  # the server stops at these and only these
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos or None,
                              pad_token_id=eos[0] if eos else 0)
    refs = {}
    for name, prompt, chat in pairs:
        ids = torch.tensor([_prompt_ids(tokenizer, prompts[prompt], chat)])
        with torch.no_grad(), zinit.use_adapters(model, None if name == BASE else name):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = out[0, ids.shape[1]:].tolist()
        if not eos and len(new) != max_tokens:
            raise RuntimeError(f"generate() stopped after {len(new)} of {max_tokens} tokens with no end token")
        refs[(name, prompt)] = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
    return refs


def _oversized(body: dict[str, Any], limit: int) -> bytes:
    """``body`` as JSON, padded with spaces in its prompt to ``limit + 1`` bytes (or left as it is when longer)."""
    key = "messages" if "messages" in body else "prompt"
    pad = max(0, limit + 1 - len(json.dumps(body).encode()))
    if key == "messages":
        body = {**body, "messages": [{"role": "user", "content": body["messages"][0]["content"] + " " * pad}]}
    else:
        body = {**body, "prompt": body["prompt"] + " " * pad}
    data = json.dumps(body).encode()
    assert len(data) > limit, (len(data), limit)
    return data


def _send_bad(c: Any, item: dict[str, Any], prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    kind = item["bad"]
    path = "/v1/chat/completions" if item["chat"] else "/v1/completions"
    body = _body(item, prompts, args.max_tokens)
    kwargs: dict[str, Any] = {}
    if kind == "bad JSON":
        kwargs["content"] = json.dumps(body).encode()[:-1] + b', "max_tokens": }'
    elif kind.startswith("wrong type"):
        kwargs["json"] = {**body, "max_tokens": "many"}
    elif kind == "unknown model":
        kwargs["json"] = {**body, "model": "no-such-adapter"}
    elif kind == "body over --max-body-bytes":
        kwargs["content"] = _oversized(body, args.max_body_bytes)
    elif kind == "body over --max-body-bytes, chunked":  # no Content-Length: the server must count as it reads
        data = _oversized(body, args.max_body_bytes)
        kwargs["content"] = (data[i:i + 65536] for i in range(0, len(data), 65536))
    elif kind == "temperature -1":
        kwargs["json"] = {**body, "temperature": -1}
    elif kind == "seed 2**64":
        kwargs["json"] = {**body, "seed": 2 ** 64}
    elif kind.startswith("unsupported parameter"):
        kwargs["json"] = {**body, "logit_bias": {"17": 5}}
    elif kind == "max_tokens over the limit":
        kwargs["json"] = {**body, "max_tokens": args.max_tokens + 1}
    elif kind == "prompt over the context":
        long = " ".join(["7"] * (CONTEXT + 1))
        kwargs["json"] = ({**body, "messages": [{"role": "user", "content": long}]} if item["chat"]
                          else {**body, "prompt": long})
    else:
        raise ValueError(kind)
    if "content" in kwargs:
        kwargs["headers"] = {"content-type": "application/json"}
    r = c.post(path, **kwargs)
    try:
        error = r.json()["error"]
        shape = set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    except Exception:  # noqa: BLE001 - a body that is not OpenAI's error shape is the finding
        shape, error = False, {"message": r.text[:200]}
    return {"status": r.status_code, "shape": shape, "message": str(error.get("message"))[:200]}


def _send_ok(c: Any, item: dict[str, Any], prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """A well-formed request (or a stream to cut): its status, text, completion tokens and what went wrong."""
    path = "/v1/chat/completions" if item["chat"] else "/v1/completions"
    body = _body(item, prompts, args.max_tokens)
    out: dict[str, Any] = {"status": None, "text": None, "tokens": 0, "error": None}
    if not item["stream"]:
        r = c.post(path, json=body)
        out["status"] = r.status_code
        data = r.json()
        if r.status_code != 200:
            out["error"] = data.get("error", data)
            return out
        choice = data["choices"][0]
        out["text"] = choice["message"]["content"] if item["chat"] else choice["text"]
        out["tokens"] = data["usage"]["completion_tokens"]
        return out
    cut_after = item.get("cut_after")
    with c.stream("POST", path, json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            r.read()
            data = r.json()
            out["error"] = data.get("error", data)
            return out
        parts: list[str] = []
        events, done = 0, False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]
                continue
            if event.get("usage"):
                out["tokens"] = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                parts.append((choice["delta"].get("content") or "") if item["chat"] else choice["text"])
                events += 1
            if cut_after is not None and events >= cut_after:
                out["cut"] = True  # leaving the block closes the connection mid-stream
                break
    out["text"] = "".join(parts)
    out["done"] = done
    if cut_after is None and not done and out["error"] is None:
        out["error"] = {"message": "the stream ended without data: [DONE]"}
    return out


class _ErrorLog(logging.Handler):
    """Counts the server's ERROR log records (a failure inside zinit serve or uvicorn)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}"[:300])


def _churn(url: str, args: argparse.Namespace, stop: threading.Event, stats: dict[str, Any]) -> None:
    """Load the churned adapter at once, unload it ``--churn-seconds`` later (retrying while a request uses it: 409),
    load it again, and so on until ``stop``; leaves it unloaded."""
    import httpx

    def unload(c: Any, patience: float) -> bool:
        started = time.monotonic()
        while True:
            r = c.delete(f"/v1/adapters/{CHURN}")
            if r.status_code == 200:
                stats["unloads"] += 1
                stats["unload_waits"].append(time.monotonic() - started)
                return True
            if r.status_code != 409:
                stats["errors"].append(f"DELETE: {r.status_code} {r.text[:200]}")
                return False
            stats["conflicts_409"] += 1
            if time.monotonic() - started > patience:
                stats["errors"].append(f"DELETE: still 409 after {patience:.0f} s")
                return False
            time.sleep(0.02)

    with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
        loaded = False
        while True:  # loaded at once, then toggled every churn_seconds
            if not loaded:
                r = c.post("/v1/adapters", json={"name": CHURN, "path": "churn"})
                if r.status_code == 200:
                    stats["loads"] += 1
                    loaded = True
                else:
                    stats["errors"].append(f"POST: {r.status_code} {r.text[:200]}")
            else:
                loaded = not unload(c, args.request_timeout)
            if stop.wait(args.churn_seconds):
                break
        if loaded:
            unload(c, args.request_timeout)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _serve_in_thread(http: Any, timeout: float | None) -> tuple[threading.Thread, str]:
    """Run the uvicorn server ``http`` in a daemon thread and wait until it listens (at most ``timeout`` s if given)."""
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout if timeout is not None else None
    while not http.started:
        if deadline is not None and (time.monotonic() > deadline or not thread.is_alive()):
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return thread, f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"


def _fault_references(args: argparse.Namespace, model: Any, tokenizer: Any, names: list[str],
                      plan: list[dict[str, Any]], prompts: list[str], eos: list[int], depth: int, folder: Path
                      ) -> tuple[dict[tuple[str, int], str], float, list[tuple[str, int, bool]], float]:
    """The churned adapter saved into ``folder``, then every reference: refs, their seconds, preflight, distinct."""
    # the churned adapter: written to the server's adapters folder, its references computed, then taken off the
    # model (the server loads it from the folder while serving)
    zinit.add_adapter(model, CHURN, layers=min(args.L, depth), K=max(1, args.K // 2))
    _open_gates(model, CHURN, args.gate)
    # its chat references use the tokenizer's chat template: say so (an adapter that records no format gets the
    # Alpaca prompt, which the benchmark's numeric stand-in tokenizer cannot read)
    zinit.save_adapter(model, folder / "churn", name=CHURN, prompt_format="chat")
    pairs = sorted({(item["model"], item["prompt"], item["chat"]) for item in plan if item["kind"] == "ok"})
    preflight = [(name, prompt, prompt % 2 == 1) for name in [BASE] + names[:3] for prompt in range(2)]
    pairs = sorted(set(pairs) | set(preflight))
    t, threads = time.monotonic(), torch.get_num_threads()
    torch.set_num_threads(1)  # one small generate() at a time: a second thread only waits (and much longer when
    try:  # the machine is busy)
        refs = _references(model, tokenizer, pairs, prompts, args.max_tokens, eos)
    finally:
        torch.set_num_threads(threads)
    refs_s = time.monotonic() - t
    zinit.remove_adapter(model, CHURN)
    # how many different answers the models give one prompt (1: the adapters change nothing, identity proves little)
    distinct = statistics.mean([len({refs[(n, p)] for n in [BASE] + names + [CHURN] if (n, p) in refs})
                                for p in range(args.prompts)] or [0])
    return refs, refs_s, preflight, distinct


def _fault_load(http_client: Any, url: str, args: argparse.Namespace, plan: list[dict[str, Any]], prompts: list[str],
                stop: threading.Event, churn: dict[str, Any]) -> tuple[list[dict[str, Any]], list[float], float]:
    """The plan sent by ``--concurrency`` clients while the churn thread runs: the records, RSS after each, wall s."""
    records: list[dict[str, Any]] = []
    rss: list[float] = []
    todo = list(reversed(plan))
    lock = threading.Lock()
    end = time.monotonic() + args.max_seconds

    def client() -> None:
        with http_client(base_url=url, timeout=args.request_timeout) as c:
            while time.monotonic() < end:
                with lock:
                    if not todo:
                        return
                    item = todo.pop()
                start = time.monotonic()
                try:
                    got = _send_bad(c, item, prompts, args) if item["kind"] == "bad" else \
                        _send_ok(c, item, prompts, args)
                except Exception as exc:  # noqa: BLE001 - a hang, a reset, a body that is not JSON: counted
                    got = {"status": None, "error": {"message": f"{type(exc).__name__}: {exc}"[:200]}}
                got.update(item=item, seconds=time.monotonic() - start)
                with lock:
                    records.append(got)
                    rss.append(_rss_mb())

    churner = threading.Thread(target=_churn, args=(url, args, stop, churn), daemon=True)
    start = time.monotonic()
    churner.start()
    clients = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    wall = time.monotonic() - start
    stop.set()
    churner.join(args.request_timeout + 30)
    return records, rss, wall


def _drained(http_client: Any, url: str) -> dict[str, Any]:
    """``/health`` once no row is running or waiting in the engine, or after 10 s of waiting for that."""
    with http_client(base_url=url, timeout=30) as c:  # every cut or finished row has left the engine
        until = time.monotonic() + 10
        while True:
            health = c.get("/health").json()
            if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > until:
                break
            time.sleep(0.1)
    return health


def _faults(args: argparse.Namespace, model: Any, tokenizer: Any, names: list[str]) -> dict[str, Any]:
    import httpx
    import uvicorn

    from zinit.serve.app import Server, create_app  # fastapi: the optional serve extra

    started_all = time.monotonic()
    depth = zinit.find_backbone(model).dims(model).num_layers
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = _fault_prompts(tokenizer, args)
    plan = _plan(args, names)
    folder = tempfile.TemporaryDirectory(prefix="zinit-serve-faults-")
    refs, refs_s, preflight, distinct = _fault_references(args, model, tokenizer, names, plan, prompts, eos, depth,
                                                          Path(folder.name))

    engine = Engine(model, eos_token_ids=eos, max_batch=args.max_batch, max_queue=1024)
    server = Server(engine, tokenizer, base_name=BASE, adapters_dir=folder.name, max_tokens=args.max_tokens,
                    context=CONTEXT, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning")
    errors = _ErrorLog()
    watched = [logging.getLogger(n) for n in ("zinit.serve", "uvicorn")]  # uvicorn.error propagates to uvicorn
    for logger in watched:
        logger.addHandler(errors)
    http = uvicorn.Server(config)
    thread, url = _serve_in_thread(http, 60)
    churn = {"loads": 0, "unloads": 0, "conflicts_409": 0, "unload_waits": [], "errors": []}
    stop = threading.Event()
    try:
        # preflight: the engine serving one request at a time equals generate() under use_adapters
        with httpx.Client(base_url=url, timeout=args.request_timeout) as c:
            same = [_send_ok(c, {"model": n, "prompt": p, "chat": chat, "stream": False}, prompts, args)["text"]
                    == refs[(n, p)] for n, p, chat in preflight]
        print(f"zinit serve fault run: {args.requests} requests at concurrency {args.concurrency}, {len(names)} "
              f"adapters + {BASE} + 1 churned every {args.churn_seconds:g} s, {args.max_tokens} tokens, seed "
              f"{args.seed}, {torch.get_num_threads()} threads; {len(refs)} references in {refs_s:.1f} s; "
              f"preflight {sum(same)}/{len(same)} identical", flush=True)
        records, rss, wall = _fault_load(httpx.Client, url, args, plan, prompts, stop, churn)
        health = _drained(httpx.Client, url)
    finally:
        stop.set()
        http.should_exit = True
        thread.join(60)
        for logger in watched:
            logger.removeHandler(errors)
        folder.cleanup()
    out = _fault_report(args, names, plan, records, rss, refs, churn, wall, errors.records, health, same, distinct)
    out["total_s"] = time.monotonic() - started_all
    _print_faults(out)
    return out


def _count_bad(bad: dict[str, dict[str, Any]], r: dict[str, Any]) -> None:
    """Add a bad request's answer to its kind's counts: the status got, as documented, 4xx, OpenAI's error shape."""
    b = bad[r["item"]["bad"]]
    b["sent"] += 1
    key = str(r["status"]) if r["status"] is not None else r["error"]["message"][:60]
    b["got"][key] = b["got"].get(key, 0) + 1
    b["as_expected"] += r["status"] == b["expected"] and r["shape"]
    b["4xx"] += r["status"] is not None and 400 <= r["status"] < 500
    b["openai_shape"] += bool(r.get("shape"))


def _failure(r: dict[str, Any]) -> str | None:
    """Why a well-formed request or a cut stream failed (a status other than 200, an error event), or None."""
    why = None
    if r["status"] != 200:
        why = f"status {r['status']}: {str((r.get('error') or {}).get('message'))[:160]}"
    elif r.get("error") is not None:
        why = f"error event: {str(r['error'].get('message'))[:160]}"
    return why


def _count_cut(cut: dict[str, Any], item: dict[str, Any], r: dict[str, Any], why: str | None) -> None:
    """Add a stream the client was to cut: failed, cut mid-way, or finished before the cut."""
    if why is not None:
        cut["failed"] += 1
        cut["failures"].append(f"#{item['i']} {item['model']}: {why}")
    elif r.get("cut"):
        cut["cut"] += 1
    else:
        cut["finished_before_cut"] += 1


def _count_well(well: dict[str, Any], identical: dict[str, Any], refs: dict[tuple[str, int], str],
                item: dict[str, Any], r: dict[str, Any], why: str | None) -> bool:
    """Add a well-formed request (and compare its answer with the reference); whether it completed."""
    if item["model"] == CHURN and r["status"] == 404 and (r.get("error") or {}).get("code") == "model_not_found":
        well["churned_404"] += 1  # expected while it is unloaded
        return False
    if why is not None:
        well["failed"] += 1
        well["failures"].append(f"#{item['i']} {item['model']} {'chat' if item['chat'] else 'completion'}"
                                f"{' stream' if item['stream'] else ''}: {why}")
        return False
    well["completed"] += 1
    well["churned_admitted"] += item["model"] == CHURN
    identical["compared"] += 1
    want = refs[(item["model"], item["prompt"])]
    if r["text"] == want:
        identical["identical"] += 1
    else:
        identical["mismatches"].append(f"#{item['i']} {item['model']} prompt {item['prompt']}: got "
                                       f"{r['text'][:60]!r}, alone {want[:60]!r}")
    return True


def _tally(plan: list[dict[str, Any]], records: list[dict[str, Any]], refs: dict[tuple[str, int], str]
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, dict[str, Any]], list[float], int]:
    """The counts of the records: well-formed, identical, cut and bad, and the completed requests' latencies, tokens."""
    well = {"planned": 0, "completed": 0, "failed": 0, "churned_admitted": 0, "churned_404": 0, "failures": []}
    identical = {"compared": 0, "identical": 0, "mismatches": []}
    cut = {"planned": 0, "cut": 0, "finished_before_cut": 0, "failed": 0, "failures": []}
    bad = {kind: {"sent": 0, "expected": status, "got": {}, "as_expected": 0, "4xx": 0, "openai_shape": 0}
           for kind, status in BAD_KINDS.items()}
    latencies: list[float] = []
    tokens = 0
    for item in plan:
        if item["kind"] == "ok":
            well["planned"] += 1
        elif item["kind"] == "cut":
            cut["planned"] += 1
    for r in records:
        item = r["item"]
        if item["kind"] == "bad":
            _count_bad(bad, r)
            continue
        why = _failure(r)
        if item["kind"] == "cut":
            _count_cut(cut, item, r, why)
            continue
        if _count_well(well, identical, refs, item, r, why):
            latencies.append(r["seconds"])
            tokens += r["tokens"]
    return well, identical, cut, bad, latencies, tokens


def _rss_summary(rss: list[float]) -> dict[str, Any]:
    """The resident memory over the first and the last requests (median of each window), its growth and a trace."""
    window = min(200, max(1, len(rss) // 5))
    first = statistics.median(rss[:window]) if rss else float("nan")
    last = statistics.median(rss[-window:]) if rss else float("nan")
    return {"window": window, "first": first, "last": last,
            "growth_pct": 100 * (last - first) / first if first and not math.isnan(first) else float("nan"),
            "trace": [rss[round(k * (len(rss) - 1) / 9)] for k in range(10)] if rss else []}


def _fault_report(args: argparse.Namespace, names: list[str], plan: list[dict[str, Any]],
                  records: list[dict[str, Any]], rss: list[float], refs: dict[tuple[str, int], str],
                  churn: dict[str, Any], wall: float, errors: list[str], health: dict[str, Any], same: list[bool],
                  distinct: float) -> dict[str, Any]:
    well, identical, cut, bad, latencies, tokens = _tally(plan, records, refs)
    waits = churn.pop("unload_waits")
    churn["longest_unload_wait_s"] = max(waits, default=0.0)
    for part in (well, cut, identical):
        for key in ("failures", "mismatches"):
            if key in part:
                part[key] = part[key][:10]
    return {
        "mode": "faults", "shape": args.model or args.shape, "requests": args.requests,
        "concurrency": args.concurrency, "adapters": len(names), "max_tokens": args.max_tokens, "seed": args.seed,
        "threads": torch.get_num_threads(), "sent": len(records), "not_sent": len(plan) - len(records),
        "kinds": {"well_formed": well["planned"], "cut_stream": cut["planned"],
                  "bad": sum(1 for item in plan if item["kind"] == "bad")},
        "well_formed": well, "identical": identical, "cut_streams": cut, "bad": bad,
        "bad_all_4xx": all(b["4xx"] == b["sent"] for b in bad.values()),
        "bad_all_as_documented": all(b["as_expected"] == b["sent"] for b in bad.values()),
        "churn": churn, "preflight_identical": f"{sum(same)}/{len(same)}", "distinct_answers_per_prompt": distinct,
        "p50_s": statistics.median(latencies) if latencies else float("nan"), "p95_s": _percentile(latencies, 0.95),
        "tokens_per_s": tokens / wall if wall else 0.0, "wall_s": wall,
        "rss_mb": _rss_summary(rss),
        "rows_left": health["running"] + health["waiting"], "server_errors_logged": len(errors),
        "server_errors": errors[:10],
    }


def _print_faults(out: dict[str, Any]) -> None:
    w, c, i = out["well_formed"], out["cut_streams"], out["identical"]
    rows = [
        ("requests (well-formed / cut streams / bad)",
         f"{out['sent']} ({out['kinds']['well_formed']} / {out['kinds']['cut_stream']} / {out['kinds']['bad']})"
         + (f", {out['not_sent']} not sent (--max-seconds)" if out["not_sent"] else "")),
        ("failed well-formed", f"{w['failed']} (completed {w['completed']}, of which churned adapter "
                               f"{w['churned_admitted']}; 404 while it was unloaded {w['churned_404']})"),
        ("greedy answers identical to the adapter alone", f"{i['identical']} / {i['compared']}"),
        ("cut streams", f"{c['cut']} cut mid-way, {c['finished_before_cut']} finished first, {c['failed']} failed"),
        ("bad requests answered 4xx", f"{sum(b['4xx'] for b in out['bad'].values())} / {out['kinds']['bad']}"
                                      f" (as documented, OpenAI shape: "
                                      f"{sum(b['as_expected'] for b in out['bad'].values())})"),
        ("churn: loads / unloads / 409 retries", f"{out['churn']['loads']} / {out['churn']['unloads']} / "
                                                 f"{out['churn']['conflicts_409']} (longest unload wait "
                                                 f"{out['churn']['longest_unload_wait_s']:.2f} s)"),
        ("latency p50 / p95 (well-formed)", f"{out['p50_s']:.2f} s / {out['p95_s']:.2f} s"),
        ("tokens/s (well-formed)", f"{out['tokens_per_s']:.1f}"),
        (f"RSS first / last {out['rss_mb']['window']} requests", f"{out['rss_mb']['first']:.0f} MiB / "
                                                                 f"{out['rss_mb']['last']:.0f} MiB "
                                                                 f"({out['rss_mb']['growth_pct']:+.1f} %)"),
        ("wall time of the load", f"{out['wall_s']:.1f} s"),
        ("rows left in the engine / server errors logged", f"{out['rows_left']} / {out['server_errors_logged']}"),
    ]
    for name, value in rows:
        print(f"  {name:<48s} {value}")
    print(f"  {'bad kind':<40s} {'sent':>4s} {'documented':>10s}  got")
    for kind, b in out["bad"].items():
        got = ", ".join(f"{k}: {v}" for k, v in sorted(b["got"].items()))
        print(f"  {kind:<40s} {b['sent']:4d} {b['expected']:10d}  {got}")
    print(f"  RSS through the run (MiB): {' '.join(f'{v:.0f}' for v in out['rss_mb']['trace'])}")
    for line in w["failures"] + c["failures"] + i["mismatches"] + out["churn"]["errors"] + out["server_errors"]:
        print(f"    {line}")
    print(flush=True)


def _parser() -> argparse.ArgumentParser:
    """The command line of ``python -m zinit.benchmarks.serve``: the load test's options and the fault mode's."""
    p = argparse.ArgumentParser(prog="python -m zinit.benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'embedded', a model folder, or none: a random-weight --shape")
    p.add_argument("--shape", default="smollm2", help="random-weight LLaMA shape of zinit.benchmarks.speed, or "
                                                      "'small' (hidden 256, 8 layers, vocab 4096)")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--L", type=int, default=30)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--concurrency", default=None, help="levels, default 1,4,16 (--faults: one level, default 16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level, at least the concurrency (default 16; --faults: 1000)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="each level stops sending after this long at most (default 600; --faults: 1800)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None)
    f = p.add_argument_group("fault mode")
    f.add_argument("--faults", action="store_true",
                   help="one level of well-formed, cut and bad requests with an adapter churned (see above)")
    f.add_argument("--seed", type=int, default=0, help="the request plan's seed")
    f.add_argument("--prompts", type=int, default=12, help="distinct prompts (each needs one reference per model)")
    f.add_argument("--churn-seconds", type=float, default=2.0,
                   help="the churned adapter is loaded, then unloaded, each after this many seconds")
    f.add_argument("--cut-fraction", type=float, default=0.10, help="streams the client cuts mid-way")
    f.add_argument("--bad-fraction", type=float, default=0.05, help="malformed or over-limit requests")
    f.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the server's body limit (413 beyond)")
    f.add_argument("--gate", type=float, default=0.5, help="the adapters' gate values in fault mode")
    f.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds a client waits for an answer (longer counts as a hang: failed)")
    return p


def _settle_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set torch's threads, fill the defaults that depend on ``--faults``, and refuse what fault mode cannot run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.concurrency = args.concurrency or ("16" if args.faults else "1,4,16")
    args.requests = args.requests or (1000 if args.faults else 16)
    args.max_seconds = args.max_seconds or (1800.0 if args.faults else 600.0)
    if args.faults:
        if "," in args.concurrency:
            p.error("--faults runs one concurrency level")
        args.concurrency = int(args.concurrency)
        if args.prompts < 2:
            p.error("--prompts must be at least 2 (even ones are completions, odd ones chats)")
        if not (0 <= args.cut_fraction and 0 <= args.bad_fraction and args.cut_fraction + args.bad_fraction <= 1):
            p.error("--cut-fraction and --bad-fraction must be >= 0 and add up to at most 1")


def _levels(args: argparse.Namespace, url: str, tokenizer: Any, names: list[str], http: Any,
            thread: threading.Thread) -> list[dict[str, Any]]:
    """Each concurrency level run against the server at ``url`` and printed; the server is stopped at the end."""
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
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _parser()
    args = p.parse_args(argv)
    _settle_args(p, args)
    import uvicorn

    from zinit.serve.app import Server, create_app  # fastapi: the optional serve extra

    model, tokenizer = _model(args)
    if args.faults and isinstance(tokenizer, _IdTokenizer):
        _unit_scale(model)
    depth = zinit.find_backbone(model).dims(model).num_layers
    names = [f"adapter{i}" for i in range(args.adapters)]
    for name in names:
        zinit.add_adapter(model, name, layers=min(args.L, depth), K=args.K)
        _open_gates(model, name, args.gate if args.faults else 0.1)
    if args.faults:
        out = _faults(args, model, tokenizer, names)
        if args.json:
            write_json(args.json, out)
        return out
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    engine = Engine(model, eos_token_ids=eos, max_batch=args.max_batch, max_queue=1024)
    server = Server(engine, tokenizer, max_tokens=args.max_tokens, context=4096)
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=0, log_level="warning")
    http = uvicorn.Server(config)
    thread, url = _serve_in_thread(http, None)
    results = _levels(args, url, tokenizer, names, http, thread)
    out = {"adapters": args.adapters, "max_tokens": args.max_tokens, "levels": results}
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
