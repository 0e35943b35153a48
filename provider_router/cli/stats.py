"""`stats`: requests, errors, tokens and latency per (model, provider), and sessions by
state, from the per-minute roll-ups written with the log.
"""

from __future__ import annotations

from typing import Any

import click

from ..store import stats as stats_q
from ..store.reads import LogReads
from ..store.rows import BUCKETS_MS
from .common import SINCE_HELP, Settings, When, examples, json_option, with_settings
from .database import run_location
from .output import full_time, json_doc, ms, table

HEADERS = ("MODEL", "PROVIDER", "REQS", "ERRORS", "TOK IN", "TOK OUT", "CACHED", "TTFB p50", "TTFB p95", "DUR p50", "DUR p95")


@click.command(
    "stats",
    short_help="request counts, errors, tokens and latency per model",
    help="Per (model, provider): requests, errors (outcome other than ok), tokens in, out and "
    "cached, p50/p95 time to first byte and total duration; then session counts by state and the "
    "sessions' lifecycle (created, expired, evicted, deleted since the database began; the oldest and "
    "newest active session's age; average duration and requests per session; sessions per client). Read "
    "from per-minute roll-ups written with the log, so it answers fast for any range (--since has "
    "minute resolution) and the percentiles are estimates from latency histogram buckets; --json "
    "adds the exact means.",
    epilog=examples("provider-router stats", "provider-router stats --since 1d --json"),
)
@click.option("--since", type=When(), metavar="WHEN", help=SINCE_HELP + " (sessions: used since then)")
@json_option("one JSON document")
@with_settings
def stats(settings: Settings, since: str | None) -> None:
    async def body(reads: LogReads) -> None:
        st = await reads.stats(since)
        click.echo(json_doc(st.as_dict()) if settings.json else "\n".join(_render(st, since)))

    run_location(settings, body)


def _pct(value: float | None) -> str:
    """A percentile estimated from the roll-ups' histogram: within the first bucket it is
    only known to be below that bucket's bound (interpolating would print a made-up 2.5)."""
    return f"<{BUCKETS_MS[0]}" if value is not None and value <= BUCKETS_MS[0] else ms(value)


def _cells(g: stats_q.GroupStats, model: str, provider: str) -> list[str]:
    return [
        model, provider, str(g.requests), str(g.errors), str(g.prompt_tokens), str(g.completion_tokens),
        str(g.cached_tokens), _pct(g.ttfb_p50_ms), _pct(g.ttfb_p95_ms), _pct(g.duration_p50_ms), _pct(g.duration_p95_ms),
    ]


def _render(st: stats_q.Stats, since: str | None) -> list[str]:
    rows = [_cells(g, g.model or "-", g.provider or "-") for g in st.groups]
    rows.append(_cells(st.total, "TOTAL", ""))
    s = st.sessions
    return [
        *([f"since {full_time(since)}"] if since else []),
        *table(HEADERS, rows, right=range(2, 11)),
        f"\nsessions{' used since then' if since else ''}: {s['active']} active, {s['expired']} expired, {s['total']} total",
        *_lifecycle(st.lifecycle),
        # The roll-ups keep latencies as histogram buckets, so percentiles are estimates.
        "latencies in ms; percentiles estimated from histogram buckets (--json has means too)",
    ]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _lifecycle(f: dict[str, Any]) -> list[str]:
    per = f["requests_per_session"]
    lines = [
        f"lifecycle (since the database began): {f['created']} created, {f['expired']} expired, {f['evicted']} evicted, {f['deleted']} deleted",
        f"active now: oldest {_age(f['oldest_age_seconds'])}, newest {_age(f['newest_age_seconds'])}; "
        f"average duration {_age(f['average_duration_seconds'])}, {'-' if per is None else f'{per:.1f}'} requests per session",
    ]
    clients = f["by_client"]
    if clients:
        lines.append("by client (active now/created): " + ", ".join(f"{c or '-'} {n['active']}/{n['created']}" for c, n in clients.items()))
    return lines
