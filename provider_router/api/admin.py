"""The operator surface: `GET /health` (open, minimal), `GET /metrics` (Prometheus; admin
key unless `auth.metrics_public`), and `/admin/*` (admin key only; off without one).

Reads use their own read-only connection, so they never wait behind the log writer.
"""

from __future__ import annotations

import hmac
import os
import time
from typing import Any, Mapping

import orjson
from aiohttp import web

from ..errors import ApiError
from ..metrics import CONTENT_TYPE
from ..state import STATE, State
from ..store import queries, session_reads
from ..store.reads import LogReads

MAX_PAGE = 500


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data, default=str), content_type="application/json")


def bearer_ok(headers: Mapping[str, str], admin_key: str) -> bool:
    """`Authorization: Bearer <admin key>`, compared in constant time (also the dashboard's)."""
    scheme, _, token = headers.get("Authorization", "").partition(" ")
    return bool(admin_key) and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), admin_key.encode())


def _admin_ok(request: web.Request, state: State) -> bool:
    return bearer_ok(request.headers, state.config.auth.admin_key)


def _require_admin(request: web.Request) -> State:
    state = request.app[STATE]
    if not state.config.auth.admin_key:
        # Off without a key: indistinguishable from a path that does not exist.
        raise ApiError(404, f"Unknown endpoint {request.method} {request.path}", code="unknown_url")
    if not _admin_ok(request, state):
        raise ApiError(401, "The admin API needs `Authorization: Bearer <auth.admin_key>`.", code="invalid_admin_key")
    return state


def _reads(state: State) -> LogReads:
    if state.reads is None:
        raise ApiError(503, "The database is not open.", code="database_unavailable")
    return state.reads


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"`{name}` must be an integer.", param=name) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"`{name}` must be from {lo} to {hi}.", param=name)
    return value


# -- open endpoints ----------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """200 while the daemon serves and its log is being written; 503 with the reasons when
    not: the database does not answer, records fail or wait with nothing committed, the
    queue is full, or the file at the configured path is not the one opened. Counts only,
    never content."""
    state = request.app[STATE]
    db_ok = False
    if state.reads is not None:
        try:
            await state.reads.ping()
            db_ok = True
        except Exception:
            db_ok = False
    reasons = [] if db_ok else ["the database does not answer"]
    if state.shutting_down:
        reasons.append("shutting down")
    body: dict[str, Any] = {"database": "ok" if db_ok else "unavailable"}
    if state.worker is not None:  # `serve --workers N`: this worker's view (its own log writer)
        body["worker"] = {"number": state.worker[0], "of": state.worker[1], "pid": os.getpid()}
    if state.watch is not None:
        reasons += state.watch.reasons()
        body["log"] = state.watch.summary()
    body = {"status": "degraded" if reasons else "ok", **body}
    if reasons:
        body["reasons"] = reasons
    return _json(body, 503 if reasons else 200)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.config.auth.metrics_public:
        _require_admin(request)
    assert state.metrics is not None
    figures = await state.reads.lifecycle() if state.reads is not None else None
    return web.Response(body=state.metrics.render(figures), headers={"Content-Type": CONTENT_TYPE})


# -- admin: sessions -----------------------------------------------------------------------
async def sessions_list(request: web.Request) -> web.Response:
    state = _require_admin(request)
    which = request.query.get("state", "all")
    if which not in session_reads.STATES:
        raise ApiError(400, "`state` must be active, expired or all.", param="state")
    limit = _int(request, "limit", 50, 1, MAX_PAGE)
    offset = _int(request, "offset", 0, 0, 10**9)
    rows = await _reads(state).list_sessions(
        state=which, client=request.query.get("client"), limit=limit + 1, offset=offset, newest_first=True
    )  # one more than the page: whether there is a next one
    page = {"object": "list", "data": rows[:limit], "limit": limit, "offset": offset, "has_more": len(rows) > limit}
    return _json(page)


async def _session_id(request: web.Request, state: State) -> str:
    """The session the path's id or unique prefix names: 404 if none, 409 if several."""
    assert state.sessions is not None
    prefix = request.match_info["id"]
    try:
        sid = await state.sessions.resolve(prefix)
    except queries.AmbiguousId as e:
        raise ApiError(409, str(e), code="ambiguous_id", param="id", extra={"candidates": e.candidates}) from None
    if sid is None:
        raise ApiError(404, "No such session.", code="session_not_found", param="id")
    return sid


async def session_get(request: web.Request) -> web.Response:
    state = _require_admin(request)
    reads = _reads(state)
    sid = await _session_id(request, state)
    session = await reads.get_session(sid)
    if session is None:
        raise ApiError(404, "No such session.", code="session_not_found", param="id")
    session["turns"] = await reads.session_requests(session["id"])
    return _json(session)


async def session_refresh(request: web.Request) -> web.Response:
    state = _require_admin(request)
    assert state.sessions is not None
    s = await state.sessions.refresh(await _session_id(request, state))
    if s is None:
        raise ApiError(404, "No such session.", code="session_not_found", param="id")
    return _json({"id": s.id, "state": s.state, "expires_in_seconds": round(s.expires - time.time(), 3)})


async def session_delete(request: web.Request) -> web.Response:
    state = _require_admin(request)
    assert state.sessions is not None
    sid = await _session_id(request, state)
    # `?by=cli`: the command line asks on an operator's behalf (the log line says so).
    state.sessions.delete(sid, by="cli" if request.query.get("by") == "cli" else "admin")
    chats = await state.sessions.delete_doomed_chats(sid)
    return _json({"id": sid, "deleted": True, "chats_deleted": chats})


async def sessions_cleanup(request: web.Request) -> web.Response:
    state = _require_admin(request)
    assert state.sessions is not None
    expired = state.sessions.expire()
    await state.sessions.delete_doomed_chats()
    return _json({"expired": expired, "active": len(state.sessions.active)})


# -- admin: stats and requests -----------------------------------------------------------
async def stats(request: web.Request) -> web.Response:
    state = _require_admin(request)
    since = request.query.get("since")
    try:
        cut = queries.cutoff(since) if since else None
    except ValueError as e:
        raise ApiError(400, str(e), param="since") from None
    figures = await _reads(state).stats(since=cut)
    writer = state.writer
    return _json(
        {
            **figures.as_dict(),
            "sessions_live": state.sessions.stats() if state.sessions else None,
            "log_writer": None if writer is None else {"queue_depth": writer.depth, "written": writer.written, "dropped": writer.dropped, "failed": writer.failed},
        }
    )


def _filter(request: web.Request) -> queries.RequestFilter:
    q = request.query
    cuts: dict[str, str | None] = {}
    for name in ("since", "until"):
        try:
            cuts[name] = queries.cutoff(q[name]) if q.get(name) else None
        except ValueError as e:
            raise ApiError(400, str(e), param=name) from None
    return queries.RequestFilter(
        session=q.get("session"),
        model=q.get("model"),
        provider=q.get("provider"),
        client=q.get("client"),
        status=_int(request, "status", 0, 0, 999) or None,
        outcome=q.get("outcome"),
        query=q.get("q"),
        since=cuts["since"],
        until=cuts["until"],
        before=q.get("before"),
    )


async def requests_list(request: web.Request) -> web.Response:
    state = _require_admin(request)
    limit = _int(request, "limit", 50, 1, MAX_PAGE)
    page = await _reads(state).recent_requests(_filter(request), limit=limit)
    rows = list(reversed(page.rows))  # newest first; `before=<last id>` fetches the next page
    return _json({"object": "list", "data": rows, "has_more": len(rows) == limit, "next_before": rows[-1]["id"] if rows else None})


async def request_get(request: web.Request) -> web.Response:
    state = _require_admin(request)
    try:
        row = await _reads(state).get_request(request.match_info["id"])
    except queries.AmbiguousId as e:
        raise ApiError(400, str(e), code="ambiguous_id") from None
    if row is None:
        raise ApiError(404, "No such request.", code="request_not_found")
    return _json(row)


def setup(app: web.Application) -> None:
    """Add the operator routes to `app`."""
    r = app.router
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/admin/sessions", sessions_list)
    r.add_post("/admin/sessions/cleanup", sessions_cleanup)
    r.add_get("/admin/sessions/{id}", session_get)
    r.add_post("/admin/sessions/{id}/refresh", session_refresh)
    r.add_delete("/admin/sessions/{id}", session_delete)
    r.add_get("/admin/stats", stats)
    r.add_get("/admin/requests", requests_list)
    r.add_get("/admin/requests/{id}", request_get)
