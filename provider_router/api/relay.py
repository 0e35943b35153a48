"""Relaying a pass-through upstream's answer (every endpoint of an `openai` provider, chat
included): an event stream forwarded as its pieces arrive, anything else whole; the log
keeps the bytes (the writer process reads them, `replies.py`).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Mapping

from aiohttp import web

from ..errors import ApiError
from ..providers import UpstreamReply
from ..state import STATE
from ..records import RequestRecord
from . import attempts, streams
from .outcome import tell

# How the end of a complete stream reads (besides `[DONE]`): a chat or text completion's
# finish reason; the Responses API's final event.
FINISHED = re.compile(rb'"finish_reason"\s*:\s*"|"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')
_DONE_LINE = b"\ndata: [DONE]"


async def relay_answer(
    request: web.Request, rec: RequestRecord, reply: UpstreamReply, stream: bool, last: bool,
    summarise: Callable[[bytes], bytes] | None = None,
) -> web.StreamResponse:  # fmt: skip
    """An upstream's answer to the client as it is; `last`: no attempt comes after this
    one; `summarise`: what of a successful answer the log keeps, if not all of it. Raises
    `ApiError` only while nothing has reached the client."""
    assert reply.raw is not None and reply.read is not None
    status = reply.status
    if stream and status == 200 and reply.headers.get("content-type", "").startswith("text/event-stream"):
        return await relay_stream(request, rec, reply)
    if 300 <= status < 400:
        raise ApiError(502, f"upstream answered with a redirect (HTTP {status}), which is not followed", code="upstream_redirect")
    data = await reply.read()
    if status == 429 or status >= 500:
        if not last:
            text = request.app[STATE].redactor.bytes(data)[:500].decode("utf-8", "replace")  # redacted, then cut
            raise attempts.retryable(status, f"upstream returned HTTP {status}: {text}", reply.headers)
    if status >= 400:
        data = request.app[STATE].redactor.bytes(data)
        tell(request, ApiError(status, f"upstream returned HTTP {status}: {data[:2000].decode('utf-8', 'replace')}", outcome="upstream_error"))
        rec.response_body = data
    else:
        rec.response_body = summarise(data) if summarise is not None else data
    rec.first_byte()
    return web.Response(status=status, body=data, headers=reply.headers)


def sse_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """Ours for an event stream, with the upstream's passed-on ones (lower-case names),
    each name once: the upstream's Content-Type replaces ours."""
    return {**{k: v for k, v in streams.SSE_HEADERS.items() if k.lower() not in upstream}, **upstream}


async def relay_stream(request: web.Request, rec: RequestRecord, reply: UpstreamReply) -> web.StreamResponse:
    """Forward an upstream's event stream as it arrives. What is kept for the log is bounded
    (`logs.max_message_bytes` x 4; the rest is counted as cut). Once `data: [DONE]` has gone
    out the reply is complete: the proxy ends the response there, whatever the upstream
    does next (some linger before closing, and the SDK closes its side at once). A stream
    the upstream ends with neither `[DONE]` nor a final event (`FINISHED`) was cut short:
    the client gets an error event and the row says `upstream_error`."""
    assert reply.raw is not None
    resp = await streams.start(request, reply.status, sse_headers(reply.headers))
    chunks: list[bytes] = []
    keep = request.app[STATE].config.logs.max_message_bytes * 4
    kept = 0
    write = resp.write
    tail = b"\n"
    done = False
    async with streams.told_in_stream(request):
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
        finally:
            rec.stream_body = b"".join(chunks)
        if not done and not FINISHED.search(rec.stream_body[-65536:]):
            raise ApiError(
                502, "The upstream stream ended before the reply finished (no final event, no [DONE]).",
                code="upstream_truncated", outcome="upstream_error",
            )  # fmt: skip
        with contextlib.suppress(ConnectionResetError):  # complete: a client that left already is fine
            await resp.write_eof()
    return resp
