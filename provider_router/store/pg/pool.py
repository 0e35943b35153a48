"""The connection pool of a daemon or a command on PostgreSQL: one way to open it, with the
settings every connection of ours has."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

# Every pooled connection: times as UTC, a server that does not answer given up on (a read
# answers 503, a turn its error) rather than waited for without end.
CONNECT: dict[str, Any] = {"autocommit": True, "connect_timeout": 5, "options": "-c TimeZone=UTC -c statement_timeout=60000"}
# How long a caller waits for a free pool connection (or a new one) before it fails.
WAIT_S = 10.0


async def open_pool(url: str, max_size: int, name: str) -> AsyncConnectionPool:
    """A pool of 1 to `max_size` connections, its first one opened now (so a server that
    cannot be reached fails here, in one line, rather than at the first read)."""
    pool = AsyncConnectionPool(url, kwargs=CONNECT, min_size=1, max_size=max_size, open=False, timeout=WAIT_S, name=name)
    try:
        await pool.open(wait=True, timeout=WAIT_S)
    except BaseException:
        await pool.close()
        raise
    return pool
