"""The log database: migrations from blank, the writer's batching, truncation and redaction."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sqlite3
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_router.logsetup import line_renderer, setup_logging
from provider_router.store import LogWriter, Redactor, RequestRecord, connect, sink
from provider_router.records import iso, request_line
from provider_router import history
from provider_router.store.migrations import MIGRATIONS, migrate, migrate_file
from tests.waiting import until


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
    assert {"requests", "messages", "messages_fts", "blobs", "rollups", "sessions", "turns"} <= tables


async def test_writer_cuts_redacts_and_indexes(tmp_path: Path) -> None:
    """Records are written with a message over the per-message cap cut (and the cut said),
    a body that is not a chat request over the body cap cut, secrets redacted wherever they
    are, and every message's text searchable once."""
    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"), max_body_bytes=2000, max_message_bytes=1500, secrets=["sk-canary-secret"])
    await writer.start()
    for i in range(250):
        rec = RequestRecord("POST", "/v1/chat/completions")
        text = "A" * 5000 if i == 0 else f"zebra number {i} sk-canary-secret"
        rec.request_body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
        rec.error = "bad key sk-canary-secret" if i == 1 else None
        rec.finish(200, "ok")
        writer.submit(rec)
    other = RequestRecord("POST", "/v1/embeddings")
    other.request_body = b"B" * 3000
    other.finish(200, "ok")
    writer.submit(other)
    await writer.stop()
    await conn.close()
    db = sqlite3.connect(tmp_path / "x.db")
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 251
    [(body, cut)] = db.execute("SELECT m.body, r.cut FROM requests r JOIN messages m ON m.id = r.tip_message WHERE r.cut IS NOT NULL AND r.path LIKE '%chat%'")
    assert len(body) < 1500 and "[cut " in orjson.loads(body)["content"] and cut == "messages[0]"
    [(blob, cut)] = db.execute("SELECT b.data, r.cut FROM requests r JOIN blobs b ON b.id = r.body_blob")
    assert blob == "B" * 2000 and cut == "request body"
    errors = [r[0] for r in db.execute("SELECT error FROM requests WHERE error IS NOT NULL")]
    assert errors == ["bad key [REDACTED]"]
    assert db.execute("SELECT count(*) FROM messages WHERE body LIKE '%sk-canary%'").fetchone()[0] == 0
    hits = db.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'zebra AND 17'").fetchone()[0]
    assert hits == 1
    assert db.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'canary'").fetchone()[0] == 0
    assert writer.written == 251 and writer.dropped == 0


async def test_full_queue_drops_and_counts_when_so_configured(tmp_path: Path) -> None:
    """With `when_full="drop"`, records past a full queue are dropped and counted; submit
    never blocks."""
    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"), max_queue=10, when_full="drop")  # not started: nothing drains
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
    first = writer.process
    assert first is not None and writer.written == 3
    with structlog.testing.capture_logs() as logs:
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()
        await writer.drained()  # waits for the replacement
        submit(4)
        await writer.drained()
    assert writer.process is not None and writer.process.pid != first.pid
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
    proc = writer.process
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


def test_reply_fields_the_log_cannot_store_are_left_out(tmp_path: Path) -> None:
    """Token counts are kept as numbers (or digits) in SQLite's 64-bit range, a reply id as
    a string (an integer becomes its digits), a finish reason as a string: anything else
    would fail the record's row."""
    asyncio_run_migrations(tmp_path / "w.db")
    db = sink.open_db(str(tmp_path / "w.db"))
    out = sink.Sink(db, max_body_bytes=1000, redactor=Redactor([]), emit=lambda _: None)
    rec = RequestRecord("POST", "/v1/chat/completions")
    rec.request_body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    rec.response_body = orjson.dumps({
        "id": 7, "choices": [{"message": {"content": "hi", "reasoning": True}, "finish_reason": {"x": 1}}],
        "usage": {"prompt_tokens": "12", "completion_tokens": [1], "total_tokens": 9_223_372_036_854_775_808},
    })  # fmt: skip
    rec.reply_format = "completion"
    rec.finish(200, "ok")
    out.apply([([], [rec])])
    row = db.execute("SELECT prompt_tokens, completion_tokens, total_tokens, reply_id, finish_reason FROM requests").fetchone()
    assert row == (12, None, None, "7", None) and out.failed == 0


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
    assert [m[2] for m in logged] == ["log_write_failed"]  # type: ignore[index]
    assert logged[0][3]["counts"] == {"log_record_failed": 1}  # type: ignore[index]


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


@given(st.text(max_size=40))
def test_any_search_text_is_a_valid_query_that_finds_its_own_words(text: str) -> None:
    """Whatever a user types after `logs -q` is a query the index runs (never a syntax
    error), and a message made of that text is found by it."""
    from provider_router.store.queries import fts_query

    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE f USING fts5(text, content='', detail=none)")
    db.execute("INSERT INTO f (rowid, text) VALUES (1, ?)", (text.replace("*", " "),))
    query = fts_query(text)
    if query is not None:
        assert db.execute("SELECT rowid FROM f WHERE f MATCH ?", (query,)).fetchall() == [(1,)]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 4 * 86400), min_size=1, max_size=40), st.floats(0, 4 * 86400))
def test_stats_since_any_time_count_each_request_once(offsets: list[float], cut: float) -> None:
    """Stats since any moment read whole days, then hours, then minutes of the roll-ups:
    they count exactly the requests received since that moment's minute, each once."""
    import asyncio

    import aiosqlite

    from provider_router.store import stats as stats_q
    from provider_router.store.migrations import migrate_file

    base = 1_790_000_000.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.db"
        migrate_file(str(path))
        out = sink.Sink(sink.open_db(str(path)), max_body_bytes=1000, redactor=Redactor([]), emit=lambda _: None)
        records = []
        for o in offsets:
            r = RequestRecord("POST", "/v1/chat/completions", started=base + o)
            r.model, r.provider = "m", "p"
            r.finish(200, "ok")
            records.append(r)
        out.apply([([], records)])
        since = iso(base + cut)

        async def read() -> int:
            async with aiosqlite.connect(path) as conn:
                return (await stats_q.stats(conn, since)).total.requests

        expected = sum(iso(r.started)[:16] >= since[:16] for r in records)
        assert asyncio.run(read()) == expected


async def test_stopping_while_a_killed_writer_awaits_its_replacement_loses_nothing(tmp_path: Path) -> None:
    """The writer process dies and the daemon stops before the replacement has started:
    the records queued meanwhile are still handed to a writer process and committed."""
    import os
    import signal

    conn = await connect(tmp_path / "x.db")
    writer = LogWriter(str(tmp_path / "x.db"))
    await writer.start()
    first = writer.process
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    await first.wait()
    for _ in range(5):
        rec = RequestRecord("GET", "/v1/models")
        rec.finish(200, "ok")
        writer.submit(rec)
    await writer.stop()
    await conn.close()
    assert sqlite3.connect(tmp_path / "x.db").execute("SELECT count(*) FROM requests").fetchone()[0] == 5


async def test_the_writer_process_writes_everything_while_giving_way_at_every_chance(tmp_path: Path) -> None:
    """The sink gives the CPU away between records and from inside SQLite's statements (its
    progress handler): doing so at every chance still writes every record."""
    conn = await connect(tmp_path / "w.db")
    await conn.close()
    db = sink.open_db(str(tmp_path / "w.db"))
    out = sink.Sink(db, max_body_bytes=1000, redactor=Redactor([]), emit=lambda _: None)
    out.give_way.every = 0.0  # give way at every chance
    records = [RequestRecord("POST", "/v1/chat/completions") for _ in range(50)]
    for r in records:
        r.finish(200, "ok")
    out.apply([([], records)])
    assert (out.written, out.failed) == (50, 0)
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 50


def test_a_prune_by_another_connection_is_not_undone_by_the_writers_memory(tmp_path: Path) -> None:
    """Retention (or `db prune`) deletes a conversation's old messages through its own
    connection while the writer runs: the writer's next request of that conversation stores
    its history again rather than pointing at messages that are gone."""
    import asyncio

    import aiosqlite

    from provider_router.store import queries, retention
    from provider_router.store.migrations import migrate_file

    path = tmp_path / "p.db"
    migrate_file(str(path))
    out = sink.Sink(sink.open_db(str(path)), max_body_bytes=1000, redactor=Redactor([]), emit=lambda _: None)
    messages = [{"role": "user", "content": "old question"}]

    def record(started: float) -> RequestRecord:
        r = RequestRecord("POST", "/v1/chat/completions", started=started)
        r.session_id = "s"
        r.request_body = orjson.dumps({"model": "m", "messages": messages})
        r.response_body = orjson.dumps({"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "old answer"}, "finish_reason": "stop"}]})
        r.reply_format = "chat"
        r.finish(200, "ok")
        return r

    out.apply([([], [record(1_000_000.0)])])

    async def prune() -> int:
        async with aiosqlite.connect(path) as conn:
            return (await retention.prune(conn, iso(2_000_000.0))).messages

    assert asyncio.run(prune()) == 2
    again = record(3_000_000.0)
    out.apply([([], [again])])

    async def read() -> dict[str, object]:
        async with aiosqlite.connect(path) as conn:
            return await queries.get_request(conn, again.id)  # type: ignore[return-value]

    got = asyncio.run(read())
    assert got["request"]["messages"] == messages and got["response_text"] == "old answer"  # type: ignore[index]


async def test_the_writer_copies_its_wal_into_the_database_file_as_it_goes(tmp_path: Path) -> None:
    """What the writer commits reaches the database file itself while it runs (its own
    checkpoints, beside its commits), not only at the daemon's periodic truncation or after
    SQLite's default 1,000 pages: a few MiB of records are in the main file soon after."""
    path = tmp_path / "x.db"
    conn = await connect(path)
    await conn.close()
    start = path.stat().st_size
    writer = LogWriter(str(path))
    await writer.start()
    try:
        for i in range(600):
            rec = RequestRecord("POST", "/v1/chat/completions")
            words = " ".join(f"w{i}x{j}" for j in range(700))  # about 5 KB of distinct text
            rec.request_body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": words}]})
            rec.finish(200, "ok")
            writer.submit(rec)
        await writer.drained()
        # The checkpoint runs in the writer process: the file is what there is to watch.
        await until(lambda: path.stat().st_size >= start + (2 << 20), "the records in the database file")
    finally:
        await writer.stop()
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 600
    busy, frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, frames) == (0, done)  # nothing left behind in the WAL at stop


def test_writers_of_several_instances_on_one_file_lose_nothing(tmp_path: Path) -> None:
    """`serve --workers N` runs a log writer per worker on one file: each batch is prepared
    inside its write transaction, so writers racing with growing conversations (new
    messages, shared openings, the same tool list) never pick the same ids or make a node
    twice; every row is written, each message stored once, and every request reads back."""
    from provider_router.history import node_keys

    path = tmp_path / "w.db"
    migrate_file(str(path))
    tools = [{"type": "function", "function": {"name": "read_file", "description": "x" * 200}}]

    def records(writer: int) -> list[RequestRecord]:
        out = []
        for conv in range(6):  # conversations 0-2 open the same way in every writer
            history: list[dict[str, Any]] = [{"role": "system", "content": f"agent {conv % 3}"}]
            for turn in range(8):
                history.append({"role": "user", "content": f"c{conv % 3} turn {turn}" if conv < 3 and turn == 0 else f"w{writer} c{conv} t{turn}"})
                r = RequestRecord("POST", "/v1/chat/completions")
                r.session_id = f"w{writer}c{conv}"
                r.request_body = orjson.dumps({"model": "m", "messages": history, "tools": tools})
                answer = {"role": "assistant", "content": f"answer w{writer} c{conv} t{turn}"}
                r.response_body = orjson.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": answer, "finish_reason": "stop"}]})
                r.reply_format = "completion"
                r.finish(200, "ok")
                out.append(r)
                history = [*history, answer]
        return out

    work = [records(w) for w in range(3)]
    start = threading.Barrier(len(work))
    done: list[tuple[int, int]] = []

    def run(mine: list[RequestRecord]) -> None:  # a writer process's sink, on its own connection
        s = sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)
        start.wait()
        for i in range(0, len(mine), 3):  # small batches: the writers take turns often
            s.apply([([], mine[i : i + 3])])
        done.append((s.written, s.failed))

    threads = [threading.Thread(target=run, args=(mine,)) for mine in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done == [(len(work[0]), 0)] * len(work)
    db = sqlite3.connect(path)
    (stored, distinct) = db.execute("SELECT count(*), count(DISTINCT hash) FROM messages").fetchone()
    positions = set()
    for mine in work:
        for r in mine:
            body = orjson.loads(r.request_body)  # type: ignore[arg-type]
            keys = node_keys(body["messages"])
            positions |= {*keys, history.node_key(keys[-1], orjson.loads(r.response_body)["choices"][0]["message"])}  # type: ignore[arg-type]
    assert stored == distinct == len(positions)
    ids = [r.id for mine in work for r in mine]
    assert db.execute("SELECT count(*) FROM requests").fetchone() == (len(ids),)
    db.close()
    got = asyncio.run(_read_all(path, ids))
    for r, row in zip([r for mine in work for r in mine], got):
        assert row["request"] == orjson.loads(r.request_body)  # type: ignore[arg-type]


async def _read_all(path: Path, ids: list[str]) -> list[dict[str, Any]]:
    import aiosqlite

    from provider_router.store import queries

    conn = await aiosqlite.connect(path)
    try:
        return [await queries.get_request(conn, i) for i in ids]  # type: ignore[misc]
    finally:
        await conn.close()
