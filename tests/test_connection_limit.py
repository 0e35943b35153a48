"""A provider's `max_connections`: calls beyond it wait for a slot, the wait shows on
`/metrics` (calls waiting now, and a histogram of the time waited), and a call's slot is
freed when its client leaves."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from tests.conftest import Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake
from tests import waiting

HELLO = [{"role": "user", "content": "hello"}]


async def metric(p: Proxy, name: str) -> float:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{p.url}/metrics") as r:
            text = await r.text()
    m = re.search(rf'^{re.escape(name)}{{provider="up"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def until(p: Proxy, name: str, value: float) -> None:
    async def reached() -> bool:
        return await metric(p, name) == value

    await waiting.until(reached, f"{name} at {value}")


async def test_calls_beyond_the_limit_wait_and_the_wait_is_measured(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """With `max_connections: 1`, a second request waits while a stream holds the slot and
    gets through once it ends; /metrics counts both calls and the time the second waited."""
    cfg = base_config(openai_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1]["max_connections"] = 1
    cfg["auth"] = {"metrics_public": True}
    p = await make_proxy(cfg)
    openai_fake.hold_after_first = hold = asyncio.Event()
    sdk = p.sdk()
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    second = asyncio.create_task(sdk.chat.completions.create(model="gpt-4o", messages=HELLO))
    await until(p, "provider_router_upstream_waiting", 1)
    assert await metric(p, "provider_router_upstream_slots_in_use") == 1 and len(openai_fake.seen) == 1
    hold.set()
    assert [c async for c in stream]
    assert (await second).choices[0].message.content == OpenAIFake.reply_for(HELLO)
    assert await metric(p, "provider_router_upstream_queue_ms_count") == 2
    assert await metric(p, "provider_router_upstream_queue_ms_sum") > 0
    await until(p, "provider_router_upstream_slots_in_use", 0)


async def test_a_client_that_leaves_frees_its_slot(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A stream whose client disconnects gives its slot back: the next call is not held up."""
    cfg = base_config(openai_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1]["max_connections"] = 1
    cfg["auth"] = {"metrics_public": True}
    p = await make_proxy(cfg)
    openai_fake.hold_after_first = asyncio.Event()  # never set: the stream would hold forever
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-4o", "messages": HELLO, "stream": True}
        async with s.post(f"{p.url}/v1/chat/completions", json=body) as r:
            await r.content.readline()
    await asyncio.wait_for(openai_fake.disconnected.wait(), 10)
    await until(p, "provider_router_upstream_slots_in_use", 0)
    openai_fake.hold_after_first = None
    answer = await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert answer.choices[0].message.content == OpenAIFake.reply_for(HELLO)
