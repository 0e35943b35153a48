"""The read side of the log database (and the few offline maintenance writes): plain async
functions over an `aiosqlite.Connection` returning dicts and dataclasses, no rendering, so
the CLI and the admin HTTP API share them.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

import aiosqlite
import orjson

from ..replies import reply_text
from ..history import message_text
from ..messages import content_text
from ..records import iso
from .rows import BUCKETS_MS, NB, ROLLUP_SUMS


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


class _Tokenizer:
    """Text cut into terms exactly as the index cuts it: by SQLite's own unicode61
    tokenizer (its idea of a letter follows its Unicode tables, not Python's)."""

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        self._db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        self._lock = threading.Lock()

    def __call__(self, text: str) -> list[str]:
        with self._lock:
            self._db.execute("DELETE FROM t")
            self._db.execute("INSERT INTO t (rowid, x) VALUES (1, ?)", (text,))
            return [term for (term,) in self._db.execute("SELECT term FROM v ORDER BY offset")]


_tokens = _Tokenizer()


def fts_query(text: str) -> str | None:
    """User text as a safe FTS5 MATCH expression: every token of every word required, each
    quoted (which disarms the MATCH syntax: `"`, `-`, `OR`, `NEAR`, `col:`), so any text
    is a search for its words, never a syntax error. A trailing `*` stays a prefix search.
    The index keeps no positions (`detail=none`: a third of the size, and of the writer's
    time), so `foo-bar` finds messages with both `foo` and `bar`."""
    terms = []
    for word in text.split():
        prefix = len(word) > 1 and word.endswith("*")
        tokens = _tokens(word)
        terms += ['"' + t.replace('"', '""') + '"' for t in tokens]
        if prefix and tokens:
            terms[-1] += "*"
    return " ".join(terms) or None


def _glob_literal(text: str) -> str:
    """`text` with GLOB's special characters matched literally (GLOB has no ESCAPE clause)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


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
    client: str | None = None
    status: int | None = None
    outcome: str | None = None
    query: str | None = None
    since: str | None = None
    before: str | None = None  # only rows written before this request's: the next page's cursor

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause over `requests r` (always parameterised) and its parameters.
        Each filter has an index of its own, in write order, so a page of the newest rows
        that match any one of them is read from its index, not found by a scan."""
        clauses: list[str] = []
        params: list[Any] = []
        if self.session:
            clauses.append("r.session_id GLOB ?")
            params.append(_glob_literal(self.session) + "*")
        if self.model:
            clauses.append("r.model GLOB ?" if _has_glob(self.model) else "r.model = ?")
            params.append(self.model)
        for col in ("provider", "client", "status", "outcome"):
            value = getattr(self, col)
            if col == "client" and value == "anonymous":  # what sessions call a request with no client key
                clauses.append("(r.client = ? OR r.client IS NULL)")
                params.append(value)
            elif value is not None and value != "":
                clauses.append(f"r.{col} = ?")
                params.append(value)
        match = fts_query(self.query) if self.query else None
        if match:
            hits = "(SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)"
            clauses.append(f"(r.prompt_message IN {hits} OR r.reply_message IN {hits})")
            params += [match, match]
        if self.since:
            clauses.append("r.received_at >= ?")
            params.append(self.since)
        if self.before:
            clauses.append("r.rowid < coalesce((SELECT rowid FROM requests WHERE id = ?), 0)")
            params.append(self.before)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# A request row with the text of its prompt and first reply (for listings).
_LISTED = (
    "SELECT r.rowid AS _rowid, r.*, p.body AS _prompt, a.body AS _reply FROM requests r "
    "LEFT JOIN messages p ON p.id = r.prompt_message LEFT JOIN messages a ON a.id = r.reply_message"
)


_OTHER_ENDPOINTS = ("/v1/responses", "/v1/completions")


def _text_of(body: str | None) -> str | None:
    if body is None:
        return None
    m = orjson.loads(body)
    text = content_text(m.get("content")) if isinstance(m, dict) else ""
    if not text and isinstance(m, dict) and m.get("tool_calls"):
        calls = [tc.get("function", {}) for tc in m["tool_calls"] if isinstance(tc, dict)]
        text = " ".join(f"{fn.get('name')}({fn.get('arguments')})" for fn in calls if isinstance(fn, dict))
    return text


def _listed(row: dict[str, Any]) -> dict[str, Any]:
    row.pop("_rowid", None)
    row["prompt_text"] = _text_of(row.pop("_prompt"))
    reply = row.pop("_reply")
    row["response_text"] = _text_of(reply)
    if reply is None and row.get("response") and row.get("path") in _OTHER_ENDPOINTS:
        row["response_text"] = reply_text(_json_or_text(row["response"]))
    m = orjson.loads(reply) if reply else {}
    row["reasoning_text"] = (m.get("reasoning_content") or m.get("reasoning")) if isinstance(m, dict) else None
    for col in ("attempts",):
        if isinstance(row.get(col), str):
            row[col] = orjson.loads(row[col])
    return row


async def _since_rowid(conn: aiosqlite.Connection, since: str) -> int:
    """A rowid below which no row was received at or after `since`: rows are written in
    the order requests finish, so `received_at` rises with the rowid but for requests that
    overlapped; a binary search, less a margin for those."""
    # Two subqueries: SQLite reads a lone min() or max() from the rowid's ends, but not both.
    async with conn.execute("SELECT coalesce((SELECT min(rowid) FROM requests), 0), coalesce((SELECT max(rowid) FROM requests), 0)") as cur:
        lo, hi = await cur.fetchone()  # type: ignore[misc]
    while lo < hi:
        mid = (lo + hi) // 2
        async with conn.execute("SELECT received_at FROM requests WHERE rowid >= ? ORDER BY rowid LIMIT 1", (mid,)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] >= since:
            hi = mid
        else:
            lo = mid + 1
    return max(0, lo - SINCE_MARGIN_ROWS)


SINCE_MARGIN_ROWS = 10_000


@dataclass(slots=True)
class RequestPage:
    """Request rows oldest-first, and the high-water mark to poll for newer ones from."""

    rows: list[dict[str, Any]]
    last_rowid: int


async def recent_requests(conn: aiosqlite.Connection, flt: RequestFilter, limit: int = 20) -> RequestPage:
    """The newest `limit` matching rows (0: all) in the order they were written, oldest first."""
    # Snapshot the high-water mark first so a row written meanwhile is seen by the next
    # poll, not by both or neither.
    async with conn.execute("SELECT coalesce(max(rowid), 0) FROM requests") as cur:
        (last,) = await cur.fetchone()  # type: ignore[misc]
    since = await _since_rowid(conn, flt.since) if flt.since else None
    if limit > 0 and flt.model and _has_glob(flt.model):
        # Newest first from each model the glob matches (its index is in write order), then
        # merged: one ordered index range each, instead of sorting every row they match.
        rows = []
        for model in await _models_matching(conn, flt.model):
            rows += await _newest(conn, replace(flt, model=model), last, since, limit)
        rows = sorted(rows, key=lambda r: r["_rowid"], reverse=True)[:limit]
    else:
        rows = await _newest(conn, flt, last, since, limit)
    rows.reverse()
    return RequestPage([_listed(r) for r in rows], last)


async def _newest(conn: aiosqlite.Connection, flt: RequestFilter, last: int, since: int | None, limit: int) -> list[dict[str, Any]]:
    where, params = flt.where()
    where += (" AND " if where else " WHERE ") + "r.rowid <= ?"
    params.append(last)
    if since is not None:
        where += " AND r.rowid >= ?"
        params.append(since)
    sql = f"{_LISTED}{where} ORDER BY r.rowid DESC"
    if limit > 0:
        sql += " LIMIT ?"
        params.append(limit)
    return await _fetch(conn, sql, params)


async def _models_matching(conn: aiosqlite.Connection, glob: str) -> list[str]:
    """The distinct logged models a glob matches: one index seek per model (a loose index
    scan), however many rows each has."""
    prefix = re.split(r"[*?\[]", glob, maxsplit=1)[0]
    out: list[str] = []
    while len(out) < 1000:
        # The seek starts past the last model found (as one range with the glob's prefix:
        # SQLite would otherwise take the prefix's range and step over every row of it).
        sql = "SELECT model FROM requests WHERE model >= ? AND +model GLOB ?"  # `+`: no range of its own
        params: list[Any] = [max(prefix, out[-1] + "\x00") if out else prefix, glob]
        if prefix:  # the glob's own upper bound, which the `+` above gave up
            sql += " AND model < ?"
            params.append(prefix[:-1] + chr(ord(prefix[-1]) + 1))
        async with conn.execute(sql + " ORDER BY model LIMIT 1", params) as cur:
            row = await cur.fetchone()
        if row is None:
            break
        out.append(row[0])
    return out


async def new_requests(conn: aiosqlite.Connection, flt: RequestFilter, after_rowid: int) -> RequestPage:
    """Matching rows written after `after_rowid`, in the order they were written."""
    where, params = flt.where()
    where += (" AND " if where else " WHERE ") + "r.rowid > ?"
    params.append(after_rowid)
    rows = await _fetch(conn, f"{_LISTED}{where} ORDER BY r.rowid", params)
    last = rows[-1]["_rowid"] if rows else after_rowid
    return RequestPage([_listed(r) for r in rows], last)


# Each message as requests carry it: a reply's `resent` form where it has one.
_PATH = """
WITH RECURSIVE path(id, parent_id, body, depth) AS (
    SELECT id, parent_id, coalesce(resent, body), 0 FROM messages WHERE id = ?
    UNION ALL
    SELECT m.id, m.parent_id, coalesce(m.resent, m.body), p.depth + 1 FROM messages m JOIN path p ON m.id = p.parent_id
)
SELECT id, body FROM path ORDER BY depth DESC
"""


async def message_path(conn: aiosqlite.Connection, tip: int) -> list[tuple[int, Any]]:
    """The messages from the root of the tree down to `tip`, as requests carry them: (id, message)."""
    async with conn.execute(_PATH, (tip,)) as cur:
        return [(i, orjson.loads(body)) for i, body in await cur.fetchall()]


async def _blob(conn: aiosqlite.Connection, blob_id: int) -> str | None:
    async with conn.execute("SELECT data FROM blobs WHERE id = ?", (blob_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


def _json_or_text(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # a body that was not JSON, or one stored cut
        return text


async def reconstruct(conn: aiosqlite.Connection, row: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """A request row's (request body, response, reply messages) from the tree."""
    request: Any = None
    if row.get("body_blob") is not None:
        request = _json_or_text(await _blob(conn, row["body_blob"]))
    elif row.get("params") is not None:
        request = orjson.loads(row["params"])
        for field, blob_id in (orjson.loads(row["params_blobs"]) if row.get("params_blobs") else {}).items():
            request[field] = _json_or_text(await _blob(conn, blob_id))
        messages = [m for _, m in await message_path(conn, row["tip_message"])] if row.get("tip_message") else []
        for i, m in (orjson.loads(row["overrides"]) if row.get("overrides") else {}).items():
            if int(i) < len(messages):
                messages[int(i)] = m
        request["messages"] = messages
    response = _json_or_text(row.get("response"))
    reply_ids = orjson.loads(row["replies"]) if row.get("replies") else ([row["reply_message"]] if row.get("reply_message") else [])
    replies = []
    for rid in reply_ids:
        found = None
        if rid is not None:
            async with conn.execute("SELECT body FROM messages WHERE id = ?", (rid,)) as cur:
                found = await cur.fetchone()
        replies.append(orjson.loads(found[0]) if found else None)
    if isinstance(response, dict) and isinstance(response.get("choices"), list):
        # Each choice with a message has a reply node, in order; a choice keeps its own
        # message where it differs from the node's body.
        for choice, m in zip([c for c in response["choices"] if isinstance(c, dict)], replies):
            if "message" not in choice and m is not None:
                choice["message"] = m
    return request, response, replies


async def get_request(conn: aiosqlite.Connection, id_prefix: str) -> dict[str, Any] | None:
    """One request by id or unique id prefix (AmbiguousId otherwise): its row, and its
    `request` and `response` as the client sent and got them, rebuilt from the tree."""
    row = await _by_prefix(conn, "requests", id_prefix.strip().lower())
    if row is None:
        return None
    request, response, replies = await reconstruct(conn, row)
    for col in ("params", "params_blobs", "overrides", "body_blob", "response", "replies"):
        row.pop(col, None)
    if isinstance(row.get("attempts"), str):
        row["attempts"] = orjson.loads(row["attempts"])
    messages = request.get("messages") if isinstance(request, dict) else None
    users = [m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
    row["prompt_text"] = content_text(users[-1].get("content")) if users else None
    choices = response.get("choices") if isinstance(response, dict) else None
    first = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    first = first if isinstance(first, dict) else None
    row["response_text"] = _text_of(orjson.dumps(first).decode()) if first else reply_text(response)
    row["reasoning_text"] = (first.get("reasoning_content") or first.get("reasoning")) if first else None
    row["request"] = request
    row["response"] = response
    return row


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
    rows = await _fetch(conn, f"{_LISTED} WHERE r.session_id = ? ORDER BY r.id", (session_id,))
    return [_listed(r) for r in rows]


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "groups": [g.as_dict() for g in self.groups],
            "total": self.total.as_dict(),
            "sessions": self.sessions,
        }


def _periods(since: str | None) -> tuple[str, list[Any]]:
    """Roll-up rows that cover `[since, now]` once: the minutes up to `since`'s next whole
    hour, the hours up to its next whole day, then whole days (all days without `since`)."""
    if not since:
        return "span = 'd'", []
    start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    hour = start.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    day = start.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    fmt = "%Y-%m-%dT%H:%M"
    where = (
        "(span = 'm' AND at >= ? AND at < ?) OR (span = 'h' AND at >= ? AND at < ?) OR (span = 'd' AND at >= ?)"
    )
    return where, [since[:16], hour.strftime(fmt), hour.strftime(fmt)[:13], day.strftime(fmt)[:13], day.strftime(fmt)[:10]]


async def stats(conn: aiosqlite.Connection, since: str | None = None) -> Stats:
    """Per (model, provider) counts, token sums and latency percentiles since `since`
    (minute resolution), from the roll-ups: no request row is read, and a long range reads
    days, not minutes. An error is any request whose outcome is not `ok`."""
    sums = ", ".join(f"sum({c})" for c in ROLLUP_SUMS)
    where, params = _periods(since)
    sql = f"SELECT model, provider, {sums} FROM rollups WHERE {where} GROUP BY model, provider"
    groups: list[GroupStats] = []
    total = GroupStats(None, None)
    async with conn.execute(sql, params) as cur:
        for row in await cur.fetchall():
            g = GroupStats(row[0] or None, row[1] or None)
            g.add(row[2:])
            total.add(row[2:])
            g.finish()
            groups.append(g)
    total.finish()
    groups.sort(key=lambda g: (-g.requests, g.model or "", g.provider or ""))
    return Stats(groups, total, await session_counts(conn, since), since)


# -- maintenance -----------------------------------------------------------------------
@dataclass(slots=True)
class PruneResult:
    cutoff: str
    requests: int = 0
    sessions: int = 0
    messages: int = 0
    blobs: int = 0


async def _one_batch(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...]) -> int:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        cur = await conn.execute(sql, params)
        n = cur.rowcount
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return n


async def _referenced(conn: aiosqlite.Connection, mid: int) -> bool:
    for sql in (
        "SELECT 1 FROM messages WHERE parent_id = ? LIMIT 1",
        "SELECT 1 FROM requests WHERE tip_message = ? LIMIT 1",
        "SELECT 1 FROM requests WHERE reply_message = ? LIMIT 1",
        "SELECT 1 FROM requests WHERE prompt_message = ? LIMIT 1",
        # The replies of choices after the first (n > 1): few rows, behind a partial index.
        "SELECT 1 FROM requests WHERE replies IS NOT NULL AND ?1 IN (SELECT value FROM json_each(replies)) LIMIT 1",
        "SELECT 1 FROM turns WHERE message_hash = (SELECT hash FROM messages WHERE id = ?) LIMIT 1",
    ):
        async with conn.execute(sql, (mid,)) as cur:
            if await cur.fetchone() is not None:
                return True
    return False


async def _prune_batch(conn: aiosqlite.Connection, older_than: str, batch: int, result: PruneResult) -> int:
    """Delete up to `batch` requests received before `older_than`, then the messages and
    blobs only they used, in one transaction; returns how many requests."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        rows = await _fetch(
            conn,
            "SELECT rowid, tip_message, prompt_message, reply_message, replies, params_blobs, body_blob "
            "FROM requests WHERE received_at < ? ORDER BY rowid LIMIT ?",
            (older_than, batch),
        )
        if not rows:
            await conn.commit()
            return 0
        await conn.executemany("DELETE FROM requests WHERE rowid = ?", [(r["rowid"],) for r in rows])
        blobs: dict[int, int] = {}
        nodes: set[int] = set()
        for r in rows:
            nodes.update(x for x in (r["tip_message"], r["prompt_message"], r["reply_message"]) if x)
            nodes.update(x for x in (orjson.loads(r["replies"]) if r["replies"] else ()) if x)
            ids = list(orjson.loads(r["params_blobs"]).values()) if r["params_blobs"] else []
            for b in ids + ([r["body_blob"]] if r["body_blob"] else []):
                blobs[b] = blobs.get(b, 0) + 1
        await conn.executemany("UPDATE blobs SET refs = refs - ? WHERE id = ?", [(n, b) for b, n in blobs.items()])
        cur = await conn.executemany("DELETE FROM blobs WHERE id = ? AND refs <= 0", [(b,) for b in blobs])
        result.blobs += max(cur.rowcount, 0)
        # Walk up from each node the deleted rows used: a node nothing refers to any more
        # (no request, no child, no turn) goes, and then its parent is looked at.
        todo = sorted(nodes, reverse=True)
        while todo:
            mid = todo.pop()
            if await _referenced(conn, mid):
                continue
            async with conn.execute("SELECT parent_id, body FROM messages WHERE id = ?", (mid,)) as c:
                found = await c.fetchone()
            if found is None:
                continue
            await conn.execute("DELETE FROM messages WHERE id = ?", (mid,))
            await conn.execute(
                "INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', ?, ?)",
                (mid, message_text(orjson.loads(found[1]))),
            )
            result.messages += 1
            if found[0] is not None:
                todo.append(found[0])
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise
    return len(rows)


async def prune(
    conn: aiosqlite.Connection,
    older_than: str,
    *,
    batch: int = 2000,
    pause: float = 0.05,
    progress: Callable[[str, int], None] | None = None,
) -> PruneResult:
    """Delete requests received before `older_than` (and the messages and blobs nothing
    else uses), and expired sessions last used before it (their turns by cascade; the
    connection needs `PRAGMA foreign_keys=ON`). Bounded batches, one short transaction
    each: a running daemon's writer waits at most one batch, never the whole prune."""
    result = PruneResult(older_than)
    while True:
        n = await _prune_batch(conn, older_than, batch, result)
        result.requests += n
        if progress is not None and n:
            progress("requests", result.requests)
        if n < batch:
            break
        await asyncio.sleep(pause)  # a gap, so a writer sleeping in its busy handler gets the lock
    if await has_table(conn, "sessions"):
        while True:
            n = await _one_batch(
                conn,
                "DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions "
                "WHERE state = 'expired' AND last_accessed_at < ? LIMIT ?)",
                (older_than, batch),
            )
            result.sessions += n
            if progress is not None and n:
                progress("sessions", result.sessions)
            if n < batch:
                break
            await asyncio.sleep(pause)
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
