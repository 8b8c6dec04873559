"""zinit serve keeps one request's trouble to that request (issue 26, sections 1 and 2): values that would overflow
mean greedy and bad seeds are refused at the door, an error after a stream started ends it with an OpenAI error
event and [DONE], bodies are bounded (413), parsing and tokenizing never block the event loop, a non-streaming client
that goes away has its row cancelled at the next step, and failures are answered in OpenAI's error shape."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from test_serve_http import Running, _ids, _solo, openai_error as _error, setup  # noqa: F401 - setup is a fixture

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def running(setup):  # noqa: F811 - the fixture imported above
    server = Running(setup, server_kwargs=dict(max_body_bytes=4000))
    yield server
    server.stop()



def test_values_that_overflow_mean_greedy_and_bad_seeds_are_refused(running, setup):  # noqa: F811
    c = running.client
    greedy = _solo(setup, "math", _ids(running, "The sky is"), 8)
    for extra in ({"temperature": 1e-38}, {"temperature": 1e-6}, {"temperature": 1.0, "top_p": 0}):
        r = c.post("/v1/completions", json={"model": "math", "prompt": "The sky is", "max_tokens": 8, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["text"] == greedy, extra
    for seed in (2 ** 64, 2 ** 63, -1, 1.5, True):
        error = _error(c.post("/v1/completions", json={"model": "math", "prompt": "x", "temperature": 1,
                                                       "seed": seed}), 400, "'seed'", "2**63-1")
        assert error["param"] == "seed"
    r = c.post("/v1/completions", json={"model": "math", "prompt": "x", "max_tokens": 3, "temperature": 1,
                                        "seed": 2 ** 63 - 1})
    assert r.status_code == 200, r.text


def test_an_error_after_a_stream_started_is_an_error_event_then_done(running, monkeypatch):
    """The row fails at its third token (forced): the client gets the two tokens' chunks, an OpenAI-shaped error
    event, and data: [DONE], on a connection that ends cleanly."""
    from zinit.serve import engine as engine_module

    real = engine_module.sample

    def sample(logits, request):
        if request.seed == 4242 and len(request.generated) == 2:
            raise RuntimeError("the row broke")
        return real(logits, request)

    monkeypatch.setattr(engine_module, "sample", sample)
    for path, body in (("/v1/completions", {"prompt": "The sky is"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        with running.client.stream("POST", path, json={"model": "math", "max_tokens": 12, "temperature": 0,
                                                       "seed": 4242, "stream": True, **body}) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error" and "the row broke" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        chunks = [json.loads(line[6:]) for line in lines[:-2]]
        assert chunks and all(ch["choices"][0]["finish_reason"] is None for ch in chunks)
    # the same failure without a stream: a 500 in OpenAI's shape
    r = running.client.post("/v1/completions", json={"model": "math", "prompt": "x", "max_tokens": 12,
                                                      "temperature": 0, "seed": 4242})
    assert _error(r, 500, "the row broke")["type"] == "server_error"


def test_bodies_over_the_limit_are_413_in_openais_shape(running):
    c = running.client
    big = json.dumps({"model": "math", "prompt": "x" * 5000}).encode()
    error = _error(c.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413,
                   "4000 bytes", "--max-body-bytes")
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while reading
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    _error(c.post("/v1/completions", content=chunked()), 413, "4000 bytes")
    assert c.get("/health").status_code == 200
    r = c.post("/v1/completions", json={"model": "math", "prompt": "x" * 300, "max_tokens": 2})
    assert r.status_code == 200, r.text


class _HeldTokenizer:
    """The server's tokenizer, with encoding held until ``release`` (as a huge prompt holds it)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(60)
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(60)
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_tokenizing_runs_off_the_event_loop(running, monkeypatch, path):
    """While one request's prompt is being tokenized (held), /health and /v1/models answer."""
    held = _HeldTokenizer(running.server.tokenizer)
    monkeypatch.setattr(running.server, "tokenizer", held)
    body = {"model": "math", "max_tokens": 3}
    body.update({"prompt": "Hello"} if "chat" not in path else {"messages": [{"role": "user", "content": "Hi"}]})
    got = {}
    client = threading.Thread(target=lambda: got.update(r=httpx.post(running.url + path, json=body, timeout=60)))
    try:
        client.start()
        assert held.entered.wait(60)
        with httpx.Client(base_url=running.url, timeout=30) as other:  # generous: the loop must not be blocked
            assert other.get("/health").json()["status"] == "ok"
            assert other.get("/v1/models").status_code == 200
        assert not held.release.is_set() and client.is_alive()  # the tokenization was still held meanwhile
    finally:
        held.release.set()
        client.join(60)
    assert got["r"].status_code == 200, got["r"].text


def test_a_non_streaming_client_that_disconnects_is_cancelled_at_the_next_step(running, monkeypatch):
    engine = running.engine
    captured = []
    real_submit = engine.submit

    def submit(request):
        captured.append(request)
        real_submit(request)

    gate, stepped = threading.Event(), threading.Event()
    real_decode = engine._decode

    def decode():  # the engine holds after each decoding step until the test lets it go on
        real_decode()
        stepped.set()
        gate.wait(60)

    monkeypatch.setattr(engine, "submit", submit)
    monkeypatch.setattr(engine, "_decode", decode)
    body = json.dumps({"model": "math", "prompt": "Tell me", "max_tokens": 60, "temperature": 0}).encode()
    host, port = running.url.rsplit(":", 1)[0].split("//")[1], int(running.url.rsplit(":", 1)[1])
    sock = socket.create_connection((host, port), timeout=30)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert stepped.wait(60)  # the row decodes; the engine is held after its first step
        request = captured[0]
        sock.close()  # the client goes away
        deadline = time.monotonic() + 30  # generous liveness bound: the disconnect must reach the request
        while not request.cancelled:
            assert time.monotonic() < deadline, "the row of a disconnected client was not cancelled"
            time.sleep(0.01)
        at_cancel = len(request.generated)
    finally:
        gate.set()
        sock.close()
    deadline = time.monotonic() + 60
    while engine.running() or engine.waiting():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(request.generated) <= at_cancel + 1 < 60


def test_unexpected_failures_are_500_in_openais_shape(running, monkeypatch):
    def broken(name, folder):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(running.engine, "add_adapter", broken)
    r = running.client.post("/v1/adapters", json={"name": "p2", "path": "poems"})
    assert _error(r, 500, "the disk went away")["type"] == "server_error"
    r = running.client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_an_adapter_whose_zinit_json_claims_a_huge_K_is_a_400_before_any_allocation(running, setup):  # noqa: F811
    import shutil

    from tiny import edit_adapter_config

    _, adapters = setup
    shutil.copytree(adapters / "math", adapters / "hugek", dirs_exist_ok=True)
    try:
        for K in (2 ** 40, 4_000_000):
            edit_adapter_config(adapters / "hugek", K=K)
            r = running.client.post("/v1/adapters", json={"name": "hugek", "path": "hugek"})
            error = _error(r, 400, f"K={K}")
            assert error["param"] == "path" and str(adapters) not in error["message"]
        assert "hugek" not in running.engine.adapters()
    finally:
        shutil.rmtree(adapters / "hugek")
