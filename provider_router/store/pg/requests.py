"""Requests read on PostgreSQL: listed with the filters of `queries.RequestFilter`,
searched through `message_terms`, followed by a cursor, read back whole from the tree; as
queries.py does on SQLite, with its row shaping.

Requests are partitioned by day on `received_at`, so every read names a `received_at`
range where it can (an id's first 12 hex digits are its milliseconds: `records.new_id`);
rows are ordered by `(received_at, id)` where SQLite orders by rowid (write order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from ..page import START, Page
from ..queries import RequestFilter, listed_row, rebuild, rebuilt_row
from ..search import COMMON
from .lookup import by_prefix, fetch_rows, iso, like, received_at, times

Conn = psycopg.AsyncConnection[Any]

# Each message as requests carry it: a reply's `resent` form where it has one.
_PATH = """
WITH RECURSIVE path(id, parent_id, body, depth) AS (
    SELECT id, parent_id, coalesce(resent, body), 0 FROM messages WHERE id = %s
    UNION ALL
    SELECT m.id, m.parent_id, coalesce(m.resent, m.body), p.depth + 1 FROM messages m JOIN path p ON m.id = p.parent_id
)
SELECT id, body FROM path ORDER BY depth DESC
"""

_NEWEST = "ORDER BY r.received_at DESC, r.id DESC"
_OLDEST = "ORDER BY r.received_at, r.id"


class _PgTree:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def _one(self, sql: str, value: Any) -> Any:
        row = await (await self.conn.execute(sql, (value,))).fetchone()
        return None if row is None else row[0]

    async def blob(self, blob_id: int) -> str | None:
        return await self._one("SELECT data FROM blobs WHERE id = %s", blob_id)  # type: ignore[no-any-return]

    async def body(self, message_id: int) -> str | None:
        return await self._one("SELECT body FROM messages WHERE id = %s", message_id)  # type: ignore[no-any-return]

    async def path(self, tip: int) -> list[tuple[int, Any]]:
        return await message_path(self.conn, tip)


async def message_path(conn: Conn, tip: int) -> list[tuple[int, Any]]:
    """The messages from the root of the tree down to `tip`, as requests carry them."""
    cur = await conn.execute(_PATH, (tip,))
    return [(i, orjson.loads(body)) for i, body in await cur.fetchall()]


async def reconstruct(conn: Conn, row: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """A request row's (request body, response, reply messages) from the tree."""
    return await rebuild(_PgTree(conn), row)


async def get_request(conn: Conn, id_prefix: str) -> dict[str, Any] | None:
    """One request by id or unique id prefix (AmbiguousId otherwise): its row, with
    `request` and `response` as the client sent and got them, rebuilt from the tree."""
    row = await by_prefix(conn, "requests", id_prefix.strip().lower(), ranged=True)
    if row is None:
        return None
    request, response, _ = await reconstruct(conn, row)
    return rebuilt_row(times(row, "received_at", "finished_at"), request, response)


# -- listing -------------------------------------------------------------------------------
def glob_regex(glob: str) -> str:
    """A GLOB pattern (`*`, `?`, `[...]`, `[^...]`; case-sensitive, whole value) as a
    PostgreSQL regular expression."""
    out, i = ["^"], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1 + (glob[i + 1 : i + 2] == "^")
            j += glob[j : j + 1] == "]"  # a `]` first in the class is itself
            end = glob.find("]", j)
            if end < 0:
                out.append(re.escape(c))
            else:
                out.append("[" + glob[i + 1 : end].replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + "$"


async def tsquery(conn: Conn, text: str) -> str | None:
    """Search text as a tsquery (its text): every word of it required, each cut into terms
    by the parser that indexed the messages (`simple`); a trailing `*` keeps the word a
    prefix search. None when the text has no term (no search, as on SQLite)."""
    words = text.split()
    prefix = [len(w) > 1 and w.endswith("*") for w in words]
    cur = await conn.execute(
        "SELECT array(SELECT plainto_tsquery('simple', w)::text FROM unnest(%s::text[]) WITH ORDINALITY u(w, i) ORDER BY i)",
        ([w[:-1] if p else w for w, p in zip(words, prefix)],),
    )
    (parts,) = await cur.fetchone()  # type: ignore[misc]
    terms = [part + (":*" if p else "") for part, p in zip(parts, prefix) if part]
    return " & ".join(f"({t})" for t in terms) or None


def _after(key: tuple[str, str], op: str) -> tuple[str, list[Any]]:
    """Rows after (`>`) or up to (`<=`), before (`<`) the row keyed `(received_at, id)`:
    the time as an index range (and a partition bound), the id breaking ties."""
    at, rid = key
    strict = {">": ">", "<": "<", "<=": "<", ">=": ">"}[op]
    first = {">": ">=", "<": "<=", "<=": "<=", ">=": ">="}[op]
    return f"r.received_at {first} %s::timestamptz AND (r.received_at {strict} %s::timestamptz OR r.id {op} %s)", [at, at, rid]


@dataclass(slots=True)
class Where:
    """A WHERE clause over `requests r` and its parameters. `direct`: it names the few
    messages a search matched, so the requests are found through their indexes on those
    (all of them, then sorted) rather than by reading the newest first."""

    sql: str
    params: list[Any]
    direct: bool = False

    def also(self, sql: str, params: list[Any]) -> None:
        self.sql, self.params = f"{self.sql} AND {sql}", self.params + params


async def where(conn: Conn, flt: RequestFilter, *, common_search: bool | None = None) -> Where | None:
    """The WHERE clause of `flt` (`before` left to the caller); None when the search
    matches no message at all. A search's matches are looked up by the terms' index when
    they are fewer than `search.COMMON` (then the requests that point at them by theirs),
    else each request's messages are checked by primary key as the newest are read, as
    SQLite's search does (`common_search` forces the latter: few new rows to check)."""
    clauses: list[str] = []
    params: list[Any] = []
    if flt.session:
        clauses.append("r.session_id LIKE %s")
        params.append(like(flt.session))
    if flt.model:
        glob = any(c in flt.model for c in "*?[")
        clauses.append("r.model ~ %s" if glob else "r.model = %s")
        params.append(glob_regex(flt.model) if glob else flt.model)
    for col in ("provider", "client", "status", "outcome"):
        value = getattr(flt, col)
        if col == "client" and value == "anonymous":  # what sessions call a request with no client key
            clauses.append("(r.client = %s OR r.client IS NULL)")
            params.append(value)
        elif value is not None and value != "":
            clauses.append(f"r.{col} = %s")
            params.append(value)
    query = await tsquery(conn, flt.query) if flt.query else None
    direct = False
    if query:
        hits: list[int] = []
        if not common_search:
            cur = await conn.execute("SELECT id FROM message_terms WHERE terms @@ %s::tsquery LIMIT %s", (query, COMMON))
            hits = [r[0] for r in await cur.fetchall()]
            if not hits:
                return None
        if hits and len(hits) < COMMON:
            clauses.append("(r.prompt_message = ANY(%s) OR r.reply_message = ANY(%s))")
            params += [hits, hits]
            direct = True
        else:
            # A scalar subquery per row, an index probe each: EXISTS or IN would be planned
            # as a hash of every matching message, read in full first.
            match = "(SELECT t.terms FROM message_terms t WHERE t.id = r.{}) @@ %s::tsquery"
            clauses.append(f"({match.format('prompt_message')} OR {match.format('reply_message')})")
            params += [query, query]
    if flt.since:
        clauses.append("r.received_at >= %s::timestamptz")
        params.append(flt.since)
    if flt.until:
        clauses.append("r.received_at < %s::timestamptz")
        params.append(flt.until)
    return Where(" AND ".join(clauses) or "true", params, direct)


async def _listed(conn: Conn, found: Where, order: str, limit: int) -> list[dict[str, Any]]:
    """Listed rows: the page of request rows first (read in index order, or all a direct
    search names, through the message indexes, then sorted), then their texts."""
    where_sql, params = found.sql, found.params
    if found.direct:  # materialized: not a walk of the time index filtering each row against the matches
        inner = f"WITH hit AS MATERIALIZED (SELECT * FROM requests r WHERE {where_sql}) SELECT * FROM hit r {order}"
    else:
        inner = f"SELECT * FROM requests r WHERE {where_sql} {order}"
    inner += " LIMIT %s" if limit > 0 else ""
    sql = (
        f"SELECT r.*, p.body AS _prompt, a.body AS _reply FROM ({inner}) r "
        f"LEFT JOIN messages p ON p.id = r.prompt_message LEFT JOIN messages a ON a.id = r.reply_message {order}"
    )
    rows = await fetch_rows(conn, sql, [*params, limit] if limit > 0 else params)
    return [listed_row(times(r, "received_at", "finished_at")) for r in rows]


def cursor_of(row: dict[str, Any]) -> str:
    return f"{row['received_at']}/{row['id']}"


def _key(cursor: str) -> tuple[str, str] | None:
    at, _, rid = cursor.partition("/")
    return (at, rid) if rid else None


async def recent_requests(conn: Conn, flt: RequestFilter, limit: int = 20) -> Page:
    """The newest `limit` matching rows (0: all), oldest first; the cursor of the newest
    row of all (a snapshot taken first: a row written meanwhile is the next poll's)."""
    newest = await fetch_rows(conn, f"SELECT received_at, id FROM requests r {_NEWEST} LIMIT 1")
    if not newest:
        return Page([], START)
    top = (iso(newest[0]["received_at"]), newest[0]["id"])
    cursor = f"{top[0]}/{top[1]}"
    found = await where(conn, flt)
    if found is None:
        return Page([], cursor)
    found.also(*_after(top, "<="))  # type: ignore[arg-type]
    if flt.before:
        at = await received_at(conn, flt.before)
        if at is None:  # as on SQLite: an unknown request has nothing before it
            return Page([], cursor)
        found.also(*_after((at, flt.before), "<"))
    rows = await _listed(conn, found, _NEWEST, limit)
    rows.reverse()
    return Page(rows, cursor)


async def new_requests(conn: Conn, flt: RequestFilter, after: str, limit: int = 0) -> Page:
    """Matching rows after the cursor `after`, oldest first; with `limit`, only the newest
    `limit` of them. A row received before the cursor's but written after it was read (a
    long request, or another instance's writer behind) is not seen: rows have no single
    write order across writers."""
    found = await where(conn, flt, common_search=True)  # few new rows: each checked as read
    if found is None:
        return Page([], after)
    key = _key(after)
    if key is not None:
        found.also(*_after(key, ">"))
    if limit > 0:
        rows = await _listed(conn, found, _NEWEST, limit)
        rows.reverse()
    else:
        rows = await _listed(conn, found, _OLDEST, 0)
    return Page(rows, cursor_of(rows[-1]) if rows else after)


async def session_requests(conn: Conn, session_id: str) -> list[dict[str, Any]]:
    """The session's request rows in id order: its conversation, turn by turn."""
    return await _listed(conn, Where("r.session_id = %s", [session_id]), "ORDER BY r.id", 0)


async def count_session_requests(conn: Conn, session_id: str) -> int:
    cur = await conn.execute("SELECT count(*) FROM requests WHERE session_id = %s", (session_id,))
    return int((await cur.fetchone())[0])  # type: ignore[index]
