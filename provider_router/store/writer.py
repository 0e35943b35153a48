"""The single writer task: request records and state changes, batched into SQLite.

Handlers never wait on the database. Records go into a bounded buffer (full: dropped and
counted, never blocking a request); state changes go into an unbounded one (they are
state, not telemetry). One task drains both, in order, one transaction per batch.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import aiosqlite
import orjson
import structlog

from .records import RequestRecord, iso

log = structlog.get_logger("provider_router.writer")

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

Params = Callable[[], Sequence[Any]]


class _Pending:
    """One queued state change. `params` is called at flush time, so a `latest()` entry
    written many times between two flushes is built and written once, with its newest state."""

    __slots__ = ("sql", "params", "key", "barrier")

    def __init__(self, sql: str, params: Params, key: str | None = None, barrier: bool = False) -> None:
        self.sql, self.params, self.key, self.barrier = sql, params, key, barrier


class Redactor:
    """Replaces every configured secret in text with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        uniq = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._re = re.compile("|".join(map(re.escape, uniq))) if uniq else None
        self._bre = re.compile(b"|".join(re.escape(s.encode()) for s in uniq)) if uniq else None

    def __call__(self, text: str | None) -> str | None:
        if text is None or self._re is None:
            return text
        return self._re.sub("[REDACTED]", text)

    def bytes(self, data: bytes) -> bytes:
        if self._bre is None or not self._bre.search(data):
            return data
        return self._bre.sub(b"[REDACTED]", data)


class LogWriter:
    """Owns the write connection. `submit()` a record; `execute()` or `latest()` a state change.

    Start with `start()`, stop with `await stop()`, which flushes everything queued.
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        *,
        max_queue: int = 10_000,
        max_body_bytes: int = 1024 * 1024,
        redactor: Redactor | None = None,
        batch_size: int = 1000,
        linger: float = 0.05,
    ) -> None:
        self._conn = conn
        self._records: deque[RequestRecord] = deque()
        self._statements: deque[_Pending] = deque()
        self._latest: dict[str, _Pending] = {}
        self._max_queue = max_queue
        self._max_body = max_body_bytes
        self._redact = redactor or Redactor(())
        self._batch = batch_size
        # Write-behind: gather for `linger` seconds (or a full batch) before writing. Every
        # flush costs several thread round trips; paid per record, they were the largest
        # part of the proxy's per-request CPU. `drained()` and `stop()` skip the wait.
        self._linger = linger
        self._urgent = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.written = 0
        self.dropped = 0
        self.failed = 0  # statements or records that could not be written at all
        self._last_drop_warning = 0.0

    # -- producers -------------------------------------------------------------------
    def submit(self, record: RequestRecord) -> None:
        """Queue a finished record; never blocks. Drops (and counts) when the queue is full."""
        if len(self._records) >= self._max_queue:
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_warning > 5.0:
                self._last_drop_warning = now
                log.warning("log_queue_full", dropped_total=self.dropped, queue=self._max_queue)
            return
        self._records.append(record)
        self._kick()

    def execute(self, sql: str, params: Sequence[Any] = (), *, barrier: bool = False) -> None:
        """Queue a state change; never dropped. A `barrier` (e.g. a delete) is applied after
        everything queued before it and before everything queued after it."""
        self._statements.append(_Pending(sql, lambda: params, barrier=barrier))
        if barrier:
            self._latest.clear()  # a later `latest()` must not be folded into an entry before it
        self._kick()

    def latest(self, key: str, sql: str, params: Params) -> None:
        """Queue writing the newest state of `key` (e.g. a session row): repeated calls
        before the next flush coalesce into one write, built when flushed."""
        pending = self._latest.get(key)
        if pending is not None:
            pending.params = params
            return
        pending = self._latest[key] = _Pending(sql, params, key)
        self._statements.append(pending)
        self._kick()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if len(self._records) >= self._batch or len(self._statements) >= self._batch:
            self._urgent.set()

    @property
    def depth(self) -> int:
        return len(self._records) + len(self._statements)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-writer")

    async def stop(self) -> None:
        """Flush everything queued, then end the task."""
        self._stopping = True
        self._urgent.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._flush()

    async def drained(self) -> None:
        """Wait until everything queued so far is committed (tests, CLI, shutdown)."""
        while self.depth or not self._idle.is_set():
            self._urgent.set()
            await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self._urgent.is_set() and self._linger > 0:
                try:
                    async with asyncio.timeout(self._linger):
                        await self._urgent.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            self._urgent.clear()
            await self._flush()
            if self._stopping:
                return

    # -- writing ---------------------------------------------------------------------
    def _take_statements(self) -> list[tuple[str, list[Sequence[Any]]]]:
        """Dequeue a batch of state changes as (sql, [params, ...]) groups in a safe order:
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

        for _ in range(min(len(self._statements), self._batch)):
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

    async def _flush(self) -> None:
        while self._records or self._statements:
            groups = self._take_statements()
            recs = [self._records.popleft() for _ in range(min(len(self._records), self._batch))]
            rows = [self._row(r) for r in recs]
            try:
                await self._write(groups, rows)
            except Exception as e:
                # One bad row must not cost the batch: retry one by one, skipping only failures.
                log.warning("log_batch_failed", error=repr(e), records=len(rows), statements=len(groups))
                await self._rollback()
                for sql, many in groups:
                    for params in many:
                        await self._one(sql, params)
                for row in rows:
                    self.written += await self._one(INSERT_REQUEST, row, index=True)
            else:
                self.written += len(rows)
        self._idle.set()

    async def _write(self, groups: list[tuple[str, list[Sequence[Any]]]], rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        await conn.execute("BEGIN IMMEDIATE")
        for sql, many in groups:
            await conn.executemany(sql, many)
        if rows:
            async with conn.execute(LAST_ROWID) as cur:
                (last,) = await cur.fetchone()  # type: ignore[misc]
            await conn.executemany(INSERT_REQUEST, rows)
            await conn.execute(INDEX_SINCE, (last,))
        await conn.commit()

    async def _one(self, sql: str, params: Sequence[Any], *, index: bool = False) -> bool:
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            if index:
                async with self._conn.execute(LAST_ROWID) as cur:
                    (last,) = await cur.fetchone()  # type: ignore[misc]
            await self._conn.execute(sql, params)
            if index:
                await self._conn.execute(INDEX_SINCE, (last,))
            await self._conn.commit()
            return True
        except Exception as e:
            self.failed += 1
            log.error("log_write_failed", error=repr(e), sql=sql.split("(")[0].strip()[:60])
            await self._rollback()
            return False

    async def _rollback(self) -> None:
        if self._conn.in_transaction:
            await self._conn.rollback()

    # -- row building (off the request path) -----------------------------------------
    def _text(self, value: str | None) -> str | None:
        if value is None:
            return None
        return self._redact(value)

    def _body(self, data: bytes | None) -> str | None:
        if data is None:
            return None
        extra = len(data) - self._max_body
        if extra > 0:
            data = data[: self._max_body]
        text = data.decode("utf-8", "replace")
        if extra > 0:
            text += TRUNCATED_MARK.format(n=extra)
        return self._redact(text)

    def _attempts(self, attempts: list[dict[str, Any]] | None) -> str | None:
        if not attempts:
            return None
        # A failed attempt's error quotes the upstream's answer, which may echo our key.
        return orjson.dumps([{**a, "error": self._text(a.get("error"))} for a in attempts]).decode()

    def _row(self, r: RequestRecord) -> tuple[Any, ...]:
        if r.assemble is not None:
            try:
                r.assemble(r)
                r.assemble = None
            except Exception as e:  # a malformed upstream stream still gets its record
                r.error = r.error or f"could not assemble stream: {e!r}"
        return (
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

