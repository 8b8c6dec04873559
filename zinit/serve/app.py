"""``zinit serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template), both with
``"stream": true`` as server-sent events; ``GET /v1/models`` (the base model and every adapter: a request's
``model`` names the adapter, or the base model); ``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}`` to load and
unload adapters while serving (only with an adapters folder configured, and only from inside it); ``GET /health``.

Errors use OpenAI's body (``{"error": {"message", "type", "param", "code"}}``), naming the bad value and the fix:
400 for bad JSON, a field of the wrong type or range, an unsupported parameter, a chat template that refuses the
messages, or a prompt too long for the context; 401 for a missing or wrong API key (``api_key``: every ``/v1``
route); 403 for adapter management that is off or outside the folder; 404 for an unknown model or adapter; 413 for a
body over ``max_body_bytes``; 429 when the queue is full; 503 while shutting down; 500 for a failure while
generating (in a stream: an error event, then ``data: [DONE]``).

Isolation: the JSON parsing, validation and tokenization of a request run on a worker thread, never on the event
loop (a huge prompt never stalls the other clients); a non-streaming client that disconnects has its row cancelled at
the next decoding step, as a stream's is. Requests of different adapters are batched together at every decoding step
(:class:`zinit.serve.engine.Engine`), and a row that fails fails alone. On shutdown (SIGINT / SIGTERM) the server
stops taking requests and finishes the running ones. Every request is logged (``zinit.serve``: endpoint, model,
tokens in and out, seconds, status).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from fastapi import FastAPI, Request as HTTPRequest  # FastAPI resolves handler annotations by name, here
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..io import read_adapter_config
from ..lm import adapter_prompt_format, format_prompt
from .engine import GREEDY_BELOW, Engine, QueueFull, Request, ShuttingDown

log = logging.getLogger("zinit.serve")

#: The request body limit when none is given (``--max-body-bytes``).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
#: The largest number of log-probabilities per token a request may ask for (completions ``logprobs``, chat
#: ``top_logprobs``; OpenAI's limits are 5 and 20).
MAX_LOGPROBS = 20
#: Stop sequences a request may give at most.
MAX_STOPS = 16
_MAX_SEED = 2 ** 63 - 1


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------- field checks

def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(body: dict[str, Any], key: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} in [{low}, {high}] (or null), got {_shown(value)}", param=key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true, false or null, got {_shown(value)}", param=key)
    return bool(value)


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them, got "
                            f"{_shown(stop)}", param="stop")
    return list(dict.fromkeys(stops))


def _streaming(body: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """The request's ``stream`` flag and its ``stream_options`` (checked: only ``include_usage``, only with a
    stream)."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"} or
                                not isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, f"'stream_options' must be {{\"include_usage\": true|false}} or null, got "
                            f"{_shown(options)}", param="stream_options")
    if options is not None and not stream:
        raise APIError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options")
    return stream, options


def _sampling(body: dict[str, Any]) -> tuple[float, float, int | None]:
    """The request's ``temperature``, ``top_p`` and ``seed`` (checked, with ``n``: one completion per prompt)."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise APIError(400, f"'n' must be 1 or null (one completion per prompt), got {_shown(n)}", param="n")
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if temperature < GREEDY_BELOW or top_p == 0:  # as vLLM: such values mean greedy (dividing overflows)
        temperature, top_p = 0.0, 1.0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED):
        raise APIError(400, f"'seed' must be an integer in [0, 2**63-1] or null, got {_shown(seed)}", param="seed")
    return temperature, top_p, seed


def _echo_and_logprobs(body: dict[str, Any], chat: bool) -> tuple[bool, int | None]:
    """Whether a completions request echoes its prompt, and how many top log-probabilities per token it wants
    (None: none; chat's ``logprobs`` / ``top_logprobs``, completions' ``logprobs``)."""
    echo = False if chat else _flag(body, "echo")
    if chat:
        want = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True) if body.get(
            "top_logprobs") is not None else None
        if top is not None and not want:
            raise APIError(400, "'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True) if body.get(
            "logprobs") is not None else None
    return echo, logprobs


def _held(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop sequence (held back until the next
    tokens rule the stop out)."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


def _neutral(value: Any, key: str) -> bool:
    """Whether an unsupported parameter has the value that means "not used"."""
    if value is None:
        return True
    if key in ("presence_penalty", "frequency_penalty"):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
    if key in ("logit_bias", "metadata"):
        return isinstance(value, dict) and (not value or key == "metadata")
    if key in ("tools", "functions"):
        return isinstance(value, list) and not value
    if key in ("tool_choice", "function_call"):
        return value in ("none", "auto")
    if key == "response_format":
        return isinstance(value, dict) and value.get("type") == "text" and len(value) == 1
    if key == "modalities":
        return value == ["text"]
    if key == "suffix":
        return value == ""
    if key == "best_of":
        return isinstance(value, int) and not isinstance(value, bool) and value == 1
    if key == "store":
        return value is False
    if key == "parallel_tool_calls":
        return isinstance(value, bool)
    if key == "service_tier":
        return value in ("auto", "default")
    if key == "user":
        return isinstance(value, str)
    return False


#: Parameters read by both endpoints.
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stream_options",
           "stop", "seed", "logprobs"}
#: Parameters accepted when they have their "not used" value (:func:`_neutral`) and refused otherwise; ``user``,
#: ``metadata``, ``service_tier`` do not change an answer and are accepted as any value of their type.
_UNSUPPORTED_COMMON = {"presence_penalty", "frequency_penalty", "logit_bias", "user", "metadata", "store",
                       "service_tier"}
_FIELDS = {
    False: _COMMON | {"prompt", "echo"},
    True: _COMMON | {"messages", "top_logprobs"},
}
_UNSUPPORTED = {
    False: _UNSUPPORTED_COMMON | {"suffix", "best_of"},
    True: _UNSUPPORTED_COMMON | {"tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                                 "response_format", "modalities", "audio", "prediction", "reasoning_effort",
                                 "web_search_options"},
}


def _check_fields(body: dict[str, Any], chat: bool) -> None:
    """Refuse, naming it, any parameter this server does not implement (a silently ignored one would change what
    the client gets without telling it)."""
    for key, value in body.items():
        if key in _FIELDS[chat]:
            continue
        if key in _UNSUPPORTED[chat]:
            if _neutral(value, key):
                continue
            raise APIError(400, f"'{key}' is not supported by zinit serve (got {_shown(value)}); remove it",
                           param=key)
        other = "/v1/completions" if chat else "/v1/chat/completions"
        hint = f" (it is a parameter of {other})" if key in _FIELDS[not chat] | _UNSUPPORTED[not chat] else ""
        raise APIError(400, f"unrecognized request argument {key!r}{hint}; the parameters zinit serve reads are "
                            f"{sorted(_FIELDS[chat])}", param=key)


def _finite(value: float) -> float:
    """A log-probability JSON can carry (-inf becomes -9999.0, as vLLM writes it)."""
    return value if math.isfinite(value) else -9999.0


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use a number)")


# ---------------------------------------------------------------------- one request

@dataclass
class Job:
    """One completion request, parsed and tokenized: a request to the engine per prompt (one choice each)."""

    chat: bool
    model: str
    requests: list[Request]
    stops: list[str]
    stream: bool = False
    include_usage: bool = False
    echo: list[str] | None = None  #: completions with ``echo``: each prompt's text, put before its answer
    logprobs: bool = False  #: the answer carries log-probabilities
    queues: list[asyncio.Queue] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)


@dataclass
class Piece:
    """What one step of a choice adds: ``text``, the finish reason when it is the last piece, and how many of the
    request's generated tokens the text so far covers (for their log-probabilities and the usage)."""

    text: str
    reason: str | None
    tokens: int


class Server:
    """The state behind the app: the engine, the tokenizer and the limits.

    Args:
        engine: the batching engine (owns the model and its adapters).
        tokenizer: the base model's tokenizer (the chat template comes from it).
        base_name: the ``model`` id that means "no adapter" (also listed by ``/v1/models``).
        adapters_dir: the only folder adapters may be loaded from at run time (None: loading and unloading at run
            time are off).
        max_tokens: the largest ``max_tokens`` a request may ask for.
        context: the model's context length (prompt + completion tokens).
        api_key: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_body_bytes: the largest request body (413 beyond).
        prompt_formats: ``{adapter name: the prompt format it was trained with}`` (:data:`zinit.config.PROMPT_FORMATS`;
            :func:`zinit.lm.adapter_prompt_format` of its ``zinit.json``: ``"alpaca"`` when it records none) of the
            adapters the engine already holds; a chat request to an ``"alpaca"`` adapter is put in the Alpaca prompt,
            to any other (one not listed, or the base model) in the tokenizer's chat template. An adapter loaded at
            run time adds its own, by the same rule.
    """

    def __init__(self, engine: Engine, tokenizer: Any, *, base_name: str = "base", adapters_dir: str | None = None,
                 max_tokens: int = 512, context: int = 2048, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 prompt_formats: Mapping[str, str | None] | None = None) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be a non-empty string (or None: no key)")
        self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.max_tokens, self.context = max_tokens, context
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        embeddings = engine.model.get_input_embeddings() if hasattr(engine.model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        self.vocab = int(weight.shape[0]) if weight is not None else len(tokenizer)
        self._token_texts: dict[int, str] = {}
        self.prompt_formats: dict[str, str] = {k: v for k, v in (prompt_formats or {}).items() if v is not None}
        self._managing = threading.Lock()

    # ------------------------------------------------------------------ requests

    def adapter_of(self, body: dict[str, Any]) -> str | None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "'model' is required: an adapter's name, or "
                                f"{self.base_name!r} for the base model (see GET /v1/models)", param="model")
        if name == self.base_name:
            return None
        if name not in self.engine.adapters():
            raise APIError(404, f"the model {name!r} does not exist; served: "
                                f"{[self.base_name] + self.engine.adapters()}", kind="invalid_request_error",
                           param="model", code="model_not_found")
        return name

    def parse(self, data: bytes) -> dict[str, Any]:
        """The JSON object of a request body (400 naming what is wrong)."""
        try:
            body = json.loads(data, parse_constant=_no_constants)
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of more than 4300 digits
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        try:  # JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no tokenizer or file name takes
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start:exc.end].encode("unicode_escape").decode("ascii")
            raise APIError(400, f"the request holds a lone UTF-16 surrogate ({bad}) in a string, which is not valid "
                                "Unicode text: send the character it was meant to pair into, or drop it") from None
        return body

    def _chat_prompt(self, body: dict[str, Any], adapter: str | None) -> list[int]:
        messages = body.get("messages")
        shape = ("'messages' must be a non-empty list of {\"role\": \"user\", \"content\": \"...\"} (content a string "
                 "or a list of {\"type\": \"text\", \"text\": \"...\"} parts)")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, f"{shape}, got {_shown(messages)}", param="messages")
        flat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
                raise APIError(400, f"{shape}; messages[{i}] is {_shown(m)}", param="messages")
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": "
                                        f"...}}) are supported, got {_shown(content)}", param="messages")
                content = "\n".join(p["text"] for p in content)
            elif content is None and m["role"] == "assistant":
                content = ""
            elif not isinstance(content, str):
                raise APIError(400, f"{shape}; messages[{i}].content is {_shown(content)}", param="messages")
            extra = sorted(set(m) - {"role", "content", "name"})
            if extra:
                raise APIError(400, f"messages[{i}] has {extra}: zinit serve reads 'role', 'content' and 'name' "
                                    "(no tool calls)", param="messages")
            if "name" in m and not isinstance(m["name"], str):
                raise APIError(400, f"messages[{i}].name must be a string, got {_shown(m['name'])}",
                               param="messages")
            flat.append({**m, "content": content})
        if self.prompt_formats.get(adapter) == "alpaca":
            return self._alpaca_prompt(flat, adapter)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        try:
            prompt = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - the template refused these messages ("roles must alternate")
            raise APIError(400, f"the model's chat template refused these messages: {type(exc).__name__}: {exc}; "
                                "change the messages (their roles and order) to what the template accepts",
                           param="messages") from None
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
            prompt = prompt["input_ids"]
        return list(prompt)

    def _alpaca_prompt(self, messages: list[dict[str, Any]], adapter: str | None) -> list[int]:
        """The token ids of a chat request to an adapter trained on the Alpaca prompt: its one user message as the
        instruction (the prompt has no system part and no earlier turns, so anything else is a 400)."""
        if len(messages) != 1 or messages[0]["role"] != "user":
            roles = [m["role"] for m in messages]
            raise APIError(400, f"adapter {adapter!r} was trained on the Alpaca prompt, which holds one instruction: "
                                f"send exactly one user message (got roles {roles})", param="messages")
        return list(self.tokenizer(format_prompt(messages[0]["content"]))["input_ids"])

    def _completion_prompts(self, body: dict[str, Any]) -> tuple[list[list[int]], list[str | None]]:
        """Each prompt's token ids, and its text when it was given as text (``prompt``: a string, a list of token
        ids, or a list of either)."""
        prompt = body.get("prompt")
        shape = ("'prompt' must be a non-empty string, a non-empty list of token ids, or a list of those (one "
                 "choice each)")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            items = [prompt]
        elif isinstance(prompt, list) and prompt:
            items = prompt
        else:
            raise APIError(400, f"{shape}, got {_shown(prompt)}", param="prompt")
        if len(items) > self.engine.max_queue:
            raise APIError(400, f"'prompt' lists {len(items)} prompts; this server queues at most "
                                f"{self.engine.max_queue} requests (--max-queue): send fewer per request",
                           param="prompt")
        ids, texts = [], []
        for item in items:
            if isinstance(item, str) and item:
                tokens = list(self.tokenizer(item)["input_ids"])
                if not tokens:
                    raise APIError(400, f"'prompt' {_shown(item)} gives no tokens; give some text", param="prompt")
                ids.append(tokens)
                texts.append(item)
            elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in item):
                bad = [t for t in item if not 0 <= t < self.vocab]
                if bad:
                    raise APIError(400, f"'prompt' has token id {bad[0]}, outside this model's vocabulary "
                                        f"(0..{self.vocab - 1})", param="prompt")
                ids.append(list(item))
                texts.append(None)
            else:
                raise APIError(400, f"{shape}; one of them is {_shown(item)}", param="prompt")
        return ids, texts

    def _prompts(self, body: dict[str, Any], chat: bool, stream: bool, adapter: str | None
                 ) -> tuple[list[list[int]], list[str | None]]:
        """Each prompt's token ids and its text when given as text (a chat request: its one prompt, in the format
        ``adapter`` was trained with)."""
        if chat:
            prompts, texts = [self._chat_prompt(body, adapter)], [None]
        else:
            prompts, texts = self._completion_prompts(body)
            if stream and len(prompts) > 1:
                raise APIError(400, "streaming answers one prompt at a time: give 'prompt' as one string or one list "
                                    "of token ids, or set \"stream\": false", param="prompt")
        return prompts, texts

    def _max_tokens_of(self, body: dict[str, Any], chat: bool, echo: bool, prompts: list[list[int]]) -> int:
        """The request's ``max_tokens`` (or ``max_completion_tokens``), checked against the limit and the context."""
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        longest = max(len(p) for p in prompts)
        room = max(1, self.context - longest)
        default = min(self.max_tokens, room) if chat else min(16, self.max_tokens, room)
        max_tokens = _number(body, key, default, 0 if echo else 1, self.max_tokens, integer=True)
        if longest + max_tokens > self.context:
            raise APIError(400, f"the prompt has {longest} tokens; with {key}={max_tokens} that is more than "
                                f"the model's context of {self.context} tokens: shorten the prompt or ask for fewer "
                                "tokens", param="messages" if chat else "prompt", code="context_length_exceeded")
        return max_tokens

    def prepare(self, data: bytes, chat: bool) -> Job:
        """Parse, check and tokenize a request body into a :class:`Job` (run on a worker thread: tokenizing a long
        prompt takes a while). Raises :class:`APIError` naming the bad parameter."""
        body = self.parse(data)
        _check_fields(body, chat)
        adapter = self.adapter_of(body)
        stream, options = _streaming(body)
        temperature, top_p, seed = _sampling(body)
        echo, logprobs = _echo_and_logprobs(body, chat)
        stops = _stops(body)
        prompts, texts = self._prompts(body, chat, stream, adapter)
        max_tokens = self._max_tokens_of(body, chat, echo, prompts)
        requests = [Request(prompt, adapter, max_tokens, on_token=lambda t, r: None, temperature=temperature,
                            top_p=top_p, seed=seed, logprobs=logprobs,
                            prompt_logprobs=(logprobs if logprobs is not None else 0) if echo and (
                                logprobs is not None or max_tokens == 0) else None)
                    for prompt in prompts]
        echoed = None
        if echo:
            echoed = [t if t is not None else self.tokenizer.decode(p) for p, t in zip(prompts, texts)]
        return Job(chat, body["model"], requests, stops, stream=stream,
                   include_usage=bool(options and options.get("include_usage")), echo=echoed,
                   logprobs=logprobs is not None)

    def submit(self, job: Job) -> None:
        """Queue every request of ``job`` (all or none); each gets the queue its tokens arrive on
        (``job.queues``)."""
        loop = asyncio.get_running_loop()
        submitted = []
        try:
            for request in job.requests:
                events: asyncio.Queue = asyncio.Queue()
                request.on_token = (lambda q: lambda token, reason: loop.call_soon_threadsafe(
                    q.put_nowait, (token, reason)))(events)
                self.engine.submit(request)
                submitted.append(request)
                job.queues.append(events)
        except BaseException as exc:
            for request in submitted:
                request.cancel()
            if isinstance(exc, QueueFull):
                raise APIError(429, f"the server is busy: {exc}; retry shortly", kind="rate_limit_error") from None
            if isinstance(exc, ShuttingDown):
                raise APIError(503, "the server is shutting down", kind="server_error") from None
            if isinstance(exc, KeyError):
                raise APIError(404, str(exc.args[0]), param="model", code="model_not_found") from None
            raise

    async def pieces(self, request: Request, events: asyncio.Queue, stops: list[str]) -> AsyncIterator[Piece]:
        """The text of a submitted ``request`` as tokens arrive on ``events``; with ``stops``, text that could be
        the start of a stop sequence is held back until the next tokens rule it out, and nothing from a stop
        sequence on is sent. Cancels the request if the consumer goes away; an error of the row raises
        :class:`APIError` (500)."""
        tokens: list[int] = []
        sent = ""
        longest = max((len(s) for s in stops), default=0)
        finished = False
        try:
            while True:
                token, reason = await events.get()
                if reason is not None:
                    finished = True
                    if reason.startswith("error"):
                        raise APIError(500, f"generation failed: {reason[len('error: '):]}", kind="server_error")
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""
                    cut = self._stop_at(text, sent, stops, longest) if stops else -1
                    yield Piece(text[len(sent):cut if cut >= 0 else None], "length" if reason == "length" and cut < 0
                                else "stop", len(tokens))
                    return
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                if stops:
                    cut = self._stop_at(text, sent, stops, longest)
                    if cut >= 0:  # a stop sequence: the text ends before it
                        finished = True
                        request.cancel()
                        yield Piece(text[len(sent):cut] if cut > len(sent) else "", "stop", len(tokens))
                        return
                    end = max(len(sent), len(text) - _held(text, stops))
                else:
                    end = len(text)
                if end > len(sent):
                    delta, sent = text[len(sent):end], text[:end]
                    yield Piece(delta, None, len(tokens))
        finally:
            if not finished:
                request.cancel()

    @staticmethod
    def _stop_at(text: str, sent: str, stops: list[str], longest: int) -> int:
        """Where the first stop sequence in ``text`` begins (-1: none); only the part not sent yet can hold one."""
        start = max(0, len(sent) - longest)
        return min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)

    # ------------------------------------------------------------------ log-probabilities

    def token_text(self, token: int) -> str:
        """The text of one token (cached: logprobs ask for the same ones again and again)."""
        text = self._token_texts.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            if len(self._token_texts) < 1 << 18:
                self._token_texts[token] = text
        return text

    def completion_logprobs(self, items: list[tuple[int, Any]], offset: int) -> dict[str, Any]:
        """The legacy completions ``logprobs`` object of ``(token, (logprob, top) or None)`` items, text offsets
        counted from ``offset``; each ``top_logprobs`` holds the chosen token too (as vLLM's)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token, entry in items:
            text = self.token_text(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if entry is None:
                values.append(None)
                tops.append(None)
                continue
            value, best = entry
            values.append(_finite(value))
            top = {self.token_text(i): _finite(v) for i, v in best}
            top.setdefault(text, _finite(value))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, items: list[tuple[int, Any]]) -> dict[str, Any]:
        """The chat ``logprobs`` object (``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``)."""
        def entry(token: int, value: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": _finite(value), "bytes": list(text.encode("utf-8"))}

        content = [{**entry(token, value), "top_logprobs": [entry(i, v) for i, v in best]}
                   for token, (value, best) in items]
        return {"content": content, "refusal": None}

    def logprobs_of(self, job: Job, index: int, start: int, end: int, offset: int,
                    with_prompt: bool = False) -> dict[str, Any] | None:
        """The ``logprobs`` of choice ``index`` for its generated tokens ``start:end`` (and its prompt's first, for
        an echo), or None when the request did not ask for them."""
        if not job.logprobs:
            return None
        request = job.requests[index]
        items = list(zip(request.generated[start:end], request.token_logprobs[start:end]))
        if job.chat:
            return self.chat_logprobs(items)
        out = self.completion_logprobs(items, offset)
        if with_prompt and request.prompt_token_logprobs is not None:  # an echo: the prompt's tokens come first,
            prompt = self.completion_logprobs(list(zip(request.prompt, request.prompt_token_logprobs)), 0)  # at 0
            out = {key: prompt[key] + out[key] for key in out}
        return out

    # ------------------------------------------------------------------ adapters at run time

    def _managed(self, action: str) -> Path:
        if self.adapters_dir is None:
            raise APIError(403, f"{action} adapters at run time is off: this server was started without "
                                "--adapters-dir DIR (a Ray Serve deployment never has it: deploy again with the new "
                                "adapter list)", kind="permission_error")
        return self.adapters_dir

    def load(self, body: dict[str, Any]) -> dict[str, Any]:
        root = self._managed("loading")
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give 'name' (the model id to serve it as) and 'path' (a folder inside the adapters "
                                "folder)", param="name")
        try:  # a NUL byte or an over-long name is the client's mistake (400), not the server's
            folder = (root / path).resolve()
            if folder != root and root not in folder.parents:
                raise APIError(403, f"'path' {path!r} is outside the adapters folder", kind="permission_error",
                               param="path")
            if folder.is_dir():  # every file there is read by nobody but zinit: each must be inside the folder too
                for entry in sorted(folder.iterdir()):
                    real = entry.resolve()
                    if real != root and root not in real.parents:
                        raise APIError(403, f"'path' {path!r}: {entry.name} is a link to a file outside the adapters "
                                            "folder; copy the file into the folder instead", kind="permission_error",
                                       param="path")
        except (OSError, ValueError) as exc:
            raise APIError(400, f"'path' {_shown(path)} is not a usable folder name: {exc}; give the name of a "
                                "folder inside the adapters folder", param="path") from None
        with self._managing:  # one load or unload at a time: its prompt format and its modules change together
            if name == self.base_name or name in self.engine.adapters():
                raise APIError(400, f"a model named {name!r} is already served; unload it first", param="name")
            try:
                # recorded before the modules are attached: no request reaches the adapter before its format
                self.prompt_formats[name] = adapter_prompt_format(read_adapter_config(folder), self.tokenizer)
                self.engine.add_adapter(name, str(folder))
            except BaseException as exc:  # whatever failed, the format goes with the adapter that never came
                self.prompt_formats.pop(name, None)
                if not isinstance(exc, (OSError, ValueError, KeyError, OverflowError, MemoryError)):
                    raise
                message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
                raise APIError(400, message.replace(str(root), "<adapters>"), param="path") from None
        return {"id": name, "object": "model", "owned_by": "zinit"}

    def unload(self, name: str) -> dict[str, Any]:
        self._managed("unloading")
        if name not in self.engine.adapters():
            raise APIError(404, f"no adapter named {name!r} is served", code="model_not_found")
        with self._managing:
            try:
                self.engine.remove_adapter(name)
            except RuntimeError as exc:
                raise APIError(409, str(exc), kind="conflict_error") from None
            except KeyError:
                raise APIError(404, f"no adapter named {name!r} is served", code="model_not_found") from None
            self.prompt_formats.pop(name, None)
        return {"id": name, "object": "model", "deleted": True}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


class _APIKey:
    """ASGI middleware: every ``/v1`` route needs ``Authorization: Bearer <key>`` (as vLLM's ``--api-key``);
    ``/health`` stays open for probes."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                why = "no API key was given" if not given else "the API key is wrong"
                error = APIError(401, f"{why}: send the header 'Authorization: Bearer <key>' with the key zinit "
                                      "serve was started with (--api-key or ZINIT_API_KEY)",
                                 code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Stream(StreamingResponse):
    """A stream of server-sent events that cancels its job's requests however it ends (a client that went away
    before the first event never starts the generator, whose own cleanup then never runs)."""

    def __init__(self, content: AsyncIterator[str], job: Job, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for request in self.job.requests:
                request.cancel()  # a no-op for a request that has finished


def _guarded(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``handler``, with any unexpected exception answered as a 500 in OpenAI's shape (and logged) rather than
    Starlette's plain-text one and a reset connection."""
    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except (APIError, StarletteHTTPException):
            raise
        except Exception as exc:  # noqa: BLE001 - answered, not hidden: logged with its traceback
            log.exception("%s failed", handler.__name__)
            raise APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error") from exc
    return guarded


def _lifespan(server: Server) -> Callable[[Any], Any]:
    """The app's lifespan: start the engine, and on shutdown finish the running requests before stopping it."""
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:  # uvicorn has stopped taking requests: finish the running ones, then stop
            await asyncio.get_running_loop().run_in_executor(None, server.engine.stop)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's body: an :class:`APIError`, Starlette's HTTP errors, and anything else (500)."""
    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(http: HTTPRequest, exc: Exception) -> JSONResponse:
        log.exception("%s failed", http.url.path, exc_info=exc)
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").body(),
                            status_code=500)


async def _read_body(server: Server, http: HTTPRequest) -> bytes:
    """The request body, refused with a 413 as soon as it is larger than ``server.max_body_bytes``."""
    limit = server.max_body_bytes
    declared = http.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than {limit} bytes, this server's limit "
                            "(zinit serve --max-body-bytes)", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _body_of(server: Server, http: HTTPRequest) -> dict[str, Any]:
    """The request body's JSON object, parsed on a worker thread."""
    data = await _read_body(server, http)
    return await asyncio.to_thread(server.parse, data)


async def _until_disconnected(http: HTTPRequest, job: Job) -> None:
    """Cancel the job's requests when its client goes away (a non-streaming one: nothing is sent to notice)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            for request in job.requests:
                request.cancel()
            return


@dataclass
class _Answer:
    """The answer to one submitted completion request: its OpenAI objects, streamed or whole, and its log line."""

    server: Server
    http: HTTPRequest
    job: Job
    chat: bool
    started: float
    rid: str
    created: int

    @property
    def kind(self) -> str:
        """The ``object`` of the answer."""
        return "chat.completion" if self.chat else "text_completion"

    def choice(self, index: int, text: str, reason: str | None, delta: bool, logprobs: Any) -> dict[str, Any]:
        """One choice of the answer (a chunk's ``delta`` or a whole ``message`` for chat)."""
        if self.chat:
            key = "delta" if delta else "message"
            return {"index": index, key: {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def usage(self, completion: int) -> dict[str, int]:
        """The ``usage`` object for ``completion`` generated tokens."""
        return {"prompt_tokens": self.job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.job.prompt_tokens + completion}

    def logged(self, status: int, completion: int) -> None:
        """Log the request: endpoint, model, tokens in and out, seconds, status."""
        log.info("%s model=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f status=%d",
                 self.http.url.path, self.job.model, self.job.prompt_tokens, completion,
                 time.monotonic() - self.started, status)

    def chunk(self, text: str, reason: str | None, logprobs: Any) -> str:
        """One server-sent event of a stream, carrying ``text``."""
        return _sse({"id": self.rid, "object": f"{self.kind}.chunk" if self.chat else self.kind,
                     "created": self.created, "model": self.job.model,
                     "choices": [self.choice(0, text, reason, True, logprobs)]})

    def streamed(self) -> _Stream:
        """The answer as a stream of server-sent events."""
        request, events = self.job.requests[0], self.job.queues[0]
        pieces = self.server.pieces(request, events, self.job.stops)
        return _Stream(self.stream(pieces), self.job, media_type="text/event-stream")

    async def stream(self, pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
        """The events of a stream: its pieces, the usage when asked for, then ``[DONE]`` (an error: its last event)."""
        job, server, chat = self.job, self.server, self.chat
        covered = 0
        offset = 0
        try:
            if job.echo is not None:
                # the prompt's log-probabilities come once the prefill has run: with the first piece
                first = await pieces.__anext__()
                yield self.chunk(job.echo[0], None, server.logprobs_of(job, 0, 0, 0, 0, with_prompt=True))
                offset = len(job.echo[0])
                rest: Any = _chain(first, pieces)
            else:
                rest = pieces
            async for piece in rest:
                logprobs = server.logprobs_of(job, 0, covered, piece.tokens, offset)
                offset += len(piece.text) if not chat else 0
                covered = piece.tokens
                yield self.chunk(piece.text, piece.reason, logprobs)
            if job.include_usage:
                yield _sse({"id": self.rid, "object": f"{self.kind}.chunk" if chat else self.kind,
                            "created": self.created, "model": job.model, "choices": [], "usage": self.usage(covered)})
            yield _sse("[DONE]")
            self.logged(200, covered)
        except APIError as exc:  # the stream has started: the error is its last event
            yield _sse(exc.body())
            yield _sse("[DONE]")
            self.logged(exc.status, covered)
        except Exception as exc:  # noqa: BLE001 - same, for a failure of the server itself
            log.exception("%s failed while streaming", self.http.url.path)
            yield _sse(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                kind="server_error").body())
            yield _sse("[DONE]")
            self.logged(500, covered)
        finally:
            await pieces.aclose()

    async def collect(self, index: int) -> tuple[str, str | None, int]:
        """Choice ``index``'s whole text, finish reason and number of generated tokens."""
        parts, reason, covered = [], None, 0
        async for piece in self.server.pieces(self.job.requests[index], self.job.queues[index], self.job.stops):
            parts.append(piece.text)
            reason = piece.reason or reason
            covered = piece.tokens
        return "".join(parts), reason, covered

    async def whole(self) -> dict[str, Any]:
        """The answer as one JSON object, once every choice has finished (a client that goes away cancels them)."""
        job = self.job
        watcher = asyncio.ensure_future(_until_disconnected(self.http, job))
        tasks = [asyncio.ensure_future(self.collect(i)) for i in range(len(job.requests))]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            for request in job.requests:
                request.cancel()
            self.logged(500, 0)
            raise
        finally:
            watcher.cancel()
        choices = []
        for i, (text, reason, covered) in enumerate(results):
            prefix = job.echo[i] if job.echo is not None else ""
            logprobs = self.server.logprobs_of(job, i, 0, covered, len(prefix), with_prompt=True)
            choices.append(self.choice(i, prefix + text, reason, False, logprobs))
        completion = sum(covered for _, _, covered in results)
        self.logged(200, completion)
        return {"id": self.rid, "object": self.kind, "created": self.created, "model": job.model,
                "choices": choices, "usage": self.usage(completion)}


async def _complete(server: Server, http: HTTPRequest, chat: bool) -> Any:
    """Answer a completions (``chat`` False) or chat completions request: a stream, or one JSON object."""
    started = time.monotonic()
    data = await _read_body(server, http)
    job = await asyncio.to_thread(server.prepare, data, chat)
    server.submit(job)
    answer = _Answer(server, http, job, chat, started, rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                     created=int(time.time()))
    if job.stream:
        return answer.streamed()
    return await answer.whole()


def _add_health(app: FastAPI, server: Server) -> None:
    """``GET /health``: the engine's state (open without an API key, for probes)."""
    @app.get("/health")
    @_guarded
    async def health() -> dict[str, Any]:
        engine = server.engine
        return {"status": "ok", "running": engine.running(), "waiting": engine.waiting(),
                "adapters": engine.adapters()}


def _add_models(app: FastAPI, server: Server) -> None:
    """``GET /v1/models``: the base model and every adapter served."""
    @app.get("/v1/models")
    @_guarded
    async def models() -> dict[str, Any]:
        ids = [server.base_name] + server.engine.adapters()
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "zinit"}
                                           for i in ids]}


def _add_load(app: FastAPI, server: Server) -> None:
    """``POST /v1/adapters``: load an adapter from the adapters folder while serving."""
    @app.post("/v1/adapters")
    @_guarded
    async def load(http: HTTPRequest) -> dict[str, Any]:
        server._managed("loading")
        body = await _body_of(server, http)
        return await asyncio.to_thread(server.load, body)


def _add_unload(app: FastAPI, server: Server) -> None:
    """``DELETE /v1/adapters/{name}``: unload an adapter while serving."""
    @app.delete("/v1/adapters/{name}")
    @_guarded
    async def unload(name: str) -> dict[str, Any]:
        return await asyncio.to_thread(server.unload, name)


def _add_completions(app: FastAPI, server: Server) -> None:
    """``POST /v1/completions``: complete prompts."""
    @app.post("/v1/completions")
    @_guarded
    async def completions(http: HTTPRequest) -> Any:
        return await _complete(server, http, chat=False)


def _add_chat_completions(app: FastAPI, server: Server) -> None:
    """``POST /v1/chat/completions``: answer messages through the tokenizer's chat template."""
    @app.post("/v1/chat/completions")
    @_guarded
    async def chat_completions(http: HTTPRequest) -> Any:
        return await _complete(server, http, chat=True)


def create_app(server: Server) -> Any:
    """The FastAPI application over ``server`` (run it with uvicorn; :func:`zinit.serve.cli.main` does)."""
    app = FastAPI(title="zinit serve", lifespan=_lifespan(server))
    if server.api_key is not None:
        app.add_middleware(_APIKey, key=server.api_key)
    _add_error_handlers(app)
    for add_route in (_add_health, _add_models, _add_load, _add_unload, _add_completions, _add_chat_completions):
        add_route(app, server)
    return app


async def _chain(first: Piece, rest: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    yield first
    async for piece in rest:
        yield piece
