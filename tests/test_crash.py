"""The log database under stress: a crash, and a writer that falls behind.

Crash: the real daemon killed with SIGKILL in the middle of a burst of requests. SQLite in
WAL mode with one writer committing whole batches must leave a database that passes
`PRAGMA integrity_check`, whose every row parses, and on which a restarted daemon continues
a conversation started before the kill in the same session and upstream chat.

Behind: when the writer cannot commit (another process holds the database locked), no
record is lost: new requests wait for room in the log's queue, and everything lands once
the lock is gone. With `logs.when_full: drop`, requests are answered at once instead and
records beyond `logs.queue_size` are dropped, counted and warned about.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import openai
import structlog
import yaml

from tests.conftest import ProxyFactory, base_config
from tests.fakes.qwen import QwenFake
from tests.daemon import Spawn, ro_query, wait_rows
from tests.waiting import until
from tests.test_security import serve_fake
from tests.test_threads import Conversation, last_turn_ok

OUTCOMES = {"ok", "rejected", "upstream_error", "timeout", "client_disconnected", "shutdown", "error"}


async def burst(url: str, total: int, concurrency: int, answered: list[int]) -> None:
    """`total` requests (echo plain and streamed, new qwen conversations), `concurrency` at
    a time; errors are expected once the daemon is gone."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, s: aiohttp.ClientSession) -> None:
        async with sem:
            model = "qwen3-max" if i % 5 == 0 else "echo"
            body = {"model": model, "messages": [{"role": "user", "content": f"burst {i} 'quoted' ✓"}], "stream": i % 2 == 0}
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
            answered[0] += 1

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(i, s) for i in range(total)), return_exceptions=True)


def check_rows(db: Path) -> int:
    """Every row of every table parses; returns the number of request rows."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall()[0][0] == "ok"
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")  # raises if the index is off
        conn.rollback()
        rows = conn.execute("SELECT * FROM requests").fetchall()
        for r in rows:
            assert re.fullmatch(r"[0-9a-f]{28}", r["id"])
            datetime.fromisoformat(r["received_at"].replace("Z", "+00:00"))
            datetime.fromisoformat(r["finished_at"].replace("Z", "+00:00"))
            assert r["outcome"] in OUTCOMES and isinstance(r["status"], int)
            assert isinstance(json.loads(r["params"]), dict)
            assert conn.execute("SELECT 1 FROM messages WHERE id = ?", (r["tip_message"],)).fetchone()
            if r["response"] is not None:
                assert isinstance(json.loads(r["response"]), dict)
            if r["attempts"] is not None:
                assert isinstance(json.loads(r["attempts"]), list)
        for m in conn.execute("SELECT * FROM messages"):
            assert isinstance(json.loads(m["body"]), dict)
            assert m["parent_id"] is None or conn.execute("SELECT 1 FROM messages WHERE id = ?", (m["parent_id"],)).fetchone()
        for s in conn.execute("SELECT * FROM sessions"):
            assert s["state"] in ("active", "expired")
            json.loads(s["metadata"] or "{}")
        orphans = conn.execute("SELECT count(*) FROM turns WHERE session_id NOT IN (SELECT id FROM sessions)").fetchone()[0]
        assert orphans == 0
        return len(rows)
    finally:
        conn.close()


async def test_kill_9_mid_burst_keeps_the_database_sound_and_threads_continue(aiohttp_server: Any, spawn: Spawn) -> None:
    """SIGKILL while a burst of concurrent requests is being logged: integrity_check is ok,
    every row parses, and a daemon restarted on the same file continues a conversation
    started before the kill in the same session and upstream chat, from its last reply."""
    qw = QwenFake(token="qwen-token-test")
    qw_url = await serve_fake(aiohttp_server, qw.app)
    config = yaml.safe_dump(
        {
            "providers": [{"name": "echo", "type": "echo"}, {"name": "qwen", "type": "qwen", "base_url": qw_url, "token": "qwen-token-test"}],
            "models": [{"name": "echo", "provider": "echo"}, {"name": "qwen*", "provider": "qwen"}],
        }
    )
    d = await spawn(config)
    conv = Conversation(openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0))
    await conv.say("one")
    await conv.say("two")
    session = conv.session_id
    tip = qw.turns[-1]
    assert tip.completed and session
    # The conversation's state is committed before the crash (the writer batches asynchronously).
    await until(lambda: ro_query(d.db, "SELECT count(*) FROM turns WHERE session_id = ?", session)[0][0] >= 2, "both turns committed")
    before = await wait_rows(d.db, 2)

    answered = [0]
    total = 5000
    task = asyncio.create_task(burst(d.url, total, 32, answered))
    await wait_rows(d.db, before + 100)
    assert not task.done()  # the kill lands mid-burst
    d.proc.send_signal(signal.SIGKILL)
    assert await d.proc.wait() == -signal.SIGKILL
    await task
    assert answered[0] < total

    logged = check_rows(d.db)
    assert before + 100 <= logged < 2 + total

    chats = qw.created_chats
    d2 = await spawn(config, db=d.db)
    conv.sdk = openai.AsyncOpenAI(base_url=f"{d2.url}/v1", api_key="x", max_retries=0)
    await conv.say("three")
    assert conv.session_id == session
    assert qw.created_chats == chats
    assert (qw.turns[-1].chat_id, qw.turns[-1].parent_id) == (tip.chat_id, tip.response_id)
    last_turn_ok(qw, conv.history[:-1])
    assert await d2.stop() == 0
    assert check_rows(d.db) == logged + 1


async def test_a_lock_held_past_busy_timeout_delays_rows_and_loses_none(make_proxy: ProxyFactory) -> None:
    """Another connection holds the write lock longer than the writer's busy_timeout (5 s):
    the writer retries rather than dropping, new requests wait for room in the full queue
    (back-pressure) rather than losing their records, and once the lock is gone every
    request has its row and its session; nothing is counted as dropped or failed."""
    cfg = {**base_config(), "logs": {"queue_size": 3}}
    p = await make_proxy(cfg)
    await p.drained()
    writer = p.state.writer
    assert writer is not None
    n = 12
    sdk = p.sdk()
    lock = sqlite3.connect(p.db_path, timeout=5, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        history = [{"role": "user", "content": "first"}]
        first = await sdk.chat.completions.create(model="echo", messages=history)
        history += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "and"}]
        calls = [
            asyncio.create_task(sdk.chat.completions.create(model="echo", messages=[*history[:-1], {"role": "user", "content": f"m{i}"}]))
            for i in range(n - 1)
        ]
        done, _ = await asyncio.wait(calls, timeout=6.0)  # the lock is held past busy_timeout meanwhile
        assert len(done) < len(calls)  # some wait for room: the queue is full, nothing is dropped
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    answers = await asyncio.gather(*calls)
    assert len(answers) == n - 1
    rows = await p.rows()
    assert len(rows) == n and writer.dropped == 0 and writer.failed == 0
    [session] = await p.rows("SELECT * FROM sessions")
    assert {r["session_id"] for r in rows} == {session["id"]} and session["request_count"] == n


async def test_writer_behind_drops_and_counts_when_so_configured(make_proxy: ProxyFactory) -> None:
    """With `logs.when_full: drop` and the database locked by another connection's
    transaction, requests are still answered at once, records past `logs.queue_size` are
    dropped with a counter (in /metrics too) and a `log_queue_full` warning, their log lines
    still written, and the queued ones land afterwards."""
    cfg = {**base_config(), "logs": {"queue_size": 3, "when_full": "drop"}, "auth": {"metrics_public": True}}
    p = await make_proxy(cfg)
    await p.drained()
    writer = p.state.writer
    assert writer is not None
    n = 20
    lock = sqlite3.connect(p.db_path, timeout=5, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # what a long inspection or a backup tool might hold
    try:
        with structlog.testing.capture_logs() as logs:
            for i in range(n):
                answer = await p.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": f"m{i}"}])
                assert answer.choices[0].message.content.endswith(f": m{i}")
            dropped = writer.dropped
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert dropped >= n - 3 - 2  # at most one batch in the writer's hands plus a full queue
    # A dropped record's line is still written, by the daemon itself (the others' come
    # from the writer process, which this capture does not see).
    assert sum(1 for e in logs if e["event"] == "request") == dropped
    warnings = [e for e in logs if e["event"] == "log_queue_full"]
    assert warnings and warnings[0]["log_level"] == "warning" and warnings[0]["queue"] == 3
    rows = await p.rows()
    assert len(rows) == n - dropped and writer.dropped == dropped
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/metrics") as r:
            text = await r.text()
    assert f"provider_router_log_records_dropped_total {float(dropped)}" in text
