"""``zinit serve`` as people run it: a real process with a model folder and adapter folders, answering over
loopback, and on SIGTERM shutting down gracefully (the application's shutdown completes: the engine drained) before
ending by the signal, as uvicorn does (exit status 143 in a shell)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import zinit
from tiny import randomize_adapter, save_tiny_causal_lm, subprocess_env

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zinit_serve_process_answers_and_stops_on_sigterm(tmp_path):
    from zinit import lm

    folder = save_tiny_causal_lm(tmp_path / "model")
    model, _ = lm.load_model(str(folder), torch.device("cpu"))
    zinit.inject(model, 2, K=4)
    randomize_adapter(model, seed=5)
    zinit.save_adapter(model, tmp_path / "run" / "adapter")  # as zinit train writes OUT/adapter: served as "run"
    port = _free_port()
    env = subprocess_env()
    env["ZINIT_API_KEY"] = "k3y"  # the key from the environment: /v1 routes need it, /health does not
    auth = {"Authorization": "Bearer k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "zinit", "serve", str(tmp_path / "run" / "adapter"),
                             "--model", str(folder), "--port", str(port), "--max-body-bytes", "2000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "zinit serve did not come up"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["base", "run"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, headers=auth,
                       json={"model": "run", "prompt": "Hi", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, headers=auth,
                       json={"model": "run", "prompt": "Hi" * 1000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == -signal.SIGTERM
        log = proc.stdout.read()
        assert "/v1/completions model=run" in log  # the request log line
        assert "Application shutdown complete" in log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_api_key_and_body_limit_flags(monkeypatch):
    """--api-key, else ZINIT_API_KEY (so the key need not show in ps), else none; --max-body-bytes."""
    from zinit.serve.options import api_key, parser

    monkeypatch.delenv("ZINIT_API_KEY", raising=False)
    assert api_key(parser().parse_args([])) is None
    assert api_key(parser().parse_args(["--api-key", "k1"])) == "k1"
    monkeypatch.setenv("ZINIT_API_KEY", "k2")
    assert api_key(parser().parse_args([])) == "k2"
    assert api_key(parser().parse_args(["--api-key", "k1"])) == "k1"
    monkeypatch.setenv("ZINIT_API_KEY", "")
    assert api_key(parser().parse_args([])) is None
    assert parser().parse_args(["--max-body-bytes", "1000"]).max_body_bytes == 1000
    with pytest.raises(SystemExit):
        parser().parse_args(["--max-body-bytes", "0"])
