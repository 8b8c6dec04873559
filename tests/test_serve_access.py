"""Who may do what to zinit serve (issue 26, section 3): adapter loading and unloading are both off without an
adapters folder, links out of the folder are refused, and --api-key guards every /v1 route (401 in OpenAI's
shape)."""

from __future__ import annotations

import json
import os

import pytest

from test_serve_http import Running, openai_error as _error, setup  # noqa: F401 - setup is a fixture

httpx = pytest.importorskip("httpx")



def test_without_an_adapters_folder_unloading_is_off_like_loading(setup):  # noqa: F811
    server = Running(setup, server_kwargs=dict(adapters_dir=None))
    try:
        c = server.client
        _error(c.post("/v1/adapters", json={"name": "p", "path": "poems"}), 403, "--adapters-dir")
        error = _error(c.delete("/v1/adapters/math"), 403, "--adapters-dir")
        assert error["type"] == "permission_error"
        assert server.engine.adapters() == ["math"]
        assert c.post("/v1/completions", json={"model": "math", "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()


def test_files_linked_from_outside_the_adapters_folder_are_refused(setup):  # noqa: F811
    """A real folder inside --adapters-dir whose zinit.json / adapter.safetensors are links to files elsewhere."""
    _, adapters = setup
    outside = adapters.parent / "poems-outside"
    outside.mkdir(exist_ok=True)
    for name in ("zinit.json", "adapter.safetensors"):
        (outside / name).write_bytes((adapters / "poems" / name).read_bytes())
    server = Running(setup)
    try:
        for linked in (["zinit.json"], ["adapter.safetensors"], ["zinit.json", "adapter.safetensors"]):
            folder = adapters / f"linked-{len(linked)}-{linked[0]}"
            folder.mkdir()
            for name in ("zinit.json", "adapter.safetensors"):
                if name in linked:
                    os.symlink(outside / name, folder / name)
                else:
                    (folder / name).write_bytes((outside / name).read_bytes())
            r = server.client.post("/v1/adapters", json={"name": "linked", "path": folder.name})
            error = _error(r, 403, linked[0], "outside the adapters folder")
            assert error["param"] == "path"
            assert "linked" not in server.engine.adapters()
        # a link that stays inside the folder is fine
        inside = adapters / "linked-inside"
        inside.mkdir()
        for name in ("zinit.json", "adapter.safetensors"):
            os.symlink(adapters / "poems" / name, inside / name)
        assert server.client.post("/v1/adapters", json={"name": "inside", "path": "linked-inside"}).status_code == 200
    finally:
        server.stop()


def test_unusable_paths_and_lone_surrogates_are_400s_not_500s(setup):  # noqa: F811
    """Found by the fault benchmark's probing: a NUL byte or an over-long name in 'path' raised out of the folder check
    (500), and a lone UTF-16 surrogate (valid JSON, not valid Unicode) reached the tokenizer (500)."""
    server = Running(setup)
    try:
        for path in ("a\u0000b", "x" * 5000, "/".join(["y" * 300] * 2)):
            r = server.client.post("/v1/adapters", json={"name": "bad", "path": path})
            assert _error(r, 400, "is not a usable folder name")["param"] == "path"
        for route, body in (("/v1/completions", {"model": "base", "prompt": "\ud800 hi", "max_tokens": 2}),
                            ("/v1/completions", {"model": "base", "prompt": ["ok", "\udfff"], "max_tokens": 2}),
                            ("/v1/chat/completions", {"model": "base", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "\ud800"}]})):
            r = server.client.post(route, content=json.dumps(body).encode(), headers={"content-type":
                                                                                      "application/json"})
            _error(r, 400, "lone UTF-16 surrogate", "\\ud8" if "ud8" in json.dumps(body) else "\\udf")
        assert server.client.get("/health").status_code == 200
    finally:
        server.stop()


def test_the_api_key_guards_every_v1_route(setup):  # noqa: F811
    server = Running(setup, server_kwargs=dict(api_key="s3cret"))
    try:
        c = server.client
        body = {"model": "math", "prompt": "x", "max_tokens": 2}
        calls = [("GET", "/v1/models", None), ("POST", "/v1/completions", body),
                 ("POST", "/v1/chat/completions", {"model": "math", "messages": [{"role": "user", "content": "x"}]}),
                 ("POST", "/v1/adapters", {"name": "p", "path": "poems"}), ("DELETE", "/v1/adapters/math", None),
                 ("GET", "/v1/unknown", None)]
        for headers, words in (({}, "no API key"), ({"Authorization": "Bearer wrong"}, "wrong"),
                               ({"Authorization": "s3cret"}, "wrong"), ({"Authorization": "Basic s3cret"}, "wrong")):
            for method, path, json_body in calls:
                r = c.request(method, path, json=json_body, headers=headers)
                error = _error(r, 401, words, "Authorization: Bearer")
                assert error["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert "math" in server.engine.adapters() and "p" not in server.engine.adapters()
        assert c.get("/health").status_code == 200  # probes need no key
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).status_code == 200
        r = c.post("/v1/completions", json=body, headers=good)
        assert r.status_code == 200, r.text
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=good) as s:
            assert s.status_code == 200 and list(s.iter_lines())[-2] == "data: [DONE]"
    finally:
        server.stop()

