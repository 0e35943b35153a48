"""Request figures on PostgreSQL, from the roll-ups as on SQLite (`store/stats.py`,
`store/series.py`, whose shaping they share): no request row is read.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..rows import ROLLUP_SUMS
from ..series import FACETS, Range, TimeSeries, bucketed, buckets, faceted, since_text, unit_at
from ..stats import Stats, grouped, periods
from .session_reads import lifecycle, session_counts

Conn = psycopg.AsyncConnection[Any]
# Sums as doubles: a bigint's sum is numeric (Decimal) otherwise; the shaping adds floats.
_SUMS = ", ".join(f"sum({c})::float8" for c in ROLLUP_SUMS)


async def stats(conn: Conn, since: str | None = None) -> Stats:
    """As stats.stats: per (model, provider), from the roll-ups' periods covering `since`."""
    where, params = periods(since, "%s")
    cur = await conn.execute(f"SELECT model, provider, {_SUMS} FROM rollups WHERE {where} GROUP BY model, provider", params)
    groups, total = grouped(await cur.fetchall())
    return Stats(groups, total, await session_counts(conn, since), since, await lifecycle(conn))


async def series(conn: Conn, rng: Range, now: float | None = None) -> TimeSeries:
    """As series.series: per period and (model, provider) first (the primary key's range),
    then per bucket."""
    starts = buckets(rng, now)
    k = unit_at(rng)
    inner = ", ".join(f"sum({c}) AS s{i}" for i, c in enumerate(ROLLUP_SUMS))
    outer = ", ".join(f"sum(s{i})::float8" for i in range(len(ROLLUP_SUMS)))
    sql = (
        f"SELECT substr(at, 1, {k - 1}), CAST(substr(at, {k}, 2) AS integer) / %(per)s, model, provider, {outer} FROM ("
        f"SELECT at, model, provider, {inner} FROM rollups WHERE span = %(span)s AND at >= %(first)s GROUP BY at, model, provider"
        ") periods GROUP BY 1, 2, 3, 4"
    )
    cur = await conn.execute(sql, {"per": rng.per_bucket, "span": rng.span, "first": since_text(rng, starts)})
    return bucketed(rng, starts, await cur.fetchall())


async def facets(conn: Conn) -> dict[str, list[str]]:
    """The models, providers, outcomes and clients of the daily roll-ups."""
    return faceted(await (await conn.execute(FACETS)).fetchall())
