"""The read side of the log database (and the few offline maintenance writes): plain async
functions over an `aiosqlite.Connection` returning dicts and dataclasses, no rendering, so
the CLI and the admin HTTP API share them.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import aiosqlite
import orjson

from .records import iso

# Columns holding JSON text, parsed back for `--json` / the admin API.
JSON_COLUMNS = ("request_body", "response_body", "attempts")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AmbiguousId(LookupError):
    """An id prefix matched more than one row; `candidates` lists some of them."""

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        super().__init__(f"id prefix {prefix!r} is ambiguous: matches {', '.join(candidates)}, ...")
        self.prefix = prefix
        self.candidates = candidates


# -- small helpers ---------------------------------------------------------------------
def cutoff(spec: str, now: float | None = None) -> str:
    """`1h`, `30m`, `2d`, `45s`, `1w` ago, or an ISO date/datetime, as the DB's timestamp text.

    A date or datetime without a zone is local time (what the user sees in the tables).
    Raises ValueError on anything else.
    """
    now = time.time() if now is None else now
    m = _DURATION_RE.match(spec)
    if m:
        return iso(now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])
    try:
        when = datetime.fromisoformat(spec.strip())
    except ValueError:
        raise ValueError(f"not a duration (30m, 1h, 2d) or an ISO date/time: {spec!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()  # naive: local time
    # Formatted from the datetime itself, not a float timestamp, so an exact value pasted
    # from the log (`2026-11-22T03:04:05.123Z`) round-trips to the same text.
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def fts_query(text: str) -> str | None:
    """User text as a safe FTS5 MATCH expression: every word a quoted phrase, all required.

    Quoting disarms the MATCH syntax (`"`, `-`, `OR`, `NEAR`, `col:`), so any text is a
    search for its words, never a syntax error. A trailing `*` stays a prefix search.
    """
    terms = []
    for word in text.split():
        prefix = len(word) > 1 and word.endswith("*")
        word = word.rstrip("*") if prefix else word
        quoted = '"' + word.replace('"', '""') + '"'
        terms.append(quoted + ("*" if prefix else ""))
    return " ".join(terms) or None


def _glob_literal(text: str) -> str:
    """`text` with GLOB's special characters matched literally (GLOB has no ESCAPE clause)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _parse_json_columns(row: dict[str, Any]) -> dict[str, Any]:
    for col in JSON_COLUMNS:
        value = row.get(col)
        if isinstance(value, str):
            try:
                row[col] = orjson.loads(value)
            except orjson.JSONDecodeError:  # truncated bodies stay text, with their marker
                pass
    return row


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def has_table(conn: aiosqlite.Connection, name: str) -> bool:
    """Whether `name` exists: a database from before a migration lacks its tables."""
    async with conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)) as cur:
        return await cur.fetchone() is not None


async def _fetch(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
    async with conn.execute(sql, params) as cur:
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in await cur.fetchall()]


async def _by_prefix(conn: aiosqlite.Connection, table: str, prefix: str) -> dict[str, Any] | None:
    # GLOB 'prefix*' on the primary key is a range scan, not a table scan.
    rows = await _fetch(conn, f"SELECT * FROM {table} WHERE id GLOB ? ORDER BY id LIMIT 5", (_glob_literal(prefix) + "*",))
    if not rows:
        return None
    exact = [r for r in rows if r["id"] == prefix]
    if exact:
        return exact[0]
    if len(rows) > 1:
        raise AmbiguousId(prefix, [r["id"] for r in rows])
    return rows[0]


# -- requests --------------------------------------------------------------------------
@dataclass(slots=True)
class RequestFilter:
    """Which request rows to show. Every field is optional; set ones must all match.

    `model` may be a glob (`gpt-*`); `session` an id prefix; `query` free text searched in
    prompts and replies; `since` a timestamp in the DB's format (see `cutoff()`).
    """

    session: str | None = None
    model: str | None = None
    provider: str | None = None
    status: int | None = None
    outcome: str | None = None
    query: str | None = None
    since: str | None = None
    before: str | None = None  # only ids below this one: the cursor of the next page

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause (always parameterised) and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        if self.session:
            clauses.append("substr(session_id, 1, ?) = ?")
            params += [len(self.session), self.session]
        if self.model:
            clauses.append("model GLOB ?" if _has_glob(self.model) else "model = ?")
            params.append(self.model)
        if self.provider:
            clauses.append("provider = ?")
            params.append(self.provider)
        if self.status is not None:
            clauses.append("status = ?")
            params.append(self.status)
        if self.outcome:
            clauses.append("outcome = ?")
            params.append(self.outcome)
        match = fts_query(self.query) if self.query else None
        if match:
            clauses.append("rowid IN (SELECT rowid FROM requests_fts WHERE requests_fts MATCH ?)")
            params.append(match)
        if self.since:
            clauses.append("received_at >= ?")
            params.append(self.since)
        if self.before:
            clauses.append("id < ?")
            params.append(self.before)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


@dataclass(slots=True)
class RequestPage:
    """Request rows oldest-first, and the high-water mark to poll for newer ones from."""

    rows: list[dict[str, Any]]
    last_rowid: int


async def recent_requests(conn: aiosqlite.Connection, flt: RequestFilter, limit: int = 20) -> RequestPage:
    """The newest `limit` matching rows (0: all), oldest first, with every column."""
    # Snapshot the high-water mark first so a row written meanwhile is seen by the next
    # poll, not by both or neither.
    async with conn.execute("SELECT coalesce(max(rowid), 0) FROM requests") as cur:
        (last,) = await cur.fetchone()  # type: ignore[misc]
    where, params = flt.where()
    where += (" AND " if where else " WHERE ") + "rowid <= ?"
    params.append(last)
    sql = f"SELECT * FROM requests{where} ORDER BY id DESC"
    if limit > 0:
        sql += " LIMIT ?"
        params.append(limit)
    rows = await _fetch(conn, sql, params)
    rows.reverse()
    return RequestPage([_parse_json_columns(r) for r in rows], last)


async def new_requests(conn: aiosqlite.Connection, flt: RequestFilter, after_rowid: int) -> RequestPage:
    """Matching rows written after `after_rowid`, in the order they were written.

    By rowid, not id: ids are taken when a request starts, rows are written when it ends,
    so a long stream lands after shorter requests that started later.
    """
    where, params = flt.where()
    where += (" AND " if where else " WHERE ") + "rowid > ?"
    params.append(after_rowid)
    rows = await _fetch(conn, f"SELECT rowid AS _rowid, * FROM requests{where} ORDER BY rowid", params)
    last = rows[-1]["_rowid"] if rows else after_rowid
    for r in rows:
        del r["_rowid"]
    return RequestPage([_parse_json_columns(r) for r in rows], last)


async def get_request(conn: aiosqlite.Connection, id_prefix: str) -> dict[str, Any] | None:
    """One request by id or unique id prefix (AmbiguousId otherwise), every column parsed."""
    row = await _by_prefix(conn, "requests", id_prefix.strip().lower())
    return None if row is None else _parse_json_columns(row)


# -- sessions --------------------------------------------------------------------------
async def list_sessions(
    conn: aiosqlite.Connection,
    *,
    active_only: bool = False,
    state: str | None = None,
    limit: int = 20,
    offset: int = 0,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """The `limit` most recently used sessions (0: all) after skipping `offset`, least
    recent first unless `newest_first`. `state` filters on active / expired."""
    if not await has_table(conn, "sessions"):
        return []
    state = "active" if active_only else state
    sql = "SELECT * FROM sessions"
    params: list[Any] = []
    if state:
        sql += " WHERE state = ?"
        params.append(state)
    sql += " ORDER BY last_accessed_at DESC, id DESC"
    if limit > 0 or offset:
        sql += " LIMIT ? OFFSET ?"
        params += [limit if limit > 0 else -1, offset]
    rows = await _fetch(conn, sql, params)
    if not newest_first:
        rows.reverse()
    return [_parse_metadata(r) for r in rows]


def _parse_metadata(row: dict[str, Any]) -> dict[str, Any]:
    if isinstance(row.get("metadata"), str):
        try:
            row["metadata"] = orjson.loads(row["metadata"])
        except orjson.JSONDecodeError:
            pass
    return row


async def get_session(conn: aiosqlite.Connection, id_prefix: str) -> dict[str, Any] | None:
    """One session by id or unique prefix (AmbiguousId otherwise), with its turn count."""
    if not await has_table(conn, "sessions"):
        return None
    row = await _by_prefix(conn, "sessions", id_prefix.strip())
    if row is None:
        return None
    async with conn.execute("SELECT count(*) FROM turns WHERE session_id = ?", (row["id"],)) as cur:
        (row["turn_rows"],) = await cur.fetchone()  # type: ignore[misc]
    return _parse_metadata(row)


async def session_requests(conn: aiosqlite.Connection, session_id: str) -> list[dict[str, Any]]:
    """The session's request rows in order: its conversation, turn by turn."""
    rows = await _fetch(conn, "SELECT * FROM requests WHERE session_id = ? ORDER BY id", (session_id,))
    return [_parse_json_columns(r) for r in rows]


async def count_session_requests(conn: aiosqlite.Connection, session_id: str) -> int:
    """How many request rows name the session (exact id)."""
    async with conn.execute("SELECT count(*) FROM requests WHERE session_id = ?", (session_id,)) as cur:
        (n,) = await cur.fetchone()  # type: ignore[misc]
    return int(n)


@dataclass(slots=True)
class DeletedSession:
    id: str
    turns: int
    requests_kept: int


async def delete_session(conn: aiosqlite.Connection, session_id: str) -> DeletedSession | None:
    """Delete one session (exact id) and, by cascade, its turns; its request rows stay.

    The connection must have `PRAGMA foreign_keys=ON` for the cascade.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        async with conn.execute("SELECT count(*) FROM turns WHERE session_id = ?", (session_id,)) as cur:
            (turns,) = await cur.fetchone()  # type: ignore[misc]
        kept = await count_session_requests(conn, session_id)
        cur = await conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        deleted = cur.rowcount
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return DeletedSession(session_id, turns, kept) if deleted else None


# Active sessions whose time has run out (at `expires_at` itself too, as the daemon counts
# it) become expired; `metadata.ended` says why, as when the daemon ends one itself.
EXPIRE_SESSIONS = (
    "UPDATE sessions SET state = 'expired', metadata = json_set(coalesce(metadata, '{}'), '$.ended', 'expired') "
    "WHERE state = 'active' AND expires_at <= ?"
)


async def expire_sessions(conn: aiosqlite.Connection, now: str | None = None) -> int:
    """Mark active sessions whose `expires_at` is past as expired; return how many."""
    if not await has_table(conn, "sessions"):
        return 0
    cur = await conn.execute(EXPIRE_SESSIONS, (now or iso(time.time()),))
    await conn.commit()
    return cur.rowcount


async def session_counts(conn: aiosqlite.Connection, since: str | None = None) -> dict[str, int]:
    """Sessions by state (`active`, `expired`, `total`); with `since`, only those used since."""
    out = {"active": 0, "expired": 0, "total": 0}
    if not await has_table(conn, "sessions"):
        return out
    sql = "SELECT state, count(*) FROM sessions"
    params: list[Any] = []
    if since:
        sql += " WHERE last_accessed_at >= ?"
        params.append(since)
    async with conn.execute(sql + " GROUP BY state", params) as cur:
        for state, n in await cur.fetchall():
            out[state] = out.get(state, 0) + n
            out["total"] += n
    return out


# -- stats -----------------------------------------------------------------------------
@dataclass(slots=True)
class GroupStats:
    """Request statistics of one (model, provider); latencies in milliseconds."""

    model: str | None
    provider: str | None
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttfb_p50_ms: float | None = None
    ttfb_p95_ms: float | None = None
    duration_p50_ms: float | None = None
    duration_p95_ms: float | None = None
    _ttfb: list[float] = field(default_factory=list, repr=False)
    _duration: list[float] = field(default_factory=list, repr=False)

    def add(self, row: Any) -> None:
        self.requests += 1
        self.errors += row["outcome"] != "ok"
        self.prompt_tokens += row["prompt_tokens"] or 0
        self.completion_tokens += row["completion_tokens"] or 0
        if row["ttfb_ms"] is not None:
            self._ttfb.append(row["ttfb_ms"])
        if row["duration_ms"] is not None:
            self._duration.append(row["duration_ms"])

    def finish(self) -> None:
        self._ttfb.sort()
        self._duration.sort()
        self.ttfb_p50_ms, self.ttfb_p95_ms = percentile(self._ttfb, 0.5), percentile(self._ttfb, 0.95)
        self.duration_p50_ms = percentile(self._duration, 0.5)
        self.duration_p95_ms = percentile(self._duration, 0.95)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}


@dataclass(slots=True)
class Stats:
    groups: list[GroupStats]
    total: GroupStats
    sessions: dict[str, int]
    since: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "groups": [g.as_dict() for g in self.groups],
            "total": self.total.as_dict(),
            "sessions": self.sessions,
        }


async def stats(conn: aiosqlite.Connection, since: str | None = None) -> Stats:
    """Per (model, provider) counts, token sums and p50/p95 latencies, plus session counts.

    An error is any request whose outcome is not `ok`.
    """
    sql = "SELECT model, provider, outcome, prompt_tokens, completion_tokens, ttfb_ms, duration_ms FROM requests"
    params: list[Any] = []
    if since:
        sql += " WHERE received_at >= ?"
        params.append(since)
    groups: dict[tuple[str | None, str | None], GroupStats] = {}
    total = GroupStats(None, None)
    async with conn.execute(sql, params) as cur:
        async for row in cur:
            key = (row["model"], row["provider"])
            if key not in groups:
                groups[key] = GroupStats(*key)
            groups[key].add(row)
            total.add(row)
    for g in (*groups.values(), total):
        g.finish()
    ordered = sorted(groups.values(), key=lambda g: (-g.requests, g.model or "", g.provider or ""))
    return Stats(ordered, total, await session_counts(conn, since), since)


# -- maintenance -----------------------------------------------------------------------
@dataclass(slots=True)
class PruneResult:
    cutoff: str
    requests: int = 0
    sessions: int = 0


async def _delete_in_batches(
    conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...], batch: int, pause: float,
    progress: Callable[[int], None] | None,
) -> int:
    total = 0
    while True:
        # One short transaction per batch: a running daemon's writer waits at most one
        # batch (its busy_timeout covers it), never the whole prune.
        await conn.execute("BEGIN IMMEDIATE")
        try:
            cur = await conn.execute(sql, (*params, batch))
            n = cur.rowcount
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
        total += n
        if progress is not None and n:
            progress(total)
        if n < batch:
            return total
        # Leave a gap so a writer sleeping in its busy handler gets the lock.
        await asyncio.sleep(pause)


async def prune(
    conn: aiosqlite.Connection,
    older_than: str,
    *,
    batch: int = 5000,
    pause: float = 0.05,
    progress: Callable[[str, int], None] | None = None,
) -> PruneResult:
    """Delete requests received before `older_than`, and expired sessions last used before it.

    FTS rows follow through the delete trigger; turns follow their session by cascade
    (the connection needs `PRAGMA foreign_keys=ON`).
    """
    result = PruneResult(older_than)
    result.requests = await _delete_in_batches(
        conn,
        "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests WHERE received_at < ? LIMIT ?)",
        (older_than,), batch, pause,
        (lambda n: progress("requests", n)) if progress else None,
    )
    if await has_table(conn, "sessions"):
        result.sessions = await _delete_in_batches(
            conn,
            "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions "
            "WHERE state = 'expired' AND last_accessed_at < ? LIMIT ?)",
            (older_than,), batch, pause,
            (lambda n: progress("sessions", n)) if progress else None,
        )
    return result


async def vacuum(conn: aiosqlite.Connection) -> tuple[int, int, int]:
    """VACUUM, then move the WAL into the main file and truncate it.

    Returns `wal_checkpoint`'s (busy, wal pages, pages checkpointed); busy=1 means a reader
    (the daemon) kept part of the WAL alive.
    """
    await conn.execute("VACUUM")
    async with conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
        busy, log, done = await cur.fetchone()  # type: ignore[misc]
    return busy, log, done
