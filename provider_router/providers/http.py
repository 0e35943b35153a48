"""Upstream HTTP shared by the providers: requests with split timeouts (connect, first
byte, idle between body pieces) and failures as `ApiError`s. There is no total cap, so a
healthy long stream is never cut. The wire work is `client.py`'s and `wire.py`'s.
"""

from __future__ import annotations

import asyncio
import socket
from typing import AsyncIterator, Mapping
from urllib.parse import urlsplit

from ..config import TimeoutsConfig
from ..errors import ApiError, upstream_timeout, upstream_unreachable
from .client import HttpClient, header_block
from .wire import MAX_BODY, ProtocolError, Response


class Upstream:
    """One provider's view of the app's `HttpClient`."""

    def __init__(self, http: HttpClient, timeouts: TimeoutsConfig, *, name: str = "") -> None:
        self.http = http
        self.t = timeouts
        self.name = name  # the provider's, for errors a client reads

    @staticmethod
    def headers(headers: Mapping[str, str]) -> bytes:
        """Encode a provider's fixed headers once (see `client.header_block`)."""
        return header_block(headers)

    async def request(self, method: str, url: str, headers: bytes, body: bytes | None = None) -> Response:
        """Send; return once the response head arrived (within `first_byte`). Redirects are not followed."""
        try:
            return await self.http.request(
                method, url, headers, body, connect=self.t.connect, first_byte=self.t.first_byte
            )
        except TimeoutError:
            raise upstream_timeout("no response head") from None
        except OSError as e:
            # Say which provider and host (never a key: the URL's host part only), not a bare gaierror.
            split = urlsplit(url)
            where = f"provider {self.name!r}, host {split.hostname}" if self.name else f"host {split.hostname}"
            if isinstance(e, socket.gaierror):
                raise upstream_unreachable(f"{where}: the host name does not resolve ({e.strerror or e})") from None
            raise upstream_unreachable(f"{where}, port {split.port or ('443' if split.scheme == 'https' else '80')}: {type(e).__name__}: {e.strerror or e}") from None
        except ProtocolError as e:
            raise upstream_unreachable(str(e)) from None

    async def chunks(self, resp: Response) -> AsyncIterator[bytes]:
        """The body as it arrives; `ApiError` on idle timeout or a broken connection.
        Closes the response at the end, so a client that left stops the upstream."""
        idle = self.t.idle
        try:
            while True:
                data = resp.take()
                if data:
                    yield data
                    continue
                if resp.done:
                    return
                _raise_broken(resp, "stream")
                try:
                    await resp.wait(idle)
                except TimeoutError:
                    raise upstream_timeout(f"no data for {idle:g}s") from None
        finally:
            resp.close()

    async def read(self, resp: Response, limit: int = MAX_BODY) -> bytes:
        """The whole body, within the idle timeout (one timer, not one per piece: a
        non-stream reply arrives in one go once the model has finished); at most `limit` bytes."""
        try:
            if resp.content_length is not None and resp.content_length > limit:
                raise ApiError(502, "upstream body too large", code="upstream_error")
            parts: list[bytes] = []
            size = 0
            loop_time = asyncio.get_running_loop().time
            deadline = loop_time() + self.t.idle
            while True:
                data = resp.take()
                if data:
                    parts.append(data)
                    size += len(data)
                    if size > limit:
                        raise ApiError(502, "upstream body too large", code="upstream_error")
                    continue
                if resp.done:
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                _raise_broken(resp, "body")
                try:
                    await resp.wait(deadline - loop_time())
                except TimeoutError:
                    raise upstream_timeout(f"no complete body within {self.t.idle:g}s") from None
        finally:
            resp.close()


def _raise_broken(resp: Response, what: str) -> None:
    if resp.error is not None:
        raise ApiError(
            502, f"upstream {what} broke: {type(resp.error).__name__}", code="upstream_stream_error"
        ) from None
