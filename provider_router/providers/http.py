"""Upstream HTTP shared by the providers: the request with split timeouts, and body reads
with an idle timeout. There is no total cap, so a healthy long stream is never cut.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp

from ..config import TimeoutsConfig
from ..errors import ApiError, upstream_timeout, upstream_unreachable


class Upstream:
    """One provider's view of the shared `aiohttp.ClientSession`."""

    def __init__(self, http: aiohttp.ClientSession, timeouts: TimeoutsConfig) -> None:
        self.http = http
        self.t = timeouts
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_connect=timeouts.connect)

    async def request(self, method: str, url: str, **kw: Any) -> aiohttp.ClientResponse:
        """Send; return once the response head arrived (within `first_byte`). Redirects are not followed."""
        try:
            async with asyncio.timeout(self.t.first_byte):
                return await self.http.request(method, url, timeout=self._timeout, allow_redirects=False, **kw)
        except TimeoutError:
            raise upstream_timeout("no response head") from None
        except aiohttp.ClientConnectorError as e:
            raise upstream_unreachable(f"{type(e).__name__}: {e.os_error.strerror or e}") from None
        except aiohttp.ClientError as e:
            raise upstream_unreachable(type(e).__name__) from None

    async def chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The body as it arrives; `ApiError` on idle timeout or a broken connection.
        Closes (not releases) the response at the end, so a client that left stops the upstream."""
        idle = self.t.idle
        content = resp.content
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                except TimeoutError:
                    raise upstream_timeout(f"no data for {idle:g}s") from None
                except aiohttp.ClientError as e:
                    raise ApiError(502, f"upstream stream broke: {type(e).__name__}", code="upstream_stream_error") from None
                if not chunk:
                    return
                yield chunk
        finally:
            resp.close()

    async def read(self, resp: aiohttp.ClientResponse, limit: int = 64 * 1024 * 1024) -> bytes:
        """The whole body, within the idle timeout (one timer, not one per piece: a
        non-stream reply arrives in one go once the model has finished); at most `limit` bytes."""
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()
            raise ApiError(502, "upstream body too large", code="upstream_error")
        try:
            async with asyncio.timeout(self.t.idle):
                data = await resp.read()
        except TimeoutError:
            raise upstream_timeout(f"no complete body within {self.t.idle:g}s") from None
        except aiohttp.ClientError as e:
            raise ApiError(502, f"upstream body broke: {type(e).__name__}", code="upstream_stream_error") from None
        if len(data) > limit:
            raise ApiError(502, "upstream body too large", code="upstream_error")
        return data
