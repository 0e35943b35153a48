"""`X-Session-New` on chat completion responses: true when the request started its session,
false when it continued one; streamed or not, threaded upstream or stateless, on the app and
on a real daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai

from tests.conftest import Proxy, ProxyFactory, base_config
from tests.daemon import Spawn
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake

ROOT = Path(__file__).parent.parent


async def _new(sdk: openai.AsyncOpenAI, model: str, messages: list[dict[str, Any]], stream: bool = False, **kw: Any) -> tuple[str, str]:
    """(X-Session-New, X-Session-Id) of one chat completion."""
    raw = await sdk.chat.completions.with_raw_response.create(model=model, messages=messages, stream=stream, **kw)
    if stream:
        [c async for c in raw.parse()]
    else:
        raw.parse()
    return raw.headers["x-session-new"], raw.headers["x-session-id"]


async def test_a_threaded_conversation_is_new_on_its_first_request_only(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """The first request of a conversation starts its session; its next turns, a regenerate
    and a second conversation with the same opening continue it; another opening is new."""
    sdk = qproxy.sdk()
    opening = [{"role": "user", "content": "hi"}]
    new, sid = await _new(sdk, "qwen3-max", opening, stream=True)
    assert new == "true"
    reply = qwen_fake.turns[-1].reply
    history = opening + [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    assert await _new(sdk, "qwen3-max", history) == ("false", sid)
    assert await _new(sdk, "qwen3-max", opening, stream=True) == ("false", sid)
    new, other = await _new(sdk, "qwen3-max", [{"role": "user", "content": "another opening"}])
    assert (new, other != sid) == ("true", True)


async def test_a_stateless_upstream_tells_it_too(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """Sessions group a stateless upstream's requests as well: new, then continued."""
    p = await make_proxy(base_config(openai_fake.base_url))  # type: ignore[attr-defined]
    sdk = p.sdk()
    opening = [{"role": "user", "content": "hello"}]
    new, sid = await _new(sdk, "gpt-4o", opening)
    assert new == "true"
    history = opening + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    assert await _new(sdk, "gpt-4o", history, stream=True) == ("false", sid)


async def test_a_named_session_is_new_once(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """`X-Session-Id` naming a session that does not exist yet starts it (true); naming it
    again, with any opening, continues it (false)."""
    sdk = qproxy.sdk(default_headers={"X-Session-Id": "run-42"})
    assert await _new(sdk, "qwen3-max", [{"role": "user", "content": "a"}]) == ("true", "run-42")
    assert await _new(sdk, "qwen3-max", [{"role": "user", "content": "b"}], stream=True) == ("false", "run-42")


async def test_the_daemon_tells_clients_a_new_session_from_a_continued_one(spawn: Spawn) -> None:
    """The shipped config's echo model on a real daemon: the first request of a
    conversation says true, the one continuing it false, with the same session id."""
    daemon = await spawn((ROOT / "config.yaml").read_text())
    url = f"{daemon.url}/v1/chat/completions"
    opening = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={"model": "echo", "messages": opening}) as r:
            assert r.status == 200
            first = (r.headers["X-Session-New"], r.headers["X-Session-Id"])
            reply = (await r.json())["choices"][0]["message"]
        history = opening + [reply, {"role": "user", "content": "again"}]
        async with s.post(url, json={"model": "echo", "messages": history, "stream": True}) as r:
            assert r.status == 200
            await r.read()
            second = (r.headers["X-Session-New"], r.headers["X-Session-Id"])
    assert first[0] == "true" and second == ("false", first[1])
