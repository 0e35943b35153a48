"""Sessions' rows read (and the few edits an operator makes offline: delete, expire)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiosqlite
import orjson

from ..records import iso
from .queries import by_prefix, count_session_requests, fetch_all, has_table


async def list_sessions(
    conn: aiosqlite.Connection,
    *,
    active_only: bool = False,
    state: str | None = None,
    limit: int = 20,
    offset: int = 0,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """The `limit` most recently used sessions (0: all) after skipping `offset`, least
    recent first unless `newest_first`. `state` filters on active / expired."""
    if not await has_table(conn, "sessions"):
        return []
    state = "active" if active_only else state
    sql = "SELECT * FROM sessions"
    params: list[Any] = []
    if state:
        sql += " WHERE state = ?"
        params.append(state)
    sql += " ORDER BY last_accessed_at DESC, id DESC"
    if limit > 0 or offset:
        sql += " LIMIT ? OFFSET ?"
        params += [limit if limit > 0 else -1, offset]
    rows = await fetch_all(conn, sql, params)
    if not newest_first:
        rows.reverse()
    return [_parse_metadata(r) for r in rows]


def _parse_metadata(row: dict[str, Any]) -> dict[str, Any]:
    if isinstance(row.get("metadata"), str):
        try:
            row["metadata"] = orjson.loads(row["metadata"])
        except orjson.JSONDecodeError:
            pass
    return row


async def get_session(conn: aiosqlite.Connection, id_prefix: str) -> dict[str, Any] | None:
    """One session by id or unique prefix (AmbiguousId otherwise), with its turn count."""
    if not await has_table(conn, "sessions"):
        return None
    row = await by_prefix(conn, "sessions", id_prefix.strip())
    if row is None:
        return None
    async with conn.execute("SELECT count(*) FROM turns WHERE session_id = ?", (row["id"],)) as cur:
        (row["turn_rows"],) = await cur.fetchone()  # type: ignore[misc]
    return _parse_metadata(row)


@dataclass(slots=True)
class DeletedSession:
    id: str
    turns: int
    requests_kept: int


async def delete_session(conn: aiosqlite.Connection, session_id: str) -> DeletedSession | None:
    """Delete one session (exact id) and, by cascade, its turns; its request rows stay.

    The connection must have `PRAGMA foreign_keys=ON` for the cascade.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        async with conn.execute("SELECT count(*) FROM turns WHERE session_id = ?", (session_id,)) as cur:
            (turns,) = await cur.fetchone()  # type: ignore[misc]
        kept = await count_session_requests(conn, session_id)
        cur = await conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        deleted = cur.rowcount
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return DeletedSession(session_id, turns, kept) if deleted else None


# Active sessions whose time has run out (at `expires_at` itself too, as the daemon counts
# it) become expired; `metadata.ended` says why, as when the daemon ends one itself.
EXPIRE_SESSIONS = (
    "UPDATE sessions SET state = 'expired', metadata = json_set(coalesce(metadata, '{}'), '$.ended', 'expired') "
    "WHERE state = 'active' AND expires_at <= ?"
)


async def expire_sessions(conn: aiosqlite.Connection, now: str | None = None) -> int:
    """Mark active sessions whose `expires_at` is past as expired; return how many."""
    if not await has_table(conn, "sessions"):
        return 0
    cur = await conn.execute(EXPIRE_SESSIONS, (now or iso(time.time()),))
    await conn.commit()
    return cur.rowcount


async def session_counts(conn: aiosqlite.Connection, since: str | None = None) -> dict[str, int]:
    """Sessions by state (`active`, `expired`, `total`); with `since`, only those used since."""
    out = {"active": 0, "expired": 0, "total": 0}
    if not await has_table(conn, "sessions"):
        return out
    sql = "SELECT state, count(*) FROM sessions"
    params: list[Any] = []
    if since:
        sql += " WHERE last_accessed_at >= ?"
        params.append(since)
    async with conn.execute(sql + " GROUP BY state", params) as cur:
        for state, n in await cur.fetchall():
            out[state] = out.get(state, 0) + n
            out["total"] += n
    return out
