"""One upstream HTTP/1.1 connection and its response: an asyncio protocol that parses what
arrives with httptools (llhttp) and buffers the body with back-pressure, decoding gzip or
deflate. `client.py` pools these connections and sends the requests.
"""

from __future__ import annotations

import asyncio
import select
import zlib
from collections import deque
from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from .client import _Pool

HIGH_WATER = 256 * 1024  # buffered body bytes before the socket stops being read
MAX_BODY = 64 * 1024 * 1024  # an upstream body, decoded, may not be larger


class ProtocolError(Exception):
    """The upstream broke HTTP/1.1 (unparseable bytes, an unsupported encoding...)."""


class ConnectionClosed(ConnectionError):
    """The upstream closed the connection before the response was complete."""


class Response:
    """A response whose head has arrived; the body follows through `Upstream` (http.py)."""

    __slots__ = (
        "status", "headers", "content_length", "_conn", "_loop", "_chunks", "_size",
        "_done", "_exc", "_waiter", "_decoder", "_decoded", "_fed", "_paused",
    )

    def __init__(self, conn: Connection) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.content_length: int | None = None
        self._conn: Connection | None = conn
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
        timer = self._loop.call_later(timeout, expire, fut)
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


def expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Connection(asyncio.Protocol):
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
