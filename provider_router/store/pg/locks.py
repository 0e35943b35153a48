"""Coordination of instances sharing a PostgreSQL database (store/locks.py's interfaces):
one turn at a time per upstream chat (`PgLocks`) and one leader (`PgLeader`), both from
session-level advisory locks on one connection of the instance's own (`LockConnection`).

A turn lasts up to minutes: a pool connection held for each would take the pool, so every
lock of the instance lives on that one connection, and the server drops them all when it
closes (the instance exits or dies). If it is lost, so are its locks: it is opened again,
one warning says so, the leader is given up and taken again by whichever instance asks
first; the turns holding a chat lock then finish unprotected, as a killed SQLite
instance's record locks would have gone too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

import psycopg
import structlog

from ... import location
from ..locks import Coordination, LocalLocks, Release, take
from ..sessions import StoreUnavailable

log = structlog.get_logger("provider_router")

LEADER_LOCK = 0x70726C656164  # 'prlead', beside migrations.py's keys
# After a failed connection attempt, none again before this (queries fail at once meanwhile).
RECONNECT_MOST_S = 5.0
# The lock connection notices a dead server or network within about this (TCP keepalives).
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}


def lock_key(key: str) -> int:
    """The advisory lock (a signed 64-bit key) of a chat lock's name."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, person=b"chatlock").digest(), "big", signed=True)


class LockConnection:
    """The instance's lock connection: one query at a time, unlocks queued by synchronous
    releases and sent before anything else, and a small task that sends them, keeps the
    leader's state (`leading`) fresh every `refresh` seconds and so notices a lost
    connection even when idle. `generation` counts connections: a lock taken on an
    earlier one is gone with it."""

    def __init__(self, dsn: str, refresh: float = 1.0) -> None:
        self._dsn = dsn
        self._refresh = refresh
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._io = asyncio.Lock()
        self._unlocks: list[int] = []  # keys held on this generation, to unlock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._pause = 0.1
        self._closed = False
        self.generation = 0
        self.held = 0  # chat locks held on the current connection
        self.leading = False
        self.wants_lead = True

    @property
    def pid(self) -> int | None:
        """The server process of the connection now (None while there is none): for
        operators (pg_stat_activity) and tests."""
        conn = self._conn
        return None if conn is None or conn.closed or conn.broken else conn.info.backend_pid

    async def start(self) -> None:
        """Connect (failing loudly if the database is unreachable), try the lead once,
        and start the refreshing task."""
        async with self._io:
            await self._connection()
            await self._tick()
        self._task = asyncio.create_task(self._run(), name="pg-coordination")

    def _shown(self, e: BaseException) -> str:
        return location.error_text(self._dsn, e)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._lost(None)
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            raise psycopg.OperationalError("the lock connection is being opened again")
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=5, application_name="provider-router locks", **_KEEPALIVE
            )
        except psycopg.OperationalError:
            self._retry_at = loop.time() + self._pause
            self._pause = min(self._pause * 2, RECONNECT_MOST_S)
            raise
        self._pause = 0.1
        if self.generation:
            log.info("coordination_reconnected")
        self.generation += 1
        return self._conn

    def _lost(self, error: BaseException | None) -> None:
        """The connection, and every lock on it, is gone: say so once; the leader is given
        up (retaken by whichever instance asks first), pending unlocks are moot."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()  # no round trip to a server that is gone
        log.warning(
            "coordination_connection_lost", error=self._shown(error) if error else "closed",
            leader_given_up=self.leading, chat_locks_lost=self.held,
        )  # fmt: skip
        self.leading = False
        self.held = 0
        self._unlocks.clear()
        self.generation += 1

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first value of `sql`'s one row, after the queued unlocks (under `_io`)."""
        conn = await self._connection()
        try:
            while self._unlocks:
                key = self._unlocks[0]
                await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                self._unlocks.pop(0)
                self.held -= 1
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            row = await cur.fetchone()
        except psycopg.OperationalError as e:
            self._lost(e)
            raise
        return None if row is None else row[0]

    async def try_lock(self, key: int) -> tuple[bool, int]:
        """Whether `key` was free and is now held, on which generation."""
        async with self._io:
            got = bool(await self._query("SELECT pg_try_advisory_lock(%s)", (key,)))
            if got:
                self.held += 1
            return got, self.generation

    def unlock_later(self, generation: int, key: int) -> None:
        """Release `key`, taken on `generation`: queued, sent before the next query (nothing
        to do if that connection is gone: so is the lock)."""
        if generation == self.generation and not self._closed:
            self._unlocks.append(key)
            self._wake.set()

    async def _tick(self) -> None:
        """Under `_io`: take the lead if nobody holds it; else make sure the connection
        (and the lead, if held) is still there."""
        if self.wants_lead and not self.leading:
            if await self._query("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)):
                self.leading = True
                log.info("leading", runs="session expiry, the chat sweep, retention")
        else:
            await self._query("SELECT 1")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._refresh
        while not self._closed:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that comes as the event is set (a release just before `close`).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            try:
                async with self._io:
                    if loop.time() >= due:
                        due = loop.time() + self._refresh
                        await self._tick()
                    elif self._unlocks:
                        await self._query("SELECT 1")
            except psycopg.Error:
                pass  # lost (said once) or still being opened again: the next tick retries

    def give_up_lead(self) -> None:
        """Lead no more (the lock itself goes with the connection, at `close`)."""
        self.wants_lead = False
        self.leading = False

    async def close(self) -> None:
        """Stop the task and close the connection: the server drops every lock on it."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._io:
            conn, self._conn = self._conn, None
            self.leading = False
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()


# A turn waiting for its chat lock while the lock connection cannot be opened gives up
# after this (the database is down: 503), not at its lock deadline (429 busy).
DOWN_GIVE_UP_S = 3.0


class PgLocks:
    """Chat locks shared by the instances on one database: advisory locks on the lock
    connection. Turns of this process queue on a local lock first (one poller per key),
    then poll `pg_try_advisory_lock` with a growing pause until it is free or the
    deadline passes, as FileLocks does."""

    def __init__(self, connection: LockConnection) -> None:
        self.connection = connection
        self._local = LocalLocks()

    async def acquire(self, key: str, deadline: float) -> Release:
        conn, at = self.connection, lock_key(key)
        loop = asyncio.get_running_loop()
        held = -1  # the generation of the connection the lock was taken on
        down_since: float | None = None  # while the lock connection is being opened again

        async def attempt(left: float) -> bool:
            nonlocal held, down_since
            got, generation = await self._try(at, left)
            if got:
                held = generation
            elif generation != -1:
                down_since = None
            elif down_since is None:
                down_since = loop.time()
            elif loop.time() - down_since >= DOWN_GIVE_UP_S:  # not a blip: the database is down
                raise StoreUnavailable("the lock connection cannot be opened")
            return got

        return await take(self._local, key, deadline, attempt, lambda: conn.unlock_later(held, at))

    async def _try(self, at: int, left: float) -> tuple[bool, int]:
        """One attempt, given up at the deadline (TimeoutError) or cancelled, never leaving
        behind a lock it took meanwhile; (False, _) while the connection is being opened
        again."""
        attempt = asyncio.ensure_future(self.connection.try_lock(at))
        try:
            async with asyncio.timeout(max(left, 0.001)):
                return await asyncio.shield(attempt)
        except psycopg.OperationalError:
            return False, -1
        except BaseException:
            attempt.add_done_callback(self._undo(at))
            raise

    def _undo(self, at: int) -> Any:
        def undo(attempt: asyncio.Future[tuple[bool, int]]) -> None:
            if not attempt.cancelled() and attempt.exception() is None:
                got, generation = attempt.result()
                if got:
                    self.connection.unlock_later(generation, at)

        return undo

    def waiting(self, key: str) -> int:
        return self._local.waiting(key)


class PgLeader:
    """The instance holding the leader's advisory lock leads; the lock connection's task
    takes it when free and notices when it is lost. `lead()` answers from that state."""

    def __init__(self, connection: LockConnection) -> None:
        self.connection = connection

    def lead(self) -> bool:
        return self.connection.leading

    def close(self) -> None:
        self.connection.give_up_lead()


async def coordination(dsn: str, *, refresh: float = 1.0) -> Coordination:
    """The coordination of instances sharing the PostgreSQL database at `dsn`: its lock
    connection opened (psycopg.OperationalError if it cannot be), the lead tried once;
    close with `await coord.aclose()`."""
    conn = LockConnection(dsn, refresh)
    await conn.start()
    leader = PgLeader(conn)
    return Coordination(True, PgLocks(conn), leader, [leader.close], [conn.close])
