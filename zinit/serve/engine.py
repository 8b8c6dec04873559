"""The batching engine behind ``zinit serve``: one frozen causal LM, many named adapters, continuous batching.

One thread owns the model. Requests wait in a bounded queue; at every step the engine

1. admits waiting requests into the running batch (up to ``max_batch`` rows, FIFO, at most ``prefill_tokens``
   prompt tokens per step so a burst of long prompts cannot stall the running rows for long), prefills them together
   (left-padded, each row with its own adapter) and merges their KV cache into the running one (the shorter side
   left-padded and masked);
2. decodes one token for every running row in one forward, each row through its own adapter
   (:func:`zinit.use_adapters`: the mixed batch costs about what a batch of one adapter costs);
3. hands each row its token (``on_token``), retires the rows that are finished or cancelled, and trims cache
   columns no row needs any more.

So a request that arrives while a batch runs joins at the next step, never waiting for the batch to drain. Greedy
rows compute what ``model.generate(do_sample=False)`` computes for that request alone with its adapter loaded alone
(tested token for token).

Isolation: a row whose own computation raises (its sampling, its log-probabilities) fails alone with ``"error: ..."``;
the other rows of the batch go on. Only a failure of the shared forward fails the rows of that forward. Sampling never
touches torch's global random generator (each sampled request has a generator of its own, seeded from its ``seed`` or
from the OS).

Adapters: an adapter is read, validated and built on the caller's thread (:meth:`Engine.add_adapter`; the server calls
it from a worker thread), and only swapped in on the engine thread between steps, so a slow or refused load never
stalls decoding. A removal is atomic with :meth:`Engine.submit`: a request is either queued before the removal (which
is then refused: "in use") or refused after it (KeyError); a row whose adapter is gone anyway (removed behind the
engine's back) fails with an error naming it, never silently falls back to the base model.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from collections import deque
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import bank as _bank
from .. import io as _io
from ..errors import ZinitKeyError, ZinitStateError


class QueueFull(RuntimeError):
    """The engine's queue is full; the client should retry later (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The engine is stopping and takes no new requests (HTTP 503)."""


_IDS = itertools.count(1)


@dataclass
class Request:
    """One completion: a prompt (token ids), the adapter to use (None: the base model) and how to sample.

    ``on_token(token, finish_reason)`` is called on the engine thread: once per new token (``finish_reason`` None),
    then once with ``token`` None and the reason (``"stop"``: an end-of-sequence token, ``"length"``: max_tokens,
    ``"cancelled"``, or ``"error: ..."``). It must return quickly (hand the token to another thread).

    Log-probabilities (of the model's distribution, before temperature and top_p) are computed only when asked:
    ``logprobs=k`` appends ``(logprob of the token, [(id, logprob)] of the k most likely)`` to ``token_logprobs`` for
    every generated token (before its ``on_token``); ``prompt_logprobs=k`` fills ``prompt_token_logprobs`` at the
    prefill, one entry per prompt token (None for the first, which nothing predicts). ``max_tokens=0`` is allowed
    with ``prompt_logprobs`` (score the prompt, generate nothing: finishes ``"length"`` after the prefill).
    """

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    on_token: Callable[[int | None, str | None], None]
    temperature: float = 0.0  #: below GREEDY_BELOW (or top_p 0): greedy
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  #: top log-probabilities per generated token (None: none computed)
    prompt_logprobs: int | None = None  #: top log-probabilities per prompt token (None: none computed)
    id: int = field(default_factory=lambda: next(_IDS))
    generated: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_token_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop generating for this request (a client went away); its row leaves the batch at the next step."""
        self.cancelled = True


@dataclass
class _Batch:
    rows: list[Request]
    cache: Any  #: a DynamicCache over the rows, keys/values [B, Hkv, T, d]
    mask: Tensor  #: [B, T] 1 where the cache holds a real token of the row
    last: Tensor  #: [B] the token each row feeds next
    positions: Tensor  #: [B] that token's position id


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ZinitStateError("zinit serve needs transformers' DynamicCache (transformers >= 5)")
    from transformers.cache_utils import DynamicLayer

    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise ZinitStateError(f"zinit serve batches models whose KV cache layers are full-attention DynamicLayer; "
                               f"this model's cache has {type(layer).__name__} (sliding-window or hybrid layers)")
    return layers


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def left_padded(prompts: Sequence[Sequence[int]], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one batch: token ids ``[N, T]`` left-padded with 0 to the longest, and the
    attention mask ``[N, T]`` (1 on each prompt's tokens), as a prefill (the engine's, or ``generate()``) takes them.

    >>> left_padded([[5, 6], [7]])
    (tensor([[5, 6],
            [0, 7]]), tensor([[1, 1],
            [0, 1]]))
    """
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), length, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, length - len(p):] = 1
    return ids, mask


def _left_pad(x: Tensor, length: int, dim: int) -> Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge(model: nn.Module, a: _Batch, b: _Batch) -> _Batch:
    """One batch of the rows of ``a`` then ``b``, their caches left-padded to one length (padding masked); the new
    cache keeps the prompts both loops kept (:func:`zinit.bank.carry_prompts`; ``b``'s, just projected, first)."""
    from transformers import DynamicCache

    length = max(a.mask.shape[1], b.mask.shape[1])
    data = []
    for la, lb in zip(_layers(a.cache), _layers(b.cache)):
        data.append((torch.cat([_left_pad(la.keys, length, 2), _left_pad(lb.keys, length, 2)]),
                     torch.cat([_left_pad(la.values, length, 2), _left_pad(lb.values, length, 2)])))
    mask = torch.cat([_left_pad(a.mask, length, 1), _left_pad(b.mask, length, 1)])
    cache = DynamicCache(ddp_cache_data=data)
    for part in (b, a):
        _bank.carry_prompts(model, part.cache, cache, [r.adapter for r in part.rows])
    return _Batch(a.rows + b.rows, cache, mask, torch.cat([a.last, b.last]), torch.cat([a.positions, b.positions]))


def _keep(model: nn.Module, batch: _Batch, keep: list[int]) -> _Batch:
    """The rows ``keep`` of ``batch``, with cache columns that no kept row uses trimmed from the left; the new cache
    keeps the prompts that the kept rows' adapters kept (:func:`zinit.bank.carry_prompts`)."""
    from transformers import DynamicCache

    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    data = [(layer.keys[index, :, start:], layer.values[index, :, start:]) for layer in _layers(batch.cache)]
    rows = [batch.rows[i] for i in keep]
    cache = DynamicCache(ddp_cache_data=data)
    _bank.carry_prompts(model, batch.cache, cache, [r.adapter for r in rows])
    return _Batch(rows, cache, mask[:, start:], batch.last[index], batch.positions[index])


#: Temperatures below this are greedy (as vLLM's ``_SAMPLING_EPS``): dividing logits by a smaller one overflows.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float, top_p: float) -> bool:
    """Whether a row with these values decodes greedily: a temperature below :data:`GREEDY_BELOW`, or ``top_p`` 0
    (the smallest nucleus: the most likely token)."""
    return temperature < GREEDY_BELOW or top_p <= 0


def sample(logits: Tensor, request: Request) -> int:
    """The next token for one row: argmax when greedy (:func:`is_greedy`), else nucleus sampling (``top_p``) from
    the softmax at ``temperature``, with the request's own generator (seeded from ``seed``, so a seeded request is
    reproducible, or else from the OS; torch's global generator is never used nor reseeded)."""
    if is_greedy(request.temperature, request.top_p):
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    if request._generator is None:
        request._generator = torch.Generator(device=probs.device)
        request._generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
    return int(torch.multinomial(probs, 1, generator=request._generator))


def token_logprobs(logits: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under ``logits`` (one row, the model's distribution) and the ``top`` most
    likely tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        best = list(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token]), best


def _prompt_logprobs(logits: Tensor, prompt: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """One entry per prompt token from the prefill's logits of that row's prompt positions ``[n, V]``: None for the
    first token, then the log-probability of each token given the ones before it (and the ``top`` most likely)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # position t predicts token t + 1
    targets = torch.tensor(prompt[1:], device=logits.device)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [None] + list(zip(chosen, tops))


class Engine:
    """Continuous batching of completions over one model carrying named adapters.

    Args:
        model: a causal LM (frozen); named adapters are added with :meth:`add_adapter` (or before, with
            :func:`zinit.add_adapter`).
        eos_token_ids: tokens that end a completion (``"stop"``).
        max_batch: rows decoded together at most.
        max_queue: requests waiting at most; :meth:`submit` raises :class:`QueueFull` beyond it.
        prefill_tokens: prompt tokens admitted per step at most (at least one request is always admitted).

    >>> import torch, zinit
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> model = zinit.add_adapter(LlamaForCausalLM(cfg).eval(), "a", layers=1, K=4)
    >>> engine = Engine(model, eos_token_ids=[])
    >>> out = []
    >>> engine.submit(Request([5, 6, 7], "a", max_tokens=3,
    ...                       on_token=lambda t, why: out.append(t if why is None else why)))
    >>> while engine.step(): pass
    >>> len(out), out[-1]
    (4, 'length')
    """

    def __init__(self, model: nn.Module, *, eos_token_ids: list[int] | set[int], max_batch: int = 8,
                 max_queue: int = 64, prefill_tokens: int = 2048) -> None:
        if max_batch < 1 or max_queue < 1 or prefill_tokens < 1:
            raise ValueError("max_batch, max_queue and prefill_tokens must be >= 1")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.eos = set(eos_token_ids)
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()  #: guards the queue, and makes submit atomic with adapter removal
        self._retired: set[str] = set()  #: adapters being removed: no request may name them any more
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._batch: _Batch | None = None
        self._route = ExitStack()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  #: decoding steps run (for logs and tests)
        import inspect

        params = inspect.signature(type(model).forward).parameters
        # transformers >= 5.24 names the KV cache argument ``cache`` (``past_key_values`` before)
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # a prefill needs the logits of each row's last position only (unless a row scores its prompt): the vocabulary
        # projection of every prompt position would cost more than the rest of a small model's prefill
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    # ------------------------------------------------------------------ public

    def submit(self, request: Request) -> None:
        """Queue a request; :class:`QueueFull` when ``max_queue`` requests already wait, :class:`ShuttingDown`
        once :meth:`stop` was called, KeyError for an adapter the model does not carry (checked atomically with
        :meth:`remove_adapter`: a request this accepts keeps its adapter until it finishes)."""
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if request.max_tokens < (0 if request.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens must be >= 1 (0 only with prompt_logprobs), got {request.max_tokens}")
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if request.adapter is not None and request.adapter not in self.adapters():
                raise ZinitKeyError(f"no adapter named {request.adapter!r}; loaded: {self.adapters()}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit is {self.max_queue})")
            self._waiting.append(request)
            self._lock.notify()

    def adapters(self) -> list[str]:
        """The names of the adapters requests may use: the model's, but not one being removed."""
        retired = self._retired
        return [name for name in _bank.adapter_names(self.model) if name not in retired]

    def add_adapter(self, name: str, folder: str) -> None:
        """Add a named adapter from a ``save_adapter`` folder (blocks until done; errors are raised here).

        The files are read, validated and the adapter's modules built on the calling thread
        (:func:`zinit.io.prepare_adapter`); only attaching them runs on the engine thread, between steps, so
        running requests never wait for a file."""
        prepared = _io.prepare_adapter(self.model, name, folder)
        self._run_between_steps(lambda: _bank.install_adapter(self.model, prepared))

    def remove_adapter(self, name: str) -> None:
        """Remove a named adapter between steps; refused (RuntimeError) while a queued or running request uses it,
        KeyError when there is none of that name."""
        def remove() -> None:
            with self._lock:  # atomic with submit: no request can be queued for it once this decides
                busy = [r for r in list(self._waiting) + (self._batch.rows if self._batch else [])
                        if r.adapter == name]
                if busy:
                    raise ZinitStateError(f"adapter {name!r} is in use by {len(busy)} request(s); retry when they "
                                       "finish")
                if name not in self.adapters():
                    raise ZinitKeyError(f"no adapter named {name!r}; loaded: {self.adapters()}")
                self._retired.add(name)
            try:
                _bank.remove_adapter(self.model, name)
            finally:
                with self._lock:
                    self._retired.discard(name)
        self._run_between_steps(remove)

    def running(self) -> int:
        """Rows decoding now."""
        batch = self._batch
        return len(batch.rows) if batch else 0

    def waiting(self) -> int:
        """Requests queued and not admitted yet."""
        return len(self._waiting)

    def start(self) -> "Engine":
        """Run :meth:`step` on a thread of its own until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="zinit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 60.0) -> None:
        """Take no new requests, finish the queued and running ones (up to ``timeout`` seconds; then cancel what
        is left), and end the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                for r in list(self._waiting) + (self._batch.rows if self._batch else []):
                    r.cancel()
                self._thread.join(10)

    def step(self) -> bool:
        """One scheduling step (commands, admission and prefill, one decoding step); returns whether there is work
        left. Run by the engine thread; tests call it directly for a deterministic order."""
        self._run_commands()
        self._admit()
        if self._batch is not None:
            self._decode()
        return self._batch is not None or bool(self._waiting)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and self._batch is None and self._commands.empty() and not self._stopping:
                    self._lock.wait(0.05)
                if self._stopping and not self._waiting and self._batch is None:
                    break
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a shared forward failed: its rows get the error
                self._fail_all(f"error: {type(exc).__name__}: {exc}")
        self._run_commands()
        self._route.close()

    def _run_between_steps(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None or not self._thread.is_alive() or threading.current_thread() is self._thread:
            return fn()
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._commands.put((fn, done))
        with self._lock:
            self._lock.notify()
        error = done.get()
        if error is not None:
            raise error
        return None

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
                done.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                done.put(exc)

    def _fail_all(self, reason: str) -> None:
        rows = (self._batch.rows if self._batch else [])
        self._batch = None
        self._route.close()
        for r in rows:
            r.on_token(None, reason)

    def _routing(self, rows: list[Request]):
        if all(r.adapter is None for r in rows):
            return nullcontext() if not _bank.adapter_names(self.model) else _bank.use_adapters(self.model, None)
        return _bank.use_adapters(self.model, [r.adapter for r in rows])  # every name checked by _gone

    def _gone(self, rows: list[Request]) -> dict[int, str]:
        """``{row: error}`` for the rows whose adapter the model no longer carries (removed behind the engine's
        back): they fail with a clear error rather than decode through the base model."""
        names = _bank.adapter_names(self.model)
        return {i: f"error: the adapter {r.adapter!r} of this request was unloaded; loaded now: {names}"
                for i, r in enumerate(rows) if r.adapter is not None and r.adapter not in names}

    def _next_tokens(self, logits: Tensor, rows: list[Request]) -> tuple[list[int], dict[int, str], list[Any]]:
        """Each row's next token from its logits ``[B, V]``, its log-probabilities when it asked for them, and
        ``{row: error}`` for the rows whose own sampling raised (the others are not affected)."""
        tokens: list[int] = []
        failed: dict[int, str] = {}
        extras: list[Any] = []
        for i, r in enumerate(rows):
            try:
                token = sample(logits[i], r)
                extras.append(token_logprobs(logits[i], token, r.logprobs) if r.logprobs is not None else None)
            except Exception as exc:  # noqa: BLE001 - this row's own failure is this row's alone
                failed[i] = f"error: {type(exc).__name__}: {exc}"
                token = 0
                extras.append(None)
            tokens.append(token)
        return tokens, failed, extras

    # ------------------------------------------------------------------ admission and prefill

    def _admit(self) -> None:
        new: list[Request] = []
        budget = self.prefill_tokens
        with self._lock:
            room = self.max_batch - (len(self._batch.rows) if self._batch else 0)
            while self._waiting and len(new) < room:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    request.on_token(None, "cancelled")
                    continue
                if new and len(request.prompt) > budget:
                    break
                budget -= len(request.prompt)
                new.append(self._waiting.popleft())
        gone = self._gone(new)
        for i in gone:
            new[i].on_token(None, gone[i])
        new = [r for i, r in enumerate(new) if i not in gone]
        if not new:
            return
        from transformers import DynamicCache

        ids, mask = left_padded([r.prompt for r in new], self.device)
        length = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = {} if any(r.prompt_logprobs is not None for r in new) else self._last_logits
        try:
            with torch.no_grad(), self._routing(new):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{self._cache_kwarg: DynamicCache()}, **keep)
        except Exception as exc:  # noqa: BLE001 - these requests fail with the reason; the running batch goes on
            for r in new:
                r.on_token(None, f"error: {type(exc).__name__}: {exc}")
            return
        tokens, failed, extras = self._next_tokens(out.logits[:, -1], new)
        for i, r in enumerate(new):
            if r.prompt_logprobs is not None and i not in failed:
                try:
                    r.prompt_token_logprobs = _prompt_logprobs(out.logits[i, length - len(r.prompt):], r.prompt,
                                                               r.prompt_logprobs)
                except Exception as exc:  # noqa: BLE001 - this row's own failure
                    failed[i] = f"error: {type(exc).__name__}: {exc}"
        first = torch.tensor(tokens, device=self.device)
        prefilled = self._emit(_Batch(new, _returned_cache(out), mask, first, positions[:, -1] + 1), failed, extras,
                               prefill=True)
        if prefilled is not None:
            self._batch = prefilled if self._batch is None else _merge(self.model, self._batch, prefilled)
            self._reroute()

    # ------------------------------------------------------------------ decoding

    def _reroute(self) -> None:
        """Enter the adapter choice of the batch's rows, kept open across decoding steps while the rows stay the
        same (so the prompt keys/values the first step projects are reused by the next ones)."""
        self._route.close()
        if self._batch is not None:
            self._route.enter_context(self._routing(self._batch.rows))

    def _decode(self) -> None:
        batch = self._batch
        gone = self._gone(batch.rows)
        if gone:
            for i, reason in gone.items():
                batch.rows[i].on_token(None, reason)
            keep = [i for i in range(len(batch.rows)) if i not in gone]
            self._batch = batch = _keep(self.model, batch, keep) if keep else None
            self._reroute()
            if batch is None:
                return
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        with torch.no_grad():
            out = self.model(input_ids=batch.last[:, None], attention_mask=mask, position_ids=batch.positions[:, None],
                             use_cache=True, **{self._cache_kwarg: batch.cache})
        self.steps += 1
        tokens, failed, extras = self._next_tokens(out.logits[:, -1], batch.rows)
        nxt = torch.tensor(tokens, device=self.device)
        batch.cache, batch.mask, batch.last, batch.positions = _returned_cache(out), mask, nxt, batch.positions + 1
        kept = self._emit(batch, failed, extras)
        if kept is not batch:
            self._batch = kept
            self._reroute()

    def _emit(self, batch: _Batch, failed: dict[int, str], extras: list[Any], prefill: bool = False) -> _Batch | None:
        """Hand each row of ``batch`` its new token (``batch.last``, the one it feeds next) and its
        log-probabilities (``extras``), or its error (``failed``); returns the batch of the rows that go on
        (``batch`` itself when all do, None when none does)."""
        keep = []
        for i, (request, token) in enumerate(zip(batch.rows, batch.last.tolist())):
            if i in failed:
                request.on_token(None, failed[i])
                continue
            if request.cancelled:
                request.on_token(None, "cancelled")
                continue
            if prefill and request.max_tokens == 0:  # only the prompt's log-probabilities were asked for
                request.on_token(None, "length")
                continue
            if token in self.eos:
                request.on_token(None, "stop")
                continue
            request.generated.append(token)
            if extras[i] is not None:
                request.token_logprobs.append(extras[i])
            request.on_token(token, None)
            if len(request.generated) >= request.max_tokens:
                request.on_token(None, "length")
                continue
            keep.append(i)
        if len(keep) == len(batch.rows):
            return batch
        return _keep(self.model, batch, keep) if keep else None
