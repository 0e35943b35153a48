"""Valid but unusual requests, and upstream errors that echo a key: what reaches the
upstream, the client and the log."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import QWEN_TOKEN, UPSTREAM_KEY, Proxy, ProxyFactory, qwen_config
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake
from tests.test_retries import with_retries

JSON = {"Content-Type": "application/json"}
HI = [{"role": "user", "content": "hi"}]


async def post(p: Proxy, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", data=body, headers=JSON) as r:
            return r.status, await r.read()


async def test_text_about_the_nul_escape_is_not_a_nul(proxy: Proxy) -> None:
    text = r"What does \u0000 mean in a JSON string?"  # six characters, no NUL
    status, data = await post(proxy, json.dumps({"model": "echo", "messages": [{"role": "user", "content": text}]}).encode())
    assert status == 200, data
    status, _ = await post(proxy, json.dumps({"model": "echo", "messages": [{"role": "user", "content": "a\x00b"}]}).encode())
    assert status == 400  # a real NUL is still refused


async def test_steering_keys_written_with_json_escapes_are_dropped(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "api\\u005fbase": "http://evil.example", "api\\u005fkey": "sk-attacker"}'
    status, data = await post(proxy, body)
    assert status == 200, data
    assert not {"api_base", "api_key"} & set(openai_fake.seen[-1].body)


async def test_a_tool_parameter_named_like_a_steering_field_reaches_the_upstream(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    tool = {"type": "function", "function": {"name": "http_get", "parameters": {
        "type": "object", "properties": {"url": {"type": "string"}, "headers": {"type": "object"}}, "required": ["url", "headers"]}}}  # fmt: skip
    status, data = await post(proxy, json.dumps({"model": "gpt-4o", "messages": HI, "tools": [tool], "headers": {"x": 1}}).encode())
    assert status == 200, data
    sent = openai_fake.seen[-1].body
    assert "headers" in sent["tools"][0]["function"]["parameters"]["properties"] and "headers" not in sent


async def test_a_deep_body_with_a_steering_key_is_not_a_server_error(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    deep = b'{"a":' * 990 + b'"x"' + b"}" * 990
    status, data = await post(proxy, b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "api_key": "x", "metadata": ' + deep + b"}")
    assert status < 500, (status, data)


async def test_an_error_echoing_the_token_is_redacted_before_it_is_cut(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """The upstream's error quotes the token so that a cut at 500 characters would have
    left all but its last character."""
    p = await make_proxy(qwen_config(qwen_fake.base_url))
    prefix = " (request had Authorization: Bearer "
    qwen_fake.fail_next("Bad_Request", details="x" * (500 - len(prefix) - (len(QWEN_TOKEN) - 1)), echo_auth=True)
    status, body = await post(p, json.dumps({"model": "qwen3-max", "messages": HI}).encode())
    assert status >= 400 and b"[REDACTED]" in body and QWEN_TOKEN[:-1].encode() not in body
    await p.drained()
    assert QWEN_TOKEN[:-1] not in (await p.rows())[-1]["error"]


async def test_a_retried_error_echoing_the_key_is_redacted_before_it_is_cut(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    p = await make_proxy(with_retries(openai_fake, 1))
    openai_fake.fail_next = (500, b"x" * 490 + UPSTREAM_KEY.encode() + b" was the key")
    status, _ = await post(p, json.dumps({"model": "gpt-4o", "messages": HI}).encode())
    assert status == 200  # the retry answered
    await p.drained()
    attempts: list[dict[str, Any]] = json.loads((await p.rows())[-1]["attempts"])
    assert "[REDACTED]" in attempts[0]["error"] and UPSTREAM_KEY[:6] not in attempts[0]["error"]
