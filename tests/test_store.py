"""The log database: migrations from blank, the writer's batching, truncation and redaction."""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from provider_router import history
from provider_router.logsetup import line_renderer, setup_logging
from provider_router.store import LogWriter, Redactor, RequestRecord, connect, sink
from provider_router.store.records import iso, request_line
from provider_router.store.migrations import MIGRATIONS, migrate


async def test_blank_database_migrates(tmp_path: Path) -> None:
    """A blank file gets every migration, recorded by name; running again applies nothing."""
    conn = await connect(tmp_path / "x.db")
    try:
        assert await migrate(conn) == []
    finally:
        await conn.close()
    db = sqlite3.connect(tmp_path / "x.db")
    names = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table')")}
    assert {"requests", "requests_fts"} <= tables


async def test_writer_batches_truncates_redacts_and_indexes(tmp_path: Path) -> None:
    """Records are written with long bodies truncated (marked), secrets redacted, FTS searchable."""
    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"), max_body_bytes=100, secrets=["sk-canary-secret"])
    await writer.start()
    for i in range(250):
        rec = RequestRecord("POST", "/v1/chat/completions")
        rec.request_body = b"A" * 500 if i == 0 else b'{"x": 1}'
        rec.prompt_text = f"zebra number {i}"
        rec.error = "bad key sk-canary-secret" if i == 1 else None
        rec.finish(200, "ok")
        writer.submit(rec)
    await writer.stop()
    await conn.close()
    db = sqlite3.connect(tmp_path / "x.db")
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 250
    bodies = [r[0] for r in db.execute("SELECT request_body FROM requests ORDER BY id")]
    assert bodies[0].startswith("A" * 100) and bodies[0].endswith("[truncated 400 bytes]")
    errors = [r[0] for r in db.execute("SELECT error FROM requests WHERE error IS NOT NULL")]
    assert errors == ["bad key [REDACTED]"]
    hits = db.execute("SELECT count(*) FROM requests_fts WHERE requests_fts MATCH 'zebra AND 17'").fetchone()[0]
    assert hits == 1
    assert writer.written == 250 and writer.dropped == 0


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    """When the queue is full, records are dropped and counted; submit never blocks."""
    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"), max_queue=10)  # not started: nothing drains
    for _ in range(15):
        rec = RequestRecord("GET", "/v1/models")
        rec.finish(200, "ok")
        writer.submit(rec)
    assert (writer.depth, writer.dropped) == (10, 5)
    await writer.start()
    await writer.stop()
    await conn.close()
    assert sqlite3.connect(tmp_path / "x.db").execute("SELECT count(*) FROM requests").fetchone()[0] == 10


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_iso_matches_datetime_formatting(ts: float) -> None:
    """The cached-second formatter gives exactly what datetime gives, rounding included."""
    expected = datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert iso(ts) == expected


async def test_latest_coalesces_and_barriers_keep_order(tmp_path: Path) -> None:
    """`latest()` writes a key once per flush with its newest state; a barrier (delete)
    splits the batch so a later `latest()` of the same key is applied after it."""
    conn = await connect(tmp_path / "x.db")
    await conn.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER)")
    await conn.commit()
    writer = LogWriter(str(tmp_path / "x.db"))
    upsert = "INSERT INTO kv VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"
    state = {"v": 0}
    for i in range(5):
        state["v"] = i
        writer.latest("a", upsert, lambda: ("a", state["v"]))
    assert writer.depth == 1  # five saves, one queued write
    writer.execute("DELETE FROM kv WHERE k = 'a'", barrier=True)
    writer.latest("a", upsert, lambda: ("a", 99))
    await writer.start()
    await writer.stop()
    rows = await (await conn.execute("SELECT k, v FROM kv")).fetchall()
    await conn.close()
    assert [tuple(r) for r in rows] == [("a", 99)]


async def test_database_files_are_private(tmp_path: Path) -> None:
    """The log holds every prompt: its files are created readable by the owner only."""
    conn = await connect(tmp_path / "x.db")
    await conn.execute("CREATE TABLE t (x)")
    await conn.commit()
    try:
        for suffix in ("", "-wal", "-shm"):
            mode = (tmp_path / f"x.db{suffix}").stat().st_mode & 0o777
            assert mode == 0o600, (suffix, oct(mode))
    finally:
        await conn.close()


async def test_a_killed_writer_process_is_replaced(tmp_path: Path) -> None:
    """The writer process dying (killed, out of memory) costs only what it had not committed:
    it is logged, counted as failed, and a new process takes the records that follow."""
    import os
    import signal

    import structlog

    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"))
    await writer.start()

    def submit(n: int) -> None:
        for _ in range(n):
            rec = RequestRecord("GET", "/v1/models")
            rec.finish(200, "ok")
            writer.submit(rec)

    submit(3)
    await writer.drained()
    first = writer._proc
    assert first is not None and writer.written == 3
    with structlog.testing.capture_logs() as logs:
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()
        await writer.drained()  # waits for the replacement
        submit(4)
        await writer.drained()
    assert writer._proc is not None and writer._proc.pid != first.pid
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["log_writer_exited"]
    await writer.stop()
    await conn.close()
    assert sqlite3.connect(tmp_path / "x.db").execute("SELECT count(*) FROM requests").fetchone()[0] == 7
    assert (writer.written, writer.failed, writer.depth) == (7, 0, 0)


async def test_writer_process_ignores_terminal_signals_and_commits_on_end_of_input(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the writer process outlives SIGINT/SIGTERM and
    ends only when the daemon closes its input, after committing what it was sent."""
    import os
    import signal

    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"))
    await writer.start()
    await writer.drained()  # started and configured: its handlers are in place
    proc = writer._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    for _ in range(5):
        rec = RequestRecord("GET", "/v1/models")
        rec.finish(200, "ok")
        writer.submit(rec)
    await writer.stop()
    await conn.close()
    assert proc.returncode == 0
    assert sqlite3.connect(tmp_path / "x.db").execute("SELECT count(*) FROM requests").fetchone()[0] == 5


@pytest.mark.parametrize("json", [True, False])
def test_a_batch_rendered_line_is_the_one_the_logger_writes(json: bool) -> None:
    """The writer process renders a batch's request lines with `line_renderer` and writes
    them at once: each line byte for byte what the configured logger writes, redacted."""
    secret = "sk-line-secret-123"
    rec = RequestRecord("POST", "/v1/chat/completions")
    rec.model, rec.client, rec.session_id = f"model-{secret}", "team", "s1"
    rec.finish(200, "ok")
    written = io.TextIOWrapper(io.BytesIO(), write_through=True)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("info", json=json, stream=written, redact=Redactor([secret]))
    try:
        structlog.get_logger("provider_router.request").info("request", **request_line(rec))
        rendered = line_renderer()("request", request_line(rec))
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    assert rendered == written.buffer.getvalue()  # type: ignore[attr-defined]
    assert secret.encode() not in rendered and rec.id.encode() in rendered


def test_a_row_sqlite_cannot_take_costs_only_itself(tmp_path: Path) -> None:
    """A value no SQLite column holds (an integer past 64 bits from some upstream's usage)
    fails its own row, counted and logged; the batch's other rows are written and the
    writer goes on."""
    asyncio_run_migrations(tmp_path / "w.db")
    db = sink.open_db(str(tmp_path / "w.db"))
    logged: list[object] = []
    out = sink.Sink(db, max_body_bytes=1000, redactor=Redactor([]), emit=logged.append)
    records = [RequestRecord("POST", "/v1/chat/completions") for _ in range(3)]
    for r in records:
        r.finish(200, "ok")
    records[1].prompt_tokens = 2**64
    out.apply([([], records)])
    assert (out.written, out.failed) == (2, 1)
    stored = {r[0] for r in db.execute("SELECT id FROM requests")}
    assert stored == {records[0].id, records[2].id}
    assert [m[2] for m in logged] == ["log_batch_failed", "log_write_failed"]  # type: ignore[index]
    later = RequestRecord("POST", "/v1/chat/completions")
    later.finish(200, "ok")
    out.apply([([], [later])])
    assert out.written == 3


def asyncio_run_migrations(path: Path) -> None:
    import asyncio

    async def migrate_only() -> None:
        await (await connect(path)).close()

    asyncio.run(migrate_only())


def test_reply_fields_the_log_cannot_store_are_left_out() -> None:
    """Token counts are kept as numbers (or digits) in SQLite's 64-bit range, a reply id as
    a string (an integer becomes its digits), reasoning and finish reason as strings:
    anything else would fail the record's row."""
    from provider_router.api.assemble import assemble_completion

    rec = RequestRecord("POST", "/v1/chat/completions")
    rec.response_body = orjson.dumps({
        "id": 7, "choices": [{"message": {"content": "hi", "reasoning": True}, "finish_reason": {"x": 1}}],
        "usage": {"prompt_tokens": "12", "completion_tokens": [1], "total_tokens": 9_223_372_036_854_775_808},
    })  # fmt: skip
    assemble_completion(rec)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens, rec.reply_id) == (12, None, None, "7")
    assert (rec.response_text, rec.reasoning_text, rec.finish_reason) == ("hi", None, None)
    rec.response_body = b'{"id": "c", "choices": [], "usage": {"prompt_tokens": 18446744073709551616, "total_tokens": 2.5, "completion_tokens": true}}'
    assemble_completion(rec)  # the typed reading's exact big integer, too
    assert (rec.prompt_tokens, rec.total_tokens, rec.completion_tokens, rec.reply_id) == (None, 2.5, None, "c")


def test_a_record_whose_row_cannot_be_built_costs_only_itself(tmp_path: Path) -> None:
    asyncio_run_migrations(tmp_path / "w.db")
    db = sink.open_db(str(tmp_path / "w.db"))
    logged: list[object] = []
    out = sink.Sink(db, max_body_bytes=1000, redactor=Redactor(["sk-secret"]), emit=logged.append)
    records = [RequestRecord("POST", "/v1/chat/completions") for _ in range(3)]
    for r in records:
        r.finish(200, "ok")
    records[1].user_agent = 5  # type: ignore[assignment]  # not text: redacting it raises
    out.apply([([], records)])
    assert (out.written, out.failed, out.records_done) == (2, 1, 3)
    assert [m[2] for m in logged] == ["log_record_failed"]  # type: ignore[index]


async def test_the_writer_process_gives_way_while_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink yields the CPU between records and from inside SQLite's statements, so a
    proxy process woken meanwhile does not wait out its time slice; and still writes all."""
    conn = await connect(tmp_path / "w.db")
    await conn.close()
    yields: list[int] = []
    monkeypatch.setattr(sink.os, "sched_yield", lambda: yields.append(1))
    db = sink.open_db(str(tmp_path / "w.db"))
    out = sink.Sink(db, max_body_bytes=1000, redactor=Redactor([]), emit=lambda _: None)
    out.give_way.every = 0.0  # give way at every chance
    records = [RequestRecord("POST", "/v1/chat/completions") for _ in range(50)]
    for r in records:
        r.finish(200, "ok")
    out.apply([([], records)])
    assert out.written == 50 == db.execute("SELECT count(*) FROM requests").fetchone()[0]
    in_sqlite = len(yields) - 50
    assert in_sqlite > 0  # the progress handler ran inside the statements
    out.give_way.every = 3600.0
    out.give_way()  # due now: yields, next due in an hour
    yields.clear()
    out.give_way()
    out.give_way()
    assert yields == []  # not yet due: no system call


def test_log_lines_reach_a_non_blocking_stderr_whole() -> None:
    """The writer process writes a batch's lines with one call; a non-blocking pipe (left so
    by some parents) takes 64 KiB at a time, and every line still arrives whole."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    data = b"".join(b'{"event":"request","n":%d}\n' % i for i in range(40_000))  # ~1 MiB
    got = bytearray()

    def read() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        sink.write_all(w, data)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == data


_values = st.one_of(st.none(), st.text(max_size=6), st.integers(-(2**63), 2**63 - 1), st.lists(st.dictionaries(st.sampled_from(["type", "text"]), st.text(max_size=4), max_size=2), max_size=2))
_said = st.one_of(
    st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), _values), "content": _values, "tool_calls": st.just([{"id": "t"}]), "name": st.just("n")}),
    _values,
)
_asked = st.one_of(st.fixed_dictionaries({"model": st.just("m")}, optional={"messages": st.one_of(st.lists(_said, max_size=4), _values), "tools": st.just([{"type": "function"}])}), _values)


@given(_asked)
def test_the_writer_reads_a_requests_messages_as_the_generic_reading_does(body: object) -> None:
    """The typed decoding of a request's messages (role and content only) gives the
    canonical messages a field-by-field reading of the parsed body gives, or the same failure."""
    data = orjson.dumps(body)

    def generic() -> object:
        messages = orjson.loads(data).get("messages") or []
        return [history.canon(m) for m in messages if isinstance(m, dict)]

    def outcome(read: object) -> object:
        try:
            return read()  # type: ignore[operator]
        except Exception as e:
            return type(e).__name__

    assert outcome(lambda: sink._canons(data)) == outcome(generic)


def test_a_plain_requests_messages_skip_the_generic_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}, {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}], "tools": [{"type": "function"}]}
    monkeypatch.setattr(sink.orjson, "loads", None)  # the generic reading would call it
    assert sink._canons(orjson.dumps(body)) == [b"system\x1fBe brief.", b"user\x1fHi", b"assistant\x1f"]


def test_a_request_nested_deeper_than_the_typed_reading_recurses_still_threads() -> None:
    """orjson (the request path) accepts nesting msgspec's typed reading refuses: the
    writer then reads the messages generically instead of failing the record's turn."""
    body = b'{"metadata":{"x":' + b"[" * 1010 + b"]" * 1010 + b'},"messages":[{"role":"user","content":"hi"}]}'
    orjson.loads(body)  # what the request path accepted
    assert sink._canons(body) == [b"user\x1fhi"]
