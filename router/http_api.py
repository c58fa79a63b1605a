"""The router's HTTP API (aiohttp): the OpenAI-compatible routes, health and metrics.

    GET  /health               200 {"status": "ok", "models": [...]}, 503 while no worker serves a model
    GET  /metrics              Prometheus text format 0.0.4
    GET  /v1/models            the models served now (from etcd membership)
    POST /v1/completions       a text or token-id prompt
    POST /v1/chat/completions  messages rendered with the model's chat template

Lifecycle of a POST: read the body (over ``max_body_bytes`` -> 413) -> parse and check
it (openai_schema -> 400) -> Frontend.prepare (model, tokenization, context length ->
400/404/503) -> Router.generate. The router's first item is awaited before any byte
is sent, so what a worker refuses at admission still gets its own status code; after
that, a failure reaches a stream as an SSE ``error`` event. The router's iterator is
always closed (``contextlib.aclosing``): when the client goes away (a write fails, or
the transport is closing) the iteration ends, which cancels the worker RPCs and aborts
the request on the workers.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``,
aiohttp's own (404, 405, 413) included; RequestFailed codes map to HTTP statuses in
``_HTTP_STATUS`` only. Nothing a client sends produces a 500 with a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web

from router.chat_template import ChatTemplate, ChatTemplateError
from router.frontend import Frontend
from router.openai_schema import (BadRequest, ChatShape, CompletionShape, decode_json_body, parse_chat_request,
                                  parse_completion_request)
from router.request import GenerationRequest, GenerationResult, RequestFailed, TokenChunk
from services.engine.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_DONE = b"data: [DONE]\n\n"
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))
_Items = AsyncIterator[TokenChunk | GenerationResult]  # what Router.generate yields
_ResponseShape = CompletionShape | ChatShape

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,  # no room on the workers now: retry later
    grpc.StatusCode.UNAVAILABLE: 503,  # no workers, or every attempt failed
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
_ERROR_TYPE = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               401: "authentication_error", 403: "permission_error", 503: "service_unavailable_error",
               504: "timeout_error"}


def build_http_app(frontend: Frontend, model_dir: Path | None, max_body_bytes: int) -> web.Application:
    chat_template = ChatTemplate.from_model_dir(model_dir, frontend.tokenizer)
    api = OpenAIRoutes(frontend, chat_template)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_json_errors])

    async def health(request: web.Request) -> web.Response:
        models = frontend.model_names()
        return web.json_response({"status": "ok" if models else "no_workers", "models": models},
                                 status=200 if models else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=await frontend.router.render_metrics(), headers={"Content-Type": _METRICS_CONTENT_TYPE})

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", api.models)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    return app


class OpenAIRoutes:
    """Handlers of the /v1 routes; one per app."""

    def __init__(self, frontend: Frontend, chat_template: ChatTemplate):
        self._frontend = frontend
        self._chat = chat_template
        self._started = int(time.time())

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": w.model, "object": "model", "created": self._started, "owned_by": "tandem",
                 "max_model_len": w.max_model_len}
                for w in sorted(self._frontend.router.models(), key=lambda w: w.model)]
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion_request(decode_json_body(await request.read()))
        if isinstance(req.prompt, str):  # tokenized off the event loop: a prompt may be megabytes
            prompt = await asyncio.to_thread(self._tokenizer().encode, req.prompt)
        else:
            prompt = list(req.prompt)
        gen = self._frontend.prepare(req.model, prompt, req.sampling.to_pb())
        shape = CompletionShape(f"cmpl-{gen.request_id}", gen.model, self._token_text, req.logprobs is not None)
        return await self._serve(request, gen, shape, req.stream, req.include_usage)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat_request(decode_json_body(await request.read()))
        text = self._chat.render([m.to_template() for m in req.messages])
        prompt = await asyncio.to_thread(self._chat.encode, self._tokenizer(), text)
        stops = self._chat.stops
        gen = self._frontend.prepare(req.model, prompt, req.sampling.to_pb(stops.stop, stops.stop_token_ids))
        shape = ChatShape(f"chatcmpl-{gen.request_id}", gen.model, self._token_text, req.logprobs)
        return await self._serve(request, gen, shape, req.stream, req.include_usage)

    def _tokenizer(self) -> TextTokenizer:
        if self._frontend.tokenizer is None:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                "this router has no tokenizer; send the prompt as token ids")
        return self._frontend.tokenizer

    def _token_text(self, token_id: int) -> str:
        tokenizer = self._frontend.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"

    async def _serve(self, request: web.Request, gen: GenerationRequest, shape: _ResponseShape, stream: bool,
                     include_usage: bool) -> web.StreamResponse:
        async with contextlib.aclosing(self._frontend.router.generate(gen)) as items:
            first = await _next(items)  # errors up to here get their own HTTP status
            if stream:
                return await _stream(request, first, items, shape, include_usage)
            return await _collect(request, first, items, shape)


async def _next(items: _Items) -> TokenChunk | GenerationResult:
    try:
        return await anext(items)
    except StopAsyncIteration:  # the router always ends with a result; this would be its bug
        raise RequestFailed(grpc.StatusCode.INTERNAL, "the generation ended without a result") from None


async def _finish(items: _Items) -> None:
    """Run the router's iterator past its result to its end: closing it at the result instead
    would count the request as cancelled."""
    async for _ in items:
        pass


async def _collect(request: web.Request, item: TokenChunk | GenerationResult, items: _Items,
                   shape: _ResponseShape) -> web.Response:
    chunks: list[TokenChunk] = []
    while not isinstance(item, GenerationResult):
        chunks.append(item)
        if _client_gone(request):
            return web.Response(status=_CLIENT_CLOSED_REQUEST, reason="Client Closed Request")
        item = await _next(items)
    await _finish(items)
    return web.json_response(shape.full(chunks, item), dumps=_dumps)


async def _stream(request: web.Request, item: TokenChunk | GenerationResult, items: _Items, shape: _ResponseShape,
                  include_usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    try:
        try:
            for body in shape.opening():
                await _send(response, body)
            while not isinstance(item, GenerationResult):
                body = shape.delta(item)
                if body is not None:
                    await _send(response, body)
                elif _client_gone(request):
                    return response
                item = await _next(items)
            await _finish(items)
            await _send(response, shape.closing(item))
            if include_usage:
                await _send(response, shape.usage_chunk(item))
        except RequestFailed as e:  # after the headers: the error travels as an event
            log.warning("stream %s failed: %s", shape.id, e.message)
            await _send(response, {"error": _error_body(_http_status(e.code), e.message)})
        await response.write(_SSE_DONE)
        await response.write_eof()
    except ConnectionError:  # the client went away; leaving closes the router's iterator
        log.info("client of %s went away mid-stream", shape.id)
    return response


async def _send(response: web.StreamResponse, body: dict[str, Any]) -> None:
    await response.write(b"data: " + _dumps(body).encode() + b"\n\n")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# -- errors ---------------------------------------------------------------------------------


def _http_status(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(_error_body(status, message, param, code), status=status, headers=headers,
                             dumps=_dumps)


@web.middleware
async def _json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure of every route as an OpenAI-style JSON error."""
    try:
        return await handler(request)
    except BadRequest as e:
        return _error_response(400, e.message, e.param)
    except ChatTemplateError as e:
        return _error_response(400, str(e), "messages")
    except RequestFailed as e:
        status = _http_status(e.code)
        if status >= 500:
            log.warning("%s %s failed: %s %s", request.method, request.path, e.code.name, e.message)
        not_found = e.code is grpc.StatusCode.NOT_FOUND
        return _error_response(status, e.message, "model" if not_found else None,
                               "model_not_found" if not_found else e.code.name.lower())
    except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
        if e.status < 400:
            raise
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        generic = not e.text or e.text.startswith(f"{e.status}:")  # aiohttp's "405: Method Not Allowed"
        message = f"{e.reason}: {request.method} {request.path}" if generic else e.text
        return _error_response(e.status, message, None, e.reason.lower().replace(" ", "_"), allow)
    except Exception:  # a bug of ours: log it, tell the client no more than that
        log.exception("%s %s: internal error", request.method, request.path)
        return _error_response(500, "internal error in the router", None, "internal_error")
