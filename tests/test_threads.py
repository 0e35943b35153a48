"""Conversation threading through the official SDK against the strict Qwen fake: at every
turn, the context the upstream saw must be exactly the history the client sent.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Any

import openai
import pytest

from provider_router.providers.qwen import fold_messages
from provider_router.records import iso
from tests.conftest import Proxy, ProxyFactory, base_config, qwen_config
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake
from tests.waiting import until

Msg = dict[str, Any]


def context_matches(context: list[tuple[str, str]], history: list[Msg]) -> bool:
    """True when the fake's path (root -> new user message) carries exactly `history`.

    The path alternates user / assistant entries; each user entry is the fold of the client
    messages since the previous upstream reply, and each assistant entry is that reply.
    """
    pos = 0
    entries = list(context)
    while len(entries) >= 2:
        (urole, ucontent), (arole, acontent) = entries[0], entries[1]
        if (urole, arole) != ("user", "assistant"):
            return False
        for b in range(pos, len(history)):
            m = history[b]
            if m["role"] == "assistant" and m["content"] == acontent and fold_messages(history[pos:b]) == ucontent:
                pos = b + 1
                break
        else:
            return False
        entries = entries[2:]
    return len(entries) == 1 and entries[0] == ("user", fold_messages(history[pos:]))


class Conversation:
    """A client that resends its whole history, like every OpenAI-style client."""

    def __init__(self, sdk: openai.AsyncOpenAI, *, model: str = "qwen3-max", system: str | None = None) -> None:
        self.sdk = sdk
        self.model = model
        self.history: list[Msg] = [{"role": "system", "content": system}] if system else []
        self.session_id: str | None = None

    async def ask(self, history: list[Msg], *, stream: bool = False, **kw: Any) -> str:
        if stream:
            raw = await self.sdk.chat.completions.with_raw_response.create(
                model=self.model, messages=history, stream=True, **kw
            )
            parts = [c.choices[0].delta.content or "" async for c in raw.parse() if c.choices]
            text = "".join(parts)
        else:
            raw = await self.sdk.chat.completions.with_raw_response.create(model=self.model, messages=history, **kw)
            text = raw.parse().choices[0].message.content or ""
        self.session_id = raw.headers.get("x-session-id")
        return text

    async def say(self, text: str, *, stream: bool = False) -> str:
        self.history.append({"role": "user", "content": text})
        reply = await self.ask(self.history, stream=stream)
        self.history.append({"role": "assistant", "content": reply})
        return reply


def last_turn_ok(fake: QwenFake, history: list[Msg]) -> None:
    t = fake.turns[-1]
    assert t.completed
    assert context_matches(t.context, history), (t.context, history)


@pytest.mark.parametrize("stream", [False, True])
async def test_multi_turn_sends_only_new_messages(qproxy: Proxy, qwen_fake: QwenFake, stream: bool) -> None:
    """Each continuation sends one new message under the previous reply, in one upstream chat."""
    conv = Conversation(qproxy.sdk(), system="be brief")
    for i in range(4):
        reply = await conv.say(f"question {i}", stream=stream)
        assert reply == qwen_fake.turns[-1].reply
        last_turn_ok(qwen_fake, conv.history[:-1])
    assert qwen_fake.created_chats == 1
    t = qwen_fake.turns
    assert [x.parent_id for x in t] == [None] + [x.response_id for x in t[:-1]]
    assert t[0].user_content == "system: be brief\n\nuser: question 0"
    assert [x.user_content for x in t[1:]] == ["question 1", "question 2", "question 3"]
    rows = await qproxy.rows()
    assert len({r["session_id"] for r in rows}) == 1
    assert [r["turn"] for r in rows] == [1, 2, 3, 4]
    assert [r["parent_id"] for r in rows] == [x.parent_id for x in t]
    assert [r["reply_id"] for r in rows] == [x.response_id for x in t]
    assert all(r["chat_id"] == t[0].chat_id for r in rows)


async def test_regenerate_branches_from_the_same_parent(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """Resending a history without its last reply regenerates: same parent, a new branch."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    await conv.say("two")
    before = qwen_fake.turns[-1]
    await conv.ask(conv.history[:-1])
    again = qwen_fake.turns[-1]
    assert again.parent_id == before.parent_id and again.response_id != before.response_id
    last_turn_ok(qwen_fake, conv.history[:-1])


async def test_edit_last_user_message(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """An edited last user message goes under the reply before it, with the new text."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    await conv.say("two")
    edited = conv.history[:2] + [{"role": "user", "content": "two, edited"}]
    await conv.ask(edited)
    assert qwen_fake.turns[-1].parent_id == qwen_fake.turns[0].response_id
    last_turn_ok(qwen_fake, edited)


async def test_going_back_to_an_earlier_turn(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """A history cut back to turn 2 continues from turn 2's reply, not the latest one."""
    conv = Conversation(qproxy.sdk())
    for q in ("one", "two", "three", "four"):
        await conv.say(q)
    back = conv.history[:4] + [{"role": "user", "content": "instead of three"}]
    await conv.ask(back, stream=True)
    assert qwen_fake.turns[-1].parent_id == qwen_fake.turns[1].response_id
    last_turn_ok(qwen_fake, back)
    # ...and that new branch continues in its turn.
    reply = qwen_fake.turns[-1].reply
    onward = back + [{"role": "assistant", "content": reply}, {"role": "user", "content": "five"}]
    await conv.ask(onward)
    last_turn_ok(qwen_fake, onward)
    assert qwen_fake.created_chats == 1


async def test_two_conversations_with_the_same_first_message_never_mix(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """Two conversations opening with "hi" then diverging each keep their own context."""
    a, b = Conversation(qproxy.sdk()), Conversation(qproxy.sdk())
    await a.say("hi")
    await b.say("hi")
    for qa, qb in [("cats?", "dogs?"), ("more", "more"), ("and?", "and?")]:
        await a.say(qa)
        last_turn_ok(qwen_fake, a.history[:-1])
        await b.say(qb)
        last_turn_ok(qwen_fake, b.history[:-1])
    assert a.history != b.history


async def test_two_client_keys_never_share_a_session(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """The same first message from two client keys makes two sessions and two upstream chats."""
    cfg = qwen_config(qwen_fake.base_url)  # type: ignore[attr-defined]
    cfg["auth"] = {"client_keys": [{"name": "alice", "key": "alice-key-1234"}, {"name": "bob", "key": "bob-key-5678"}]}
    p = await make_proxy(cfg)
    alice, bob = Conversation(p.sdk("alice-key-1234")), Conversation(p.sdk("bob-key-5678"))
    await alice.say("hi")
    await bob.say("hi")
    await alice.say("secret plan")
    await bob.say("what did alice say?")
    last_turn_ok(qwen_fake, bob.history[:-1])
    assert alice.session_id != bob.session_id
    assert len({t.chat_id for t in qwen_fake.turns}) == 2
    # Bob cannot name Alice's session either.
    with pytest.raises(openai.NotFoundError):
        await p.sdk("bob-key-5678").chat.completions.create(
            model="qwen3-max", messages=alice.history, extra_headers={"X-Session-Id": alice.session_id or ""}
        )


async def test_ten_concurrent_conversations(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """Ten conversations interleaving their turns each see exactly their own history."""
    convs = [Conversation(qproxy.sdk(), system=f"persona {i}") for i in range(10)]

    async def run(i: int, conv: Conversation) -> None:
        for turn in range(3):
            await conv.say(f"c{i} t{turn}", stream=turn % 2 == 1)

    await asyncio.gather(*(run(i, c) for i, c in enumerate(convs)))
    by_content = {t.user_content: t for t in qwen_fake.turns}
    for i, conv in enumerate(convs):
        for turn in range(1, 3):
            t = by_content[f"c{i} t{turn}"]
            assert context_matches(t.context, conv.history[: 2 * turn + 2])
    assert qwen_fake.created_chats == 10
    assert len({c.session_id for c in convs}) == 10


async def test_same_session_hit_concurrently_queues(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """Two turns on one chat at once: the second waits for the first instead of colliding."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    release = qwen_fake.stall_next()
    h1 = conv.history + [{"role": "user", "content": "first"}]
    h2 = conv.history + [{"role": "user", "content": "second"}]
    first = asyncio.create_task(conv.ask(h1, stream=True))
    second = asyncio.create_task(conv.ask(h2))
    threads = qproxy.state.threads
    assert threads is not None
    chat = qwen_fake.turns[0].chat_id
    await until(lambda: threads.locks.waiting(chat) >= 2, "both requests at the chat's lock")
    release.set()
    await asyncio.gather(first, second)
    assert [t.user_content for t in qwen_fake.turns[1:]] == ["first", "second"]
    assert all(t.completed and t.parent_id == qwen_fake.turns[0].response_id for t in qwen_fake.turns[1:])
    assert context_matches(qwen_fake.turns[2].context, h2)


async def test_restart_continues_the_same_upstream_chat(make_proxy: ProxyFactory, qwen_fake: QwenFake, tmp_path: Any) -> None:
    """A proxy restarted on the same database continues the conversation in the same chat."""
    db = tmp_path / "restart.db"
    cfg = qwen_config(qwen_fake.base_url)  # type: ignore[attr-defined]
    p1 = await make_proxy(cfg, db=db)
    conv = Conversation(p1.sdk())
    await conv.say("one")
    await conv.say("two")
    await p1.server.close()
    p2 = await make_proxy(cfg, db=db)
    conv.sdk = p2.sdk()
    first_session = conv.session_id
    await conv.say("three")
    assert conv.session_id == first_session
    assert qwen_fake.created_chats == 1
    assert qwen_fake.turns[-1].parent_id == qwen_fake.turns[-2].response_id
    last_turn_ok(qwen_fake, conv.history[:-1])


async def test_expired_session_starts_over_with_the_whole_history(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """After expiry the next request opens a new session and a new chat carrying the history."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    old = conv.session_id
    sessions = qproxy.state.sessions
    assert sessions is not None
    assert sessions.expire(now=10**12) == 1
    assert sessions.stats()["expired_total"] == 1 and sessions.stats()["active"] == 0
    await conv.say("two")
    assert conv.session_id != old
    assert qwen_fake.created_chats == 2 and qwen_fake.turns[-1].parent_id is None
    last_turn_ok(qwen_fake, conv.history[:-1])
    [row] = await qproxy.rows("SELECT state FROM sessions WHERE id = ?", old)
    assert row["state"] == "expired"


async def test_upstream_not_found_recovers_by_bootstrapping(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """A chat gone upstream (NotFound) is rebuilt: a new chat with the whole history, same session."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    await conv.say("two")
    session = conv.session_id
    qwen_fake.forget(qwen_fake.turns[-1].chat_id)
    await conv.say("three", stream=True)
    assert conv.session_id == session
    assert qwen_fake.created_chats == 2
    last_turn_ok(qwen_fake, conv.history[:-1])
    await conv.say("four")  # and the rebuilt thread continues normally
    assert qwen_fake.turns[-1].user_content == "four"
    last_turn_ok(qwen_fake, conv.history[:-1])


@pytest.mark.parametrize("stream", [False, True])
async def test_cut_stream_does_not_advance_the_thread(qproxy: Proxy, qwen_fake: QwenFake, stream: bool) -> None:
    """A reply cut mid-stream errors, is not a parent, and the retried turn is correct."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    qwen_fake.truncate_next(after_events=3)
    nxt = conv.history + [{"role": "user", "content": "two"}]
    with pytest.raises(openai.APIError):
        await conv.ask(nxt, stream=stream)
    await conv.ask(nxt, stream=stream)
    assert qwen_fake.turns[-1].parent_id == qwen_fake.turns[0].response_id
    last_turn_ok(qwen_fake, nxt)
    rows = await qproxy.rows()
    assert rows[1]["outcome"] == "upstream_error" and rows[2]["outcome"] == "ok"


async def test_turn_20_request_is_no_larger_than_turn_2(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """Only new messages travel: the upstream request does not grow with the conversation."""
    conv = Conversation(qproxy.sdk())
    for i in range(20):
        await conv.say(f"message {i:03d}")
    sizes = [t.request_bytes for t in qwen_fake.turns]
    assert sizes[19] <= sizes[1]


async def test_thinking_maps_to_reasoning_content(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """`think` deltas arrive as `reasoning_content`; only `answer` text is the content."""
    sdk = qproxy.sdk()
    msgs: list[Msg] = [{"role": "user", "content": "think first"}]
    answer = await sdk.chat.completions.create(model="qwen3-max", messages=msgs, reasoning_effort="high")
    msg = answer.choices[0].message
    assert msg.content == qwen_fake.turns[-1].reply
    assert getattr(msg, "reasoning_content", None) == QwenFake.thinking_for(qwen_fake.turns[-1].context)
    assert answer.usage is not None and answer.usage.total_tokens == qwen_fake.turns[-1].usage["total_tokens"]


@pytest.mark.parametrize(
    ("code", "status"), [("RateLimited", 429), ("Unauthorized", 401), ("Bad_Request", 502)]
)
async def test_upstream_errors_are_mapped(qproxy: Proxy, qwen_fake: QwenFake, code: str, status: int) -> None:
    """Upstream error codes become OpenAI errors with a fitting status and the upstream's text."""
    qwen_fake.fail_next(code, details="the upstream's words")
    with pytest.raises(openai.APIStatusError) as e:
        await qproxy.sdk().chat.completions.create(model="qwen3-max", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == status
    assert "the upstream's words" in e.value.message


async def test_upstream_http_error_is_502(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """A plain HTTP 500 with an HTML body from the upstream is a 502 for the client."""
    qwen_fake.http_error_next(500, "<html>oops</html>", "text/html")
    with pytest.raises(openai.APIStatusError) as e:
        await qproxy.sdk().chat.completions.create(model="qwen3-max", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502


async def test_stateless_upstream_groups_turns_in_the_log(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """On a stateless upstream the full history travels, and the log still threads the turns:
    each request's history continues the previous reply's node in the conversation tree."""
    p = await make_proxy(base_config(openai_fake.base_url))  # type: ignore[attr-defined]
    conv = Conversation(p.sdk(), model="gpt-4o")
    for q in ("one", "two", "three"):
        await conv.say(q, stream=q == "two")
    assert [len(s.body["messages"]) for s in openai_fake.seen] == [1, 3, 5]
    rows = await p.rows()
    assert len({r["session_id"] for r in rows}) == 1
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert all(r["chat_id"] == rows[0]["session_id"] for r in rows)
    for before, after in zip(rows, rows[1:]):
        [parent] = await p.rows("SELECT parent_id FROM messages WHERE id = ?", after["tip_message"])
        assert parent["parent_id"] == before["reply_message"]
    [session] = await p.rows("SELECT * FROM sessions")
    assert (session["request_count"], session["message_count"]) == (3, 5)


async def test_explicit_session_header_wins(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """`X-Session-Id` names the session; two openings under one name share it."""
    sdk = qproxy.sdk(default_headers={"X-Session-Id": "agent-run-7"})
    a, b = Conversation(sdk), Conversation(sdk)
    await a.say("first opening")
    await b.say("second opening")
    assert a.session_id == b.session_id == "agent-run-7"
    rows = await qproxy.rows()
    assert {r["session_id"] for r in rows} == {"agent-run-7"}


async def test_max_sessions_evicts_least_recently_used(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """Past `max_sessions` the least recently used session is evicted and counted."""
    p = await make_proxy(qwen_config(qwen_fake.base_url, max_sessions=2))  # type: ignore[attr-defined]
    convs = [Conversation(p.sdk()) for _ in range(3)]
    await convs[0].say("a")
    await convs[1].say("b")
    await convs[0].say("a again")  # 0 is now more recent than 1
    await convs[2].say("c")
    sessions = p.state.sessions
    assert sessions is not None
    assert set(sessions.active) == {convs[0].session_id, convs[2].session_id}
    assert sessions.stats()["evicted_total"] == 1


async def test_expiry_can_delete_the_upstream_chats(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """With `delete_chats_on_expiry`, the cleanup deletes an expired session's upstream chats."""
    cfg = qwen_config(qwen_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][-1]["delete_chats_on_expiry"] = True
    p = await make_proxy(cfg)
    conv = Conversation(p.sdk())
    await conv.say("one")
    chat = qwen_fake.turns[-1].chat_id
    assert chat in qwen_fake.chats
    sessions = p.state.sessions
    assert sessions is not None
    assert sessions.expire(now=10**12) == 1
    await sessions.delete_doomed_chats()
    assert chat not in qwen_fake.chats


async def test_a_session_deleted_while_its_request_is_in_flight_stays_deleted(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """The request that was at the upstream when its session was deleted finishes for its
    client, but neither writes the session back nor records a turn for it; the next turn
    starts a new session and a new upstream chat."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    sessions = qproxy.state.sessions
    assert sessions is not None
    sid = conv.session_id
    release = qwen_fake.stall_next()
    second = asyncio.create_task(conv.say("two"))
    await until(lambda: len(qwen_fake.turns) >= 2, "the second turn at the upstream")
    sessions.delete(sid)  # type: ignore[arg-type]
    release.set()
    assert await second
    await qproxy.drained()
    assert await qproxy.rows("SELECT id FROM sessions WHERE id = ?", sid) == []
    assert await qproxy.rows("SELECT * FROM turns WHERE session_id = ?", sid) == []
    assert qproxy.state.writer is not None and qproxy.state.writer.failed == 0
    await conv.say("three")
    assert conv.session_id != sid
    assert qwen_fake.turns[-1].chat_id != qwen_fake.turns[0].chat_id


async def test_a_stateless_session_deleted_in_flight_keeps_no_turn(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """On a stateless upstream the log writer threads the turn after the reply: a session
    deleted meanwhile gets no turn row, and no write fails."""
    p = await make_proxy(base_config(openai_fake.base_url))  # type: ignore[attr-defined]
    openai_fake.stall_head = asyncio.Event()
    task = asyncio.create_task(p.sdk().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}]))
    await until(lambda: len(openai_fake.seen) == 1, "the request at the upstream")
    await p.drained()  # the session row is in the file
    sessions = p.state.sessions
    assert sessions is not None
    [sid] = list(sessions.active)
    sessions.delete(sid)
    openai_fake.stall_head.set()
    await task
    await p.drained()
    assert await p.rows("SELECT id FROM sessions") == [] and await p.rows("SELECT * FROM turns") == []
    assert p.state.writer is not None and p.state.writer.failed == 0


async def test_a_session_evicted_then_deleted_in_flight_stays_deleted(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """Evicted while its request is at the upstream, then deleted: the request's last save
    only updates, so the deleted row is not written back."""
    p = await make_proxy(qwen_config(qwen_fake.base_url, max_sessions=1))  # type: ignore[attr-defined]
    conv = Conversation(p.sdk())
    await conv.say("one")
    sid = conv.session_id
    release = qwen_fake.stall_next()
    second = asyncio.create_task(conv.say("two"))
    await until(lambda: len(qwen_fake.turns) == 2, "the second turn at the upstream")
    await p.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])  # evicts it
    sessions = p.state.sessions
    assert sessions is not None and sid not in sessions.active
    sessions.delete(sid)  # type: ignore[arg-type]
    release.set()
    await second
    await p.drained()
    assert await p.rows("SELECT id FROM sessions WHERE id = ?", sid) == []
    assert await p.rows("SELECT * FROM turns WHERE session_id = ?", sid) == []


async def test_sessions_that_ran_out_while_no_daemon_ran_are_expired_at_start(make_proxy: ProxyFactory, tmp_path: Any) -> None:
    """A session whose time ran out while the proxy was down is marked expired when the next
    one starts: the running daemon's cleanup only sees the sessions it holds."""
    db = tmp_path / "stale.db"
    cfg = base_config() | {"sessions": {"timeout_minutes": 0.002}}  # 120 ms
    p1 = await make_proxy(cfg, db=db)
    conv = Conversation(p1.sdk(), model="echo")
    await conv.say("hello")
    await conv.say("again")  # a conversation that continues is stored as a session
    await p1.server.close()
    conn = sqlite3.connect(db)
    try:
        [(state, expires_at)] = conn.execute("SELECT state, expires_at FROM sessions").fetchall()
    finally:
        conn.close()
    assert state == "active"
    await until(lambda: iso(time.time()) > expires_at, "the session's expiry to pass")
    p2 = await make_proxy(base_config(), db=db)  # the default 30-minute timeout
    await p2.drained()
    [after] = await p2.rows("SELECT state, metadata FROM sessions")
    assert after["state"] == "expired" and json.loads(after["metadata"])["ended"] == "expired"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_threaded_turn_is_committed_before_the_client_has_its_reply(qproxy: Proxy, qwen_fake: QwenFake, stream: bool) -> None:
    """The turn a reply completes is in the database (not only in the daemon's memory)
    by the time the client has the whole reply: a daemon that restarts, or another
    instance, continues from it."""
    conv = Conversation(qproxy.sdk())
    await conv.say("remember me", stream=stream)
    db = sqlite3.connect(f"file:{qproxy.db_path}?mode=ro", uri=True)  # no wait for the writer: read at once
    try:
        [(chat_id, reply_id)] = db.execute("SELECT chat_id, reply_id FROM turns").fetchall()
    finally:
        db.close()
    assert (chat_id, reply_id) == (qwen_fake.turns[-1].chat_id, qwen_fake.turns[-1].response_id)
