"""Retention on PostgreSQL: whole days of the request log go at once. A day's partition is
detached without blocking the other days' readers and writers, then emptied in bounded
transactions, each taking back the blob references of a slice of its requests and
deleting the blobs and messages only they used (as store/retention.py does row by row on
SQLite), and dropped: no dead rows are left behind for VACUUM. Expired sessions last used
before the cut-off go as on SQLite (`prune`).

A day goes only when all of it is older than the cut-off, so up to a day more than
`logs.retention_days` is kept. A detached day left by an interrupted run (named
`requests_YYYYMMDD_retired`, or still `requests_YYYYMMDD` if cut short right after the
detach) is finished by the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
import psycopg

from ..retention import PruneResult
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


RETIRED = "_retired"
RETENTION_LOCK = 0x70727072756E  # 'prprun', beside migrations.py's keys
def _leftovers(conn: psycopg.Connection[Any]) -> list[str]:
    """Days an earlier run detached and did not finish: a detach cut short is finalised."""
    for (name,) in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'requests'::regclass AND i.inhdetachpending"
    ).fetchall():
        conn.execute(f'ALTER TABLE requests DETACH PARTITION "{name}" FINALIZE')
    names = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind = 'r' AND NOT c.relispartition AND n.nspname = current_schema()"
        " AND c.relname ~ '^requests_[0-9]{8}(_retired)?$' ORDER BY c.relname"
    ).fetchall()
    return [n for (n,) in names]


def drop_days(
    dsn: str, before: dt.date, *, batch: int = 5000, progress: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> Dropped:  # fmt: skip
    """Drop the request log's days that end on or before `before` (00:00 UTC), and what
    only their requests used, `batch` requests per transaction. `stop` set: ends after
    the transaction in flight (a later run finishes the day)."""
    out = Dropped()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # One run at a time (the leader's and a `db prune`, say): the other waits, then
        # finds what is left. Held until the connection closes.
        conn.execute("SELECT pg_advisory_lock(%s)", (RETENTION_LOCK,))
        for name in _leftovers(conn):
            retired = name if name.endswith(RETIRED) else _retire(conn, name)
            if not _empty(conn, retired, out, batch, progress, stop):
                return out
            day = _day(retired.removesuffix(RETIRED))
            if day is not None:
                out.days.append(day.isoformat())
        for (name,) in conn.execute(_PARTITIONS).fetchall():
            day = _day(name)
            if day is None or day + dt.timedelta(days=1) > before:
                continue
            # Concurrently: waits for the transactions using it, blocks nobody meanwhile.
            conn.execute(f'ALTER TABLE requests DETACH PARTITION "{name}" CONCURRENTLY')
            if not _empty(conn, _retire(conn, name), out, batch, progress, stop):
                return out
            out.days.append(day.isoformat())
    return out


def _retire(conn: psycopg.Connection[Any], name: str) -> str:
    """Rename a detached day: a writer meeting that day again (a late record) makes a new
    partition rather than find this one's name taken."""
    conn.execute(f'ALTER TABLE "{name}" RENAME TO "{name}{RETIRED}"')
    return name + RETIRED


def _empty(
    conn: psycopg.Connection[Any], table: str, out: Dropped, batch: int,
    progress: Callable[[str, int], None] | None, stop: threading.Event | None,
) -> bool:  # fmt: skip
    """Empty the detached day `table` a slice at a time, then drop it; False if `stop`
    came first (the table is left for the next run)."""
    while True:
        if stop is not None and stop.is_set():
            return False
        with conn.transaction():
            n = _forget(conn, table, out, batch)
            if n == 0:
                conn.execute(f'DROP TABLE "{table}"')
                return True
        out.requests += n
        if progress is not None:
            progress("requests", out.requests)


def _forget(conn: psycopg.Connection[Any], table: str, out: Dropped, batch: int) -> int:
    """In one transaction with the bumped writer epoch (writers' batches prepared before
    it are prepared again): up to `batch` requests of the detached `table` deleted, their
    blob references taken back, blobs left unused deleted, and their nodes and then
    their ancestors deleted while unused. How many requests."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (EPOCH_LOCK,))  # waits for batches in flight
    rows = conn.execute(
        f"""DELETE FROM "{table}" WHERE ctid IN (SELECT ctid FROM "{table}" LIMIT %s)
            RETURNING tip_message, prompt_message, reply_message, replies, params_blobs, body_blob""",
        (batch,),
    ).fetchall()
    if not rows:
        return 0
    conn.execute("UPDATE writer_epoch SET n = n + 1")
    refs: dict[int, int] = {}
    nodes: set[int] = set()
    for tip, prompt, reply, replies, params_blobs, body_blob in rows:
        nodes.update(x for x in (tip, prompt, reply) if x is not None)
        nodes.update(int(x) for x in (orjson.loads(replies) if replies else ()) if x is not None)
        for b in [*(orjson.loads(params_blobs).values() if params_blobs else ()), *([body_blob] if body_blob is not None else [])]:
            refs[int(b)] = refs.get(int(b), 0) + 1
    if refs:
        ids = sorted(refs)  # in key order, as the writers lock them: no deadlock
        conn.cursor().executemany("UPDATE blobs SET refs = refs - %s WHERE id = %s", [(refs[b], b) for b in ids])
        out.blobs += conn.execute("DELETE FROM blobs WHERE id = ANY(%s) AND refs <= 0", (ids,)).rowcount
    todo = sorted(nodes)
    while todo:
        unused = [r[0] for r in conn.execute(_UNUSED, (todo,))]
        if not unused:
            break
        conn.execute("DELETE FROM message_terms WHERE id = ANY(%s)", (unused,))
        parents = conn.execute("DELETE FROM messages WHERE id = ANY(%s) RETURNING parent_id", (unused,)).fetchall()
        out.messages += len(parents)
        todo = sorted({p for (p,) in parents if p is not None})
    return len(rows)


def _cut(cut: str) -> dt.datetime:
    at = dt.datetime.fromisoformat(cut.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


def prune_now(
    dsn: str, cut: str, *, batch: int = 5000, progress: Callable[[str, int], None] | None = None,
    stop: threading.Event | None = None,
) -> PruneResult:  # fmt: skip
    """`prune`, in this thread (the CLI's)."""
    at = _cut(cut)
    dropped = drop_days(dsn, at.astimezone(dt.timezone.utc).date(), batch=batch, progress=progress, stop=stop)
    result = PruneResult(cut, requests=dropped.requests, messages=dropped.messages, blobs=dropped.blobs)
    with psycopg.connect(dsn, autocommit=True) as conn:
        while stop is None or not stop.is_set():
            # Turns go by cascade; an expired session's upstream chats are kept for the
            # sweep by the delete trigger, as on SQLite.
            n = conn.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions"
                " WHERE state = 'expired' AND last_accessed_at < %s LIMIT %s)",
                (at, batch),
            ).rowcount
            result.sessions += n
            if progress is not None and n:
                progress("sessions", result.sessions)
            if n < batch:
                break
    return result


async def prune(
    dsn: str, cut: str, *, batch: int = 5000, progress: Callable[[str, int], None] | None = None
) -> PruneResult:
    """As store/retention.prune on SQLite, for the database at `dsn`: the days of requests
    received before `cut` (ISO text, as SQLite's) that end by it dropped, with the messages
    and blobs only they used (bounded transactions, see `drop_days`), and expired
    sessions last used before it deleted. Runs in a thread; cancelled, it stops after the
    transaction in flight (what is left goes at the next run)."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(prune_now, dsn, cut, batch=batch, progress=progress, stop=stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Exception):
            await work
        raise
