"""`PgReads`: the `reads.LogReads` interface on PostgreSQL, over a psycopg pool. Requests
are read in `requests.py`, sessions in `session_reads.py`, figures in `figures.py`; ids and
times are found and shaped in `lookup.py`. The row shaping is SQLite's own, shared.
"""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from ..page import Page
from ..queries import RequestFilter
from ..series import Range, TimeSeries
from ..session_reads import DeletedSession
from ..stats import Stats
from ..tree_view import SessionTree
from . import figures, requests, session_reads
from .lookup import iso
from .requests import get_request

__all__ = ["PgReads", "get_request", "iso"]

# /health's check waits this long for a connection, not the pool's usual wait.
PING_WAIT_S = 2.0


class PgReads:
    """`reads.LogReads` on PostgreSQL: each read on a connection of `pool` (autocommit: a
    read is its own statement or few)."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self.pool = pool

    async def ping(self) -> None:
        async with self.pool.connection(timeout=PING_WAIT_S) as conn:  # /health answers promptly with the server down
            await conn.execute("SELECT 1")

    async def recent_requests(self, flt: RequestFilter, limit: int = 20) -> Page:
        async with self.pool.connection() as conn:
            return await requests.recent_requests(conn, flt, limit)

    async def new_requests(self, flt: RequestFilter, after: str, limit: int = 0) -> Page:
        async with self.pool.connection() as conn:
            return await requests.new_requests(conn, flt, after, limit)

    async def get_request(self, id_prefix: str) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            return await requests.get_request(conn, id_prefix)

    async def session_requests(self, session_id: str) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            return await requests.session_requests(conn, session_id)

    async def count_session_requests(self, session_id: str) -> int:
        async with self.pool.connection() as conn:
            return await requests.count_session_requests(conn, session_id)

    async def stats(self, since: str | None = None) -> Stats:
        async with self.pool.connection() as conn:
            return await figures.stats(conn, since)

    async def series(self, rng: Range, now: float | None = None) -> TimeSeries:
        async with self.pool.connection() as conn:
            return await figures.series(conn, rng, now)

    async def facets(self) -> dict[str, list[str]]:
        async with self.pool.connection() as conn:
            return await figures.facets(conn)

    async def lifecycle(self, now: float | None = None) -> dict[str, Any]:
        async with self.pool.connection() as conn:
            return await session_reads.lifecycle(conn, now)

    async def list_sessions(
        self, *, state: str | None = None, client: str | None = None, limit: int = 20, offset: int = 0, newest_first: bool = False
    ) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            return await session_reads.list_sessions(conn, state=state, client=client, limit=limit, offset=offset, newest_first=newest_first)

    async def get_session(self, id_prefix: str) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            return await session_reads.get_session(conn, id_prefix)

    async def session_tree(self, session_id: str) -> SessionTree:
        async with self.pool.connection() as conn:
            return await session_reads.session_tree(conn, session_id)

    async def refresh_session(self, session_id: str, now: float, timeout: float) -> bool:
        async with self.pool.connection() as conn:
            return await session_reads.refresh_session(conn, session_id, now, timeout)

    async def expire_sessions(self, now: str | None = None) -> int:
        async with self.pool.connection() as conn:
            return await session_reads.expire_sessions(conn, now)

    async def delete_session(self, session_id: str) -> DeletedSession | None:
        async with self.pool.connection() as conn:
            return await session_reads.delete_session(conn, session_id)
