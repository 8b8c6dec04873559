"""zinit serve over loopback with a real HTTP client (httpx): OpenAI-compatible completions and chat completions,
streaming, concurrent clients of different adapters (each answer token-identical to greedy generate() with that
adapter loaded alone), adapters loaded and unloaded at run time from the configured folder only, clear errors, and a
shutdown that finishes the running request."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import zinit
from tiny import randomize_adapter, save_tiny_causal_lm

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from zinit import lm  # noqa: E402
from zinit.serve import Engine, QueueFull  # noqa: E402
from zinit.serve.app import Server, create_app  # noqa: E402

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    folder = save_tiny_causal_lm(root / "model")
    adapters = root / "adapters"
    for i, (name, layers, K) in enumerate((("math", 2, 4), ("poems", [0, 2], 6))):
        model, _ = lm.load_model(str(folder), torch.device("cpu"))
        zinit.inject(model, layers, K)
        randomize_adapter(model, seed=30 + i, scale=1.5)
        zinit.save_adapter(model, adapters / name)
    return folder, adapters


def _solo(setup, adapter, prompt_ids, n):
    folder, adapters = setup
    model, tok = lm.load_model(str(folder), torch.device("cpu"))
    if adapter is not None:
        zinit.load_adapter(model, adapters / adapter)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


class Running:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, setup, server_kwargs=None, **engine_kwargs):
        folder, adapters = setup
        model, self.tokenizer = lm.load_model(str(folder), torch.device("cpu"))
        self.tokenizer.chat_template = CHAT
        zinit.add_adapter(model, "math", adapters / "math")
        self.engine = Engine(model, eos_token_ids=[self.tokenizer.eos_token_id], **engine_kwargs)
        kwargs = dict(adapters_dir=str(adapters), max_tokens=64, context=512)
        kwargs.update(server_kwargs or {})
        self.server = Server(self.engine, self.tokenizer, **kwargs)
        config = uvicorn.Config(create_app(self.server), host="127.0.0.1", port=0, log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self):
        self.client.close()
        self.uvicorn.should_exit = True
        self.thread.join(60)


@pytest.fixture
def running(setup):
    server = Running(setup)
    yield server
    server.stop()


def _ids(server, text):
    return server.tokenizer(text)["input_ids"]


def test_completions_chat_and_streaming_match_greedy_generate_alone(running, setup):
    c = running.client
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "math"]
    texts = {m: c.post("/v1/completions", json={"model": m, "prompt": "The sky is", "max_tokens": 12,
                                                "temperature": 0}).json()["choices"][0]["text"] for m in ("math", "base")}
    assert texts["math"] != texts["base"]  # the adapter changes the answer: the comparison below means something
    assert c.get("/health").json()["status"] == "ok"
    for model, adapter in (("math", "math"), ("base", None)):
        r = c.post("/v1/completions", json={"model": model, "prompt": "The sky is", "max_tokens": 12,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == len(_ids(running, "The sky is"))
        assert body["choices"][0]["text"] == _solo(setup, adapter, _ids(running, "The sky is"), 12)
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        with c.stream("POST", "/v1/completions", json={"model": model, "prompt": "The sky is", "max_tokens": 12,
                                                       "temperature": 0, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == body["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    messages = [{"role": "user", "content": "Write a line."}]
    r = c.post("/v1/chat/completions", json={"model": "math", "messages": messages, "max_tokens": 10,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    prompt = running.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": _solo(setup, "math", prompt, 10)}
    with c.stream("POST", "/v1/chat/completions", json={"model": "math", "messages": messages, "max_tokens": 10,
                                                        "temperature": 0, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(ch["choices"][0]["delta"]["content"] for ch in chunks) == r.json()["choices"][0]["message"][
        "content"]


def test_concurrent_clients_of_different_adapters_each_get_their_own_answer(running, setup):
    c = running.client
    assert c.post("/v1/adapters", json={"name": "poems", "path": "poems"}).status_code == 200
    jobs = [("math", "Two and two", 10), ("poems", "Roses are", 14), ("base", "Once upon", 8),
            ("poems", "The moon", 6), ("math", "Seven", 12)]
    answers, barrier = {}, threading.Barrier(len(jobs))

    def client(i, model, prompt, n):
        with httpx.Client(base_url=running.url, timeout=60) as own:
            barrier.wait()  # all at once: they share decoding steps
            answers[i] = own.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": n,
                                                           "temperature": 0}).json()

    threads = [threading.Thread(target=client, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (model, prompt, n) in enumerate(jobs):
        want = _solo(setup, None if model == "base" else model, _ids(running, prompt), n)
        assert answers[i]["choices"][0]["text"] == want, (model, prompt)


def test_errors_are_clear_and_in_openais_shape(running, monkeypatch):
    c = running.client

    def error(r, status, words):
        assert r.status_code == status, r.text
        assert words in r.json()["error"]["message"], r.json()

    error(c.post("/v1/completions", content=b"{not json"), 400, "not valid JSON")
    error(c.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "'nope' does not exist")
    assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).json()["error"]["code"] == \
        "model_not_found"
    error(c.post("/v1/completions", json={"prompt": "x"}), 400, "'model' is required")
    error(c.post("/v1/completions", json={"model": "math", "prompt": "x" * 600}), 400, "context of 512 tokens")
    error(c.post("/v1/completions", json={"model": "math", "prompt": "x", "max_tokens": 65}), 400, "'max_tokens'")
    error(c.post("/v1/completions", json={"model": "math", "prompt": "x", "temperature": "hot"}), 400,
          "'temperature'")
    error(c.post("/v1/chat/completions", json={"model": "math", "messages": "hi"}), 400, "'messages'")
    error(c.post("/v1/adapters", json={"name": "evil", "path": "../model"}), 403, "outside the adapters folder")
    error(c.post("/v1/adapters", json={"name": "math", "path": "math"}), 400, "already served")
    error(c.post("/v1/adapters", json={"name": "gone", "path": "nothing-here"}), 400, "does not exist")
    error(c.delete("/v1/adapters/zz"), 404, "no adapter named 'zz'")

    def full(request):
        raise QueueFull("64 requests are already waiting (the limit is 64)")

    monkeypatch.setattr(running.engine, "submit", full)
    r = c.post("/v1/completions", json={"model": "math", "prompt": "x"})
    error(r, 429, "busy")
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_adapters_load_and_unload_while_serving(running):
    c = running.client
    assert c.post("/v1/adapters", json={"name": "poems2", "path": "poems"}).json()["id"] == "poems2"
    assert "poems2" in [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert c.post("/v1/completions", json={"model": "poems2", "prompt": "x", "max_tokens": 2}).status_code == 200
    assert c.delete("/v1/adapters/poems2").json()["deleted"] is True
    assert c.post("/v1/completions", json={"model": "poems2", "prompt": "x"}).status_code == 404


def test_shutdown_finishes_the_running_request(setup):
    server = Running(setup)
    got = {}

    def long_request():
        got["r"] = httpx.post(f"{server.url}/v1/completions", timeout=60,
                              json={"model": "math", "prompt": "Tell", "max_tokens": 60, "temperature": 0,
                                    "stop": None})

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while server.engine.running() == 0:  # the request is decoding
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.stop()  # SIGTERM's path: uvicorn stops accepting, waits for the request, then the engine drains
    t.join(60)
    body = got["r"].json()
    assert got["r"].status_code == 200 and body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["finish_reason"] in ("length", "stop")


def test_the_load_benchmark_runs_end_to_end_without_failures(tmp_path):
    """The benchmark is a tool people rerun: it must work end to end (timings are not asserted)."""
    from zinit.benchmarks import serve

    out = serve.main(["--shape", "tiny", "--adapters", "3", "--L", "2", "--K", "4", "--concurrency", "1,4",
                      "--requests", "4", "--max-tokens", "3", "--json", str(tmp_path / "serve.json")])
    assert [level["concurrency"] for level in out["levels"]] == [1, 4]
    assert all(level["failed"] == 0 and level["requests"] == 4 for level in out["levels"])
    assert json.loads((tmp_path / "serve.json").read_text())["adapters"] == 3


def openai_error(r, status: int, *words: str) -> dict:
    """The error body of response ``r``: its status, OpenAI's four fields, and every word in its message."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    return error


def test_each_adapter_is_prompted_in_the_format_it_was_trained_with(setup):
    """An adapter whose zinit.json says it was trained on the Alpaca prompt gets a chat request as that prompt (its
    one user message as the instruction), token-identical to generate() on the Alpaca prompt alone; a "chat" adapter
    and one that records no format get the tokenizer's chat template; the format comes and goes with the adapter."""
    folder, adapters = setup
    for name, fmt in (("alp", "alpaca"), ("cht", "chat")):
        model, _ = lm.load_model(str(folder), torch.device("cpu"))
        zinit.inject(model, 2, 4)
        randomize_adapter(model, seed=50, scale=1.5)
        zinit.save_adapter(model, adapters / name, prompt_format=fmt)
    assert zinit.read_adapter_config(adapters / "alp")["prompt_format"] == "alpaca"
    running = Running(setup, server_kwargs={"prompt_formats": {"math": "alpaca"}})
    try:
        c = running.client
        messages = [{"role": "user", "content": "Write a line."}]
        alpaca_ids = _ids(running, lm.format_prompt("Write a line."))
        chat_ids = running.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
        assert alpaca_ids != chat_ids

        def chat(model):
            r = c.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"], r.json()["choices"][0]["message"]["content"]

        assert chat("math") == (len(alpaca_ids), _solo(setup, "math", alpaca_ids, 8))  # preloaded, format given
        for name in ("alp", "cht", "poems"):
            assert c.post("/v1/adapters", json={"name": name, "path": name}).status_code == 200
        # "poems" records no format: the Alpaca prompt every zinit recipe trained such an adapter with, as generate
        assert running.server.prompt_formats == {"math": "alpaca", "alp": "alpaca", "cht": "chat", "poems": "alpaca"}
        assert chat("alp") == (len(alpaca_ids), _solo(setup, "alp", alpaca_ids, 8))
        assert chat("cht") == (len(chat_ids), _solo(setup, "cht", chat_ids, 8))
        assert chat("poems") == (len(alpaca_ids), _solo(setup, "poems", alpaca_ids, 8))
        assert chat("base")[0] == len(chat_ids)  # the base model: its chat template
        r = c.post("/v1/chat/completions", json={"model": "alp", "max_tokens": 4, "messages": [
            {"role": "system", "content": "Be brief."}, *messages]})
        assert r.status_code == 400 and "trained on the Alpaca prompt" in r.json()["error"]["message"]
        assert c.delete("/v1/adapters/alp").status_code == 200
        assert "alp" not in running.server.prompt_formats
        (adapters / "bad").mkdir()
        for f in ("adapter.safetensors", "zinit.json"):
            (adapters / "bad" / f).write_bytes((adapters / "cht" / f).read_bytes())
        description = json.loads((adapters / "bad" / "zinit.json").read_text())
        (adapters / "bad" / "zinit.json").write_text(json.dumps({**description, "prompt_format": "vicuna"}))
        r = c.post("/v1/adapters", json={"name": "bad", "path": "bad"})
        assert r.status_code == 400 and "prompt_format" in r.json()["error"]["message"], r.text
        assert "bad" not in running.server.prompt_formats and "bad" not in running.engine.adapters()
    finally:
        running.stop()
