"""The ASGI application of `megatron-vita serve` (FastAPI on Starlette, run by uvicorn).

Owns the HTTP side: routes, the request-size limit (counted while the body is read, so a lying
or missing Content-Length cannot get around it), malformed bodies, server-sent events, and the
mapping of every refusal to a 4xx in OpenAI's error shape. The work itself is elsewhere: media in
`media`, request/response formats in `openai_protocol` and `legacy`, the queue in `scheduler`.

Routes: `POST /v1/chat/completions` (JSON, or SSE chunks ending in `data: [DONE]` with
`"stream": true`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, and the original
server's `PUT /api`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron_vita.inference.api import GenerationResult
from megatron_vita.serve.legacy import legacy_answer, parse_legacy_request
from megatron_vita.serve.media import RequestMedia
from megatron_vita.serve.openai_protocol import Completion, parse_chat_request
from megatron_vita.serve.scheduler import Job, Scheduler
from megatron_vita.serve.settings import ApiError, ServeSettings

log = logging.getLogger("megatron_vita.serve")

# An oversize body is still read (and dropped) up to this many times the limit, so the client
# gets its 413 instead of a connection reset mid-upload; beyond it the connection is closed.
_DRAIN_FACTOR = 8
# How often a waiting non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client closed the connection while its request waited or ran."""


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def generation_error(e: BaseException) -> ApiError:
    """What a Generator's exception means to the client: its own bad request, or our failure."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (ValueError, FileNotFoundError)):
        return ApiError(400, str(e) or type(e).__name__, code="invalid_request")
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", code="generation_failed")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes (413) and malformed JSON (400)."""
    too_big = ApiError(413, f"the request body exceeds the server's limit --max-request-mb {limit / 2**20:g}",
                       code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit * _DRAIN_FACTOR:
        raise too_big
    body = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit * _DRAIN_FACTOR:
            raise too_big
        if size <= limit:
            body += chunk
    if size > limit:
        raise too_big
    try:
        return json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def next_event(job: Job, request: Request) -> tuple:
    """The job's next event; ClientGone (and the job cancelled) if the client leaves meanwhile."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=_DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone()
    finally:
        if not getter.done():
            getter.cancel()


def create_app(generator, settings: ServeSettings) -> FastAPI:
    """The server for one Generator. The scheduler's worker starts with the app's lifespan."""
    state: Dict[str, Optional[Scheduler]] = {"scheduler": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = Scheduler(generator, settings.max_concurrency)
        app.state.scheduler = state["scheduler"]
        try:
            yield
        finally:
            state["scheduler"].close()

    app = FastAPI(title="megatron-vita", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       code="not_found" if e.status_code == 404 else None))

    async def admit(request: Request, parse) -> tuple:
        """Read, parse and check a body. The caller releases the media it gets (refused: at once)."""
        body = await read_json(request, settings.max_request_bytes)
        media = RequestMedia(settings)
        try:
            parsed = await run_in_threadpool(parse, body, settings, media)
        except BaseException:
            media.release()
            raise
        return parsed, media

    def queue(gen_request, media: RequestMedia, stream: bool) -> Job:
        """Queue a generation that holds the request's media until it ends."""
        job = Job(gen_request, stream, asyncio.get_running_loop(), cleanup=media.hold())
        try:
            state["scheduler"].submit(job)
        except BaseException:
            media.release()
            raise
        return job

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        (gen_request, stream, include_usage), media = await admit(request, parse_chat_request)
        try:
            job = queue(gen_request, media, stream)
        finally:
            media.release()
        completion = Completion(settings.model_name)
        # The first event decides the status: a prompt the Generator refuses (too long for
        # --max-seq-len, ...) is a 4xx for a stream too, not an error chunk after a 200.
        try:
            first = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if first[0] == "error":
            return error_response(generation_error(first[1]))
        if stream:
            return StreamingResponse(_sse(job, completion, include_usage, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(completion.answer(first[1]))

    @app.put("/api")
    async def legacy_api(request: Request):
        requests, media = await admit(request, parse_legacy_request)
        texts: List[str] = []
        try:
            for gen_request in requests:
                kind, value = await next_event(queue(gen_request, media, False), request)
                if kind == "error":
                    return error_response(generation_error(value))
                texts.append(value.text)
        except ClientGone:
            return Response(status_code=499)
        finally:
            media.release()
        return JSONResponse(legacy_answer(texts))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(settings.model_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                           f"{settings.model_name!r}", param="model", code="model_not_found")
        return _model_card(model_id)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **state["scheduler"].stats()}

    return app


_STARTED = int(time.time())


def _model_card(name: str) -> Dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "megatron-vita"}


def _data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(job: Job, completion: Completion, include_usage: bool, first: tuple) -> AsyncIterator[str]:
    """OpenAI's chunk stream from the job's `first` event on: the role, one chunk per text piece,
    the finish reason, optionally the usage, then `[DONE]`. A client that leaves cancels the job
    (Starlette cancels this iterator when it sees the disconnect)."""
    try:
        yield _data(completion.chunk({"role": "assistant", "content": ""}))
        kind, value = first
        while True:
            if kind == "piece":
                if value:
                    yield _data(completion.chunk({"content": value}))
                kind, value = await job.events.get()
                continue
            if kind == "error":
                yield _data(generation_error(value).body())
                break
            result: GenerationResult = value
            yield _data(completion.chunk({}, result.finish_reason))
            if include_usage:
                yield _data(completion.usage_chunk(result))
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
