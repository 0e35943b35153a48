"""The upstream caps in the real daemon: an upstream that sends an endless event-stream line
or an endless response head costs the daemon (and its log writer) bounded memory; the
client gets an SSE error event or a 502, the row says it failed, the upstream is dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.daemon import Spawn, ro_query, wait_rows

MB = 1024 * 1024
PIECE = b"x" * 65536


@dataclass
class Endless:
    """A raw upstream that answers every request with a head or a line that never ends,
    until the proxy hangs up; `sent` counts the bytes it got out."""

    head: bool
    sent: int = 0
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.head:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Endless: ")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: ")
            while True:
                writer.write(PIECE)
                await writer.drain()
                self.sent += len(PIECE)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            writer.close()


@pytest.fixture
async def endless() -> AsyncIterator[Callable[[bool], Awaitable[Endless]]]:
    servers: list[asyncio.Server] = []

    async def start(head: bool) -> Endless:
        e = Endless(head)
        server = await asyncio.start_server(e.serve, "127.0.0.1", 0)
        servers.append(server)
        e.port = server.sockets[0].getsockname()[1]
        return e

    yield start
    for s in servers:
        s.close()


def rss(pid: int) -> int:
    """Resident bytes of `pid` and its child processes (the log writer)."""
    total = 0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in (pid, *map(int, children)):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


async def test_endless_line_and_head_keep_the_daemon_bounded(spawn: Spawn, endless: Callable[[bool], Awaitable[Endless]]) -> None:
    """With the default caps (a 4 MiB line, 8190-byte header lines): the endless line ends in
    an SSE error event and no [DONE]; the endless head in a 502; the daemon's memory
    (log writer included) grows by under 50 MB; both upstream connections are closed."""
    line, head = await endless(False), await endless(True)
    config = f"""
providers:
  - {{name: echo, type: echo}}
  - {{name: line, type: openai, base_url: "http://127.0.0.1:{line.port}/v1"}}
  - {{name: head, type: openai, base_url: "http://127.0.0.1:{head.port}/v1"}}
models:
  - {{name: echo, provider: echo}}
  - {{name: "line-*", provider: line}}
  - {{name: "head-*", provider: head}}
"""
    d = await spawn(config)
    url = f"{d.url}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"model": "echo", "messages": msgs}) as r:  # warm the daemon up
            assert r.status == 200
        await wait_rows(d.db, 1)
        before = rss(d.proc.pid)
        async with s.post(url, json={"model": "line-1", "messages": msgs, "stream": True}) as r:
            text = await r.text()
        assert "upstream_line_too_long" in text and "[DONE]" not in text
        async with s.post(url, json={"model": "head-1", "messages": msgs}) as r:
            assert r.status == 502
            assert (await r.json())["error"]["code"] == "upstream_bad_response"
        await wait_rows(d.db, 3)
        after = rss(d.proc.pid)
    async with asyncio.timeout(10):
        await line.hung_up.wait()
        await head.hung_up.wait()
    assert after - before < 50 * MB, (before, after)
    rows = ro_query(d.db, "SELECT model, status, outcome, stream FROM requests ORDER BY rowid")
    assert rows[1:] == [("line-1", 200, "upstream_error", 1), ("head-1", 502, "upstream_error", 0)]
