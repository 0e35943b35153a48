"""Finding rows on PostgreSQL: by id or id prefix (a request's in the days its id names:
partitions pruned), and times turned back into the ISO text SQLite stores."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..queries import AmbiguousId, named_by

Conn = psycopg.AsyncConnection[Any]

# How far a request's `received_at` may lie from the milliseconds its id starts with (both
# are taken as the request arrives); a row outside is still found, by a lookup of every day.
ID_MARGIN = dt.timedelta(minutes=5)


def iso(t: dt.datetime | None) -> str | None:
    """A timestamptz as the log writes times (records.iso): ISO 8601 UTC, milliseconds."""
    if t is None:
        return None
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def times(row: dict[str, Any], *cols: str) -> dict[str, Any]:
    """`row` with its timestamptz columns `cols` as the ISO text SQLite stores."""
    for col in cols:
        if col in row:
            row[col] = iso(row[col])
    return row


def like(prefix: str) -> str:
    """A LIKE pattern for the values that start with `prefix`."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def id_range(prefix: str) -> tuple[dt.datetime, dt.datetime] | None:
    """The `received_at` range a request whose id starts with `prefix` was received in
    (its hex digits' milliseconds, with `ID_MARGIN`), or None when it names no range."""
    digits = re.match(r"[0-9a-f]*", prefix).group(0)[:12]  # type: ignore[union-attr]
    if not digits:
        return None
    shift = 4 * (12 - len(digits))
    lo, hi = int(digits, 16) << shift, (int(digits, 16) + 1) << shift
    try:
        start = dt.datetime.fromtimestamp(lo / 1000, dt.timezone.utc) - ID_MARGIN
        end = dt.datetime.fromtimestamp(hi / 1000, dt.timezone.utc) + ID_MARGIN
    except (OverflowError, ValueError, OSError):  # past year 9999: no row there
        return None
    return start, end


async def fetch_rows(conn: Conn, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """The rows of `sql` as dicts of their columns."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


_IN_DAYS = " AND received_at >= %s AND received_at < %s"


async def by_prefix(conn: Conn, table: str, prefix: str, ranged: bool = False) -> dict[str, Any] | None:
    """The row of `table` whose id `prefix` names (queries.named_by); `ranged`: a request,
    looked for in the days its id names first (partitions pruned), in every day only if
    none is there. (So a prefix is ambiguous only among the rows of those days: another row
    with that prefix received more than `ID_MARGIN` away from its id's time is not counted.)"""
    sql, order = f"SELECT * FROM {table} WHERE id LIKE %s", " ORDER BY id LIMIT %s"
    days = id_range(prefix) if ranged else None
    if days is not None:
        rows = await fetch_rows(conn, sql + _IN_DAYS + order, (like(prefix), *days, AmbiguousId.SHOWN + 1))
        if rows:
            return named_by(prefix, rows)
    return named_by(prefix, await fetch_rows(conn, sql + order, (like(prefix), AmbiguousId.SHOWN + 1)))


async def received_at(conn: Conn, request_id: str) -> str | None:
    """When the request `request_id` (exact) was received, looked for in the days its id
    names first; None if there is none."""
    sql = "SELECT received_at FROM requests WHERE id = %s"
    days = id_range(request_id)
    row = None
    if days is not None:
        row = await (await conn.execute(sql + _IN_DAYS, (request_id, *days))).fetchone()
    if row is None:
        row = await (await conn.execute(sql, (request_id,))).fetchone()
    return None if row is None else iso(row[0])
