"""A streamed response once its head went out: an HTTP response has one head, so whatever
fails after it (the upstream, the proxy's own shutdown) is told as an SSE error event and
the stream ends without `[DONE]`, for relayed and rendered streams alike.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator, Mapping

import orjson
import structlog
from aiohttp import web

from ..errors import ApiError, shown
from ..sse import encode_event
from ..state import RECORD, STARTED, STATE
from .ids import stamp
from .outcome import tell

log = structlog.get_logger("provider_router.api")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


async def start(request: web.Request, status: int = 200, headers: Mapping[str, str] = SSE_HEADERS) -> web.StreamResponse:
    """Send a stream's head; from now on the request has no other response."""
    resp = web.StreamResponse(status=status, headers=headers)
    stamp(request, resp, request[RECORD])
    await resp.prepare(request)
    request[STARTED] = resp
    return resp


@asynccontextmanager
async def told_in_stream(request: web.Request) -> AsyncIterator[None]:
    """Around the writing of a stream: a failure once its head went out is told in the
    stream, which ends there (a client that left has no one to tell: that propagates);
    before the head, a failure propagates, to be answered or retried."""
    try:
        yield
    except asyncio.CancelledError:
        resp = request.get(STARTED)
        if resp is None or not await _ended_by_shutdown(request, resp):
            raise
    except ConnectionResetError:  # the client left: the middleware records it
        raise
    except Exception as e:  # ChatGone included: once the stream started, nothing is resent
        resp = request.get(STARTED)
        if resp is None:
            raise
        await fail(request, resp, e)


async def fail(request: web.Request, resp: web.StreamResponse, exc: Exception) -> None:
    """End a started stream with an SSE error event and no `[DONE]`, so clients see it
    failed. Anything but an `ApiError` (an upstream event we could not read, a bug) is
    logged and told as a 502."""
    if isinstance(exc, ApiError):
        e = exc
    else:
        log.exception("stream_failed")
        e = ApiError(502, f"The upstream reply could not be relayed ({type(exc).__name__}).", code="upstream_error", outcome="upstream_error")
    e.message = shown(request.app[STATE].redactor, e.message)
    tell(request, e)
    payload = e.payload()
    payload["error"]["status"] = e.status
    await resp.write(encode_event(orjson.dumps(payload)))
    await resp.write_eof()


async def _ended_by_shutdown(request: web.Request, resp: web.StreamResponse) -> bool:
    """A stream the proxy itself ended (shutdown grace over) gets a clear error event; True
    if so. A stream cut because its client left has no one to tell: False, nothing written."""
    task = asyncio.current_task()
    if not request.app[STATE].ending or task is None or not task.cancelling():
        return False
    task.uncancel()
    err = ApiError(503, "The proxy is shutting down; the stream was ended.", code="proxy_shutdown", outcome="shutdown")
    tell(request, err)
    try:
        async with asyncio.timeout(1.0):
            await fail(request, resp, err)
    except Exception:  # the client may be gone too; the record says what happened already
        pass
    return True
