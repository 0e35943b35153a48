"""Session edits while a daemon serves the database: the daemon keeps active sessions in
memory and writes each back on its next request, so a session deleted or expired in the
file behind it would come back. While it runs, it is asked to make the change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson

from ..config import ConfigError
from ..location import is_postgres
from ..store.presence import mark_path, serving
from ..store.reads import LogReads
from .common import CliError, Settings
from .database import run_reads


class Admin:
    """The daemon serving the database, asked through its admin API."""

    def __init__(self, pid: int | None, url: str, key: str) -> None:
        self.pid, self.url, self.key = pid, url, key

    @classmethod
    def of(cls, who: dict[str, Any], db: Path, key: str) -> Admin:
        """The daemon a held mark names (`store.presence.serving`), asked with `key`. No key,
        a mark of another user's or no address yet are errors: the file is left alone rather
        than edited behind the daemon."""
        pid, url = who["pid"], who["url"]
        daemon = f"a running daemon (pid {pid or '?'}, {url or 'address unknown'})"
        if not key:
            raise CliError(
                f"{daemon} serves {db} and keeps its sessions in memory, so it would write this change "
                "back; stop it, or set auth.admin_key (in --config) so this command can ask it"
            )
        if who["uid"] != os.getuid():  # the key goes only where our own daemon said it listens
            raise CliError(
                f"{daemon} may serve {db}: its mark {mark_path(db)} belongs to another user, "
                "so this command neither edits the file nor sends that address the admin key"
            )
        if not url:  # held, but the daemon is starting and does not listen yet
            raise CliError(f"{daemon} serves {db} but does not listen yet; try again")
        return cls(pid, url, key)

    async def call(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of the admin API; 404 is the caller's, other failures raise."""
        import aiohttp  # only here: the read-only commands start faster without it

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                headers = {"Authorization": f"Bearer {self.key}"}
                async with http.request(method, self.url + path, headers=headers) as r:
                    status, raw = r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CliError(
                f"the daemon serving this database (pid {self.pid or '?'}) did not answer at {self.url}: "
                f"{'no answer within 5 s' if isinstance(e, TimeoutError) else e}"
            ) from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {}
        body = body if isinstance(body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        if status == 404 and error.get("code") == "unknown_url":
            raise CliError(f"the daemon at {self.url} has no admin API: its config sets no auth.admin_key")
        if status == 401:
            raise CliError(f"the daemon at {self.url} refused the admin key of --config (401): is that its config?")
        if status != 200 and status != 404:
            raise CliError(f"the daemon at {self.url} refused: {status} {error.get('message', '')}".rstrip())
        return status, body

    @property
    def via(self) -> str:
        return f"through the running daemon (pid {self.pid or '?'})"


def daemon_admin(settings: Settings, db: Path) -> Admin | None:
    """The daemon serving `db`, to be asked with auth.admin_key of --config; None if none does."""
    who = serving(db)
    if who is None:
        return None
    try:
        key = str(settings.load("auth").auth.admin_key)
    except ConfigError:  # no key to ask with: `Admin.of` says so
        key = ""
    return Admin.of(who, db, key)


def edit_sessions(
    settings: Settings,
    offline: Callable[[LogReads], Awaitable[None]],
    online: Callable[[LogReads, Admin], Awaitable[None]],
) -> None:
    """`offline` edits the database when no daemon serves it; else `online` asks the
    daemon, reading the database only. A daemon serving a SQLite file marks it (see
    `store.presence`); a PostgreSQL database carries no such mark, so it is edited."""
    location = settings.db_location()
    admin = None if is_postgres(location) else daemon_admin(settings, Path(location))
    if admin is None:
        run_reads(location, offline, write=True)
    else:
        run_reads(location, lambda reads: online(reads, admin))
