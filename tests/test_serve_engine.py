"""The continuous-batching engine of zinit serve: requests of different adapters that join a running batch at any
step get, token for token, what greedy generate() gives each alone with its adapter loaded alone."""

from __future__ import annotations

import threading

import pytest
import torch

import zinit
from zinit.serve import Engine, QueueFull, Request, ShuttingDown
from tiny import randomize_adapter, tiny_llama

SPECS = {"a": dict(layers=2, K=3), "b": dict(layers=[0, 2], K=5, gate="layer", gate_fn="identity")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        model = zinit.inject(tiny_llama(), spec["layers"], spec["K"], gate=spec.get("gate", "head"),
                             gate_fn=spec.get("gate_fn", "tanh"))
        randomize_adapter(model, seed=20 + i, scale=0.8)
        out[name] = zinit.save_adapter(model, root / name)
    return out


def _served(folders, **kwargs) -> Engine:
    model = tiny_llama()
    for name, folder in folders.items():
        zinit.add_adapter(model, name, folder)
    return Engine(model, eos_token_ids=[], **kwargs)


def _solo(folders, adapter, prompt, n):
    model = tiny_llama() if adapter is None else zinit.load_adapter(tiny_llama(), folders[adapter])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Collect:
    def __init__(self):
        self.tokens, self.reason = [], None

    def __call__(self, token, reason):
        if reason is None:
            self.tokens.append(token)
        else:
            self.reason = reason


def _request(prompt, adapter, n, **kwargs):
    sink = Collect()
    return Request(prompt, adapter, max_tokens=n, on_token=sink, **kwargs), sink


PROMPTS = [[5, 9, 14, 30, 7, 41], [60, 3, 22], [11, 12, 13, 14, 15, 16, 17, 18, 19], [70, 71]]


def test_requests_joining_a_running_batch_match_greedy_generate_alone(folders):
    engine = _served(folders, max_batch=8)
    plan = [(0, PROMPTS[0], "a", 7), (0, PROMPTS[1], "b", 5), (2, PROMPTS[2], None, 6), (4, PROMPTS[3], "a", 4),
            (4, PROMPTS[1], "a", 3)]
    sinks = []
    step = 0
    while plan or engine.running() or engine.waiting():
        for item in [p for p in plan if p[0] == step]:  # arrivals at this step join the running batch
            request, sink = _request(item[1], item[2], item[3])
            engine.submit(request)
            sinks.append((item, sink))
            plan.remove(item)
        engine.step()
        step += 1
    for (_, prompt, adapter, n), sink in sinks:
        assert sink.reason == "length"
        assert sink.tokens == _solo(folders, adapter, prompt, n), adapter


def test_max_batch_queues_the_rest_and_cancelled_rows_leave_without_disturbing_others(folders):
    engine = _served(folders, max_batch=2)
    r1, s1 = _request(PROMPTS[0], "a", 6)
    r2, s2 = _request(PROMPTS[2], "b", 6)
    r3, s3 = _request(PROMPTS[1], None, 4)
    for r in (r1, r2, r3):
        engine.submit(r)
    engine.step()
    assert engine.running() == 2 and engine.waiting() == 1
    engine.step()
    r2.cancel()  # the client went away
    while engine.step():
        pass
    assert s2.reason == "cancelled" and 1 <= len(s2.tokens) < 6
    assert s1.tokens == _solo(folders, "a", PROMPTS[0], 6)
    assert s3.tokens == _solo(folders, None, PROMPTS[1], 4)


def test_limits_and_errors(folders):
    engine = _served(folders, max_queue=2)
    engine.submit(_request([1, 2], "a", 2)[0])
    engine.submit(_request([1, 2], "a", 2)[0])
    with pytest.raises(QueueFull, match="limit is 2"):
        engine.submit(_request([1, 2], "a", 2)[0])
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        engine.submit(_request([1, 2], "zz", 2)[0])
    with pytest.raises(ValueError, match="empty"):
        engine.submit(_request([], "a", 2)[0])
    with pytest.raises(RuntimeError, match="in use"):
        engine.remove_adapter("a")
    while engine.step():
        pass
    engine.remove_adapter("a")
    assert engine.adapters() == ["b"]
    engine.stop()
    with pytest.raises(ShuttingDown):
        engine.submit(_request([1, 2], "b", 2)[0])


def test_the_engine_thread_serves_concurrent_submitters_and_stop_drains(folders):
    engine = _served(folders).start()
    results = {}
    barrier = threading.Barrier(3)

    def client(i, prompt, adapter, n):
        done = threading.Event()
        sink = Collect()

        def on_token(token, reason):
            sink(token, reason)
            if reason is not None:
                done.set()

        barrier.wait()
        engine.submit(Request(prompt, adapter, max_tokens=n, on_token=on_token))
        assert done.wait(60)
        results[i] = sink

    jobs = [(0, PROMPTS[0], "a", 5), (1, PROMPTS[2], "b", 4), (2, PROMPTS[3], None, 6)]
    threads = [threading.Thread(target=client, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    slow, slow_sink = _request(PROMPTS[1], "b", 8)
    engine.submit(slow)
    engine.add_adapter("a2", str(folders["a"]))  # between steps, while a request runs
    engine.stop()  # finishes the running request first
    assert slow_sink.reason == "length" and slow_sink.tokens == _solo(folders, "b", PROMPTS[1], 8)
    for i, prompt, adapter, n in jobs:
        assert results[i].tokens == _solo(folders, adapter, prompt, n)
    assert "a2" in engine.adapters()


def test_a_failing_prefill_fails_its_requests_and_the_running_batch_goes_on(folders):
    engine = _served(folders)
    ok, ok_sink = _request(PROMPTS[0], "a", 5)
    engine.submit(ok)
    engine.step()
    real = engine.model.forward

    def broken(*args, **kwargs):  # the next prefill (more than one new token) fails, e.g. out of memory
        if kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    engine.model.forward = broken
    bad, bad_sink = _request(PROMPTS[2], "b", 5)
    engine.submit(bad)
    while engine.step():
        pass
    assert bad_sink.reason == "error: RuntimeError: out of memory" and bad_sink.tokens == []
    assert ok_sink.reason == "length" and ok_sink.tokens == _solo(folders, "a", PROMPTS[0], 5)
