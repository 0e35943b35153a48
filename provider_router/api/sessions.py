"""The client sessions surface: `GET /v1/sessions/{id}`, `POST /v1/sessions/{id}/refresh`,
`DELETE /v1/sessions/{id}`, each scoped to the caller's client key: another client's session
answers 404, as one that does not exist. `{id}` is an id or a unique prefix of one.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import ApiError
from ..records import iso
from ..sessions import Sessions
from ..state import RECORD, STATE
from ..store import queries
from ..store.sessions import Session


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _sessions(request: web.Request) -> Sessions:
    sessions = request.app[STATE].sessions
    if sessions is None:
        raise ApiError(503, "The proxy is not ready.", code="not_ready")
    return sessions


async def _own(request: web.Request, sessions: Sessions) -> str:
    """The caller's session the path names: 404 if none of its own does, 409 if several."""
    client = request[RECORD].client or "anonymous"
    prefix = request.match_info["id"]
    try:
        sid = await sessions.resolve(prefix, client)
    except queries.AmbiguousId as e:
        raise ApiError(409, str(e), code="ambiguous_id", param="id", extra={"candidates": e.candidates}) from None
    if sid is None:
        raise ApiError(404, f"No session {prefix}.", code="session_not_found", param="id")
    return sid


def _view(s: Session) -> dict[str, Any]:
    return {
        "id": s.id,
        "object": "session",
        "state": s.state,
        "ended": s.metadata.get("ended"),
        "provider": s.provider,
        "model": s.upstream_model,
        "created_at": iso(s.created),
        "last_accessed_at": iso(s.last_access),
        "expires_at": iso(s.expires),
        "request_count": s.request_count,
        "message_count": s.message_count,
    }


async def get_session(request: web.Request) -> web.Response:
    """The session's state, times and counts, and its turns (its requests, as logged)."""
    sessions = _sessions(request)
    s = await sessions.get(await _own(request, sessions))
    if s is None:  # deleted meanwhile
        raise ApiError(404, f"No session {request.match_info['id']}.", code="session_not_found", param="id")
    reads = request.app[STATE].reads
    rows = await reads.session_requests(s.id) if reads is not None else []
    turns = [{"request_id": r["id"], "turn": r["turn"], "received_at": r["received_at"], "status": r["status"]} for r in rows]
    return _json({**_view(s), "turns": turns})


async def refresh_session(request: web.Request) -> web.Response:
    """Extend the session's timeout from now; an ended session is active again."""
    sessions = _sessions(request)
    s = await sessions.refresh(await _own(request, sessions))
    if s is None:
        raise ApiError(404, f"No session {request.match_info['id']}.", code="session_not_found", param="id")
    return _json(_view(s))


async def delete_session(request: web.Request) -> web.Response:
    """End and delete the session (its request log stays), and its upstream chats where the
    provider is configured to delete them."""
    sessions = _sessions(request)
    sid = await _own(request, sessions)
    sessions.delete(sid, by="client")
    chats = await sessions.delete_doomed_chats(sid)
    return _json({"id": sid, "object": "session.deleted", "deleted": True, "chats_deleted": chats})


def setup(app: web.Application) -> None:
    """Add the client sessions routes (before the `/v1/{tail}` catch-all)."""
    r = app.router
    r.add_get("/v1/sessions/{id}", get_session)
    r.add_post("/v1/sessions/{id}/refresh", refresh_session)
    r.add_delete("/v1/sessions/{id}", delete_session)
