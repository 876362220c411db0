"""The OpenAI-compatible HTTP front of the engine (FastAPI on uvicorn).

    POST /v1/chat/completions   text + image_url parts; stream: true -> server-sent events
    GET  /v1/models             the one model served
    GET  /health                200 when ready, 503 while shutting down (no API key needed)
    GET  /metrics               Prometheus text: queue, running batch, tokens/s, time to first token

Per request: the JSON is checked (protocol.py), images fetched and decoded off the event loop
(media.py), the chat template and the processor run (also off the loop), then the engine takes
it; its events come back through an asyncio queue. A client that goes away has its request
cancelled at once (its row is free for the next iteration). Every error is OpenAI's JSON shape
with a 4xx status (5xx only for the server's own failures), and never stops the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from vlmfast.serving.media import MediaError, MediaPolicy, load_image_url
from vlmfast.serving.metrics import prometheus_text
from vlmfast.serving.protocol import ApiError, ChatRequest, parse_chat_request
from vlmfast.serving.request import QueueFull, Request, SamplingParams, ShuttingDown

DISCONNECT_POLL_S = 0.25


@dataclasses.dataclass
class ServerConfig:
    """model_name: the id clients name. api_key: required as "Authorization: Bearer KEY" on every
    route but /health (None: open). max_images: per request. default_max_tokens: when a request
    names none (capped by the context left)."""

    model_name: str
    api_key: str | None = None
    media: MediaPolicy = dataclasses.field(default_factory=MediaPolicy)
    max_images: int = 8
    default_max_tokens: int = 512
    max_body_bytes: int = 64 << 20


def _error_response(err: ApiError):
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class _ApiKeyMiddleware:
    """Pure ASGI (streamed bodies and disconnects pass through untouched): 401 without the key."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.api_key is None or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        given = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value.decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            err = ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                           param=None, code="invalid_api_key")
            return await _error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


class ChatService:
    """What a chat request needs from the engine side: the prompt built and submitted."""

    def __init__(self, engine, processor, config: ServerConfig):
        self.engine, self.processor, self.config = engine, processor, config

    def prepare(self, chat: ChatRequest) -> Request:
        """Blocking (images, template, tokenizer): ApiError on bad input."""
        if len(chat.image_urls) > self.config.max_images:
            raise ApiError(400, f"messages: {len(chat.image_urls)} images, more than this server's limit of "
                                f"{self.config.max_images} per request", param="messages", code="too_many_images")
        images = []
        for url, param in chat.image_urls:
            try:
                images.append(load_image_url(url, self.config.media, param))
            except MediaError as err:
                raise ApiError(400, str(err), param=err.param, code="invalid_image") from err
        try:
            text = self.processor.apply_chat_template(chat.conversation, add_generation_prompt=True)
            inputs = self.processor(text, images if images else None)
        except (ValueError, TypeError) as err:
            raise ApiError(400, f"messages: {err}", param="messages") from err
        except Exception as err:  # noqa: BLE001 - a template that raised on this conversation, say
            raise ApiError(400, f"messages: the chat template could not render them ({type(err).__name__}: {err})",
                           param="messages") from err
        input_ids = inputs["input_ids"][0]
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        L, context = input_ids.numel(), self.engine.max_len
        if chat.max_tokens is None:
            max_tokens = min(self.config.default_max_tokens, context - L)
            if max_tokens < 1:
                raise ApiError(400, f"messages: the prompt is {L} tokens, this server's context is {context}: "
                                    "no room for an answer", param="messages", code="context_length_exceeded")
        else:
            max_tokens = chat.max_tokens
            if L + max_tokens > context:
                raise ApiError(400, f"messages: the prompt ({L} tokens) plus max_tokens ({max_tokens}) is more than "
                                    f"this server's context of {context} tokens", param="messages",
                               code="context_length_exceeded")
        params = SamplingParams(max_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                                top_k=chat.top_k, seed=chat.seed, stop=chat.stop,
                                ignore_eos=chat.ignore_eos)
        return Request(input_ids, vision, params, request_id=f"chatcmpl-{uuid.uuid4().hex}")


def _chunk(rid: str, created: int, model: str, delta: dict, finish_reason=None, usage=None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        body["choices"], body["usage"] = [], usage
    return f"data: {json.dumps(body)}\n\n"


def _usage(event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": event.cached_tokens}}  # OpenAI's: from the prefix cache


def _event_error(event) -> ApiError:
    client_side = (event.error or "").startswith(("ValueError", "TypeError"))
    return ApiError(400 if client_side else 500, event.error or "generation failed",
                    type="invalid_request_error" if client_side else "server_error")


def create_app(engine, processor, config: ServerConfig):
    """The ASGI app. The engine must be started (engine.start()) by the caller."""
    service = ChatService(engine, processor, config)
    app = FastAPI(title="vlmfast", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    created_at = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(ApiError(err.status_code, str(err.detail), code=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        return _error_response(ApiError(400, str(err)))

    @app.exception_handler(Exception)
    async def _server_error(request, err):
        return _error_response(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created_at,
                                            "owned_by": "vlmfast", "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    async def metrics():
        text = prometheus_text(engine.metrics.snapshot(), engine.gauges())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await http.body()
        if len(body) > config.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
        chat = parse_chat_request(payload)
        if chat.model != config.model_name:
            raise ApiError(404, f"model: {chat.model!r} is not served here; GET /v1/models lists "
                                f"{config.model_name!r}", param="model", code="model_not_found")
        if not engine.accepting:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        request = await asyncio.to_thread(service.prepare, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            handle = engine.submit(request, on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except QueueFull as err:
            raise ApiError(429, str(err), type="rate_limit_error", code="queue_full") from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), type="server_error", code="shutting_down") from None
        except ValueError as err:
            raise ApiError(400, str(err), param="messages", code="context_length_exceeded") from None
        created = int(time.time())
        rid = request.request_id

        async def next_event():
            """The engine's next event; None once the client has gone (the request is cancelled)."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        engine.cancel(handle)
                        return None

        if chat.stream:
            async def stream():
                try:
                    yield _chunk(rid, created, config.model_name, {"role": "assistant", "content": ""})
                    while True:
                        event = await next_event()
                        if event is None:
                            return
                        if event.text:
                            yield _chunk(rid, created, config.model_name, {"content": event.text})
                        if event.finished:
                            if event.finish_reason == "error":
                                yield f"data: {json.dumps(_event_error(event).body())}\n\n"
                            else:
                                yield _chunk(rid, created, config.model_name, {}, event.finish_reason)
                                if chat.include_usage:
                                    yield _chunk(rid, created, config.model_name, {}, usage=_usage(event))
                            yield "data: [DONE]\n\n"
                            return
                        if await http.is_disconnected():
                            return
                finally:
                    if not handle.finished:
                        engine.cancel(handle)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            text = []
            while True:
                event = await next_event()
                if event is None:
                    return JSONResponse({"error": {"message": "client disconnected", "type": "aborted",
                                                   "param": None, "code": None}}, status_code=499)
                text.append(event.text)
                if event.finished:
                    break
        finally:
            if not handle.finished:
                engine.cancel(handle)
        if event.finish_reason == "error":
            raise _event_error(event)
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": event.finish_reason}],
                "usage": _usage(event)}

    app.add_middleware(_ApiKeyMiddleware, api_key=config.api_key)
    return app

