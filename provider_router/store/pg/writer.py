"""The log writer on PostgreSQL: the same `Tree` and `Rows` as on SQLite gather a batch's
statements (store/tree.py, store/rows.py name them); `PgTarget` runs each one's bulk
counterpart here (COPY, or one INSERT/UPDATE over arrays), the batch in one transaction.

Several instances write one database, each with its own writer process, so what holds for
SQLite's single writer is replaced:
- ids: a writer takes message and blob ids in blocks from sequences (`SequenceIds`), so it
  still names a batch's new nodes (and their children) before writing them;
- the same new node or blob written by two writers at once: the unique hash stops the
  later batch, which is rolled back and prepared again (it then finds the other's row);
- the first request to carry a reply decides its `resent` form once: the update applies
  to a reply not yet carried, or carried in the same form by another writer (a
  conversation whose turns alternate between instances); a batch that finds one carried
  in another form meanwhile is prepared again;
- rows locked by every writer (blob refs, roll-ups) are written in key order, so two
  batches wait for each other rather than deadlock;
- retention bumps `writer_epoch` when it deletes messages or blobs: a batch checks the
  epoch in its transaction, and one prepared from what may be gone is prepared again.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any, Callable, Sequence

import psycopg
from psycopg import errors

from ..rows import ATTACH, COLUMNS, INSERT_REQUEST, ROLLUP_KEY, ROLLUP_SUMS, UPSERT_ROLLUP
from ..tree import ADD_BLOB_REFS, CARRY, FIND_BLOB, FIND_NODE, INSERT_BLOB, INSERT_NODE, INSERT_TEXT
from .migrations import EPOCH_LOCK, ID_BLOCK

Rows = Sequence[Sequence[Any]]
Group = tuple[str, Rows]
# Days of partitions made ahead of the requests that will need them.
DAYS_AHEAD = 7

_TYPES = {
    "received_at": "timestamptz", "finished_at": "timestamptz", "stream": "smallint", "status": "integer",
    "prompt_tokens": "bigint", "completion_tokens": "bigint", "total_tokens": "bigint", "cached_tokens": "bigint",
    "chunk_count": "bigint", "ttfb_ms": "float8", "duration_ms": "float8", "turn": "integer", "tip_message": "bigint",
    "prompt_message": "bigint", "reply_message": "bigint", "body_blob": "bigint",
}  # fmt: skip
REQUEST_TYPES = tuple(_TYPES.get(c, "text") for c in COLUMNS)
ROLLUP_TYPES = ("text",) * len(ROLLUP_KEY) + tuple("float8" if c in ("ttfb_sum", "duration_sum") else "bigint" for c in ROLLUP_SUMS)
_RECEIVED = COLUMNS.index("received_at")

# The tree's reads, as PostgreSQL writes them.
READS = {
    FIND_NODE: "SELECT id, body, resent, carried FROM messages WHERE hash = %s",
    FIND_BLOB: "SELECT id FROM blobs WHERE hash = %s",
}


class Stale(Exception):
    """Retention deleted messages or blobs since the batch was prepared."""


class Conflict(Exception):
    """Another writer carried a reply first: its `resent` form is decided."""


def copy_rows(cur: psycopg.Cursor[Any], table: str, columns: Sequence[str], rows: Rows) -> None:
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row(r)


def unnest_insert(cur: psycopg.Cursor[Any], table: str, columns: Sequence[str], types: Sequence[str], rows: Rows, tail: str = "") -> None:
    """All `rows` in one INSERT: one array parameter per column, whatever their number."""
    # One element type per array: a float column given 0 and 1.5 must send floats only.
    arrays = [[None if v is None else float(v) for v in col] if t == "float8" else list(col) for col, t in zip(zip(*rows), types)]
    args = ", ".join(f"%s::{t}[]" for t in types)
    cur.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({args}) {tail}", arrays)  # type: ignore[arg-type]


def _by(i: int) -> Callable[[Sequence[Any]], Any]:
    return lambda r: r[i]


def _nodes(cur: psycopg.Cursor[Any], rows: Rows) -> None:
    copy_rows(cur, "messages", ("id", "hash", "parent_id", "role", "body", "carried"), sorted(rows, key=_by(1)))


def _blobs(cur: psycopg.Cursor[Any], rows: Rows) -> None:
    copy_rows(cur, "blobs", ("id", "hash", "data"), sorted(rows, key=_by(1)))


def _blob_refs(cur: psycopg.Cursor[Any], rows: Rows) -> None:  # rows: (n, id)
    cur.executemany("UPDATE blobs SET refs = refs + %s WHERE id = %s", sorted(rows, key=_by(1)))


def _carried(cur: psycopg.Cursor[Any], rows: Rows) -> None:  # rows: (resent, id)
    first: dict[int, Any] = {}
    for resent, mid in rows:
        first.setdefault(mid, resent)
    ids = sorted(first)
    cur.execute(
        "UPDATE messages SET resent = v.resent, carried = 1 FROM unnest(%s::text[], %s::bigint[]) AS v(resent, id)"
        " WHERE messages.id = v.id AND (messages.carried = 0 OR messages.resent IS NOT DISTINCT FROM v.resent)",
        ([first[i] for i in ids], ids),
    )
    if cur.rowcount != len(ids):
        raise Conflict(f"{len(ids) - cur.rowcount} replies carried in another form by another writer first")


def _terms(cur: psycopg.Cursor[Any], rows: Rows) -> None:  # rows: (id, text)
    ids, texts = zip(*rows)
    cur.execute(
        "INSERT INTO message_terms (id, terms) SELECT id, to_tsvector('simple', t) FROM unnest(%s::bigint[], %s::text[]) AS v(id, t)",
        (list(ids), list(texts)),
    )


def _requests(cur: psycopg.Cursor[Any], rows: Rows) -> None:
    copy_rows(cur, "requests", COLUMNS, rows)


_KEY = len(ROLLUP_KEY)
_ROLLUP_TAIL = f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET " + ", ".join(f"{c} = rollups.{c} + excluded.{c}" for c in ROLLUP_SUMS)


def _rollups(cur: psycopg.Cursor[Any], rows: Rows) -> None:
    unnest_insert(cur, "rollups", ROLLUP_KEY + ROLLUP_SUMS, ROLLUP_TYPES, sorted(rows, key=lambda r: r[:_KEY]), _ROLLUP_TAIL)


def _attach(cur: psycopg.Cursor[Any], rows: Rows) -> None:  # rows: (session id, request id)
    sessions, ids = zip(*rows)
    cur.execute(
        "UPDATE requests SET session_id = v.s, chat_id = v.s FROM unnest(%s::text[], %s::text[]) AS v(s, id)"
        " WHERE requests.id = v.id AND requests.session_id IS NULL",
        (list(sessions), list(ids)),
    )


# Each statement the tree and the rows gather, as PostgreSQL runs it for a whole batch.
WRITES: dict[str, Callable[[psycopg.Cursor[Any], Rows], None]] = {
    INSERT_BLOB: _blobs,
    ADD_BLOB_REFS: _blob_refs,
    INSERT_NODE: _nodes,
    CARRY: _carried,
    INSERT_TEXT: _terms,
    INSERT_REQUEST: _requests,
    UPSERT_ROLLUP: _rollups,
    ATTACH: _attach,
}


def in_order(sql: str, order: tuple[int, ...]) -> Callable[[psycopg.Cursor[Any], Rows], None]:
    """A statement run once per row, in order, with the SQLite parameters at `order`."""

    def write(cur: psycopg.Cursor[Any], rows: Rows) -> None:
        cur.executemany(sql, [tuple(r[i] for i in order) for r in rows])  # type: ignore[arg-type]

    return write


def write_of(sql: str) -> Callable[[psycopg.Cursor[Any], Rows], None] | None:
    """The PostgreSQL form of a statement the sink gathered. The daemon's session
    statements (store/pg/sessions.py `WRITES`) join `WRITES` when first met: a writer
    process imports the daemon's session side only then."""
    write = WRITES.get(sql)
    if write is None and not _sessions_added:
        from .sessions import WRITES as SESSION_WRITES

        WRITES.update({sqlite: in_order(pg, order) for sqlite, (pg, order) in SESSION_WRITES.items()})
        _sessions_added.append(True)
        write = WRITES.get(sql)
    return write


_sessions_added: list[bool] = []


def _without_nul(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)


class SequenceIds:
    """Ids for new messages and blobs: a sequence's `nextval` reserves a block of them
    (the sequence counts in blocks) for this writer alone. Unused ids of a block are
    never used: gaps, as a rolled-back batch leaves too."""

    SEQUENCES = {"messages": "message_ids", "blobs": "blob_ids"}

    def __init__(self, target: PgTarget) -> None:
        self.target = target
        self._blocks: dict[str, tuple[int, int]] = {}
        self._size: dict[str, int] = {}

    def __call__(self, table: str) -> Callable[[], int]:
        return functools.partial(self._next, table)

    def _next(self, table: str) -> int:
        nxt, end = self._blocks.get(table, (0, 0))
        if nxt >= end:
            seq = self.SEQUENCES[table]
            conn = self.target.connection()
            if table not in self._size:
                found = conn.execute("SELECT increment_by FROM pg_sequences WHERE sequencename = %s", (seq,)).fetchone()
                self._size[table] = int(found[0]) if found else ID_BLOCK
            (nxt,) = conn.execute("SELECT nextval(%s)", (seq,)).fetchone()  # type: ignore[misc]
            end = nxt + self._size[table]
        self._blocks[table] = (nxt + 1, end)
        return int(nxt)


class _Reads:
    """The tree's reads: its SQLite statements, run as PostgreSQL's."""

    def __init__(self, target: PgTarget) -> None:
        self.target = target

    def execute(self, sql: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        return self.target.connection().execute(READS[sql], params)  # type: ignore[arg-type]


class PgTarget:
    """The sink's database when it is PostgreSQL (see sink.Target): one connection, in
    autocommit for the tree's reads and id blocks, a transaction per batch. A lost
    connection is opened again by the next attempt."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self.reads = _Reads(self)
        self.ids = SequenceIds(self)
        self._epoch: int | None = None
        self._days: set[dt.date] = set()

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5, options="-c TimeZone=UTC")
            self._days.clear()
            if self._epoch is None:  # before the tree's first read: what it remembers dates from here
                (self._epoch,) = self._conn.execute("SELECT n FROM writer_epoch").fetchone()  # type: ignore[misc]
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def changed(self) -> bool:
        return False  # checked in the batch's own transaction instead (the epoch), see write

    def begin(self) -> None:
        """Nothing: a batch is prepared outside its transaction (the ids are this writer's
        own sequence blocks, and a node another writer made first is a retry, see
        `retryable`), and `write` runs it in one."""

    def _partitions(self, steps: list[Group]) -> None:
        """The days of the batch's requests have partitions: made (and a week ahead) when
        first met; outside the batch's transaction, so their locks are short."""
        days = {dt.date.fromisoformat(r[_RECEIVED][:10]) for sql, rows in steps if sql == INSERT_REQUEST for r in rows}
        new = days - self._days
        if new:
            conn = self.connection()
            conn.execute("SELECT request_partitions(%s, %s)", (min(new), max(new) + dt.timedelta(days=DAYS_AHEAD)))
            self._days |= {min(new) + dt.timedelta(days=i) for i in range((max(new) - min(new)).days + DAYS_AHEAD + 1)}

    def write(self, steps: list[Group]) -> None:
        self._partitions(steps)
        try:
            self._write(steps)
        except psycopg.DataError as e:
            if "NUL" not in str(e) and "0x00" not in str(e):
                raise
            # PostgreSQL's text cannot hold U+0000 (SQLite's can): a raw upstream body or
            # an error text with one is kept with U+FFFD in its place.
            self._write([(sql, [_without_nul(r) for r in rows]) for sql, rows in steps])

    def _write(self, steps: list[Group]) -> None:
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (EPOCH_LOCK,))
            (epoch,) = cur.execute("SELECT n FROM writer_epoch").fetchone()  # type: ignore[misc]
            if epoch != self._epoch:
                self._epoch = epoch
                raise Stale(f"writer epoch {epoch}")
            for sql, rows in steps:
                write = write_of(sql)
                if write is None:
                    raise NotImplementedError(f"not a statement of the PostgreSQL writer: {sql[:80]}")
                if rows:
                    write(cur, rows)

    def rollback(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()

    def retryable(self, e: BaseException) -> bool:
        """Worth trying the same batch again: the database is unreachable (it is opened
        again), another writer made the same node or blob or carried the same reply
        first, two writers waited on each other, retention deleted what the batch named,
        or the day of a request has no partition any more (made again)."""
        if isinstance(e, errors.UniqueViolation):
            return e.diag.constraint_name in ("messages_hash_key", "blobs_hash_key")
        if isinstance(e, errors.CheckViolation) and "no partition" in str(e):
            self._days.clear()
            return True
        return isinstance(e, (Stale, Conflict, errors.DeadlockDetected, errors.SerializationFailure, psycopg.OperationalError))
