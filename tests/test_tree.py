"""The conversation tree under random traces: conversations continued, regenerated, edited
and gone back in, resent by clients that vary how they write the same message; written
through the log writer in random batches, then read back."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import aiosqlite
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from provider_router import history
from provider_router.store import Redactor, RequestRecord, queries, sink
from provider_router.store.migrations import migrate_file

texts = st.sampled_from(["hi", " hi", "hi ", "why?", "ok", "tell me more", "", "ünïcode ✓"])
extras = st.fixed_dictionaries({}, optional={"name": st.sampled_from(["ann", "bob"]), "refusal": st.none()})
TOOLS = [{"type": "function", "function": {"name": "f", "description": "a tool " * 30, "parameters": {"type": "object"}}}]
# The body's other fields, and whether `messages` comes first: a client may change them
# between two calls of one conversation, or not (then only its new messages are read).
params = st.tuples(
    st.sampled_from([{"temperature": 0.5}, {"temperature": 0.7}, {"temperature": 0.5, "tools": TOOLS}, {"tools": TOOLS}]),
    st.booleans(),
)


@st.composite
def traces(draw: Any) -> list[tuple[int | None, list[dict[str, Any]], dict[str, Any], Any]]:
    """(session, history sent, reply message, (other fields, messages first)) per request."""
    convs: list[list[dict[str, Any]]] = [[{"role": "system", "content": "sys"}] for _ in range(draw(st.integers(1, 3)))]
    out = []
    for _ in range(draw(st.integers(1, 14))):
        c = draw(st.integers(0, len(convs) - 1))
        conv = convs[c]
        action = draw(st.sampled_from(["continue", "regenerate", "edit", "back"]))
        users = [i for i, m in enumerate(conv) if m["role"] == "user"]
        if action == "edit" and users:
            conv = conv[: users[-1]]
        elif action == "back" and users:
            conv = conv[: users[draw(st.integers(0, len(users) - 1))]]
        if action != "regenerate" or not users:
            content: Any = draw(texts)
            if draw(st.booleans()):
                content = [{"type": "text", "text": content}]
            conv = [*conv, {"role": "user", "content": content, **draw(extras)}]
        reply: dict[str, Any] = {"role": "assistant", "content": draw(texts)}
        if draw(st.booleans()):
            reply = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": draw(texts)}}]}
        out.append((c if draw(st.booleans()) else None, conv, reply, draw(params)))
        resent = dict(reply, **draw(extras))  # how this client writes the reply back
        if reply.get("tool_calls"):
            resent = [resent, {"role": "tool", "tool_call_id": "c1", "content": draw(texts)}]  # type: ignore[assignment]
        convs[c] = [*conv, *(resent if isinstance(resent, list) else [resent])]
    return out


def _record(session: int | None, messages: list[dict[str, Any]], reply: dict[str, Any], fields: Any, i: int) -> RequestRecord:
    r = RequestRecord("POST", "/v1/chat/completions")
    r.session_id = None if session is None else f"s{session}"
    other, first = fields
    body = {"messages": messages, "model": "m", **other} if first else {"model": "m", **other, "messages": messages}
    r.request_body = orjson.dumps(body)
    r.response_body = orjson.dumps({"id": f"c{i}", "object": "chat.completion", "created": i, "model": "m",
                                    "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]})  # fmt: skip
    r.reply_format = "completion"
    r.finish(200, "ok")
    return r


async def _read(path: Path, ids: list[str]) -> list[dict[str, Any]]:
    conn = await aiosqlite.connect(path)
    try:
        return [await queries.get_request(conn, i) for i in ids]  # type: ignore[misc]
    finally:
        await conn.close()


@settings(max_examples=60, deadline=None)
@given(traces(), st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_random_traces_store_each_message_once_and_reconstruct_exactly(trace: list[Any], cuts: list[int]) -> None:
    """Every request reads back as exactly the body it was sent with and the response it
    got; the tree holds one row per distinct position (its history prefix and message)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.db"
        migrate_file(str(path))
        out = sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)
        records = [_record(s, m, r, f, i) for i, (s, m, r, f) in enumerate(trace)]
        bodies = [(orjson.loads(r.request_body), orjson.loads(r.response_body)) for r in records]  # type: ignore[arg-type]
        start = 0
        for n in cuts * len(records):  # batches of random sizes
            if start >= len(records):
                break
            out.apply([([], records[start : start + n])])
            start += n
        assert out.written == len(records) and out.failed == 0
        for got, (request, response) in zip(asyncio.run(_read(path, [r.id for r in records])), bodies):
            assert got["request"] == request
            assert got["response"] == response
        positions = set()
        for _, messages, reply, _ in trace:
            keys = history.node_keys(messages)
            positions |= {*keys, history.node_key(keys[-1], reply)}
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*), count(DISTINCT hash) FROM messages").fetchone() == (len(positions), len(positions))
        db.close()


def test_a_reply_resent_without_its_reply_only_fields_is_kept_once_not_per_request(tmp_path: Path) -> None:
    """Clients resend a reply without the fields only a reply has (`refusal`,
    `annotations`): that form is kept once, on the reply's node, so a long conversation's
    requests keep nothing of their own; a client that later writes the reply another way
    still reads back exactly."""
    path = tmp_path / "t.db"
    migrate_file(str(path))
    out = sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)
    conv: list[dict[str, Any]] = [{"role": "system", "content": "sys"}]
    records, replies = [], []
    for i in range(30):
        conv.append({"role": "user", "content": f"question {i}"})
        reply = {"role": "assistant", "content": f"answer {i}", "refusal": None, "annotations": []}
        records.append(_record(1, conv, reply, ({"temperature": 0.5}, False), i))
        replies.append(reply)
        conv = [*conv, {"role": "assistant", "content": f"answer {i}"}]
    # Another client goes back to turn 10 and resends the reply whole, then with a name.
    other = [*conv[:20], replies[9], {"role": "user", "content": "and then?"}]
    records.append(_record(2, other, {"role": "assistant", "content": "then this"}, ({}, False), 30))
    records.append(_record(2, [*other[:-2], {**replies[9], "refusal": "no"}, other[-1]], {"role": "assistant", "content": "x"}, ({}, False), 31))
    sent = [(orjson.loads(r.request_body), orjson.loads(r.response_body)) for r in records]  # type: ignore[arg-type]
    for start in range(0, len(records), 7):
        out.apply([([], records[start : start + 7])])
    assert out.written == len(records) and out.failed == 0
    for got, (request, response) in zip(asyncio.run(_read(path, [r.id for r in records])), sent):
        assert got["request"] == request
        assert got["response"] == response
    db = sqlite3.connect(path)
    kept = [row[0] for row in db.execute("SELECT overrides FROM requests ORDER BY rowid")]
    db.close()
    assert kept[:30] == [None] * 30  # the conversation's requests keep nothing of their own
    assert kept[30] is not None and kept[31] is not None  # the other client's forms, kept by its requests


def test_the_same_body_sent_again_is_placed_where_it_was(tmp_path: Path) -> None:
    """A regenerated reply or a retry sends the conversation's previous body again, byte for
    byte: it is placed where that body was (its overrides too), each reply a branch of its
    own under the same tip, and every request reads back exactly; in one batch or across
    batches."""
    path = tmp_path / "t.db"
    migrate_file(str(path))
    out = sink.Sink(sink.open_db(str(path)), max_body_bytes=1 << 20, redactor=Redactor([]), emit=lambda _: None)
    first = {"role": "assistant", "content": "answer 1"}
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
               {**first, "refusal": None, "annotations": []}, {"role": "user", "content": "q2"}]  # fmt: skip
    records = [_record(1, history[:2], first, ({"temperature": 0.5}, False), 0)]
    for i in range(1, 5):  # the same body four times, each time another reply
        records.append(_record(1, history, {"role": "assistant", "content": f"try {i}"}, ({"temperature": 0.5}, False), i))
    assert len({r.request_body for r in records[1:]}) == 1
    sent = [(orjson.loads(r.request_body), orjson.loads(r.response_body)) for r in records]  # type: ignore[arg-type]
    out.apply([([], records[:3])])
    out.apply([([], records[3:])])
    assert out.written == len(records) and out.failed == 0
    for got, (request, response) in zip(asyncio.run(_read(path, [r.id for r in records])), sent):
        assert got["request"] == request
        assert got["response"] == response
    db = sqlite3.connect(path)
    tips = {row[0] for row in db.execute("SELECT tip_message FROM requests WHERE rowid > 1")}
    (siblings,) = db.execute("SELECT count(*) FROM messages WHERE parent_id = ?", (tips.pop(),)).fetchone()
    (total,) = db.execute("SELECT count(*) FROM messages").fetchone()
    db.close()
    assert not tips and siblings == 4  # one tip, four replies under it
    assert total == 4 + 4  # sys, q1, answer 1, q2; and the four replies
