"""The ids a response carries: `X-Request-Id` on every response, and on a request that joined
a session `X-Session-Id` and `X-Session-New`; off /v1, the headers a part of the app asks
for under its path (`PATH_HEADERS`: the dashboard's). Stamped where the response starts: by
the edge on the response a handler returns (or the error it answers), by `streams.start` on
a stream, whose head goes out from inside the handler.
"""

from __future__ import annotations

from typing import Callable

from aiohttp import web

from ..sessions import CREATED, JOINED
from ..records import RequestRecord
from ..state import REQUEST_ID

# (path prefix, what to put on a response under it), for the parts of the app off /v1:
# set here rather than by an `on_response_prepare` signal, which aiohttp would dispatch for
# every response of the app, each /v1 one included.
PATH_HEADERS: web.AppKey[list[tuple[str, Callable[[web.StreamResponse], None]]]] = web.AppKey("path_headers")


def stamp(request: web.Request, response: web.StreamResponse, rec: RequestRecord | None) -> None:
    """Put the request's ids on `response`, whose head has not gone out yet; `rec`: the
    request's record (None off /v1)."""
    headers = response.headers
    headers["X-Request-Id"] = request[REQUEST_ID]
    if rec is None:
        path = request.path
        for prefix, add in request.app.get(PATH_HEADERS, ()):
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                add(response)
        return
    if rec.session_id is not None:
        headers["X-Session-Id"] = rec.session_id
        joined = request.get(JOINED)
        if joined is not None and joined.id == rec.session_id:
            headers["X-Session-New"] = "true" if request.get(CREATED) is joined else "false"
