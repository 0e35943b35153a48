"""Sessions on a real PostgreSQL server: two instances (each its own log writer, pool,
session repository and advisory-lock coordination) continuing one conversation, the
repository reading back what SQLite's reads back for the same changes, and the chat
locks and the leader across instances."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import psycopg
import pytest
import structlog
from aiohttp.test_utils import make_mocked_request
from psycopg_pool import AsyncConnectionPool

from provider_router.config import SessionsConfig, parse_config
from provider_router.records import RequestRecord
from provider_router.routing import Route, Router
from provider_router.sessions import Sessions
from provider_router.store import LogWriter, connect
from provider_router.store.locks import Coordination
from provider_router.store.pg import locks as pg_locks
from provider_router.store.pg.migrations import migrate
from provider_router.store.pg.sessions import PgSessionRepo
from provider_router.store.sessions import Session, SessionRepo, SessionStore, Turn
from provider_router.threads import Threads
from tests.waiting import until

pytestmark = pytest.mark.xdist_group("postgres")
Msg = dict[str, Any]


@dataclass
class Upstream:
    """A threaded upstream as strict as a real one: a turn names a chat it made and, as
    parent, a reply of that chat (None: the chat's root); it keeps who answered what."""

    chats: dict[str, dict[str, str | None]] = field(default_factory=dict)  # chat -> reply -> parent
    sent: list[tuple[str, str | None, list[Msg]]] = field(default_factory=list)
    _ids: Any = field(default_factory=itertools.count)

    async def new_chat(self) -> str:
        chat = f"chat-{next(self._ids)}"
        self.chats[chat] = {}
        return chat

    def answer(self, chat: str, parent: str | None, messages: list[Msg]) -> str:
        assert chat in self.chats, f"no chat {chat}"
        assert parent is None or parent in self.chats[chat], f"no reply {parent} in {chat}"
        reply = f"r{next(self._ids)}"
        self.chats[chat][reply] = parent
        self.sent.append((chat, parent, messages))
        return reply


class Qwen:
    """What Sessions asks of a threaded provider."""

    name, threaded, forwards, upstream, delete_chats = "qwen", True, False, None, False


@dataclass
class Instance:
    writer: LogWriter
    pool: AsyncConnectionPool
    coord: Coordination
    sessions: Sessions
    threads: Threads


ROUTE_CONFIG = """
providers: [{name: qwen, type: qwen, base_url: "http://127.0.0.1:9", token: t}]
models: [{name: "qwen*", provider: qwen}]
"""


def _route() -> Route:
    return Router(parse_config(ROUTE_CONFIG)).route("qwen3-max")


async def _instance(dsn: str, cfg: SessionsConfig) -> Instance:
    writer = LogWriter(dsn)
    await writer.start()
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=2, open=False)
    await pool.open()
    coord = await pg_locks.coordination(dsn, refresh=0.05)
    sessions = Sessions(cfg, PgSessionRepo(pool, writer), {"qwen": Qwen()}, coord)  # type: ignore[dict-item]
    await sessions.start()
    return Instance(writer, pool, coord, sessions, Threads(sessions))


async def _close(i: Instance) -> None:
    await i.writer.stop()
    await i.pool.close()
    await i.coord.aclose()


@pytest.fixture
async def pair(pg_db: str) -> AsyncIterator[list[Instance]]:
    migrate(pg_db)
    cfg = SessionsConfig(lock_wait_seconds=5)
    both = [await _instance(pg_db, cfg), await _instance(pg_db, cfg)]
    yield both
    for i in both:
        await _close(i)


async def _turn(i: Instance, up: Upstream, history: list[Msg]) -> str:
    """One turn as the API runs it: placed, its chat held, answered, recorded; the reply."""
    rec = RequestRecord("POST", "/v1/chat/completions", client="alice")
    p = await i.threads.place(make_mocked_request("POST", "/v1/chat/completions"), rec, _route(), history)
    async with i.threads.hold(p, up.new_chat) as held:
        p = held.placement
        reply = up.answer(p.chat_id, p.parent_id, p.messages)  # type: ignore[arg-type]
        rec.chat_id, rec.reply_id, rec.response_text = p.chat_id, reply, f"answer {reply}"
        await i.threads.record(p, rec)
    return f"answer {reply}"


async def test_turns_alternating_between_instances_continue_one_chat_under_the_right_parent(pair: list[Instance]) -> None:
    """A conversation whose turns go to one instance then the other: one upstream chat,
    each turn sent under the reply it continues with only the new message; a regenerate
    and an edit of the last question are both new children of the reply before it."""
    up = Upstream()
    history: list[Msg] = [{"role": "user", "content": "q0"}]
    for n in range(4):
        history += [{"role": "assistant", "content": await _turn(pair[n % 2], up, history)}]
        history += [{"role": "user", "content": f"q{n + 1}"}]
    (chat,) = up.chats
    chain = list(up.chats[chat])
    assert [(c, p) for c, p, _ in up.sent] == [(chat, None), *((chat, r) for r in chain[:3])]  # under the reply before
    assert [m for _, _, m in up.sent[1:]] == [[{"role": "user", "content": f"q{n}"}] for n in range(1, 4)]
    await _turn(pair[0], up, history[:-2])  # regenerate the last answer (to q3), on the other instance
    await _turn(pair[1], up, history[:-3] + [{"role": "user", "content": "q3, edited"}])  # edit q3
    assert [(c, p) for c, p, _ in up.sent[-2:]] == [(chat, chain[2]), (chat, chain[2])]
    assert [m for _, _, m in up.sent[-2:]] == [[{"role": "user", "content": "q3"}], [{"role": "user", "content": "q3, edited"}]]
    assert len(up.chats) == 1 and len(await pair[1].sessions.repo.ids("")) == 1


# -- the same reads as SQLite -------------------------------------------------------------
T0 = 1_780_000_000.125


def _session(sid: str, fp: str, client: str, at: float, **kw: Any) -> Session:
    return Session(sid, fp, client, "qwen", "qwen3-max", at, at, at + 60, **kw)


async def _changes(repo: SessionStore, durable: Callable[[], Awaitable[bool]]) -> None:
    """Every kind of change a daemon queues, in an order that exercises each."""
    a = _session("sess-a", "fp-a", "alice", T0, chat_id="chat-a", metadata={"user_agent": "x", "client": "alice"})
    b = _session("sess-b", "fp-b", "bob", T0 + 1, metadata={"explicit": True})
    c = _session("sess-c", "fp-c", "alice", T0 + 2, chat_id="chat-c")
    d = _session("sess-d", "fp-d", "carol", T0 + 3, chat_id="chat-d")
    for s in (a, b, c, d):
        repo.create(s)
    a.request_count, a.message_count, a.parent_id, a.last_access = 3, 5, "r2", T0 + 10.5
    a.expires = T0 + 70.5
    repo.save(a)
    repo.save(a)  # coalesced with the one before
    repo.add_turn("sess-a", Turn(b"\x01" * 32, 1, "chat-a", "r1"), "req-1", T0 + 5)
    repo.add_turn("sess-a", Turn(b"\x02" * 32, 2, "chat-a", "r2"), "req-2", T0 + 6)
    repo.add_turn("sess-a", Turn(b"\x03" * 32, 1, "chat-old", "r0"), "req-0", T0 + 4)
    repo.add_turn("sess-c", Turn(b"\x04" * 32, 1, "chat-c", "r9"), "req-9", T0 + 7)
    repo.add_turn("gone", Turn(b"\x05" * 32, 1, "chat-x", "rx"), "req-x", T0 + 7)  # no such session: no turn
    repo.forget_chat("sess-a", "chat-old")
    repo.forget_chat("sess-c", "chat-c")
    repo.expire_stored(T0 + 62.5)  # b, c and d have run out; a has not
    repo.evict_stored("sess-a")
    e = _session("sess-e", "fp-e", "alice", T0 + 100)
    repo.create(e)
    e.state = "expired"
    repo.end(e, "expired")
    repo.delete("sess-d")
    repo.chat_deleted("qwen", "chat-d", "sess-d", T0 + 120)
    repo.chat_deleted("qwen", "chat-a", "sess-a", T0 + 121, error="ClientError 500")
    assert await durable()


async def _reads(repo: SessionStore) -> dict[str, Any]:
    now = T0 + 30
    return {
        "active": await repo.load_active(now),
        "find": [await repo.find_active(fp, now) for fp in ("fp-a", "fp-b", "fp-x")],
        "expiring": await repo.expiring(T0 + 500),
        "beyond": [await repo.beyond_max(k) for k in (0, 1, 5)],
        "tallies": await repo.tallies(),
        "ids": [await repo.ids("sess-"), await repo.ids("sess-", "alice"), await repo.ids("sess_"), await repo.ids("x")],
        "load": [await repo.load(s) for s in ("sess-a", "sess-b", "sess-c", "sess-d", "sess-e")],
        "turns": [sorted(await repo.load_turns(s), key=lambda t: t.message_hash) for s in ("sess-a", "sess-c", "gone")],
        "chats": [await repo.chats_to_delete(["qwen"]), await repo.chats_to_delete(["qwen"], "sess-a"), await repo.chats_to_delete([])],
    }


@contextlib.asynccontextmanager
async def _sqlite_repo(db: Path) -> AsyncIterator[tuple[SessionRepo, LogWriter]]:
    """A SQLite session repository writing through a log writer process, both stopped after."""
    conn = await connect(db)
    writer = LogWriter(str(db))
    await writer.start()
    try:
        yield SessionRepo(conn, writer), writer
    finally:
        await writer.stop()
        await conn.close()


@contextlib.asynccontextmanager
async def _pg_repo(pg_db: str) -> AsyncIterator[tuple[PgSessionRepo, LogWriter]]:
    """The PostgreSQL session repository writing through a log writer process, both stopped after."""
    writer = LogWriter(pg_db)
    await writer.start()
    async with AsyncConnectionPool(pg_db, min_size=1, max_size=2) as pool:
        try:
            yield PgSessionRepo(pool, writer), writer
        finally:
            await writer.stop()


async def test_the_repository_reads_back_what_sqlite_reads_for_the_same_changes(pg_db: str, tmp_path: Path) -> None:
    """The same changes (create, save, turns, forget_chat, expire, evict, end, delete,
    chat deletions) queued through the log writer to SQLite and to PostgreSQL: every
    read of the SessionStore gives the same, tallies included."""
    migrate(pg_db)
    got = []
    async with _sqlite_repo(tmp_path / "s.db") as (sqlite_repo, _):
        await _changes(sqlite_repo, sqlite_repo.durable)
        got.append(await _reads(sqlite_repo))
    async with _pg_repo(pg_db) as (pg_repo, writer):
        await _changes(pg_repo, pg_repo.durable)
        got.append(await _reads(pg_repo))
    assert writer.failed == 0
    sqlite, pg = got
    for k in sqlite:
        assert pg[k] == sqlite[k], k
    assert sqlite["tallies"]["created"] == 5 and sqlite["tallies"]["deleted"] == 1 and sqlite["tallies"]["evicted"] == 1
    assert [s.state if s else None for s in sqlite["load"]] == ["expired", "expired", "expired", None, "expired"]


async def test_a_read_on_a_pooled_connection_the_server_closed_is_made_on_another(pg_db: str) -> None:
    """A pooled connection the server closed meanwhile (a restart) fails its next query:
    the read is made again on a fresh connection rather than failing the request."""
    migrate(pg_db)
    async with AsyncConnectionPool(pg_db, min_size=1, max_size=1) as pool:
        repo = PgSessionRepo(pool, LogWriter(pg_db))  # never started: reads only
        assert await repo.tallies()
        with psycopg.connect(pg_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert (await repo.tallies())["created"] == 0


# -- locks and the leader ----------------------------------------------------------------
@pytest.fixture
async def coords(pg_db: str) -> AsyncIterator[list[Coordination]]:
    both = [await pg_locks.coordination(pg_db, refresh=0.05) for _ in range(2)]
    yield both
    for c in both:
        await c.aclose()


def _soon(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_a_chat_lock_excludes_the_other_instance_until_released(coords: list[Coordination]) -> None:
    """While one instance holds a chat's lock, the other's attempt times out at its
    deadline; one that waits gets it once the first releases it; keys are independent."""
    a, b = coords
    release_a = await a.locks.acquire("chat-1", _soon(5))
    with pytest.raises(TimeoutError):
        await b.locks.acquire("chat-1", _soon(0.2))
    (await b.locks.acquire("chat-2", _soon(5)))()  # another chat is free
    waiter = asyncio.create_task(b.locks.acquire("chat-1", _soon(30)))
    await until(lambda: b.locks.waiting("chat-1") == 1, "the second instance waiting")
    assert not waiter.done()
    release_a()
    release_b = await waiter
    with pytest.raises(TimeoutError):
        await a.locks.acquire("chat-1", _soon(0.2))
    release_b()
    (await a.locks.acquire("chat-1", _soon(5)))()


async def test_turns_of_one_instance_queue_locally_and_take_the_lock_in_turn(coords: list[Coordination]) -> None:
    """Two turns of one instance on one chat: the second waits for the first's release
    (as a turn of another instance would), then holds it; the other instance is excluded
    meanwhile."""
    a, b = coords
    first = await a.locks.acquire("chat-1", _soon(5))
    second = asyncio.create_task(a.locks.acquire("chat-1", _soon(30)))
    await until(lambda: a.locks.waiting("chat-1") == 2, "the second turn queued")
    first()
    release = await second
    with pytest.raises(TimeoutError):
        await b.locks.acquire("chat-1", _soon(0.2))
    release()
    (await b.locks.acquire("chat-1", _soon(5)))()


async def test_locks_go_with_their_instance_connection(pg_db: str, coords: list[Coordination]) -> None:
    """An instance's locks are released when its lock connection ends: closed with the
    instance, or cut by the server (the instance then says so once, and opens it again)."""
    a, b = coords
    release_a = await a.locks.acquire("chat-1", _soon(5))
    c = await pg_locks.coordination(pg_db, refresh=0.05)
    await c.locks.acquire("chat-2", _soon(5))
    await c.aclose()
    (await b.locks.acquire("chat-2", _soon(5)))()
    with structlog.testing.capture_logs() as logs:
        with psycopg.connect(pg_db, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (a.locks.connection.pid,))  # type: ignore[attr-defined]
        release_b = await b.locks.acquire("chat-1", _soon(5))
        await until(lambda: any(x["event"] == "coordination_reconnected" for x in logs), "the instance reconnecting")
    assert [x["event"] for x in logs].count("coordination_connection_lost") == 1
    release_a()  # its turn ends: nothing to unlock on the new connection, nor of b's
    with pytest.raises(TimeoutError):
        await a.locks.acquire("chat-1", _soon(0.2))
    release_b()
    (await a.locks.acquire("chat-1", _soon(5)))()  # it locks again on its new connection


def _leaders(coords: list[Coordination]) -> list[Coordination]:
    return [c for c in coords if c.leader.lead()]


async def test_exactly_one_instance_leads_and_another_takes_over(pg_db: str, coords: list[Coordination]) -> None:
    """Of the instances on one database exactly one leads; its lock connection cut, it
    gives the lead up (and says so), and one instance leads again; closed, the other
    leads."""
    third = await pg_locks.coordination(pg_db, refresh=0.05)
    everyone = [*coords, third]
    try:
        (leader,) = _leaders(everyone)
        with structlog.testing.capture_logs() as logs:
            with psycopg.connect(pg_db, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (leader.locks.connection.pid,))  # type: ignore[attr-defined]
            await until(lambda: any(x["event"] == "coordination_connection_lost" for x in logs), "the loss noticed")
            await until(lambda: len(_leaders(everyone)) == 1, "a leader again")
        (lost,) = [x for x in logs if x["event"] == "coordination_connection_lost"]
        assert lost["leader_given_up"] is True
        (leader,) = _leaders(everyone)
        await leader.aclose()
        rest = [c for c in everyone if c is not leader]
        await until(lambda: len(_leaders(rest)) == 1, "another instance leading")
        assert not leader.leader.lead()
    finally:
        await third.aclose()


async def _saved_after_another_moved_it(repo: SessionStore, durable: Callable[[], Awaitable[bool]]) -> Session | None:
    """Instance B read the session; instance A then moved its thread to a new chat; B saves
    its copy (counting its request): the row keeps A's chat. Before, B's save wrote its
    stale chat back, and B's own "chat gone" then cleared A's chat: a third upstream chat."""
    a = _session("sess-m", "fp-m", "alice", T0, chat_id="chat-old", parent_id="r1")
    repo.create(a)
    assert await durable()
    b = await repo.load("sess-m")
    assert b is not None and b.chat_id == "chat-old"
    a.move("chat-new", None)
    repo.save(a)
    assert await durable()
    b.request_count += 1
    repo.save(b)
    assert await durable()
    return await repo.load("sess-m")


async def test_a_stale_copy_saved_keeps_the_thread_another_instance_moved_sqlite(tmp_path: Path) -> None:
    async with _sqlite_repo(tmp_path / "s.db") as (repo, _):
        row = await _saved_after_another_moved_it(repo, repo.durable)
    assert row is not None and (row.chat_id, row.parent_id, row.request_count) == ("chat-new", "r1", 1)


async def test_a_stale_copy_saved_keeps_the_thread_another_instance_moved_postgresql(pg_db: str) -> None:
    migrate(pg_db)
    async with _pg_repo(pg_db) as (repo, _):
        row = await _saved_after_another_moved_it(repo, repo.durable)
    assert row is not None and (row.chat_id, row.parent_id, row.request_count) == ("chat-new", "r1", 1)
