"""``zinit serve --ray-replicas N`` (issue 26, section 7): the same server as Ray Serve replicas. A real local Ray
cluster with 2 CPU replicas, started as a user starts it (the command line, in its own process), answers the official
``openai`` client from 8 threads, mixing two adapters and the base model, with the greedy answers of each adapter
loaded alone; and stops on SIGTERM, removing its application. The replica's own build (adapters shipped as bytes,
written to a temporary folder, loaded, the folder removed) runs here in-process too, without Ray."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_serve_cli import _free_port
from test_serve_http import _solo, setup  # noqa: F401 - setup is a fixture
from tiny import subprocess_env

ray_serve = pytest.importorskip("zinit.serve.ray", exc_type=ImportError)
httpx = pytest.importorskip("httpx")

from zinit.serve.options import parser  # noqa: E402

PROMPTS = ("The sky is", "Roses are", "Once upon", "Two and two")


def _options(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


def test_a_replica_builds_its_server_from_the_shipped_adapter_bytes(setup, tmp_path, monkeypatch):  # noqa: F811
    """What Ray runs in each replica, run here: the adapters travel as bytes (no shared disk), are written to a
    temporary folder, loaded, and the folder is gone once the server is built; the app answers as each adapter
    alone, and the engine starts and stops with the app's lifespan."""
    from starlette.testclient import TestClient

    folder, adapters = setup
    shipped = ray_serve.adapter_files({"math": adapters / "math", "poems": adapters / "poems"})
    assert set(shipped["math"]) >= {"zinit.json", "adapter.safetensors"}
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where the replica's temporary folder goes
    options = _options("--model", str(folder), "--ray-replicas", "2", "--api-key", "k")
    build = ray_serve.replica_app(options, shipped)
    app = build()
    assert list(tmp_path.iterdir()) == []  # the temporary adapter folder is removed once they are loaded
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer k"}
        assert [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]] == ["base", "math", "poems"]
        for model, adapter in (("math", "math"), ("poems", "poems"), ("base", None)):
            r = client.post("/v1/completions", headers=auth, json={"model": model, "prompt": PROMPTS[0],
                                                                  "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == _solo(setup, adapter, _prompt_ids(folder, PROMPTS[0]), 8)
        r = client.delete("/v1/adapters/math", headers=auth)  # run-time adapters are off in a Ray deployment
        assert r.status_code == 403 and "deploy again" in r.json()["error"]["message"]


def _prompt_ids(folder: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"]


def test_the_api_key_is_the_drivers_and_a_replicas_environment_adds_none(setup, monkeypatch):  # noqa: F811
    """The key is read where ``zinit serve`` runs; a replica on a node whose environment has ZINIT_API_KEY must not
    start requiring a key the operator never set."""
    folder, _ = setup
    captured = {}
    monkeypatch.setattr(ray_serve, "replica_app", lambda options, adapters: captured.setdefault("o", options) and None)
    monkeypatch.setattr(ray_serve.serve, "ingress", lambda app: (lambda: type("Ingress", (), {})))
    monkeypatch.setattr(ray_serve.serve, "deployment", lambda cls, **kw: type("D", (), {"bind": lambda self: "app"})())
    monkeypatch.delenv("ZINIT_API_KEY", raising=False)
    ray_serve.application(_options("--ray-replicas", "1", "--model", str(folder)))
    monkeypatch.setenv("ZINIT_API_KEY", "replica-env")  # the replica's environment
    from zinit.serve.options import api_key
    assert api_key(captured["o"]) is None
    captured.clear()
    ray_serve.application(_options("--ray-replicas", "1", "--model", str(folder)))  # the driver's env has a key now
    assert captured["o"].api_key == "replica-env"


def test_bad_ray_options_are_refused_before_ray_starts(setup, tmp_path, monkeypatch):  # noqa: F811
    folder, adapters = setup
    with pytest.raises(ValueError, match="--adapters-dir"):
        ray_serve.application(_options("--ray-replicas", "2", "--adapters-dir", str(tmp_path)))
    with pytest.raises(ValueError, match="--ray-max-replicas 1 is below --ray-replicas 2"):
        ray_serve.application(_options("--ray-replicas", "2", "--ray-max-replicas", "1"))
    with pytest.raises(SystemExit):
        _options("--ray-replicas", "0")
    with pytest.raises(SystemExit):
        _options("--ray-replicas", "1", "--ray-cpus-per-replica", "0")
    (tmp_path / "broken").mkdir()
    with pytest.raises(Exception, match="zinit.json"):
        ray_serve.application(_options("--ray-replicas", "1", f"x={tmp_path / 'broken'}"))
    monkeypatch.setattr(ray_serve, "MAX_ADAPTER_BYTES", 100)
    with pytest.raises(ValueError, match="adapter 'math'.*more than"):
        ray_serve.adapter_files({"math": adapters / "math"})


def test_app_builder_reads_serve_config_args(setup):  # noqa: F811
    """``serve run zinit.serve.ray:app_builder adapters=... ray_replicas=2``: the args of a Serve config file."""
    folder, adapters = setup
    app = ray_serve.app_builder({"adapters": f"math={adapters / 'math'}", "model": str(folder),
                                 "ray_replicas": "2", "ray_max_replicas": "3", "max_batch": "4"})
    assert type(app).__name__ == "Application"
    with pytest.raises(SystemExit):
        ray_serve.app_builder({"adapters": f"base={adapters / 'math'}"})  # the base model's name


@pytest.mark.slow
def test_two_ray_replicas_answer_the_openai_client_as_each_adapter_alone(setup, tmp_path):  # noqa: F811
    openai = pytest.importorskip("openai")
    folder, adapters = setup
    port = _free_port()
    env = subprocess_env()
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own
    env["ZINIT_API_KEY"] = "k3y"
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "zinit", "serve", f"math={adapters / 'math'}",
                                 f"poems={adapters / 'poems'}", "--model", str(folder), "--port", str(port),
                                 "--ray-replicas", "2", "--ray-cpus-per-replica", "0.5"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "Ray Serve replica(s)" not in log_file.read_text():
            assert proc.poll() is None, log_file.read_text()[-4000:]
            assert time.monotonic() < deadline, "zinit serve --ray-replicas did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["base", "math", "poems"]
        jobs = [(model, prompt) for _ in range(3) for model in ("math", "poems", "base") for prompt in PROMPTS]

        def ask(job):
            model, prompt = job
            return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, jobs))
        want = {(m, p): _solo(setup, None if m == "base" else m, _prompt_ids(folder, p), 8)
                for m in ("math", "poems", "base") for p in PROMPTS}
        assert len({want[("math", p)] for p in PROMPTS} | {want[("base", p)] for p in PROMPTS}) > len(PROMPTS)
        assert answers == [want[job] for job in jobs]  # 36 of 36
        stream = client.completions.create(model="poems", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == want[("poems", PROMPTS[1])]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        assert r.status_code == 401 and json.loads(r.text)["error"]["type"]
        assert "Adding 2 replicas" in log_file.read_text()  # Ray's controller started two
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_file.read_text()[-4000:]
        assert "Deleting app ['zinit']" in log_file.read_text()
    finally:
        if proc.poll() is None:  # a failed test: its Ray cluster (the same process group) goes with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
