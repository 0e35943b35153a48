"""Migrations: a database written by the previous release (0.1.0: every request row with its
whole bodies, `tests/data/log-0.1.0.db`, filled by that release's daemon through the
official SDK: an echo and a threaded qwen conversation of three turns, streamed and not, a
body stored cut, a rejected request) migrates in place with nothing lost."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import aiosqlite
import orjson
import pytest

from provider_router import history
from provider_router.cli import main
from provider_router.store import Redactor, RequestRecord, connect, queries, sink
from provider_router.store import stats as stats_q
from provider_router.store.migrations import MIGRATIONS

DATA = Path(__file__).parent / "data"


async def test_a_previous_release_database_migrates_in_place(tmp_path: Path) -> None:
    """Every old row becomes a request of the tree whose request and reply are what the old
    row held (a body stored cut is kept whole, marker and all); the threaded turns point at
    their reply nodes, so a daemon on the migrated file continues the upstream chat; stats
    come from roll-ups that count every row; and migrating again changes nothing."""
    path = tmp_path / "old.db"
    shutil.copy(DATA / "log-0.1.0.db", path)
    old = sqlite3.connect(path)
    old.row_factory = sqlite3.Row
    before = [dict(r) for r in old.execute("SELECT * FROM requests ORDER BY id")]
    old_turns = [dict(r) for r in old.execute("SELECT * FROM turns WHERE chat_id IS NOT session_id")]
    old.close()
    conn = await connect(path)  # what the daemon and the CLI do on start-up
    await conn.close()
    conn = await aiosqlite.connect(path)
    try:
        names = [r[0] for r in await (await conn.execute("SELECT name FROM _migrations ORDER BY name")).fetchall()]
        assert names == [n for n, _ in MIGRATIONS]
        for row in before:
            got = await queries.get_request(conn, row["id"])
            assert got is not None
            for col in ("received_at", "finished_at", "model", "provider", "status", "outcome", "session_id", "chat_id", "parent_id", "reply_id", "total_tokens"):
                assert got[col] == row[col], col
            assert got["turn"] == row["turn"] or row["turn"] is None  # now counted for rejected requests too
            if row["request_body"].endswith("bytes]"):  # stored cut by 0.1.0: kept as it was
                assert got["request"] == row["request_body"]
            else:
                assert got["request"] == json.loads(row["request_body"])
            if row["status"] == 200:
                assert got["response_text"] == row["response_text"]
            elif row["response_body"] is not None:
                assert got["response"] == json.loads(row["response_body"])
        stats = await stats_q.stats(conn)
        assert stats.total.requests == len(before)
        assert stats.total.errors == sum(r["outcome"] != "ok" for r in before)
    finally:
        await conn.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM turns").fetchone()[0] == len(old_turns) == 3
    said = json.loads((DATA / "log-0.1.0.qwen-history.json").read_text())
    keys = history.node_keys(said)
    replies = {keys[i] for i, m in enumerate(said) if m["role"] == "assistant"}
    assert {r[0] for r in db.execute("SELECT message_hash FROM turns")} == replies
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {"messages", "blobs", "rollups"}
    assert "request_body" not in [r[1] for r in db.execute("PRAGMA table_info(requests)")]
    dump = orjson.dumps([list(r) for r in db.execute("SELECT * FROM requests ORDER BY id")])
    db.close()
    conn = await connect(path)
    await conn.close()
    db = sqlite3.connect(path)
    assert orjson.dumps([list(r) for r in db.execute("SELECT * FROM requests ORDER BY id")]) == dump
    db.close()


def test_the_cli_migrates_a_previous_release_database_it_is_pointed_at(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`provider-router logs --db OLD` on a 0.1.0 file that no daemon serves migrates it
    once, saying so with progress on stderr, then lists its rows."""
    path = tmp_path / "old.db"
    shutil.copy(DATA / "log-0.1.0.db", path)
    assert main(["logs", "-n", "3", "--db", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "migrating" in err and "requests 8/8" in err
    assert "The model `nope` does not exist" in out and "turn 3 of qwen3-max" in out
    assert main(["logs", "-n", "1", "--db", str(path)]) == 0
    assert "migrating" not in capsys.readouterr().err


async def test_a_conversation_tree_database_migrates_in_place_and_continues(tmp_path: Path) -> None:
    """`tests/data/log-003.db` was written by the conversation tree's first release (schema
    003, commit 4ebf139): a conversation whose replies were resent without their reply-only
    fields, kept per request then. It migrates in place, reads back exactly, and the same
    conversation continues on it with the new writer: every request still reads back as
    sent, and a reply first carried now is kept once on its node."""
    path = tmp_path / "tree.db"
    shutil.copy(DATA / "log-003.db", path)
    sent = json.loads((DATA / "log-003.sent.json").read_text())
    conn = await connect(path)
    await conn.close()
    out = sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)
    conv = [*sent[-1]["request"]["messages"], {"role": "assistant", "content": "answer 5"}]
    for i in (6, 7):
        conv.append({"role": "user", "content": f"question {i}"})
        reply = {"role": "assistant", "content": f"answer {i}", "refusal": None, "annotations": []}
        r = RequestRecord("POST", "/v1/chat/completions")
        r.session_id, r.reply_format = "conv1", "completion"
        r.request_body = orjson.dumps({"model": "gpt-4o-mini", "messages": conv})
        r.response_body = orjson.dumps({"id": f"chatcmpl-{i}", "object": "chat.completion", "created": 1764000000 + i,
                                        "model": "gpt-4o-mini", "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]})  # fmt: skip
        r.finish(200, "ok")
        out.apply([([], [r])])
        sent.append({"id": r.id, "request": orjson.loads(r.request_body), "response": orjson.loads(r.response_body)})
        conv = [*conv, {"role": "assistant", "content": f"answer {i}"}]
    assert out.written == 2 and out.failed == 0
    out.conn.close()
    conn = await aiosqlite.connect(path)
    try:
        names = [r[0] for r in await (await conn.execute("SELECT name FROM _migrations ORDER BY name")).fetchall()]
        assert names == [n for n, _ in MIGRATIONS]
        for want in sent:
            got = await queries.get_request(conn, want["id"])
            assert got is not None
            assert got["request"] == want["request"]
            assert got["response"] == want["response"]
    finally:
        await conn.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # The reply of the first request after the migration is carried by the next one: kept
    # once on its node, so the next request keeps no copy of it.
    last = db.execute("SELECT overrides FROM requests ORDER BY rowid DESC LIMIT 1").fetchone()[0]
    assert "answer 6" not in (last or "")
    db.close()
