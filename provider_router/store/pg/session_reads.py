"""Sessions read on PostgreSQL (and the operator's edits: refresh, expire, delete), as
`store/session_reads.py` and `store/tree_view.py` do on SQLite, with their row shaping.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ...records import iso as iso_of
from ..session_reads import DeletedSession, lifecycle_figures, listing, parse_metadata
from ..tree_view import SessionTree, assembled, missing_replies, tree_node, tree_requests
from .lookup import by_prefix, iso, times

Conn = psycopg.AsyncConnection[Any]
_TIMES = ("created_at", "last_accessed_at", "expires_at")


def _iso(row: dict[str, Any]) -> dict[str, Any]:
    return times(row, *_TIMES)


async def list_sessions(
    conn: Conn, *, state: str | None = None, client: str | None = None, limit: int = 20, offset: int = 0, newest_first: bool = False
) -> list[dict[str, Any]]:
    """As session_reads.list_sessions: by `sessions_order` (or the state's or client's index)."""
    sql, params = listing(state, client, "%s")
    if limit > 0:
        sql += " LIMIT %s"
        params.append(limit)
    if offset:
        sql += " OFFSET %s"
        params.append(offset)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        rows = await cur.fetchall()
    if not newest_first:
        rows.reverse()
    return [parse_metadata(_iso(r)) for r in rows]


async def get_session(conn: Conn, id_prefix: str) -> dict[str, Any] | None:
    """One session by id or unique prefix (AmbiguousId otherwise), with its turn count."""
    row = await by_prefix(conn, "sessions", id_prefix.strip())
    if row is None:
        return None
    cur = await conn.execute("SELECT count(*) FROM turns WHERE session_id = %s", (row["id"],))
    row["turn_rows"] = (await cur.fetchone())[0]  # type: ignore[index]
    return parse_metadata(_iso(row))


# As tree_view's statements, ordered by (received_at, id) where SQLite orders by rowid.
_NODES = """
WITH RECURSIVE seen(id) AS (
    SELECT tip_message FROM requests WHERE session_id = %(s)s AND tip_message IS NOT NULL
    UNION
    SELECT reply_message FROM requests WHERE session_id = %(s)s AND reply_message IS NOT NULL
    UNION
    SELECT m.parent_id FROM messages m JOIN seen s ON m.id = s.id WHERE m.parent_id IS NOT NULL
)
SELECT m.id, m.parent_id, m.role, m.body FROM messages m JOIN seen s ON m.id = s.id
"""
_REQUESTS = """
SELECT id, turn, status, outcome, finish_reason, tip_message, reply_message, replies
FROM requests WHERE session_id = %s ORDER BY received_at, id
"""
_TURNS = """
SELECT m.id AS node, t.turn, t.chat_id, t.reply_id, t.request_id
FROM turns t JOIN messages m ON m.hash = t.message_hash
WHERE t.session_id = %s
"""


async def session_tree(conn: Conn, session_id: str) -> SessionTree:
    """The conversation tree of the session `session_id` (exact id)."""
    requests = tree_requests(await (await conn.execute(_REQUESTS, (session_id,))).fetchall())
    nodes = {n.id: n for n in map(tree_node, await (await conn.execute(_NODES, {"s": session_id})).fetchall())}
    extra = missing_replies(requests, nodes)
    if extra:
        cur = await conn.execute("SELECT id, parent_id, role, body FROM messages WHERE id = ANY(%s)", (extra,))
        nodes.update((n.id, n) for n in map(tree_node, await cur.fetchall()))
    turns = await (await conn.execute(_TURNS, (session_id,))).fetchall()
    return assembled(requests, nodes, turns)


async def refresh_session(conn: Conn, session_id: str, now: float, timeout: float) -> bool:
    cur = await conn.execute(
        "UPDATE sessions SET state = 'active', metadata = (coalesce(metadata, '{}')::jsonb - 'ended')::text, "
        "last_accessed_at = %s, expires_at = %s WHERE id = %s",
        (iso_of(now), iso_of(now + timeout), session_id),
    )
    return cur.rowcount > 0


async def expire_sessions(conn: Conn, now: str | None = None) -> int:
    """Mark active sessions whose `expires_at` is past as expired; how many (the triggers
    count them ended; the `expired` tally is counted here, as on SQLite)."""
    now = now or iso_of(time.time())
    async with conn.transaction():
        await conn.execute(
            "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE state = 'active' AND expires_at <= %s) "
            "WHERE event = 'expired'",
            (now,),
        )
        cur = await conn.execute(
            "UPDATE sessions SET state = 'expired', "
            "metadata = jsonb_set(coalesce(metadata, '{}')::jsonb, '{ended}', '\"expired\"')::text "
            "WHERE state = 'active' AND expires_at <= %s",
            (now,),
        )
    return cur.rowcount


async def delete_session(conn: Conn, session_id: str) -> DeletedSession | None:
    """Delete one session (exact id) and, by cascade, its turns; its request rows stay."""
    async with conn.transaction():
        turns = (await (await conn.execute("SELECT count(*) FROM turns WHERE session_id = %s", (session_id,))).fetchone())[0]  # type: ignore[index]
        kept = (await (await conn.execute("SELECT count(*) FROM requests WHERE session_id = %s", (session_id,))).fetchone())[0]  # type: ignore[index]
        await conn.execute(
            "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE id = %s) WHERE event = 'deleted'", (session_id,)
        )
        cur = await conn.execute("DELETE FROM sessions WHERE id = %s", (session_id,))
    return DeletedSession(session_id, turns, kept) if cur.rowcount else None


async def session_counts(conn: Conn, since: str | None = None) -> dict[str, int]:
    """Sessions by state (`active`, `expired`, `total`); with `since`, only those used since."""
    out = {"active": 0, "expired": 0, "total": 0}
    sql, params = "SELECT state, count(*) FROM sessions", []
    if since:
        sql += " WHERE last_accessed_at >= %s"
        params.append(since)
    for state, n in await (await conn.execute(sql + " GROUP BY state", params)).fetchall():
        out[state] = out.get(state, 0) + n
        out["total"] += n
    return out


# The active sessions' ms from first to last request as SQLite sums them: its julianday()
# is a double of whole ms since the Julian epoch divided by a day's ms, the difference of
# two multiplied back and cut toward zero; the same doubles here give the same figure.
_JULIAN_MS = "((extract(epoch FROM {})::numeric * 1000 + 210866760000000)::float8 / 86400000.0)"
_ACTIVE = (
    "SELECT count(*), min(created_at), max(created_at), "
    f"sum(trunc(({_JULIAN_MS.format('last_accessed_at')} - {_JULIAN_MS.format('created_at')}) * 86400000)::bigint), "
    "sum(request_count) FROM sessions WHERE state = 'active'"
)


async def lifecycle(conn: Conn, now: float | None = None) -> dict[str, Any]:
    """As session_reads.lifecycle: the active rows and the tallies, never the ended rows."""
    counts = {event: int(n) for event, n in await (await conn.execute("SELECT event, n FROM session_tallies")).fetchall()}
    active, oldest, newest, ms, requests = (await (await conn.execute(_ACTIVE)).fetchone())  # type: ignore[misc]
    clients = await (await conn.execute("SELECT client, created, ended FROM session_clients ORDER BY client")).fetchall()
    by_client = await (await conn.execute(
        "SELECT coalesce(client, ''), count(*) FROM sessions WHERE state = 'active' GROUP BY coalesce(client, '')"
    )).fetchall()  # fmt: skip
    row = (active, iso(oldest), iso(newest), None if ms is None else int(ms), None if requests is None else int(requests))
    return lifecycle_figures({**dict.fromkeys(("created", "expired", "evicted", "deleted"), 0), **counts}, row, clients, by_client, now)
