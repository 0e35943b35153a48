"""Retention on a real PostgreSQL server: `prune` drops the days before the cut-off in
bounded transactions with what only they used, deletes the expired sessions as SQLite's
prune does, is finished by the next run when cut short, and leaves the writers writing;
`provider-router db prune|vacuum|path` on a `postgresql://` URL."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any, AsyncIterator

import psycopg
import pytest
from click.testing import CliRunner
from psycopg_pool import AsyncConnectionPool

from provider_router.cli import cli as root
from provider_router.store import LogWriter
from provider_router.store.pg import reads
from provider_router.store.pg.migrations import migrate
from provider_router.store.pg.retention import prune, prune_now
from provider_router.store.pg.sessions import PgSessionRepo
from provider_router.store.sessions import Session
from tests.test_pg_writer import _on
from tests.test_tree import _record

pytestmark = pytest.mark.xdist_group("postgres")
OLD, NEW, LATER = dt.date(2026, 3, 1), dt.date(2026, 3, 2), dt.date(2026, 3, 3)
CUT = "2026-03-02T12:00:00.000Z"  # the first day has ended by then, the second has not


def _at(day: dt.date, hour: int = 12) -> float:
    return dt.datetime.combine(day, dt.time(hour), dt.timezone.utc).timestamp()


def _session(sid: str, day: dt.date, state: str) -> Session:
    return Session(sid, f"fp-{sid}", "alice", "qwen", "m", _at(day), _at(day), _at(day) + 60, state=state)


CONV = [{"role": "system", "content": "s"}, {"role": "user", "content": "kept question"}]
TOOLS = ({"tools": [{"type": "function", "function": {"name": "only_then", "description": "x" * 200}}]}, False)


@pytest.fixture
async def filled(pg_db: str) -> AsyncIterator[tuple[str, LogWriter]]:
    """Two days of requests (a conversation begun on the first and continued on the
    second; a question with its own tool list asked only on the first) and three
    sessions (expired on the first day, expired after the cut, active since the first
    day), written by a running log writer, which the test goes on using."""
    migrate(pg_db)
    writer = LogWriter(pg_db)
    await writer.start()
    for r in [
        _on(OLD, _record(1, CONV, {"role": "assistant", "content": "a1"}, ({}, False), 0)),
        _on(OLD, _record(2, [{"role": "user", "content": "forgotten question"}], {"role": "assistant", "content": "gone"}, TOOLS, 1)),
        _on(NEW, _record(1, [*CONV, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "next day"}],
                         {"role": "assistant", "content": "a2"}, ({}, False), 2)),
    ]:  # fmt: skip
        writer.submit(r)
    async with AsyncConnectionPool(pg_db, min_size=1, max_size=1) as pool:
        repo = PgSessionRepo(pool, writer)
        for s in (_session("old-expired", OLD, "expired"), _session("new-expired", LATER, "expired"), _session("old-active", OLD, "active")):
            repo.create(s)
        assert await repo.durable()
    try:
        yield pg_db, writer
    finally:
        await writer.stop()


def _one(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn) as c:
        return c.execute(sql).fetchone()[0]  # type: ignore[index]


async def test_prune_drops_the_days_before_the_cut_in_bounded_steps_and_the_writer_goes_on(filled: tuple[str, LogWriter]) -> None:
    """A prune one request per transaction: the first day's two requests go, with the
    tool list and the two messages only they used, each slice bumping the writers'
    epoch once; the expired session last used before the cut goes, the others stay.
    The running writer then logs a conversation's next turn and a late record of the
    dropped day (its partition made again), and every request left reads back."""
    dsn, writer = filled
    epoch = _one(dsn, "SELECT n FROM writer_epoch")
    result = await prune(dsn, CUT, batch=1)
    assert (result.cutoff, result.requests, result.sessions, result.messages, result.blobs) == (CUT, 2, 1, 2, 1)
    assert _one(dsn, "SELECT n FROM writer_epoch") == epoch + 2
    assert _one(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE 'requests_20260301%'") == 0
    assert _one(dsn, "SELECT string_agg(id, ',' ORDER BY id) FROM sessions") == "new-expired,old-active"
    more = [
        _on(NEW, _record(1, [*CONV, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "again"}],
                         {"role": "assistant", "content": "a3"}, ({}, False), 3)),
        _on(OLD, _record(3, [{"role": "user", "content": "late"}], {"role": "assistant", "content": "late reply"}, TOOLS, 4)),
    ]  # fmt: skip
    for r in more:
        writer.submit(r)
    await writer.drained()
    assert writer.failed == 0
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        got = [await reads.get_request(conn, r.id) for r in more]
    assert [g["response_text"] for g in got] == ["a3", "late reply"]  # type: ignore[index]
    assert _one(dsn, "SELECT count(*) FROM requests") == 3


async def test_a_prune_cut_short_is_finished_by_the_next(filled: tuple[str, LogWriter]) -> None:
    """A prune stopped after its first slice leaves the detached day aside (not a
    partition: its name free for a late record); the next run finishes it, and the two
    runs' figures add up to one whole run's."""
    dsn, _ = filled
    stop = threading.Event()
    first = await asyncio.to_thread(prune_now, dsn, CUT, batch=1, stop=stop, progress=lambda kind, n: stop.set())
    assert first.requests == 1
    assert _one(dsn, "SELECT count(*) FROM pg_class WHERE relname = 'requests_20260301_retired'") == 1
    second = await asyncio.to_thread(prune_now, dsn, CUT)
    assert (first.requests + second.requests, first.messages + second.messages, first.blobs + second.blobs) == (2, 2, 1)
    assert first.sessions + second.sessions == 1
    assert _one(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE 'requests_20260301%'") == 0


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(root, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


async def test_db_prune_vacuum_and_path_on_a_postgresql_url(filled: tuple[str, LogWriter]) -> None:
    """`db prune --db postgresql://...` prunes as the daemon's retention does and says
    what went; `db vacuum` says it is not needed there; `db path` prints the URL."""
    dsn, _ = filled
    status, out, _ = await asyncio.to_thread(_run, "db", "prune", "--db", dsn, "--older-than", "2026-03-02T12:00:00")
    assert status == 0, out
    assert "deleted 2 request(s)" in out and "1 expired session(s)" in out and "2 message(s) and 1 stored" in out
    status, out, _ = await asyncio.to_thread(_run, "db", "vacuum", "--db", dsn)
    assert status == 0 and out.startswith("not needed on PostgreSQL")
    status, out, _ = await asyncio.to_thread(_run, "db", "path", "--db", dsn)
    assert (status, out.strip()) == (0, dsn)


async def test_a_url_password_never_reaches_the_output(postgres: Any) -> None:
    """A password in the URL is shown as *** by `db path` and in a failure's message."""
    url = f"postgresql://postgres:hunter2@{postgres.host}:{postgres.port}/no_such_db"
    status, out, err = await asyncio.to_thread(_run, "db", "prune", "--db", url, "--older-than", "30d")
    assert status == 1 and "hunter2" not in out + err and "***" in err
    status, out, _ = await asyncio.to_thread(_run, "db", "path", "--db", url)
    assert "hunter2" not in out and "postgres:***@" in out

