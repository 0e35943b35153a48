"""Request statistics over any range, from the roll-ups (no request row is read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Sequence

import aiosqlite

from .rows import BUCKETS_MS, NB, ROLLUP_SUMS
from .session_reads import lifecycle, session_counts


def bucket_percentile(counts: list[int], q: float) -> float | None:
    """The `q` quantile of a latency histogram of the roll-ups' buckets (`rows.BUCKETS_MS`),
    interpolated linearly within its bucket; None when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lo = BUCKETS_MS[i - 1] if i > 0 else 0.0
            hi = BUCKETS_MS[i] if i < len(BUCKETS_MS) else BUCKETS_MS[-1] * 2
            return round(lo + (hi - lo) * max(0.0, rank - seen) / n, 3)
        seen += n
    return float(BUCKETS_MS[-1] * 2)


@dataclass(slots=True)
class GroupStats:
    """Request statistics of one (model, provider); latencies in milliseconds, percentiles
    estimated from the roll-ups' histogram buckets."""

    model: str | None
    provider: str | None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttfb_p50_ms: float | None = None
    ttfb_p95_ms: float | None = None
    duration_p50_ms: float | None = None
    duration_p95_ms: float | None = None
    ttfb_mean_ms: float | None = None
    duration_mean_ms: float | None = None
    _sums: list[float] = field(default_factory=lambda: [0.0] * len(ROLLUP_SUMS), repr=False)

    def add(self, sums: Sequence[float]) -> None:
        self._sums = [a + (b or 0) for a, b in zip(self._sums, sums)]

    def finish(self) -> None:
        v = self._sums
        self.requests, self.errors = int(v[0]), int(v[1])
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = int(v[2]), int(v[3]), int(v[4])
        ttfb = [int(x) for x in v[8 : 8 + NB]]
        dur = [int(x) for x in v[8 + NB : 8 + 2 * NB]]
        self.ttfb_p50_ms, self.ttfb_p95_ms = bucket_percentile(ttfb, 0.5), bucket_percentile(ttfb, 0.95)
        self.duration_p50_ms, self.duration_p95_ms = bucket_percentile(dur, 0.5), bucket_percentile(dur, 0.95)
        self.ttfb_mean_ms = round(v[6] / v[5], 3) if v[5] else None
        self.duration_mean_ms = round(v[7] / sum(dur), 3) if sum(dur) else None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}


@dataclass(slots=True)
class Stats:
    groups: list[GroupStats]
    total: GroupStats
    sessions: dict[str, int]
    since: str | None = None
    # The sessions' lifecycle over the database's life (not `since`): session_reads.lifecycle.
    lifecycle: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "groups": [g.as_dict() for g in self.groups],
            "total": self.total.as_dict(),
            "sessions": self.sessions,
            "session_lifecycle": {k: v for k, v in self.lifecycle.items() if k != "by_client"},
            "sessions_by_client": self.lifecycle.get("by_client", {}),
        }


def periods(since: str | None, mark: str = "?") -> tuple[str, list[Any]]:
    """Roll-up rows that cover `[since, now]` once: the minutes up to `since`'s next whole
    hour, the hours up to its next whole day, then whole days (all days without `since`).
    `mark`: the driver's parameter marker (portable SQL otherwise)."""
    if not since:
        return "span = 'd'", []
    start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    hour = start.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    day = start.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    fmt = "%Y-%m-%dT%H:%M"
    where = (
        "(span = 'm' AND at >= ? AND at < ?) OR (span = 'h' AND at >= ? AND at < ?) OR (span = 'd' AND at >= ?)"
    ).replace("?", mark)
    return where, [since[:16], hour.strftime(fmt), hour.strftime(fmt)[:13], day.strftime(fmt)[:13], day.strftime(fmt)[:10]]


async def stats(conn: aiosqlite.Connection, since: str | None = None) -> Stats:
    """Per (model, provider) counts, token sums and latency percentiles since `since`
    (minute resolution), from the roll-ups: no request row is read, and a long range reads
    days, not minutes. An error is any request whose outcome is not `ok`."""
    sums = ", ".join(f"sum({c})" for c in ROLLUP_SUMS)
    where, params = periods(since)
    sql = f"SELECT model, provider, {sums} FROM rollups WHERE {where} GROUP BY model, provider"
    async with conn.execute(sql, params) as cur:
        groups, total = grouped(await cur.fetchall())
    return Stats(groups, total, await session_counts(conn, since), since, await lifecycle(conn))


def grouped(rows: Sequence[Sequence[Any]]) -> tuple[list[GroupStats], GroupStats]:
    """Rows of (model, provider, *sums of `ROLLUP_SUMS`) as each group's figures, the
    busiest first, and their total (on either database)."""
    groups: list[GroupStats] = []
    total = GroupStats(None, None)
    for row in rows:
        g = GroupStats(row[0] or None, row[1] or None)
        g.add(row[2:])
        total.add(row[2:])
        g.finish()
        groups.append(g)
    total.finish()
    groups.sort(key=lambda g: (-g.requests, g.model or "", g.provider or ""))
    return groups, total
