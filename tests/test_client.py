"""The upstream HTTP/1.1 client (providers/client.py, wire.py) against real loopback servers:
keep-alive reuse, the stale-connection retry, body framings, encodings, limits, TLS."""

from __future__ import annotations

import asyncio
import gzip
import os
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme
from aiohttp import web

from provider_router.config import TimeoutsConfig
from provider_router.errors import ApiError
from provider_router.providers.client import HttpClient, header_block
from provider_router.providers.http import Upstream

HEADERS = header_block({"Content-Type": "application/json"})
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawServer:
    """A raw HTTP server on loopback whose answers the test scripts byte for byte."""

    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/x"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Callable[[RawServer, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(serve: Callable[[RawServer, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> RawServer:
        state = RawServer()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await serve(state, state.connections, reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


def in_turn(replies: list[bytes]) -> Callable[[RawServer, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server script: the k-th request (over all connections) gets `replies[k]`."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            s.requests.append(await read_request(reader))
            writer.write(replies[len(s.requests) - 1])
            await writer.drain()

    return serve


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient(limit_per_host=8, keepalive=30.0)
    yield c
    await c.close()


def upstream(c: HttpClient, **timeouts: float) -> Upstream:
    return Upstream(c, TimeoutsConfig(**timeouts))


async def get_body(up: Upstream, url: str, body: bytes | None = b"{}") -> tuple[int, bytes]:
    resp = await up.request("POST", url, HEADERS, body)
    return resp.status, await up.read(resp)


async def test_sequential_requests_reuse_one_connection(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """Keep-alive: ten calls one after another travel on one connection, each answered right."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(reader)
            s.requests.append(req)
            writer.write(answer(b'{"n": %d}' % len(s.requests)))

    server = await raw_server(serve)
    up = upstream(client)
    got = [await get_body(up, server.url, b'{"i": %d}' % i) for i in range(10)]
    assert got == [(200, b'{"n": %d}' % (i + 1)) for i in range(10)]
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % server.port)
    assert b"Content-Length: 8\r\n" in first and first.endswith(b'\r\n\r\n{"i": 0}')


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """An upstream that hangs up an idle keep-alive connection: the next call opens a new one."""
    closed = asyncio.Event()

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(answer(b'{"conn": %d}' % n))
            await writer.drain()
            if n == 1:
                writer.close()
                await writer.wait_closed()
                closed.set()
                return

    server = await raw_server(serve)
    up = upstream(client)
    assert await get_body(up, server.url) == (200, b'{"conn": 1}')
    await closed.wait()
    assert await get_body(up, server.url) == (200, b'{"conn": 2}')
    assert server.connections == 2


async def hang_up_on_second_request(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one request; then read the next one and hang up without a word."""
    s.requests.append(await read_request(reader))
    writer.write(answer(b'{"conn": %d}' % n))
    await writer.drain()
    while True:
        s.requests.append(await read_request(reader))
        if n == 1:
            return
        writer.write(answer(b'{"conn": %d}' % n))


async def test_a_post_is_never_resent_but_an_idempotent_call_is(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """A reused connection that breaks with nothing back: the upstream may have started on
    the request. A POST (a generation someone pays for) fails with a retryable 502 and is
    sent once; a DELETE is resent on a new connection."""
    server = await raw_server(hang_up_on_second_request)
    up = upstream(client)
    assert await get_body(up, server.url) == (200, b'{"conn": 1}')
    with pytest.raises(ApiError) as e:
        await get_body(up, server.url, b'{"once": true}')
    assert (e.value.status, e.value.code, e.value.retryable) == (502, "upstream_unreachable", True)
    assert sum(r.endswith(b'{"once": true}') for r in server.requests) == 1

    server = await raw_server(hang_up_on_second_request)
    assert await get_body(up, server.url) == (200, b'{"conn": 1}')
    resp = await up.request("DELETE", server.url, HEADERS)
    assert (resp.status, await up.read(resp)) == (200, b'{"conn": 2}')
    assert [r.split(b" ", 1)[0] for r in server.requests] == [b"POST", b"DELETE", b"DELETE"]
    assert server.connections == 2


async def test_a_fresh_connection_that_breaks_is_not_retried(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """A POST is resent only when it went out on a reused connection; otherwise a 502."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server = await raw_server(serve)
    with pytest.raises(ApiError) as e:
        await get_body(upstream(client), server.url)
    assert (e.value.status, e.value.code) == (502, "upstream_unreachable")
    assert server.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", id="chunked"),
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\nhello world", id="until-close"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(gzip.compress(b"hello world")), gzip.compress(b"hello world")),
            id="gzip-though-not-asked",
        ),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", id="after-103"),
    ],
)
async def test_body_framings_and_encodings(raw_server, client, reply: bytes) -> None:  # type: ignore[no-untyped-def]
    """Chunked, read-until-close, gzip sent anyway and a 1xx before the head all give the plain body."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s.requests.append(await read_request(reader))
        writer.write(reply)
        await writer.drain()

    server = await raw_server(serve)
    assert await get_body(upstream(client), server.url) == (200, b"hello world")
    assert b"Accept-Encoding: identity\r\n" in server.requests[0]


async def test_unsupported_encoding_and_garbage_are_502(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """An encoding we cannot decode, or bytes that are not HTTP, never reach the client as if fine."""
    replies = [b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc", b"SMTP ready\r\n\r\n"]

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(replies[n - 1])
        await writer.drain()
        await reader.read()

    server = await raw_server(serve)
    for expected in ("unsupported Content-Encoding 'br'", "invalid HTTP from upstream"):
        with pytest.raises(ApiError) as e:
            await get_body(upstream(client), server.url)
        assert e.value.status == 502 and expected in e.value.message


async def test_stream_pieces_arrive_as_sent_and_a_cut_stream_is_an_error(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """`chunks` yields each piece once it is there; a chunked body cut short is `upstream_stream_error`."""
    go = asyncio.Event()

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
        await writer.drain()
        await go.wait()
        writer.write(b"7\r\nsecond\n\r\n")
        await writer.drain()
        # ... and the connection ends without the terminating 0-chunk

    server = await raw_server(serve)
    up = upstream(client)
    resp = await up.request("POST", server.url, HEADERS, b"{}")
    assert resp.headers["content-type"] == "text/event-stream"
    pieces = up.chunks(resp)
    assert await pieces.__anext__() == b"first\n"
    go.set()  # the second piece is sent only once the first has been received
    assert await pieces.__anext__() == b"second\n"
    with pytest.raises(ApiError) as e:
        await pieces.__anext__()
    assert e.value.code == "upstream_stream_error"


async def test_big_bodies_pass_whole_and_the_limit_holds(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """3 MiB (well over the read buffer's high-water mark) arrives intact; over `limit` is a 502."""
    big = bytes(range(256)) * (3 * 4096)

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(big), 100_000):
                piece = big[i : i + 100_000]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")

    server = await raw_server(serve)
    up = upstream(client)
    assert await get_body(up, server.url) == (200, big)
    resp = await up.request("POST", server.url, HEADERS, b"{}")
    with pytest.raises(ApiError) as e:
        await up.read(resp, limit=1_000_000)
    assert e.value.message == "upstream body too large"


async def test_connections_per_host_are_limited_and_a_cancelled_call_frees_its_slot(raw_server) -> None:  # type: ignore[no-untyped-def]
    """With `limit_per_host=1` a second call waits for the first; cancelling a call mid-wait
    closes its connection (not reusable) and the next call gets through."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            s.requests.append(await read_request(reader))
            arrived.set()
            if n == 1:
                await release.wait()
            writer.write(answer(b'{"conn": %d}' % n))

    server = await raw_server(serve)
    c = HttpClient(limit_per_host=1)
    try:
        up = upstream(c)
        first = asyncio.create_task(get_body(up, server.url))
        await arrived.wait()
        second = asyncio.create_task(get_body(up, server.url))
        for _ in range(100):  # yield until it has queued for the one connection
            if c.usage()["waiting"]:
                break
            await asyncio.sleep(0)
        assert c.usage() == {"in_use": 1, "idle": 0, "waiting": 1}
        assert len(server.requests) == 1
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == (200, b'{"conn": 2}')
        assert server.connections == 2
        assert c.usage() == {"in_use": 0, "idle": 1, "waiting": 0}
    finally:
        release.set()
        await c.close()


async def test_tls_with_hostname_check(client: HttpClient) -> None:
    """https upstreams: the certificate is checked against the CA and the host name."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"tls": request.secure, "body": await request.text()})

    app = web.Application()
    app.router.add_post("/v1/x", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    c = HttpClient(tls=client_ctx)
    try:
        up = upstream(c)
        assert await get_body(up, f"https://localhost:{port}/v1/x", b"hi") == (200, b'{"tls": true, "body": "hi"}')
        assert await get_body(up, f"https://localhost:{port}/v1/x", b"again") == (200, b'{"tls": true, "body": "again"}')
        with pytest.raises(ApiError) as e:  # the certificate does not name 127.0.0.1
            await get_body(up, f"https://127.0.0.1:{port}/v1/x")
        assert e.value.code == "upstream_unreachable" and "SSLCertVerificationError" in e.value.message
        with pytest.raises(ApiError):  # nor does the default trust store know the CA
            await get_body(upstream(client), f"https://localhost:{port}/v1/x")
    finally:
        await c.close()
        await runner.cleanup()


async def test_a_path_piece_cannot_split_the_request(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """Ids that end up in a path (a chat id from an upstream) cannot add header lines: line
    breaks are dropped (as `urlsplit` does), spaces and non-ASCII are percent-encoded."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s.requests.append(await read_request(reader))
        writer.write(answer(b"{}"))
        await writer.drain()

    server = await raw_server(serve)
    url = f"http://127.0.0.1:{server.port}/api/chats/a b\r\nX-Evil: 1/é?chat_id=x%20y"
    assert await get_body(upstream(client), url) == (200, b"{}")
    line = server.requests[0].split(b"\r\n", 1)[0]
    assert line == b"POST /api/chats/a%20bX-Evil:%201/%C3%A9?chat_id=x%20y HTTP/1.1"
    assert b"X-Evil" not in server.requests[0].split(b"\r\n", 1)[1]


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded): synchronisation on state, not time."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_a_waiter_that_leaves_passes_its_turn_on(raw_server) -> None:  # type: ignore[no-untyped-def]
    """With one connection per host, A holds it and B and C wait. B is woken for it but
    cancelled before it runs (its client left): C must get the connection, not time out."""
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    tasks: dict[str, asyncio.Task[tuple[int, bytes]]] = {}

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            s.requests.append(await read_request(reader))
            if len(s.requests) == 1:
                await go.wait()
                # A's answer goes out now; B is cancelled in the iteration that wakes it.
                loop.call_soon(lambda: loop.call_soon(tasks["B"].cancel))
            writer.write(answer(b"{}"))
            await writer.drain()

    server = await raw_server(serve)
    c = HttpClient(limit_per_host=1)
    try:
        up = upstream(c, first_byte=30.0)
        tasks["A"] = asyncio.create_task(get_body(up, server.url))
        await until(lambda: len(server.requests) == 1)
        tasks["B"] = asyncio.create_task(get_body(up, server.url))
        tasks["C"] = asyncio.create_task(get_body(up, server.url))
        await until(lambda: c.usage()["waiting"] == 2)
        go.set()
        assert await tasks["A"] == (200, b"{}")
        with pytest.raises(asyncio.CancelledError):
            await tasks["B"]
        assert await asyncio.wait_for(tasks["C"], 10) == (200, b"{}")
        assert c.usage() == {"in_use": 0, "idle": 1, "waiting": 0}
    finally:
        go.set()
        await c.close()


async def test_bad_or_oversized_compressed_bodies_are_502(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """A corrupt gzip body, one cut short, and one inflating past 64 MiB (a "zip bomb") are
    502s, never a short body passed off as whole; their connections are not reused."""
    good = gzip.compress(b"x" * 10_000)
    bomb = gzip.compress(bytes(65 * 1024 * 1024), compresslevel=1)
    bodies = [good[:10] + b"\xff" * 20 + good[30:], good[: len(good) // 2] + b"", bomb]
    framed = [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bodies[0]), bodies[0]),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(bodies[1]), bodies[1]),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb),
    ]

    server = await raw_server(in_turn(framed))
    up = upstream(client)
    for expected in ("upstream body broke: ProtocolError",) * 3:
        with pytest.raises(ApiError) as e:
            await get_body(up, server.url)
        assert e.value.status == 502 and e.value.message == expected
    assert server.connections == 3


async def test_a_configured_host_replaces_the_urls(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """A provider that names a Host (a virtual host behind an address) sends exactly that one."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s.requests.append(await read_request(reader))
        writer.write(answer(b"{}"))
        await writer.drain()

    server = await raw_server(serve)
    up = upstream(client)
    resp = await up.request("POST", server.url, header_block({"Host": "api.internal.example"}), b"{}")
    assert (resp.status, await up.read(resp)) == (200, b"{}")
    hosts = [line for line in server.requests[0].split(b"\r\n") if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: api.internal.example"]


async def test_bytes_after_an_answer_retire_the_connection(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """An upstream that sends more than the answer (here half of another head) leaves the
    connection unusable: the next call goes out on a new one and succeeds."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            s.requests.append(await read_request(reader))
            stray = b"HTTP/1.1 200 OK\r\nX-Stray: 1\r\n" if len(s.requests) == 1 else b""
            writer.write(answer(b'{"conn": %d}' % n) + stray)
            await writer.drain()

    server = await raw_server(serve)
    up = upstream(client)
    assert await get_body(up, server.url) == (200, b'{"conn": 1}')
    assert await get_body(up, server.url) == (200, b'{"conn": 2}')
    assert server.connections == 2


async def test_waiters_are_served_in_turn(raw_server) -> None:  # type: ignore[no-untyped-def]
    """One connection per host; A makes calls back to back and W queues behind A's first.
    A released connection goes to W, not to A's next call (which would starve W)."""
    order: list[str] = []
    release = asyncio.Event()

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            s.requests.append(await read_request(reader))
            if len(s.requests) == 1:
                await release.wait()
            writer.write(answer(b"{}"))
            await writer.drain()

    server = await raw_server(serve)
    c = HttpClient(limit_per_host=1)
    try:
        up = upstream(c)

        async def calls(name: str, k: int) -> None:
            for _ in range(k):
                await get_body(up, server.url)
                order.append(name)

        a = asyncio.create_task(calls("A", 3))
        await until(lambda: len(server.requests) == 1)
        w = asyncio.create_task(calls("W", 1))
        await until(lambda: c.usage()["waiting"] == 1)
        release.set()
        await asyncio.gather(a, w)
        assert order == ["A", "W", "A", "A"]
    finally:
        release.set()
        await c.close()


async def test_keep_alive_holds_with_high_descriptor_numbers(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """A busy daemon has sockets numbered past 1023: idle connections are still reused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"needs 1300 descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:

        async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await read_request(reader)
                writer.write(answer(b"{}"))
                await writer.drain()

        server = await raw_server(serve)
        up = upstream(client)
        for _ in range(5):
            assert await get_body(up, server.url) == (200, b"{}")
        assert server.connections == 1
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_odd_but_legal_answers(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """Trailer fields stay with their own response; an empty body marked gzip is empty."""
    replies = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Content-Encoding\r\n\r\n2\r\nhi\r\n0\r\nContent-Encoding: gzip\r\n\r\n",
        answer(b'{"ok":true}'),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
    ]

    server = await raw_server(in_turn(replies))
    up = upstream(client)
    assert [await get_body(up, server.url) for _ in replies] == [(200, b"hi"), (200, b'{"ok":true}'), (200, b"")]
    assert server.connections == 1


async def test_a_switch_of_protocols_is_a_502(raw_server, client) -> None:  # type: ignore[no-untyped-def]
    """A 101 answer cannot be relayed: a clean 502, not an error escaping the event loop."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        await writer.drain()
        await reader.read()

    server = await raw_server(serve)
    with pytest.raises(ApiError) as e:
        await get_body(upstream(client), server.url)
    assert e.value.status == 502 and "switched protocols" in e.value.message
    assert client.usage() == {"in_use": 0, "idle": 0, "waiting": 0}


async def test_closing_the_client_fails_waiters_and_resends_nothing(raw_server) -> None:  # type: ignore[no-untyped-def]
    """At shutdown a call in flight and a call waiting for its connection both fail; the
    one in flight (a DELETE, which may be resent) is not sent again on a new connection."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s.requests.append(await read_request(reader))
        writer.write(answer(b"{}"))
        await writer.drain()
        while True:
            s.requests.append(await read_request(reader))  # and never answer

    server = await raw_server(serve)
    c = HttpClient(limit_per_host=1)
    up = upstream(c)
    assert await get_body(up, server.url) == (200, b"{}")
    deleting = asyncio.create_task(up.request("DELETE", server.url, HEADERS))
    await until(lambda: len(server.requests) == 2)
    waiting = asyncio.create_task(get_body(up, server.url))
    await until(lambda: c.usage()["waiting"] == 1)
    await c.close()
    for task in (deleting, waiting):
        with pytest.raises(ApiError) as e:
            await task
        assert e.value.code == "upstream_unreachable"
    assert server.connections == 1 and len(server.requests) == 2
    assert c.usage() == {"in_use": 0, "idle": 0, "waiting": 0}


def test_header_names_merge_whatever_their_case() -> None:
    """Configured headers and a provider's own are one set of names: the later spelling wins."""
    block = header_block({"authorization": "Bearer from-config", "accept": "*/*", "Authorization": "Bearer key", "user-agent": "mine"})
    lines = block.decode().split("\r\n")[:-1]
    assert sorted(lines) == ["Accept-Encoding: identity", "Authorization: Bearer key", "accept: */*", "user-agent: mine"]
