"""``zinit serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template), both with
``"stream": true`` as server-sent events; ``GET /v1/models`` (the base model and every adapter: a request's
``model`` names the adapter, or the base model); ``POST /v1/adapters`` / ``DELETE /v1/adapters/{name}`` to load and
unload adapters while serving (only from the configured adapters folder); ``GET /health``. Errors use OpenAI's body
(``{"error": {"message", "type", "param", "code"}}``): 400 for bad JSON, bad values or a prompt too long for the
context, 404 for an unknown model or adapter, 429 when the queue is full, 503 while shutting down. Requests of
different adapters are batched together at every decoding step (:class:`zinit.serve.engine.Engine`). On shutdown
(SIGINT / SIGTERM) the server stops taking requests and finishes the running ones. Every request is logged
(``zinit.serve``: endpoint, model, tokens in and out, seconds, status).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest  # FastAPI resolves handler annotations by name, here
from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Engine, QueueFull, Request, ShuttingDown

log = logging.getLogger("zinit.serve")


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} in [{low}, {high}], got {json.dumps(value)}", param=key)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    return stops


class Server:
    """The state behind the app: the engine, the tokenizer and the limits.

    Args:
        engine: the batching engine (owns the model and its adapters).
        tokenizer: the base model's tokenizer (the chat template comes from it).
        base_name: the ``model`` id that means "no adapter" (also listed by ``/v1/models``).
        adapters_dir: the only folder adapters may be loaded from at run time (None: loading at run time is off).
        max_tokens: the largest ``max_tokens`` a request may ask for.
        context: the model's context length (prompt + completion tokens).
    """

    def __init__(self, engine: Engine, tokenizer: Any, *, base_name: str = "base", adapters_dir: str | None = None,
                 max_tokens: int = 512, context: int = 2048) -> None:
        self.engine, self.tokenizer, self.base_name = engine, tokenizer, base_name
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.max_tokens, self.context = max_tokens, context

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

    def request(self, body: dict[str, Any], prompt: list[int], default_max: int) -> tuple[Request, list[str]]:
        adapter = self.adapter_of(body)
        limit = min(self.max_tokens, max(1, self.context - len(prompt)))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, min(default_max, limit), 1, self.max_tokens, integer=True)
        if len(prompt) + max_tokens > self.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; with {key}={max_tokens} that is more than "
                                f"the model's context of {self.context} tokens: shorten the prompt or ask for fewer "
                                "tokens", param="messages" if "messages" in body else "prompt",
                           code="context_length_exceeded")
        if body.get("n", 1) != 1:
            raise APIError(400, "'n' must be 1 (one completion per request)", param="n")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, "'seed' must be an integer", param="seed")
        request = Request(prompt, adapter, max_tokens, on_token=lambda t, r: None, temperature=float(temperature),
                          top_p=float(top_p), seed=seed)
        return request, _stops(body)

    async def run(self, request: Request, stops: list[str]) -> AsyncIterator[tuple[str, str | None]]:
        """Submit ``request`` and yield ``(new text, finish reason or None)`` as tokens arrive; cancels the
        request if the consumer goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.on_token = lambda token, reason: loop.call_soon_threadsafe(events.put_nowait, (token, reason))
        try:
            self.engine.submit(request)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry shortly", kind="rate_limit_error") from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", kind="server_error") from None
        except KeyError as exc:
            raise APIError(404, str(exc.args[0]), param="model", code="model_not_found") from None
        sent = ""
        finished = False
        try:
            while True:
                token, reason = await events.get()
                if reason is not None:
                    finished = True
                    if reason.startswith("error"):
                        raise APIError(500, f"generation failed: {reason}", kind="server_error")
                    yield "", ("length" if reason == "length" else "stop")
                    return
                text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                cut = min((i for i in (text.find(s, max(0, len(sent) - len(s))) for s in stops) if i >= 0),
                          default=-1)
                if cut >= 0:  # a stop sequence: the text ends before it
                    delta = text[len(sent):cut] if cut > len(sent) else ""
                    finished = True
                    request.cancel()
                    yield delta, "stop"
                    return
                delta, sent = text[len(sent):], text
                if delta:
                    yield delta, None
        finally:
            if not finished:
                request.cancel()

    # ------------------------------------------------------------------ adapters at run time

    def load(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.adapters_dir is None:
            raise APIError(403, "loading adapters at run time is off: start zinit serve with --adapters-dir DIR",
                           kind="permission_error")
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise APIError(400, "give 'name' (the model id to serve it as) and 'path' (a folder inside the adapters "
                                "folder)", param="name")
        folder = (self.adapters_dir / path).resolve()
        if folder != self.adapters_dir and self.adapters_dir not in folder.parents:
            raise APIError(403, f"'path' {path!r} is outside the adapters folder", kind="permission_error",
                           param="path")
        if name == self.base_name or name in self.engine.adapters():
            raise APIError(400, f"a model named {name!r} is already served; unload it first", param="name")
        try:
            self.engine.add_adapter(name, str(folder))
        except (OSError, ValueError, KeyError) as exc:
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            raise APIError(400, message.replace(str(self.adapters_dir), "<adapters>"), param="path") from None
        return {"id": name, "object": "model", "owned_by": "zinit"}

    def unload(self, name: str) -> dict[str, Any]:
        if name not in self.engine.adapters():
            raise APIError(404, f"no adapter named {name!r} is served", code="model_not_found")
        try:
            self.engine.remove_adapter(name)
        except RuntimeError as exc:
            raise APIError(409, str(exc), kind="conflict_error") from None
        return {"id": name, "object": "model", "deleted": True}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def create_app(server: Server) -> Any:
    """The FastAPI application over ``server`` (run it with uvicorn; :func:`zinit.serve.cli.main` does)."""
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.engine.start()
        try:
            yield
        finally:  # uvicorn has stopped taking requests: finish the running ones, then stop
            await asyncio.get_running_loop().run_in_executor(None, server.engine.stop)

    app = FastAPI(title="zinit serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def body_of(http: HTTPRequest) -> dict[str, Any]:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = server.engine
        return {"status": "ok", "running": engine.running(), "waiting": engine.waiting(),
                "adapters": engine.adapters()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        ids = [server.base_name] + server.engine.adapters()
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "zinit"}
                                           for i in ids]}

    @app.post("/v1/adapters")
    async def load(http: HTTPRequest) -> dict[str, Any]:
        body = await body_of(http)
        return await asyncio.get_running_loop().run_in_executor(None, server.load, body)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, server.unload, name)

    async def complete(http: HTTPRequest, chat: bool) -> Any:
        started = time.monotonic()
        body = await body_of(http)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise APIError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}",
                               param="messages")
            if getattr(server.tokenizer, "chat_template", None) is None:
                raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions",
                               param="messages")
            prompt = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
                prompt = prompt["input_ids"]
            prompt = list(prompt)
        else:
            text = body.get("prompt")
            if not isinstance(text, str) or not text:
                raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
            prompt = server.tokenizer(text)["input_ids"]
        request, stops = server.request(body, prompt, server.max_tokens if chat else 16)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, model = int(time.time()), body["model"]
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, reason: str | None, delta: bool) -> dict[str, Any]:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}

        def logged(status: int) -> None:
            log.info("%s model=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f status=%d",
                     http.url.path, model, len(prompt), len(request.generated), time.monotonic() - started, status)

        if body.get("stream"):
            events = server.run(request, stops)
            first = await events.__anext__()  # errors (429, 503 ...) are answered before the stream starts

            async def stream() -> AsyncIterator[str]:
                try:
                    for text, reason in [first]:
                        yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                    "model": model, "choices": [choice(text, reason, True)]})
                    if first[1] is None:
                        async for text, reason in events:
                            yield _sse({"id": rid, "object": f"{kind}.chunk" if chat else kind, "created": created,
                                        "model": model, "choices": [choice(text, reason, True)]})
                    yield _sse("[DONE]")
                    logged(200)
                finally:
                    await events.aclose()

            return StreamingResponse(stream(), media_type="text/event-stream")
        parts, reason = [], None
        async for text, why in server.run(request, stops):
            parts.append(text)
            reason = why or reason
        logged(200)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(request.generated),
                 "total_tokens": len(prompt) + len(request.generated)}
        return {"id": rid, "object": kind, "created": created, "model": model,
                "choices": [choice("".join(parts), reason, False)], "usage": usage}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Any:
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Any:
        return await complete(http, chat=True)

    return app
