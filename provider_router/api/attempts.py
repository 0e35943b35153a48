"""The routing and retry loop every model-routed endpoint shares: a request's routes (its
model, then its fallbacks), each tried `retries + 1` times while nothing reached the client,
paced by the upstream's Retry-After, every attempt in the log record.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

import structlog
from aiohttp import web

from ..errors import ApiError
from ..routing import Route
from ..records import RequestRecord

log = structlog.get_logger("provider_router.api")


@dataclass(slots=True)
class Attempt:
    """One try on one route; the handler notes what the upstream call waited for a slot."""

    route: Route
    last: bool
    queue_ms: float = 0.0


async def run(rec: RequestRecord, routes: list[Route], attempt: Callable[[Attempt], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """`attempt` on each route in turn until one answers. An `ApiError` that is retryable
    moves on (after a pause on the same upstream); any other, or the last, is the answer."""
    plan = [(route, n) for route in routes for n in range(route.provider.retries + 1)]
    # What each attempt ended with; made into the record's entries only when it keeps them
    # (more than one attempt, or one that waited for a connection slot), as most requests
    # are one attempt that did not wait.
    tried: list[tuple[Attempt, int, str | None, float, float]] = []
    try:
        for i, (route, n) in enumerate(plan):
            a = Attempt(route, last=i == len(plan) - 1)
            rec.provider, rec.upstream_model = route.provider.name, route.upstream_model
            t0 = time.perf_counter()
            try:
                resp = await attempt(a)
            except ApiError as e:
                tried.append((a, e.status, e.message, t0, time.perf_counter()))
                if a.last or not e.retryable:
                    raise
                log.info("upstream_retry", provider=route.provider.name, status=e.status, error=e.message, attempt=i + 1)
                if n < route.provider.retries:  # the same upstream again: wait as it asked, or a moment
                    await asyncio.sleep(pause(n, e.retry_after, route.provider.retry_after_max_seconds))
                continue
            tried.append((a, resp.status, None, t0, time.perf_counter()))
            return resp
        raise AssertionError("unreachable: the plan always has a last attempt")
    finally:
        if len(tried) > 1 or (tried and round(tried[0][0].queue_ms, 3)):
            rec.attempts = [_entry(*t) for t in tried]


def retryable(status: int, message: str, headers: Mapping[str, str]) -> ApiError:
    """An upstream's 429 or 5xx that another attempt may get past, paced by its Retry-After."""
    e = ApiError(status if status == 429 else 502, message, retryable=True)
    e.retry_after = retry_after(headers)
    return e


def pause(n: int, retry_after: float | None, cap: float) -> float:
    """Seconds before try `n + 1` on one upstream: its Retry-After up to `cap`, else a short backoff."""
    if retry_after is not None:
        return max(0.0, min(retry_after, cap))
    return min(0.1 * 2**n, 1.0)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The wait an upstream asked for: `retry-after-ms` (OpenAI's), or `Retry-After` in
    seconds or as an HTTP date; None if it asked for none (or wrote nonsense)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _entry(a: Attempt, status: int, error: str | None, t0: float, t1: float) -> dict[str, Any]:
    return {
        "provider": a.route.provider.name,
        "upstream_model": a.route.upstream_model,
        "status": status,
        "error": error,
        "ms": round((t1 - t0) * 1000, 3),
        "queue_ms": round(a.queue_ms, 3),
    }
