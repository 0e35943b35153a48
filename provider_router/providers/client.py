"""The upstream HTTP/1.1 client: keep-alive connections (`wire.py`) pooled per origin,
with a fair queue per origin. It does only what upstream calls need: one request per
connection at a time, no redirects, no cookies, no proxies.

Why not `aiohttp.ClientSession`: the proxy makes one upstream call per request, and that
session costs 3-5 times the CPU per call of this client (`bench/upstream_client.py`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from functools import lru_cache
from typing import Mapping
from urllib.parse import quote, urlsplit

from .wire import ConnectionClosed, Connection, ProtocolError, Response, expire

# Resent after a reused connection broke with nothing back: only requests that may be
# repeated (RFC 9110 9.2.2). A POST starts a generation someone pays for; it gets a 502.
# (HEAD is not among them: its responses have no body, which this client does not expect.)
IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "OPTIONS"})
USER_AGENT = "provider-router"


@lru_cache(maxsize=512)
def _split(url: str) -> tuple[tuple[str, str, int], bytes, bytes]:
    """`url` -> (origin, Host header value, request target), the last two as sent."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        shown = f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Path pieces can come from an upstream's own ids (a chat id): urlsplit has dropped any
    # line breaks; spaces and non-ASCII are percent-encoded, never sent raw.
    target = quote(target, safe="/?=&%:@+,;~!$'()*-._")
    try:
        host_header = shown.encode("idna")
    except UnicodeError:
        raise ProtocolError(f"invalid host name {host[:80]!r}") from None
    return (parts.scheme, host, port), host_header, target.encode("ascii")


@lru_cache(maxsize=64)
def _sets_host(block: bytes) -> bool:
    """The provider's headers name the Host (a virtual host behind the URL's address)."""
    return any(line[:5].lower() == b"host:" for line in block.split(b"\r\n"))


def header_block(headers: Mapping[str, str]) -> bytes:
    """`headers` as request-head lines, encoded once per provider (config.py has refused
    values with line breaks). Names are case-insensitive: of two spellings of one name,
    the later wins (a provider's own headers come after the configured ones). Ours are
    added unless already there."""
    merged: dict[str, tuple[str, str]] = {"user-agent": ("User-Agent", USER_AGENT), "accept-encoding": ("Accept-Encoding", "identity")}
    for k, v in headers.items():
        merged[k.lower()] = (k, v)
    return "".join(f"{k}: {v}\r\n" for k, v in merged.values()).encode()


class _Pool:
    """The connections to one origin: idle ones for reuse, at most `limit` in use at once.

    Callers wait in line: a released connection, or the slot of a closed one, goes to the
    first waiter, never to whoever happens to run next."""

    def __init__(self, client: HttpClient, origin: tuple[str, str, int]) -> None:
        self.client = client
        self.loop = client.loop
        self.scheme, self.host, self.port = origin
        self.idle: list[Connection] = []
        self.busy: set[Connection] = set()
        self.connecting = 0
        # Each resolves to a connection handed over, or None: a slot is free, connect.
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()

    async def acquire(self, deadline: float, connect: float) -> Connection:
        """An idle connection, or a new one once fewer than the limit are in use."""
        if self.client.closed:
            raise ConnectionClosed("the HTTP client is closed")
        if not self.waiters:
            now = time.monotonic()
            while self.idle:
                conn = self.idle.pop()
                if now - conn.idle_since < self.client.keepalive and conn.usable():
                    self.busy.add(conn)
                    return conn
                conn.abort()
        if self.waiters or len(self.busy) + self.connecting >= self.client.limit_per_host:
            handed = await self._wait(deadline)
            if handed is not None:
                return handed
            # Handed a free slot: `_hand_on` counted it as connecting on our behalf.
        else:
            self.connecting += 1
        return await self._connect(deadline, connect)

    async def _wait(self, deadline: float) -> Connection | None:
        fut: asyncio.Future[Connection | None] = self.loop.create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                handed = fut.result()  # given a turn, but leaving: pass it on
                if handed is not None:
                    self.release(handed, True)
                else:
                    self.connecting -= 1
                    self._hand_on(None)
            raise
        finally:
            if fut in self.waiters:
                self.waiters.remove(fut)

    async def _connect(self, deadline: float, connect: float) -> Connection:
        """A new connection, in a slot already counted in `connecting`."""
        try:
            async with asyncio.timeout_at(min(deadline, self.loop.time() + connect)):
                _, conn = await self.loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self.client.tls() if self.scheme == "https" else None,
                    server_hostname=self.host if self.scheme == "https" else None,
                )
        except BaseException:
            self.connecting -= 1
            self._hand_on(None)
            raise
        self.connecting -= 1
        if conn.closed or self.client.closed:  # closed before we could use it
            conn.abort()
            self._hand_on(None)
            raise ConnectionClosed("upstream closed the connection at once")
        self.busy.add(conn)
        return conn

    def release(self, conn: Connection, reusable: bool) -> None:
        if conn not in self.busy:
            return
        self.busy.discard(conn)
        if not (reusable and not conn.closed and not self.client.closed):
            conn.abort()
            self._hand_on(None)
        elif not self._hand_on(conn):
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
            self.client.sweep_later()

    def _hand_on(self, conn: Connection | None) -> bool:
        """Give the first waiter `conn`, or a free slot (counted as connecting for it);
        False if nobody waits."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                if conn is not None:
                    self.busy.add(conn)
                else:
                    self.connecting += 1
                fut.set_result(conn)
                return True
        return False

    def lost(self, conn: Connection) -> None:
        if conn in self.busy:
            self.release(conn, False)
        elif conn in self.idle:
            self.idle.remove(conn)

    def sweep(self, now: float) -> None:
        keep = self.client.keepalive
        stale = [c for c in self.idle if now - c.idle_since >= keep]
        if stale:
            self.idle = [c for c in self.idle if now - c.idle_since < keep]
            for c in stale:
                c.abort()

    def close(self) -> None:
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(ConnectionClosed("the HTTP client is closed"))
        self.waiters.clear()
        for conn in [*self.idle, *self.busy]:
            conn.abort()
        self.idle.clear()


class HttpClient:
    """Keep-alive HTTP/1.1 to the upstreams, one per app (`app._upstreams`).

    `limit_per_host` bounds the connections in use per origin (further requests wait);
    idle connections close after `keepalive` seconds.
    """

    def __init__(self, *, limit_per_host: int = 256, keepalive: float = 30.0, tls: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.limit_per_host = limit_per_host
        self.keepalive = keepalive
        self.closed = False
        self._tls = tls
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def tls(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # system CAs, hostname checks on
        return self._tls

    async def request(
        self, method: str, url: str, headers: bytes, body: bytes | None = None, *, connect: float, first_byte: float
    ) -> Response:
        """Send; return once the response head arrived, `TimeoutError` if it has not within
        `first_byte` s (connecting, at most `connect` s, included). `headers` come from
        `header_block`. An idempotent request whose reused connection broke with nothing
        back (the upstream had closed it) is resent once on a new connection; others fail."""
        origin, host, target = _split(url)
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(self, origin)
        length = b"" if body is None else b"Content-Length: %d\r\n" % len(body)
        host_line = b"" if _sets_host(headers) else b"Host: %s\r\n" % host
        head = b"%s %s HTTP/1.1\r\n%s%s%s\r\n" % (method.encode(), target, host_line, headers, length)
        deadline = self.loop.time() + first_byte
        conn = await pool.acquire(deadline, connect)
        reused = conn.uses > 0
        try:
            return await self._exchange(conn, head, body, deadline)
        except (ConnectionClosed, ConnectionResetError, BrokenPipeError):
            if not reused or conn.got_bytes or method not in IDEMPOTENT or self.closed:
                raise
        conn = await pool.acquire(deadline, connect)
        return await self._exchange(conn, head, body, deadline)

    async def _exchange(self, conn: Connection, head: bytes, body: bytes | None, deadline: float) -> Response:
        try:
            fut = conn.send(head, body)
        except RuntimeError:  # the transport closed under us (uvloop raises on write)
            conn.abort()
            raise ConnectionClosed("upstream closed the connection") from None
        timer = self.loop.call_at(deadline, expire, fut)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()  # cancelled as the head arrived: only this response is ours
            elif conn.head is fut:
                conn.abort()  # timed out, cancelled or broken mid-exchange: not reusable
            raise
        finally:
            timer.cancel()

    def sweep_later(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for pool in self._pools.values():
            pool.sweep(now)
        if any(pool.idle for pool in self._pools.values()):
            self.sweep_later()

    def usage(self) -> dict[str, int]:
        """Connections in use and idle, and calls waiting for one, over all origins."""
        pools = self._pools.values()
        return {
            "in_use": sum(len(p.busy) + p.connecting for p in pools),
            "idle": sum(len(p.idle) for p in pools),
            "waiting": sum(len(p.waiters) for p in pools),
        }

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            pool.close()  # waiters fail, connections close; nothing is resent or reopened
        await asyncio.sleep(0)  # let the transports run connection_lost
