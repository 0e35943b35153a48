"""OpenAI-shaped errors: one exception type the handlers raise and the middleware renders.

`{"error": {"message", "type", "param", "code"}}` is the only error body the proxy writes.
"""

from __future__ import annotations

from typing import Callable

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_disconnected",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered to the client with `status` and an OpenAI error body.

    `outcome` is what the log record says about it (`rejected`, `upstream_error`, `timeout`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        outcome: str | None = None,
        retryable: bool = False,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.extra = extra  # more fields of the error object (e.g. an ambiguous id's candidates)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.outcome = outcome or ("rejected" if status < 500 else "upstream_error")
        # True only for failures where another attempt may succeed and nothing reached the
        # client: connection errors, timeouts before the first byte, upstream 429 / 5xx.
        self.retryable = retryable
        # Seconds the upstream asked to wait before another try (its Retry-After), if it said.
        self.retry_after: float | None = None

    def payload(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code, **(self.extra or {})}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


def upstream_timeout(what: str) -> ApiError:
    return ApiError(504, f"upstream timed out ({what})", code="upstream_timeout", outcome="timeout", retryable=True)


def upstream_unreachable(detail: str) -> ApiError:
    return ApiError(502, f"upstream unreachable: {detail}", code="upstream_unreachable", retryable=True)


MAX_SHOWN = 2000


def shown(redact: Callable[[str | None], str | None], message: str) -> str:
    """An error message as a client or the log may see it: secrets redacted first (upstream
    text may echo a key back), then cut, so a cut never leaves part of a secret behind."""
    text = redact(message) or ""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "…"
