"""Graceful shutdown of a real daemon: SIGTERM during a stream lets it finish within the
grace period, ends it with a clear error event after, and every record is flushed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from typing import Any

import aiohttp
import yaml

from tests.conftest import UPSTREAM_KEY
from tests.fakes.openai import OpenAIFake
from tests.daemon import Daemon, Spawn

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "a long story"}], "stream": True}


async def _setup(spawn: Spawn, aiohttp_server: Any, grace: float) -> tuple[OpenAIFake, Daemon]:
    fake = OpenAIFake(key=UPSTREAM_KEY)
    server = await aiohttp_server(fake.app)
    cfg = {
        "server": {"shutdown_grace_seconds": grace},
        "providers": [{"name": "up", "type": "openai", "base_url": str(server.make_url("/v1")), "api_key": UPSTREAM_KEY}],
        "models": [{"name": "gpt-*", "provider": "up"}],
    }
    return fake, await spawn(yaml.safe_dump(cfg))


async def _first_chunk_then_sigterm(daemon: Daemon, fake: OpenAIFake, r: aiohttp.ClientResponse) -> bytes:
    first = await r.content.readuntil(b"\n\n")
    assert fake.chunks_sent == 1
    daemon.proc.send_signal(signal.SIGTERM)
    await daemon.wait_log("shutting_down")
    return first


async def test_sigterm_lets_an_inflight_stream_finish(spawn: Spawn, aiohttp_server: Any) -> None:
    """A stream in flight at SIGTERM completes normally within the grace period; its record is kept."""
    fake, daemon = await _setup(spawn, aiohttp_server, grace=30)
    fake.hold_after_first = asyncio.Event()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{daemon.url}/v1/chat/completions", json=BODY) as r:
            first = await _first_chunk_then_sigterm(daemon, fake, r)
            fake.hold_after_first.set()
            rest = await r.read()
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    async with asyncio.timeout(30):
        assert await daemon.proc.wait() == 0
    rows = sqlite3.connect(daemon.db).execute("SELECT outcome, response_text FROM request_log").fetchall()
    assert rows == [("ok", OpenAIFake.reply_for(BODY["messages"]))]


async def test_sigterm_after_grace_ends_the_stream_with_an_error_event(spawn: Spawn, aiohttp_server: Any) -> None:
    """Past the grace period a stream ends with a `proxy_shutdown` error event, no [DONE],
    and its record (with the text that had arrived) is still written."""
    fake, daemon = await _setup(spawn, aiohttp_server, grace=0.5)
    fake.hold_after_first = asyncio.Event()  # never released: the upstream stalls
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{daemon.url}/v1/chat/completions", json=BODY) as r:
                await _first_chunk_then_sigterm(daemon, fake, r)
                async with asyncio.timeout(30):
                    rest = await r.read()
        assert b"[DONE]" not in rest
        event = json.loads(rest.strip().removeprefix(b"data: "))
        assert event["error"]["code"] == "proxy_shutdown"
        async with asyncio.timeout(30):
            assert await daemon.proc.wait() == 0
    finally:
        fake.hold_after_first.set()
    [(outcome, status)] = sqlite3.connect(daemon.db).execute("SELECT outcome, status FROM requests").fetchall()
    assert (outcome, status) == ("shutdown", 200)
