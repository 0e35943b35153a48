"""Sessions' rows read (and the few edits an operator makes offline: delete, expire); the
lifecycle's figures (tallies, ages, averages) and the upstream chats still to delete."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

import aiosqlite
import orjson

from ..records import iso
from .queries import AmbiguousId, glob_literal, by_prefix, count_session_requests, fetch_all, has_table

STATES = ("active", "expired", "all")
EVENTS = ("created", "expired", "evicted", "deleted")

# Lifecycle tallies (migration 005): one event counted by the statement queued with it.
TALLY = "UPDATE session_tallies SET n = n + ? WHERE event = ?"
# Counted before the change they count, from the rows it will change.
TALLY_EXPIRING = (
    "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE state = 'active' AND expires_at <= ?) "
    "WHERE event = 'expired'"
)
TALLY_DELETING = "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE id = ?) WHERE event = 'deleted'"
DELETE_SESSION = "DELETE FROM sessions WHERE id = ?"
# Past `sessions.max_sessions` where instances share the database: the leader ends the least
# recently used, each counted only if still active when its end commits.
BEYOND_MAX = (
    "SELECT id, client, last_accessed_at FROM sessions WHERE state = 'active' "
    "ORDER BY last_accessed_at DESC, id DESC LIMIT -1 OFFSET ?"
)
TALLY_EVICTING = (
    "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE id = ? AND state = 'active') WHERE event = 'evicted'"
)
EVICT_SESSION = (
    "UPDATE sessions SET state = 'expired', metadata = json_set(coalesce(metadata, '{}'), '$.ended', 'evicted') "
    "WHERE id = ? AND state = 'active'"
)


async def list_sessions(
    conn: aiosqlite.Connection,
    *,
    state: str | None = None,
    client: str | None = None,
    limit: int = 20,
    offset: int = 0,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """The `limit` most recently used sessions (0: all) after skipping `offset`, least
    recent first unless `newest_first`. `state` filters on active / expired (all: None),
    `client` on the client key's name."""
    if not await has_table(conn, "sessions"):
        return []
    sql, params = listing(state, client, "?")
    if limit > 0 or offset:
        sql += " LIMIT ? OFFSET ?"
        params += [limit if limit > 0 else -1, offset]
    rows = await fetch_all(conn, sql, params)
    if not newest_first:
        rows.reverse()
    return [parse_metadata(r) for r in rows]


def listing(state: str | None, client: str | None, mark: str) -> tuple[str, list[Any]]:
    """The session listing's statement, most recently used first, filtered by `state`
    (all: None) and `client`, with its parameters; `mark`: the driver's placeholder."""
    where: list[str] = []
    params: list[Any] = []
    if state and state != "all":
        where.append(f"state = {mark}")
        params.append(state)
    if client is not None:
        where.append(f"client = {mark}")
        params.append(client)
    sql = "SELECT * FROM sessions" + (" WHERE " + " AND ".join(where) if where else "")
    return sql + " ORDER BY last_accessed_at DESC, id DESC", params


def parse_metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A session row with its `metadata` JSON read (left as text if it is not JSON)."""
    if isinstance(row.get("metadata"), str):
        try:
            row["metadata"] = orjson.loads(row["metadata"])
        except orjson.JSONDecodeError:
            pass
    return row


async def session_ids(conn: aiosqlite.Connection, id_prefix: str, client: str | None = None, limit: int = 6) -> list[str]:
    """Ids of sessions that start with `id_prefix` (of `client` only, if given), at most `limit`."""
    if not await has_table(conn, "sessions"):
        return []
    sql, params = "SELECT id FROM sessions WHERE id GLOB ?", [glob_literal(id_prefix) + "*"]
    if client is not None:
        sql += " AND client = ?"
        params.append(client)
    async with conn.execute(sql + " ORDER BY id LIMIT ?", (*params, limit)) as cur:
        return [r[0] for r in await cur.fetchall()]


def pick(id_prefix: str, candidates: set[str] | list[str]) -> str | None:
    """The one id `id_prefix` names among `candidates` (ids that start with it): itself,
    else the only one; None for none; AmbiguousId for several."""
    found = sorted(set(candidates))
    if id_prefix in found:
        return id_prefix
    if len(found) > 1:
        raise AmbiguousId(id_prefix, found)
    return found[0] if found else None


async def get_session(conn: aiosqlite.Connection, id_prefix: str) -> dict[str, Any] | None:
    """One session by id or unique prefix (AmbiguousId otherwise), with its turn count."""
    if not await has_table(conn, "sessions"):
        return None
    row = await by_prefix(conn, "sessions", id_prefix.strip())
    if row is None:
        return None
    async with conn.execute("SELECT count(*) FROM turns WHERE session_id = ?", (row["id"],)) as cur:
        (row["turn_rows"],) = await cur.fetchone()  # type: ignore[misc]
    return parse_metadata(row)


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
        await conn.execute(TALLY_DELETING, (session_id,))
        cur = await conn.execute(DELETE_SESSION, (session_id,))
        deleted = cur.rowcount
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return DeletedSession(session_id, turns, kept) if deleted else None


async def refresh_session(conn: aiosqlite.Connection, session_id: str, now: float, timeout: float) -> bool:
    """Extend a session's timeout by `timeout` seconds from `now`, reviving it (and dropping
    its `ended` reason) if it had ended; whether it exists."""
    cur = await conn.execute(
        "UPDATE sessions SET state = 'active', metadata = json_remove(coalesce(metadata, '{}'), '$.ended'), "
        "last_accessed_at = ?, expires_at = ? WHERE id = ?",
        (iso(now), iso(now + timeout), session_id),
    )
    await conn.commit()
    return cur.rowcount > 0


# Active sessions whose time has run out (at `expires_at` itself too, as the daemon counts
# it) become expired; `metadata.ended` says why, as when the daemon ends one itself.
EXPIRE_SESSIONS = (
    "UPDATE sessions SET state = 'expired', metadata = json_set(coalesce(metadata, '{}'), '$.ended', 'expired') "
    "WHERE state = 'active' AND expires_at <= ?"
)
# The sessions `EXPIRE_SESSIONS` is about to end, for their log lines.
EXPIRING = "SELECT id, client, last_accessed_at FROM sessions WHERE state = 'active' AND expires_at <= ? ORDER BY id"


async def expire_sessions(conn: aiosqlite.Connection, now: str | None = None) -> int:
    """Mark active sessions whose `expires_at` is past as expired; return how many."""
    if not await has_table(conn, "sessions"):
        return 0
    now = now or iso(time.time())
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(TALLY_EXPIRING, (now,))
        cur = await conn.execute(EXPIRE_SESSIONS, (now,))
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
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


async def tallies(conn: aiosqlite.Connection) -> dict[str, int]:
    """The lifecycle's tallies since the database began: the event counts (created, expired,
    evicted, deleted) and the ended sessions' sums (`ended_sessions`, `ended_ms`,
    `ended_requests`)."""
    out = dict.fromkeys(EVENTS, 0)
    if await has_table(conn, "session_tallies"):
        async with conn.execute("SELECT event, n FROM session_tallies") as cur:
            out.update({event: int(n) for event, n in await cur.fetchall()})
    return out


def _age(now: float, text: str | None) -> float | None:
    return None if text is None else round(now - datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp(), 3)


async def lifecycle(conn: aiosqlite.Connection, now: float | None = None) -> dict[str, Any]:
    """The sessions' lifecycle as the database has it: active rows and the ages of the oldest
    and newest of them; the event tallies; the average duration (first to last request) and
    requests per session over every session stored, ended (the tallies migration 005's
    triggers keep) or active; per client, sessions active now, created and ended. Reads the
    active rows and the tallies only, never the ended rows: cheap at millions of sessions."""
    counts = await tallies(conn)
    if not await has_table(conn, "sessions"):
        return lifecycle_figures(counts, None, [], [], now)
    sql = (
        "SELECT count(*), min(created_at), max(created_at), "
        "sum(CAST((julianday(last_accessed_at) - julianday(created_at)) * 86400000 AS INTEGER)), sum(request_count) "
        "FROM sessions WHERE state = 'active'"
    )
    async with conn.execute(sql) as cur:
        active = await cur.fetchone()
    clients: list[Any] = []
    if await has_table(conn, "session_clients"):
        async with conn.execute("SELECT client, created, ended FROM session_clients ORDER BY client") as cur:
            clients = list(await cur.fetchall())
    sql = "SELECT coalesce(client, ''), count(*) FROM sessions WHERE state = 'active' GROUP BY coalesce(client, '')"
    async with conn.execute(sql) as cur:
        by_client = list(await cur.fetchall())
    return lifecycle_figures(counts, active, clients, by_client, now)


def lifecycle_figures(
    counts: dict[str, int],
    active_row: Sequence[Any] | None,
    clients: Sequence[Sequence[Any]],
    active_by_client: Sequence[Sequence[Any]],
    now: float | None = None,
) -> dict[str, Any]:
    """`lifecycle`'s figures from what it read (on either database): the tallies; the
    active sessions' (count, oldest and newest created_at as text, their ms from first to
    last request, their requests), None without a sessions table; rows of (client, created,
    ended); rows of (client, active sessions)."""
    now = time.time() if now is None else now
    out: dict[str, Any] = {"active": 0, **{e: counts[e] for e in EVENTS}, "oldest_age_seconds": None, "newest_age_seconds": None}
    out |= {"average_duration_seconds": None, "requests_per_session": None, "by_client": {}}
    if active_row is None:
        return out
    active, oldest, newest, ms, requests = active_row
    out |= {"active": active, "oldest_age_seconds": _age(now, oldest), "newest_age_seconds": _age(now, newest)}
    sessions = active + counts.get("ended_sessions", 0)
    if sessions:
        out["average_duration_seconds"] = round(((ms or 0) + counts.get("ended_ms", 0)) / 1000 / sessions, 3)
        out["requests_per_session"] = round(((requests or 0) + counts.get("ended_requests", 0)) / sessions, 3)
    by_client: dict[str, dict[str, int]] = {}
    for client, created, ended in clients:
        by_client[client] = {"active": 0, "created": created, "ended": ended}
    for client, n in active_by_client:
        by_client.setdefault(client, {"active": 0, "created": 0, "ended": 0})["active"] = n
    out["by_client"] = by_client
    return out


# The upstream chats of ended sessions (their turns' and their own), and those a deleted
# session left (migration 005's trigger kept them), on the given providers.
_ENDED_CHATS = """
SELECT s.provider AS provider, t.chat_id AS chat_id, s.id AS session_id FROM sessions s
JOIN turns t ON t.session_id = s.id
WHERE s.state = 'expired' AND t.chat_id IS NOT NULL AND s.provider IN ({marks}){one}
UNION
SELECT s.provider, s.chat_id, s.id FROM sessions s
WHERE s.state = 'expired' AND s.chat_id IS NOT NULL AND s.chat_id <> s.id AND s.provider IN ({marks}){one}
UNION
SELECT provider, chat_id, session_id FROM chat_deletions s
WHERE deleted_at IS NULL AND provider IN ({marks}){kept}
"""


async def chats_to_delete(
    conn: aiosqlite.Connection, providers: list[str], *, session_id: str | None = None, max_attempts: int = 5, limit: int = 500
) -> list[tuple[str, str, str]]:
    """(provider, chat_id, session_id) of the upstream chats of ended or deleted sessions on
    `providers` that are not deleted yet and were tried fewer than `max_attempts` times (of
    one session, if given)."""
    if not providers or not await has_table(conn, "chat_deletions"):
        return []
    one, kept = (" AND s.id = ?", " AND session_id = ?") if session_id else ("", "")
    union = _ENDED_CHATS.format(marks=",".join("?" * len(providers)), one=one, kept=kept)
    sql = (
        f"SELECT c.provider, c.chat_id, c.session_id FROM ({union}) c "
        "LEFT JOIN chat_deletions d ON d.provider = c.provider AND d.chat_id = c.chat_id "
        "WHERE d.deleted_at IS NULL AND coalesce(d.attempts, 0) < ? ORDER BY c.session_id, c.chat_id LIMIT ?"
    )
    each = [*providers, *([session_id] if session_id else [])]
    async with conn.execute(sql, (*each, *each, *each, max_attempts, limit)) as cur:
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


# One attempt to delete an upstream chat: done (`deleted_at`), or failed (`error`).
CHAT_DELETION = """
INSERT INTO chat_deletions (provider, chat_id, session_id, deleted_at, attempts, error) VALUES (?, ?, ?, ?, 1, ?)
ON CONFLICT (provider, chat_id) DO UPDATE SET
    deleted_at = excluded.deleted_at, attempts = chat_deletions.attempts + 1, error = excluded.error
"""
