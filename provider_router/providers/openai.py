"""The `openai` provider: any OpenAI-compatible API, forwarded byte for byte.

Split timeouts: connect, first byte (the response head), and idle between body reads.
There is no total cap, so a healthy long stream is never cut.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp

from ..config import ProviderConfig
from ..errors import ApiError, upstream_timeout, upstream_unreachable
from .base import ChatCall, UpstreamReply

# Headers of the upstream's answer worth passing on; everything else is hop-specific.
_FORWARD = ("content-type",)


class OpenAIProvider:
    threaded = False

    def __init__(self, cfg: ProviderConfig, http: aiohttp.ClientSession) -> None:
        self.name = cfg.name
        self._http = http
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json", **cfg.headers}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._t = cfg.timeouts
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeouts.connect, connect=cfg.timeouts.connect)

    async def chat(self, call: ChatCall) -> UpstreamReply:
        headers = self._headers
        if call.stream:
            headers = {**headers, "Accept": "text/event-stream"}
        try:
            async with asyncio.timeout(self._t.first_byte):
                resp = await self._http.post(
                    self._url, data=call.raw, headers=headers, timeout=self._timeout, allow_redirects=False
                )
        except TimeoutError:
            raise upstream_timeout("no response head") from None
        except aiohttp.ClientConnectorError as e:
            raise upstream_unreachable(f"{type(e).__name__}: {e.os_error.strerror or e}") from None
        except aiohttp.ClientError as e:
            raise upstream_unreachable(type(e).__name__) from None
        headers_out = {k: resp.headers[k] for k in _FORWARD if k in resp.headers}
        return UpstreamReply(status=resp.status, headers=headers_out, raw=self._body(resp), close=resp.close)

    async def _body(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        idle = self._t.idle
        content = resp.content
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                except TimeoutError:
                    raise upstream_timeout(f"no data for {idle:g}s") from None
                except aiohttp.ClientPayloadError as e:
                    raise ApiError(502, f"upstream stream broke: {e}", code="upstream_stream_error") from None
                except aiohttp.ClientError as e:
                    raise ApiError(502, f"upstream stream broke: {type(e).__name__}", code="upstream_stream_error") from None
                if not chunk:
                    return
                yield chunk
        finally:
            # close, not release: a client that went away must not leave the upstream running.
            resp.close()

    async def close(self) -> None:
        return None
