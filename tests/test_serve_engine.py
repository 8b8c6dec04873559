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


def _count_projections(adapters, calls: list, label: str) -> None:
    """Make each of ``adapters`` (LayerAdapters) append ``label`` to ``calls`` whenever it projects its prompt."""
    for adapter in adapters:
        def counted(attn, prompt, inner=adapter._project):
            calls.append(label)
            return inner(attn, prompt)

        adapter._project = counted


def test_rows_joining_and_leaving_never_project_the_running_rows_prompts_again(folders):
    """The engine rebuilds its KV cache whenever a row joins or leaves; the prompt keys/values the rows' adapters
    projected at their prefill go with it (zinit.bank.carry_prompts). So only a prefill projects (each adapter of
    its requests once per layer), never a decoding step, not even the first one after the batch changed; answers
    stay those of each adapter alone; and an adapter no running row uses any more leaves the cache's kept prompts."""
    engine = _served(folders, max_batch=8)
    layers = {name: zinit.bank.named_adapter_layers(engine.model, name) for name in SPECS}
    calls = []
    for name, adapters in layers.items():
        _count_projections(adapters.values(), calls, name)
    plan = {0: [(PROMPTS[0], "a", 7), (PROMPTS[1], "b", 3)], 2: [(PROMPTS[2], "a", 6), (PROMPTS[1], None, 5)],
            4: [(PROMPTS[3], "b", 2)], 5: [(PROMPTS[3], "a", 2)]}
    sinks, step, shrank = [], 0, 0
    while plan or engine.running():
        arriving = plan.pop(step, [])
        for prompt, adapter, n in arriving:
            request, sink = _request(prompt, adapter, n)
            engine.submit(request)
            sinks.append((prompt, adapter, n, sink))
        before, rows = len(calls), engine.running() + len(arriving)
        engine.step()
        shrank += engine.running() < rows
        admitted = {adapter for _, adapter, _ in arriving if adapter is not None}
        assert sorted(calls[before:]) == sorted(n for n in admitted for _ in layers[n]), step
        batch = engine._batch
        if batch is not None:
            kept = getattr(batch.cache, "_zinit_prompt_kv", {})
            running = {r.adapter for r in batch.rows}
            for name, adapters in layers.items():
                held = [a in kept for a in adapters.values()]
                assert all(held) if name in running else not any(held), (step, name)
        step += 1
    assert shrank >= 4 and len(calls) == 3 * 2 + 2 * 2  # "a" admitted 3 times, "b" twice, 2 layers each
    for prompt, adapter, n, sink in sinks:
        assert sink.reason == "length" and sink.tokens == _solo(folders, adapter, prompt, n), adapter


def test_an_injected_adapters_prompts_are_carried_when_rows_join_and_leave(folders):
    """A model served with its one injected adapter (zinit.load_adapter: every row uses it, requests name none):
    the prompts its prefills projected go with each rebuilt KV cache as a named adapter's do, so no decoding step
    projects them again, and every answer is generate()'s with that adapter."""
    model = zinit.load_adapter(tiny_llama(), folders["b"])
    engine = Engine(model, eos_token_ids=[], max_batch=8)
    adapters = [m._modules["zinit_adapter"] for m in zinit.find_backbone(model).attention_modules(model)
                if "zinit_adapter" in m._modules]
    assert len(adapters) == 2
    calls = []
    _count_projections(adapters, calls, "injected")
    plan = {0: [(PROMPTS[0], 7), (PROMPTS[1], 2)], 3: [(PROMPTS[2], 5)], 4: [(PROMPTS[3], 1)]}
    sinks, step, shrank = [], 0, 0
    while plan or engine.running():
        arriving = plan.pop(step, [])
        for prompt, n in arriving:
            request, sink = _request(prompt, None, n)
            engine.submit(request)
            sinks.append((prompt, n, sink))
        before, rows = len(calls), engine.running() + len(arriving)
        engine.step()
        shrank += engine.running() < rows
        assert len(calls) - before == (len(adapters) if arriving else 0), step
        step += 1
    assert shrank >= 3 and len(calls) == 3 * len(adapters)
    for prompt, n, sink in sinks:
        assert sink.reason == "length" and sink.tokens == _solo(folders, "b", prompt, n)


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


# ---------------------------------------------------------------------- isolation (issue 26, section 1)

def test_a_row_whose_own_sampling_raises_fails_alone_and_the_batch_goes_on(folders):
    """A seed torch cannot take (2**64) raises in that row's sampling at the prefill it shares with a greedy row;
    only that row fails."""
    engine = _served(folders)
    good, good_sink = _request(PROMPTS[0], "a", 6)
    bad, bad_sink = _request(PROMPTS[1], "b", 6, temperature=1.0, seed=2 ** 64)
    engine.submit(good)
    engine.submit(bad)  # admitted together: one prefill, then per-row sampling
    while engine.step():
        pass
    assert bad_sink.reason.startswith("error: ") and "Overflow" in bad_sink.reason and bad_sink.tokens == []
    assert good_sink.reason == "length" and good_sink.tokens == _solo(folders, "a", PROMPTS[0], 6)


def test_a_row_failing_mid_decode_fails_alone(folders, monkeypatch):
    """A row whose sampling raises at its third token (forced) fails with its error; the other row of the batch
    decodes on, token for token what it gets alone."""
    from zinit.serve import engine as engine_module

    engine = _served(folders)
    good, good_sink = _request(PROMPTS[2], "a", 7)
    bad, bad_sink = _request(PROMPTS[3], "b", 7)
    real = engine_module.sample

    def sample(logits, request):
        if request is bad and len(request.generated) == 2:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, request)

    monkeypatch.setattr(engine_module, "sample", sample)
    engine.submit(good)
    engine.submit(bad)
    while engine.step():
        pass
    assert bad_sink.reason == "error: RuntimeError: probability tensor contains either inf, nan or element < 0"
    assert bad_sink.tokens == _solo(folders, "b", PROMPTS[3], 2)
    assert good_sink.reason == "length" and good_sink.tokens == _solo(folders, "a", PROMPTS[2], 7)


def test_values_that_overflow_mean_greedy_in_the_engine_too(folders):
    """A temperature near 1e-38 or top_p 0 is greedy (as vLLM), not a division that overflows."""
    engine = _served(folders)
    sinks = []
    for kwargs in (dict(temperature=1e-38), dict(temperature=0.7, top_p=0.0)):
        request, sink = _request(PROMPTS[0], "a", 5, **kwargs)
        engine.submit(request)
        sinks.append(sink)
    while engine.step():
        pass
    for sink in sinks:
        assert sink.reason == "length" and sink.tokens == _solo(folders, "a", PROMPTS[0], 5)


def test_sampling_never_touches_torchs_global_generator(folders):
    engine = _served(folders)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    unseeded, unseeded_sink = _request(PROMPTS[0], "a", 6, temperature=1.0)
    seeded = [_request(PROMPTS[1], "b", 6, temperature=1.0, seed=7) for _ in range(2)]
    engine.submit(unseeded)
    for request, _ in seeded:
        engine.submit(request)
    while engine.step():
        pass
    assert unseeded_sink.reason == "length" and len(unseeded_sink.tokens) == 6
    assert torch.equal(torch.get_rng_state(), before)  # torch.seed() would have reseeded it
    assert seeded[0][1].tokens == seeded[1][1].tokens  # a seed still makes a request reproducible


class _WatchedLock:
    """The engine's lock, telling the test when another thread has to wait for it (``contended``)."""

    def __init__(self, contended):
        self.cond, self.contended = threading.Condition(), contended

    def __enter__(self):
        if not self.cond.acquire(blocking=False):
            self.contended.set()
            self.cond.acquire()
        return self

    def __exit__(self, *exc):
        self.cond.release()

    def notify(self):
        self.cond.notify()

    def wait(self, timeout=None):
        return self.cond.wait(timeout)


def test_a_removal_between_the_adapter_check_and_the_enqueue_cannot_strand_a_request(folders, monkeypatch):
    """Forced interleaving: a DELETE of the adapter runs (on another thread) right after submit has checked the
    adapter, before it queues the request. Either the removal waits and is refused ("in use"), or the request is
    refused: never a queued request whose adapter is gone (which used to be answered by the base model)."""
    engine = _served(folders)
    request, sink = _request(PROMPTS[0], "a", 5)
    progressed = threading.Event()  # the removal finished, or is waiting for the lock submit holds
    engine._lock = _WatchedLock(progressed)
    removal = {}

    def remove():
        try:
            engine.remove_adapter("a")
            removal["result"] = "removed"
        except RuntimeError as exc:
            removal["result"] = str(exc)
        finally:
            progressed.set()

    real_adapters = engine.adapters
    hooked = []

    def adapters():
        names = real_adapters()
        if not hooked and threading.current_thread() is threading.main_thread():  # the check inside submit
            hooked.append(True)
            helper = threading.Thread(target=remove)
            helper.start()
            hooked.append(helper)
            assert progressed.wait(60)
        return names

    monkeypatch.setattr(engine, "adapters", adapters)
    try:
        engine.submit(request)
        accepted = True
    except KeyError:
        accepted = False
    hooked[1].join(60)
    monkeypatch.setattr(engine, "adapters", real_adapters)
    while engine.step():
        pass
    assert hooked, "submit no longer checks the adapter through Engine.adapters(): move the hook"
    if accepted:
        assert "in use" in removal["result"] and "a" in engine.adapters()
        assert sink.reason == "length" and sink.tokens == _solo(folders, "a", PROMPTS[0], 5)
    else:
        assert removal["result"] == "removed" and sink.reason is None


def test_a_row_whose_adapter_is_gone_fails_with_a_clear_error(folders):
    """An adapter removed behind the engine's back (zinit.remove_adapter on its model): its queued and running rows
    fail naming it; they are never answered by the base model."""
    engine = _served(folders)
    running, running_sink = _request(PROMPTS[0], "a", 6)
    other, other_sink = _request(PROMPTS[2], "b", 6)
    engine.submit(running)
    engine.submit(other)
    engine.step()
    queued, queued_sink = _request(PROMPTS[1], "a", 4)
    engine.submit(queued)
    zinit.remove_adapter(engine.model, "a")
    while engine.step():
        pass
    for sink in (running_sink, queued_sink):
        assert sink.reason.startswith("error: ") and "'a'" in sink.reason and "unloaded" in sink.reason
    assert len(running_sink.tokens) == 2 and queued_sink.tokens == []
    assert other_sink.reason == "length" and other_sink.tokens == _solo(folders, "b", PROMPTS[2], 6)


def test_an_adapter_is_read_off_the_engine_thread_and_decoding_goes_on_meanwhile(folders, monkeypatch):
    """The file read (and its checks) runs on the caller's thread: while it is held, the engine finishes a request;
    only the swap runs between steps."""
    import zinit.io

    want = _solo(folders, "a", PROMPTS[0], 4)
    engine = _served(folders).start()
    entered, release = threading.Event(), threading.Event()
    readers = []
    real = zinit.io.read_adapter

    def read_adapter(*args, **kwargs):
        readers.append(threading.current_thread().name)
        entered.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(zinit.io, "read_adapter", read_adapter)
    errors = []

    def load():
        try:
            engine.add_adapter("a2", str(folders["a"]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    loader = threading.Thread(target=load, name="loader")
    try:
        loader.start()
        assert entered.wait(60)
        assert readers == ["loader"]  # not "zinit-engine"
        done = threading.Event()
        sink = Collect()

        def on_token(token, reason):
            sink(token, reason)
            if reason is not None:
                done.set()

        engine.submit(Request(PROMPTS[0], "a", max_tokens=4, on_token=on_token))
        assert done.wait(60), "the engine stalled while an adapter file was being read"
        assert sink.tokens == want
    finally:
        release.set()
        loader.join(60)
        engine.stop()
    assert not errors and "a2" in engine.adapters()


# ---------------------------------------------------------------------- log-probabilities

def test_logprobs_of_generated_and_prompt_tokens_are_the_models(folders):
    """Rows of different adapters and prompt lengths (left padding) in one batch: each generated token's
    log-probability and top-k, and each prompt token's, are those of a plain forward of that row alone."""
    engine = _served(folders)
    asked = [(PROMPTS[0], "a", 5), (PROMPTS[2], "b", 4), (PROMPTS[3], None, 3)]
    requests = []
    for prompt, adapter, n in asked:
        request, _ = _request(prompt, adapter, n, logprobs=3, prompt_logprobs=2)
        engine.submit(request)
        requests.append(request)
    plain, _ = _request(PROMPTS[1], "a", 3)  # asks for none: computes none
    engine.submit(plain)
    while engine.step():
        pass
    assert plain.token_logprobs == [] and plain.prompt_token_logprobs is None
    for (prompt, adapter, n), request in zip(asked, requests):
        model = tiny_llama() if adapter is None else zinit.load_adapter(tiny_llama(), folders[adapter])
        ids = torch.tensor([prompt + request.generated])
        with torch.no_grad():
            want = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        assert len(request.token_logprobs) == n and len(request.prompt_token_logprobs) == len(prompt)
        assert request.prompt_token_logprobs[0] is None
        for t, token in enumerate(prompt + request.generated):
            if t == 0:
                continue
            entry = request.prompt_token_logprobs[t] if t < len(prompt) else request.token_logprobs[t - len(prompt)]
            value, top = entry
            assert abs(value - float(want[t - 1, token])) < 1e-4
            k = 2 if t < len(prompt) else 3
            best = want[t - 1].topk(k)
            assert [i for i, _ in top] == best.indices.tolist()
            assert max(abs(v - float(b)) for (_, v), b in zip(top, best.values)) < 1e-4


def test_max_tokens_0_scores_the_prompt_only(folders):
    engine = _served(folders)
    request, sink = _request(PROMPTS[0], "a", 0, prompt_logprobs=0)
    engine.submit(request)
    while engine.step():
        pass
    assert sink.reason == "length" and sink.tokens == [] and len(request.prompt_token_logprobs) == len(PROMPTS[0])
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(_request(PROMPTS[0], "a", 0)[0])


def test_a_prefill_projects_only_the_last_positions_logits_unless_a_row_scores_its_prompt(folders, monkeypatch):
    """The vocabulary projection of every prompt position costs more than the rest of a small model's prefill: the
    engine asks for the last position's logits only (``logits_to_keep=1``), and for all of them when a row of the
    admitted group wants its prompt's log-probabilities; the answers are the same either way."""
    engine = _served(folders)
    seen = []
    forward = engine.model.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs["input_ids"].shape[1] > 1:  # a prefill
            seen.append((kwargs.get("logits_to_keep"), tuple(out.logits.shape[:2])))
        return out

    monkeypatch.setattr(engine.model, "forward", spy)
    plain, plain_sink = _request([5, 6, 7, 8], "a", 3)
    engine.submit(plain)
    while engine.step():
        pass
    scored, scored_sink = _request([5, 6, 7, 8], "a", 3, prompt_logprobs=2)
    other, other_sink = _request([9, 10, 11], "b", 3)
    engine.submit(scored)
    engine.submit(other)
    while engine.step():
        pass
    assert seen == [(1, (1, 1)), (None, (2, 4))]
    assert plain_sink.tokens == scored_sink.tokens == _solo(folders, "a", [5, 6, 7, 8], 3)
    assert other_sink.tokens == _solo(folders, "b", [9, 10, 11], 3)
    assert len(scored.prompt_token_logprobs) == 4
