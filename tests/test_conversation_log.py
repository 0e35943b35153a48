"""The log as a conversation tree, through the official SDK: what a client sent and got is
recorded exactly (`logs show --json`'s `request` and `response`), each message is stored
once per position however often it is resent, tool calls and `n > 1` choices are kept, and
a stream's outcome is what the client saw."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from provider_router import history
from tests.conftest import Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake

TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]  # fmt: skip


async def _ask(p: Proxy, messages: list[dict[str, Any]], stream: bool = False, **kw: Any) -> tuple[str, dict[str, Any]]:
    """One request through the SDK: (its request id, the reply message as a client resends it)."""
    sdk = p.sdk()
    if not stream:
        raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, **kw)
        msg = raw.parse().choices[0].message
        return raw.headers["x-request-id"], msg.model_dump(exclude_none=True)
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, stream=True, **kw)
    text, calls = "", {}
    async for chunk in raw.parse():
        for ch in chunk.choices[:1]:
            text += ch.delta.content or ""
            for tc in ch.delta.tool_calls or ():
                c = calls.setdefault(tc.index, {"id": tc.id, "type": "function", "function": {"name": "", "arguments": ""}})
                c["function"]["name"] += tc.function.name or ""
                c["function"]["arguments"] += tc.function.arguments or ""
    msg = {"role": "assistant", "content": text or None}
    if calls:
        msg["tool_calls"] = list(calls.values())
    return raw.headers["x-request-id"], msg


async def test_a_branching_conversation_is_recorded_exactly_and_stored_once(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """Continue, regenerate, edit and go back, streamed and not: each request's record has
    the body the upstream got and the answer the client got, and the tree holds each
    message once per position (resent histories add only their new tail)."""
    one = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"}]
    rid1, a1 = await _ask(proxy, one)
    two = [*one, a1, {"role": "user", "content": "two"}]
    rid2, a2 = await _ask(proxy, two, stream=True)
    rid3, _ = await _ask(proxy, two)  # regenerate
    edited = [*one, a1, {"role": "user", "content": "two, edited"}]
    rid4, _ = await _ask(proxy, edited, stream=True)
    back = [*one, {"role": "assistant", "content": a1["content"]}, {"role": "user", "content": "back to one"}]
    rid5, _ = await _ask(proxy, back)
    three = [*two, a2, {"role": "user", "content": "three"}]
    rid6, _ = await _ask(proxy, three, stream=True, stream_options={"include_usage": True})
    ids = [rid1, rid2, rid3, rid4, rid5, rid6]
    for rid, seen in zip(ids, openai_fake.seen):
        record = await proxy.record(rid)
        assert record["request"] == seen.body  # the body as received (and forwarded)
    plain = await proxy.record(rid3)
    assert plain["response"]["choices"][0]["message"] == {"role": "assistant", "content": OpenAIFake.reply_for(two)}
    assert plain["response"]["usage"]["total_tokens"] > 0 and plain["response"]["id"] == "chatcmpl-fake3"
    streamed = await proxy.record(rid6)
    assert streamed["response"]["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": OpenAIFake.reply_for(three)}, "finish_reason": "stop"}
    ]
    assert streamed["response"]["usage"] == {"prompt_tokens": 3 * len(three), "completion_tokens": len(OpenAIFake.reply_for(three).split()), "total_tokens": streamed["total_tokens"]}
    positions = set()
    for seen, rid in zip(openai_fake.seen, ids):
        keys = history.node_keys(seen.body["messages"])
        reply = (await proxy.record(rid))["response"]["choices"][0]["message"]
        positions |= {*keys, history.node_key(keys[-1], reply)}
    [count] = await proxy.rows("SELECT count(*) AS n, count(DISTINCT hash) AS d FROM messages")
    assert count["n"] == count["d"] == len(positions)


async def test_tool_calls_are_recorded_streamed_and_not(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """A reply that calls a tool, streamed (arguments arrive in pieces) and not: the record
    keeps the call's id, name and whole arguments; the client's next request, with the
    call and its result, is recorded exactly, and the tool list is stored once."""
    for stream in (False, True):
        ask = [{"role": "user", "content": f"call weather in Paris {stream}"}]
        rid, msg = await _ask(proxy, ask, stream=stream, tools=TOOLS)
        [call] = msg["tool_calls"]
        assert call["function"]["name"] == "weather" and "Paris" in call["function"]["arguments"]
        record = await proxy.record(rid)
        [choice] = record["response"]["choices"]
        assert choice["finish_reason"] == "tool_calls"
        assert [{k: c[k] for k in ("id", "type", "function")} for c in choice["message"]["tool_calls"]] == [call]
        follow = [*ask, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"}]  # fmt: skip
        rid2, answer = await _ask(proxy, follow, stream=stream, tools=TOOLS)
        assert (await proxy.record(rid2))["request"] == openai_fake.seen[-1].body
        assert answer["content"] == OpenAIFake.reply_for(follow)
    [blobs] = await proxy.rows("SELECT count(*) AS n, max(refs) AS refs FROM blobs")
    assert (blobs["n"], blobs["refs"]) == (1, 4)


async def test_two_choices_are_kept_apart(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """`n=2`, streamed and not: each choice's reply is recorded on its own, never glued."""
    for stream in (False, True):
        messages = [{"role": "user", "content": f"pick {stream}"}]
        rid, _ = await _ask(proxy, messages, stream=stream, n=2)
        choices = (await proxy.record(rid))["response"]["choices"]
        text = OpenAIFake.reply_for(messages)
        assert [c["message"]["content"] for c in choices] == [text, f"{text} (choice 1)"]
        assert [c["index"] for c in choices] == [0, 1]


async def test_an_upstream_lingering_after_done_is_a_complete_reply(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """The upstream sends `[DONE]` and keeps its body open: the client gets its whole reply
    at once, the row says `ok` (not `client_disconnected`), and nothing is logged as an error."""
    openai_fake.linger_after_done = asyncio.Event()
    messages = [{"role": "user", "content": "linger"}]
    try:
        with structlog.testing.capture_logs() as logs:
            rid, msg = await _ask(proxy, messages, stream=True)
            assert msg["content"] == OpenAIFake.reply_for(messages)
            [row] = await proxy.rows()
    finally:
        openai_fake.linger_after_done.set()
    assert (row["id"], row["status"], row["outcome"], row["error"]) == (rid, 200, "ok", None)
    assert row["response_text"] == msg["content"] and row["finish_reason"] == "stop"
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


async def test_a_truncated_upstream_stream_is_an_upstream_error(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """An upstream stream that ends with no finish reason and no `[DONE]` was cut short: the
    client gets an error event instead of a silent end, and the row says `upstream_error`
    with what did arrive kept."""
    openai_fake.end_without_finish = True
    messages = [{"role": "user", "content": "cut me"}]
    sdk = proxy.sdk()
    got = ""
    try:
        async for chunk in await sdk.chat.completions.create(model="gpt-4o", messages=messages, stream=True):
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
        raise AssertionError("the stream ended without an error")
    except Exception as e:  # the SDK raises the error event
        assert "ended before the reply finished" in str(e)
    [row] = await proxy.rows()
    assert (row["status"], row["outcome"]) == (200, "upstream_error")
    assert "ended before the reply finished" in row["error"]
    assert row["response_text"] == got == OpenAIFake.reply_for(messages) and row["finish_reason"] is None


async def test_one_shot_requests_pay_for_no_session_row(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """Requests that start no conversation store no session; the second request of one
    stores its session and joins the first request to it."""
    p = await make_proxy(base_config(openai_fake.base_url))  # type: ignore[attr-defined]
    for i in range(3):
        await _ask(p, [{"role": "user", "content": f"one-shot {i}"}])
    assert await p.rows("SELECT id FROM sessions") == []
    assert {r["session_id"] for r in await p.rows()} == {None}
    ask = [{"role": "user", "content": "hello"}]
    _, reply = await _ask(p, ask)
    await _ask(p, [*ask, reply, {"role": "user", "content": "more"}])
    [session] = await p.rows("SELECT * FROM sessions")
    rows = await p.rows("SELECT * FROM request_log WHERE session_id IS NOT NULL ORDER BY id")
    assert [r["prompt_text"] for r in rows] == ["hello", "more"] and session["request_count"] == 2
