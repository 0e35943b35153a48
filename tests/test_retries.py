"""Retries and fallbacks: only while nothing reached the client, only for connection errors,
timeouts before the first byte, 429 and 5xx; every attempt is in the log record.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.conftest import Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake
from tests.waiting import until

HELLO = [{"role": "user", "content": "hello"}]


def with_retries(fake: OpenAIFake, retries: int) -> dict:
    cfg = base_config(fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1]["retries"] = retries
    return cfg


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_retry_after_retryable_status(make_proxy: ProxyFactory, openai_fake: OpenAIFake, status: int) -> None:
    """A 429/5xx before anything was sent is retried; the record lists both attempts."""
    p = await make_proxy(with_retries(openai_fake, 1))
    openai_fake.fail_next = (status, b'{"error": {"message": "try later"}}')
    answer = await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert answer.choices[0].message.content == OpenAIFake.reply_for(HELLO)
    [row] = await p.rows()
    attempts = json.loads(row["attempts"])
    assert [a["status"] for a in attempts] == [status if status == 429 else 502, 200]
    assert (row["status"], row["outcome"]) == (200, "ok")


async def test_no_retry_on_other_4xx(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A 400 from the upstream is the client's answer at once: it is never retried."""
    p = await make_proxy(with_retries(openai_fake, 3))
    openai_fake.fail_next = (400, b'{"error": {"message": "bad field"}}')
    with pytest.raises(openai.BadRequestError):
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len(openai_fake.seen) == 1
    [row] = await p.rows()
    assert row["attempts"] is None and row["status"] == 400


async def test_last_attempt_passes_the_upstream_error_through(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """When every attempt fails, the client gets the upstream's own status and body."""
    p = await make_proxy(with_retries(openai_fake, 0))
    openai_fake.fail_next = (503, b'{"error": {"message": "overloaded"}}')
    with pytest.raises(openai.InternalServerError) as e:
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.status_code == 503 and "overloaded" in e.value.message


async def test_fallback_model_answers_when_the_upstream_is_down(make_proxy: ProxyFactory, unused_tcp_port: int) -> None:
    """`fallbacks` moves a request whose upstream refuses connections to the next model."""
    cfg = base_config(f"http://127.0.0.1:{unused_tcp_port}/v1")
    cfg["models"] = [{"name": "echo", "provider": "echo"}, {"name": "gpt-4o", "provider": "up", "fallbacks": ["echo"]}]
    p = await make_proxy(cfg)
    answer = await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert answer.choices[0].message.content.endswith(": hello")
    [row] = await p.rows()
    assert (row["model"], row["provider"], row["status"]) == ("gpt-4o", "echo", 200)
    assert [a["provider"] for a in json.loads(row["attempts"])] == ["up", "echo"]


async def test_no_retry_after_the_first_byte(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A stream that breaks after its first chunk is not retried: the client gets an error event."""
    p = await make_proxy(with_retries(openai_fake, 3))
    openai_fake.cut_after = 2
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO, "stream": True}) as r:
            text = await r.text()
    assert '"error"' in text and "[DONE]" not in text
    assert len(openai_fake.seen) == 1


async def test_upstream_redirect_is_not_followed(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """An upstream redirect is a 502, never followed (it could carry the key elsewhere)."""
    openai_fake.fail_next = (302, b"")
    with pytest.raises(openai.APIStatusError) as e:
        await proxy.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.status_code == 502 and "redirect" in e.value.message


async def test_a_retried_request_counts_once_in_its_session(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """Each attempt joins the session; the session still counts one request per request."""
    p = await make_proxy(with_retries(openai_fake, 2))
    openai_fake.fail_next = (503, b'{"error": {"message": "try later"}}')
    await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO + [{"role": "assistant", "content": OpenAIFake.reply_for(HELLO)}, {"role": "user", "content": "again"}])
    assert len(openai_fake.seen) == 3  # two attempts, then one
    await p.drained()
    [session] = await p.rows("SELECT * FROM sessions")
    assert session["request_count"] == 2
    assert [r["session_id"] for r in await p.rows()] == [session["id"]] * 2


async def test_a_request_moved_by_a_fallback_counts_in_the_session_that_answered(make_proxy: ProxyFactory, unused_tcp_port: int) -> None:
    """The failed route's session does not keep a request its log rows do not show: it
    held nothing else, so it is gone from the daemon's sessions (and, like any one-shot,
    never stored); the session that answered is stored once the conversation goes on,
    with both requests."""
    cfg = base_config(f"http://127.0.0.1:{unused_tcp_port}/v1")
    cfg["models"] = [{"name": "echo", "provider": "echo"}, {"name": "gpt-4o", "provider": "up", "fallbacks": ["echo"]}]
    p = await make_proxy(cfg)
    await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    await p.drained()
    assert await p.rows("SELECT * FROM sessions") == []
    assert p.state.sessions.stats()["active"] == 1
    await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)  # the same conversation again
    await p.drained()
    [session] = await p.rows("SELECT * FROM sessions")
    assert (session["provider"], session["request_count"]) == ("echo", 2)
    assert [r["session_id"] for r in await p.rows()] == [session["id"]] * 2


async def test_a_request_whose_session_was_evicted_between_attempts_counts_once(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """The first attempt's session is evicted before the retry joins a new one: the
    request still counts once over all sessions."""
    cfg = with_retries(openai_fake, 1)
    cfg["sessions"] = {"max_sessions": 1}
    p = await make_proxy(cfg)
    openai_fake.stall_head = asyncio.Event()
    openai_fake.fail_next = (503, b'{"error": {"message": "try later"}}')
    task = asyncio.create_task(p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO))
    await until(lambda: openai_fake.seen, "the first attempt at the upstream")
    await p.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": "other"}])  # evicts it
    openai_fake.stall_head.set()  # attempt 1 gets the 503, attempt 2 the answer
    await task
    await p.drained()
    sessions = await p.rows("SELECT request_count FROM sessions")
    rows = await p.rows()
    # One-shot requests store no session: what is stored counts exactly the rows it holds.
    assert len(rows) == 2 and sum(s["request_count"] for s in sessions) == sum(r["session_id"] is not None for r in rows)


async def test_a_named_session_does_not_stop_the_fallback(make_proxy: ProxyFactory, unused_tcp_port: int) -> None:
    """`X-Session-Id` names a session of the model's first route; when that route is down,
    the fallback still answers, in a session of its own route, and the named one keeps no
    count of it. Naming it for another model is still a 409."""
    cfg = base_config(f"http://127.0.0.1:{unused_tcp_port}/v1")
    cfg["models"] = [{"name": "echo", "provider": "echo"}, {"name": "gpt-4o", "provider": "up", "fallbacks": ["echo"]}]
    p = await make_proxy(cfg)
    sdk = p.sdk(default_headers={"X-Session-Id": "mine"})
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.parse().choices[0].message.content.endswith(": hello")
    [row] = await p.rows()
    assert row["provider"] == "echo" and row["session_id"] is None  # a one-shot: no session row yet
    assert raw.headers.get("x-session-id") not in (None, "mine")
    counts = {r["id"]: r["request_count"] for r in await p.rows("SELECT id, request_count FROM sessions")}
    assert counts == {"mine": 0}
    with pytest.raises(openai.ConflictError):
        await sdk.chat.completions.create(model="echo", messages=HELLO)
