"""Upstream HTTP shared by the providers, on the app's one `aiohttp.ClientSession`: each
provider's connection limit, proxy, TLS trust, split timeouts (connect, first byte, idle
between body pieces) and size caps, with every failure as an `ApiError`.

There is no total cap, so a healthy long stream is never cut. Redirects are never
followed (they could carry the provider's key elsewhere); the caller answers them 502.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import AsyncIterator, Callable, Mapping

import aiohttp
import yarl
from multidict import CIMultiDictProxy

from ..config import ConfigError, ProviderConfig
from ..errors import ApiError, upstream_timeout, upstream_unreachable
from .bodies import Inflate, LineCap, decoder_for
from .deadline import Deadlines
from .proxies import proxy_for

MAX_BODY = 64 * 1024 * 1024  # a non-streamed upstream body, decoded, may not be larger
USER_AGENT = "provider-router"

QueueObserver = Callable[[str, float], None]


def new_session() -> aiohttp.ClientSession:
    """The app's upstream session (`app._upstreams`). Limits are per provider (`Upstream`),
    so the connector itself never queues; idle keep-alive connections close after 30 s.
    Proxies come from each provider (`proxies.proxy_for`), resolved once at start-up: aiohttp's
    `trust_env` would read the environment and `~/.netrc` in a thread on every request."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30.0)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies are not the next request's
        timeout=aiohttp.ClientTimeout(total=None),
        # Decoded here (`bodies.Inflate`): aiohttp passes a truncated gzip body off as a short one.
        auto_decompress=False,
    )


def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A provider's fixed request headers, merged case-insensitively (the later spelling
    wins), with ours added unless there. Uncompressed answers are asked for: a compressing
    proxy in the way may hold stream pieces back; gzip sent anyway is decoded."""
    merged: dict[str, tuple[str, str]] = {"user-agent": ("User-Agent", USER_AGENT), "accept-encoding": ("Accept-Encoding", "identity")}
    for k, v in headers.items():
        merged[k.lower()] = (k, v)
    return dict(merged.values())


class Exchange:
    """An upstream call whose response head has arrived. The body follows through
    `Upstream.chunks` or `Upstream.read`; `close` (idempotent) ends the call: a body not
    read to its end closes its connection, so the upstream stops generating."""

    __slots__ = ("resp", "status", "headers", "queue_ms", "decoder", "_free", "_closed")

    def __init__(self, resp: aiohttp.ClientResponse, queue_ms: float, free: Callable[[], None] | None) -> None:
        self.resp = resp
        self.status = resp.status
        self.headers: CIMultiDictProxy[str] = resp.headers
        self.queue_ms = queue_ms
        self._free = free
        self.decoder: Inflate | None = None
        self._closed = False

    def close(self) -> None:
        if self._closed:  # closed by the read that ended the body, then by the reply's owner
            return
        self._closed = True
        self.resp.close()  # a no-op for a body read to its end: that connection went back to the pool
        free, self._free = self._free, None
        if free is not None:
            free()


class Upstream:
    """One provider's view of the app's session."""

    def __init__(self, session: aiohttp.ClientSession, cfg: ProviderConfig, on_queue: QueueObserver | None = None) -> None:
        self.session = session
        self.name = cfg.name
        self.t = cfg.timeouts
        proxy = proxy_for(cfg.base_url, cfg.proxy)
        # Credentials in a proxy URL go as Proxy-Authorization (aiohttp reads them from the
        # URL only for proxies it found in the environment itself): on the CONNECT of an
        # https upstream, or on each request a plain-http upstream gets through the proxy.
        self.proxy: yarl.URL | None = None if proxy is None else yarl.URL(proxy)
        self._proxy_auth: str | None = None
        if self.proxy is not None and self.proxy.user:
            self._proxy_auth = aiohttp.encode_basic_auth(self.proxy.user, self.proxy.password or "")
            self.proxy = self.proxy.with_user(None)
        # The system store (aiohttp's default context), or the system store plus the bundle.
        self.ssl: ssl.SSLContext | bool = True
        if cfg.ca_bundle:
            ctx = ssl.create_default_context()
            try:
                ctx.load_verify_locations(cafile=cfg.ca_bundle)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"provider {cfg.name!r}: ca_bundle {cfg.ca_bundle!r} is not a readable PEM file of CAs ({e})") from None
            self.ssl = ctx
        self.max_line = cfg.max_line_bytes
        self.max_header = cfg.max_header_bytes
        self._slots = asyncio.Semaphore(cfg.max_connections) if cfg.max_connections > 0 else None
        self.in_use = 0  # calls holding a connection slot (with a limit)
        self.waiting = 0  # calls waiting for one
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.t.connect)
        self._on_queue = on_queue
        self._deadlines = Deadlines()  # of its calls: one timer for all of them

    def _free(self) -> None:
        self.in_use -= 1
        self._slots.release()  # type: ignore[union-attr]

    async def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None) -> Exchange:
        """Send; return once the response head arrived, within `first_byte` s of the call
        (waiting for a connection slot and connecting included)."""
        proxy_headers = None
        if self._proxy_auth is not None:
            if url.startswith("https:"):
                proxy_headers = {"Proxy-Authorization": self._proxy_auth}
            else:
                headers = {**headers, "Proxy-Authorization": self._proxy_auth}
        slot = self._slots
        held = False
        resp: aiohttp.ClientResponse | None = None
        queue_ms = 0.0
        try:
            with self._deadlines.after(self.t.first_byte):
                if slot is not None:
                    if slot.locked():
                        loop = asyncio.get_running_loop()
                        t0 = loop.time()
                        self.waiting += 1
                        try:
                            await slot.acquire()
                        finally:
                            self.waiting -= 1
                        queue_ms = (loop.time() - t0) * 1000
                    else:
                        await slot.acquire()
                    held = True
                    self.in_use += 1
                if self._on_queue is not None:
                    self._on_queue(self.name, queue_ms)
                resp = await self.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, proxy=self.proxy, proxy_headers=proxy_headers, ssl=self.ssl,
                    timeout=self._timeout, max_line_size=self.max_header, max_field_size=self.max_header,
                )  # fmt: skip
        except BaseException as e:
            # Also when the deadline passed just as the head arrived: that response is not ours.
            if resp is not None:
                resp.close()
            if held:
                self._free()
            raise _head_error(e, f"provider {self.name!r}, host {yarl.URL(url).host}") from None
        ex = Exchange(resp, queue_ms, self._free if held else None)
        try:
            if resp.status < 200:  # 101: the connection now speaks another protocol (1xx before a head are skipped)
                raise ApiError(502, f"upstream switched protocols ({resp.status}), which is not supported", code="upstream_bad_response")
            ex.decoder = decoder_for(resp.headers)
        except ApiError:
            ex.close()
            raise
        return ex

    async def chunks(self, ex: Exchange) -> AsyncIterator[bytes]:
        """The body as it arrives; `ApiError` on idle timeout, a broken connection or an
        event-stream line longer than `max_line_bytes`. Closes the exchange at the end, so
        a client that left stops the upstream."""
        content = ex.resp.content
        idle = self.t.idle
        lines = LineCap(self.max_line)
        now = asyncio.get_running_loop().time
        try:
            # One deadline moved per piece (not a new timer context per piece); it is off
            # while a piece is with the consumer, whose own awaits it must never cancel.
            with self._deadlines.after(None) as deadline:
                while True:
                    deadline.reschedule(now() + idle)
                    try:
                        data = await content.readany()
                    except (aiohttp.ClientError, OSError) as e:  # a cut chunked body, a reset
                        raise _broken("stream", e) from None
                    deadline.reschedule(None)
                    if not data:
                        if ex.decoder is not None:
                            ex.decoder.end()
                        return
                    if ex.decoder is None:
                        lines.feed(data)
                        yield data
                        continue
                    for piece in ex.decoder.feed(data):
                        lines.feed(piece)
                        yield piece
        except TimeoutError:
            raise upstream_timeout(f"no data for {idle:g}s") from None
        finally:
            ex.close()

    async def read(self, ex: Exchange, limit: int = MAX_BODY) -> bytes:
        """The whole body within the idle timeout (one deadline, not one per piece: a
        non-stream reply arrives in one go once the model has finished); at most `limit` bytes."""
        resp = ex.resp
        try:
            decoder = ex.decoder
            if decoder is None and resp.content.is_eof():
                # The whole (small) body came with the head, as most JSON answers do: no
                # waiting, so no timer.
                data = await resp.content.read()
                if len(data) > limit:
                    raise ApiError(502, "upstream body too large", code="upstream_error")
                return data
            length = resp.content_length
            if length is not None and length > limit:
                raise ApiError(502, "upstream body too large", code="upstream_error")
            parts: list[bytes] = []
            size = 0
            with self._deadlines.after(self.t.idle):
                while True:
                    data = await resp.content.readany()
                    if not data:
                        if decoder is not None:
                            decoder.end()
                        break
                    for piece in (data,) if decoder is None else decoder.feed(data):
                        parts.append(piece)
                        size += len(piece)
                        if size > limit:
                            raise ApiError(502, "upstream body too large", code="upstream_error")
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except TimeoutError:
            raise upstream_timeout(f"no complete body within {self.t.idle:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _broken("body", e) from None
        finally:
            ex.close()


def _cause(e: BaseException) -> str:
    # aiohttp's connection errors wrap the OSError that says what happened.
    inner = getattr(e, "os_error", None) or e.__cause__
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"SSLCertVerificationError: {inner.verify_message}"
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    return str(e) or type(e).__name__


def _head_error(e: BaseException, where: str) -> BaseException:
    """What a failure before the response head becomes (cancellation stays itself); `where`
    names the provider and host (never a key), so a client's error says which upstream."""
    if isinstance(e, TimeoutError):  # the first-byte deadline, or aiohttp's connect timeout
        return upstream_timeout("no response head")
    if isinstance(e, aiohttp.ClientResponseError):  # the head broke HTTP or a cap
        return ApiError(502, f"upstream sent an unusable response head: {e.message}", code="upstream_bad_response", retryable=True)
    if isinstance(e, (aiohttp.ClientError, OSError)):
        inner = getattr(e, "os_error", None) or e.__cause__
        if isinstance(e, socket.gaierror) or isinstance(inner, socket.gaierror):
            return upstream_unreachable(f"{where}: the host name does not resolve ({_cause(e)})")
        return upstream_unreachable(f"{where}: {type(e).__name__}: {_cause(e)}")
    return e


def _broken(what: str, e: BaseException) -> ApiError:
    return ApiError(502, f"upstream {what} broke: {type(e).__name__}", code="upstream_stream_error")

