"""The daemon's side of the log: request records and state changes, handed to the log
writer process (`sink.py`) in batches.

Handlers never wait on the database, and the event loop never builds rows or runs SQLite:
a finished record is queued as it is, and every few milliseconds the queue is pickled
into one frame for the writer process, which assembles replies, redacts, and commits on
the other core. Records not yet committed are bounded in number and in bytes: past either
bound new requests wait for room (`room()`, the default) or, if so configured, records
are dropped and counted. State changes are never dropped.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from collections import deque
from typing import Any, Callable, Sequence

import structlog

from ..records import RequestRecord, as_fields
from .sink import Frames, frame, frame_parts

log = structlog.get_logger("provider_router.writer")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where `provider_router` imports from

Params = Callable[[], Sequence[Any]]
FRAME_BYTES = 1 << 20  # records' bodies per frame to the writer process (one record at least)
PIPE_BUFFER_BYTES = 8 << 20  # handed over but not yet read by the process: stop pickling more


def _size(r: RequestRecord) -> int:
    return len(r.request_body or b"") + len(r.response_body or b"") + len(r.stream_body or b"")


class _Pending:
    """One queued state change. `params` is called at flush time, so a `latest()` entry
    written many times between two flushes is built and written once, with its newest state."""

    __slots__ = ("sql", "params", "key", "barrier")

    def __init__(self, sql: str, params: Params, key: str | None = None, barrier: bool = False) -> None:
        self.sql, self.params, self.key, self.barrier = sql, params, key, barrier


class LogWriter:
    """`submit()` a record; `execute()` or `latest()` a state change.

    `await start()` starts the writer process; `await stop()` hands it everything queued
    and waits until it has committed and exited.
    """

    def __init__(
        self,
        db_path: str,
        *,
        max_queue: int = 10_000,
        max_queue_bytes: int = 256 << 20,
        when_full: str = "wait",
        max_body_bytes: int = 8 << 20,
        max_message_bytes: int = 8 << 20,
        secrets: Sequence[str] = (),
        linger: float = 0.01,
    ) -> None:
        self._config = {
            "db": db_path, "max_body_bytes": max_body_bytes, "max_message_bytes": max_message_bytes,
            "secrets": list(secrets),
        }  # fmt: skip
        self._max_bytes = max_queue_bytes
        self._drop = when_full == "drop"
        self._bytes = 0  # bytes of records queued or in the writer process, not yet committed
        self._batches: deque[tuple[int, int]] = deque()  # (records sent up to its end, its bytes)
        self._room = asyncio.Event()
        self._room.set()
        self._records: deque[RequestRecord] = deque()
        self._statements: deque[_Pending] = deque()
        self._latest: dict[str, _Pending] = {}
        self._max_queue = max_queue
        self._linger = linger
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._reader: asyncio.Task[None] | None = None
        self._scheduled = False
        self._resume: asyncio.Future[None] | None = None  # held: the loop keeps only weak references to tasks
        self._sent = 0  # records handed to the process
        self._done = 0  # records it has finished with (written or failed)
        self._syncs: dict[int, asyncio.Future[bool]] = {}  # True: synced; False: the process died
        self._running = asyncio.Event()
        self._stopped = False
        self._base = (0, 0, 0)
        self._sync_seq = 0
        self.written = 0
        self.dropped = 0
        self.failed = 0  # statements or records that could not be written at all
        self._last_drop_warning = 0.0
        self.failing_since: float | None = None  # see `_note_progress`

    # -- producers -------------------------------------------------------------------
    def submit(self, record: RequestRecord) -> bool:
        """Queue a finished record; never blocks. With `when_full="drop"`, drops (and
        counts) it when the queue is full: False then. Otherwise it is always queued; new
        requests wait in `room()` until the queue is below its bounds again."""
        if self.full:
            if self._drop:
                self.dropped += 1
                now = time.monotonic()
                if now - self._last_drop_warning > 5.0:
                    self._last_drop_warning = now
                    log.warning("log_queue_full", dropped_total=self.dropped, queue=self._max_queue)
                return False
            if self._room.is_set():
                self._room.clear()
                log.warning("log_queue_full_waiting", queue=self.depth, queue_bytes=self._bytes)
        self._records.append(record)
        self._bytes += _size(record)
        self._schedule()
        return True

    @property
    def full(self) -> bool:
        return len(self._records) + self._sent - self._done >= self._max_queue or self._bytes >= self._max_bytes

    async def room(self) -> None:
        """Wait until the queue is below its bounds (at once when it is, or when records
        are dropped rather than waited for): the back-pressure on new requests."""
        if not self._drop and self.full:
            self._room.clear()
            while self.full and not self._stopped:
                await self._room.wait()
                if self.full:
                    self._room.clear()

    def _freed(self) -> None:
        while self._batches and self._batches[0][0] <= self._done:
            self._bytes -= self._batches.popleft()[1]
        if not self.full:
            self._room.set()

    def execute(self, sql: str, params: Sequence[Any] = (), *, barrier: bool = False) -> None:
        """Queue a state change; never dropped. A `barrier` (e.g. a delete) is applied after
        everything queued before it and before everything queued after it."""
        self._statements.append(_Pending(sql, lambda: params, barrier=barrier))
        if barrier:
            self._latest.clear()  # a later `latest()` must not be folded into an entry before it
        self._schedule()

    def latest(self, key: str, sql: str, params: Params) -> None:
        """Queue writing the newest state of `key` (e.g. a session row): repeated calls
        before the next flush coalesce into one write, built when flushed."""
        pending = self._latest.get(key)
        if pending is not None:
            pending.params = params
            return
        pending = self._latest[key] = _Pending(sql, params, key)
        self._statements.append(pending)
        self._schedule()

    def _schedule(self) -> None:
        # Hand over every `linger` seconds: one pickle and one pipe write for many records.
        if not self._scheduled and self._proc is not None:
            self._scheduled = True
            asyncio.get_running_loop().call_later(self._linger, self._flush)

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        """The writer process now running (None while stopped or being replaced)."""
        return self._proc

    @property
    def depth(self) -> int:
        """Records and state changes queued or in the writer process, not yet committed."""
        return len(self._records) + len(self._statements) + self._sent - self._done

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._stopped = False  # a stopped writer may start again (the database file reopened)
        self._started_at = time.monotonic()
        self._base = (self._done, self.written, self.failed)  # a new process counts from zero
        path = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "provider_router.store.sink",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        assert self._proc.stdin is not None
        # Past this, the hand-over waits for the process to read a quarter of it.
        self._proc.stdin.transport.set_write_buffer_limits(high=PIPE_BUFFER_BYTES, low=PIPE_BUFFER_BYTES // 4)
        self._proc.stdin.write(frame(self._config))
        self._reader = asyncio.create_task(self._read_replies(self._proc), name="log-writer-replies")
        self._running.set()
        if self._records or self._statements:
            self._schedule()

    async def stop(self) -> None:
        """Hand over everything queued, then wait for the writer process to commit and exit."""
        self._stopped = True
        proc = self._proc
        if proc is not None and proc.returncode is not None and self._reader is not None:
            await self._reader  # it has died: its reader counts what it took down first
            proc = self._proc
        if proc is None and self._started_at and (self._records or self._statements):
            # The process died and its replacement is not started yet: start one to hand
            # what is queued to, rather than lose it at shutdown.
            await self.start()
            self._stopped = True
            proc = self._proc
        if proc is None:
            return
        await self._hand_over_all(proc)
        self._proc = None
        self._running.clear()
        assert proc.stdin is not None
        proc.stdin.close()  # end of input: the process commits what it has and exits
        if self._reader is not None:
            await self._reader
        await proc.wait()
        self._end_syncs(True)
        self._room.set()  # nothing waits for a writer that is gone

    def _end_syncs(self, synced: bool) -> None:
        for fut in self._syncs.values():
            if not fut.done():
                fut.set_result(synced)
        self._syncs.clear()

    async def drained(self) -> None:
        """Wait until everything queued so far is committed or, if the writer process died
        meanwhile, lost (tests, CLI, shutdown). Returns at once before `start()`."""
        while not self._stopped and (self._proc is not None or self._reader is not None):
            await self._running.wait()  # a writer process that died is being replaced
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            await self._hand_over_all(proc)
            if self._proc is not proc or proc.stdin is None:
                continue  # it died meanwhile: wait for its replacement
            self._sync_seq += 1
            fut = self._syncs[self._sync_seq] = asyncio.get_running_loop().create_future()
            proc.stdin.write(frame(("sync", self._sync_seq)))
            if await fut:
                return

    # -- the hand-over ---------------------------------------------------------------
    def _take_statements(self) -> list[tuple[str, list[Sequence[Any]]]]:
        """Dequeue the state changes as (sql, [params, ...]) groups in a safe order:
        within each stretch between barriers, `latest()` rows first (the rows others refer
        to), then the rest; consecutive equal statements share one executemany."""
        groups: list[tuple[str, list[Sequence[Any]]]] = []
        firsts: list[_Pending] = []
        rest: list[_Pending] = []

        def close_stretch() -> None:
            for p in firsts + rest:
                if groups and groups[-1][0] == p.sql:
                    groups[-1][1].append(p.params())
                else:
                    groups.append((p.sql, [p.params()]))
            firsts.clear()
            rest.clear()

        while self._statements:
            p = self._statements.popleft()
            if p.key is not None:
                if self._latest.get(p.key) is p:
                    del self._latest[p.key]  # from now on a `latest()` queues anew
                firsts.append(p)
            elif p.barrier:
                close_stretch()
                rest.append(p)
                close_stretch()
            else:
                rest.append(p)
        close_stretch()
        return groups

    def _flush(self) -> None:
        """Hand what is queued to the writer process, a frame of at most `FRAME_BYTES` of
        records at a time, until the pipe's buffer holds `PIPE_BUFFER_BYTES`; the rest
        follows as the process reads. Small frames are cheap to pickle (a large one is
        slow to allocate and copy), and a bounded buffer lets the process start writing
        the first records while later ones are pickled, and keeps the memory a burst
        takes bounded."""
        self._scheduled = False
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        groups = self._take_statements()
        while self._records or groups:
            records, size = [], 0
            while self._records:
                n = _size(self._records[0])
                if records and size + n > FRAME_BYTES:
                    break
                r = self._records.popleft()
                r.handed = True
                records.append(r)
                size += n
            self._sent += len(records)
            if records:
                self._batches.append((self._sent, size))
            # Its length and its pickle in one write (uvloop: one writev, no copy): the
            # process is woken once per frame, not once for four bytes and again for the rest.
            proc.stdin.writelines(frame_parts(("batch", groups, [as_fields(r) for r in records])))
            for r in records:  # in the frame now: a session may hold the record, not its bodies
                r.request_body = r.response_body = r.stream_body = None
            groups = []
            if self._records and proc.stdin.transport.get_write_buffer_size() > PIPE_BUFFER_BYTES:
                self._scheduled = True  # no timer meanwhile: the resume hands over the rest
                self._resume = asyncio.ensure_future(self._resume_after_drain(proc))
                return

    async def _resume_after_drain(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        try:
            await proc.stdin.drain()
        except ConnectionError:  # the process died: its reader accounts for what it took down
            self._scheduled = False
            return
        if self._proc is proc:
            self._flush()
        else:
            self._scheduled = False

    async def _hand_over_all(self, proc: asyncio.subprocess.Process) -> None:
        """Everything queued so far into the pipe (a sync or the end of input follows)."""
        assert proc.stdin is not None
        while self._records or self._statements:
            self._flush()
            try:
                await proc.stdin.drain()
            except ConnectionError:
                return
            if self._proc is not proc:
                return

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        frames = Frames()
        while data := await proc.stdout.read(1 << 16):
            for msg in frames.feed(data):
                if msg[0] == "progress":
                    _, done, written, failed, synced = msg
                    base = self._base
                    seen = (self.written, self.failed)
                    self._done, self.written, self.failed = base[0] + done, base[1] + written, base[2] + failed
                    self._freed()
                    self._note_progress(self.written - seen[0], self.failed - seen[1])
                    if synced is not None:
                        for n in [n for n in self._syncs if n <= synced]:
                            fut = self._syncs.pop(n)
                            if not fut.done():
                                fut.set_result(True)
                elif msg[0] == "log":
                    _, level, event, fields = msg
                    getattr(log, level)(event, **fields)
        if self._proc is not proc:
            return  # stopped
        # It died (killed, out of memory): what it had not committed is lost; start anew.
        lost = self._sent - self._done
        log.error("log_writer_exited", returncode=await proc.wait(), lost=lost)
        self.failed += lost
        self._note_progress(0, lost)
        self._done = self._sent
        self._freed()
        self._proc = None
        self._running.clear()
        self._end_syncs(False)
        await asyncio.sleep(max(0.0, self._started_at + 1.0 - time.monotonic()))  # no tight restart loop
        if not self._stopped:
            await self.start()

    # -- health bookkeeping (for store/watch.py; kept apart so a rewrite can carry it over) --
    def _note_progress(self, written: int, failed: int) -> None:
        """Called for each progress report, in order, with what it added. `failing_since`
        (monotonic time) is set while the latest report that changed anything had more
        failures than rows written, and cleared by one that wrote at least as many: a
        health check sampling the counters now and then could not tell which came last."""
        if failed > written:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
        elif written:
            self.failing_since = None
