"""Tests of the Qwen v2 fake itself: it must be as strict as the protocol page says.

Driven over loopback with a real aiohttp client; events are parsed with a small
buffer-until-blank-line loop so the byte splitting is exercised too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.fakes.qwen import QwenFake

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAFETY = 5  # seconds; only a guard against hanging, never used to synchronise

ClientFactory = Callable[..., Awaitable[TestClient]]


class Events:
    """Reads an SSE body chunk by chunk, buffering until `\\n\\n`, and parses `data:` lines."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.buf = b""
        self.reads: list[bytes] = []

    async def next(self) -> dict[str, Any] | None:
        """The next event, or None at the end of the body (leftover bytes are an error)."""
        while b"\n\n" not in self.buf:
            chunk = await self.resp.content.readany()
            if not chunk:
                assert self.buf == b"", f"stream ended inside an event: {self.buf!r}"
                return None
            self.reads.append(chunk)
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n\n")
        line = raw.decode("utf-8")
        assert line.startswith("data: "), line
        return json.loads(line[len("data: "):])

    async def rest(self) -> list[dict[str, Any]]:
        out = []
        while (event := await self.next()) is not None:
            out.append(event)
        return out


def body(
    chat_id: str,
    parent_id: str | None,
    content: str,
    *,
    thinking: bool = False,
) -> dict[str, Any]:
    """A completion body shaped like the protocol page's example."""
    return {
        "stream": True,
        "incremental_output": True,
        "chat_id": chat_id,
        "chat_mode": "normal",
        "model": "qwen3-max",
        "parent_id": parent_id,
        "messages": [
            {
                "fid": str(uuid.uuid4()),
                "parentId": parent_id,
                "childrenIds": [],
                "role": "user",
                "content": content,
                "user_action": "chat",
                "files": [],
                "timestamp": 1761490228,
                "models": ["qwen3-max"],
                "chat_type": "t2t",
                "feature_config": {"thinking_enabled": thinking, "output_schema": "phase"},
                "extra": {"meta": {"subChatType": "t2t"}},
                "sub_chat_type": "t2t",
                "parent_id": parent_id,
            }
        ],
        "timestamp": 1761490229,
    }


def answer(events: list[dict[str, Any]]) -> str:
    return "".join(
        e["choices"][0]["delta"]["content"]
        for e in events
        if "choices" in e and e["choices"][0]["delta"]["phase"] == "answer"
    )


def finished(events: list[dict[str, Any]]) -> bool:
    return any(
        "choices" in e and e["choices"][0]["delta"]["status"] == "finished" for e in events
    )


async def new_chat(client: TestClient) -> str:
    resp = await client.post(
        "/api/v2/chats/new",
        json={"title": "New Chat", "models": ["qwen3-max"], "chat_mode": "normal",
              "chat_type": "t2t", "timestamp": 1761484022218},
        headers=AUTH,
    )
    data = await resp.json()
    assert data["success"] is True, data
    return data["data"]["id"]


async def post_turn(client: TestClient, payload: dict[str, Any]) -> aiohttp.ClientResponse:
    return await client.post(
        "/api/v2/chat/completions",
        params={"chat_id": payload["chat_id"]},
        json=payload,
        headers={**AUTH, "Accept": "text/event-stream"},
    )


async def turn(
    client: TestClient, chat_id: str, parent_id: str | None, content: str, **kw: Any
) -> list[dict[str, Any]]:
    """One accepted turn read to the end; fails if the fake answered with an error."""
    resp = await post_turn(client, body(chat_id, parent_id, content, **kw))
    assert resp.status == 200
    assert resp.content_type == "text/event-stream", await resp.text()
    return await Events(resp).rest()


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The `data` of an HTTP-200 `success: false` answer."""
    assert resp.status == 200
    assert resp.content_type == "application/json"
    payload = await resp.json()
    assert payload["success"] is False
    assert payload["request_id"]
    return payload["data"]


@pytest.fixture
def fake() -> QwenFake:
    return QwenFake(TOKEN)


@pytest.fixture
async def client(fake: QwenFake, aiohttp_client: ClientFactory) -> TestClient:
    return await aiohttp_client(fake.app)


async def test_create_chat_checks_auth_and_body(client: TestClient, fake: QwenFake) -> None:
    """/chats/new needs the bearer token and a body with models and chat_type."""
    chat_id = await new_chat(client)
    assert chat_id in fake.chats and fake.created_chats == 1

    resp = await client.post("/api/v2/chats/new", json={"models": ["m"], "chat_type": "t2t"})
    assert (await error_of(resp))["code"] == "Unauthorized"
    resp = await client.post(
        "/api/v2/chats/new", json={"models": ["m"], "chat_type": "t2t"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert (await error_of(resp))["code"] == "Unauthorized"
    for bad in ({"chat_type": "t2t"}, {"models": [], "chat_type": "t2t"}, {"models": ["m"]}):
        resp = await client.post("/api/v2/chats/new", json=bad, headers=AUTH)
        assert (await error_of(resp))["code"] == "Bad_Request"
    assert fake.created_chats == 1


async def test_first_turn_answers_for_the_root_path(client: TestClient, fake: QwenFake) -> None:
    """A root turn streams response.created, cumulative-usage deltas of reply_for, finished."""
    chat_id = await new_chat(client)
    payload = body(chat_id, None, "explain law to an alien")
    resp = await post_turn(client, payload)
    events = await Events(resp).rest()

    created = events[0]["response.created"]
    assert created["chat_id"] == chat_id
    assert created["parent_id"] == payload["messages"][0]["fid"]  # the user message's id
    context = [("user", "explain law to an alien")]
    assert answer(events) == QwenFake.reply_for(context)
    assert events[-1] == {"choices": [{"delta": {
        "role": "assistant", "content": "", "phase": "answer", "status": "finished"}}]}

    deltas = events[1:-1]
    assert len(deltas) == len(QwenFake.reply_for(context).split())  # chunk_words=1
    outputs = [e["usage"]["output_tokens"] for e in deltas]
    assert outputs == list(range(1, len(deltas) + 1))
    for e in deltas:
        usage = e["usage"]
        assert usage["input_tokens"] == 5
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    [t] = fake.turns
    assert (t.chat_id, t.parent_id, t.user_content) == (chat_id, None, "explain law to an alien")
    assert t.context == context
    assert t.response_id == created["response_id"]
    assert t.reply == t.sent == answer(events)
    assert t.completed
    assert t.request_bytes == len(json.dumps(payload).encode())
    assert t.usage == deltas[-1]["usage"]
    assert fake.requests == [payload]


async def test_continuing_from_response_id_puts_reply_in_context(
    client: TestClient, fake: QwenFake
) -> None:
    """Turn 2 under turn 1's response_id sees user 1, the assistant reply, and user 2."""
    chat_id = await new_chat(client)
    first = await turn(client, chat_id, None, "hello")
    r1 = first[0]["response.created"]["response_id"]
    second = await turn(client, chat_id, r1, "and more")

    context = [("user", "hello"), ("assistant", answer(first)), ("user", "and more")]
    assert answer(second) == QwenFake.reply_for(context)
    assert fake.turns[1].context == context
    assert fake.turns[1].parent_id == r1
    assert second[1]["usage"]["input_tokens"] == sum(len(c.split()) for _, c in context)


async def test_reply_depends_on_the_whole_path(client: TestClient) -> None:
    """Branches under one parent differ by content; the same words under turn 1 vs turn 2
    differ; the same path twice gives the same reply."""
    chat_id = await new_chat(client)
    t1 = await turn(client, chat_id, None, "start")
    r1 = t1[0]["response.created"]["response_id"]
    t2 = await turn(client, chat_id, r1, "next")
    r2 = t2[0]["response.created"]["response_id"]

    alpha = answer(await turn(client, chat_id, r1, "alpha"))
    beta = answer(await turn(client, chat_id, r1, "beta"))
    assert alpha != beta
    from_r1 = answer(await turn(client, chat_id, r1, "same"))
    from_r2 = answer(await turn(client, chat_id, r2, "same"))
    assert from_r1 != from_r2
    assert answer(await turn(client, chat_id, r1, "alpha")) == alpha

    # A null parent in an existing chat is a new root branch, with only its own message.
    root_again = await turn(client, chat_id, None, "start")
    assert answer(root_again) == answer(t1)


def test_reply_for_digests_roles_and_every_content() -> None:
    """reply_for changes with any role or content on the path and carries non-ASCII."""
    base = [("user", "a"), ("assistant", "b"), ("user", "c")]
    variants = [
        [("user", "a"), ("assistant", "B"), ("user", "c")],
        [("user", "A"), ("assistant", "b"), ("user", "c")],
        [("user", "a"), ("user", "b"), ("user", "c")],
        [("user", "c")],
    ]
    reply = QwenFake.reply_for(base)
    assert reply == QwenFake.reply_for(list(base))
    assert all(QwenFake.reply_for(v) != reply for v in variants)
    assert len(reply.encode()) > len(reply)  # multi-byte UTF-8 to split inside


async def test_parent_must_be_a_finished_assistant_reply_of_that_chat(
    client: TestClient, fake: QwenFake
) -> None:
    """A user-message id, another chat's reply or an unknown id is 'not exist'."""
    chat_a = await new_chat(client)
    chat_b = await new_chat(client)
    a1 = (await turn(client, chat_a, None, "a"))[0]["response.created"]
    b1 = (await turn(client, chat_b, None, "b"))[0]["response.created"]

    for parent in (a1["parent_id"], b1["response_id"], str(uuid.uuid4())):
        data = await error_of(await post_turn(client, body(chat_a, parent, "x")))
        assert data == {"code": "Bad_Request",
                        "details": f"Invalid input chat parent_id {parent} is not exist"}
    assert len(fake.turns) == 2
    await turn(client, chat_a, a1["response_id"], "fine")


async def test_unknown_forgotten_and_deleted_chats_are_not_found(
    client: TestClient, fake: QwenFake
) -> None:
    """Never-created, forgotten (expired) and deleted chats all answer NotFound."""
    data = await error_of(await post_turn(client, body(str(uuid.uuid4()), None, "hi")))
    assert data["code"] == "NotFound"

    chat_id = await new_chat(client)
    r1 = (await turn(client, chat_id, None, "hi"))[0]["response.created"]["response_id"]
    fake.forget(chat_id)
    data = await error_of(await post_turn(client, body(chat_id, r1, "again")))
    assert data["code"] == "NotFound"

    chat_id = await new_chat(client)
    await turn(client, chat_id, None, "hi")
    resp = await client.get(f"/api/v2/chats/{chat_id}", headers=AUTH)
    chat = (await resp.json())["data"]
    assert [(m["role"], m["content"]) for m in chat["messages"]] == [
        ("user", "hi"), ("assistant", QwenFake.reply_for([("user", "hi")]))]
    resp = await client.delete(f"/api/v2/chats/{chat_id}", headers=AUTH)
    assert (await resp.json())["success"] is True
    assert (await error_of(await client.get(f"/api/v2/chats/{chat_id}", headers=AUTH)))[
        "code"] == "NotFound"
    data = await error_of(await post_turn(client, body(chat_id, None, "again")))
    assert data["code"] == "NotFound"


async def test_stalled_turn_keeps_chat_in_progress_until_released(
    client: TestClient, fake: QwenFake
) -> None:
    """While a reply streams the chat refuses new turns; once finished it is a parent."""
    chat_id = await new_chat(client)
    release = fake.stall_next()
    resp = await post_turn(client, body(chat_id, None, "slow"))
    stream = Events(resp)
    created = (await stream.next())["response.created"]
    assert (await stream.next())["choices"][0]["delta"]["status"] == "typing"

    data = await error_of(await post_turn(client, body(chat_id, None, "meanwhile")))
    assert data == {"code": "Bad_Request", "details": "The chat is in progress!"}
    assert not fake.turns[0].completed

    release.set()
    rest = await asyncio.wait_for(stream.rest(), SAFETY)
    assert finished(rest)
    assert fake.turns[0].completed
    await turn(client, chat_id, created["response_id"], "after")
    assert not fake.disconnected.is_set()


async def test_truncated_reply_has_no_finished_and_is_no_parent(
    client: TestClient, fake: QwenFake
) -> None:
    """truncate_next ends the body after N events; that reply cannot be continued."""
    chat_id = await new_chat(client)
    fake.truncate_next(after_events=3)
    events = await turn(client, chat_id, None, "cut me off")
    assert len(events) == 3 and not finished(events)
    rid = events[0]["response.created"]["response_id"]
    t = fake.turns[0]
    assert not t.completed and t.sent == answer(events) and t.sent != t.reply

    data = await error_of(await post_turn(client, body(chat_id, rid, "continue")))
    assert data["details"] == f"Invalid input chat parent_id {rid} is not exist"
    await turn(client, chat_id, None, "not in progress any more")


async def test_truncate_with_abort_drops_the_connection(
    client: TestClient, fake: QwenFake
) -> None:
    """truncate_next(abort=True) breaks the connection mid-body instead of ending it."""
    chat_id = await new_chat(client)
    fake.truncate_next(after_events=2, abort=True)
    resp = await post_turn(client, body(chat_id, None, "x"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    assert not fake.turns[0].completed


async def test_client_disconnect_is_recorded_and_reply_unusable(
    client: TestClient, fake: QwenFake
) -> None:
    """A client leaving mid-stream sets `disconnected`; the reply is not a parent later."""
    chat_id = await new_chat(client)
    fake.stall_next()  # never released: only the disconnect ends it
    resp = await post_turn(client, body(chat_id, None, "bye"))
    rid = (await Events(resp).next())["response.created"]["response_id"]
    resp.close()
    await asyncio.wait_for(fake.disconnected.wait(), SAFETY)

    assert not fake.turns[0].completed
    data = await error_of(await post_turn(client, body(chat_id, rid, "more")))
    assert data["details"] == f"Invalid input chat parent_id {rid} is not exist"
    await turn(client, chat_id, None, "fresh root")


@pytest.mark.parametrize("code", ["Bad_Request", "NotFound", "RateLimited", "Unauthorized"])
async def test_fail_next_answers_each_error_code(
    client: TestClient, fake: QwenFake, code: str
) -> None:
    """fail_next(code) makes exactly the next completion an HTTP-200 error of that code."""
    chat_id = await new_chat(client)
    fake.fail_next(code, details="scripted", num=3 if code == "RateLimited" else None)
    data = await error_of(await post_turn(client, body(chat_id, None, "x")))
    expected = {"code": code, "details": "scripted"}
    if code == "RateLimited":
        expected["num"] = 3
    assert data == expected
    assert fake.turns == [] and len(fake.requests) == 1
    await turn(client, chat_id, None, "x")


async def test_scripts_are_consumed_in_order(client: TestClient, fake: QwenFake) -> None:
    """Scripted outcomes form a FIFO, one per completion request; RateLimited has num."""
    chat_id = await new_chat(client)
    fake.fail_next("RateLimited")
    fake.http_error_next(503, "<html>busy</html>", "text/html")
    fake.fail_next("NotFound")
    assert (await error_of(await post_turn(client, body(chat_id, None, "1"))))["num"] == 1
    assert (await post_turn(client, body(chat_id, None, "2"))).status == 503
    assert (await error_of(await post_turn(client, body(chat_id, None, "3"))))[
        "code"] == "NotFound"
    assert finished(await turn(client, chat_id, None, "4"))


async def test_http_error_next_returns_status_and_body(
    client: TestClient, fake: QwenFake
) -> None:
    """http_error_next sends a plain 4xx/5xx with the given body and content type."""
    chat_id = await new_chat(client)
    fake.http_error_next(429, '{"error": "slow down"}')
    resp = await post_turn(client, body(chat_id, None, "x"))
    assert resp.status == 429
    assert resp.content_type == "application/json"
    assert await resp.json() == {"error": "slow down"}

    fake.http_error_next(502, b"<html>Bad Gateway</html>", "text/html")
    resp = await post_turn(client, body(chat_id, None, "x"))
    assert (resp.status, resp.content_type) == (502, "text/html")
    assert await resp.text() == "<html>Bad Gateway</html>"


async def test_thinking_streams_think_phase_first(client: TestClient, fake: QwenFake) -> None:
    """thinking_enabled adds think-phase deltas before the answer; the answer is unchanged."""
    chat_id = await new_chat(client)
    events = await turn(client, chat_id, None, "ponder", thinking=True)
    phases = [e["choices"][0]["delta"]["phase"] for e in events[1:-1]]
    assert phases[0] == "think" and phases[-1] == "answer"
    assert phases == sorted(phases, key=lambda p: p != "think")
    think = "".join(e["choices"][0]["delta"]["content"] for e in events[1:-1]
                    if e["choices"][0]["delta"]["phase"] == "think")
    assert think.startswith("thinking about")
    context = [("user", "ponder")]
    assert answer(events) == QwenFake.reply_for(context) == fake.turns[0].reply
    outputs = [e["usage"]["output_tokens"] for e in events[1:-1]]
    assert outputs == sorted(outputs) and len(set(outputs)) == len(outputs)


async def test_chunk_words_groups_words_per_delta(aiohttp_client: ClientFactory) -> None:
    """chunk_words=3 sends three words per answer delta; usage counts words."""
    fake = QwenFake(TOKEN, chunk_words=3)
    client = await aiohttp_client(fake.app)
    chat_id = await new_chat(client)
    events = await turn(client, chat_id, None, "group")
    reply = QwenFake.reply_for([("user", "group")])
    words = reply.split()
    deltas = events[1:-1]
    assert len(deltas) == -(-len(words) // 3)
    assert [len(e["choices"][0]["delta"]["content"].split()) for e in deltas[:-1]] == [3] * (
        len(deltas) - 1)
    assert deltas[-1]["usage"]["output_tokens"] == len(words)
    assert answer(events) == reply


async def test_events_arrive_split_at_arbitrary_bytes(aiohttp_client: ClientFactory) -> None:
    """The client sees many small reads, cut inside events, '\\n\\n' and UTF-8 characters.

    max_piece=3 makes each kind of cut near-certain whatever the seed; the default makes it likely.
    """
    fake = QwenFake(TOKEN, max_piece=3)
    client = await aiohttp_client(fake.app)
    chat_id = await new_chat(client)
    reads: list[bytes] = []
    parent = None
    for i in range(2):
        resp = await post_turn(client, body(chat_id, parent, f"turn {i}"))
        stream = Events(resp)
        events = await stream.rest()
        assert finished(events) and answer(events) == fake.turns[i].reply
        parent = events[0]["response.created"]["response_id"]
        assert len(stream.reads) > 3 * len(events)
        reads.extend(stream.reads)

    assert any(r.endswith(b"\n") and not r.endswith(b"\n\n") for r in reads)

    def is_utf8(chunk: bytes) -> bool:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert any(not is_utf8(r) for r in reads)


async def test_default_split_still_cuts_inside_events(client: TestClient) -> None:
    """With default settings reads are still smaller than events and end mid-event."""
    chat_id = await new_chat(client)
    resp = await post_turn(client, body(chat_id, None, "hello"))
    stream = Events(resp)
    events = await stream.rest()
    assert finished(events)
    assert len(stream.reads) > len(events)
    assert any(not r.endswith(b"\n\n") for r in stream.reads)


@pytest.mark.parametrize(
    ("mutate", "details"),
    [
        (lambda b: b.pop("stream"), "stream"),
        (lambda b: b.update(stream=False), "stream"),
        (lambda b: b.update(incremental_output=False), "incremental_output"),
        (lambda b: b.pop("model"), "model"),
        (lambda b: b.pop("parent_id"), "parent_id"),
        (lambda b: b.update(chat_id="other"), "chat_id"),
        (lambda b: b["messages"].append(dict(b["messages"][0])), "exactly one"),
        (lambda b: b.update(messages=[]), "exactly one"),
        (lambda b: b["messages"][0].update(role="assistant"), "role"),
        (lambda b: b["messages"][0].update(content=["x"]), "content"),
        (lambda b: b["messages"][0].pop("fid"), "fid"),
        (lambda b: b["messages"][0].update(parentId="x"), "parentId"),
        (lambda b: b["messages"][0].pop("parent_id"), "messages[0].parent_id"),
        (lambda b: b["messages"][0].pop("feature_config"), "feature_config"),
    ],
)
async def test_malformed_completion_is_bad_request(
    client: TestClient, fake: QwenFake, mutate: Callable[[dict[str, Any]], object], details: str
) -> None:
    """Each off-protocol body is refused with Bad_Request naming the fault, and recorded."""
    chat_id = await new_chat(client)
    payload = body(chat_id, None, "hi")
    mutate(payload)
    resp = await client.post(
        "/api/v2/chat/completions", params={"chat_id": chat_id}, json=payload, headers=AUTH
    )
    data = await error_of(resp)
    assert data["code"] == "Bad_Request" and details in data["details"]
    assert fake.requests == [payload] and fake.turns == []


async def test_completion_transport_rules(client: TestClient, fake: QwenFake) -> None:
    """Completions need the token, JSON content type and a chat_id query parameter."""
    chat_id = await new_chat(client)
    payload = body(chat_id, None, "hi")
    url = "/api/v2/chat/completions"
    resp = await client.post(url, params={"chat_id": chat_id}, json=payload)
    assert (await error_of(resp))["code"] == "Unauthorized"
    resp = await client.post(url, params={"chat_id": chat_id}, data=json.dumps(payload),
                             headers={**AUTH, "Content-Type": "text/plain"})
    assert "Content-Type" in (await error_of(resp))["details"]
    resp = await client.post(url, json=payload, headers=AUTH)
    assert "query" in (await error_of(resp))["details"]
    resp = await client.post(url, params={"chat_id": chat_id}, data=b"{not json",
                             headers={**AUTH, "Content-Type": "application/json"})
    assert (await error_of(resp))["code"] == "Bad_Request"
    assert fake.turns == [] and len(fake.requests) == 3


async def test_a_finished_turn_keeps_its_chat_in_progress_until_its_stream_closed(aiohttp_client: ClientFactory) -> None:
    """As the real service does: after `finished` the chat stays in progress until the
    stream has closed (`linger` keeps it open), and a client leaving does not end that."""
    fake = QwenFake(TOKEN, linger=SAFETY)
    client = await aiohttp_client(fake.app)
    chat_id = await new_chat(client)
    resp = await post_turn(client, body(chat_id, None, "one"))
    stream = Events(resp)
    events: list[dict[str, Any]] = []
    while not finished(events):
        event = await asyncio.wait_for(stream.next(), SAFETY)
        assert event is not None, "the stream closed before its linger"
        events.append(event)
    assert fake.turns[0].completed
    data = await error_of(await post_turn(client, body(chat_id, None, "meanwhile")))
    assert data["details"] == "The chat is in progress!"
    resp.close()  # the client leaves; the upstream's turn still runs its time
    await asyncio.wait_for(fake.disconnected.wait(), SAFETY)
    assert fake.turns[0].completed
    data = await error_of(await post_turn(client, body(chat_id, None, "still")))
    assert data["details"] == "The chat is in progress!" and fake.refused_busy == 2
