"""Faithful headers: what an upstream tells clients to act on (rate limits, Retry-After, its
request id) reaches them, each header once; hop-by-hop and upstream-private ones never do;
the proxy's own retries wait what Retry-After asks, up to a cap."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from tests.conftest import Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake

HELLO = [{"role": "user", "content": "hello"}]
UPSTREAM_HEADERS = {
    "x-ratelimit-remaining-requests": "41",
    "x-ratelimit-reset-tokens": "6ms",
    "openai-processing-ms": "123",
    "x-request-id": "req_upstream_1",
    "Set-Cookie": "__cf_bm=upstream-private; path=/",
    "Alt-Svc": 'h3=":443"',
}


def with_retries(fake: OpenAIFake, retries: int, **provider: object) -> dict:
    cfg = base_config(fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1].update(retries=retries, **provider)
    return cfg


@pytest.mark.parametrize("stream", [False, True])
async def test_headers_clients_act_on_reach_them(proxy: Proxy, openai_fake: OpenAIFake, stream: bool) -> None:
    """Rate-limit and processing-time headers pass on; the upstream's request id comes as
    `x-upstream-request-id` beside the proxy's own `X-Request-Id`; cookies and alt-svc stay."""
    openai_fake.reply_headers = UPSTREAM_HEADERS
    raw = await proxy.sdk().chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, stream=stream)
    h = raw.headers
    assert (h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-tokens"], h["openai-processing-ms"]) == ("41", "6ms", "123")
    assert h["x-upstream-request-id"] == "req_upstream_1"
    assert h.get_list("x-request-id") != ["req_upstream_1"] and len(h.get_list("x-request-id")) == 1
    assert "set-cookie" not in h and "alt-svc" not in h


async def test_a_stream_has_one_content_type(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """The upstream's `text/event-stream; charset=utf-8` replaces ours: one Content-Type,
    as httpx and Node would otherwise join into one unusable value."""
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-4o", "messages": HELLO, "stream": True}
        async with s.post(f"{proxy.url}/v1/chat/completions", json=body) as r:
            assert r.headers.getall("Content-Type") == ["text/event-stream; charset=utf-8"]
            assert len(r.headers.getall("X-Request-Id")) == 1
            assert "[DONE]" in await r.text()


async def test_retry_after_reaches_the_client(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A 429 the proxy does not retry carries the upstream's Retry-After to the client (the
    SDK waits that long before its own retry)."""
    p = await make_proxy(with_retries(openai_fake, 0))
    openai_fake.reply_headers = {"Retry-After": "2", "x-ratelimit-remaining-requests": "0"}
    openai_fake.fail_next = (429, b'{"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}')
    with pytest.raises(openai.RateLimitError) as e:
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.response.headers["retry-after"] == "2"
    assert e.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    [row] = await p.rows()
    assert (row["status"], row["outcome"]) == (429, "upstream_error")


async def test_the_proxys_retries_wait_what_retry_after_says(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A 429 with `Retry-After: 1` is retried on the same upstream no sooner than 1 s later
    (observed at the upstream), and the client gets the retry's answer."""
    p = await make_proxy(with_retries(openai_fake, 1))
    openai_fake.reply_headers = {"Retry-After": "1"}
    openai_fake.fail_next = (429, b'{"error": {"message": "slow down"}}')
    answer = await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert answer.choices[0].message.content == OpenAIFake.reply_for(HELLO)
    first, second = openai_fake.seen_at
    assert second - first >= 1.0
    [row] = await p.rows()
    assert [a["status"] for a in json.loads(row["attempts"])] == [429, 200]


async def test_retry_after_is_capped(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """An upstream asking for an hour (in `retry-after-ms`, as OpenAI writes it) is waited on
    only up to `retry_after_max_seconds`."""
    p = await make_proxy(with_retries(openai_fake, 1, retry_after_max_seconds=0.3))
    openai_fake.reply_headers = {"retry-after-ms": "3600000"}
    openai_fake.fail_next = (429, b'{"error": {"message": "slow down"}}')
    await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    first, second = openai_fake.seen_at
    assert 0.3 <= second - first < 60
