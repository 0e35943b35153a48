"""The edge of every request: request id, client auth, OpenAI-shaped errors, and the
request's one log record and one canonical log line, whatever happens (disconnects too).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import structlog
from aiohttp import web

from .api.ids import stamp
from .api.outcome import settle
from .errors import ApiError, shown
from .state import RECORD, REQUEST_ID, STARTED, STATE, State
from .records import RequestRecord, new_id, request_line

log = structlog.get_logger("provider_router.request")


def key_digest(key: str) -> str:
    # Look keys up by digest: no secret-dependent early exit in a string compare.
    return hashlib.sha256(key.encode()).hexdigest()


def _client_name(request: web.Request, keys: dict[str, str]) -> str:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    name = keys.get(key_digest(token.strip())) if scheme.lower() == "bearer" and token else None
    if name is None:
        raise ApiError(
            401,
            "Missing or invalid API key: send a configured client key as `Authorization: Bearer <key>`.",
            code="invalid_api_key",
        )
    return name


def _is_utf8(value: str) -> bool:
    # aiohttp decodes header bytes with `surrogateescape`: bytes that are not UTF-8 come out
    # as lone surrogates, which SQLite and orjson refuse (a 500 and a lost row, before).
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_headers(request: web.Request) -> None:
    for name, value in request.headers.items():
        if not value.isascii() and not _is_utf8(value):  # most values are ASCII: no call for them
            raise ApiError(400, f"The value of the {name} header is not valid UTF-8.", param=name, code="invalid_header")


def _answer(request: web.Request, resp: web.StreamResponse, rec: RequestRecord | None) -> web.StreamResponse:
    """`resp`, which the edge returns, with the request's ids on it, unless its head went
    out already (a stream stamped them as it started)."""
    if not resp.prepared:
        stamp(request, resp, rec)
    return resp


def _unless_started(request: web.Request, error: web.Response) -> web.StreamResponse:
    """The error response, unless a stream's head already went out: then that stream, to be
    ended as it is (an HTTP response has one head; a second would corrupt the stream)."""
    started = request.get(STARTED)
    return error if started is None else started


def _error_response(e: ApiError) -> web.Response:
    return web.Response(status=e.status, body=e.body(), content_type="application/json")


def _from_http_exception(e: web.HTTPException) -> ApiError:
    if e.status == 413:
        return ApiError(413, "The request body is too large.", code="body_too_large")
    if e.status == 405:
        return ApiError(405, f"Method not allowed; allowed: {e.headers.get('Allow', '')}", code="method_not_allowed")
    return ApiError(e.status, e.reason or "error", code="http_error", outcome="rejected")


def _admit(request: web.Request, state: State, rec: RequestRecord | None) -> None:
    """Headers checked; on /v1, the record started and the client named by its key."""
    if rec is not None:
        request[RECORD] = rec
        ua = request.headers.get("User-Agent")
        if ua is not None and not _is_utf8(ua):
            ua = ua.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        rec.user_agent = ua
    _check_headers(request)
    if rec is not None:
        if state.client_keys:
            rec.client = _client_name(request, state.client_keys)


def _hand_over(state: State, rec: RequestRecord, loop: asyncio.AbstractEventLoop) -> None:
    """The finished record to the log writer and the metrics."""
    if state.metrics is not None:
        # Once the loop is next free: after aiohttp has written the response this handler
        # returns (at one request in flight the client reads it meanwhile), and before
        # anything that comes in later (a scrape of /metrics included).
        loop.call_soon(state.metrics.observe, rec)
    # The canonical line is rendered from the record by the log writer process, off the
    # event loop; here only if the record could not be queued.
    # `bind()`: the configured logger itself (cached on first use); an attribute of the lazy
    # proxy would be looked up, missed and assembled on every call.
    rec.log_line = log.bind().is_enabled_for(logging.INFO)
    queued = state.writer is not None and state.writer.submit(rec)
    if rec.log_line and not queued:
        log.info("request", **request_line(rec))


@web.middleware
async def edge(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    state = request.app[STATE]
    api = request.path.startswith("/v1/")
    rec = RequestRecord(request.method, request.path) if api else None
    rid = rec.id if rec is not None else new_id()
    request[REQUEST_ID] = rid
    # Bound for this request only: aiohttp runs each request in a task of its own, with a
    # copy of the context, so the binding goes with the task (nothing to unbind).
    structlog.contextvars.bind_contextvars(request_id=rid)
    answered: int | None = None
    failure: ApiError | None = None  # how the handler ended, if not with a response
    # aiohttp runs each request in a task of its own (`request.task` is the connection's).
    # Its loop given, `current_task` needs no `get_running_loop()`, which under Python 3.11
    # is a getpid() system call.
    task = asyncio.current_task(request.task.get_loop())
    assert task is not None
    if rec is not None:
        state.inflight.add(task)
    try:
        _admit(request, state, rec)
        writer = state.writer
        if rec is not None and writer is not None and writer.full:  # `room()` would return at once otherwise
            await writer.room()  # the log is behind: wait rather than lose records
        resp = await handler(request)
        answered = resp.status
        return _answer(request, resp, rec)
    except ApiError as e:
        e.message = shown(state.redactor, e.message)
        failure = e
        return _answer(request, _unless_started(request, _error_response(e)), rec)
    except web.HTTPException as e:
        failure = _from_http_exception(e)
        return _answer(request, _error_response(failure), rec)
    except (asyncio.CancelledError, ConnectionResetError):
        if state.ending and task.cancelling():
            # Our own shutdown cancelled it (see app._mark_shutting_down): answer, don't vanish.
            task.uncancel()
            failure = ApiError(503, "The proxy is shutting down.", code="proxy_shutdown", outcome="shutdown")
            return _answer(request, _error_response(failure), rec)
        # The client went away (aiohttp cancels the handler, or a write found the socket gone).
        failure = ApiError(499, "client disconnected", outcome="client_disconnected")
        raise
    except Exception as e:
        log.exception("internal_error")
        failure = ApiError(500, f"internal error: {type(e).__name__}", outcome="error")
        error = _error_response(ApiError(500, "Internal proxy error.", code="internal_error", type="server_error"))
        return _answer(request, _unless_started(request, error), rec)
    finally:
        state.inflight.discard(task)
        if rec is not None:
            settle(request, rec, answered, failure)
            _hand_over(state, rec, task.get_loop())

