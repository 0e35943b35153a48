"""Request statistics over time, from the roll-ups (no request row is read): per bucket of a
chosen step and per (model, provider), the counts, tokens and latency histograms (the
percentiles estimated as `stats` does); and the values the roll-ups hold per column (what
a dashboard's filters offer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import aiosqlite

from .rows import NB, ROLLUP_SUMS
from .stats import bucket_percentile

# A roll-up's `at` per span: its format, where the unit the buckets count starts in the
# text (1-based), and how long one unit is.
_SPANS = {
    "m": ("%Y-%m-%dT%H:%M", 15, timedelta(minutes=1)),
    "h": ("%Y-%m-%dT%H", 12, timedelta(hours=1)),
    "d": ("%Y-%m-%d", 9, timedelta(days=1)),
}


@dataclass(frozen=True, slots=True)
class Range:
    """A time range the series covers: its length, the roll-up span it reads and how many
    of that span's units make one bucket (a divisor of the next larger unit, so a bucket
    never straddles an hour or a day)."""

    name: str
    seconds: int
    span: str
    per_bucket: int

    @property
    def step(self) -> timedelta:
        return _SPANS[self.span][2] * self.per_bucket


# The cost is the roll-up rows read (one per minute, hour or day and combination of model,
# provider, outcome and client), so a range reads the coarsest span that still gives it a
# few dozen points: a day by minutes would read 1,440 rows per combination.
RANGES = {
    r.name: r
    for r in (
        Range("1h", 3600, "m", 1),
        Range("3h", 3 * 3600, "m", 5),
        Range("24h", 86400, "h", 1),
        Range("7d", 7 * 86400, "h", 4),
        Range("30d", 30 * 86400, "d", 1),
        Range("90d", 90 * 86400, "d", 1),
    )
}


class Point:
    """One bucket's roll-up sums (`rows.ROLLUP_SUMS`, in order), read as the charts need
    them: percentiles are worked out only for the points a chart draws."""

    __slots__ = ("sums",)

    def __init__(self, sums: list[float]) -> None:
        self.sums = sums

    def add(self, values: Sequence[float]) -> None:
        self.sums = [a + (b or 0) for a, b in zip(self.sums, values)]

    @property
    def requests(self) -> int:
        return int(self.sums[0])

    @property
    def errors(self) -> int:
        return int(self.sums[1])

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens."""
        return int(self.sums[2] + self.sums[3])

    def ttfb(self, q: float) -> float | None:
        return bucket_percentile([int(x) for x in self.sums[8 : 8 + NB]], q)

    def duration(self, q: float) -> float | None:
        return bucket_percentile([int(x) for x in self.sums[8 + NB : 8 + 2 * NB]], q)


@dataclass(slots=True)
class TimeSeries:
    """`starts`: each bucket's start (UTC), oldest first; `groups`: per (model, provider),
    a Point per bucket (None where it had no request); `total`: every group added up."""

    range: Range
    starts: list[datetime]
    groups: dict[tuple[str | None, str | None], list[Point | None]] = field(default_factory=dict)
    total: list[Point] = field(default_factory=list)


def _first_bucket(rng: Range, now: datetime) -> datetime:
    """The start of the bucket holding `now - range`: the range's step counted from the
    start of the unit above the span (the hour for minutes, the day for hours)."""
    start = now - timedelta(seconds=rng.seconds)
    if rng.span == "m":
        return start.replace(minute=start.minute - start.minute % rng.per_bucket, second=0, microsecond=0)
    if rng.span == "h":
        return start.replace(hour=start.hour - start.hour % rng.per_bucket, minute=0, second=0, microsecond=0)
    return start.replace(hour=0, minute=0, second=0, microsecond=0)


def buckets(rng: Range, now: float | None = None) -> list[datetime]:
    """Each bucket's start (UTC) of `rng` up to `now`, oldest first."""
    at = datetime.now(timezone.utc) if now is None else datetime.fromtimestamp(now, timezone.utc)
    starts: list[datetime] = []
    t = _first_bucket(rng, at)
    while t <= at:
        starts.append(t)
        t += rng.step
    return starts


def since_text(rng: Range, starts: list[datetime]) -> str:
    """The first roll-up `at` the series reads (its span's text of the first bucket)."""
    return starts[0].strftime(_SPANS[rng.span][0])


def unit_at(rng: Range) -> int:
    """Where, 1-based, the unit the buckets count starts in a roll-up's `at` text."""
    return _SPANS[rng.span][1]


async def series(conn: aiosqlite.Connection, rng: Range, now: float | None = None) -> TimeSeries:
    """Per bucket of `rng` up to now and per (model, provider): the roll-ups added up in one
    GROUP BY over the span's rows of the range (a primary-key range read)."""
    starts = buckets(rng, now)
    # Per period and (model, provider) first, in the primary key's order (no sort: outcomes
    # and clients are added up as the rows stream by), then per bucket: a fraction of the
    # time of one GROUP BY of the bucket over every row.
    inner = ", ".join(f"sum({c}) AS s{i}" for i, c in enumerate(ROLLUP_SUMS))
    outer = ", ".join(f"sum(s{i})" for i in range(len(ROLLUP_SUMS)))
    # The bucket: the text before the counted unit, and that unit divided by the step.
    prefix, unit = f"substr(at, 1, {unit_at(rng) - 1})", f"CAST(substr(at, {unit_at(rng)}, 2) AS INTEGER) / ?"
    sql = (
        f"SELECT {prefix}, {unit}, model, provider, {outer} FROM ("
        f"SELECT at, model, provider, {inner} FROM rollups WHERE span = ? AND at >= ? GROUP BY at, model, provider"
        f") GROUP BY {prefix}, {unit}, model, provider"
    )
    async with conn.execute(sql, (rng.per_bucket, rng.span, since_text(rng, starts), rng.per_bucket)) as cur:
        rows = await cur.fetchall()
    return bucketed(rng, starts, rows)


def bucketed(rng: Range, starts: list[datetime], rows: Sequence[Sequence[Any]]) -> TimeSeries:
    """Rows of (text before the bucket's unit, bucket number, model, provider, *sums) as
    the series (on either database)."""
    fmt = _SPANS[rng.span][0]
    index = {s: i for i, s in enumerate(starts)}
    out = TimeSeries(rng, starts)
    totals = [Point([0.0] * len(ROLLUP_SUMS)) for _ in starts]
    for head, n, model, provider, *values in rows:
        when = datetime.strptime(f"{head}{n * rng.per_bucket:02d}", fmt).replace(tzinfo=timezone.utc)
        i = index.get(when)
        if i is None:  # a roll-up stamped ahead of this clock: not in the range drawn
            continue
        key = (model or None, provider or None)
        points = out.groups.setdefault(key, [None] * len(starts))
        points[i] = Point([v or 0 for v in values])
        totals[i].add(values)
    out.total = totals
    return out


async def facets(conn: aiosqlite.Connection) -> dict[str, list[str]]:
    """The models, providers, outcomes and clients the log has seen, each sorted: read from
    the daily roll-ups (a row per day and combination, not per request)."""
    async with conn.execute(FACETS) as cur:
        return faceted(await cur.fetchall())


FACETS = "SELECT DISTINCT model, provider, outcome, client FROM rollups WHERE span = 'd'"


def faceted(rows: Sequence[Sequence[Any]]) -> dict[str, list[str]]:
    """Rows of `FACETS` as each column's values, sorted."""
    out: dict[str, set[str]] = {"model": set(), "provider": set(), "outcome": set(), "client": set()}
    for row in rows:
        for name, value in zip(out, row):
            if value:
                out[name].add(value)
    return {k: sorted(v) for k, v in out.items()}

