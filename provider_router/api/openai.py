"""The OpenAI chat surface: `POST /v1/chat/completions`.

The only module that knows OpenAI's JSON shapes. Pass-through upstreams are forwarded
byte for byte as their chunks arrive; translating providers' events are rendered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any, Awaitable, Callable, Mapping

import orjson
import structlog
from aiohttp import web

from ..errors import ApiError, shown
from ..providers import ChatCall, Delta, Finish, Provider, Started, UpstreamReply, Usage
from ..routing import NoRoute
from ..sse import DONE, encode_event
from ..state import RECORD, STARTED, STATE
from ..store.records import RequestRecord
from . import attempts
from .validate import JSON_TYPES, bad, has_nul, parse_body, strip_steering, validate_chat

log = structlog.get_logger("provider_router.api")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
MAX_MESSAGES = 10_000


# -- request intake ----------------------------------------------------------------------
async def read_body(request: web.Request, rec: RequestRecord) -> tuple[bytes, dict[str, Any]]:
    # The media type without parameters; aiohttp's `content_type` parses with the email
    # package (~5 us a request), more than this check needs.
    ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, not {ctype!r}.", code="unsupported_media_type")
    limit = request.app[STATE].config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large") from None
    rec.request_body = raw
    if ctype == "application/x-www-form-urlencoded" and not raw.lstrip().startswith(b"{"):
        # curl -d sends this type; we accept it only when the body is really JSON.
        raise ApiError(
            415, "The request body must be a JSON object, sent as application/json (this one is a form, "
            "application/x-www-form-urlencoded, and not JSON).", code="unsupported_media_type",
        )  # fmt: skip
    body = parse_body(raw)
    if has_nul(raw):
        raise bad("The request contains a NUL character (\\u0000), which is not accepted.", code="invalid_text")
    return raw, body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    rec = request[RECORD]
    raw, body = await read_body(request, rec)
    model = body.get("model")
    if isinstance(model, str):
        rec.model = model
    validate_chat(body, max_messages=MAX_MESSAGES)
    stream = bool(body.get("stream", False))
    rec.stream = stream
    try:
        routes = state.router.chain(model)
    except NoRoute as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    stripped = strip_steering(raw, body)

    def attempt(a: attempts.Attempt) -> Awaitable[web.StreamResponse]:
        return _attempt(request, rec, a, body, raw, stripped, stream)

    return await attempts.run(rec, routes, attempt)


async def _attempt(
    request: web.Request,
    rec: RequestRecord,
    a: attempts.Attempt,
    body: dict[str, Any],
    raw: bytes,
    stripped: bool,
    stream: bool,
) -> web.StreamResponse:
    """One try on one route. Raises `ApiError` only while nothing has reached the client."""
    state = request.app[STATE]
    route = a.route
    rec.provider = route.provider.name
    rec.upstream_model = route.upstream_model
    renamed = route.upstream_model != rec.model
    if renamed:
        body = {**body, "model": route.upstream_model}
    call = ChatCall(
        body=body,
        raw=_encode(body) if (stripped or renamed) else raw,
        stream=stream,
        upstream_model=route.upstream_model,
    )
    provider = state.providers[route.provider.name]
    threads = state.threads
    if threads is not None and provider.threaded:

        def relay() -> Awaitable[web.StreamResponse]:
            return _relay(request, rec, provider, call, a)

        return await threads.handle(request, rec, route, call, relay)
    if threads is not None:
        await threads.join(request, rec, route, call)
    return await _relay(request, rec, provider, call, a)


async def _relay(
    request: web.Request, rec: RequestRecord, provider: Provider, call: ChatCall, a: attempts.Attempt
) -> web.StreamResponse:
    reply = await provider.chat(call)
    a.queue_ms = reply.queue_ms
    try:
        if reply.raw is not None:
            rec.reply_format = "chat"  # the log writer reads the reply (a stream's events) from it
            return await relay_answer(request, rec, reply, call.stream, a.last)
        return await _render(request, rec, reply, call)
    finally:
        reply.close()


# -- pass-through (openai) ---------------------------------------------------------------
async def relay_answer(
    request: web.Request, rec: RequestRecord, reply: UpstreamReply, stream: bool, last: bool,
    summarise: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:  # fmt: skip
    """An upstream's answer to the client as it is (every pass-through endpoint): an event
    stream as its pieces arrive, anything else whole; `summarise`: what of a successful
    answer the log keeps, if not all of it. Raises `ApiError` only while nothing has
    reached the client."""
    assert reply.raw is not None and reply.read is not None
    status = reply.status
    if stream and status == 200 and reply.headers.get("content-type", "").startswith("text/event-stream"):
        return await relay_stream(request, rec, reply)
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


def retryable_error(request: web.Request, status: int, data: bytes, reply: UpstreamReply) -> ApiError:
    """An upstream 429 / 5xx that another attempt may get past, paced by its Retry-After."""
    text = request.app[STATE].redactor.bytes(data)[:500].decode("utf-8", "replace")  # redacted, then cut
    e = ApiError(status if status == 429 else 502, f"upstream returned HTTP {status}: {text}", retryable=True)
    e.retry_after = attempts.retry_after(reply.headers)
    return e


def sse_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """Ours for an event stream, with the upstream's passed-on ones (lower-case names),
    each name once: the upstream's Content-Type replaces ours."""
    return {**{k: v for k, v in SSE_HEADERS.items() if k.lower() not in upstream}, **upstream}


# How the end of a complete stream reads (besides `[DONE]`): a chat or text completion's
# finish reason; the Responses API's final event.
FINISHED = re.compile(rb'"finish_reason"\s*:\s*"|"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')
_DONE_LINE = b"\ndata: [DONE]"


async def relay_stream(request: web.Request, rec: RequestRecord, reply: UpstreamReply) -> web.StreamResponse:
    """Forward an upstream's event stream as it arrives. What is kept for the log is bounded
    (`logs.max_message_bytes` x 4; the rest is counted as cut). Once `data: [DONE]` has gone
    out the reply is complete: the proxy ends the response there, whatever the upstream
    does next (some linger before closing, and the SDK closes its side at once). A stream
    the upstream ends with neither `[DONE]` nor a final event (`FINISHED`) was cut short:
    the client gets an error event and the row says `upstream_error`."""
    assert reply.raw is not None
    resp = web.StreamResponse(status=reply.status, headers=sse_headers(reply.headers))
    chunks: list[bytes] = []
    keep = request.app[STATE].config.logs.max_message_bytes * 4
    kept = 0
    await resp.prepare(request)
    request[STARTED] = resp
    rec.status = reply.status
    write = resp.write
    tail = b"\n"
    done = False
    try:
        async for chunk in reply.raw:
            if kept == 0 and rec.ttfb_ms is None:
                rec.first_byte()
            if kept + len(chunk) <= keep:
                chunks.append(chunk)
                kept += len(chunk)
            else:
                rec.stream_cut += len(chunk)
            await write(chunk)
            if _DONE_LINE in tail + chunk:
                done = True
                break
            tail = chunk[-len(_DONE_LINE):]
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
    if not done and not FINISHED.search(rec.stream_body[-65536:]):
        await _stream_error(request, resp, rec, ApiError(
            502, "The upstream stream ended before the reply finished (no final event, no [DONE]).",
            code="upstream_truncated", outcome="upstream_error",
        ))  # fmt: skip
        return resp
    with contextlib.suppress(ConnectionResetError):  # complete: a client that left already is fine
        await resp.write_eof()
    return resp


def _encode(body: dict[str, Any]) -> bytes:
    """A body we changed, encoded again for the upstream."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as e:  # orjson writes ~250 levels; it reads 1024
        raise bad(f"The request body cannot be forwarded as changed: {e}.", code="invalid_json") from None


async def _stream_error(request: web.Request, resp: web.StreamResponse, rec: RequestRecord, exc: Exception) -> None:
    """Mid-stream failure: an SSE error event and no `[DONE]`, so clients see it failed;
    never a second response. Anything but an `ApiError` (an upstream event we could not
    read, a bug) is logged and told as a 502."""
    if isinstance(exc, ApiError):
        e = exc
    else:
        log.exception("stream_failed")
        e = ApiError(502, f"The upstream reply could not be relayed ({type(exc).__name__}).", code="upstream_error", outcome="upstream_error")
    e.message = shown(request.app[STATE].redactor, e.message)
    rec.outcome = e.outcome
    rec.error = e.message
    rec.status = resp.status
    payload = e.payload()
    payload["error"]["status"] = e.status
    await resp.write(encode_event(orjson.dumps(payload)))
    await resp.write_eof()


async def _shutdown_error(request: web.Request, resp: web.StreamResponse, rec: RequestRecord) -> bool:
    """A stream the proxy itself ended (shutdown grace over) gets a clear error event; True
    if so. A stream cut because its client left has no one to tell: False, nothing written."""
    task = asyncio.current_task()
    if not request.app[STATE].ending or task is None or not task.cancelling():
        return False
    task.uncancel()
    err = ApiError(503, "The proxy is shutting down; the stream was ended.", code="proxy_shutdown", outcome="shutdown")
    try:
        async with asyncio.timeout(1.0):
            await _stream_error(request, resp, rec, err)
    except Exception:  # the client may be gone too; the record still says what happened
        rec.outcome, rec.error = err.outcome, err.message
    return True


# -- translating providers (echo, qwen) ---------------------------------------------------
class _Reply:
    """Accumulates a translated reply as its events arrive."""

    __slots__ = ("text", "reasoning", "usage", "finish", "reply_id", "chat_id", "chunks")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.reply_id: str | None = None
        self.chat_id: str | None = None
        self.chunks = 0

    def take(self, ev: object) -> None:
        if isinstance(ev, Delta):
            if ev.content:
                self.text.append(ev.content)
            if ev.reasoning:
                self.reasoning.append(ev.reasoning)
        elif isinstance(ev, Usage):
            self.usage = ev
        elif isinstance(ev, Finish):
            self.finish = ev.reason
        elif isinstance(ev, Started):
            self.reply_id = ev.reply_id or self.reply_id
            self.chat_id = ev.chat_id or self.chat_id

    def fill(self, rec: RequestRecord) -> None:
        rec.response_text = "".join(self.text)
        rec.reasoning_text = "".join(self.reasoning) or None
        rec.finish_reason = self.finish
        rec.reply_id = self.reply_id or rec.reply_id
        rec.chat_id = self.chat_id or rec.chat_id
        if self.usage is not None:
            rec.prompt_tokens = self.usage.prompt_tokens
            rec.completion_tokens = self.usage.completion_tokens
            rec.total_tokens = self.usage.total_tokens


async def _open_stream(request: web.Request, rec: RequestRecord) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    request[STARTED] = resp
    rec.status = 200
    rec.first_byte()
    return resp


def _usage_json(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def _completion(acc: _Reply, cid: str, created: int, model: Any, cut: bool = False) -> dict[str, Any]:
    """The reply as a `chat.completion` (what a non-stream client gets, and what the log
    keeps of a stream); `cut`: it never finished, so no finish reason is made up."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(acc.text)}
    if acc.reasoning:
        message["reasoning_content"] = "".join(acc.reasoning)
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": acc.finish or (None if cut else "stop")}],
    }
    if acc.usage is not None:
        out["usage"] = _usage_json(acc.usage)
    return out


async def _completed(rec: RequestRecord, acc: _Reply, call: ChatCall) -> None:
    """The upstream's reply is complete: the thread records it (durably) before the client
    gets its end, so the client's next turn finds it."""
    acc.fill(rec)
    if call.on_complete is not None and acc.finish is not None:
        await call.on_complete()


async def _render(request: web.Request, rec: RequestRecord, reply: UpstreamReply, call: ChatCall) -> web.StreamResponse:
    assert reply.events is not None
    acc = _Reply()
    events = reply.events
    cid = f"chatcmpl-{rec.id}"
    created = int(time.time())
    model = call.body.get("model", call.upstream_model)
    rec.reply_format = "chat"  # the log reads the reply from `response_body`
    if not call.stream:
        try:
            async for ev in events:
                acc.take(ev)
        finally:
            acc.fill(rec)
        data = orjson.dumps(_completion(acc, cid, created, model))
        rec.response_body = data
        await _completed(rec, acc, call)
        rec.first_byte()
        return web.Response(body=data, content_type="application/json")

    opts = call.body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage"))
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    resp: web.StreamResponse | None = None
    first = True
    try:
        async for ev in events:
            acc.take(ev)
            if isinstance(ev, Delta):
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if ev.content:
                    delta["content"] = ev.content
                if ev.reasoning:
                    delta["reasoning_content"] = ev.reasoning
                chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            elif isinstance(ev, Finish):
                chunk = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": ev.reason}]}
            else:
                continue
            if resp is None:
                resp = await _open_stream(request, rec)
            first = False
            acc.chunks += 1
            await resp.write(encode_event(orjson.dumps(chunk)))
        if resp is None:  # a reply with no content at all still gets a well-formed stream
            resp = await _open_stream(request, rec)
        if include_usage and acc.usage is not None:
            await resp.write(encode_event(orjson.dumps({**head, "choices": [], "usage": _usage_json(acc.usage)})))
        rec.response_body = orjson.dumps(_completion(acc, cid, created, model))
        await _completed(rec, acc, call)
        await resp.write(DONE)
        await resp.write_eof()
    except asyncio.CancelledError:
        if resp is None or not await _shutdown_error(request, resp, rec):
            raise
    except ConnectionResetError:  # the client left: the middleware records it
        raise
    except Exception as e:  # ChatGone included: once the stream started, nothing is resent
        if resp is None:
            raise
        await _stream_error(request, resp, rec, e)
    finally:
        acc.fill(rec)
        rec.chunk_count = acc.chunks
        if rec.response_body is None:  # cut short: the log keeps what came
            rec.response_body = orjson.dumps(_completion(acc, cid, created, model, cut=True))
    return resp
