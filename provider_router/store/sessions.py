"""The session repository: sessions and their thread turns in SQLite.

Reads go through the given connection; every change goes through the log writer's ordered
statement queue, so session state and request records commit in the order they happened
(`QueuedWrites`, shared by the backends). `SessionStore` is what the sessions (sessions.py)
use of it: store/pg/sessions.py provides the same on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, Protocol, Sequence

import aiosqlite
import orjson

from . import session_reads as reads
from ..records import RequestRecord, iso

# Only for a session that still exists: one deleted while its request was in flight keeps
# no turn (a foreign-key failure would fail the whole batch into one-by-one writes).
INSERT_TURN = """
INSERT OR IGNORE INTO turns (session_id, message_hash, turn, chat_id, reply_id, request_id, created_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?1)
"""


@dataclass(slots=True)
class Session:
    id: str
    fingerprint: str
    client: str
    provider: str
    upstream_model: str
    created: float
    last_access: float
    expires: float
    chat_id: str | None = None
    parent_id: str | None = None
    state: str = "active"  # active | expired; "deleted" only in memory, never stored
    message_count: int = 0
    request_count: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    stored: bool = True  # has a row (or one is queued); False: one request so far, stateless
    first: RequestRecord | None = None  # while not stored: the request that started it
    # This process moved the thread (`move`) since the session's last save: that save writes
    # `chat_id` and `parent_id`. Any other save leaves the row's, which another instance
    # sharing the database may have moved since this copy was read.
    thread_moved: bool = False

    def move(self, chat_id: str | None, parent_id: str | None) -> None:
        """The thread continues in `chat_id` from `parent_id` (the upstream's reply id)."""
        self.chat_id, self.parent_id, self.thread_moved = chat_id, parent_id, True


@dataclass(frozen=True, slots=True)
class Turn:
    """A completed reply the upstream knows: continuing from it means `parent_id = reply_id`.
    `message_hash` is the reply's node in the conversation tree."""

    message_hash: bytes
    turn: int
    chat_id: str | None
    reply_id: str | None


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


COLUMNS = (
    "id, fingerprint, client, provider, upstream_model, chat_id, parent_id, state, "
    "created_at, last_accessed_at, expires_at, message_count, request_count, metadata"
)

UPSERT = f"""
INSERT INTO sessions ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT(id) DO UPDATE SET
    chat_id=excluded.chat_id, state=excluded.state,
    -- On stateless upstreams the log writer process advances these two (it sees the reply).
    parent_id=coalesce(excluded.parent_id, sessions.parent_id),
    message_count=CASE WHEN excluded.message_count > 0 THEN excluded.message_count ELSE sessions.message_count END,
    last_accessed_at=excluded.last_accessed_at, expires_at=excluded.expires_at,
    request_count=excluded.request_count,
    metadata=excluded.metadata
"""

# Every later save only updates: a row deleted meanwhile (by an operator, while one of its
# requests was still in flight) is never written back. Nor does it clear the chat: another
# instance may have made it since this one read the row (`forget_chat` clears it). Same parameters as UPSERT (by
# number), so a save coalesced into a pending create still fits it.
UPDATE = """
UPDATE sessions SET
    chat_id=coalesce(?6, chat_id), state=?8, parent_id=coalesce(?7, parent_id),
    message_count=CASE WHEN ?12 > 0 THEN ?12 ELSE message_count END,
    last_accessed_at=?10, expires_at=?11, request_count=?13, metadata=?14
WHERE id=?1
"""


def _params(s: Session) -> tuple[Any, ...]:
    """The row's parameters as of this flush; the thread's position only if this process
    moved it since the last one (UPDATE keeps the row's where they are NULL)."""
    moved, s.thread_moved = s.thread_moved, False
    chat_id, parent_id = (s.chat_id, s.parent_id) if moved else (None, None)
    return (
        s.id, s.fingerprint, s.client, s.provider, s.upstream_model, chat_id, parent_id, s.state,
        iso(s.created), iso(s.last_access), iso(s.expires), s.message_count, s.request_count,
        orjson.dumps(s.metadata).decode() if s.metadata else None,
    )


def session_of(row: aiosqlite.Row | Mapping[str, Any], when: Callable[[Any], float] = _ts) -> Session:
    """A session from its row (`when` reads a stored time as seconds since the epoch)."""
    return Session(
        id=row["id"],
        fingerprint=row["fingerprint"],
        client=row["client"],
        provider=row["provider"],
        upstream_model=row["upstream_model"],
        created=when(row["created_at"]),
        last_access=when(row["last_accessed_at"]),
        expires=when(row["expires_at"]),
        chat_id=row["chat_id"],
        parent_id=row["parent_id"],
        state=row["state"],
        message_count=row["message_count"],
        request_count=row["request_count"],
        metadata=orjson.loads(row["metadata"]) if row["metadata"] else {},
    )


class SessionStore(Protocol):
    """Sessions and their turns as stored. Reads see every change committed, by any
    instance; changes are queued in order, and `durable` waits until this instance's are
    committed (instances sharing the database call it before another may read them)."""

    async def load_active(self, now: float) -> list[Session]: ...
    async def find_active(self, fingerprint: str, now: float) -> Session | None: ...
    async def expiring(self, now: float) -> list[tuple[str, str, float]]: ...
    def expire_stored(self, now: float) -> None: ...
    async def beyond_max(self, keep: int) -> list[tuple[str, str, float]]: ...
    def evict_stored(self, session_id: str) -> None: ...
    async def tallies(self) -> dict[str, int]: ...
    async def ids(self, prefix: str, client: str | None = None) -> list[str]: ...
    async def load(self, session_id: str) -> Session | None: ...
    async def load_turns(self, session_id: str) -> list[Turn]: ...
    def create(self, s: Session) -> None: ...
    def end(self, s: Session, reason: str) -> None: ...
    def save(self, s: Session) -> None: ...
    def add_turn(self, session_id: str, t: Turn, request_id: str, now: float) -> None: ...
    async def durable(self, wait: float = 5.0) -> bool: ...
    def forget_chat(self, session_id: str, chat_id: str) -> None: ...
    def delete(self, session_id: str) -> None: ...
    async def chats_to_delete(self, providers: list[str], session_id: str | None = None) -> list[tuple[str, str, str]]: ...
    def chat_deleted(self, provider: str, chat_id: str, session_id: str, now: float, error: str | None = None) -> None: ...


# forget_chat's two statements: the session's turns in the lost chat, and the chat itself.
FORGET_TURNS = "DELETE FROM turns WHERE session_id = ? AND chat_id = ?"
FORGET_CHAT = "UPDATE sessions SET chat_id = NULL WHERE id = ? AND chat_id = ?"


class StatementQueue(Protocol):
    """What the repositories use of the log writer (store/writer.py `LogWriter`): named
    here so that this module, whose statements the PostgreSQL writer maps, does not import
    the daemon's side of the writer."""

    def execute(self, sql: str, params: Sequence[Any] = (), *, barrier: bool = False) -> None: ...
    def latest(self, key: str, sql: str, params: Callable[[], Sequence[Any]]) -> None: ...
    async def drained(self) -> None: ...


class QueuedWrites:
    """A `SessionStore`'s changes: each one queued to the log writer as a statement (its
    SQLite text; a PostgreSQL writer maps the text to its own form, store/pg/writer.py),
    so that state and request records commit in the order they happened. Backend-free:
    a repository adds the reads of its database."""

    def __init__(self, writer: StatementQueue) -> None:
        self._writer = writer

    def expire_stored(self, now: float) -> None:
        """Mark expired (and count) the active rows past their expiry, as
        `session_reads.expire_sessions` does."""
        self._writer.execute(reads.TALLY_EXPIRING, (iso(now),), barrier=True)
        self._writer.execute(reads.EXPIRE_SESSIONS, (iso(now),), barrier=True)

    def evict_stored(self, session_id: str) -> None:
        """End (and count) a stored session as evicted, if it is still active then."""
        self._writer.execute(reads.TALLY_EVICTING, (session_id,), barrier=True)
        self._writer.execute(reads.EVICT_SESSION, (session_id,), barrier=True)

    def create(self, s: Session) -> None:
        """Store a new session (before any of its turns: they reference it)."""
        s.stored = True
        s.thread_moved = True  # a new row has the session's position, none included
        self._writer.latest(f"session:{s.id}", UPSERT, lambda: _params(s))
        self._writer.execute(reads.TALLY, (1, "created"))

    def end(self, s: Session, reason: str) -> None:
        """Persist a session's end (`reason`: expired or evicted) and count it."""
        if s.stored:
            self.save(s)
            self._writer.execute(reads.TALLY, (1, reason))

    def save(self, s: Session) -> None:
        """Persist the session's state as of the next flush (many saves between flushes: one
        write; after a `create` in the same flush, still the insert). Never re-creates it."""
        if s.state == "deleted" or not s.stored:
            return
        self._writer.latest(f"session:{s.id}", UPDATE, lambda: _params(s))

    def add_turn(self, session_id: str, t: Turn, request_id: str, now: float) -> None:
        self._writer.execute(INSERT_TURN, (session_id, t.message_hash, t.turn, t.chat_id, t.reply_id, request_id, iso(now)))

    async def durable(self, wait: float = 5.0) -> bool:
        """Wait until every change queued so far is committed, `wait` seconds at most (a
        database another process holds locked must not hold a reply back for long: the
        change stays queued and lands later); whether it was committed in time."""
        try:
            async with asyncio.timeout(wait):
                await self._writer.drained()
        except TimeoutError:
            return False
        return True

    def forget_chat(self, session_id: str, chat_id: str) -> None:
        """The upstream lost `chat_id`: the session's turns in it go, and it is the session's
        chat no more."""
        self._writer.execute(FORGET_TURNS, (session_id, chat_id), barrier=True)
        self._writer.execute(FORGET_CHAT, (session_id, chat_id), barrier=True)

    def delete(self, session_id: str) -> None:
        """Delete (and count) the session's row; its turns go by cascade, its upstream chats
        are kept for deletion (migration 005's trigger)."""
        self._writer.execute(reads.TALLY_DELETING, (session_id,), barrier=True)
        self._writer.execute(reads.DELETE_SESSION, (session_id,), barrier=True)

    def chat_deleted(self, provider: str, chat_id: str, session_id: str, now: float, error: str | None = None) -> None:
        """Record an attempt to delete an upstream chat: done unless `error`."""
        self._writer.execute(reads.CHAT_DELETION, (provider, chat_id, session_id, None if error else iso(now), error))


class SessionRepo(QueuedWrites):
    """The `SessionStore` of a SQLite database: reads through `conn`, changes queued."""

    def __init__(self, conn: aiosqlite.Connection, writer: StatementQueue) -> None:
        super().__init__(writer)
        self._conn = conn

    async def load_active(self, now: float) -> list[Session]:
        """Active, unexpired sessions, least recently used first."""
        sql = f"SELECT {COLUMNS} FROM sessions WHERE state = 'active' AND expires_at > ? ORDER BY last_accessed_at"
        async with self._conn.execute(sql, (iso(now),)) as cur:
            return [session_of(r) for r in await cur.fetchall()]

    async def find_active(self, fingerprint: str, now: float) -> Session | None:
        """The active, unexpired session a request with this opening continues (never a
        named one: those are joined by name only)."""
        sql = (
            f"SELECT {COLUMNS} FROM sessions WHERE fingerprint = ? AND state = 'active' AND expires_at > ? "
            "AND json_extract(coalesce(metadata, '{}'), '$.explicit') IS NULL ORDER BY last_accessed_at DESC LIMIT 1"
        )
        async with self._conn.execute(sql, (fingerprint, iso(now))) as cur:
            row = await cur.fetchone()
        return session_of(row) if row else None

    async def expiring(self, now: float) -> list[tuple[str, str, float]]:
        """(id, client, last access) of the active rows past their expiry."""
        async with self._conn.execute(reads.EXPIRING, (iso(now),)) as cur:
            return [(r[0], r[1], _ts(r[2])) for r in await cur.fetchall()]

    async def beyond_max(self, keep: int) -> list[tuple[str, str, float]]:
        """(id, client, last access) of the active sessions but the `keep` most recently used."""
        async with self._conn.execute(reads.BEYOND_MAX, (keep,)) as cur:
            return [(r[0], r[1], _ts(r[2])) for r in await cur.fetchall()]

    async def tallies(self) -> dict[str, int]:
        return await reads.tallies(self._conn)

    async def ids(self, prefix: str, client: str | None = None) -> list[str]:
        """Stored session ids that start with `prefix` (of `client` only, if given)."""
        return await reads.session_ids(self._conn, prefix, client)

    async def load(self, session_id: str) -> Session | None:
        async with self._conn.execute(f"SELECT {COLUMNS} FROM sessions WHERE id = ?", (session_id,)) as cur:
            row = await cur.fetchone()
        return session_of(row) if row else None

    async def load_turns(self, session_id: str) -> list[Turn]:
        sql = "SELECT message_hash, turn, chat_id, reply_id FROM turns WHERE session_id = ?"
        async with self._conn.execute(sql, (session_id,)) as cur:
            return [Turn(*r) for r in await cur.fetchall()]

    async def chats_to_delete(self, providers: list[str], session_id: str | None = None) -> list[tuple[str, str, str]]:
        return await reads.chats_to_delete(self._conn, providers, session_id=session_id)


class StoreUnavailable(Exception):
    """The database holding the sessions does not answer now (a server down or out of
    reach): raised by a `SessionStore` read, so the request path can tell it from a bug."""
