"""Several instances on one SQLite file: `serve --shared` processes (what `serve --workers N`
runs) share sessions, threads and the one-turn-at-a-time rule of each upstream chat; and
`serve --workers N` itself: one port, restarts, a clean stop with every row logged.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest
import yaml
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import qwen_config
from tests.daemon import Daemon, Spawn, ro_query, wait_rows
from tests.fakes.qwen import QwenFake
from tests.test_threads_property import Msg, check_replies, op, run_trace
from tests.waiting import until

pytestmark = pytest.mark.xdist_group("workers")  # processes of their own: kept off the other worker's core


class Pair:
    """Two `serve --shared` instances on one database; each request goes to a random one,
    and a restart stops one of them and starts another in its place."""

    def __init__(self, fake: QwenFake, cfg_text: str, tmp: Path, rng: random.Random, db: Path | str | None = None) -> None:
        self.fake, self.cfg_text, self.tmp, self.rng = fake, cfg_text, tmp, rng
        self.db = db or tmp / "p.db"  # a SQLite file, or a PostgreSQL URL (test_pg_instances.py)
        self.daemons: list[Daemon] = []
        self.clients: list[openai.AsyncOpenAI] = []

    async def _one_started(self) -> tuple[Daemon, openai.AsyncOpenAI]:
        d = await Daemon.start(self.tmp, self.cfg_text, "--shared", db=self.db)
        return d, openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0)

    async def start(self) -> None:
        for d, c in await asyncio.gather(self._one_started(), self._one_started()):
            self.daemons.append(d)
            self.clients.append(c)

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        codes = await asyncio.gather(*(d.stop() for d in self.daemons if d.proc.returncode is None))
        assert not any(codes), codes
        self.daemons, self.clients = [], []

    async def restart(self) -> None:
        i = self.rng.randrange(2)
        await self.clients[i].close()
        assert await self.daemons[i].stop() == 0
        self.daemons[i], self.clients[i] = await self._one_started()

    async def ask_at_once(self, histories: list[list[Msg]], streams: list[bool]) -> list[str]:
        turns_before = len(self.fake.turns)
        picks = [self.rng.choice(self.clients) for _ in histories]
        replies = await asyncio.gather(*(_ask(c, h, s) for c, h, s in zip(picks, histories, streams)))
        check_replies(self.fake, turns_before, histories, replies)
        return replies


async def _ask(client: openai.AsyncOpenAI, history: list[Msg], stream: bool) -> str:
    if stream:
        s = await client.chat.completions.create(model="qwen3-max", messages=history, stream=True)  # type: ignore[arg-type]
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
    r = await client.chat.completions.create(model="qwen3-max", messages=history)  # type: ignore[arg-type]
    return r.choices[0].message.content or ""


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=12), st.lists(st.booleans(), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_random_traces_across_two_instances_keep_the_context_and_one_chat_per_opening(
    ops: list[tuple[Any, ...]], streams: list[bool], rng: random.Random
) -> None:
    """The random-trace property of test_threads_property, each turn sent to a random one
    of two instances on one database (and restarts stopping one of them): every turn's
    upstream context is the client's history, no turn overlapped another upstream, and
    the upstream made one chat per distinct opening (plus one per chat it forgot)."""
    asyncio.run(run_trace(ops, streams, lambda fake, cfg, tmp: Pair(fake, cfg, tmp, rng)))


# -- racing turns of one chat ------------------------------------------------------------
@pytest.fixture
async def qwen_upstream() -> AsyncIterator[QwenFake]:
    fake = QwenFake(token="qwen-token-test", linger=0.005)
    server = TestServer(fake.app)
    await server.start_server()
    fake.base_url = str(server.make_url("")).rstrip("/")  # type: ignore[attr-defined]
    yield fake
    await server.close()


async def _pair(spawn: Spawn, tmp_path: Path, fake: QwenFake, **sessions: Any) -> list[openai.AsyncOpenAI]:
    cfg = yaml.safe_dump(qwen_config(fake.base_url, **sessions))  # type: ignore[attr-defined]
    db = tmp_path / "shared.db"
    a, b = await asyncio.gather(spawn(cfg, "--shared", db=db), spawn(cfg, "--shared", db=db))
    return [openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0) for d in (a, b)]


async def test_two_instances_racing_turns_of_one_chat_never_overlap_upstream(
    spawn: Spawn, tmp_path: Path, qwen_upstream: QwenFake
) -> None:
    """Continuations of one conversation sent at once, half to each instance, reach the
    upstream one at a time (it refuses a turn in a chat still generating: none was), all
    in the conversation's one chat, each under the reply it continues."""
    clients = await _pair(spawn, tmp_path, qwen_upstream)
    opening = [{"role": "user", "content": "hi"}]
    reply = await _ask(clients[0], opening, stream=True)
    base = opening + [{"role": "assistant", "content": reply}]
    histories = [base + [{"role": "user", "content": f"question {i}"}] for i in range(8)]
    before = len(qwen_upstream.turns)
    replies = await asyncio.gather(*(_ask(clients[i % 2], h, stream=i % 3 == 0) for i, h in enumerate(histories)))
    check_replies(qwen_upstream, before, histories, replies)
    assert qwen_upstream.refused_busy == 0
    assert qwen_upstream.created_chats == 1


async def test_a_turn_waits_for_another_instances_turn_and_gives_up_at_lock_wait(
    spawn: Spawn, tmp_path: Path, qwen_upstream: QwenFake
) -> None:
    """While one instance's turn is upstream, another instance's turn on the same chat
    waits for it, never reaching the upstream, and answers 429 `conversation_busy` after
    `lock_wait_seconds`; once the first turn ends, the chat takes turns again."""
    clients = await _pair(spawn, tmp_path, qwen_upstream, lock_wait_seconds=1)
    opening = [{"role": "user", "content": "hi"}]
    base = opening + [{"role": "assistant", "content": await _ask(clients[0], opening, stream=False)}]
    release = qwen_upstream.stall_next()
    first = asyncio.create_task(_ask(clients[0], base + [{"role": "user", "content": "slow"}], stream=True))
    await until(lambda: len(qwen_upstream.turns) == 2, "the first turn upstream")
    with pytest.raises(openai.RateLimitError) as refused:
        await _ask(clients[1], base + [{"role": "user", "content": "fast"}], stream=False)
    assert refused.value.code == "conversation_busy"
    assert qwen_upstream.refused_busy == 0 and len(qwen_upstream.turns) == 2
    release.set()
    await first
    await _ask(clients[1], base + [{"role": "user", "content": "fast"}], stream=False)
    assert qwen_upstream.created_chats == 1 and qwen_upstream.refused_busy == 0


# -- serve --workers N ---------------------------------------------------------------------
ECHO = yaml.safe_dump({"providers": [{"name": "echo", "type": "echo"}], "models": [{"name": "echo", "provider": "echo"}]})


async def _worker_pid(url: str) -> int:
    async with aiohttp.ClientSession() as http:  # a connection of its own: the kernel picks a worker for it
        async with http.get(f"{url}/health") as r:
            body = await r.json()
    assert r.status == 200 and body["worker"]["of"] == 2, body
    return int(body["worker"]["pid"])


async def _chat(url: str, i: int) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "echo", "messages": [{"role": "user", "content": f"hi {i}"}]}
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()


async def _both_answer(url: str) -> set[int]:
    seen: set[int] = set()

    async def both() -> bool:
        seen.add(await _worker_pid(url))
        return len(seen) == 2

    await until(both, "both workers answering on the one port")
    return seen


async def test_workers_share_one_port_and_stop_cleanly_with_every_row_logged(spawn: Spawn) -> None:
    """`serve --workers 2`: both workers answer on the port; requests sent at once through
    both are all answered; SIGTERM stops the parent and the workers with status 0, and
    every request has its row in the one database."""
    d = await spawn(ECHO, "--workers", "2")
    await d.wait_log("workers_listening")
    await _both_answer(d.url)
    await asyncio.gather(*(_chat(d.url, i) for i in range(60)))
    assert await d.stop() == 0
    assert ro_query(d.db, "SELECT count(*) FROM requests")[0][0] == 60
    assert ro_query(d.db, "SELECT count(*) FROM requests WHERE status = 200")[0][0] == 60


async def test_a_worker_that_dies_is_restarted(spawn: Spawn) -> None:
    """A worker killed outright is started again on the same port: the port keeps
    answering from two workers, one of them new, and the request rows keep coming."""
    d = await spawn(ECHO, "--workers", "2")
    await d.wait_log("workers_listening")
    before = await _both_answer(d.url)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await d.wait_log("worker_restarted")
    after = await _both_answer(d.url)
    assert victim not in after and len(after & before) == 1
    await asyncio.gather(*(_chat(d.url, i) for i in range(10)))
    await wait_rows(d.db, 10)
    assert await d.stop() == 0


async def test_workers_that_cannot_start_exit_1_with_one_line(spawn: Spawn, tmp_path: Path) -> None:
    """A port another program holds: the first worker cannot listen, and the parent exits
    1 with that worker's one `startup_failed` line, starting no other."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "echo.yaml"
        cfg.write_text(ECHO)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", str(port), "--workers", "2",
            "--db", str(tmp_path / "x.db"), stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = [x for x in err.decode().splitlines() if "startup_failed" in x or "workers_failed" in x]
    assert proc.returncode == 1
    assert len(lines) == 1 and "the port is in use" in lines[0], err.decode()[-2000:]


async def test_expiry_runs_on_one_instance_and_another_takes_over_when_it_dies(spawn: Spawn, tmp_path: Path) -> None:
    """Of two instances on one database one leads (expiry, the chat sweep, retention);
    killed outright, the other takes the lead and ends the sessions that run out."""
    cfg = yaml.safe_dump(
        {
            "providers": [{"name": "echo", "type": "echo"}], "models": [{"name": "echo", "provider": "echo"}],
            "sessions": {"timeout_minutes": 0.02, "cleanup_interval_minutes": 1 / 60},
        }
    )  # fmt: skip
    db = tmp_path / "shared.db"
    pair = await asyncio.gather(spawn(cfg, "--shared", db=db), spawn(cfg, "--shared", db=db))

    def leaders() -> list[Daemon]:
        return [d for d in pair if any(x.get("event") == "leading" for x in d.lines())]

    (leader,) = await until(leaders, "one instance leading")
    other = pair[1] if leader is pair[0] else pair[0]
    leader.proc.kill()
    await leader.proc.wait()
    await other.wait_log("leading")
    async with aiohttp.ClientSession() as http:
        for text in ("one", "two"):  # a conversation's second request stores its session
            body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}
            body["messages"].append({"role": "user", "content": "more"})
            async with http.post(f"{other.url}/v1/chat/completions", json=body, headers={"X-Session-Id": "kept-short"}) as r:
                assert r.status == 200
    line = await other.wait_log("session_expired")
    assert line["session_id"] == "kept-short"


async def test_a_daemon_alone_and_shared_instances_refuse_one_database(spawn: Spawn, tmp_path: Path) -> None:
    """A daemon alone keeps sessions in memory, so it cannot serve a file that shared
    instances serve (nor they one it serves): the one started second exits 1 with
    `database_in_use`, saying which kind holds it."""
    db = tmp_path / "one.db"
    await spawn(ECHO, "--shared", db=db)
    cfg = tmp_path / "alone.yaml"
    cfg.write_text(ECHO)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", "0", "--db", str(db),
        stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "database_in_use" in err.decode() and "--shared" in err.decode()


async def test_the_leader_evicts_the_least_recently_used_beyond_max_sessions(spawn: Spawn, tmp_path: Path) -> None:
    """Sessions started on either of two instances count against one `max_sessions`: past
    it, the leader ends the least recently used one as evicted, once."""
    cfg = yaml.safe_dump(
        {
            "providers": [{"name": "echo", "type": "echo"}], "models": [{"name": "echo", "provider": "echo"}],
            "sessions": {"max_sessions": 2, "cleanup_interval_minutes": 1 / 60},
        }
    )  # fmt: skip
    db = tmp_path / "shared.db"
    pair = await asyncio.gather(spawn(cfg, "--shared", db=db), spawn(cfg, "--shared", db=db))
    async with aiohttp.ClientSession() as http:
        for i, name in enumerate(("first", "second", "third")):
            body = {"model": "echo", "messages": [{"role": "user", "content": name}]}
            async with http.post(f"{pair[i % 2].url}/v1/chat/completions", json=body, headers={"X-Session-Id": name}) as r:
                assert r.status == 200

    def evicted() -> list[dict[str, Any]]:
        return [x for d in pair for x in d.lines() if x.get("event") == "session_evicted"]

    (line,) = await until(evicted, "a session evicted")
    assert line["session_id"] == "first"
    await until(lambda: ro_query(db, "SELECT state FROM sessions WHERE id = 'first'") == [("expired",)], "its row ended")
    assert ro_query(db, "SELECT count(*) FROM sessions WHERE state = 'active'") == [(2,)]
    assert ro_query(db, "SELECT n FROM session_tallies WHERE event = 'evicted'") == [(1,)]
