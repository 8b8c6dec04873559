"""zinit serve speaks the OpenAI API where clients rely on it (issue 26, section 4): stop sequences spanning several
tokens never leak, every field is type-checked and what is not implemented is refused naming it, logprobs (and echo)
are the model's own, as evaluation harnesses read them, and a chat template that refuses the messages is a 400."""

from __future__ import annotations

import json

import pytest
import torch

import zinit
from test_serve_http import Running, _ids, _solo, openai_error, setup  # noqa: F401 - setup is a fixture

httpx = pytest.importorskip("httpx")

from zinit import lm  # noqa: E402


@pytest.fixture(scope="module")
def running(setup):  # noqa: F811 - the fixture imported above
    server = Running(setup)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(setup):  # noqa: F811
    """The "math" adapter loaded alone: log-probabilities of a plain forward."""
    folder, adapters = setup
    model, _ = lm.load_model(str(folder), torch.device("cpu"))
    zinit.load_adapter(model, adapters / "math")

    def logprobs(ids):
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return logprobs


def _error(r, status, param, *words):
    error = openai_error(r, status, *words)
    assert error["param"] == param, error
    return error


def _streamed(client, path, body):
    with client.stream("POST", path, json={**body, "stream": True}) as s:
        assert s.status_code == 200
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# ---------------------------------------------------------------------- stop sequences

def test_a_stop_sequence_spanning_several_tokens_never_leaks(running):
    c = running.client
    base = {"model": "math", "prompt": "The sky is", "max_tokens": 24, "temperature": 0}
    full = c.post("/v1/completions", json=base).json()["choices"][0]["text"]
    assert len(full) >= 6
    i = next(i for i in range(2, len(full) - 2) if full.find(full[i:i + 3]) == i)
    stop = full[i:i + 3]  # three tokens of the char tokenizer
    cases = [(stop, full[:i], "stop"), ([stop, "\u2603\u2603"], full[:i], "stop"),
             (full[-2:] + "\u2603", full, None)]  # a stop that starts at the end and never completes: all sent
    for stops, want, reason in cases:
        body = {**base, "stop": stops}
        choice = c.post("/v1/completions", json=body).json()["choices"][0]
        assert choice["text"] == want, (stops, choice)
        chunks = _streamed(c, "/v1/completions", body)
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == want, stops
        assert chunks[-1]["choices"][0]["finish_reason"] == (reason or choice["finish_reason"])
    messages = [{"role": "user", "content": "Hi"}]
    answer = c.post("/v1/chat/completions", json={"model": "math", "messages": messages, "max_tokens": 16,
                                                  "temperature": 0}).json()["choices"][0]["message"]["content"]
    j = next(j for j in range(2, len(answer) - 2) if answer.find(answer[j:j + 2]) == j)
    body = {"model": "math", "messages": messages, "max_tokens": 16, "temperature": 0, "stop": answer[j:j + 2]}
    assert c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == answer[:j]
    chunks = _streamed(c, "/v1/chat/completions", body)
    assert "".join(ch["choices"][0]["delta"]["content"] for ch in chunks) == answer[:j]


# ---------------------------------------------------------------------- fields

def test_every_field_is_type_checked_and_unsupported_ones_are_refused_by_name(running):
    c = running.client
    ok = {"model": "math", "prompt": "x", "max_tokens": 2}
    chat = {"model": "math", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for extra in ({"n": None}, {"n": 1}, {"stream": None}, {"stream": False}, {"echo": None}, {"logprobs": None},
                  {"presence_penalty": 0}, {"frequency_penalty": 0.0}, {"logit_bias": {}}, {"user": "me"},
                  {"best_of": 1}, {"suffix": None}, {"stop": None}, {"seed": None}, {"temperature": None},
                  {"max_completion_tokens": 2}):
        r = c.post("/v1/completions", json={**ok, **extra})
        assert r.status_code == 200, (extra, r.text)
    for extra in ({"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
                  {"logprobs": False}, {"top_logprobs": None}, {"metadata": {"a": "b"}}):
        r = c.post("/v1/chat/completions", json={**chat, **extra})
        assert r.status_code == 200, (extra, r.text)
    refused = [("/v1/completions", ok, "n", 2), ("/v1/completions", ok, "n", "1"), ("/v1/completions", ok, "n", True),
               ("/v1/completions", ok, "stream", "no"), ("/v1/completions", ok, "stream", 1),
               ("/v1/completions", ok, "echo", "yes"), ("/v1/completions", ok, "logprobs", True),
               ("/v1/completions", ok, "logprobs", 21), ("/v1/completions", ok, "logprobs", -1),
               ("/v1/completions", ok, "max_tokens", "5"), ("/v1/completions", ok, "max_tokens", 0),
               ("/v1/completions", ok, "temperature", "hot"), ("/v1/completions", ok, "top_p", 1.5),
               ("/v1/completions", ok, "stop", ["a"] * 17), ("/v1/completions", ok, "stop", [""]),
               ("/v1/completions", ok, "presence_penalty", 0.5), ("/v1/completions", ok, "frequency_penalty", 1),
               ("/v1/completions", ok, "logit_bias", {"5": 10}), ("/v1/completions", ok, "best_of", 3),
               ("/v1/completions", ok, "suffix", "end"), ("/v1/completions", ok, "top_k", 40),
               ("/v1/completions", ok, "messages", []), ("/v1/completions", ok, "stream_options", {}),
               ("/v1/chat/completions", chat, "echo", True), ("/v1/chat/completions", chat, "logprobs", 1),
               ("/v1/chat/completions", chat, "top_logprobs", 3), ("/v1/chat/completions", chat, "prompt", "x"),
               ("/v1/chat/completions", chat, "tools", [{"type": "function", "function": {"name": "f"}}]),
               ("/v1/chat/completions", chat, "response_format", {"type": "json_object"}),
               ("/v1/chat/completions", chat, "store", True), ("/v1/chat/completions", chat, "repetition_penalty", 1.1)]
    for path, body, key, value in refused:
        r = c.post(path, json={**body, key: value})
        _error(r, 400, key, f"'{key}'")
    _error(c.post("/v1/chat/completions", json={**chat, "top_logprobs": 3, "logprobs": False}), 400, "top_logprobs",
           "logprobs")
    r = c.post("/v1/completions", content=b'{"model": "math", "prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
    # unsupported parameters are named, with their value and the fix
    message = c.post("/v1/completions", json={**ok, "best_of": 3}).json()["error"]["message"]
    assert "'best_of' is not supported" in message and "remove it" in message


def test_prompts_as_token_ids_and_lists_and_content_parts(running, setup):  # noqa: F811
    c = running.client
    ids = _ids(running, "The sky is")
    want = _solo(setup, "math", ids, 6)
    for prompt in ("The sky is", ids, [ids]):
        r = c.post("/v1/completions", json={"model": "math", "prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, prompt
    r = c.post("/v1/completions", json={"model": "math", "prompt": ["The sky is", _ids(running, "Roses")],
                                        "max_tokens": 6, "temperature": 0})
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    assert [ch["text"] for ch in body["choices"]] == [want, _solo(setup, "math", _ids(running, "Roses"), 6)]
    assert body["usage"]["prompt_tokens"] == len(ids) + len(_ids(running, "Roses"))
    for bad in ([], [[]], [ids, 3], [-1], [running.server.vocab], "", [""], {"text": "x"}):
        _error(c.post("/v1/completions", json={"model": "math", "prompt": bad}), 400, "prompt")
    _error(c.post("/v1/completions", json={"model": "math", "prompt": ["a", "b"], "stream": True}), 400, "prompt",
           "one prompt at a time")
    plain = [{"role": "user", "content": "Hi there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    a = c.post("/v1/chat/completions", json={"model": "math", "messages": plain, "max_tokens": 5, "temperature": 0})
    b = c.post("/v1/chat/completions", json={"model": "math", "messages": parts, "max_tokens": 5, "temperature": 0})
    assert a.status_code == b.status_code == 200
    joined = c.post("/v1/chat/completions", json={"model": "math", "max_tokens": 5, "temperature": 0,
                                                  "messages": [{"role": "user", "content": "Hi\nthere"}]})
    assert b.json()["choices"][0]["message"] == joined.json()["choices"][0]["message"]
    _error(c.post("/v1/chat/completions", json={"model": "math", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages", "text")


def test_a_chat_template_that_raises_is_a_400(running, monkeypatch):
    template = ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(running.tokenizer, "chat_template", template)
    messages = [{"role": "assistant", "content": "first"}]
    _error(running.client.post("/v1/chat/completions", json={"model": "math", "messages": messages}), 400,
           "messages", "roles must alternate")
    r = running.client.post("/v1/chat/completions", json={"model": "math", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- logprobs

def test_completion_logprobs_are_the_models(running, reference):
    c = running.client
    prompt = _ids(running, "The sky is")
    body = {"model": "math", "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    choice = c.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    generated = running.tokenizer.convert_tokens_to_ids(lp["tokens"])  # the char tokenizer: one per character
    assert running.tokenizer.decode(generated, skip_special_tokens=True) == choice["text"]
    assert len(generated) == c.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]
    want = reference(prompt + generated)
    for t, (token, value, top) in enumerate(zip(generated, lp["token_logprobs"], lp["top_logprobs"])):
        row = want[len(prompt) - 1 + t]
        assert abs(value - float(row[token])) < 1e-4
        best = row.topk(2)
        assert set(top) == {running.server.token_text(i) for i in best.indices.tolist()}  # greedy: chosen is best
        assert max(top, key=top.get) == lp["tokens"][t]
    lengths = [len(token) for token in lp["tokens"]]
    assert lp["text_offset"] == [sum(lengths[:t]) for t in range(len(generated))]
    # streamed: the same tokens and values, chunk by chunk
    chunks = _streamed(c, "/v1/completions", body)
    streamed = [ch["choices"][0]["logprobs"] for ch in chunks if ch["choices"][0]["logprobs"]]
    assert sum((s["tokens"] for s in streamed), []) == lp["tokens"]
    assert sum((s["token_logprobs"] for s in streamed), []) == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert sum((s["text_offset"] for s in streamed), []) == lp["text_offset"]


def test_echo_scores_the_prompt_as_loglikelihood_harnesses_ask(running, reference):
    """lm-evaluation-harness's local-completions loglikelihood request: token ids, echo, max_tokens 1,
    logprobs 1, temperature 0; it reads token_logprobs[ctxlen:-1] and whether each top token is the actual one."""
    c = running.client
    context, continuation = _ids(running, "Two and two"), _ids(running, " make four")[1:]
    ids = context + continuation
    body = {"model": "math", "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True,
            "seed": 1234}
    choice = c.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert choice["text"].startswith(running.tokenizer.decode(ids))
    want = reference(ids)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - float(want[t - 1, ids[t]])) < 1e-4
    ctxlen = len(context)
    loglikelihood = sum(lp["token_logprobs"][ctxlen:-1])
    assert loglikelihood == pytest.approx(float(sum(want[t - 1, ids[t]] for t in range(ctxlen, len(ids)))), abs=1e-3)
    pairs = zip(lp["tokens"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1])
    greedy = all(max(top, key=top.get) == tok for tok, top in pairs)
    assert greedy == all(int(want[t - 1].argmax()) == ids[t] for t in range(ctxlen, len(ids)))
    # max_tokens 0 with echo: the prompt scored, nothing generated
    zero = c.post("/v1/completions", json={**body, "max_tokens": 0}).json()
    assert zero["choices"][0]["text"] == running.tokenizer.decode(ids) and zero["usage"]["completion_tokens"] == 0
    assert zero["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:-1], abs=1e-5)
    # echo without logprobs: just the text; streamed: the prompt first
    text = c.post("/v1/completions", json={"model": "math", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                           "echo": True}).json()["choices"][0]
    assert text["text"].startswith("Hi") and text["logprobs"] is None
    chunks = _streamed(c, "/v1/completions", {"model": "math", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                              "echo": True})
    assert chunks[0]["choices"][0]["text"] == "Hi" and "".join(ch["choices"][0]["text"] for ch in chunks) == \
        text["text"]


def test_chat_logprobs_and_top_logprobs(running, reference):
    c = running.client
    messages = [{"role": "user", "content": "Write a line."}]
    body = {"model": "math", "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    choice = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    prompt = running.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    generated = [running.tokenizer.convert_tokens_to_ids(e["token"]) for e in content]
    want = reference(prompt + generated)
    for t, entry in enumerate(content):
        row = want[len(prompt) - 1 + t]
        assert abs(entry["logprob"] - float(row[generated[t]])) < 1e-4
        assert entry["bytes"] == list(entry["token"].encode())
        assert [e["token"] for e in entry["top_logprobs"]] == [running.server.token_text(i)
                                                               for i in row.topk(3).indices.tolist()]
    chunks = _streamed(c, "/v1/chat/completions", body)
    streamed = [e for ch in chunks for e in ch["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)
    plain = c.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_stream_options_include_usage(running):
    body = {"model": "math", "prompt": "Hi", "max_tokens": 4, "temperature": 0}
    chunks = _streamed(running.client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == running.client.post(
        "/v1/completions", json=body).json()["usage"]
    assert all("usage" not in ch for ch in chunks[:-1])
