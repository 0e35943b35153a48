"""The PostgreSQL schema's migrations on a real server: applied once however many
instances start together on an empty database, and the tables behave as SQLite's do."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from provider_router.store.pg.migrations import MIGRATIONS, MIGRATIONS_LOCK, migrate
from tests.postgres import Server
from tests.waiting import until_sync

pytestmark = pytest.mark.xdist_group("postgres")

MIGRATE = "import sys; from provider_router.store.pg.migrations import migrate; print(','.join(migrate(sys.argv[1])))"


def _waiting_on_lock(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        row = c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchone()
        return int(row[0])  # type: ignore[index]


def test_four_processes_migrating_an_empty_database_at_once_apply_each_step_once(pg_db: str) -> None:
    """Four processes start migrating one empty database while the lock is held, so that
    all four wait on it at once: one applies every step, the other three find them
    applied, and `_migrations` lists each step once."""
    with psycopg.connect(pg_db, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATIONS_LOCK,))
        procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, pg_db], stdout=subprocess.PIPE, text=True) for _ in range(4)]
        until_sync(lambda: _waiting_on_lock(pg_db) == 4, "four migrating processes waiting on the lock")
        holder.execute("COMMIT")
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    names = ",".join(name for name, _ in MIGRATIONS)
    assert sorted(outs) == ["", "", "", names]
    with psycopg.connect(pg_db) as c:
        assert [r[0] for r in c.execute("SELECT name FROM _migrations ORDER BY name")] == names.split(",")
    assert migrate(pg_db) == []  # and again: nothing to do


def _tallies(c: psycopg.Connection) -> dict[str, int]:
    return {e: int(n) for e, n in c.execute("SELECT event, n FROM session_tallies WHERE event LIKE 'ended%'")}


def _session(c: psycopg.Connection, sid: str, client: str, state: str, chat_id: str | None = None) -> None:
    """A session of 1.5 s and 3 requests."""
    c.execute(
        "INSERT INTO sessions (id, fingerprint, client, provider, upstream_model, chat_id, state, created_at,"
        " last_accessed_at, expires_at, request_count) VALUES (%s, 'f', %s, 'qwen', 'm', %s, %s,"
        " '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.500Z', '2026-01-01T01:00:00.000Z', 3)",
        (sid, client, chat_id, state),
    )


def test_session_counters_follow_the_rows_as_sqlite_triggers_do(pg_db: str) -> None:
    """SQLite's counting triggers on PostgreSQL: a session that ends adds its duration (ms)
    and requests to the ended figures and its client's count, a revived one takes them
    back, deleting an active one counts it as ended and keeps its upstream chats for
    deletion; deleting an ended one changes no figure."""
    migrate(pg_db)
    with psycopg.connect(pg_db, autocommit=True) as c:
        _session(c, "s1", "alice", "active", chat_id="chat-1")
        c.execute("INSERT INTO turns (session_id, message_hash, turn, chat_id, created_at) VALUES ('s1', '\\x01', 1, 'chat-2', now())")
        assert _tallies(c) == {"ended_sessions": 0, "ended_ms": 0, "ended_requests": 0}
        c.execute("UPDATE sessions SET state = 'expired' WHERE id = 's1'")
        assert _tallies(c) == {"ended_sessions": 1, "ended_ms": 1500, "ended_requests": 3}
        c.execute("UPDATE sessions SET state = 'active' WHERE id = 's1'")
        assert _tallies(c) == {"ended_sessions": 0, "ended_ms": 0, "ended_requests": 0}
        c.execute("DELETE FROM sessions WHERE id = 's1'")
        assert _tallies(c) == {"ended_sessions": 1, "ended_ms": 1500, "ended_requests": 3}
        assert c.execute("SELECT client, created, ended FROM session_clients").fetchall() == [("alice", 1, 1)]
        kept = c.execute("SELECT provider, chat_id, session_id FROM chat_deletions ORDER BY chat_id").fetchall()
        assert kept == [("qwen", "chat-1", "s1"), ("qwen", "chat-2", "s1")]
        _session(c, "s2", "bob", "expired")  # ended before its first write
        assert _tallies(c) == {"ended_sessions": 2, "ended_ms": 3000, "ended_requests": 6}
        c.execute("DELETE FROM sessions WHERE id = 's2'")
        assert _tallies(c) == {"ended_sessions": 2, "ended_ms": 3000, "ended_requests": 6}


def test_request_partitions_are_made_once_per_day_and_rows_land_in_their_day(pg_db: str) -> None:
    """request_partitions() makes each missing day once (a second call makes none), and a
    request row is stored in the partition of its day."""
    migrate(pg_db)
    with psycopg.connect(pg_db, autocommit=True) as c:
        assert c.execute("SELECT request_partitions('2026-02-27', '2026-03-02')").fetchone() == (4,)
        assert c.execute("SELECT request_partitions('2026-03-01', '2026-03-03')").fetchone() == (1,)
        c.execute("INSERT INTO requests (id, received_at, method, path) VALUES ('a', '2026-03-01T23:59:59.999Z', 'POST', '/v1/x')")
        where = c.execute("SELECT tableoid::regclass::text FROM requests WHERE id = 'a'").fetchone()
        assert where == ("requests_20260301",)
