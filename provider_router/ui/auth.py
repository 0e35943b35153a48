"""Who may see the dashboard: the admin key, as `Authorization: Bearer <key>` or typed once
into the login form, which hands out a random session token in an HttpOnly, SameSite=Strict
cookie (never the key itself). Tokens live in memory: a restart logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from aiohttp import web

COOKIE = "provider_router_ui"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000  # the oldest is dropped beyond this: logins cannot grow memory unbounded


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Logins:
    """The session tokens handed out, by digest (a lookup leaks nothing about a token's
    text through timing), with when each expires."""

    def __init__(self, ttl: float = SESSION_SECONDS, bound: int = MAX_SESSIONS) -> None:
        self.ttl, self.bound = ttl, bound
        self._expires: dict[str, float] = {}

    def create(self) -> str:
        now = time.monotonic()
        self._expires = {d: t for d, t in self._expires.items() if t > now}
        while len(self._expires) >= self.bound:
            del self._expires[next(iter(self._expires))]  # dicts keep insertion order: the oldest
        token = secrets.token_urlsafe(32)
        self._expires[_digest(token)] = now + self.ttl
        return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        expires = self._expires.get(_digest(token))
        return expires is not None and expires > time.monotonic()

    def drop(self, token: str | None) -> None:
        if token:
            self._expires.pop(_digest(token), None)


class Guesses:
    """Failed logins per client address: past `limit` in `window` seconds, the form answers
    429 until the window has passed (guessing a key is then 10 a minute, not thousands a
    second). Bounded: the oldest addresses are forgotten past `bound`."""

    def __init__(self, limit: int = 10, window: float = 60.0, bound: int = 10_000) -> None:
        self.limit, self.window, self.bound = limit, window, bound
        self._failed: dict[str, tuple[float, int]] = {}  # address -> (window start, failures)

    def wait(self, address: str) -> float:
        """Seconds before `address` may try again (0: now)."""
        start, n = self._failed.get(address, (0.0, 0))
        left = start + self.window - time.monotonic()
        return left if n >= self.limit and left > 0 else 0.0

    def failed(self, address: str) -> None:
        now = time.monotonic()
        start, n = self._failed.pop(address, (now, 0))
        if now - start >= self.window:
            start, n = now, 0
        self._failed[address] = (start, n + 1)  # re-inserted: the newest is last
        while len(self._failed) > self.bound:
            del self._failed[next(iter(self._failed))]


def key_ok(typed: str, admin_key: str) -> bool:
    return bool(admin_key) and hmac.compare_digest(typed.encode(), admin_key.encode())


def same_origin(request: web.Request) -> bool:
    """A state-changing request came from a page of this daemon: its `Origin` (browsers send
    it on every POST) names this host, and `Sec-Fetch-Site` (where sent) says same-origin.
    A client that sends neither (curl, a script) is not a browser tricked by another site."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        return False
    site = request.headers.get("Sec-Fetch-Site")
    return site is None or site in ("same-origin", "none")


def set_cookie(response: web.StreamResponse, token: str, secure: bool) -> None:
    response.set_cookie(
        COOKIE, token, path="/ui", httponly=True, samesite="Strict", secure=secure, max_age=SESSION_SECONDS
    )


def clear_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/ui")
