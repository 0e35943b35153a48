"""Signals to a real daemon: a second signal ends the grace at once, SIGHUP stops it like
SIGTERM, and a stderr nobody reads any more never keeps it from exiting.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.daemon import WAIT, Spawn, free_port, wait_rows
from tests.test_shutdown import BODY, _first_chunk_then_sigterm, _setup
from tests.waiting import until

ECHO = "providers: [{name: echo, type: echo}]\nmodels: [{name: echo, provider: echo}]\n"
HI = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_second_signal_ends_the_grace_at_once(spawn: Spawn, aiohttp_server: Any) -> None:
    """With a long grace and a stalled stream, a second SIGTERM ends the stream with its
    `proxy_shutdown` event, writes its row and lets the process exit cleanly."""
    fake, daemon = await _setup(spawn, aiohttp_server, grace=600)
    fake.hold_after_first = asyncio.Event()  # never released: only the second signal ends it
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{daemon.url}/v1/chat/completions", json=BODY) as r:
                await _first_chunk_then_sigterm(daemon, fake, r)
                daemon.proc.send_signal(signal.SIGINT)
                async with asyncio.timeout(WAIT):
                    rest = await r.read()
        event = json.loads(rest.strip().removeprefix(b"data: "))
        assert event["error"]["code"] == "proxy_shutdown" and b"[DONE]" not in rest
        async with asyncio.timeout(WAIT):
            assert await daemon.proc.wait() == 0
    finally:
        fake.hold_after_first.set()
    rows = sqlite3.connect(daemon.db).execute("SELECT outcome FROM requests").fetchall()
    assert rows == [("shutdown",)]
    assert "Traceback" not in daemon.log.read_text()


async def test_two_quick_signals_on_an_idle_daemon_exit_cleanly(spawn: Spawn) -> None:
    """Two signals a moment apart (a double Ctrl-C) end an idle daemon with status 0, its
    mark removed and no traceback."""
    daemon = await spawn(ECHO)
    daemon.proc.send_signal(signal.SIGINT)
    daemon.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(WAIT):
        assert await daemon.proc.wait() == 0
    assert not Path(f"{os.path.realpath(daemon.db)}.daemon").exists()
    assert "Traceback" not in daemon.log.read_text()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def ignores_sighup(pid: int) -> bool:
    """From /proc: whether `pid` has set SIGHUP (bit 0 of SigIgn) to be ignored."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & 1 << (signal.SIGHUP - 1))
    return False


async def test_sighup_stops_gracefully_like_sigterm(spawn: Spawn, aiohttp_server: Any) -> None:
    """SIGHUP to the daemon and its log writer (a closed terminal hangs up the whole
    process group) lets an in-flight stream finish, keeps its row and exits 0, instead of
    killing either process."""
    fake, daemon = await _setup(spawn, aiohttp_server, grace=30)
    fake.hold_after_first = asyncio.Event()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{daemon.url}/v1/chat/completions", json=BODY) as r:
            await r.content.readuntil(b"\n\n")
            [writer] = children(daemon.proc.pid)
            await until(lambda: ignores_sighup(writer), "the writer's start-up (it then ignores hang-ups)", WAIT)
            os.kill(writer, signal.SIGHUP)
            daemon.proc.send_signal(signal.SIGHUP)
            await daemon.wait_log("shutting_down")
            fake.hold_after_first.set()
            rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    async with asyncio.timeout(WAIT):
        assert await daemon.proc.wait() == 0
    assert sqlite3.connect(daemon.db).execute("SELECT outcome FROM requests").fetchall() == [("ok",)]
    assert (await daemon.wait_log("signal_received"))["signal"] == "SIGHUP"
    assert "log_writer_exited" not in daemon.log.read_text()


async def test_a_broken_stderr_never_blocks_shutdown(tmp_path: Path) -> None:
    """`serve 2>&1 | head -2`: once nobody reads stderr, requests are still answered and
    logged to the database, and SIGTERM still ends the process cleanly."""
    cfg, db, port = tmp_path / "c.yaml", tmp_path / "d.db", free_port()
    cfg.write_text(ECHO)
    r, w = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--db", str(db), "--port", str(port),
        stdout=w, stderr=w, cwd=tmp_path,
    )  # fmt: skip
    os.close(w)
    try:
        with os.fdopen(r, "rb") as head:  # like `head -2`: read until ready, then go away
            async with asyncio.timeout(WAIT):
                while b"listening" not in await asyncio.to_thread(head.readline):
                    pass
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # each request's line now meets the broken pipe
                async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=HI) as resp:
                    assert resp.status == 200
        await wait_rows(db, 3)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert sqlite3.connect(db).execute("SELECT count(*) FROM requests").fetchone()[0] >= 3



async def test_a_stop_that_hangs_is_ended_by_the_watchdog(spawn: Spawn) -> None:
    """Stopping blocked (the log writer waits on a database another process holds locked,
    and the daemon waits for it): after a second signal the watchdog ends the process
    within seconds with status 70 and a `shutdown_forced` line, instead of hanging."""
    daemon = await spawn(ECHO)
    holder = sqlite3.connect(daemon.db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{daemon.url}/v1/chat/completions", json=HI) as resp:
                assert resp.status == 200
        daemon.proc.send_signal(signal.SIGTERM)
        await daemon.wait_log("shutting_down")
        daemon.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await daemon.proc.wait() == 70
    finally:
        holder.close()
    assert (await daemon.wait_log("shutdown_forced"))["level"] == "error"
