"""The log's inspection reads (and the few session edits an operator makes) behind one
interface, `LogReads`, for the CLI, the admin and sessions APIs and the dashboard: on SQLite
(`SqliteReads`, over the module functions of queries.py and its neighbours) or PostgreSQL
(`pg.reads.PgReads`); `open_reads` opens either from a path or a `postgresql://` URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

import aiosqlite

from . import queries, session_reads
from . import series as series_q
from . import stats as stats_q
from . import tree_view as tv
from .db import connect
from ..location import error_text, is_postgres, shown
from .migrations import MIGRATIONS, migrate_file
from .page import START, Page, is_cursor
from .presence import serving
from .queries import RequestFilter
from .series import Range, TimeSeries
from .session_reads import DeletedSession
from .stats import Stats
from .tree_view import SessionTree

__all__ = ["START", "LogReads", "Page", "SqliteReads", "Unavailable", "is_cursor", "open_reads", "open_sqlite"]


class LogReads(Protocol):
    """What the inspection surfaces read of the log and its sessions, and the session edits
    an operator makes without a daemon. Rows are dicts of the columns, times as the ISO
    text the log writes (`records.iso`); `AmbiguousId` for an id prefix naming several."""

    async def ping(self) -> None:
        """Raise if the database cannot be read (for /health)."""

    # -- requests
    async def recent_requests(self, flt: RequestFilter, limit: int = 20) -> Page:
        """The newest `limit` matching requests (0: all), oldest first; `flt.before` (a
        request id) pages back from that request."""

    async def new_requests(self, flt: RequestFilter, after: str, limit: int = 0) -> Page:
        """Matching requests written after the cursor `after`, oldest first; with `limit`
        only the newest `limit` of them."""

    async def get_request(self, id_prefix: str) -> dict[str, Any] | None:
        """One request by id or unique prefix, its `request` and `response` rebuilt."""

    async def session_requests(self, session_id: str) -> list[dict[str, Any]]:
        """A session's requests (exact id) in id order, listed."""

    async def count_session_requests(self, session_id: str) -> int:
        """How many requests name the session (exact id)."""

    # -- figures
    async def stats(self, since: str | None = None) -> Stats:
        """Per (model, provider) figures since `since`, session counts and lifecycle."""

    async def series(self, rng: Range, now: float | None = None) -> TimeSeries:
        """The roll-ups per bucket of `rng` up to `now`, per (model, provider)."""

    async def facets(self) -> dict[str, list[str]]:
        """The models, providers, outcomes and clients the log has seen."""

    async def lifecycle(self, now: float | None = None) -> dict[str, Any]:
        """The sessions' lifecycle figures (session_reads.lifecycle)."""

    # -- sessions
    async def list_sessions(
        self, *, state: str | None = None, client: str | None = None, limit: int = 20, offset: int = 0, newest_first: bool = False
    ) -> list[dict[str, Any]]:
        """The most recently used sessions (session_reads.list_sessions)."""

    async def get_session(self, id_prefix: str) -> dict[str, Any] | None:
        """One session by id or unique prefix, with `turn_rows`."""

    async def session_tree(self, session_id: str) -> SessionTree:
        """A session's conversation tree (exact id)."""

    async def refresh_session(self, session_id: str, now: float, timeout: float) -> bool:
        """Extend a session's timeout from `now` (reviving an ended one); whether it exists."""

    async def expire_sessions(self, now: str | None = None) -> int:
        """Mark active sessions past their expiry as expired; how many."""

    async def delete_session(self, session_id: str) -> DeletedSession | None:
        """Delete a session and its turns (its requests stay); None if there was none."""


class SqliteReads:
    """`LogReads` on a SQLite connection (or a `db.Reopenable` standing in for one, so a
    reopened file is followed): the module functions, unchanged."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def ping(self) -> None:
        async with self.conn.execute("SELECT 1") as cur:
            await cur.fetchone()

    async def recent_requests(self, flt: RequestFilter, limit: int = 20) -> Page:
        page = await queries.recent_requests(self.conn, flt, limit)
        return Page(page.rows, str(page.last_rowid))

    async def new_requests(self, flt: RequestFilter, after: str, limit: int = 0) -> Page:
        page = await queries.new_requests(self.conn, flt, int(after) if after.isdigit() else 0, limit)
        return Page(page.rows, str(page.last_rowid))

    async def get_request(self, id_prefix: str) -> dict[str, Any] | None:
        return await queries.get_request(self.conn, id_prefix)

    async def session_requests(self, session_id: str) -> list[dict[str, Any]]:
        return await queries.session_requests(self.conn, session_id)

    async def count_session_requests(self, session_id: str) -> int:
        return await queries.count_session_requests(self.conn, session_id)

    async def stats(self, since: str | None = None) -> Stats:
        return await stats_q.stats(self.conn, since)

    async def series(self, rng: Range, now: float | None = None) -> TimeSeries:
        return await series_q.series(self.conn, rng, now)

    async def facets(self) -> dict[str, list[str]]:
        return await series_q.facets(self.conn)

    async def lifecycle(self, now: float | None = None) -> dict[str, Any]:
        return await session_reads.lifecycle(self.conn, now)

    async def list_sessions(
        self, *, state: str | None = None, client: str | None = None, limit: int = 20, offset: int = 0, newest_first: bool = False
    ) -> list[dict[str, Any]]:
        return await session_reads.list_sessions(self.conn, state=state, client=client, limit=limit, offset=offset, newest_first=newest_first)

    async def get_session(self, id_prefix: str) -> dict[str, Any] | None:
        return await session_reads.get_session(self.conn, id_prefix)

    async def session_tree(self, session_id: str) -> SessionTree:
        return await tv.session_tree(self.conn, session_id)

    async def refresh_session(self, session_id: str, now: float, timeout: float) -> bool:
        return await session_reads.refresh_session(self.conn, session_id, now, timeout)

    async def expire_sessions(self, now: str | None = None) -> int:
        return await session_reads.expire_sessions(self.conn, now)

    async def delete_session(self, session_id: str) -> DeletedSession | None:
        return await session_reads.delete_session(self.conn, session_id)


# -- opening ---------------------------------------------------------------------------
class Unavailable(Exception):
    """The database cannot be opened for reading: one line saying why and what to do (a
    URL in it shown without its password)."""


Progress = Callable[[str], None]

CONNECT_TIMEOUT = 5  # seconds to reach a PostgreSQL server
POOL_MAX = 2


@contextlib.asynccontextmanager
async def open_reads(location: str, *, write: bool = False, progress: Progress | None = None) -> AsyncIterator[LogReads]:
    """`LogReads` on the database at `location` (a SQLite file's path or a `postgresql://`
    URL), closed on exit. A file is opened read-only unless `write`, never created, and
    migrated first if an earlier release wrote it (`progress` gets a line for each step);
    on PostgreSQL a small pool (`write` changes nothing there), its schema checked: an
    empty database is refused (only the daemon creates the log), an older one migrated."""
    if is_postgres(location):
        async with _pg(location, progress) as reads:
            yield reads
        return
    conn = await open_sqlite(Path(location), write=write, progress=progress)
    try:
        yield SqliteReads(conn)
    finally:
        await conn.close()


async def open_sqlite(path: Path, *, write: bool = False, progress: Progress | None = None) -> aiosqlite.Connection:
    """A connection of its own to the file at `path`: read-only unless `write`, never
    creating it, and migrating a file an earlier release wrote (unless a daemon serves it,
    which migrates its own file). Readers never block the daemon (WAL); writers get the
    project's PRAGMAs, notably busy_timeout and foreign_keys (session cascades)."""
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to this directory: {path.absolute()})"
        raise Unavailable(f"no database at {path}{where} (start `provider-router serve`, or pass --db PATH)")
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    try:
        done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    except sqlite3.OperationalError:  # no table yet: an empty file
        done = set()
    finally:
        db.close()
    if any(name not in done for name, _ in MIGRATIONS):
        # A file an earlier release wrote, unless a daemon serves it: that daemon migrates
        # its own file when it starts.
        if serving(path) is not None:
            raise Unavailable(
                f"the database at {path} is from an earlier release and a daemon serves it: restart the daemon (it migrates the file), then try again"
            )
        say = progress or (lambda _: None)
        say(f"migrating {path} to this release's schema (once)...")
        await asyncio.to_thread(migrate_file, str(path), lambda what, n, total: say(f"migrating {path}: {what} {n}/{total}"))
    return await connect(path, readonly=not write, migrate_schema=False)


@contextlib.asynccontextmanager
async def _pg(location: str, progress: Progress | None) -> AsyncIterator[LogReads]:
    import psycopg
    from .pg import migrations
    from .pg.pool import open_pool
    from .pg.reads import PgReads

    where = shown(location)
    try:
        async with await psycopg.AsyncConnection.connect(location, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn:
            cur = await conn.execute("SELECT to_regclass('_migrations') IS NOT NULL")
            done: set[str] = set()
            if (await cur.fetchone())[0]:  # type: ignore[index]
                done = {r[0] for r in await (await conn.execute("SELECT name FROM _migrations")).fetchall()}
    except (psycopg.Error, OSError) as e:
        raise Unavailable(f"cannot read the database at {where}: {error_text(location, e)}") from None
    if not done:
        # As SQLite's missing file: only the daemon creates the schema.
        raise Unavailable(f"no provider-router log in the database at {where} (start `provider-router serve --db URL` on it first)")
    if any(name not in done for name, _ in migrations.MIGRATIONS):
        if progress:
            progress(f"migrating {where} to this release's schema (once)...")
        try:
            await asyncio.to_thread(migrations.migrate, location)
        except psycopg.Error as e:
            raise Unavailable(f"cannot migrate the database at {where}: {error_text(location, e)}") from None
    try:
        pool = await open_pool(location, POOL_MAX, name="reads")
    except Exception as e:
        raise Unavailable(f"cannot read the database at {where}: {error_text(location, e)}") from None
    try:
        yield PgReads(pool)
    finally:
        await pool.close()
