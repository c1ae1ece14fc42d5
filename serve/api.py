"""The OpenAI-compatible HTTP API (FastAPI) over one Engine.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`stream: true`: server-sent
events, `data: {...}` chunks then `data: [DONE]`), GET /health, GET /metrics. Every refusal is an
OpenAI-style JSON error (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status:
malformed JSON or fields (400), a wrong API key (401), an unknown model (404), a prompt or
max_tokens beyond the context or the server's limit (400), a full queue (429). An unexpected
failure is a 500 with the exception's type and one log line, never a traceback. A client that
disconnects cancels its sequence at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueueFull, Sampling, Sequence
from .metrics import Metrics
from .schemas import APIError, ChatRequest, CompletionRequest, error_response

log = logging.getLogger("vptq.serve")

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    return f"{where}: {e.get('msg', 'invalid')}", loc[0] if loc else None  # param: the top-level field


def create_app(engine: Engine, model_id: str, *, api_key: str | None = None, max_tokens_limit: int = 2048,
               default_completion_tokens: int = 16) -> FastAPI:
    """The app serving engine's model under the name model_id."""
    app = FastAPI(title="vptq serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return error_response(exc.status_code, str(exc.detail), None, code)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Count every response; turn an unexpected exception into a 500 without a traceback."""
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 - the one place that maps the unexpected
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
            response = error_response(500, f"internal error ({type(e).__name__})", type_="server_error")
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send Authorization: Bearer KEY", None,
                           "invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {model_id!r}", "model",
                           "model_not_found")

    def sampling(req, n_prompt: int, default: int | None) -> Sampling:
        limit = req.limit()
        stops = req.stops()
        ctx = engine.context
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty (no tokens)", "prompt")
        if n_prompt >= ctx:
            raise APIError(400, f"the prompt has {n_prompt} tokens; the model's context is {ctx} tokens",
                           "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
        room = ctx - n_prompt
        if limit is None:
            limit = min(default or room, room, max_tokens_limit)
        elif limit > max_tokens_limit:
            raise APIError(400, f"max_tokens: {limit} exceeds this server's limit of {max_tokens_limit}",
                           "max_tokens")
        elif limit > room:
            raise APIError(400, f"max_tokens: {limit} + {n_prompt} prompt tokens exceed the model's context of "
                           f"{ctx} tokens", "max_tokens", "context_length_exceeded")
        return Sampling(limit, req.temperature, req.top_p, stops, req.seed)

    @app.get("/health")
    async def health():
        alive = engine.thread is not None and engine.thread.is_alive()
        body = {"status": "ok" if alive else "down", "model": model_id, "running": engine.running,
                "waiting": engine.queue_depth}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "vptq-service"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await run(request, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        return await run(request, req, chat=True)

    async def run(request: Request, req, chat: bool):
        authorize(request)
        check_model(req.model)
        ids = engine.chat_ids(req.conversation()) if chat else engine.encode(req.text())
        s = sampling(req, len(ids), None if chat else default_completion_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = Sequence(ids, s, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(seq)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", None, "rate_limit_exceeded",
                           "rate_limit_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        now = int(time.time())

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": len(seq.out_ids),
                    "total_tokens": len(ids) + len(seq.out_ids)}

        def record() -> None:
            metrics.prompt_tokens.inc(len(ids))
            metrics.completion_tokens.inc(len(seq.out_ids))
            metrics.latency.labels(endpoint).observe(time.perf_counter() - seq.created)
            if seq.first_token_at is not None:
                metrics.ttft.observe(seq.first_token_at - seq.created)

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                        "choices": [choice]}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                body = {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                        "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        if req.stream:
            async def stream():
                try:
                    if chat:
                        yield chunk(None, None, first=True)
                    while True:
                        kind, val = await events.get()
                        if kind == "text":
                            yield chunk(val, None)
                        elif kind == "error":
                            err = {"error": {"message": val, "type": "server_error", "param": None, "code": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                            break
                        else:
                            yield chunk(None, val)
                            if req.include_usage():
                                body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                        "created": now, "model": model_id, "choices": [], "usage": usage()}
                                yield f"data: {json.dumps(body)}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                    record()
                finally:
                    seq.cancel()  # a no-op once finished; else the client went away

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        parts: list[str] = []
        try:
            while True:
                try:
                    kind, val = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if kind == "text":
                    parts.append(val)
                elif kind == "error":
                    raise APIError(500, val, type_="server_error")
                else:
                    finish = val
                    break
        finally:
            seq.cancel()
        record()
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice],
                "usage": usage()}

    return app
