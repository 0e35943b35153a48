"""What the daemon opens on a PostgreSQL database (app.py `_postgres`): the migrations
under their lock, the pool, and the pieces other modules of this package build: reads,
the session store, the coordination of instances, retention. Imported only when the
database is PostgreSQL, so a SQLite daemon never loads psycopg.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from . import migrations
from .locks import coordination
from .reads import PgReads
from .retention import prune
from .sessions import PgSessionRepo

__all__ = ["Error", "PgReads", "PgSessionRepo", "coordination", "migrate", "open_pool", "prune", "CONNECT"]

Error = psycopg.Error
# Every connection of the daemon: times as UTC, a server that does not answer given up on
# (a read answers 503, a turn its error) rather than waited for without end.
CONNECT: dict[str, Any] = {"autocommit": True, "connect_timeout": 5, "options": "-c TimeZone=UTC -c statement_timeout=60000"}
# How long a read waits for a free pool connection (or a new one) before it fails.
POOL_WAIT_S = 10.0


async def migrate(url: str, progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Apply the pending migrations (once, whichever instance comes first); their names."""
    done = await asyncio.to_thread(migrations.migrate, url)
    if progress is not None and done:
        progress(", ".join(done), len(done), len(done))
    return done


async def open_pool(url: str, max_size: int) -> AsyncConnectionPool:
    """A pool of 1 to `max_size` connections, its first one opened now (so a server that
    cannot be reached fails the start, in one line)."""
    pool = AsyncConnectionPool(url, kwargs=CONNECT, min_size=1, max_size=max_size, open=False, timeout=POOL_WAIT_S, name="provider-router")
    try:
        await pool.open(wait=True, timeout=POOL_WAIT_S)
    except BaseException:
        await pool.close()
        raise
    return pool
