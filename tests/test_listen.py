"""The daemon's listening socket takes a burst of new connections: the kernel queues them
for it (the listen backlog) rather than dropping the handshakes past aiohttp's default of
128, which clients then retry a second later.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from tests.daemon import WAIT, Spawn

ECHO = "providers: [{name: echo, type: echo}]\nmodels: [{name: echo, provider: echo}]\n"
BURST = 600  # past aiohttp's default backlog, within the daemon's and the kernel's (somaxconn 4096 since Linux 5.4)


async def test_a_burst_of_connections_is_queued_while_the_daemon_is_busy(spawn: Spawn) -> None:
    """While the daemon accepts nothing (stopped: as busy as it gets), 600 connections opened
    at once all complete their handshake, each waiting in the kernel's queue; once the
    daemon runs again it answers on them."""
    daemon = await spawn(ECHO)
    loop = asyncio.get_running_loop()
    socks = [socket.socket() for _ in range(BURST)]
    for s in socks:
        s.setblocking(False)
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        # Past a full queue a handshake is dropped and retried after 1 s, 3 s, ...: never done
        # while the daemon is stopped, so this would time out.
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(loop.sock_connect(s, ("127.0.0.1", daemon.port)) for s in socks))
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    try:
        first, last = socks[0], socks[-1]
        for s in (first, last):
            await loop.sock_sendall(s, b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(WAIT):
            for s in (first, last):
                head = await loop.sock_recv(s, 64)
                assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        for s in socks:
            s.close()
