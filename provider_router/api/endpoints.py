"""The OpenAI endpoints besides chat that a `type: openai` upstream serves: `POST
/v1/responses`, `/v1/embeddings`, `/v1/completions`, routed by the body's `model` like chat
(fallbacks, retries) and relayed as the upstream answers, streams included, one log row each.

A model whose provider translates (echo, qwen) serves chat only: such a request is a 400
that says which endpoints it does serve. (A stateful `/v1/responses` kept in the
conversation store for every upstream would start here.)
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from ..errors import ApiError
from ..providers import UpstreamReply
from ..routing import NoRoute
from ..state import RECORD, STARTED, STATE
from ..store.records import RequestRecord
from . import attempts
from .openai import _shutdown_error, _stream_error, _encode, read_body, retryable_error, sse_headers
from .validate import bad, strip_steering

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What the proxy serves, for the 404 of any other path and the 400 of a chat-only model.
SUPPORTED = (
    "POST /v1/chat/completions",
    "POST /v1/responses",
    "POST /v1/embeddings",
    "POST /v1/completions",
    "GET /v1/models",
    "GET /v1/models/{model}",
)
CHAT_ONLY = "POST /v1/chat/completions, GET /v1/models"


def endpoint(
    path: str, *, streams: bool, summarise: Callable[[bytes], bytes] | None = None, reply_format: str | None = None
) -> Handler:
    """The handler of `POST /v1{path}`; `streams`: the body's `stream` may ask for SSE;
    `summarise`: what of a successful answer the log keeps, if not all of it;
    `reply_format`: how the log writer reads the answer (text, tool calls, usage), if it can."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        rec = request[RECORD]
        rec.reply_format = reply_format  # None: the log writer keeps the body as it is
        raw, body = await read_body(request, rec)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("`model` is required: a non-empty string.", param="model")
        rec.model = model
        stream = streams and bool(body.get("stream", False))
        rec.stream = stream
        try:
            routes = state.router.chain(model)
        except NoRoute as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        served = [r for r in routes if hasattr(state.providers[r.provider.name], "call")]
        if not served:
            p = routes[0].provider
            raise ApiError(
                400, f"The model `{model}` is served by provider `{p.name}` (type {p.type}), which does not serve "
                f"POST /v1{path}; it serves {CHAT_ONLY}.", param="model", code="unsupported_endpoint",
            )  # fmt: skip
        stripped = strip_steering(raw, body)

        async def attempt(a: attempts.Attempt) -> web.StreamResponse:
            route = a.route
            rec.provider = route.provider.name
            rec.upstream_model = route.upstream_model
            data = raw
            if stripped or route.upstream_model != model:
                data = _encode({**body, "model": route.upstream_model})
            reply = await state.providers[route.provider.name].call("POST", path, data, stream)  # type: ignore[attr-defined]
            a.queue_ms = reply.queue_ms
            try:
                return await relay(request, rec, reply, stream, a.last, summarise)
            finally:
                reply.close()

        return await attempts.run(rec, served, attempt)

    return handle


async def relay(
    request: web.Request, rec: RequestRecord, reply: UpstreamReply, stream: bool, last: bool,
    summarise: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:  # fmt: skip
    """The upstream's answer to the client as it is: a stream as its pieces arrive, anything
    else whole. Raises `ApiError` only while nothing has reached the client."""
    assert reply.raw is not None and reply.read is not None
    status = reply.status
    if stream and status == 200 and reply.headers.get("content-type", "").startswith("text/event-stream"):
        return await _stream(request, rec, reply)
    if 300 <= status < 400:
        raise ApiError(502, f"upstream answered with a redirect (HTTP {status}), which is not followed", code="upstream_redirect")
    data = await reply.read()
    if (status == 429 or status >= 500) and not last:
        raise retryable_error(request, status, data, reply)
    if status >= 400:
        data = request.app[STATE].redactor.bytes(data)
        rec.outcome = "upstream_error"
        rec.error = f"upstream returned HTTP {status}: {data[:2000].decode('utf-8', 'replace')}"
        rec.response_body = data
    else:
        rec.response_body = summarise(data) if summarise is not None else data
    rec.first_byte()
    return web.Response(status=status, body=data, headers=reply.headers)


async def _stream(request: web.Request, rec: RequestRecord, reply: UpstreamReply) -> web.StreamResponse:
    """An event stream relayed piece by piece until the upstream ends it."""
    assert reply.raw is not None
    resp = web.StreamResponse(status=reply.status, headers=sse_headers(reply.headers))
    chunks: list[bytes] = []
    keep = request.app[STATE].config.logs.max_message_bytes * 4  # what the log keeps of it, as for chat
    kept = 0
    await resp.prepare(request)
    request[STARTED] = resp
    rec.status = reply.status
    try:
        async for chunk in reply.raw:
            if rec.ttfb_ms is None:
                rec.first_byte()
            if kept + len(chunk) <= keep:
                chunks.append(chunk)
                kept += len(chunk)
            else:
                rec.stream_cut += len(chunk)
            await resp.write(chunk)
    except asyncio.CancelledError:
        if not await _shutdown_error(request, resp, rec):
            raise
        return resp
    except ConnectionResetError:  # the client left: the middleware records it
        raise
    except Exception as e:
        await _stream_error(request, resp, rec, e)
        return resp
    finally:
        rec.stream_body = b"".join(chunks)
    await resp.write_eof()
    return resp


def embeddings_summary(data: bytes) -> bytes:
    """An embeddings answer as the log keeps it: model, usage and how many vectors, not the
    vectors (they are most of its size and no use in a log)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        return data
    summary: dict[str, Any] = {k: v for k, v in obj.items() if k != "data"}
    summary["data_count"] = len(obj["data"])
    return orjson.dumps(summary)


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(
        404, f"Unknown endpoint {request.method} {request.path}. Supported: {', '.join(SUPPORTED)}.", code="unknown_url"
    )


def setup(app: web.Application) -> None:
    """Route the endpoints of this module (chat and models are routed by `app.py`)."""
    app.router.add_post("/v1/responses", endpoint("/responses", streams=True, reply_format="responses"))
    app.router.add_post("/v1/embeddings", endpoint("/embeddings", streams=False, summarise=embeddings_summary))
    app.router.add_post("/v1/completions", endpoint("/completions", streams=True, reply_format="text_completion"))
