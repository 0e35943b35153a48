"""Several instances on one PostgreSQL database, as users run them: `serve --db
postgresql://...` processes (and `serve --workers N` on one) share the conversation tree,
sessions, threads and the one-turn-at-a-time rule of each upstream chat; four starting at
once migrate an empty database once; the database stopped under load crashes nothing, its
gap's rows are written afterwards, and /health says so meanwhile.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import psycopg
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provider_router.store.pg.migrations import MIGRATIONS
from tests.conftest import qwen_config
from tests.daemon import Daemon, Spawn, daemons, free_port
from tests.fakes.qwen import QwenFake
from tests.postgres import Server, running_server
from tests.test_threads_property import check_replies, op, run_trace
from tests.test_workers import ECHO, Pair, _ask, _both_answer, qwen_upstream  # noqa: F401  (a fixture)
from tests.waiting import until

pytestmark = pytest.mark.xdist_group("postgres")  # the session's one server, on one test worker


def count(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
    return row[0] if row else None


def new_database(server: Server) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return server.dsn(name)


async def _chat(url: str, text: str, http: aiohttp.ClientSession) -> int:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status


async def _health(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:  # a connection of its own: with workers the kernel picks one
        async with http.get(f"{url}/health") as r:
            return r.status, await r.json()


# -- starting ------------------------------------------------------------------------------
async def test_four_instances_started_at_once_on_an_empty_database_migrate_it_once_and_all_serve(
    spawn: Spawn, pg_db: str
) -> None:
    """Four `serve --db postgresql://...` started together on an empty database: one of
    them applies the migrations (the others wait at the lock and find them done), all four
    listen and answer, and their requests land in the one log."""
    four = await asyncio.gather(*(spawn(ECHO, db=pg_db) for _ in range(4)))
    assert count(pg_db, "SELECT count(*) FROM _migrations") == len(MIGRATIONS)
    migrated = [d for d in four if any(x.get("event") == "migrating_database" for x in d.lines())]
    assert len(migrated) == 1
    async with aiohttp.ClientSession() as http:
        assert [await _chat(d.url, f"hi {i}", http) for i, d in enumerate(four)] == [200] * 4
    assert [await d.stop() for d in four] == [0] * 4
    assert count(pg_db, "SELECT count(*) FROM requests WHERE status = 200") == 4
    for d in four:  # the URL is named in its lines, never with a password (it has none here)
        assert next(x for x in d.lines() if x.get("event") == "listening")["db"] == pg_db


async def test_an_unreachable_database_is_one_line_without_its_password(tmp_path: Path) -> None:
    cfg = tmp_path / "echo.yaml"
    cfg.write_text(ECHO)
    url = f"postgresql://proxy:s3cret-pw@127.0.0.1:{free_port()}/log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", "0", "--db", url,
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = (out + err).decode()
    assert proc.returncode == 1
    lines = [x for x in text.splitlines() if "startup_failed" in x]
    assert len(lines) == 1 and "cannot reach the PostgreSQL server" in lines[0], text[-2000:]
    assert "s3cret-pw" not in text and "proxy:***@127.0.0.1" in lines[0]


# -- threads across instances --------------------------------------------------------------
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(op, min_size=1, max_size=10), st.lists(st.booleans(), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_random_traces_across_two_instances_on_postgresql_keep_the_context_and_one_chat_per_opening(
    postgres: Server, ops: list[tuple[Any, ...]], streams: list[bool], rng: random.Random
) -> None:
    """test_workers' random-trace property on a PostgreSQL database (a new one per trace):
    continue, regenerate, edit, go back and restarts, each turn sent to a random one of two
    instances; every turn's upstream context is the client's history, no turn overlapped
    another upstream, one upstream chat per distinct opening (plus one per forgotten chat)."""
    db = new_database(postgres)
    asyncio.run(run_trace(ops, streams, lambda fake, cfg, tmp: Pair(fake, cfg, tmp, rng, db=db)))


async def test_two_instances_racing_turns_of_one_chat_on_postgresql_never_overlap_upstream(
    spawn: Spawn, pg_db: str, qwen_upstream: QwenFake
) -> None:
    """Continuations of one conversation sent at once, half to each instance: they reach
    the upstream one at a time (the fake refuses a turn in a chat still generating: none
    was), all in the one chat, each under the reply it continues."""
    cfg = yaml.safe_dump(qwen_config(qwen_upstream.base_url))  # type: ignore[attr-defined]
    a, b = await asyncio.gather(spawn(cfg, db=pg_db), spawn(cfg, db=pg_db))
    clients = [openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0) for d in (a, b)]
    opening = [{"role": "user", "content": "hi"}]
    base = opening + [{"role": "assistant", "content": await _ask(clients[0], opening, stream=True)}]
    histories = [base + [{"role": "user", "content": f"question {i}"}] for i in range(8)]
    before = len(qwen_upstream.turns)
    replies = await asyncio.gather(*(_ask(clients[i % 2], h, stream=i % 3 == 0) for i, h in enumerate(histories)))
    check_replies(qwen_upstream, before, histories, replies)
    assert qwen_upstream.refused_busy == 0 and qwen_upstream.created_chats == 1
    for c in clients:
        await c.close()


async def test_a_named_session_on_postgresql_counts_turns_sent_back_to_back(spawn: Spawn, pg_db: str) -> None:
    """Turns of an `X-Session-Id` session sent one right after another (as an SDK does):
    only the first starts it, and its row counts every request and the latest history,
    though each turn reads the row before the previous turn's change may be committed."""
    d = await spawn(ECHO, db=pg_db)
    client = openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0)
    history: list[Any] = [{"role": "user", "content": "hi"}]
    started = []
    for i in range(3):
        raw = await client.chat.completions.with_raw_response.create(
            model="echo", messages=history, extra_headers={"X-Session-Id": "named-turns"}
        )  # fmt: skip
        started.append(raw.headers["x-session-new"])
        history += [{"role": "assistant", "content": raw.parse().choices[0].message.content}, {"role": "user", "content": f"q{i}"}]
    await client.close()
    assert started == ["true", "false", "false"]
    assert await d.stop() == 0
    assert count(pg_db, "SELECT request_count || '/' || message_count FROM sessions WHERE id = 'named-turns'") == "3/5"


async def test_a_named_session_alternating_between_instances_is_new_only_on_its_first_turn(spawn: Spawn, pg_db: str) -> None:
    """`X-Session-New` says whether this request made the session: true on the first turn
    only, whichever instance the next turns reach, and whatever count that instance read
    from a row the other may not have updated yet."""
    pair = await asyncio.gather(spawn(ECHO, db=pg_db), spawn(ECHO, db=pg_db))
    clients = [openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0) for d in pair]
    history: list[Any] = [{"role": "user", "content": "hi"}]
    started = []
    for i in range(4):
        raw = await clients[i % 2].chat.completions.with_raw_response.create(
            model="echo", messages=history, extra_headers={"X-Session-Id": "named-across"}
        )  # fmt: skip
        started.append(raw.headers["x-session-new"])
        history += [{"role": "assistant", "content": raw.parse().choices[0].message.content}, {"role": "user", "content": f"q{i}"}]
    for c in clients:
        await c.close()
    assert started == ["true", "false", "false", "false"]
    # and its row counts every request and the latest history, though turns alternated
    assert count(pg_db, "SELECT request_count || '/' || message_count FROM sessions WHERE id = 'named-across'") == "4/7"


# -- serve --workers N -----------------------------------------------------------------------
async def test_workers_on_postgresql_share_one_port_and_log_every_row(spawn: Spawn, pg_db: str) -> None:
    d = await spawn(ECHO, "--workers", "2", db=pg_db)
    await d.wait_log("workers_listening")
    await _both_answer(d.url)
    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(_chat(d.url, f"hi {i}", http) for i in range(40)))
    assert statuses == [200] * 40
    assert await d.stop() == 0
    assert count(pg_db, "SELECT count(*) FROM requests WHERE status = 200") == 40


# -- the database going away ---------------------------------------------------------------
@pytest.fixture
async def own_server() -> AsyncIterator[Server]:
    """A cluster of this test's own, to stop and start (the session's serves the others)."""
    with running_server() as server:
        yield server


OUTAGE_SECONDS = 10.0  # the scenario: how long the database stays down while requests flow


async def test_the_database_stopped_under_load_crashes_nothing_and_loses_no_row(tmp_path: Path, own_server: Server) -> None:
    """Two instances under steady load; the PostgreSQL server stops for 10 s. Meanwhile
    both keep answering the stateless requests, a named session's turn (whose row cannot
    be read) is a 503 `database_unavailable`, and /health answers 503 naming the
    database; once it is back, /health is 200 again and every answered request has its
    row (none dropped: the queue held them)."""
    url = new_database(own_server)
    async with daemons(tmp_path) as spawn:
        pair = await asyncio.gather(spawn(ECHO, db=url), spawn(ECHO, db=url))
        answered: list[int] = []
        stop_load = asyncio.Event()

        async def load(d: Daemon) -> None:
            async with aiohttp.ClientSession() as http:
                i = 0
                while not stop_load.is_set():
                    answered.append(await _chat(d.url, f"{d.port} {i}", http))
                    i += 1

        loads = [asyncio.create_task(load(d)) for d in pair]
        await until(lambda: count(url, "SELECT count(*) FROM requests") >= 20, "rows written before the outage")
        own_server.stop()
        down_at, during = time.monotonic(), len(answered)

        async def degraded() -> bool:
            reports = [await _health(d.url) for d in pair]
            return all(status == 503 and "the database does not answer" in body["reasons"] for status, body in reports)

        await until(degraded, "both instances reporting the database down")
        async with aiohttp.ClientSession() as http:  # a named session's row cannot be read: said, not hung
            body = {"model": "echo", "messages": [{"role": "user", "content": "named"}]}
            async with http.post(f"{pair[0].url}/v1/chat/completions", json=body, headers={"X-Session-Id": "named-1"}) as r:
                refused = (r.status, (await r.json())["error"]["code"])
        assert refused == (503, "database_unavailable")
        await until(lambda: time.monotonic() - down_at >= OUTAGE_SECONDS, "the outage's length", OUTAGE_SECONDS + 30)
        served_while_down = len(answered) - during
        own_server.start()
        for d in pair:
            await until(lambda d=d: _healthy(d), f"{d.url} healthy again")  # type: ignore[misc]
        stop_load.set()
        await asyncio.gather(*loads)
        assert served_while_down > 0 and set(answered) == {200}
        health = [await _health(d.url) for d in pair]
        assert sum(body["log"]["dropped"] for _, body in health) == 0
        assert [await d.stop() for d in pair] == [0, 0]  # neither crashed; each flushed its queue
    assert count(url, "SELECT count(*) FROM requests") == len(answered) + 1  # and the refused one's row


async def _healthy(d: Daemon) -> bool:
    status, _ = await _health(d.url)
    return status == 200
