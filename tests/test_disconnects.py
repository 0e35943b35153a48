"""Faults on either side of a request, against real loopback servers.

Downstream: a client that leaves (before the first byte, mid-stream, during a non-stream
answer) gets its upstream request cancelled at once, and the request still leaves exactly
one log row, `client_disconnected`, with whatever text had arrived. Upstream: a stream that
stalls past `timeouts.idle` ends with an SSE error event and no `[DONE]`; a stalled plain
body is a 504. On the threaded upstream neither kind of fault advances the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp

from provider_router.sse import SSEParser
from tests.conftest import Proxy, ProxyFactory, base_config, qwen_config
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake
from tests.test_threads import Conversation, last_turn_ok
from tests.waiting import until

HELLO = [{"role": "user", "content": "hello there"}]
WAIT = 10.0  # bound on every wait for an event; never reached when the proxy behaves


async def rows_when(proxy: Proxy, n: int) -> list[dict[str, Any]]:
    """The log rows once there are at least `n` (the record of a cancelled request is
    queued as its handler unwinds, which may be a moment after the client left)."""

    async def enough() -> list[dict[str, Any]] | None:
        rows = await proxy.rows()
        return rows if len(rows) >= n else None

    return await until(enough, f"{n} log rows", WAIT)


async def still_serves(proxy: Proxy) -> None:
    answer = await proxy.sdk().chat.completions.create(model="echo", messages=HELLO)
    assert answer.choices[0].message.content.endswith(": hello there")


def sse_events(data: bytes) -> list[str]:
    return [e.data for e in SSEParser().feed(data)]


# -- the client leaves ---------------------------------------------------------------------
async def leave_once_upstream_has_it(proxy: Proxy, fake: OpenAIFake, body: dict[str, Any]) -> None:
    """Send `body`, hang up as soon as the upstream has received it, and wait until the
    upstream sees its own connection closed."""
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(f"{proxy.url}/v1/chat/completions", json=body))
        await asyncio.wait_for(fake.received.wait(), WAIT)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await asyncio.wait_for(fake.disconnected.wait(), WAIT)


async def test_disconnect_before_first_byte_cancels_upstream(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """A streaming client that leaves while the upstream has not sent its head: the upstream
    request is cancelled, the row says `client_disconnected` (499, no first byte)."""
    openai_fake.stall_head = asyncio.Event()
    await leave_once_upstream_has_it(proxy, openai_fake, {"model": "gpt-4o", "messages": HELLO, "stream": True})
    [row] = await rows_when(proxy, 1)
    assert (row["status"], row["outcome"], row["error"]) == (499, "client_disconnected", "client disconnected")
    assert (row["provider"], row["stream"], row["ttfb_ms"]) == ("up", 1, None)
    openai_fake.stall_head.set()
    await still_serves(proxy)
    assert [r["outcome"] for r in await proxy.rows()] == ["client_disconnected", "ok"]


async def test_disconnect_mid_stream_cancels_upstream_and_logs_partial_text(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """An SDK client that closes its stream after three chunks (the upstream holding the
    rest): the upstream connection is closed, and the row keeps the text that had arrived."""
    openai_fake.hold_after_first = asyncio.Event()
    openai_fake.hold_after = 3  # role chunk, "upstream", " saw"
    stream = await proxy.sdk().chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    got: list[str] = []
    async with asyncio.timeout(WAIT):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
            if len(got) == 3:
                break
    await stream.close()
    await asyncio.wait_for(openai_fake.disconnected.wait(), WAIT)
    [row] = await rows_when(proxy, 1)
    assert "".join(got) == "upstream saw"
    assert (row["status"], row["outcome"], row["stream"]) == (200, "client_disconnected", 1)
    assert row["response_text"] == "upstream saw"
    assert row["chunk_count"] == 3 and row["finish_reason"] is None
    await still_serves(proxy)


async def test_disconnect_during_non_stream_body_cancels_upstream(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """A plain (non-stream) client that leaves while the upstream's body is half sent: the
    upstream read is cancelled and the row says `client_disconnected`."""
    openai_fake.stall_body = asyncio.Event()
    await leave_once_upstream_has_it(proxy, openai_fake, {"model": "gpt-4o", "messages": HELLO})
    [row] = await rows_when(proxy, 1)
    assert (row["status"], row["outcome"], row["stream"]) == (499, "client_disconnected", 0)
    assert (await proxy.record(row["id"]))["response"] is None
    await still_serves(proxy)


async def test_qwen_disconnect_mid_stream_does_not_advance_the_thread(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """On the threaded upstream, a client leaving mid-stream cancels the upstream turn, logs
    the partial text, and the next attempt at that turn continues from the previous reply."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    nxt = conv.history + [{"role": "user", "content": "two"}]
    qwen_fake.stall_next()  # never released: only the client leaving ends that turn
    stream = await qproxy.sdk().chat.completions.create(model="qwen3-max", messages=nxt, stream=True)
    got = ""
    async with asyncio.timeout(WAIT):
        async for chunk in stream:
            got += chunk.choices[0].delta.content or ""
            if got:
                break
    await stream.close()
    await asyncio.wait_for(qwen_fake.disconnected.wait(), WAIT)
    rows = await rows_when(qproxy, 2)
    assert (rows[1]["status"], rows[1]["outcome"]) == (200, "client_disconnected")
    assert rows[1]["response_text"] == got == qwen_fake.turns[1].sent
    assert not qwen_fake.turns[1].completed
    await conv.ask(nxt)
    assert qwen_fake.created_chats == 1
    assert qwen_fake.turns[2].parent_id == qwen_fake.turns[0].response_id
    last_turn_ok(qwen_fake, nxt)
    assert (await qproxy.rows())[2]["parent_id"] == qwen_fake.turns[0].response_id


async def test_qwen_disconnect_during_non_stream_answer(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """A plain client leaving while the threaded upstream streams to the proxy: the upstream
    turn is cancelled, the row says `client_disconnected`, the thread does not advance."""
    conv = Conversation(qproxy.sdk())
    await conv.say("one")
    nxt = conv.history + [{"role": "user", "content": "two"}]
    qwen_fake.stall_next()
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(f"{qproxy.url}/v1/chat/completions", json={"model": "qwen3-max", "messages": nxt}))
        await until(lambda: len(qwen_fake.turns) == 2 and qwen_fake.turns[1].sent, "the stalled turn to start", WAIT)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await asyncio.wait_for(qwen_fake.disconnected.wait(), WAIT)
    rows = await rows_when(qproxy, 2)
    assert (rows[1]["status"], rows[1]["outcome"]) == (499, "client_disconnected")
    await conv.ask(nxt)
    assert qwen_fake.turns[2].parent_id == qwen_fake.turns[0].response_id
    last_turn_ok(qwen_fake, nxt)


# -- the upstream stalls ---------------------------------------------------------------------
def _idle(fake_url: str, idle: float = 0.3) -> dict[str, Any]:
    cfg = base_config(fake_url)
    cfg["providers"][1]["timeouts"] = {"idle": idle}
    return cfg


async def test_stream_stalled_past_idle_ends_with_error_event(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A pass-through stream whose upstream goes quiet past `timeouts.idle` after some chunks:
    the client gets those chunks, then an SSE error event (504, upstream_timeout), no
    `[DONE]`; the row is `timeout` with the partial text; the upstream connection is closed."""
    p = await make_proxy(_idle(openai_fake.base_url))  # type: ignore[attr-defined]
    openai_fake.hold_after_first = asyncio.Event()  # never set
    openai_fake.hold_after = 3
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO, "stream": True}) as r:
            assert r.status == 200
            data = await asyncio.wait_for(r.read(), WAIT)
    events = sse_events(data)
    assert "[DONE]" not in events
    *chunks, last = events
    assert len(chunks) == 3
    err = json.loads(last)["error"]
    assert (err["code"], err["status"], err["type"]) == ("upstream_timeout", 504, "timeout_error")
    await asyncio.wait_for(openai_fake.disconnected.wait(), WAIT)
    [row] = await p.rows()
    assert (row["status"], row["outcome"], row["response_text"]) == (200, "timeout", "upstream saw")
    assert "no data for" in row["error"]


async def test_non_stream_body_stalled_past_idle_is_504(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A plain answer whose body stops half way for longer than `timeouts.idle` is a 504 in
    OpenAI's error shape, logged as `timeout`; the upstream connection is closed."""
    p = await make_proxy(_idle(openai_fake.base_url))  # type: ignore[attr-defined]
    openai_fake.stall_body = asyncio.Event()  # never set
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}) as r:
            assert r.status == 504
            err = (await r.json())["error"]
    assert (err["code"], err["type"]) == ("upstream_timeout", "timeout_error")
    await asyncio.wait_for(openai_fake.disconnected.wait(), WAIT)
    [row] = await p.rows()
    assert (row["status"], row["outcome"]) == (504, "timeout")


async def test_qwen_stream_stalled_past_idle(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """The threaded upstream going quiet mid-stream: an SSE error event and no `[DONE]`
    (stream), a 504 (plain); neither is a parent: the next turn continues from turn one."""
    cfg = qwen_config(qwen_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1]["timeouts"] = {"idle": 0.3}
    p = await make_proxy(cfg)
    conv = Conversation(p.sdk())
    await conv.say("one")
    nxt = conv.history + [{"role": "user", "content": "two"}]
    async with aiohttp.ClientSession() as s:
        qwen_fake.stall_next()
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "qwen3-max", "messages": nxt, "stream": True}) as r:
            assert r.status == 200
            events = sse_events(await asyncio.wait_for(r.read(), WAIT))
        assert "[DONE]" not in events
        assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
        qwen_fake.stall_next()
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "qwen3-max", "messages": nxt}) as r:
            assert r.status == 504
            assert (await r.json())["error"]["code"] == "upstream_timeout"
    rows = await p.rows()
    assert [(r["status"], r["outcome"]) for r in rows[1:]] == [(200, "timeout"), (504, "timeout")]
    await conv.ask(nxt)
    assert [t.parent_id for t in qwen_fake.turns[1:]] == [qwen_fake.turns[0].response_id] * 3
    last_turn_ok(qwen_fake, nxt)
