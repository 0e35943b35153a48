"""Retention on PostgreSQL: whole days of the request log go at once. A day's partition is
detached without blocking the other days' readers and writers, the blobs and messages
only its requests used are deleted (as store/retention.py does row by row on SQLite),
and its table is dropped: no dead rows are left behind for VACUUM.

A day goes only when all of it is older than the cut-off, so up to a day more than
`logs.retention_days` is kept.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .migrations import EPOCH_LOCK

_PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'requests'::regclass ORDER BY c.relname
"""

# Of the candidate nodes, those nothing refers to any more: no child, no request (as its
# tip, prompt, reply, or one of its replies when n > 1), no turn.
_UNUSED = """
SELECT c.id FROM unnest(%s::bigint[]) AS c(id)
WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.parent_id = c.id)
  AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.tip_message = c.id)
  AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.prompt_message = c.id)
  AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.reply_message = c.id)
  AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.replies IS NOT NULL
                  AND c.id IN (SELECT value::bigint FROM json_array_elements_text(r.replies::json) WHERE value <> 'null'))
  AND NOT EXISTS (SELECT 1 FROM turns t JOIN messages m ON m.hash = t.message_hash WHERE m.id = c.id)
"""


@dataclass(slots=True)
class Dropped:
    days: list[str] = field(default_factory=list)
    requests: int = 0
    messages: int = 0
    blobs: int = 0


def _day(name: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(name.removeprefix("requests_"), "%Y%m%d").date()
    except ValueError:
        return None


def drop_days(dsn: str, before: dt.date) -> Dropped:
    """Drop the request log's days that end on or before `before` (00:00 UTC), and what
    only their requests used."""
    out = Dropped()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for (name,) in conn.execute(_PARTITIONS).fetchall():
            day = _day(name)
            if day is None or day + dt.timedelta(days=1) > before:
                continue
            # Concurrently: waits for the transactions using it, blocks nobody meanwhile.
            conn.execute(f'ALTER TABLE requests DETACH PARTITION "{name}" CONCURRENTLY')
            with conn.transaction():
                _forget(conn, name, out)
                conn.execute(f'DROP TABLE "{name}"')
            out.days.append(day.isoformat())
    return out


def _forget(conn: psycopg.Connection[Any], table: str, out: Dropped) -> None:
    """In one transaction with the bumped writer epoch (writers' batches prepared before
    it are prepared again): the blob references of `table`'s requests taken back, blobs
    left unused deleted, and its nodes and then their ancestors deleted while unused."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (EPOCH_LOCK,))  # waits for batches in flight
    conn.execute("UPDATE writer_epoch SET n = n + 1")
    (out_requests,) = conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()  # type: ignore[misc]
    out.requests += int(out_requests)
    refs = conn.execute(
        f"""SELECT b, count(*) FROM (
                SELECT value::bigint AS b FROM "{table}", json_each_text(params_blobs::json) WHERE params_blobs IS NOT NULL
                UNION ALL SELECT body_blob FROM "{table}" WHERE body_blob IS NOT NULL) x
            GROUP BY b ORDER BY b"""
    ).fetchall()
    if refs:
        ids = [b for b, _ in refs]
        conn.cursor().executemany("UPDATE blobs SET refs = refs - %s WHERE id = %s", [(n, b) for b, n in refs])
        cur = conn.execute("DELETE FROM blobs WHERE id = ANY(%s) AND refs <= 0", (ids,))
        out.blobs += cur.rowcount
    nodes = [
        r[0]
        for r in conn.execute(
            f"""SELECT DISTINCT n FROM (
                    SELECT unnest(ARRAY[tip_message, prompt_message, reply_message]) AS n FROM "{table}"
                    UNION ALL SELECT value::bigint FROM "{table}", json_array_elements_text(replies::json)
                    WHERE replies IS NOT NULL AND value <> 'null') x
                WHERE n IS NOT NULL"""
        )
    ]
    while nodes:
        unused = [r[0] for r in conn.execute(_UNUSED, (nodes,))]
        if not unused:
            break
        conn.execute("DELETE FROM message_terms WHERE id = ANY(%s)", (unused,))
        parents = conn.execute("DELETE FROM messages WHERE id = ANY(%s) RETURNING parent_id", (unused,)).fetchall()
        out.messages += len(parents)
        nodes = sorted({p for (p,) in parents if p is not None})
