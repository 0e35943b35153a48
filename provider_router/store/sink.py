"""The log writer process: owns the database's write connection and everything that turns
a finished request into rows, off the daemon's event loop.

The daemon (`writer.LogWriter`) starts it as ``python -m provider_router.store.sink`` and
talks to it over its stdin/stdout in length-prefixed pickle frames:

- in: a config frame first (database path, body limit, secrets to redact: never argv,
  which `ps` shows), then ``("batch", statements, records)`` and ``("sync", n)`` frames;
  end of input means stop: commit what arrived, then exit.
- out: ``("progress", records_done, written, failed, last_sync)`` after each commit, and
  ``("log", level, event, fields)`` for the daemon to log.

It also renders each record's canonical log line (`request`) as it writes the batch, to
its stderr, which is the daemon's: rendering costs the event loop nothing, and the line and
the row come from the same record.

Per record it assembles the forwarded reply (text, usage; a stream's events), threads a
stateless upstream's turn in the log, redacts and truncates, and inserts the row; a batch
is one transaction, with the full-text index filled by one statement. It yields the CPU
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
from collections import OrderedDict
from typing import Any, BinaryIO, Iterator, Sequence

import msgspec
import orjson

from .. import history
from ..api.assemble import ASSEMBLERS
from .db import PRAGMAS
from .records import RequestRecord, iso, request_line
from .redact import Redactor

TRUNCATED_MARK = "…[truncated {n} bytes]"
INSERT_REQUEST = """
INSERT INTO requests (
    id, received_at, finished_at, method, path, client, user_agent, model, provider,
    upstream_model, stream, request_body, response_body, prompt_text, response_text,
    reasoning_text, finish_reason, prompt_tokens, completion_tokens, total_tokens,
    chunk_count, status, outcome, error, ttfb_ms, duration_ms, session_id, turn, chat_id,
    parent_id, reply_id, attempts
) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
"""
INDEX_SINCE = (
    "INSERT INTO requests_fts(rowid, prompt_text, response_text) "
    "SELECT rowid, prompt_text, response_text FROM requests WHERE rowid > ?"
)
LAST_ROWID = "SELECT coalesce(max(rowid), 0) FROM requests"
# Only for a session that still exists: one deleted while its request was in flight keeps
# no turn (a foreign-key failure would fail the whole batch into one-by-one writes).
INSERT_TURN = """
INSERT OR IGNORE INTO turns (session_id, prefix_hash, parent_hash, turn, chat_id, reply_id, request_id, created_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE EXISTS (SELECT 1 FROM sessions WHERE id = ?1)
"""
ADVANCE_SESSION = "UPDATE sessions SET parent_id = ?, message_count = ? WHERE id = ?"
TURN_CACHE_SESSIONS = 2_000
MAX_BATCH_RECORDS = 2_000
# Gather this long before committing a small batch: a transaction's fixed cost (the rowid
# lookup, the index statement, the commit) paid per handful of records was most of this
# process's time under load. A sync request (drained(), stop) commits at once.
LINGER_S = 0.02
# Give the CPU away after this much work, and let SQLite check every this many VM steps.
GIVE_WAY_S = 200e-6
GIVE_WAY_STEPS = 1_000

Group = tuple[str, list[Sequence[Any]]]

# -- framing (shared with the daemon's side) ---------------------------------------------
_LEN = struct.Struct(">I")


def frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=5)
    return _LEN.pack(len(data)) + data


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
    otherwise wait for our time slice to end (2-5 ms at c=1 under `make bench`, once per
    batch; see bench/README.md). When nothing else wants the core, a yield returns at once.
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


# -- threading a stateless upstream's log ----------------------------------------------------
class _Said(msgspec.Struct, gc=False):
    role: str | None = None
    content: str | None = None


class _Asked(msgspec.Struct, gc=False):
    messages: list[_Said] | None = None


_ASKED = msgspec.json.Decoder(_Asked)


def _canons(body: bytes) -> list[bytes]:
    """The canonical messages of a chat request's body. Decoded into structs holding role
    and content only (tools, parameters and other fields are skipped, not built), unless
    some message is not that plain shape (content parts, say): then read generically."""
    try:
        asked = _ASKED.decode(body)
    except Exception:  # another shape, invalid UTF-8 in a kept field, deep nesting
        messages = orjson.loads(body).get("messages") or []
        return [history.canon(m) for m in messages if isinstance(m, dict)]
    return [history.canon_of(m.role, m.content) for m in asked.messages or ()]


class TurnLog:
    """The turns of stateless sessions, as `threads` records them for threaded ones: each
    completed reply keyed by the chained hash of the history it completes. Records arrive
    in the order their requests finished, so a conversation's turn N is always in place
    before its turn N + 1 is placed."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._cache: OrderedDict[str, dict[str, str | None]] = OrderedDict()  # session -> prefix hash -> reply id

    def forget(self) -> None:
        self._cache.clear()

    def _turns(self, session_id: str) -> dict[str, str | None]:
        turns = self._cache.get(session_id)
        if turns is None:
            rows = self._conn.execute("SELECT prefix_hash, reply_id FROM turns WHERE session_id = ?", (session_id,))
            turns = self._cache[session_id] = dict(rows.fetchall())
            if len(self._cache) > TURN_CACHE_SESSIONS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(session_id)
        return turns

    def thread(self, rec: RequestRecord) -> tuple[tuple[Any, ...], int] | None:
        """Fill the record's turn and parent; if its reply completed, the `turns` row that
        records it and the session's message count with it (see `Sink.apply`)."""
        sid = rec.session_id
        if sid is None or rec.request_body is None:
            return None
        canons = _canons(rec.request_body)
        hashes = history.prefix_hashes(canons)
        turns = self._turns(sid)
        _, parent_hash = history.place(canons, hashes, lambda h: h if h in turns else None)
        rec.turn = history.turn_number(canons)
        rec.parent_id = turns[parent_hash] if parent_hash else None
        if not (rec.status == 200 and rec.outcome == "ok" and rec.finish_reason and hashes):
            return None
        h = history.reply_hash(hashes[-1], rec.response_text or "").hex()
        turns[h] = rec.reply_id
        row = (sid, h, parent_hash, rec.turn, rec.chat_id, rec.reply_id, rec.id, iso(rec.finished or rec.started))
        return row, len(canons) + 1


# -- rows ------------------------------------------------------------------------------------
class Sink:
    def __init__(
        self, conn: sqlite3.Connection, *, max_body_bytes: int, redactor: Redactor, emit: Any, lines: Any = None
    ) -> None:
        self.conn = conn
        self.lines = lines  # writes the canonical log lines of the records given, if set
        self.max_body = max_body_bytes
        self.redact = redactor
        self.emit = emit  # sends a frame to the daemon
        self.turns = TurnLog(conn)
        self.records_done = 0
        self.written = 0
        self.failed = 0
        self.give_way = GiveWay()
        conn.set_progress_handler(self.give_way, GIVE_WAY_STEPS)

    def log(self, level: str, event: str, **fields: Any) -> None:
        self.emit(("log", level, event, fields))

    def _text(self, value: str | None) -> str | None:
        return None if value is None else self.redact(value)

    def _body(self, data: bytes | None) -> str | None:
        if data is None:
            return None
        extra = len(data) - self.max_body
        if extra > 0:
            data = data[: self.max_body]
        text = data.decode("utf-8", "replace")
        if extra > 0:
            text += TRUNCATED_MARK.format(n=extra)
        return self.redact(text)

    def _attempts(self, attempts: list[dict[str, Any]] | None) -> str | None:
        if not attempts:
            return None
        # A failed attempt's error quotes the upstream's answer, which may echo our key.
        return orjson.dumps([{**a, "error": self._text(a.get("error"))} for a in attempts]).decode()

    def prepare(self, r: RequestRecord) -> tuple[tuple[Any, ...], tuple[tuple[Any, ...], int] | None]:
        """The record's row, and the `turns` row of its completed reply (stateless upstreams)."""
        turn = None
        try:
            if r.reply_format is not None:
                ASSEMBLERS[r.reply_format](r)
            if r.log_turn:
                turn = self.turns.thread(r)
        except Exception as e:  # a malformed upstream reply still gets its record
            r.error = r.error or f"could not assemble the reply: {e!r}"
        row = (
            r.id,
            iso(r.started),
            iso(r.finished) if r.finished else None,
            r.method,
            r.path,
            r.client,
            self._text(r.user_agent),
            self._text(r.model),
            r.provider,
            r.upstream_model,
            None if r.stream is None else int(r.stream),
            self._body(r.request_body),
            self._body(r.response_body),
            self._text(r.prompt_text),
            self._text(r.response_text),
            self._text(r.reasoning_text),
            r.finish_reason,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.chunk_count,
            r.status,
            r.outcome,
            self._text(r.error),
            None if r.ttfb_ms is None else round(r.ttfb_ms, 3),
            None if r.duration_ms is None else round(r.duration_ms, 3),
            r.session_id,
            r.turn,
            r.chat_id,
            r.parent_id,
            r.reply_id,
            self._attempts(r.attempts),
        )
        return row, turn

    def apply(self, batches: list[tuple[list[Group], list[RequestRecord]]]) -> None:
        """Write the batches in order, in one transaction; on failure, one item at a time
        so that one bad row costs only itself."""
        steps: list[Group] = []  # state changes, in order, before the rows
        rows: list[tuple[Any, ...]] = []
        turns: list[tuple[Any, ...]] = []
        tips: dict[str, tuple[Any, ...]] = {}  # session -> its newest (parent_id, message_count)
        for groups, records in batches:
            for sql, many in groups:
                if sql.lstrip().upper().startswith("DELETE"):
                    self.turns.forget()  # a delete may take turns with it: reread them
                steps.append((sql, many))
            for r in records:
                self.give_way()
                try:
                    row, turn = self.prepare(r)
                except Exception as e:  # a value no column takes: this record only
                    self.failed += 1
                    self.log("error", "log_record_failed", request_id=r.id, error=repr(e))
                    continue
                rows.append(row)
                if turn is not None:
                    turns.append(turn[0])
                    tips[r.session_id] = (r.reply_id, turn[1])  # type: ignore[index]
        if turns:
            steps.append((INSERT_TURN, turns))
            steps.append((ADVANCE_SESSION, [(reply_id, count, sid) for sid, (reply_id, count) in tips.items()]))
        if self.lines is not None:
            # Before the write: a database another process holds locked (a VACUUM, say)
            # delays the rows, and a crash mid-write loses them, but not these lines.
            self.lines([r for _, records in batches for r in records if r.log_line], self.give_way)
        self._write_all(steps, rows)
        self.records_done += sum(len(records) for _, records in batches)

    def _write_all(self, steps: list[Group], rows: list[tuple[Any, ...]]) -> None:
        try:
            self._write(steps, rows)
            self.written += len(rows)
        except Exception as e:  # SQLite's, or a value it cannot bind (an int past 64 bits)
            self.log("warning", "log_batch_failed", error=repr(e), records=len(rows), statements=len(steps))
            self._rollback()
            for sql, many in steps:
                for params in many:
                    self._one(sql, params)
            for row in rows:
                self.written += self._one(INSERT_REQUEST, row, index=True)

    def _write(self, steps: list[Group], rows: list[tuple[Any, ...]]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        for sql, many in steps:
            conn.executemany(sql, many)
        if rows:
            (last,) = conn.execute(LAST_ROWID).fetchone()
            conn.executemany(INSERT_REQUEST, rows)
            conn.execute(INDEX_SINCE, (last,))
        conn.execute("COMMIT")

    def _one(self, sql: str, params: Sequence[Any], *, index: bool = False) -> bool:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            last = self.conn.execute(LAST_ROWID).fetchone()[0] if index else None
            self.conn.execute(sql, params)
            if index:
                self.conn.execute(INDEX_SINCE, (last,))
            self.conn.execute("COMMIT")
            return True
        except Exception as e:  # this item only: the writer goes on with the next
            self.failed += 1
            self.log("error", "log_write_failed", error=repr(e), sql=sql.split("(")[0].strip()[:60])
            self._rollback()
            return False

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


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
def serve(inp: int, out: BinaryIO) -> None:
    """Read frames from `inp` until end of input, writing as they come."""

    def emit(obj: object) -> None:
        try:
            out.write(frame(obj))
            out.flush()
        except OSError:  # the daemon is gone: what it sent is still committed
            pass

    frames = Frames()
    pending: list[Any] = []
    eof = False
    while not pending:  # the config frame
        data = os.read(inp, 1 << 16)
        if not data:
            return
        pending += frames.feed(data)
    cfg = pending.pop(0)
    from ..logsetup import line_renderer, setup_logging  # structlog: only this process's start-up pays it

    redactor = Redactor(cfg["secrets"])
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

    sink = Sink(open_db(cfg["db"]), max_body_bytes=cfg["max_body_bytes"], redactor=redactor, emit=emit, lines=lines)
    while not eof or pending:
        # Take what was sent (the daemon writes while we commit), lingering a little for
        # more unless asked to sync, then write it.
        deadline = None
        records = 0
        while not eof:
            if pending:
                if records >= MAX_BATCH_RECORDS or any(f[0] == "sync" for f in pending):
                    break
                deadline = deadline or time.monotonic() + LINGER_S
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([inp], [], [], wait)[0]:
                    break
            data = os.read(inp, 1 << 20)
            if not data:
                eof = True
                break
            new = list(frames.feed(data))
            records += sum(len(f[2]) for f in new if f[0] == "batch")
            pending += new
        batches = [(f[1], f[2]) for f in pending if f[0] == "batch"]
        syncs = [f[1] for f in pending if f[0] == "sync"]
        pending = []
        if batches:
            sink.apply(batches)
        emit(("progress", sink.records_done, sink.written, sink.failed, max(syncs) if syncs else None))
    sink.conn.close()


def main() -> None:
    # Ctrl-C reaches the whole process group, and a service manager may signal every
    # process of the unit: the daemon decides when logging ends, by closing our input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal hangs up its whole process group too
    serve(sys.stdin.fileno(), sys.stdout.buffer)


if __name__ == "__main__":
    main()
