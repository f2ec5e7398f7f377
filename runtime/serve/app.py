"""The HTTP application (FastAPI): OpenAI routes, bearer-token check, body and prompt limits, the
slot queue, server-sent events (sse-starlette), and OpenAI-style errors for everything that fails.

Generation runs in worker threads (``anyio.to_thread``), one token per hop when streaming, so a
client that disconnects is noticed between two tokens and its slot is given back.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from runtime.serve.codec import TemplateError
from runtime.serve.config import ServeConfig
from runtime.serve.engine import Decoding, Engine, RequestTimeout, SamplingParams
from runtime.serve.metrics import CONTENT_TYPE, Metrics
from runtime.serve.responses import Answer
from runtime.serve.schemas import ApiError, ChatRequest, CompletionRequest, parse_body
from runtime.serve.slots import Lease, QueueFull, QueueTimeout, SlotPool

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
          "/health": "health", "/metrics": "metrics"}


class Server:
    """What the routes share: the engine, the settings, the slot pool (made in the event loop), the counters."""

    def __init__(self, engine: Engine, cfg: ServeConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.pool: SlotPool[Any] | None = None
        self.metrics = Metrics(self._gauges)

    def _gauges(self) -> dict[str, float]:
        pool = self.pool
        return {"slots": len(self.engine.backends), "slots_busy": pool.busy if pool else 0,
                "queue_waiting": pool.waiting if pool else 0}

    def check_key(self, request: Request) -> None:
        key = self.cfg.api_key
        if not key:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if not secrets.compare_digest(given, f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def adapter_of(self, model: str) -> str | None:
        try:
            return self.engine.adapter_of(model)
        except KeyError:
            raise ApiError(404, f"model {model!r} not found; this server has {', '.join(self.engine.model_ids)}",
                           param="model", code="model_not_found") from None

    def sampling(self, req: ChatRequest | CompletionRequest, n_prompt: int) -> SamplingParams:
        """The request's decoding settings, or a 400 when the prompt and answer cannot fit."""
        n_ctx, cfg = self.engine.n_ctx, self.cfg
        max_prompt = min(cfg.max_prompt_tokens or n_ctx - 1, n_ctx - 1)
        if n_prompt > max_prompt:
            raise ApiError(400, f"the prompt is {n_prompt} tokens; this server takes at most {max_prompt}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        limit = req.limit()
        if limit is not None and n_prompt + limit > n_ctx:
            raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({limit}) exceed the context ({n_ctx})",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = limit if limit is not None else min(cfg.max_tokens, n_ctx - n_prompt)
        return SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, req.stop_list())

    async def lease(self, deadline: float) -> Lease[Any]:
        assert self.pool is not None, "the slot pool is made when the app starts"
        try:
            return await self.pool.acquire(max(0.0, deadline - time.monotonic()))
        except QueueFull:
            raise ApiError(429, "all decoding slots are busy and the queue is full; retry shortly",
                           type="rate_limit_exceeded", code="queue_full", headers={"Retry-After": "1"}) from None
        except QueueTimeout:
            raise ApiError(503, f"no decoding slot came free within {self.cfg.timeout:g} s; retry later",
                           type="server_overloaded", code="queue_timeout", headers={"Retry-After": "5"}) from None

    async def answer(self, req: ChatRequest | CompletionRequest, prompt: list[int], adapter: str | None,
                     endpoint: str, t0: float) -> Any:
        """Wait for a slot, then decode: one JSON answer, or a stream of server-sent events."""
        params = self.sampling(req, len(prompt))
        deadline = time.monotonic() + self.cfg.timeout
        lease = await self.lease(deadline)
        decoding = Decoding(lease.slot, self.engine.codec, prompt, params, adapter)
        answer = Answer("chat" if endpoint == "chat" else "text", req.model, len(prompt))
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self.events(decoding, answer, lease, deadline, usage, endpoint, t0)
            return EventSourceResponse(events, background=BackgroundTask(lease.release), ping=15)
        try:
            text = await anyio.to_thread.run_sync(decoding.run, deadline)
        except RequestTimeout:
            raise ApiError(504, f"the answer took longer than {self.cfg.timeout:g} s (--timeout)",
                           type="timeout", code="timeout") from None
        finally:
            lease.release()
        self.metrics.observe(endpoint, 200, time.perf_counter() - t0, len(prompt), decoding.completion_tokens,
                             decoding.reused_tokens)
        return JSONResponse(answer.whole(text, decoding.finish_reason or "stop", decoding.completion_tokens))

    async def events(self, decoding: Decoding, answer: Answer, lease: Lease[Any], deadline: float,
                     usage: bool, endpoint: str, t0: float) -> AsyncIterator[dict[str, str]]:
        """The streamed answer; the slot is given back however the stream ends (done, dropped, timed out)."""
        status = 200
        try:
            if answer.kind == "chat":
                yield {"data": json.dumps(answer.chunk(None, first=True))}
            while not decoding.done:
                if time.monotonic() > deadline:
                    status = 504
                    error = ApiError(504, f"the answer took longer than {self.cfg.timeout:g} s", type="timeout")
                    yield {"data": json.dumps(error.body())}
                    return
                piece = await anyio.to_thread.run_sync(decoding.advance)
                if piece:
                    yield {"data": json.dumps(answer.chunk(piece))}
            yield {"data": json.dumps(answer.chunk(None, decoding.finish_reason))}
            if usage:
                yield {"data": json.dumps(answer.usage_chunk(decoding.completion_tokens))}
            yield {"data": "[DONE]"}
        finally:
            lease.release()
            self.metrics.observe(endpoint, status if decoding.done or status != 200 else 499,
                                 time.perf_counter() - t0, answer.prompt_tokens, decoding.completion_tokens,
                                 decoding.reused_tokens)


def build_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application over a loaded engine."""
    server = Server(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.pool = SlotPool(list(engine.backends), cfg.queue)
        yield

    app = FastAPI(title="edgeft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    keyed = [Depends(server.check_key)]
    _add_error_handlers(app, server)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(request: Request) -> Any:
        t0 = time.perf_counter()
        req = parse_body(ChatRequest, await server.read_body(request))
        adapter = server.adapter_of(req.model)
        try:
            prompt = engine.codec.chat_ids([m.as_template_dict() for m in req.messages])
        except TemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await server.answer(req, prompt, adapter, "chat", t0)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request) -> Any:
        t0 = time.perf_counter()
        req = parse_body(CompletionRequest, await server.read_body(request))
        adapter = server.adapter_of(req.model)
        prompt = engine.codec.encode(req.prompt_text(), add_special=True)
        if not prompt:
            raise ApiError(400, "prompt: empty", param="prompt")
        return await server.answer(req, prompt, adapter, "completions", t0)

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> Any:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "edgeft"} for m in engine.model_ids]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "model": engine.model_id, "kind": engine.kind, **server._gauges()}

    @app.get("/metrics", dependencies=keyed)
    async def metrics() -> Any:
        return PlainTextResponse(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    """Every failure answers ``{"error": {...}}``; a bug is a 500 with no traceback in the body."""

    def reply(request: Request, error: ApiError) -> JSONResponse:
        endpoint = ROUTES.get(request.url.path, "other")
        server.metrics.observe(endpoint, error.status, 0.0)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply(request, exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return reply(request, ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(request, ApiError(400, f"invalid request: {exc.errors()[0].get('msg', '')}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        from edgeft.core.errors import one_line

        return reply(request, ApiError(500, f"internal error ({one_line(exc)})", type="server_error"))
