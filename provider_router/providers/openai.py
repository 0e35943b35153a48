"""The `openai` provider: any OpenAI-compatible API, forwarded byte for byte."""

from __future__ import annotations

from ..config import ProviderConfig
from .base import ChatCall, UpstreamReply
from .client import HttpClient
from .http import Upstream

# Headers of the upstream's answer worth passing on; everything else is hop-specific.
_FORWARD = ("content-type",)


class OpenAIProvider:
    threaded = False

    def __init__(self, cfg: ProviderConfig, http: HttpClient) -> None:
        self.name = cfg.name
        self._up = Upstream(http, cfg.timeouts, name=cfg.name)
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {**cfg.headers, "Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._headers = Upstream.headers(headers)
        self._stream_headers = Upstream.headers({**headers, "Accept": "text/event-stream"})

    async def chat(self, call: ChatCall) -> UpstreamReply:
        headers = self._stream_headers if call.stream else self._headers
        resp = await self._up.request("POST", self._url, headers, call.raw)
        headers_out = {k: resp.headers[k] for k in _FORWARD if k in resp.headers}
        return UpstreamReply(
            status=resp.status,
            headers=headers_out,
            raw=self._up.chunks(resp),
            read=lambda: self._up.read(resp),
            close=resp.close,
        )

    async def close(self) -> None:
        return None
