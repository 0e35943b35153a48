"""The read side on PostgreSQL, so far: one request read back whole from the tree, as
`queries.get_request` does on SQLite (what `logs show ID --json` prints). Async, on
psycopg's `AsyncConnection`, as the daemon and the CLI will use it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from ..queries import AmbiguousId, named_by, rebuild, rebuilt_row  # the row-shaping half is SQL-free: shared

# Each message as requests carry it: a reply's `resent` form where it has one.
_PATH = """
WITH RECURSIVE path(id, parent_id, body, depth) AS (
    SELECT id, parent_id, coalesce(resent, body), 0 FROM messages WHERE id = %s
    UNION ALL
    SELECT m.id, m.parent_id, coalesce(m.resent, m.body), p.depth + 1 FROM messages m JOIN path p ON m.id = p.parent_id
)
SELECT id, body FROM path ORDER BY depth DESC
"""


def iso(t: dt.datetime | None) -> str | None:
    """A timestamptz as the log writes times (records.iso): ISO 8601 UTC, milliseconds."""
    if t is None:
        return None
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def _by_prefix(conn: psycopg.AsyncConnection[Any], prefix: str) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM requests WHERE id LIKE %s ORDER BY id LIMIT %s", (_like(prefix), AmbiguousId.SHOWN + 1))
        rows = await cur.fetchall()
    return named_by(prefix, rows)


async def message_path(conn: psycopg.AsyncConnection[Any], tip: int) -> list[tuple[int, Any]]:
    """The messages from the root of the tree down to `tip`, as requests carry them."""
    cur = await conn.execute(_PATH, (tip,))
    return [(i, orjson.loads(body)) for i, body in await cur.fetchall()]


async def _one(conn: psycopg.AsyncConnection[Any], sql: str, value: Any) -> Any:
    cur = await conn.execute(sql, (value,))
    row = await cur.fetchone()
    return None if row is None else row[0]


class _PgTree:
    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def blob(self, blob_id: int) -> str | None:
        return await _one(self.conn, "SELECT data FROM blobs WHERE id = %s", blob_id)  # type: ignore[no-any-return]

    async def body(self, message_id: int) -> str | None:
        return await _one(self.conn, "SELECT body FROM messages WHERE id = %s", message_id)  # type: ignore[no-any-return]

    async def path(self, tip: int) -> list[tuple[int, Any]]:
        return await message_path(self.conn, tip)


async def reconstruct(conn: psycopg.AsyncConnection[Any], row: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """A request row's (request body, response, reply messages) from the tree."""
    return await rebuild(_PgTree(conn), row)


async def get_request(conn: psycopg.AsyncConnection[Any], id_prefix: str) -> dict[str, Any] | None:
    """One request by id or unique id prefix (AmbiguousId otherwise): its row, with
    `request` and `response` as the client sent and got them, rebuilt from the tree."""
    row = await _by_prefix(conn, id_prefix.strip().lower())
    if row is None:
        return None
    request, response, _ = await reconstruct(conn, row)
    row["received_at"], row["finished_at"] = iso(row["received_at"]), iso(row["finished_at"])
    return rebuilt_row(row, request, response)
