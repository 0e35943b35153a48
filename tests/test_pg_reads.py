"""The inspection reads on PostgreSQL answer as they do on SQLite: the same records written
by the log writer to a SQLite file and to a real PostgreSQL server, the same sessions and
turns beside them, and every `LogReads` method compared on both (lists with each filter,
pages, searches, lookups by id and prefix, figures, sessions, their trees and edits).
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import orjson
import psycopg
import pytest
from click.testing import CliRunner

from provider_router.cli import cli as root
from provider_router.cli.session_view import render_tree
from provider_router.records import RequestRecord, iso
from provider_router.store import Redactor, sink
from provider_router.store.migrations import migrate_file
from provider_router.store.pg.migrations import migrate
from provider_router.store.pg.writer import PgTarget
from provider_router.store.queries import AmbiguousId, RequestFilter
from provider_router.store.reads import START, LogReads, is_cursor, open_reads
from provider_router.store.series import RANGES
from tests.daemon import free_port
from tests.postgres import Server
from tests.test_tree import TOOLS

pytestmark = pytest.mark.xdist_group("postgres")

DAY = 86400.0
# Three days ago, to the millisecond: the records span the days since (several partitions).
BASE = round(time.time() - 3 * DAY, 3)
# Columns that name the tree's nodes and blobs: each database numbers its own.
NODE_IDS = {"tip_message", "prompt_message", "reply_message", "replies", "body_blob", "params_blobs"}


def _id(at: float, seq: int) -> str:
    """An id as records.new_id makes it, for a request received at `at`."""
    return f"{round(at * 1000) << 64 | seq << 48 | random.getrandbits(48):028x}"


def _chat(
    i: int, messages: list[dict[str, Any]], reply: dict[str, Any] | None, *, session: str | None = None, model: str = "gpt-4o",
    provider: str = "openai", client: str | None = "alice", status: int = 200, outcome: str = "ok", stream: bool = False,
) -> RequestRecord:
    at = BASE + i * 3 * 3600  # a request every three hours
    r = RequestRecord("POST", "/v1/chat/completions", id=_id(at, i), started=at)
    r.session_id, r.model, r.provider, r.upstream_model, r.client, r.turn = session, model, provider, model, client, i
    r.request_body = orjson.dumps({"model": model, "messages": messages, **({"tools": TOOLS} if i % 3 == 0 else {})})
    if stream and reply is not None:
        chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": reply["content"][:3]}}]},
                  {"choices": [{"index": 0, "delta": {"content": reply["content"][3:]}, "finish_reason": "stop"}]}]  # fmt: skip
        r.stream_body = b"".join(b"data: " + orjson.dumps({"id": f"c{i}", "object": "chat.completion.chunk", **c}) + b"\n\n" for c in chunks)
        r.stream_body += b"data: [DONE]\n\n"
        r.reply_format, r.stream, r.chunk_count = "stream", True, 2
    elif reply is not None:
        r.response_body = orjson.dumps({"id": f"c{i}", "object": "chat.completion", "created": i, "model": model,
                                        "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}],
                                        "usage": {"prompt_tokens": 10 + i, "completion_tokens": i}})  # fmt: skip
        r.reply_format, r.prompt_tokens, r.completion_tokens, r.total_tokens = "completion", 10 + i, i, 10 + 2 * i
    else:
        r.response_body = b'{"error": {"message": "overloaded"}}'
    r.finish(status, outcome, None if status == 200 else f"upstream {status}")
    r.finished, r.ttfb_ms, r.duration_ms = at + 1.5, 100.0 + i, 1500.0 + i
    return r


def records() -> list[RequestRecord]:
    """Several sessions: a branching conversation (a regenerate), one with a tool call,
    one in Chinese streamed, an upstream error, a request without a session, a body that
    is not a chat, a request whose id's time is not its own; models, clients, outcomes."""
    u1 = {"role": "user", "content": "how do I migrate the database"}
    a1 = {"role": "assistant", "content": "run the migration tool first"}
    u2 = {"role": "user", "content": "and then vacuum it"}
    a2 = {"role": "assistant", "content": "vacuum after the migration finished"}
    a2b = {"role": "assistant", "content": "a regenerated answer about vacuuming"}
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}
    zh = {"role": "user", "content": "你好 数据库迁移 怎么做"}
    out = [
        _chat(0, [u1], a1, session="s-alpha1"),
        _chat(1, [u1, a1, u2], a2, session="s-alpha1"),
        _chat(2, [u1, a1, u2], a2b, session="s-alpha1"),  # regenerate: a branch
        _chat(3, [{"role": "user", "content": "weather in Oslo?"}], call, session="s-alpha2", model="gpt-4o-mini", client="bob"),
        _chat(4, [{"role": "user", "content": "weather in Oslo?"}, call, result], {"role": "assistant", "content": "It is sunny in Oslo"},
              session="s-alpha2", model="gpt-4o-mini", client="bob"),  # fmt: skip
        _chat(5, [zh], {"role": "assistant", "content": "先备份 然后迁移"}, session="s-beta", model="claude-x", provider="anthropic", client=None, stream=True),
        _chat(6, [zh, {"role": "assistant", "content": "先备份 然后迁移"}, {"role": "user", "content": "then?"}], None,
              session="s-beta", model="claude-x", provider="anthropic", client=None, status=529, outcome="upstream_error"),  # fmt: skip
        _chat(7, [{"role": "user", "content": "a one-shot question about databases"}], {"role": "assistant", "content": "one answer"}, model="echo", provider="echo"),
        _chat(8, [{"role": "user", "content": "bad"}], None, model="gpt-4o", client="bob", status=400, outcome="bad_request"),
    ]
    odd = RequestRecord("POST", "/v1/embeddings", id=_id(BASE + 9 * 3 * 3600, 9), started=BASE + 9 * 3 * 3600)
    odd.request_body, odd.response_body, odd.model, odd.client = b'{"model": "e", "input": ["a", "b"]}', b'{"data": []}', "e", "carol"
    odd.finish(200, "ok")
    odd.finished, odd.duration_ms = odd.started + 0.25, 250.0
    at = BASE + 9 * 3 * 3600 + 60
    resp = RequestRecord("POST", "/v1/responses", id=_id(at, 11), started=at)  # read as chat messages too (`as_chat`)
    resp.request_body = orjson.dumps({"model": "gpt-4o", "instructions": "be brief", "input": [
        {"type": "function_call", "call_id": "c9", "name": "find_walrus", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c9", "output": "none found"},
        {"role": "user", "content": [{"type": "input_text", "text": "where is the walrus"}]},
    ]})  # fmt: skip
    resp.response_body = orjson.dumps({"object": "response", "status": "completed", "output": [
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "the pelican knows"}]},
    ], "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12}})  # fmt: skip
    resp.reply_format, resp.model, resp.provider, resp.client = "responses", "gpt-4o", "openai", "carol"
    resp.finish(200, "ok")
    resp.finished, resp.duration_ms = resp.started + 0.5, 500.0
    late = _chat(10, [{"role": "user", "content": "a request whose id is newer than its time"}], {"role": "assistant", "content": "late"})
    late.id = _id(time.time(), 10)  # an id from another time than its `received_at`: found all the same
    return [*out, odd, resp, late]


# (id, client, provider, model, chat_id, state, created, last access, expires, messages, requests, metadata)
SESSIONS = [
    ("s-alpha1", "alice", "openai", "gpt-4o", "chat-a1", "active", BASE, BASE + 6 * 3600, time.time() + 3600, 4, 3, '{"agent":"x"}'),
    ("s-alpha2", "bob", "openai", "gpt-4o-mini", "chat-a2", "active", BASE + 9 * 3600, BASE + 12 * 3600, time.time() - 60, 3, 2, None),
    ("s-beta", "anonymous", "anthropic", "claude-x", "s-beta", "expired", BASE + 15 * 3600, BASE + 18.25 * 3600, BASE + 19 * 3600, 3, 2, '{"ended":"expired"}'),
]
_SESSION_COLUMNS = "id, fingerprint, client, provider, upstream_model, chat_id, parent_id, state, created_at, last_accessed_at, expires_at, message_count, request_count, metadata"


def _session_rows() -> list[tuple[Any, ...]]:
    return [(s, f"fp-{s}", c, p, m, chat, None, state, iso(cr), iso(la), iso(ex), msgs, reqs, meta) for s, c, p, m, chat, state, cr, la, ex, msgs, reqs, meta in SESSIONS]


def _turns(reply_hash: Callable[[str], bytes], recs: list[RequestRecord]) -> list[tuple[Any, ...]]:
    """A threaded upstream's turns of s-alpha1: one per reply, naming it by its node's hash."""
    return [("s-alpha1", reply_hash(r.id), i + 1, "chat-a1", f"reply-{i}", r.id, iso(r.started)) for i, r in enumerate(recs[:3])]


def write_both(dsn: str, path: Path) -> list[RequestRecord]:
    """The records written by the log writer to both databases, and the same sessions and
    turns inserted beside them; the SQLite file's records."""
    migrate(dsn)
    migrate_file(str(path))
    lite, pg = records(), records()
    for r, twin in zip(lite, pg):
        twin.id = r.id
    writers = [sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None),
               sink.Sink(PgTarget(dsn), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)]  # fmt: skip
    writers[0].apply([([], lite)])
    writers[1].apply([([], pg)])
    for w in writers:
        assert w.failed == 0 and w.written == len(lite)
    writers[0].db.conn.close()  # type: ignore[attr-defined]
    writers[1].db.close()  # type: ignore[attr-defined]
    marks = ", ".join(["?"] * 14)
    with sqlite3.connect(path) as db:
        db.executemany(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({marks})", _session_rows())
        hash_of = lambda rid: db.execute("SELECT m.hash FROM requests r JOIN messages m ON m.id = r.reply_message WHERE r.id = ?", (rid,)).fetchone()[0]  # noqa: E731
        db.executemany("INSERT INTO turns (session_id, message_hash, turn, chat_id, reply_id, request_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", _turns(hash_of, lite))
    with psycopg.connect(dsn) as pgc:
        with pgc.cursor() as cur:
            cur.executemany(f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({marks.replace('?', '%s')})", _session_rows())
        pg_hash = lambda rid: pgc.execute("SELECT m.hash FROM requests r JOIN messages m ON m.id = r.reply_message WHERE r.id = %s", (rid,)).fetchone()[0]  # noqa: E731
        with pgc.cursor() as cur:
            cur.executemany("INSERT INTO turns (session_id, message_hash, turn, chat_id, reply_id, request_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)", _turns(pg_hash, lite))
    return lite


@pytest.fixture(scope="module")
def both(postgres: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[RequestRecord]]]:
    """One pair of databases with the same log, for the tests that only read: (path, URL, records)."""
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute('CREATE DATABASE "pg_reads" TEMPLATE template0')
    dsn = postgres.dsn("pg_reads")
    path = tmp_path_factory.mktemp("reads") / "log.db"
    recs = write_both(dsn, path)
    yield str(path), dsn, recs
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute('DROP DATABASE "pg_reads" WITH (FORCE)')


class Pair:
    """The same read asked of both databases."""

    def __init__(self, lite: LogReads, pg: LogReads) -> None:
        self.lite, self.pg = lite, pg

    async def same(self, read: Callable[[LogReads], Any], shape: Callable[[Any], Any] = lambda x: x) -> Any:
        a, b = shape(await read(self.lite)), shape(await read(self.pg))
        assert a == b, _diff(a, b)
        return a


def _diff(a: Any, b: Any) -> Any:
    """Where two answers differ (the assertion's message)."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((_diff(x, y) for x, y in zip(a, b) if x != y), None)
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    return (a, b)


@pytest.fixture
async def pair(both: tuple[str, str, list[RequestRecord]]) -> AsyncIterator[Pair]:
    path, dsn, _ = both
    async with open_reads(path) as lite, open_reads(dsn) as pg:
        yield Pair(lite, pg)


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in NODE_IDS}


def _rows(page: Any) -> list[dict[str, Any]]:
    return [_row(r) for r in (page.rows if hasattr(page, "rows") else page)]


FILTERS = [
    RequestFilter(),
    RequestFilter(model="gpt-4o"),
    RequestFilter(model="gpt-4o*"),
    RequestFilter(model="[cg]*-x"),
    RequestFilter(provider="anthropic"),
    RequestFilter(status=529),
    RequestFilter(outcome="bad_request"),
    RequestFilter(session="s-alpha"),
    RequestFilter(session="s-beta"),
    RequestFilter(client="bob"),
    RequestFilter(client="anonymous"),
    RequestFilter(since=iso(BASE + DAY)),
    RequestFilter(until=iso(BASE + DAY)),
    RequestFilter(since=iso(BASE + 6 * 3600), until=iso(BASE + 2 * DAY), client="alice"),
]


@pytest.mark.parametrize("flt", FILTERS, ids=lambda f: ",".join(k if k in ("since", "until") else f"{k}={v}" for k, v in asdict(f).items() if v) or "all")
async def test_every_filter_lists_the_same_rows_in_the_same_order(pair: Pair, flt: RequestFilter) -> None:
    """Each filter (model, glob, provider, status, outcome, session prefix, client,
    anonymous, time range) selects the same rows, oldest first, on both databases."""
    rows = await pair.same(lambda r: r.recent_requests(flt, 0), _rows)
    assert rows == (await pair.same(lambda r: r.recent_requests(flt, 50), _rows))
    assert rows or flt.outcome


async def test_pages_walk_back_the_same_way(pair: Pair) -> None:
    """Pages of three, each `before` the previous page's oldest row, give the same rows on
    both until the log's start; an unknown `before` gives none."""
    before, seen = None, []
    while True:
        page = await pair.same(lambda r: r.recent_requests(RequestFilter(before=before), 3), _rows)
        if not page:
            break
        seen = page + seen
        before = page[0]["id"]
    assert len(seen) == 12
    assert await pair.same(lambda r: r.recent_requests(RequestFilter(before="f" * 28), 3), _rows) == []


@pytest.mark.parametrize("query", ["migration", "migr*", "vacuum migration", "sunny", "Oslo", "你好", "get_weather", "walrus", "pelican", "nothing-like-this", "!!"])
async def test_a_search_finds_the_same_requests(pair: Pair, query: str) -> None:
    """A word, a prefix, two words, a word only in a reply, Chinese, a tool call's name, a
    Responses request's prompt and reply, no match, and text with no word (no search) find
    the same requests."""
    rows = await pair.same(lambda r: r.recent_requests(RequestFilter(query=query), 20), _rows)
    assert bool(rows) == (query != "nothing-like-this")


async def test_new_rows_after_a_cursor_are_the_same(pair: Pair) -> None:
    """From the start, every row; after a filtered page's last row, the rows after it; after
    the newest, none; with a limit, the newest few."""
    everything = await pair.same(lambda r: r.new_requests(RequestFilter(), START), _rows)
    assert len(everything) == 12
    await pair.same(lambda r: r.new_requests(RequestFilter(model="gpt-4o"), START, 2), _rows)
    assert len(await pair.same(lambda r: r.new_requests(RequestFilter(query="migr* database"), START), _rows)) == 1  # each row's messages checked
    after = []
    for reads in (pair.lite, pair.pg):
        page = await reads.new_requests(RequestFilter(model="gpt-4o-mini"), START)
        assert is_cursor(page.cursor)
        after.append(_rows(await reads.new_requests(RequestFilter(), page.cursor)))
        newest = await reads.recent_requests(RequestFilter(), 2)
        assert (await reads.new_requests(RequestFilter(), newest.cursor)).rows == []
    assert after[0] == after[1] == everything[5:]


async def test_one_request_by_id_or_prefix_is_the_same(pair: Pair, both: tuple[str, str, list[RequestRecord]]) -> None:
    """By full id (the one whose id's time is not its own too), by a unique prefix, in upper
    case: the same request rebuilt; an ambiguous prefix fails the same way; none is None."""
    recs = both[2]
    for r in recs:
        got = await pair.same(lambda x: x.get_request(r.id), _row)
        assert got["id"] == r.id and got["request"] is not None
    await pair.same(lambda x: x.get_request(recs[4].id[:20].upper()), _row)
    shared = next(k for k in range(28) if recs[0].id[k] != recs[1].id[k])
    errors = []
    for reads in (pair.lite, pair.pg):
        with pytest.raises(AmbiguousId) as e:
            await reads.get_request(recs[0].id[:shared])
        errors.append((str(e.value), e.value.candidates))
    assert errors[0] == errors[1]
    assert await pair.same(lambda x: x.get_request("0" * 28)) is None


async def test_a_sessions_requests_and_their_count_are_the_same(pair: Pair) -> None:
    for sid in ("s-alpha1", "s-alpha2", "s-beta", "nope"):
        rows = await pair.same(lambda r: r.session_requests(sid), _rows)
        assert await pair.same(lambda r: r.count_session_requests(sid)) == len(rows)


async def test_stats_series_and_facets_are_the_same(pair: Pair) -> None:
    """The figures from the roll-ups, over all days and since a day ago; every range's
    series; the facets; the lifecycle (at one `now`)."""
    now = time.time()
    for since in (None, iso(BASE + DAY), iso(BASE + DAY + 1234.5)):
        st = await pair.same(lambda r: r.stats(since), lambda s: {**s.as_dict(), "session_lifecycle": None})
        assert st["total"]["requests"] > 0 or since
    for rng in RANGES.values():
        await pair.same(lambda r: r.series(rng, now), lambda ts: (ts.starts, {k: [p and p.sums for p in v] for k, v in ts.groups.items()}, [p.sums for p in ts.total]))
    assert (await pair.same(lambda r: r.facets()))["model"] == ["claude-x", "e", "echo", "gpt-4o", "gpt-4o-mini"]
    figures = await pair.same(lambda r: r.lifecycle(now))
    assert figures["active"] == 2 and figures["by_client"]["bob"]["created"] == 1


async def test_sessions_list_show_and_tree_are_the_same(pair: Pair) -> None:
    """Listed by state and client, paged; one by id and by prefix (ambiguous alike); each
    tree drawn the same (the node ids differ, the drawing does not)."""
    for kw in ({}, {"state": "active"}, {"state": "expired"}, {"client": "bob"}, {"limit": 1, "offset": 1, "newest_first": True}, {"limit": 0}):
        await pair.same(lambda r: r.list_sessions(**kw))
    assert (await pair.same(lambda r: r.get_session("s-be")))["turn_rows"] == 0
    assert (await pair.same(lambda r: r.get_session("s-alpha1")))["turn_rows"] == 3
    for reads in (pair.lite, pair.pg):
        with pytest.raises(AmbiguousId, match="s-alpha1, s-alpha2"):
            await reads.get_session("s-al")
    for sid in ("s-alpha1", "s-alpha2", "s-beta", "nope"):
        drawn = await pair.same(lambda r: r.session_tree(sid), lambda t: (t.summary(), render_tree(t, 160, "reply-2")))
        assert drawn[1] or sid == "nope"


async def test_ping_answers_on_both(pair: Pair) -> None:
    await pair.lite.ping()
    await pair.pg.ping()


async def test_the_session_edits_leave_the_same_state(pg_db: str, tmp_path: Path) -> None:
    """Expiring what is past its time, refreshing an ended session and deleting one leave
    both databases with the same sessions, tallies and lifecycle."""
    write_both(pg_db, tmp_path / "edit.db")
    now = time.time()
    async with open_reads(str(tmp_path / "edit.db"), write=True) as lite, open_reads(pg_db, write=True) as pg:
        p = Pair(lite, pg)
        assert await p.same(lambda r: r.expire_sessions(iso(now))) == 1
        assert await p.same(lambda r: r.refresh_session("s-beta", now, 600.0)) is True
        assert await p.same(lambda r: r.refresh_session("nope", now, 600.0)) is False
        gone = await p.same(lambda r: r.delete_session("s-alpha1"), asdict)
        assert gone == {"id": "s-alpha1", "turns": 3, "requests_kept": 3}
        assert await p.same(lambda r: r.delete_session("s-alpha1")) is None
        sessions = await p.same(lambda r: r.list_sessions(limit=0))
        assert [(s["id"], s["state"], (s["metadata"] or {}).get("ended")) for s in sessions] == [("s-alpha2", "expired", "expired"), ("s-beta", "active", None)]
        await p.same(lambda r: r.lifecycle(now))
        await p.same(lambda r: r.session_requests("s-alpha1"), _rows)


# -- the command line on a URL -----------------------------------------------------------------
def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(root, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    "args",
    [("logs", "-n", "0"), ("logs", "--model", "gpt-4o*", "-q", "migr*"), ("logs", "show", "PREFIX"), ("stats",), ("stats", "--since", "SINCE"),
     ("sessions", "list"), ("sessions", "list", "--active"), ("sessions", "show", "s-alpha1"), ("sessions", "show", "s-alpha1", "--tree"),
     ("sessions", "show", "s-be", "--tree")],  # fmt: skip
    ids=" ".join,
)
def test_the_commands_print_the_same_on_a_url_as_on_the_file(both: tuple[str, str, list[RequestRecord]], args: tuple[str, ...]) -> None:
    """`logs`, `logs show PREFIX`, `stats`, `sessions list` and `sessions show [--tree]`
    print the same with `--db postgresql://...` as with `--db` the SQLite file of the same log."""
    path, dsn, recs = both
    fill = {"PREFIX": recs[4].id[:16], "SINCE": iso(BASE + DAY + 1234.5)}
    args = tuple(fill.get(a, a) for a in args)
    on_file, on_url = _cli(*args, "--db", path), _cli(*args, "--db", dsn)
    assert on_file == on_url and on_file[0] == 0 and on_file[1]


def test_an_ambiguous_prefix_fails_the_same_on_a_url(both: tuple[str, str, list[RequestRecord]]) -> None:
    """`logs show` and `sessions show` with a prefix several ids share: the same one line,
    naming the candidates, and the same failure status."""
    path, dsn, recs = both
    shared = recs[0].id[: next(k for k in range(28) if recs[0].id[k] != recs[1].id[k])]
    for args in (("logs", "show", shared), ("sessions", "show", "s-al")):
        on_file, on_url = _cli(*args, "--db", path), _cli(*args, "--db", dsn)
        assert on_file == on_url and on_file[0] == 1 and "is ambiguous: matches" in on_file[2]


def test_an_unreachable_url_is_one_line_without_its_password(postgres: Server) -> None:
    """Nothing listens there: one line on stderr naming the URL with its password hidden,
    a failure status, no traceback; an empty database says to start the daemon on it."""
    url = f"postgresql://reader:s3cret-pw@127.0.0.1:{free_port()}/log"
    for args in (("logs",), ("logs", "show", "0193"), ("stats",), ("sessions", "list"), ("sessions", "delete", "x")):
        status, out, err = _cli(*args, "--db", url)
        assert status == 1 and out == "" and len(err.splitlines()) == 1, err
        assert "s3cret" not in err and "postgresql://reader:***@127.0.0.1" in err
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute('DROP DATABASE IF EXISTS "pg_reads_empty" WITH (FORCE)')
        admin.execute('CREATE DATABASE "pg_reads_empty" TEMPLATE template0')
    status, _, err = _cli("logs", "--db", postgres.dsn("pg_reads_empty"))
    assert status == 1 and "start `provider-router serve --db URL` on it" in err and len(err.splitlines()) == 1


def test_the_session_edits_print_and_leave_the_same_on_a_url(pg_db: str, tmp_path: Path) -> None:
    """`sessions cleanup`, `refresh` and `delete` (no daemon serves either database) say the
    same and leave the same sessions on the URL as on the file."""
    path = str(tmp_path / "cli-edit.db")
    write_both(pg_db, Path(path))
    for args in (("sessions", "cleanup"), ("sessions", "refresh", "s-be"), ("sessions", "delete", "s-alpha1")):
        on_file, on_url = _cli(*args, "--db", path), _cli(*args, "--db", pg_db)
        assert on_file == on_url and on_file[0] == 0, (args, on_file, on_url)

    def listed(db: str) -> list[dict[str, Any]]:  # but the times the refresh set, each at its own now
        lines = _cli("sessions", "list", "--json", "--db", db)[1].splitlines()
        return [{k: v for k, v in orjson.loads(line).items() if k not in ("last_accessed_at", "expires_at")} for line in lines]

    assert listed(path) == listed(pg_db)
    assert [(s["id"], s["state"]) for s in listed(pg_db)] == [("s-alpha2", "expired"), ("s-beta", "active")]
