"""The ids a response carries: `X-Request-Id` on every response, and on a request that joined
a session `X-Session-Id` and `X-Session-New`. Stamped where the response starts: by the edge
on the response a handler returns (or the error it answers), by `streams.start` on a stream,
whose head goes out from inside the handler.
"""

from __future__ import annotations

from aiohttp import web

from ..sessions import JOINED, STARTED_IT
from ..records import RequestRecord
from ..state import REQUEST_ID


def stamp(request: web.Request, response: web.StreamResponse, rec: RequestRecord | None) -> None:
    """Put the request's ids on `response`, whose head has not gone out yet; `rec`: the
    request's record (None off /v1)."""
    headers = response.headers
    headers["X-Request-Id"] = request[REQUEST_ID]
    if rec is not None and rec.session_id is not None:
        headers["X-Session-Id"] = rec.session_id
        joined = request.get(JOINED)
        if joined is not None and joined.id == rec.session_id:
            headers["X-Session-New"] = "true" if request[STARTED_IT] else "false"
