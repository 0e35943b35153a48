"""The upstream HTTP/1.1 client: keep-alive connections pooled per origin, responses
parsed by httptools, bodies buffered with back-pressure. It does only what upstream
calls need: one request per connection at a time, no redirects, no cookies, no proxies.

Why not `aiohttp.ClientSession`: the proxy makes one upstream call per request, and that
session costs 3-5 times the CPU per call of this client (`bench/upstream_client.py`).
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
import zlib
from collections import deque
from functools import lru_cache
from typing import Mapping
from urllib.parse import quote, urlsplit

import httptools

HIGH_WATER = 256 * 1024  # buffered body bytes before the socket stops being read
MAX_BODY = 64 * 1024 * 1024  # an upstream body, decoded, may not be larger
# Resent after a reused connection broke with nothing back: only requests that may be
# repeated (RFC 9110 9.2.2). A POST starts a generation someone pays for; it gets a 502.
# (HEAD is not among them: its responses have no body, which this client does not expect.)
IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "OPTIONS"})
USER_AGENT = "provider-router"


class ProtocolError(Exception):
    """The upstream broke HTTP/1.1 (unparseable bytes, an unsupported encoding...)."""


class ConnectionClosed(ConnectionError):
    """The upstream closed the connection before the response was complete."""


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


class Response:
    """A response whose head has arrived; the body follows through `Upstream` (http.py)."""

    __slots__ = (
        "status", "headers", "content_length", "_conn", "_loop", "_chunks", "_size",
        "_done", "_exc", "_waiter", "_decoder", "_decoded", "_fed", "_paused",
    )

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length: int | None = None
        self._conn: _Conn | None = conn
        self._loop = conn.loop
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: zlib._Decompress | None = None
        self._decoded = 0
        self._fed = False
        self._paused = False

    # -- the consumer's side -------------------------------------------------------------
    def take(self) -> bytes:
        """Everything buffered so far (b"" if nothing is)."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.resume()
        return data

    @property
    def done(self) -> bool:
        """The whole body has arrived (it may still be buffered)."""
        return self._done

    @property
    def error(self) -> BaseException | None:
        """What broke the body, if something did."""
        return self._exc

    async def wait(self, timeout: float) -> None:
        """Until more body, its end or its failure arrives; `TimeoutError` after `timeout` s."""
        if self._chunks or self._done or self._exc is not None:
            return
        fut = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        """Done with it: a complete response already went back to the pool; anything else
        closes its connection (the upstream stops generating for a client that left)."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()

    # -- the connection's side -----------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        """Take a piece of body; `ProtocolError` if it cannot be decoded (or inflates too far)."""
        if self._decoder is not None:
            allowance = MAX_BODY - self._decoded
            try:
                data = self._decoder.decompress(data, allowance + 1)
            except zlib.error as e:
                raise ProtocolError(f"bad {self.headers.get('content-encoding')} body: {e}") from None
            self._decoded += len(data)
            self._fed = True
            if self._decoded > MAX_BODY or self._decoder.unconsumed_tail:
                raise ProtocolError(f"{self.headers.get('content-encoding')} body inflates past {MAX_BODY} bytes")
            if self._decoder.unused_data:  # a second gzip member, or garbage: not whole either way
                raise ProtocolError(f"bytes after the end of the {self.headers.get('content-encoding')} body")
            if not data:
                return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()
        self._wake()

    def _finish(self) -> ProtocolError | None:
        """The body ended: mark it done, or say why it is not whole."""
        if self._decoder is not None and self._fed:  # (an empty body needs no decoding)
            if not self._decoder.eof:
                return ProtocolError(f"{self.headers.get('content-encoding')} body cut short")
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
                self._size += len(tail)
        self._done = True
        conn, self._conn = self._conn, None  # it goes back to the pool: close() must not touch it
        if self._paused and conn is not None:
            self._paused = False
            conn.resume()  # the body is all here; the next exchange needs the socket read
        self._wake()
        return None

    def _fail(self, exc: BaseException) -> None:
        if not self._done and self._exc is None:
            self._exc = exc
            self._wake()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Conn(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: Response | None = None
        self.head: asyncio.Future[Response] | None = None
        self.got_bytes = False  # any byte of the current response arrived
        self.uses = 0
        self.idle_since = 0.0
        self.closed = False
        self.aborted = False  # closed by us: the connection's end says nothing about the body
        self._names: list[bytes] = []
        self._values: list[bytes] = []
        self._in_head = False

    # -- the exchange ----------------------------------------------------------------------
    def send(self, data: bytes, body: bytes | None) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.uses += 1
        self.got_bytes = False
        self.resp = Response(self)
        self.head = self.loop.create_future()
        if body is None:
            self.transport.write(data)
        elif len(body) < 65536:
            self.transport.write(data + body)
        else:
            self.transport.writelines((data, body))
        return self.head

    def usable(self) -> bool:
        """Still open, and nothing arrived while idle: a readable idle socket means the
        upstream closed it (or sent something unasked), which the loop may not have seen yet."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()  # not select(): no limit on descriptor numbers
        try:
            poller.register(sock.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def abort(self) -> None:
        if not self.closed:
            self.closed = self.aborted = True
            if self.transport is not None:
                self.transport.abort()

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.resp is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(ProtocolError("upstream switched protocols (101), which is not supported"))
        except httptools.HttpParserError as e:
            self._broken(ProtocolError(f"invalid HTTP from upstream: {e}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.resp
        if resp is not None:
            if exc is None and not self.aborted and resp.status and _ends_at_close(resp):
                self._complete(reusable=False)  # a body delimited by the connection's (clean) end
            else:
                self._broken(ConnectionClosed("upstream closed the connection") if exc is None else exc)
        self.pool.lost(self)

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._names, self._values, self._in_head = [], [], True
        if self.resp is None:  # bytes behind the answer asked for: not a connection to keep
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not the trailer fields of a chunked body
            self._names.append(name)
            self._values.append(value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        names, values = self._names, self._values
        self._names, self._values, self._in_head = [], [], False
        if 100 <= status < 200:
            return  # informational (100, 103): the real head follows
        resp = self.resp
        if resp is None:  # a second message behind the one asked for: not a connection to keep
            self.abort()
            return
        headers = resp.headers
        for n, v in zip(names, values):
            key = n.decode("latin-1").lower()
            val = v.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        resp.status = status
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            resp.content_length = int(length)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            resp._decoder = zlib.decompressobj(47 if encoding != "deflate" else 15)
        elif encoding != "identity":
            self._broken(ProtocolError(f"unsupported Content-Encoding {encoding!r}"))
            return
        if self.head is not None and not self.head.done():
            self.head.set_result(resp)

    def on_body(self, body: bytes) -> None:
        if self.resp is None:
            self.abort()
            return
        try:
            self.resp._feed(body)
        except ProtocolError as e:
            self._broken(e)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is not None and resp.status >= 200:
            self._complete(reusable=self.parser.should_keep_alive())

    # -- endings -----------------------------------------------------------------------------
    def _complete(self, reusable: bool) -> None:
        resp, self.resp = self.resp, None
        self.head = None
        assert resp is not None
        if self.closed:
            reusable = False
        error = resp._finish()
        if error is not None:
            self.resp = resp  # so that _broken fails it
            self._broken(error)
            return
        self.pool.release(self, reusable)

    def _broken(self, exc: BaseException) -> None:
        resp, head = self.resp, self.head
        self.resp = self.head = None
        if head is not None and not head.done():
            head.set_exception(exc)
        if resp is not None:
            resp._fail(exc)
        self.abort()
        self.pool.release(self, False)


def _ends_at_close(resp: Response) -> bool:
    h = resp.headers
    return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()


class _Pool:
    """The connections to one origin: idle ones for reuse, at most `limit` in use at once.

    Callers wait in line: a released connection, or the slot of a closed one, goes to the
    first waiter, never to whoever happens to run next."""

    def __init__(self, client: HttpClient, origin: tuple[str, str, int]) -> None:
        self.client = client
        self.loop = client.loop
        self.scheme, self.host, self.port = origin
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.connecting = 0
        # Each resolves to a connection handed over, or None: a slot is free, connect.
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()

    async def acquire(self, deadline: float, connect: float) -> _Conn:
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

    async def _wait(self, deadline: float) -> _Conn | None:
        fut: asyncio.Future[_Conn | None] = self.loop.create_future()
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

    async def _connect(self, deadline: float, connect: float) -> _Conn:
        """A new connection, in a slot already counted in `connecting`."""
        try:
            async with asyncio.timeout_at(min(deadline, self.loop.time() + connect)):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self),
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

    def release(self, conn: _Conn, reusable: bool) -> None:
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

    def _hand_on(self, conn: _Conn | None) -> bool:
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

    def lost(self, conn: _Conn) -> None:
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

    async def _exchange(self, conn: _Conn, head: bytes, body: bytes | None, deadline: float) -> Response:
        try:
            fut = conn.send(head, body)
        except RuntimeError:  # the transport closed under us (uvloop raises on write)
            conn.abort()
            raise ConnectionClosed("upstream closed the connection") from None
        timer = self.loop.call_at(deadline, _expire, fut)
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
