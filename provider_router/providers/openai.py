"""The `openai` provider: any OpenAI-compatible API, forwarded byte for byte, with the
response headers a client acts on (rate limits, Retry-After, the upstream's request id).
"""

from __future__ import annotations

from typing import Any, Coroutine, Mapping

from ..config import ProviderConfig
from .base import ChatCall, UpstreamReply
from .http import Exchange, Upstream, request_headers

# Upstream response headers a client acts on. Everything else is the upstream's own
# business (cookies, server, alt-svc) or hop-by-hop (connection, transfer-encoding...);
# length and encoding describe the upstream's framing, which the proxy redoes.
_FORWARD = frozenset({"content-type", "retry-after", "retry-after-ms", "openai-processing-ms", "openai-version"})
_FORWARD_PREFIXES = ("x-ratelimit-",)
# The proxy sets its own X-Request-Id (its log row); the upstream's goes on under this name.
_RENAMED = {"x-request-id": "x-upstream-request-id"}


def client_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream response headers to pass on, lower-cased, each once (the first value)."""
    out: dict[str, str] = {}
    for k, v in headers.items():
        name = k.lower()
        if name in _FORWARD or name.startswith(_FORWARD_PREFIXES):
            out.setdefault(name, v)
        elif name in _RENAMED:
            out.setdefault(_RENAMED[name], v)
    return out


def reply_of(up: Upstream, ex: Exchange) -> UpstreamReply:
    """An exchange as the API layer consumes it: forwarded verbatim."""
    return UpstreamReply(
        status=ex.status,
        headers=client_headers(ex.headers),
        raw=up.chunks(ex),
        read=lambda: up.read(ex),
        close=ex.close,
        queue_ms=ex.queue_ms,
    )


class OpenAIProvider:
    threaded = False
    forwards = True

    def __init__(self, cfg: ProviderConfig, up: Upstream) -> None:
        self.name = cfg.name
        self.upstream = up
        self._base = cfg.base_url.rstrip("/")
        headers = {**cfg.headers, "Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._headers = request_headers(headers)
        self._stream_headers = request_headers({**headers, "Accept": "text/event-stream"})
        self._get_headers = request_headers({k: v for k, v in headers.items() if k != "Content-Type"})

    def chat(self, call: ChatCall) -> Coroutine[Any, Any, UpstreamReply]:
        # The call itself, not a coroutine around it: one frame less on every resumption.
        return self.call("POST", "/chat/completions", call.raw, call.stream)

    async def call(self, method: str, path: str, body: bytes | None = None, stream: bool = False) -> UpstreamReply:
        """Any endpoint under the provider's `base_url` (`path` starts with `/`)."""
        if body is None:
            headers = self._get_headers
        else:
            headers = self._stream_headers if stream else self._headers
        ex = await self.upstream.request(method, self._base + path, headers, body)
        return reply_of(self.upstream, ex)

    async def close(self) -> None:
        return None
