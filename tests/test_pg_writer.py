"""The log writer on a real PostgreSQL server: the same Tree and Rows as on SQLite, written
by several writers (one per instance) into one database, read back exactly; retention
dropping a day's partition and what only it used."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any, Iterator

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provider_router import history
from provider_router.store import LogWriter, Redactor, RequestRecord, sink
from provider_router.store.pg import reads
from provider_router.store.migrations import migrate_file
from provider_router.store.pg.migrations import migrate
from provider_router.store.pg.retention import drop_days
from provider_router.store.pg.writer import PgTarget
from tests.postgres import Server
from tests.test_tree import TOOLS, _record, traces

pytestmark = pytest.mark.xdist_group("postgres")
TABLES = ("messages", "message_terms", "blobs", "requests", "rollups")


@pytest.fixture(scope="module")
def tree_db(postgres: Server) -> Iterator[str]:
    """One migrated database for the module's property test, emptied between examples."""
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute('CREATE DATABASE "pg_writer_tree" TEMPLATE template0')
    dsn = postgres.dsn("pg_writer_tree")
    migrate(dsn)
    yield dsn
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute('DROP DATABASE "pg_writer_tree" WITH (FORCE)')


def _sink(dsn: str) -> sink.Sink:
    return sink.Sink(PgTarget(dsn), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)


async def _read(dsn: str, ids: list[str]) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return [await reads.get_request(conn, i) for i in ids]  # type: ignore[misc]


def _exact(dsn: str, records: list[RequestRecord], sent: list[tuple[Any, Any]]) -> None:
    for got, (request, response) in zip(asyncio.run(_read(dsn, [r.id for r in records])), sent, strict=True):
        assert got["request"] == request
        assert got["response"] == response


def _positions(trace: list[Any]) -> set[bytes]:
    out: set[bytes] = set()
    for _, messages, reply, _ in trace:
        keys = history.node_keys(messages)
        out |= {*keys, history.node_key(keys[-1], reply)}
    return out


def _counts(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT (SELECT count(*) FROM messages), (SELECT count(DISTINCT hash) FROM messages), (SELECT count(*) FROM message_terms)"
        ).fetchone()  # type: ignore[return-value]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(traces(), st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_random_traces_written_by_two_writers_store_each_message_once_and_reconstruct_exactly(
    tree_db: str, trace: list[Any], cuts: list[int]
) -> None:
    """test_tree's random traces, each batch written by one of two writers in turn (two
    instances on one database, each with its own ids and caches): every request reads
    back as exactly the body it was sent with and the response it got; the tree holds
    one row per distinct position, and one set of search terms per message."""
    with psycopg.connect(tree_db, autocommit=True) as c:
        for table in TABLES:  # a few rows each: DELETE is faster than TRUNCATE's new files
            c.execute(f"DELETE FROM {table}")
    writers = [_sink(tree_db), _sink(tree_db)]
    records = [_record(s, m, r, f, i) for i, (s, m, r, f) in enumerate(trace)]
    sent = [(orjson.loads(r.request_body), orjson.loads(r.response_body)) for r in records]  # type: ignore[arg-type]
    start = 0
    for turn, n in enumerate(cuts * len(records)):
        if start >= len(records):
            break
        writers[turn % 2].apply([([], records[start : start + n])])
        start += n
    assert sum(w.written for w in writers) == len(records) and sum(w.failed for w in writers) == 0
    _exact(tree_db, records, sent)
    n = len(_positions(trace))
    assert _counts(tree_db) == (n, n, n)
    for w in writers:
        w.db.close()  # type: ignore[attr-defined]


def _conversations(k: int, turns: int, tag: str) -> list[list[RequestRecord]]:
    """`k` conversations of `turns` requests; conversation i of every tag opens the same
    way (a system prompt, a tool list, a first question), and goes on its own way."""
    out = []
    for i in range(k):
        conv: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"opening {i}"}]
        records = []
        for t in range(turns):
            reply = {"role": "assistant", "content": f"answer {i}.{t}" if t == 0 else f"{tag} answer {i}.{t}"}
            records.append(_record(None, conv, reply, ({"tools": TOOLS}, t % 2 == 0), t))
            conv = [*conv, reply, {"role": "user", "content": f"{tag} question {i}.{t}"}]
        out.append(records)
    return out


def test_two_writers_creating_the_same_nodes_at_once_store_them_once(pg_db: str) -> None:
    """Two writers (two instances) write conversations that open the same way, batch for
    batch at the same moment: the nodes and blobs both create meet on their hash, the
    later batch is prepared again, and nothing is lost, failed or stored twice."""
    migrate(pg_db)
    mine, theirs = _conversations(6, 4, "a"), _conversations(6, 4, "b")
    batches = [[c[t] for c in convs] for convs in (mine, theirs) for t in range(4)]
    sent = {r.id: (orjson.loads(r.request_body), orjson.loads(r.response_body)) for b in batches for r in b}  # type: ignore[arg-type]
    writers = [_sink(pg_db), _sink(pg_db)]
    together = threading.Barrier(2)

    def run(w: sink.Sink, mine: list[list[RequestRecord]]) -> None:
        for batch in mine:
            together.wait(timeout=30)
            w.apply([([], batch)])

    threads = [threading.Thread(target=run, args=(w, batches[4 * i : 4 * i + 4])) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(w.written for w in writers) == len(sent) and sum(w.failed for w in writers) == 0
    records = [r for b in batches for r in b]
    _exact(pg_db, records, [sent[r.id] for r in records])
    with psycopg.connect(pg_db) as c:
        (nodes, distinct) = c.execute("SELECT count(*), count(DISTINCT hash) FROM messages").fetchone()  # type: ignore[misc]
        (blobs,) = c.execute("SELECT count(*) FROM blobs").fetchone()  # type: ignore[misc]
        (refs,) = c.execute("SELECT refs FROM blobs").fetchone()  # type: ignore[misc]
    # One system prompt; per opening its question and first answer, shared by both tags;
    # then 3 more turns of a question and an answer per tag.
    assert nodes == distinct == 1 + 6 * (2 + 3 * 2 * 2)
    assert blobs == 1 and refs == len(sent)  # the tool list, once, used by every request
    for w in writers:
        w.db.close()  # type: ignore[attr-defined]


def _on(day: dt.date, r: RequestRecord) -> RequestRecord:
    r.started = dt.datetime.combine(day, dt.time(12), dt.timezone.utc).timestamp()
    return r


def test_retention_drops_a_whole_day_and_what_only_it_used(pg_db: str) -> None:
    """Dropping a day that has passed: its partition is gone, with its requests, the blobs
    and messages only they used; a conversation begun that day and continued the next
    keeps its history; the writer, whose memory still names the dropped nodes, goes on
    writing and every request left reads back exactly."""
    migrate(pg_db)
    old, new = dt.date(2026, 3, 1), dt.date(2026, 3, 2)
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "kept question"}]
    gone = [{"role": "user", "content": "forgotten question"}]
    big = ({"tools": [{"type": "function", "function": {"name": "only_then", "description": "x" * 200}}]}, False)
    day1 = [_on(old, _record(1, conv, {"role": "assistant", "content": "a1"}, ({}, False), 0)),
            _on(old, _record(2, gone, {"role": "assistant", "content": "gone reply"}, big, 1))]  # fmt: skip
    conv2 = [*conv, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "next day"}]
    day2 = [_on(new, _record(1, conv2, {"role": "assistant", "content": "a2"}, ({}, False), 2))]
    w = _sink(pg_db)
    w.apply([([], day1)])
    w.apply([([], day2)])
    dropped = drop_days(pg_db, before=new)
    assert dropped.days == [old.isoformat()] and dropped.requests == 2
    assert dropped.blobs == 1 and dropped.messages == 2  # the tool list; "forgotten question" and its reply
    with psycopg.connect(pg_db) as c:
        assert c.execute("SELECT to_regclass('requests_20260301')").fetchone() == (None,)
        assert c.execute("SELECT count(*) FROM requests").fetchone() == (1,)
        assert c.execute("SELECT count(*), count(*) FILTER (WHERE id IN (SELECT id FROM message_terms)) FROM messages").fetchone() == (5, 5)
    again = _on(new, _record(2, gone, {"role": "assistant", "content": "asked again"}, big, 3))
    w.apply([([], [again])])
    assert w.failed == 0
    records = [*day2, again]
    _exact(pg_db, records, [(orjson.loads(r.request_body), orjson.loads(r.response_body)) for r in records])  # type: ignore[arg-type]
    w.db.close()  # type: ignore[attr-defined]


async def test_the_log_writer_process_writes_to_a_postgresql_url(pg_db: str) -> None:
    """The daemon's log writer, given a `postgresql://` URL instead of a file, starts its
    process on it: records submitted are committed there and read back exactly."""
    migrate(pg_db)
    writer = LogWriter(pg_db)
    await writer.start()
    conv = [{"role": "user", "content": "hello from the daemon"}]
    records = [_record(1, conv, {"role": "assistant", "content": f"reply {i}"}, ({"temperature": 0.5}, False), i) for i in range(3)]
    sent = [orjson.loads(r.request_body) for r in records]  # type: ignore[arg-type]
    try:
        for r in records:
            writer.submit(r)
        await writer.drained()
    finally:
        await writer.stop()
    async with await psycopg.AsyncConnection.connect(pg_db) as conn:
        got = [await reads.get_request(conn, r.id) for r in records]
    assert [g["request"] for g in got] == sent  # type: ignore[index]
    assert [g["response_text"] for g in got] == ["reply 0", "reply 1", "reply 2"]  # type: ignore[index]


def test_a_nul_character_postgresql_text_cannot_hold_is_replaced_not_lost(pg_db: str) -> None:
    """PostgreSQL's text cannot hold U+0000, SQLite's can: a response body that is not
    JSON and carries one (a broken upstream) is stored with U+FFFD in its place, and the
    record is written, not failed."""
    migrate(pg_db)
    r = RequestRecord("POST", "/v1/chat/completions")
    r.request_body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    r.response_body, r.reply_format = b"bad\x00gateway", "chat"
    r.finish(502, "upstream_error", error="upstream said \x00")
    w = _sink(pg_db)
    w.apply([([], [r])])
    assert (w.written, w.failed) == (1, 0)
    (got,) = asyncio.run(_read(pg_db, [r.id]))
    assert got["response"] == "bad\ufffdgateway" and got["error"] == "upstream said \ufffd"
    w.db.close()  # type: ignore[attr-defined]


def test_a_writer_whose_connection_was_cut_connects_again_and_loses_nothing(pg_db: str) -> None:
    """The server ends the writer's connection between two batches (a restart, a failover,
    an administrator): the next batch finds it gone, connects again and is written;
    nothing is failed or lost."""
    migrate(pg_db)
    w = _sink(pg_db)
    conv = [{"role": "user", "content": "before and after"}]
    records = [_record(1, conv, {"role": "assistant", "content": f"r{i}"}, ({}, False), i) for i in range(4)]
    sent = [(orjson.loads(r.request_body), orjson.loads(r.response_body)) for r in records]  # type: ignore[arg-type]
    w.apply([([], records[:2])])
    with psycopg.connect(pg_db, autocommit=True) as admin:
        cut = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert cut == (1,)
    w.apply([([], records[2:])])
    assert (w.written, w.failed) == (4, 0)
    _exact(pg_db, records, sent)
    w.db.close()  # type: ignore[attr-defined]


# Columns that differ between two writes of the same records: their times, and the ids the
# tree gave the nodes.
_OWN = {"id", "received_at", "finished_at", "ttfb_ms", "duration_ms", "tip_message", "prompt_message", "reply_message"}


def test_the_same_records_read_back_the_same_from_sqlite_and_postgresql(pg_db: str, tmp_path: Any) -> None:
    """Both backends keep the same thing: conversations with a shared tool list, a body
    that is not a chat request (kept whole), an upstream error; every column of every
    request read back (`logs show --json`) is the same on SQLite and on PostgreSQL, but
    the times and the ids of the tree's nodes."""
    migrate(pg_db)
    path = tmp_path / "same.db"
    migrate_file(str(path))

    def records() -> list[RequestRecord]:
        out = [r for conv in _conversations(3, 3, "x") for r in conv]
        odd = RequestRecord("POST", "/v1/embeddings")
        odd.request_body, odd.response_body = b'{"model": "e", "input": ["a", "b"]}', b'{"data": []}'
        odd.finish(200, "ok")
        failed = _record(None, [{"role": "user", "content": "and?"}], {"role": "assistant", "content": ""}, ({}, True), 99)
        failed.response_body, failed.error = b'{"error": {"message": "overloaded"}}', "upstream 529"
        failed.finish(529, "upstream_error")
        return [*out, odd, failed]

    lite, pg = records(), records()
    sqlite_sink = sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)
    pg_sink = _sink(pg_db)
    sqlite_sink.apply([([], lite)])
    pg_sink.apply([([], pg)])

    async def sqlite_rows() -> list[dict[str, Any]]:
        import aiosqlite

        from provider_router.store import queries

        async with aiosqlite.connect(path) as conn:
            return [await queries.get_request(conn, r.id) for r in lite]  # type: ignore[misc]

    for a, b in zip(asyncio.run(sqlite_rows()), asyncio.run(_read(pg_db, [r.id for r in pg])), strict=True):
        assert {k: v for k, v in a.items() if k not in _OWN} == {k: v for k, v in b.items() if k not in _OWN}
    pg_sink.db.close()  # type: ignore[attr-defined]


def test_a_batch_whose_roll_ups_mix_whole_and_fractional_times_is_written_as_one(pg_db: str) -> None:
    """Roll-ups of one batch where one key's times sum to a whole number (a request with no
    first byte: 0) and another's do not: the batch is written whole, not failed into
    one-by-one writes (PostgreSQL arrays take one element type)."""
    migrate(pg_db)
    frames: list[Any] = []
    w = sink.Sink(PgTarget(pg_db), max_body_bytes=1 << 20, redactor=Redactor([]), emit=frames.append)
    records = []
    for model, status in (("a", 200), ("b", 503)):
        r = RequestRecord("POST", "/v1/chat/completions")
        r.request_body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % model.encode()
        r.model = model
        if status == 200:
            r.ttfb_ms = 1.25
        r.finish(status, "ok" if status == 200 else "rejected")
        records.append(r)
    w.apply([([], records)])
    assert (w.written, w.failed) == (2, 0)
    assert not [f for f in frames if f[0] == "log" and f[2] == "log_batch_failed"], frames
    w.db.close()  # type: ignore[attr-defined]
