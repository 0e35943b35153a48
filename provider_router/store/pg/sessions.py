"""Sessions on PostgreSQL: `PgSessionRepo`, the `SessionStore` of a shared PostgreSQL
database (its reads on the instance's connection pool, its changes queued to the log
writer as on SQLite), and `WRITES`, the PostgreSQL form of each session statement the
daemon queues, which the log writer process runs (store/pg/writer.py `write_of`).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .. import session_reads as sr
from .. import sessions as ss
from ... import location
from ...records import iso
from ..sessions import QueuedWrites, Session, StatementQueue, StoreUnavailable, Turn, session_of

# The daemon's session statements (store/sessions.py queues them with their SQLite text):
# each as PostgreSQL's SQL, with the positions of SQLite's parameters it takes, in order.
# One row at a time and in order: a batch's changes to one session apply as queued.
_TS = "%s::timestamptz"
WRITES: dict[str, tuple[str, tuple[int, ...]]] = {
    ss.UPSERT: (
        f"""INSERT INTO sessions ({ss.COLUMNS})
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, {_TS}, {_TS}, {_TS}, %s::integer, %s::integer, %s)
        ON CONFLICT (id) DO UPDATE SET
            chat_id = excluded.chat_id, state = excluded.state,
            parent_id = coalesce(excluded.parent_id, sessions.parent_id),
            message_count = CASE WHEN excluded.message_count > 0 THEN excluded.message_count ELSE sessions.message_count END,
            last_accessed_at = excluded.last_accessed_at, expires_at = excluded.expires_at,
            request_count = excluded.request_count, metadata = excluded.metadata""",
        tuple(range(14)),
    ),
    ss.UPDATE: (
        f"""UPDATE sessions SET
            chat_id = coalesce(%s::text, chat_id), state = %s, parent_id = coalesce(%s::text, parent_id),
            message_count = CASE WHEN %s::integer > 0 THEN %s::integer ELSE message_count END,
            last_accessed_at = {_TS}, expires_at = {_TS}, request_count = %s::integer, metadata = %s
        WHERE id = %s""",
        (5, 7, 6, 11, 11, 9, 10, 12, 13, 0),
    ),
    # The session must exist (a deleted one keeps no turn): the foreign key would fail the batch.
    ss.INSERT_TURN: (
        f"""INSERT INTO turns (session_id, message_hash, turn, chat_id, reply_id, request_id, created_at)
        SELECT %s::text, %s::bytea, %s::integer, %s::text, %s::text, %s::text, {_TS}
        WHERE EXISTS (SELECT 1 FROM sessions WHERE id = %s::text)
        ON CONFLICT DO NOTHING""",
        (0, 1, 2, 3, 4, 5, 6, 0),
    ),
    ss.FORGET_TURNS: ("DELETE FROM turns WHERE session_id = %s AND chat_id = %s", (0, 1)),
    ss.FORGET_CHAT: ("UPDATE sessions SET chat_id = NULL WHERE id = %s AND chat_id = %s", (0, 1)),
    sr.TALLY: ("UPDATE session_tallies SET n = n + %s::bigint WHERE event = %s", (0, 1)),
    sr.TALLY_EXPIRING: (
        "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE state = 'active' AND expires_at <= %s::timestamptz)"
        " WHERE event = 'expired'",
        (0,),
    ),
    sr.EXPIRE_SESSIONS: (
        "UPDATE sessions SET state = 'expired', metadata = jsonb_set(coalesce(metadata, '{}')::jsonb, '{ended}', '\"expired\"')::text"
        " WHERE state = 'active' AND expires_at <= %s::timestamptz",
        (0,),
    ),
    sr.TALLY_EVICTING: (
        "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE id = %s AND state = 'active') WHERE event = 'evicted'",
        (0,),
    ),
    sr.EVICT_SESSION: (
        "UPDATE sessions SET state = 'expired', metadata = jsonb_set(coalesce(metadata, '{}')::jsonb, '{ended}', '\"evicted\"')::text"
        " WHERE id = %s AND state = 'active'",
        (0,),
    ),
    sr.TALLY_DELETING: (
        "UPDATE session_tallies SET n = n + (SELECT count(*) FROM sessions WHERE id = %s) WHERE event = 'deleted'",
        (0,),
    ),
    sr.DELETE_SESSION: ("DELETE FROM sessions WHERE id = %s", (0,)),
    sr.CHAT_DELETION: (
        """INSERT INTO chat_deletions (provider, chat_id, session_id, deleted_at, attempts, error)
        VALUES (%s, %s, %s, %s::timestamptz, 1, %s)
        ON CONFLICT (provider, chat_id) DO UPDATE SET
            deleted_at = excluded.deleted_at, attempts = chat_deletions.attempts + 1, error = excluded.error""",
        (0, 1, 2, 3, 4),
    ),
}


def _seconds(t: datetime) -> float:
    return t.timestamp()


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# As session_reads.chats_to_delete: the chats of ended sessions (their turns' and their
# own) and those deleted sessions left, on the given providers, not deleted yet.
_CHATS_TO_DELETE = """
SELECT c.provider, c.chat_id, c.session_id FROM (
    SELECT s.provider AS provider, t.chat_id AS chat_id, s.id AS session_id FROM sessions s
    JOIN turns t ON t.session_id = s.id
    WHERE s.state = 'expired' AND t.chat_id IS NOT NULL AND s.provider = ANY(%(providers)s)
      AND (%(one)s::text IS NULL OR s.id = %(one)s)
    UNION
    SELECT s.provider, s.chat_id, s.id FROM sessions s
    WHERE s.state = 'expired' AND s.chat_id IS NOT NULL AND s.chat_id <> s.id AND s.provider = ANY(%(providers)s)
      AND (%(one)s::text IS NULL OR s.id = %(one)s)
    UNION
    SELECT provider, chat_id, session_id FROM chat_deletions
    WHERE deleted_at IS NULL AND provider = ANY(%(providers)s) AND (%(one)s::text IS NULL OR session_id = %(one)s)
) c
LEFT JOIN chat_deletions d ON d.provider = c.provider AND d.chat_id = c.chat_id
WHERE d.deleted_at IS NULL AND coalesce(d.attempts, 0) < %(attempts)s
ORDER BY c.session_id, c.chat_id LIMIT %(limit)s
"""


# A read waits this long for a pooled connection (a new one included) before the database
# counts as not answering; then reads fail at once for DOWN_PAUSE_S, after which one read
# looks again, waiting PROBE_WAIT_S only (a request during an outage is not held long).
READ_WAIT_S = 3.0
DOWN_PAUSE_S = 2.0
PROBE_WAIT_S = 0.5


class PgSessionRepo(QueuedWrites):
    """The `SessionStore` of a PostgreSQL database: reads on `pool` (each a short
    connection checkout), changes queued to `writer` (whose process runs `WRITES`).
    Reads give what `SessionRepo` gives on SQLite for the same changes."""

    def __init__(self, pool: AsyncConnectionPool, writer: StatementQueue) -> None:
        super().__init__(writer)
        self._pool = pool
        self._down_until = 0.0  # the loop's time until which reads fail at once

    async def _rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """A read's rows; `StoreUnavailable` when the database does not answer (and at once,
        for a moment after that: requests do not each wait for a server that is down)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            raise StoreUnavailable("the database did not answer a moment ago")
        wait = PROBE_WAIT_S if self._down_until else READ_WAIT_S
        for attempt in (1, 2):
            try:
                async with self._pool.connection(timeout=wait) as conn, conn.cursor(row_factory=dict_row) as cur:
                    await cur.execute(sql, params)
                    rows = await cur.fetchall()
                self._down_until = 0.0
                return rows
            except psycopg.OperationalError as e:
                # A pooled connection the server closed meanwhile (a restart) fails its next
                # query, and the pool then discards it: once more on another. A database
                # that does not answer fails the read.
                if attempt == 2 or isinstance(e, PoolTimeout):
                    self._down_until = loop.time() + DOWN_PAUSE_S
                    raise StoreUnavailable(location.error_text(self._pool.conninfo, e)) from e
        raise AssertionError("unreachable")

    async def _sessions(self, sql: str, params: Any) -> list[Session]:
        return [session_of(r, _seconds) for r in await self._rows(f"SELECT {ss.COLUMNS} FROM sessions " + sql, params)]

    async def load_active(self, now: float) -> list[Session]:
        """Active, unexpired sessions, least recently used first."""
        return await self._sessions("WHERE state = 'active' AND expires_at > %s::timestamptz ORDER BY last_accessed_at", (iso(now),))

    async def find_active(self, fingerprint: str, now: float) -> Session | None:
        """The active, unexpired session a request with this opening continues (never a
        named one: those are joined by name only)."""
        found = await self._sessions(
            "WHERE fingerprint = %s AND state = 'active' AND expires_at > %s::timestamptz"
            " AND (coalesce(metadata, '{}')::jsonb ->> 'explicit') IS NULL ORDER BY last_accessed_at DESC LIMIT 1",
            (fingerprint, iso(now)),
        )
        return found[0] if found else None

    async def expiring(self, now: float) -> list[tuple[str, str, float]]:
        """(id, client, last access) of the active rows past their expiry."""
        rows = await self._rows(
            "SELECT id, client, last_accessed_at FROM sessions WHERE state = 'active' AND expires_at <= %s::timestamptz ORDER BY id",
            (iso(now),),
        )
        return [(r["id"], r["client"], _seconds(r["last_accessed_at"])) for r in rows]

    async def beyond_max(self, keep: int) -> list[tuple[str, str, float]]:
        """(id, client, last access) of the active sessions but the `keep` most recently used."""
        rows = await self._rows(
            "SELECT id, client, last_accessed_at FROM sessions WHERE state = 'active'"
            " ORDER BY last_accessed_at DESC, id DESC OFFSET %s",
            (keep,),
        )
        return [(r["id"], r["client"], _seconds(r["last_accessed_at"])) for r in rows]

    async def tallies(self) -> dict[str, int]:
        """As session_reads.tallies: the event counts and the ended sessions' sums."""
        out = dict.fromkeys(sr.EVENTS, 0)
        out.update({r["event"]: int(r["n"]) for r in await self._rows("SELECT event, n FROM session_tallies")})
        return out

    async def ids(self, prefix: str, client: str | None = None, limit: int = 6) -> list[str]:
        """Stored session ids that start with `prefix` (of `client` only, if given)."""
        sql, params = "SELECT id FROM sessions WHERE id LIKE %s", [_like_prefix(prefix)]
        if client is not None:
            sql += " AND client = %s"
            params.append(client)
        return [r["id"] for r in await self._rows(sql + " ORDER BY id LIMIT %s", (*params, limit))]

    async def load(self, session_id: str) -> Session | None:
        found = await self._sessions("WHERE id = %s", (session_id,))
        return found[0] if found else None

    async def load_turns(self, session_id: str) -> list[Turn]:
        rows = await self._rows("SELECT message_hash, turn, chat_id, reply_id FROM turns WHERE session_id = %s", (session_id,))
        return [Turn(bytes(r["message_hash"]), r["turn"], r["chat_id"], r["reply_id"]) for r in rows]

    async def chats_to_delete(
        self, providers: list[str], session_id: str | None = None, max_attempts: int = 5, limit: int = 500
    ) -> list[tuple[str, str, str]]:
        """(provider, chat_id, session_id) of the upstream chats of ended or deleted sessions
        on `providers` not deleted yet and tried fewer than `max_attempts` times."""
        if not providers:
            return []
        params = {"providers": list(providers), "one": session_id, "attempts": max_attempts, "limit": limit}
        return [(r["provider"], r["chat_id"], r["session_id"]) for r in await self._rows(_CHATS_TO_DELETE, params)]
