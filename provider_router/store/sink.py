"""The log writer process: owns the database's write connection and everything that turns
a finished request into rows, off the daemon's event loop.

The daemon (`writer.LogWriter`) starts it as ``python -m provider_router.store.sink`` and
talks to it over its stdin/stdout in length-prefixed pickle frames:

- in: a config frame first (database path, body limit, secrets to redact: never argv,
  which `ps` shows), then ``("batch", statements, records)`` frames (each record as
  `records.as_fields` of it) and ``("sync", n)`` frames;
  end of input means stop: commit what arrived, then exit.
- out: ``("progress", records_done, written, failed, last_sync)`` after each commit, and
  ``("log", level, event, fields)`` for the daemon to log.

It also renders each record's canonical log line (`request`) as it writes the batch, to
its stderr, which is the daemon's: rendering costs the event loop nothing, and the line and
the row come from the same record.

Per record it assembles the forwarded reply (a stream's events), puts the history and the
replies in the conversation tree (`rows.Rows`, `tree.Tree`: only what is new), redacts,
and builds the request row and its roll-up; a batch is one transaction. A database another
process holds locked delays a batch, never drops it. It yields the CPU
every 200 us of work (`GiveWay`), so that the requests it logs, served on the same cores,
do not queue behind it. SIGINT, SIGTERM and SIGHUP are ignored: the process ends when the
daemon closes its input (or dies), after committing everything it was sent.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sqlite3
import struct
import sys
import time
from typing import Any, BinaryIO, Callable, Iterator, Protocol, Sequence

from .checkpointer import Checkpointer
from .db import PRAGMAS
from ..records import RequestRecord, from_fields, request_line
from ..redact import Redactor
from .rows import ATTACH, INSERT_REQUEST, UPSERT_ROLLUP, Rows
from .tree import Ids, Tree

MAX_BATCH_RECORDS = 2_000
# Gather this long before committing a small batch: a transaction's fixed cost (the commit)
# paid per handful of records was most of this process's time under load. A sync request
# (drained(), stop) commits at once.
LINGER_S = 0.02
# Give the CPU away after this much work, and let SQLite check every this many VM steps.
GIVE_WAY_S = 200e-6
GIVE_WAY_STEPS = 1_000
# While another process holds the database locked, a batch is retried, never dropped:
# waits grow to this, and one warning per interval says how long it has been.
BUSY_RETRY_MAX_S = 1.0
WARN_INTERVAL_S = 10.0

Group = tuple[str, list[Sequence[Any]]]

# -- framing (shared with the daemon's side) ---------------------------------------------
_LEN = struct.Struct(">I")


def frame(obj: object) -> bytes:
    return b"".join(frame_parts(obj))


def frame_parts(obj: object) -> tuple[bytes, bytes]:
    """A frame as its length prefix and its pickle: written one after the other, a batch of
    large records is not copied once more to join them."""
    data = pickle.dumps(obj, protocol=5)
    return _LEN.pack(len(data)), data


class Frames:
    """Reassembles frames from bytes as they arrive, split anywhere."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[Any]:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            yield pickle.loads(memoryview(buf)[pos + 4 : pos + 4 + n])
            pos += 4 + n
        del buf[:pos]


class GiveWay:
    """Yields the CPU after every `every_s` of work. The requests this process logs are
    served on the same few cores: a proxy or upstream process woken while we write would
    otherwise wait for our time slice to end (milliseconds, once per batch; see
    bench/README.md). When nothing else wants the core, a yield returns at once.
    Unlike a lower priority (`nice` made no difference), the writer keeps its fair share
    on a busy machine, so a saturated box slows logging but does not starve it."""

    def __init__(self, every_s: float = GIVE_WAY_S) -> None:
        self.every = every_s
        self.due = 0.0
        self._yield = getattr(os, "sched_yield", None)  # Linux and macOS

    def __call__(self) -> int:  # also SQLite's progress handler: anything but 0 aborts
        now = time.perf_counter()
        if now >= self.due and self._yield is not None:
            try:
                self._yield()
            except OSError:
                pass
            self.due = time.perf_counter() + self.every
        return 0


# -- the database ----------------------------------------------------------------------------
def _busy(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


class Target(Protocol):
    """What the sink needs of its database: the tree's reads and ids, whether someone else
    deleted what the tree may remember, a batch's statements written in one transaction,
    and which errors mean "try the same batch again" (the database is busy, or another
    writer got there first) rather than "this cannot be written"."""

    reads: Any  # execute(sql, params).fetchone() for the tree's FIND_NODE and FIND_BLOB
    ids: Ids | None

    def changed(self) -> bool: ...
    def begin(self) -> None: ...
    def write(self, steps: list[Group]) -> None: ...
    def rollback(self) -> None: ...
    def retryable(self, e: BaseException) -> bool: ...


class SqliteTarget:
    """The sink's SQLite file. A batch is prepared inside its write transaction: the tree
    numbers new rows after the largest stored id and looks nodes up in what is committed,
    so the writers of several instances on one file (`serve --workers`) take turns and
    never pick the same ids; another connection's commit (another instance, retention,
    `db prune`, a CLI edit) may have deleted a node the tree remembers."""

    ids: Ids | None = None

    def __init__(self, conn: sqlite3.Connection, give_way: Callable[[], int] | None = None) -> None:
        self.conn = self.reads = conn
        (self._data_version,) = conn.execute("PRAGMA data_version").fetchone()
        if give_way is not None:
            conn.set_progress_handler(give_way, GIVE_WAY_STEPS)

    def changed(self) -> bool:
        (version,) = self.conn.execute("PRAGMA data_version").fetchone()
        changed, self._data_version = version != self._data_version, version
        return bool(changed)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def write(self, steps: list[Group]) -> None:
        conn = self.conn
        for sql, many in steps:
            conn.executemany(sql, many)
        conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def retryable(self, e: BaseException) -> bool:
        return _busy(e)


# -- rows ------------------------------------------------------------------------------------
class Sink:
    """Writes batches of records and the daemon's state changes, in order, one transaction
    a batch. A database another process holds locked delays the batch (retried until it
    goes through); a record or statement that truly cannot be written fails alone, is
    counted, and is reported once per interval with a count."""

    def __init__(
        self, conn: sqlite3.Connection | Target, *, max_body_bytes: int, redactor: Redactor, emit: Any, lines: Any = None,
        max_message_bytes: int = 8 << 20, committed: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.conn = conn  # as given: a SQLite connection, or another database's target
        self.give_way = GiveWay()
        self.db: Target = SqliteTarget(conn, self.give_way) if isinstance(conn, sqlite3.Connection) else conn
        self.committed = committed  # told after each commit (the checkpointer)
        self.lines = lines  # writes the canonical log lines of the records given, if set
        self.redact = redactor
        self.emit = emit  # sends a frame to the daemon
        self.tree = Tree(self.db.reads, max_message_bytes=max_message_bytes, redact=redactor, ids=self.db.ids)
        self.rows = Rows(self.tree, redactor, max_body_bytes)
        self.records_done = 0
        self.written = 0
        self.failed = 0
        self._failures: dict[str, int] = {}  # event -> count since the last report
        self._reported = 0.0
        self._busy_since: float | None = None  # when the database was first found locked
        self._busy_pause = 0.05
        self._busy_warned = 0.0
        self._daemon = os.getppid()  # gone (killed, or stopped by its watchdog): waiting is over

    def log(self, level: str, event: str, **fields: Any) -> None:
        self.emit(("log", level, event, fields))

    def _fail(self, event: str, error: BaseException, n: int = 1) -> None:
        self.failed += n
        self._failures[event] = self._failures.get(event, 0) + n
        now = time.monotonic()
        if now - self._reported >= WARN_INTERVAL_S:
            self._reported = now
            failures, self._failures = self._failures, {}
            self.log("error", "log_write_failed", counts=failures, last_error=repr(error), failed_total=self.failed)

    def prepare(self, records: list[RequestRecord]) -> tuple[list[Group], int, list[RequestRecord]]:
        """The statements of `records` (tree rows, request rows, roll-ups), how many request
        rows, and the records they cover: a record whose rows cannot be built is failed
        alone and left out (the batch is gathered again without it)."""
        while True:
            rows = []
            for r in records:
                self.give_way()
                try:
                    rows.append(self.rows.build(r))
                except Exception as e:  # a value no column takes, a reply we cannot read
                    if self.db.retryable(e):
                        raise  # the tree's read met the database's trouble, not the record's
                    self._discard()
                    self._fail("log_record_failed", e)
                    records = [x for x in records if x is not r]
                    break
            else:
                break
        groups = self.tree.take()
        if rows:
            groups.append((INSERT_REQUEST, rows))
        rollups = self.rows.take_rollups()
        if rollups:
            groups.append((UPSERT_ROLLUP, rollups))
        attach = self.rows.take_attach()
        if attach:
            groups.append((ATTACH, attach))
        return groups, len(rows), records

    def apply(self, batches: list[tuple[list[Group], list[RequestRecord]]]) -> None:
        """Write the batches in order, in one transaction; on failure, one record (or
        state change) at a time so that one bad row costs only itself."""
        steps: list[Group] = [g for groups, _ in batches for g in groups]
        records = [r for _, records in batches for r in records]
        n = len(records)
        if self.lines is not None:
            # Before the write: a database another process holds locked delays the rows,
            # and a crash mid-write loses them, but not these lines.
            self.lines([r for r in records if r.log_line], self.give_way)
        batch = records

        def whole() -> tuple[list[Group], int]:
            nonlocal batch
            groups, rows, batch = self.prepare(batch)  # leaves out a record it cannot build
            return steps + groups, rows

        error = self._retrying(whole)
        if error is not None:
            self.log("warning", "log_batch_failed", error=repr(error), records=len(batch), statements=len(steps))
            self._one_by_one(steps, batch)
        self.records_done += n

    def _wait_busy(self, e: BaseException) -> bool:
        """Another process holds the database (or, PostgreSQL, the server does not answer):
        wait (longer each time, up to a second) and let the caller try the same batch
        again; say so once per interval. False once the daemon is gone: nobody will read
        what it would report, and a writer left waiting for a database that does not come
        back would outlive it with no bound (the rest is lost, as the daemon said)."""
        if os.getppid() != self._daemon:
            return False
        waited = self._busy_since
        now = time.monotonic()
        if waited is None:
            self._busy_since = waited = now
            self._busy_pause = 0.05
            self._busy_warned = now
        elif now - self._busy_warned >= WARN_INTERVAL_S:
            self._busy_warned = now
            self.log("warning", "log_database_busy", waited_s=round(now - waited, 1), error=str(e))
        time.sleep(self._busy_pause)
        self._busy_pause = min(self._busy_pause * 2, BUSY_RETRY_MAX_S)
        return True

    def _one_by_one(self, steps: list[Group], records: list[RequestRecord]) -> None:
        for sql, many in steps:
            for params in many:
                error = self._retrying(lambda: ([(sql, [params])], 0))
                if error is not None:
                    self._fail("log_statement_failed", error)
        for r in records:
            def one(r: RequestRecord = r) -> tuple[list[Group], int]:
                groups, rows, _ = self.prepare([r])
                return groups, rows
            error = self._retrying(one)
            if error is not None:
                self._fail("log_record_failed", error)

    def _retrying(self, build: Callable[[], tuple[list[Group], int]]) -> Exception | None:
        """Write the statements `build` gathers (and count its request rows), in one
        transaction begun before it runs, until it goes through or fails for another reason
        than a database another process holds locked: that error, rolled back (None if
        written)."""
        while True:
            try:
                self.db.begin()
                if self.db.changed():
                    # Another connection committed (another instance, retention, `db prune`,
                    # a CLI edit): a message the tree remembers may be gone, and the largest
                    # ids have moved, so it reads them from the database again.
                    self.tree.reset()
                steps, rows = build()
                self._write(steps)
                self.written += rows
                return None
            except Exception as e:
                self._rollback()
                self._discard()
                if not self.db.retryable(e) or not self._wait_busy(e):
                    return e

    def _write(self, steps: list[Group]) -> None:
        self.db.write(steps)
        self._busy_since = None
        self.committed()

    def _discard(self) -> None:
        """Forget what was gathered for a batch that will not be written as it was."""
        self.tree.reset()
        self.rows.take_rollups()
        self.rows.take_attach()

    def _rollback(self) -> None:
        self.db.rollback()


def write_all(fd: int, data: bytes) -> None:
    """All of `data`, even to a non-blocking descriptor (a pipe some parents hand over so):
    a buffered write there can stop short without an error."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


# -- the process -------------------------------------------------------------------------------
class _Input:
    """The daemon's frames, read from `inp` as they come."""

    def __init__(self, inp: int) -> None:
        self.inp = inp
        self.frames = Frames()
        self.pending: list[Any] = []
        self.eof = False

    def first(self) -> Any:
        """The first frame (the config); None if the input ended before it."""
        while not self.pending:
            data = os.read(self.inp, 1 << 16)
            if not data:
                return None
            self.pending += self.frames.feed(data)
        return self.pending.pop(0)

    def gather(self) -> list[Any]:
        """What was sent (the daemon writes while we commit), lingering a little for more
        unless asked to sync or a batch is full."""
        deadline = None
        records = 0
        while not self.eof:
            if self.pending:
                if records >= MAX_BATCH_RECORDS or any(f[0] == "sync" for f in self.pending):
                    break
                deadline = deadline or time.monotonic() + LINGER_S
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([self.inp], [], [], wait)[0]:
                    break
            data = os.read(self.inp, 1 << 20)
            if not data:
                self.eof = True
                break
            new = list(self.frames.feed(data))
            records += sum(len(f[2]) for f in new if f[0] == "batch")
            self.pending += new
        taken, self.pending = self.pending, []
        return taken


def _line_writer(redactor: Redactor) -> Any:
    """Logging set up as the daemon's, and a writer of a batch's canonical request lines."""
    from ..logsetup import line_renderer, setup_logging  # structlog: only this process's start-up pays it

    setup_logging("info", redact=redactor)  # JSON unless stderr (the daemon's) is a terminal
    render = line_renderer(encoding=sys.stderr.encoding)

    def lines(records: list[RequestRecord], give_way: GiveWay) -> None:
        # One write per batch: a line written and flushed at a time was a system call each.
        out = []
        for r in records:
            give_way()
            out.append(render("request", request_line(r)))
        if out:
            try:
                sys.stderr.flush()  # what structlog's other lines left buffered goes first
                write_all(sys.stderr.fileno(), b"".join(out))
            except OSError:  # nobody reads stderr any more (`serve | head`): the rows still matter
                pass

    return lines


def serve(inp: int, out: BinaryIO) -> None:
    """Read frames from `inp` until end of input, writing as they come."""

    def emit(obj: object) -> None:
        try:
            out.write(frame(obj))
            out.flush()
        except OSError:  # the daemon is gone: what it sent is still committed
            pass

    source = _Input(inp)
    cfg = source.first()
    if cfg is None:
        return
    redactor = Redactor(cfg["secrets"])
    target, checkpointer = _open(cfg["db"])
    sink = Sink(
        target, max_body_bytes=cfg["max_body_bytes"], redactor=redactor, emit=emit,
        lines=_line_writer(redactor), max_message_bytes=cfg.get("max_message_bytes", 8 << 20),
        committed=checkpointer.committed if checkpointer else lambda: None,
    )  # fmt: skip
    while not source.eof or source.pending:
        taken = source.gather()
        batches = [(f[1], [from_fields(r) for r in f[2]]) for f in taken if f[0] == "batch"]
        syncs = [f[1] for f in taken if f[0] == "sync"]
        if batches:
            sink.apply(batches)
        emit(("progress", sink.records_done, sink.written, sink.failed, max(syncs) if syncs else None))
    if checkpointer is not None:
        checkpointer.stop()
    target.close()


def _open(db: str) -> tuple[Any, Checkpointer | None]:
    """The database to write: a `postgresql://` URL (store/pg), or a SQLite file, whose
    WAL a checkpointer's thread truncates beside the writer."""
    from ..location import is_postgres

    if is_postgres(db):
        from .pg.writer import PgTarget

        return PgTarget(db), None
    conn = open_db(db)
    conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does it instead
    return conn, Checkpointer(lambda: open_db(db)).start()


def main() -> None:
    # Ctrl-C reaches the whole process group, and a service manager may signal every
    # process of the unit: the daemon decides when logging ends, by closing our input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal hangs up its whole process group too
    serve(sys.stdin.fileno(), sys.stdout.buffer)


if __name__ == "__main__":
    main()
