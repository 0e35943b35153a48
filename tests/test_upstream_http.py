"""The upstream client (providers/http.py, bodies.py, proxies.py, on aiohttp's ClientSession)
against real loopback servers scripted byte for byte: framings, encodings, caps, limits,
TLS trust, and failures that become clean 502s."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_router.config import ProviderConfig, TimeoutsConfig
from provider_router.errors import ApiError
from provider_router.providers.bodies import LineCap
from provider_router.providers.http import Exchange, Upstream, new_session, request_headers
from provider_router.providers.proxies import proxy_for
from tests.waiting import until

HEADERS = request_headers({"Content-Type": "application/json"})
Serve = Callable[["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
async def raw_server() -> AsyncIterator[Callable[[Serve], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(serve: Serve) -> RawServer:
        state = RawServer()

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await serve(state, state.connections, reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
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


def in_turn(replies: list[bytes]) -> Serve:
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
async def session() -> AsyncIterator[Any]:
    s = new_session()
    yield s
    await s.close()


def upstream(session: Any, on_queue: Any = None, **kw: Any) -> Upstream:
    timeouts = {k: kw.pop(k) for k in ("connect", "first_byte", "idle") if k in kw}
    cfg = ProviderConfig(name="up", type="openai", base_url="http://127.0.0.1/v1", timeouts=TimeoutsConfig(**timeouts), **kw)
    return Upstream(session, cfg, on_queue)


async def get_body(up: Upstream, url: str, body: bytes | None = b"{}") -> tuple[int, bytes]:
    ex = await up.request("POST", url, HEADERS, body)
    return ex.status, await up.read(ex)


async def test_sequential_requests_reuse_one_connection(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """Keep-alive: ten calls one after another travel on one connection, each answered right."""
    server = await raw_server(in_turn([answer(b'{"n": %d}' % i) for i in range(10)]))
    up = upstream(session)
    assert [await get_body(up, server.url) for _ in range(10)] == [(200, b'{"n": %d}' % i) for i in range(10)]
    assert server.connections == 1


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """An upstream that hangs up an idle keep-alive connection (as uvicorn does after 5 s):
    the next call opens a new one."""
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
    up = upstream(session)
    assert await get_body(up, server.url) == (200, b'{"conn": 1}')
    await closed.wait()
    # One loop turn for the client to read the hang-up. (Sooner than that, aiohttp would
    # reuse the dead connection and the POST fail with a retryable 502, never be resent:
    # unlike the old client it cannot poll an idle socket before reusing it.)
    await asyncio.sleep(0)
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


async def test_a_post_is_never_resent(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """A reused connection that breaks with nothing back: the upstream may have started on
    the request. A POST (a generation someone pays for) fails with a retryable 502 and was
    sent once; the proxy's own retry policy, not the client library, decides what happens next."""
    server = await raw_server(hang_up_on_second_request)
    up = upstream(session)
    assert await get_body(up, server.url) == (200, b'{"conn": 1}')
    with pytest.raises(ApiError) as e:
        await get_body(up, server.url, b'{"once": true}')
    assert (e.value.status, e.value.code, e.value.retryable) == (502, "upstream_unreachable", True)
    assert sum(r.endswith(b'{"once": true}') for r in server.requests) == 1


async def test_a_fresh_connection_that_breaks_is_a_502(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """An upstream that reads the request and hangs up: a retryable 502, sent once."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server = await raw_server(serve)
    with pytest.raises(ApiError) as e:
        await get_body(upstream(session), server.url)
    assert (e.value.status, e.value.code) == (502, "upstream_unreachable")
    assert server.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world", id="until-close"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(gzip.compress(b"hello world")), gzip.compress(b"hello world")),
            id="gzip-though-not-asked",
        ),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world", id="after-103"),
    ],
)
async def test_body_framings_and_encodings(raw_server, session, reply: bytes) -> None:  # type: ignore[no-untyped-def]
    """Chunked, read-until-close, gzip sent anyway and a 1xx before the head all give the plain body."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s.requests.append(await read_request(reader))
        writer.write(reply)
        await writer.drain()

    server = await raw_server(serve)
    assert await get_body(upstream(session), server.url) == (200, b"hello world")
    assert b"Accept-Encoding: identity\r\n" in server.requests[0]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc", "content-encoding"),
        (b"SMTP ready\r\n\r\n", "Bad status line"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "switched protocols"),
    ],
    ids=["brotli", "not-http", "switch-protocols"],
)
async def test_unusable_answers_are_502(raw_server, session, reply: bytes, expected: str) -> None:  # type: ignore[no-untyped-def]
    """An encoding we cannot decode, bytes that are not HTTP, or a switch of protocols never
    reach the client as if fine: a 502 naming what was wrong."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        await reader.read()

    server = await raw_server(serve)
    with pytest.raises(ApiError) as e:
        await get_body(upstream(session), server.url)
    assert e.value.status == 502 and expected in e.value.message


async def test_stream_pieces_arrive_as_sent_and_a_cut_stream_is_an_error(raw_server, session) -> None:  # type: ignore[no-untyped-def]
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
    up = upstream(session)
    ex = await up.request("POST", server.url, HEADERS, b"{}")
    assert ex.headers["content-type"] == "text/event-stream"
    pieces = up.chunks(ex)
    assert await pieces.__anext__() == b"first\n"
    go.set()  # the second piece is sent only once the first has been received
    assert await pieces.__anext__() == b"second\n"
    with pytest.raises(ApiError) as e:
        await pieces.__anext__()
    assert e.value.code == "upstream_stream_error"


async def test_big_bodies_pass_whole_and_the_limit_holds(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """3 MiB (well over the read buffer) arrives intact; over `limit` is a 502."""
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
    up = upstream(session)
    assert await get_body(up, server.url) == (200, big)
    ex = await up.request("POST", server.url, HEADERS, b"{}")
    with pytest.raises(ApiError) as e:
        await up.read(ex, limit=1_000_000)
    assert e.value.message == "upstream body too large"


async def test_bad_or_oversized_compressed_bodies_are_502(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """A corrupt gzip body, one cut short, and one inflating past the body limit (a "zip
    bomb") are 502s, never a short body passed off as whole."""
    good = gzip.compress(b"x" * 10_000)
    bomb = gzip.compress(bytes(65 * 1024 * 1024), compresslevel=1)
    bodies = [good[:10] + b"\xff" * 20 + good[30:], good[: len(good) // 2], bomb]
    framed = [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bodies[0]), bodies[0]),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(bodies[1]), bodies[1]),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb),
    ]
    server = await raw_server(in_turn(framed))
    up = upstream(session)
    for expected in ("upstream body broke", "upstream body broke", "upstream body too large"):
        with pytest.raises(ApiError) as e:
            await get_body(up, server.url)
        assert e.value.status == 502 and e.value.message.startswith(expected)


async def test_a_configured_host_replaces_the_urls(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """A provider that names a Host (a virtual host behind an address) sends exactly that one."""
    server = await raw_server(in_turn([answer(b"{}")]))
    up = upstream(session)
    ex = await up.request("POST", server.url, request_headers({"Host": "api.internal.example"}), b"{}")
    assert (ex.status, await up.read(ex)) == (200, b"{}")
    hosts = [line for line in server.requests[0].split(b"\r\n") if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: api.internal.example"]


async def test_a_path_piece_cannot_split_the_request(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """Ids that end up in a path (a chat id from an upstream) cannot add header lines."""
    server = await raw_server(in_turn([answer(b"{}")]))
    up = upstream(session)
    ex = await up.request("DELETE", f"http://127.0.0.1:{server.port}/chats/a\r\nX-Evil: 1", HEADERS)
    assert ex.status == 200
    await up.read(ex)
    first, *fields = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert first.startswith(b"DELETE /chats/a") and not any(f.lower().startswith(b"x-evil") for f in fields)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-N%d: a\r\n" % i for i in range(200)) + b"Content-Length: 2\r\n\r\nhi",
    ],
    ids=["long-field", "many-fields"],
)
async def test_the_response_head_is_capped(raw_server, session, head: bytes) -> None:  # type: ignore[no-untyped-def]
    """A header line over `max_header_bytes`, or more than 128 fields, is a 502 that says so:
    the head the client never sees is never buffered without bound."""
    server = await raw_server(in_turn([head]))
    with pytest.raises(ApiError) as e:
        await get_body(upstream(session), server.url)
    assert e.value.status == 502 and e.value.code == "upstream_bad_response"


async def test_the_header_cap_is_configurable(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """`max_header_bytes` moves the cap both ways."""
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 12000 + b"\r\nContent-Length: 2\r\n\r\nhi"
    server = await raw_server(in_turn([big, answer(b"{}", b"X-Small: " + b"a" * 200 + b"\r\n")]))
    assert await get_body(upstream(session, max_header_bytes=16384), server.url) == (200, b"hi")
    with pytest.raises(ApiError):
        await get_body(upstream(session, max_header_bytes=100), server.url)


async def test_an_event_stream_line_is_capped(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """Lines up to `max_line_bytes` pass whatever their split into pieces; a longer one
    (here one that never ends) is `upstream_line_too_long` once it passes the cap."""

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            s.requests.append(await read_request(reader))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            pieces = [b"data: " + b"a" * 94 + b"\n\n", b"data: " + b"b" * 50, b"c" * 44 + b"\r\n\r\n"]  # 100-byte lines
            if len(s.requests) == 2:
                pieces = [b"data: " + b"x" * 60] * 1000  # never ends
            for p in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(p), p))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await raw_server(serve)
    up = upstream(session, max_line_bytes=100)
    ex = await up.request("POST", server.url, HEADERS, b"{}")
    assert b"".join([c async for c in up.chunks(ex)]).count(b"\n\n") == 1
    ex = await up.request("POST", server.url, HEADERS, b"{}")
    got = 0
    with pytest.raises(ApiError) as e:
        async for c in up.chunks(ex):
            got += len(c)
    assert e.value.code == "upstream_line_too_long" and got <= 100


async def test_connections_are_limited_per_provider_and_the_wait_is_measured(raw_server, session) -> None:  # type: ignore[no-untyped-def]
    """With `max_connections: 1` a second call waits until the first is closed; the wait is
    reported (to the caller and to the metrics hook); a waiter that is cancelled frees its turn."""
    release = asyncio.Event()

    async def serve(s: RawServer, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await raw_server(serve)
    waits: list[float] = []
    up = upstream(session, on_queue=lambda name, ms: waits.append(ms), max_connections=1)
    first = await up.request("POST", server.url, HEADERS, b"{}")
    assert first.queue_ms == 0
    cancelled = asyncio.create_task(up.request("POST", server.url, HEADERS, b"{}"))
    second = asyncio.create_task(up.request("POST", server.url, HEADERS, b"{}"))
    await until(lambda: up.waiting == 2, "both calls waiting for the slot")
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not second.done()  # it waits for the slot
    first.close()  # mid-body: its connection closes, its slot goes to the waiter
    release.set()
    ex: Exchange = await second
    assert ex.queue_ms > 0 and await up.read(ex) == b"hi"
    assert len(waits) == 2 and waits[0] == 0 and waits[1] == ex.queue_ms


def _tls_server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    return ctx


async def test_tls_is_checked_against_the_store_and_an_optional_ca_bundle(session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """https upstreams: the certificate must chain to the system store or the provider's
    `ca_bundle`, and name the host."""
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"tls": request.secure, "body": await request.text()})

    app = web.Application()
    app.router.add_post("/v1/x", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_tls_server_ctx(ca))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        up = upstream(session, ca_bundle=str(bundle))
        assert await get_body(up, f"https://localhost:{port}/v1/x", b"hi") == (200, b'{"tls": true, "body": "hi"}')
        with pytest.raises(ApiError) as e:  # the certificate does not name 127.0.0.1
            await get_body(up, f"https://127.0.0.1:{port}/v1/x")
        assert e.value.code == "upstream_unreachable" and "SSLCertVerificationError" in e.value.message
        with pytest.raises(ApiError) as e:  # nor does the system store know the CA
            await get_body(upstream(session), f"https://localhost:{port}/v1/x")
        assert e.value.code == "upstream_unreachable" and "certificate" in e.value.message
    finally:
        await runner.cleanup()


def test_proxy_settings_resolve_like_the_environment_says() -> None:
    """`proxy:` wins ("direct" for none); else the scheme's *_PROXY unless NO_PROXY matches."""
    env = {"HTTPS_PROXY": "http://p:3128", "http_proxy": "http://q:3128", "NO_PROXY": "internal.example,127.0.0.2"}
    assert proxy_for("https://api.openai.com/v1", "", env) == "http://p:3128"
    assert proxy_for("http://llm.lan/v1", "", env) == "http://q:3128"
    assert proxy_for("https://api.internal.example/v1", "", env) is None
    assert proxy_for("http://127.0.0.2:8000/v1", "", env) is None
    assert proxy_for("https://api.openai.com/v1", "http://mine:8080", env) == "http://mine:8080"
    assert proxy_for("https://api.openai.com/v1", "direct", env) is None
    assert proxy_for("https://api.openai.com/v1", "", {}) is None


def test_header_names_merge_whatever_their_case() -> None:
    """Of two spellings of one header name the later wins; ours are added unless set."""
    merged = request_headers({"authorization": "Bearer from-config", "accept": "*/*", "Authorization": "Bearer key", "user-agent": "mine"})
    assert merged == {"Authorization": "Bearer key", "accept": "*/*", "user-agent": "mine", "Accept-Encoding": "identity"}


def test_an_unreadable_ca_bundle_is_named_at_start_up(tmp_path: Path) -> None:
    """A `ca_bundle` that is missing or not PEM stops start-up with a message naming it."""
    from provider_router.config import ConfigError

    (tmp_path / "junk.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        with pytest.raises(ConfigError, match="ca_bundle"):
            upstream(None, ca_bundle=str(path))


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.tuples(st.integers(0, 40), st.sampled_from([b"\n", b"\r\n", b"\r"])), min_size=1, max_size=12),
    tail=st.integers(0, 40),
    cuts=st.lists(st.integers(0, 600), max_size=8),
)
def test_the_line_cap_holds_however_the_stream_is_split(lines: list[tuple[int, bytes]], tail: int, cuts: list[int]) -> None:
    """`LineCap(20)` refuses a stream exactly when one of its lines (the unfinished last one
    included) is longer than 20 bytes, wherever the pieces are cut, CRLF split included."""
    stream = b"".join(b"a" * n + end for n, end in lines) + b"b" * tail
    too_long = max([n for n, _ in lines] + [tail]) > 20
    points = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    cap = LineCap(20)
    try:
        for a, b in zip(points, points[1:]):
            cap.feed(stream[a:b])
    except ApiError as e:
        assert too_long and e.code == "upstream_line_too_long"
    else:
        assert not too_long
