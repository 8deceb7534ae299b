"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, SSE streaming, probes, metrics.

Status codes: malformed request → 400 with an OpenAI error body whose `param` names the field
(FastAPI's 422 is replaced); unknown model → 404; waiting queue full → 429; models still
loading, engine stopping or dead → 503; an engine failure while generating → 500 (non-stream)
or an error event (stream). A client that disconnects is aborted in the engine, which frees its
slots before the next step.

Probes: `/health` is liveness (200 while the process can serve or is loading; 503 once the model
load failed or the engine loop died, so Kubernetes restarts the pod); `/ready` is readiness
(200 only when the models are loaded and the engine loop is running).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaspec.backends.base import SamplingParams
from adaspec.engine import (
    EngineUnavailableError,
    FinalOutput,
    InvalidRequestError,
    LLMEngine,
    QueueFullError,
    RequestStream,
)
from adaspec.metrics import EngineMetrics
from adaspec.server.codec import ChatTemplateError, TextCodec
from adaspec.server.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    usage_chunk,
)

log = logging.getLogger("adaspec.server")

COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat defaults to the rest of the context."""
_DISCONNECT_POLL_S = 0.5
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after"}


@dataclass
class ServerState:
    """What the app serves; `engine`/`codec` are filled in when the models are loaded."""

    model_name: str
    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    engine: LLMEngine | None = None
    codec: TextCodec | None = None
    load_error: str | None = None
    drain_timeout_s: float = 30.0
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, status), status_code=status)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and _is_type_tag(p))]
    return ".".join(parts) or None


def _is_type_tag(p: str) -> bool:
    return "[" in p or p in _TYPE_TAGS


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg')}", None
    if tuple(first.get("loc", ())) == ("body",):
        return "a JSON request body is required", None
    msgs: list[str] = []
    for e in errors:
        p = _param_of(tuple(e.get("loc", ())))
        line = f"{p}: {e.get('msg')}" if p else str(e.get("msg"))
        if line not in msgs:
            msgs.append(line)
    return "; ".join(msgs[:5]), _param_of(tuple(first.get("loc", ())))


def create_app(state: ServerState, loader: Callable[[ServerState], None] | None = None) -> FastAPI:
    """Build the app. `loader` (optional) loads models and starts the engine in a thread at
    startup, so `/health` answers while the models load."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if loader is not None:

            def load() -> None:
                try:
                    loader(state)
                except Exception as e:
                    state.load_error = f"{type(e).__name__}: {e}"
                    log.exception("loading the models failed")

            threading.Thread(target=load, name="model-loader", daemon=True).start()
        yield
        if state.engine is not None:
            log.info("shutting down: draining for up to %gs", state.drain_timeout_s)
            await asyncio.to_thread(state.engine.shutdown, state.drain_timeout_s)

    app = FastAPI(title="SpecServe engine", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(ApiError)
    async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        resp = _error(exc.status, exc.message, exc.type, exc.param)
        if exc.status in (429, 503):
            resp.headers["Retry-After"] = "1"
        return resp

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "internal_error")

    # ------------------------------------------------------------------ probes and info

    @app.get("/health")
    async def health() -> JSONResponse:
        reason = state.load_error or (state.engine.dead_reason if state.engine else None)
        if reason:
            return JSONResponse({"status": "failed", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.engine is not None and state.engine.ready:
            running, waiting = state.engine.counts()
            return JSONResponse({"status": "ready", "running": running, "waiting": waiting})
        return JSONResponse({"status": "not ready", "reason": _not_ready_reason(state)}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card: dict[str, Any] = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "specserve",
        }
        if state.engine is not None:
            card["max_model_len"] = state.engine.backend.max_model_len
        return {"object": "list", "data": [card]}

    # ------------------------------------------------------------------ generation

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        engine, codec = _serving(state, body.model)
        prompt = body.prompt_value()
        ids = codec.encode(prompt) if isinstance(prompt, str) else prompt
        params = _sampling(body, body.max_tokens, len(ids), engine, "prompt", chat=False)
        stream = _submit(engine, ids, params, body.stop_list(), "prompt")
        rid = f"cmpl-{stream.request_id}"
        if body.stream:
            return _sse(_completion_events(stream, rid, state.model_name, body.include_usage))
        return await _respond(request, stream, rid, state.model_name, completion_response)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response | dict[str, Any]:
        engine, codec = _serving(state, body.model)
        try:
            ids = codec.render_chat(body.template_messages())
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "invalid_request_error", "messages") from e
        params = _sampling(
            body, body.effective_max_tokens(), len(ids), engine, "messages", chat=True
        )
        stream = _submit(engine, ids, params, body.stop_list(), "messages")
        rid = f"chatcmpl-{stream.request_id}"
        if body.stream:
            return _sse(_chat_events(stream, rid, state.model_name, body.include_usage))
        return await _respond(request, stream, rid, state.model_name, chat_response)

    return app


# ----------------------------------------------------------------------------- helpers


def _not_ready_reason(state: ServerState) -> str:
    if state.load_error:
        return f"loading the models failed: {state.load_error}"
    if state.engine is None:
        return "loading the models"
    return state.engine.dead_reason or "the engine is not running (starting or shutting down)"


def _serving(state: ServerState, model: str | None) -> tuple[LLMEngine, TextCodec]:
    if model is not None and model != state.model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            "not_found_error",
            "model",
        )
    if state.engine is None or state.codec is None or not state.engine.ready:
        raise ApiError(503, f"not ready: {_not_ready_reason(state)}", "unavailable")
    return state.engine, state.codec


def _sampling(
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    n_prompt: int,
    engine: LLMEngine,
    prompt_field: str,
    *,
    chat: bool,
) -> SamplingParams:
    ctx = engine.backend.max_model_len
    room = ctx - n_prompt
    if room < 1:
        raise ApiError(
            400,
            f"the prompt is {n_prompt} tokens long; this model's context length is {ctx} "
            "tokens (prompt plus at least one generated token)",
            "invalid_request_error",
            prompt_field,
        )
    if max_tokens is None:
        max_tokens = room if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    elif max_tokens > room:
        name = "max_completion_tokens" if chat and body.max_tokens is None else "max_tokens"
        raise ApiError(
            400,
            f"{name}={max_tokens} plus the prompt's {n_prompt} tokens exceeds this model's "
            f"context length of {ctx} tokens",
            "invalid_request_error",
            name,
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        max_draft=body.max_draft_tokens,
    )


def _submit(
    engine: LLMEngine, ids: list[int], params: SamplingParams, stop: list[str], prompt_field: str
) -> RequestStream:
    try:
        return engine.submit(ids, params, stop)
    except QueueFullError as e:
        raise ApiError(429, f"server overloaded: {e}", "rate_limit_error") from e
    except EngineUnavailableError as e:
        raise ApiError(503, f"not ready: {e}", "unavailable") from e
    except InvalidRequestError as e:
        param = prompt_field if e.param == "prompt" else e.param
        raise ApiError(400, str(e), "invalid_request_error", param) from e


def _raise_if_failed(final: FinalOutput) -> None:
    if final.finish_reason == "error":
        raise ApiError(500, f"generation failed: {final.error}", "internal_error")


async def _respond(
    request: Request,
    stream: Any,
    rid: str,
    model: str,
    build: Callable[[str, str, str, str, int, int], dict[str, Any]],
) -> Response | dict[str, Any]:
    """Non-streaming answer shared by completions and chat: collect, then build the body."""
    final = await _collect(request, stream)
    if final is None:
        return Response(status_code=499)
    _raise_if_failed(final)
    return build(
        rid, model, final.text, final.finish_reason, final.prompt_tokens, final.completion_tokens
    )


async def _collect(request: Request, stream: RequestStream) -> FinalOutput | None:
    """Wait for the whole output, aborting if the client goes away (None then)."""
    acc = stream.accumulator()
    next_check = time.monotonic() + _DISCONNECT_POLL_S
    try:
        while True:
            try:
                out = await asyncio.wait_for(stream.__anext__(), timeout=_DISCONNECT_POLL_S)
            except TimeoutError:
                out = None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    log.info("client gone; aborting %s", stream.request_id)
                    return None
            if out is None:
                continue
            final = acc.add(out)
            if final is not None:
                return final
    finally:
        stream.abort()


def _sse_data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _stream_error(error: str | None) -> str:
    return _sse_data(error_body(f"generation failed: {error}", "internal_error", None, 500))


async def _completion_events(
    stream: RequestStream, rid: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    try:
        async for out in stream:
            if out.finish_reason == "error":
                yield _stream_error(out.error)
                return
            if out.text or out.finish_reason is not None:
                yield _sse_data(completion_chunk(rid, model, created, out.text, out.finish_reason))
            if out.finish_reason is not None and include_usage:
                yield _sse_data(
                    usage_chunk(
                        rid,
                        model,
                        created,
                        "text_completion",
                        out.prompt_tokens,
                        out.completion_tokens,
                    )
                )
        yield "data: [DONE]\n\n"
    finally:
        stream.abort()


async def _chat_events(
    stream: RequestStream, rid: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    try:
        yield _sse_data(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
        async for out in stream:
            if out.finish_reason == "error":
                yield _stream_error(out.error)
                return
            if out.text:
                yield _sse_data(chat_chunk(rid, model, created, {"content": out.text}, None))
            if out.finish_reason is not None:
                yield _sse_data(chat_chunk(rid, model, created, {}, out.finish_reason))
                if include_usage:
                    yield _sse_data(
                        usage_chunk(
                            rid,
                            model,
                            created,
                            "chat.completion.chunk",
                            out.prompt_tokens,
                            out.completion_tokens,
                        )
                    )
        yield "data: [DONE]\n\n"
    finally:
        stream.abort()
