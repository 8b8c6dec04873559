"""A real client that nobody here wrote (issue 26, section 4): EleutherAI's lm-evaluation-harness (PyPI ``lm-eval``)
scores zinit serve, through its ``local-completions`` model, exactly as it scores the same adapter-loaded model
in-process through its ``hf`` model.

Tasks are local YAML + JSON files (``tests/lm_eval_tasks``: a multiple-choice task scored by loglikelihood, acc and
acc_norm; a generate_until task, greedy, stopping at a newline, scored by exact_match), plus three written here: two
from the model's own greedy answers (a loglikelihood task whose continuations are and are not the greedy ones:
lm-eval's ``is_greedy``, read from ``top_logprobs``; a generate_until task whose stop sequence spans two tokens) and
a loglikelihood_rolling (perplexity) task. lm-eval sends the prompts as token ids one at a time, then as text,
several per request, two requests at once. Nothing is fetched from the Hub: offline mode is on, and any
connection to a non-loopback address fails the test.

The adapter's gates are open, and its scores differ from the base model's: a server that answered with the base
model, mis-scored a token, returned a wrong top token or ignored a stop sequence would fail. The same task files
run from the command line against a ``zinit serve`` process, from the repository root:
``lm_eval --model local-completions --model_args model=NAME,base_url=http://localhost:8000/v1/completions,``
``tokenizer=MODEL_FOLDER,tokenizer_backend=huggingface --tasks zinit_mc,zinit_gen --include_path tests/lm_eval_tasks``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import zinit  # noqa: E402
from test_serve_http import Running, setup  # noqa: E402,F401 - setup is a fixture

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lmeval]'")
for _api_dependency in ("tenacity", "aiohttp", "requests"):  # what lm-eval[api] adds: its API models need them
    pytest.importorskip(_api_dependency, reason="lm-eval's API models need lm-eval[api]: pip install -e '.[lmeval]'")

HFLM = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval's hf model needs lm-eval[hf]").HFLM
import lm_eval.evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from zinit import lm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tests" / "lm_eval_tasks"  # their data_files are relative to the repository root (the README's cwd)
MAX_LENGTH = 512  # the context zinit serve is given by Running, and lm-eval's max_length for both models
QUESTIONS = ["Q: Write the word cat backwards.\nA:", "Q: Say yes.\nA:", "Q: Name a color.\nA:",
             "Q: What is two plus two?\nA:"]


def _loopback(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    return host in (None, "", "localhost", "::1") or (isinstance(host, str) and host.startswith("127."))


def _no_network(mp: pytest.MonkeyPatch, attempts: list) -> None:
    """Any name lookup or connection outside loopback is refused and recorded (HF offline mode should already keep
    datasets, transformers and the hub client from trying)."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            attempts.append(("getaddrinfo", host))
            raise OSError(f"test_serve_lm_eval: no network (a lookup of {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            attempts.append(("connect", address))
            raise OSError(f"test_serve_lm_eval: no network (a connection to {address!r})")
        return real_connect(sock, address)

    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    mp.setattr(socket.socket, "connect", connect)


@contextlib.contextmanager
def _kept_rng():
    """simple_evaluate seeds Python's, numpy's and torch's global generators: give the other tests theirs back."""
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


def _offline_harness(mp: pytest.MonkeyPatch, cache: Path, attempts: list) -> None:
    """What every lm-eval run here runs in: the repository root as the working directory (the task files' data
    paths), Hugging Face offline, a fresh datasets cache, and no network but loopback."""
    import datasets
    import huggingface_hub

    mp.chdir(REPO)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    mp.setattr(lm_eval.evaluator, "add_env_info", lambda storage: None)  # `pip list` & co: seconds, unused here
    _no_network(mp, attempts)


def _write_task(folder: Path, name: str, docs: list[dict], **config) -> None:
    """A task of lm-eval in ``folder``: its YAML and its JSON data file (an absolute path: no cwd dependence)."""
    data = folder / f"{name}.json"
    data.write_text(json.dumps(docs))
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data))}", "test_split: test", "metadata:", "  version: 1.0"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _derived_tasks(folder: Path, model, tokenizer) -> dict:
    """Tasks written in ``folder``. Two are made from the adapter model's own greedy answers (so they hold for any
    random weights): ``zinit_greedy`` (loglikelihood; a continuation that is the greedy one and one whose last
    character is not) and ``zinit_stop`` (generate_until; the stop sequence is two characters from inside the first
    greedy answer, and that answer cut before it is the first document's target, so exact_match is not 0). The
    third, ``zinit_rolling``, is loglikelihood_rolling (perplexity, as wikitext)."""
    special = set(tokenizer.all_special_ids)
    docs, expected = [], []
    for prompt in QUESTIONS:
        ids = _greedy(model, tokenizer, prompt, 4)
        if special & set(ids):
            continue
        text = tokenizer.decode(ids)
        other = next(c for c in "qzjx" if c != text[-1])
        docs += [{"context": prompt, "continuation": text}, {"context": prompt, "continuation": text[:-1] + other}]
        expected += [True, False]
    assert len(docs) >= 4, "too few greedy answers without special tokens to build zinit_greedy"
    _write_task(folder, "zinit_greedy", docs, output_type="loglikelihood", doc_to_text="{{context}}",
                doc_to_target="{{continuation}}", target_delimiter="",
                metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    first = tokenizer.decode(_greedy(model, tokenizer, QUESTIONS[0], 12), skip_special_tokens=True)
    cut = next((i for i in range(2, len(first) - 2) if first.find(first[i:i + 2]) == i), None)
    assert cut is not None, f"no two-character stop sequence inside {first!r}"
    stop = first[cut:cut + 2]
    docs = [{"question": q, "answer": first[:cut] if i == 0 else "no"} for i, q in enumerate(QUESTIONS)]
    _write_task(folder, "zinit_stop", docs, output_type="generate_until", doc_to_text="{{question}}",
                doc_to_target="{{answer}}",
                generation_kwargs={"until": [stop, "\n"], "max_gen_toks": 12, "do_sample": False, "temperature": 0},
                metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    texts = ["The sky is blue and the grass is green.", "Bees make honey.", "A cat has four legs, a bird has two."]
    _write_task(folder, "zinit_rolling", [{"text": t} for t in texts], output_type="loglikelihood_rolling",
                doc_to_text="", doc_to_target="{{text}}")  # its metrics: word and byte perplexity, bits per byte
    return {"greedy": expected, "first": first, "cut": cut, "stop": stop}


TASK_NAMES = ["zinit_mc", "zinit_gen", "zinit_greedy", "zinit_stop", "zinit_rolling"]
SERVED = {  # lm-eval's local-completions model arguments, besides model, base_url, tokenizer and max_length
    "ids": dict(tokenizer_backend="huggingface", num_concurrent=1, max_retries=1),
    # prompts as text, several per request (a list of them), two requests at once (lm-eval's aiohttp path)
    "text-batched-concurrent": dict(tokenizer_backend="huggingface", tokenized_requests=False, batch_size=3,
                                    num_concurrent=2, max_retries=1),
}


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """lm-eval's results (with every sample) for: the hf model with the "math" adapter loaded, the hf model
    without it, and local-completions against zinit serve (model "math") in each way of :data:`SERVED`."""
    folder, adapters = setup
    derived = tmp_path_factory.mktemp("lm_eval_tasks")
    attempts: list = []
    with pytest.MonkeyPatch.context() as mp, _kept_rng():
        _offline_harness(mp, tmp_path_factory.mktemp("hf_datasets"), attempts)
        model, tokenizer = lm.load_model(str(folder), torch.device("cpu"))
        zinit.load_adapter(model, adapters / "math")
        facts = _derived_tasks(derived, model, tokenizer)
        manager = TaskManager(include_path=[str(TASKS), str(derived)], include_defaults=False)

        def evaluate(model_, **kwargs):
            return lm_eval.simple_evaluate(model=model_, tasks=TASK_NAMES, task_manager=manager, log_samples=True,
                                           **kwargs)

        def hf(m, tok):
            return evaluate(HFLM(pretrained=m, tokenizer=tok, batch_size=1, max_length=MAX_LENGTH, device="cpu"))

        out = {"hf": hf(model, tokenizer)}
        base, base_tokenizer = lm.load_model(str(folder), torch.device("cpu"))
        out["hf-base"] = hf(base, base_tokenizer)
        server = Running(setup)
        try:
            for name, args in SERVED.items():
                out[name] = evaluate("local-completions", model_args=dict(
                    model="math", base_url=f"{server.url}/v1/completions", tokenizer=str(folder),
                    max_length=MAX_LENGTH, **args))
        finally:
            server.stop()
    out["facts"], out["network"] = facts, attempts
    return out


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def _loglikelihoods(results, task):
    """Per document, per choice: (loglikelihood, is_greedy) as lm-eval got them."""
    return [[(float(r[0][0]), bool(r[0][1])) for r in s["resps"]] for s in _samples(results, task)]


def _generations(results, task):
    return [s["resps"][0][0] for s in _samples(results, task)]


def test_nothing_is_fetched_from_the_network(runs):
    assert runs["network"] == []


def test_the_adapter_changes_the_scores_so_the_comparisons_mean_something(runs):
    adapter, base = runs["hf"], runs["hf-base"]
    lls = [ll for doc in _loglikelihoods(adapter, "zinit_mc") for ll, _ in doc]
    base_lls = [ll for doc in _loglikelihoods(base, "zinit_mc") for ll, _ in doc]
    assert max(abs(a - b) for a, b in zip(lls, base_lls)) > 0.5
    assert _generations(adapter, "zinit_gen") != _generations(base, "zinit_gen")
    # zinit_greedy: the greedy continuations are greedy and the others are not, as built
    assert [g for doc in _loglikelihoods(adapter, "zinit_greedy") for _, g in doc] == runs["facts"]["greedy"]
    assert [g for doc in _loglikelihoods(base, "zinit_greedy") for _, g in doc] != runs["facts"]["greedy"]


@pytest.mark.parametrize("served", list(SERVED))
def test_loglikelihood_scores_through_the_server_equal_the_hf_models(runs, served):
    """multiple_choice (acc, acc_norm), loglikelihood (acc = is_greedy, from top_logprobs) and
    loglikelihood_rolling (perplexity: windows that start with the BOS token) tasks: every document's
    loglikelihoods within 1e-4, the same greedy flags, the same accuracies and perplexities."""
    hf, api = runs["hf"], runs[served]
    for task in ("zinit_mc", "zinit_greedy"):
        want, got = _loglikelihoods(hf, task), _loglikelihoods(api, task)
        assert [len(doc) for doc in got] == [len(doc) for doc in want], task
        for i, (w, g) in enumerate(zip(want, got)):
            assert [x[0] for x in g] == pytest.approx([x[0] for x in w], abs=1e-4), (task, i)
            assert [x[1] for x in g] == [x[1] for x in w], (task, i)
    for task, metric in (("zinit_mc", "acc,none"), ("zinit_mc", "acc_norm,none"), ("zinit_greedy", "acc,none")):
        assert api["results"][task][metric] == hf["results"][task][metric], (task, metric)
    assert 0 < hf["results"]["zinit_greedy"]["acc,none"] < 1
    rolling = [[s["resps"][0][0] for s in _samples(r, "zinit_rolling")] for r in (hf, api)]
    assert rolling[1] == pytest.approx(rolling[0], abs=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert api["results"]["zinit_rolling"][metric] == pytest.approx(hf["results"]["zinit_rolling"][metric],
                                                                       rel=1e-5), metric


@pytest.mark.parametrize("served", list(SERVED))
def test_generations_through_the_server_equal_the_hf_models(runs, served):
    """generate_until tasks (greedy, a newline stop, a stop sequence of two tokens): identical generations, the
    same exact_match."""
    hf, api = runs["hf"], runs[served]
    for task in ("zinit_gen", "zinit_stop"):
        assert _generations(api, task) == _generations(hf, task), task
        assert api["results"][task]["exact_match,none"] == hf["results"][task]["exact_match,none"], task
    facts = runs["facts"]
    assert _generations(hf, "zinit_stop")[0] == facts["first"][:facts["cut"]]  # cut before the two-token stop
    assert hf["results"]["zinit_stop"]["exact_match,none"] > 0


def test_a_server_with_an_api_key_takes_the_key_lm_eval_sends(setup, tmp_path, monkeypatch):  # noqa: F811
    """lm-eval's local-completions sends ``Authorization: Bearer $OPENAI_API_KEY``: the variable to set for a
    zinit serve started with --api-key; without it, the 401 stops the run (no retries)."""
    folder, _ = setup
    attempts: list = []
    _offline_harness(monkeypatch, tmp_path, attempts)
    server = Running(setup, server_kwargs={"api_key": "sesame"})
    args = dict(model="math", base_url=f"{server.url}/v1/completions", tokenizer=str(folder), max_length=MAX_LENGTH,
                **SERVED["ids"])
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    try:
        with _kept_rng():
            monkeypatch.delenv("OPENAI_API_KEY", raising=False)
            with pytest.raises(Exception, match="401"):
                lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["zinit_mc"], limit=1,
                                        task_manager=manager)
            monkeypatch.setenv("OPENAI_API_KEY", "sesame")
            out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["zinit_mc"], limit=2,
                                          task_manager=manager)
    finally:
        server.stop()
    assert out["results"]["zinit_mc"]["sample_len"] == 2 and attempts == []
