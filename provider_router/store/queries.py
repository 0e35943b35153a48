"""The read side of the log: requests listed, searched and read back whole from the tree,
and the helpers the other readers share (session_reads.py, stats.py, retention.py): plain
async functions over an `aiosqlite.Connection` returning dicts and dataclasses, no
rendering, so the CLI and the admin HTTP API share them.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Protocol

import aiosqlite
import orjson

from ..as_chat import KIND_OF_PATH, reply_text, shown
from ..messages import content_text, said_text
from ..records import iso
from . import search


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class AmbiguousId(LookupError):
    """An id prefix matched more than one row; `candidates`: the first few of them (the
    message says when there are more than it shows)."""

    SHOWN = 5

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        shown = candidates[: self.SHOWN]
        more = ", ..." if len(candidates) > self.SHOWN else ""
        super().__init__(f"id prefix {prefix!r} is ambiguous: matches {', '.join(shown)}{more}")
        self.prefix = prefix
        self.candidates = shown


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


def glob_literal(text: str) -> str:
    """`text` with GLOB's special characters matched literally (GLOB has no ESCAPE clause)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


async def has_table(conn: aiosqlite.Connection, name: str) -> bool:
    """Whether `name` exists: a database from before a migration lacks its tables."""
    async with conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)) as cur:
        return await cur.fetchone() is not None


async def fetch_all(conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[dict[str, Any]]:
    async with conn.execute(sql, params) as cur:
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in await cur.fetchall()]


async def by_prefix(conn: aiosqlite.Connection, table: str, prefix: str) -> dict[str, Any] | None:
    # GLOB 'prefix*' on the primary key is a range scan, not a table scan.
    rows = await fetch_all(conn, f"SELECT * FROM {table} WHERE id GLOB ? ORDER BY id LIMIT ?", (glob_literal(prefix) + "*", AmbiguousId.SHOWN + 1))
    return named_by(prefix, rows)


def named_by(prefix: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row `prefix` names among `rows` (the first few whose id starts with it, in id
    order): the one whose id it is, else the only one; None for none; AmbiguousId."""
    exact = [r for r in rows if r["id"] == prefix]
    if exact:
        return exact[0]
    if len(rows) > 1:
        raise AmbiguousId(prefix, [r["id"] for r in rows])
    return rows[0] if rows else None


# -- requests --------------------------------------------------------------------------
@dataclass(slots=True)
class RequestFilter:
    """Which request rows to show. Every field is optional; set ones must all match.

    `model` may be a glob (`gpt-*`); `session` an id prefix; `query` free text searched in
    prompts and replies; `since` and `until` timestamps in the DB's format (see `cutoff()`):
    received at or after `since`, before `until`.
    """

    session: str | None = None
    model: str | None = None
    provider: str | None = None
    client: str | None = None
    status: int | None = None
    outcome: str | None = None
    query: str | None = None
    since: str | None = None
    until: str | None = None
    before: str | None = None  # only rows written before this request's: the next page's cursor

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause over `requests r` (always parameterised) and its parameters.
        Each filter has an index of its own, in write order, so a page of the newest rows
        that match any one of them is read from its index, not found by a scan."""
        clauses: list[str] = []
        params: list[Any] = []
        if self.session:
            clauses.append("r.session_id GLOB ?")
            params.append(glob_literal(self.session) + "*")
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
        if self.until:
            clauses.append("r.received_at < ?")
            params.append(self.until)
        if self.before:
            clauses.append("r.rowid < coalesce((SELECT rowid FROM requests WHERE id = ?), 0)")
            params.append(self.before)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# A request row with the text of its prompt and first reply (for listings).
_LISTED = (
    "SELECT r.rowid AS _rowid, r.*, p.body AS _prompt, a.body AS _reply FROM requests r "
    "LEFT JOIN messages p ON p.id = r.prompt_message LEFT JOIN messages a ON a.id = r.reply_message"
)


def _text_of(body: str | None) -> str | None:
    return None if body is None else said_text(orjson.loads(body))


def listed_row(row: dict[str, Any]) -> dict[str, Any]:
    """A listed request row (`_LISTED`'s columns, on either database) as the readers answer
    it: the texts of its prompt, reply and reasoning instead of the bodies."""
    row.pop("_rowid", None)
    row["prompt_text"] = _text_of(row.pop("_prompt"))
    reply = row.pop("_reply")
    row["response_text"] = _text_of(reply)
    if reply is None and row.get("response") and row.get("path") in KIND_OF_PATH:  # no reading (an older row, or none to read)
        row["response_text"] = reply_text(_json_or_text(row["response"]))
    m = orjson.loads(reply) if reply else {}
    row["reasoning_text"] = (m.get("reasoning_content") or m.get("reasoning")) if isinstance(m, dict) else None
    for col in ("attempts",):
        if isinstance(row.get(col), str):
            row[col] = orjson.loads(row[col])
    return row


async def _rowid_at(conn: aiosqlite.Connection, when: str) -> int:
    """About the first rowid received at or after `when`: rows are written in the order
    requests finish, so `received_at` rises with the rowid but for requests that overlapped
    (the callers allow a margin for those); a binary search."""
    # Two subqueries: SQLite reads a lone min() or max() from the rowid's ends, but not both.
    async with conn.execute("SELECT coalesce((SELECT min(rowid) FROM requests), 0), coalesce((SELECT max(rowid) FROM requests), 0)") as cur:
        lo, hi = await cur.fetchone()  # type: ignore[misc]
    while lo < hi:
        mid = (lo + hi) // 2
        async with conn.execute("SELECT received_at FROM requests WHERE rowid >= ? ORDER BY rowid LIMIT 1", (mid,)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] >= when:
            hi = mid
        else:
            lo = mid + 1
    return lo


async def _rowid_range(conn: aiosqlite.Connection, flt: RequestFilter, last: int) -> tuple[int, int | None]:
    """The rowids that can hold `flt`'s time range: (highest, lowest or None); rows outside
    it were received before `since` or at or after `until` (the row's own time still decides)."""
    since = max(0, await _rowid_at(conn, flt.since) - SINCE_MARGIN_ROWS) if flt.since else None
    if flt.until:
        last = min(last, await _rowid_at(conn, flt.until) + SINCE_MARGIN_ROWS)
    return last, since


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
    top, since = await _rowid_range(conn, flt, last)
    if limit > 0 and flt.model and _has_glob(flt.model):
        # Newest first from each model the glob matches (its index is in write order), then
        # merged: one ordered index range each, instead of sorting every row they match.
        rows = []
        for model in await _models_matching(conn, flt.model):
            rows += await _newest(conn, replace(flt, model=model), top, since, limit)
        rows = sorted(rows, key=lambda r: r["_rowid"], reverse=True)[:limit]
    else:
        rows = await _newest(conn, flt, top, since, limit)
    rows.reverse()
    return RequestPage([listed_row(r) for r in rows], last)


async def _newest(conn: aiosqlite.Connection, flt: RequestFilter, last: int, since: int | None, limit: int) -> list[dict[str, Any]]:
    match = fts_query(flt.query) if flt.query else None
    common = bool(match) and limit > 0 and await search.is_common(conn, match)  # type: ignore[arg-type]
    # A common word is matched by `search.newest` against the rows the other filters select.
    where, params = (replace(flt, query=None) if common else flt).where()
    where += (" AND " if where else " WHERE ") + "r.rowid <= ?"
    params.append(last)
    if since is not None:
        where += " AND r.rowid >= ?"
        params.append(since)
    if common:
        rowids = await search.newest(conn, match, where, params, limit)  # type: ignore[arg-type]
        if not rowids:
            return []
        where, params = f" WHERE r.rowid IN ({','.join('?' * len(rowids))})", list(rowids)
    sql = f"{_LISTED}{where} ORDER BY r.rowid DESC"
    if limit > 0:
        sql += " LIMIT ?"
        params.append(limit)
    return await fetch_all(conn, sql, params)


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


async def new_requests(conn: aiosqlite.Connection, flt: RequestFilter, after_rowid: int, limit: int = 0) -> RequestPage:
    """Matching rows written after `after_rowid`, in the order they were written; with
    `limit`, only the newest `limit` of them (a reader that fell behind skips the rest)."""
    where, params = flt.where()
    where += (" AND " if where else " WHERE ") + "r.rowid > ?"
    params.append(after_rowid)
    if limit > 0:
        rows = await fetch_all(conn, f"{_LISTED}{where} ORDER BY r.rowid DESC LIMIT ?", [*params, limit])
        rows.reverse()
    else:
        rows = await fetch_all(conn, f"{_LISTED}{where} ORDER BY r.rowid", params)
    last = rows[-1]["_rowid"] if rows else after_rowid
    return RequestPage([listed_row(r) for r in rows], last)


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


class TreeReader(Protocol):
    """What rebuilding a request needs of its database (SQLite here, PostgreSQL in pg/reads)."""

    async def blob(self, blob_id: int) -> str | None: ...
    async def body(self, message_id: int) -> str | None: ...
    async def path(self, tip: int) -> list[tuple[int, Any]]: ...


class _SqliteTree:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    async def blob(self, blob_id: int) -> str | None:
        return await _blob(self.conn, blob_id)

    async def body(self, message_id: int) -> str | None:
        async with self.conn.execute("SELECT body FROM messages WHERE id = ?", (message_id,)) as cur:
            found = await cur.fetchone()
        return None if found is None else found[0]

    async def path(self, tip: int) -> list[tuple[int, Any]]:
        return await message_path(self.conn, tip)


async def reconstruct(conn: aiosqlite.Connection, row: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """A request row's (request body, response, reply messages) from the tree."""
    return await rebuild(_SqliteTree(conn), row)


async def rebuild(tree: TreeReader, row: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """A request row's (request body, response, reply messages), read through `tree`."""
    request: Any = None
    if row.get("body_blob") is not None:
        request = _json_or_text(await tree.blob(row["body_blob"]))
    elif row.get("params") is not None:
        request = orjson.loads(row["params"])
        for field, blob_id in (orjson.loads(row["params_blobs"]) if row.get("params_blobs") else {}).items():
            request[field] = _json_or_text(await tree.blob(blob_id))
        messages = [m for _, m in await tree.path(row["tip_message"])] if row.get("tip_message") else []
        for i, m in (orjson.loads(row["overrides"]) if row.get("overrides") else {}).items():
            if int(i) < len(messages):
                messages[int(i)] = m
        request["messages"] = messages
    response = _json_or_text(row.get("response"))
    reply_ids = orjson.loads(row["replies"]) if row.get("replies") else ([row["reply_message"]] if row.get("reply_message") else [])
    replies = []
    for rid in reply_ids:
        body = await tree.body(rid) if rid is not None else None
        replies.append(orjson.loads(body) if body is not None else None)
    if row.get("body_blob") is None and isinstance(response, dict) and isinstance(response.get("choices"), list):
        # Each choice of a chat reply has a reply node, in order; a choice keeps its own
        # message where it differs from the node's body. (A request kept whole, in a blob,
        # keeps its whole response: its reply node is only a reading of it, `as_chat`.)
        for choice, m in zip([c for c in response["choices"] if isinstance(c, dict)], replies):
            if "message" not in choice and m is not None:
                choice["message"] = m
    return request, response, replies


async def get_request(conn: aiosqlite.Connection, id_prefix: str) -> dict[str, Any] | None:
    """One request by id or unique id prefix (AmbiguousId otherwise): its row, and its
    `request` and `response` as the client sent and got them, rebuilt from the tree."""
    row = await by_prefix(conn, "requests", id_prefix.strip().lower())
    if row is None:
        return None
    request, response, _ = await reconstruct(conn, row)
    return rebuilt_row(row, request, response)


def rebuilt_row(row: dict[str, Any], request: Any, response: Any) -> dict[str, Any]:
    """A request row as `get_request` answers it (on either database): the tree's internal
    columns left out, `request` and `response` as rebuilt, and the texts they hold."""
    for col in ("params", "params_blobs", "overrides", "body_blob", "response", "replies"):
        row.pop(col, None)
    if isinstance(row.get("attempts"), str):
        row["attempts"] = orjson.loads(row["attempts"])
    messages = shown(row.get("path"), request)[0] if isinstance(request, dict) else None
    users = [m for m in messages or () if isinstance(m, dict) and m.get("role") == "user"]
    row["prompt_text"] = content_text(users[-1].get("content")) if users else None
    choices = response.get("choices") if isinstance(response, dict) else None
    first = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    first = first if isinstance(first, dict) else None
    row["response_text"] = said_text(first) if first else reply_text(response)
    row["reasoning_text"] = (first.get("reasoning_content") or first.get("reasoning")) if first else None
    row["request"] = request
    row["response"] = response
    return row


async def session_requests(conn: aiosqlite.Connection, session_id: str) -> list[dict[str, Any]]:
    """The session's request rows in order: its conversation, turn by turn."""
    rows = await fetch_all(conn, f"{_LISTED} WHERE r.session_id = ? ORDER BY r.id", (session_id,))
    return [listed_row(r) for r in rows]


async def count_session_requests(conn: aiosqlite.Connection, session_id: str) -> int:
    """How many request rows name the session (exact id)."""
    async with conn.execute("SELECT count(*) FROM requests WHERE session_id = ?", (session_id,)) as cur:
        (n,) = await cur.fetchone()  # type: ignore[misc]
    return int(n)
