"""The OpenAI surface end to end: the official SDK -> the proxy -> a strict fake upstream,
with the answers and the log rows both checked.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import openai
import pytest
import structlog
import structlog.testing

from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake

HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


async def test_non_stream_answer_and_log_row(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """A plain request returns the upstream's answer and leaves one complete log row."""
    raw = await proxy.sdk().chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    answer = raw.parse()
    assert answer.choices[0].message.content == OpenAIFake.reply_for(HELLO)
    assert answer.usage is not None and answer.usage.total_tokens > 0
    [row] = await proxy.rows()
    assert row["id"] == raw.headers["x-request-id"]
    assert (row["method"], row["path"], row["model"], row["provider"], row["upstream_model"]) == (
        "POST", "/v1/chat/completions", "gpt-4o", "up", "gpt-4o",
    )
    assert (row["stream"], row["status"], row["outcome"], row["error"]) == (0, 200, "ok", None)
    logged = await proxy.record(row["id"])
    assert logged["request"]["messages"] == HELLO
    assert logged["response"]["id"] == answer.id
    assert logged["response"] == answer.model_dump(mode="json", exclude_unset=True)
    assert row["response_text"] == answer.choices[0].message.content
    assert row["prompt_text"] == "hello there"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens,
    )
    assert row["finish_reason"] == "stop"
    assert row["reply_id"] == answer.id
    assert row["ttfb_ms"] > 0 and row["duration_ms"] >= row["ttfb_ms"]
    assert row["received_at"] <= row["finished_at"]


async def test_stream_forwarded_and_assembled_in_log(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """A stream reaches the SDK chunk by chunk; the log row holds the assembled text and usage."""
    stream = await proxy.sdk().chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    text, usage, chunks = [], None, 0
    async for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text) == OpenAIFake.reply_for(HELLO)
    assert usage is not None
    [row] = await proxy.rows()
    assert (row["stream"], row["status"], row["outcome"]) == (1, 200, "ok")
    assert row["response_text"] == "".join(text)
    assert row["finish_reason"] == "stop"
    assert row["total_tokens"] == usage.total_tokens
    assert row["chunk_count"] == chunks


async def test_stream_is_forwarded_incrementally(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """The upstream holds its second chunk until the client has the first: it must still arrive."""
    openai_fake.hold_after_first = asyncio.Event()
    stream = await proxy.sdk().chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    got: list[str] = []
    async with asyncio.timeout(10):  # a proxy that buffers would deadlock here
        async for chunk in stream:
            if not got:
                assert openai_fake.chunks_sent == 1
                openai_fake.hold_after_first.set()
            got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(got) == OpenAIFake.reply_for(HELLO)


async def test_upstream_model_rename_and_keys(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """`upstream_model` renames the model; the provider's key goes upstream, the client's never."""
    await proxy.sdk(api_key="client-secret-xyz").chat.completions.create(model="llama-big", messages=HELLO)
    seen = openai_fake.seen[-1]
    assert seen.body["model"] == "llama3.2"
    assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "client-secret-xyz" not in json.dumps(seen.headers)
    [row] = await proxy.rows()
    assert (row["model"], row["upstream_model"]) == ("llama-big", "llama3.2")


async def test_unchanged_body_forwarded_byte_for_byte(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """When nothing needs rewriting, the upstream receives the client's exact bytes."""
    body = b'{"model": "gpt-4o",  "messages": [{"role": "user", "content": "x"}], "seed": 7}'
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
    assert openai_fake.seen[-1].raw == body


async def test_steering_fields_are_dropped(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """Fields that could redirect the upstream call (`api_base`, `api_key`, ...) never travel."""
    await proxy.sdk().chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        extra_body={"api_base": "http://evil", "metadata": {"headers": {"x": "y"}, "ok": 1}, "api_key": "k"},
    )
    sent = openai_fake.seen[-1].body
    assert "api_base" not in sent and "api_key" not in sent
    assert sent["metadata"] == {"ok": 1}


async def test_echo_provider_stream_and_not(make_proxy: ProxyFactory) -> None:
    """The built-in echo answers deterministically from the conversation, with usage."""
    p = await make_proxy(base_config())
    a = await p.sdk().chat.completions.create(model="echo", messages=HELLO)
    b = await p.sdk().chat.completions.create(model="echo", messages=HELLO)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content.endswith(": hello there")
    assert a.usage is not None and a.usage.completion_tokens > 0
    stream = await p.sdk().chat.completions.create(
        model="echo", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(parts) == a.choices[0].message.content
    assert usage is not None and usage.total_tokens == a.usage.total_tokens
    rows = await p.rows()
    assert [r["provider"] for r in rows] == ["echo"] * 3
    assert rows[2]["response_text"] == a.choices[0].message.content
    assert rows[2]["chunk_count"] >= 2


async def test_stream_without_include_usage_sends_no_usage_chunk(make_proxy: ProxyFactory) -> None:
    """`stream_options.include_usage` is honoured: without it no usage chunk is sent."""
    p = await make_proxy(base_config())
    stream = await p.sdk().chat.completions.create(model="echo", messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.usage is None for chunk in chunks)


async def test_models_list(proxy: Proxy) -> None:
    """`GET /v1/models` lists exact model names, and for each glob route the upstream's ids
    that match it (never the glob itself), in OpenAI's list shape."""
    models = await proxy.sdk().models.list()
    assert [m.id for m in models.data] == ["echo", "llama3.2", "llama3.1:8b", "gpt-4o", "gpt-4o-mini"]
    assert all(m.object == "model" for m in models.data)


async def test_models_with_disabled_provider_hidden(make_proxy: ProxyFactory) -> None:
    """A remote provider with no key is switched off: its models are not listed, and a
    request for one gets a 404 that says why."""
    cfg = base_config()
    cfg["providers"].append({"name": "openai", "type": "openai", "base_url": "https://api.openai.com/v1", "api_key": "${OPENAI_API_KEY:-}"})
    cfg["models"].append({"name": "gpt-*", "provider": "openai"})
    p = await make_proxy(cfg, env={})
    assert [m.id for m in (await p.sdk().models.list()).data] == ["echo"]
    with pytest.raises(openai.NotFoundError) as e:
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert "switched off" in e.value.message and "echo" in e.value.message


async def test_client_keys(make_proxy: ProxyFactory) -> None:
    """With client keys configured, no/wrong key is 401; the log names the key, never stores it."""
    cfg = base_config()
    cfg["auth"] = {"client_keys": [{"name": "alice", "key": "${ALICE_KEY}"}]}
    p = await make_proxy(cfg, env={"ALICE_KEY": "alice-canary-0123456789"})
    with pytest.raises(openai.AuthenticationError):
        await p.sdk().chat.completions.create(model="echo", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        await p.sdk(api_key="wrong").chat.completions.create(model="echo", messages=HELLO)
    ok = await p.sdk(api_key="alice-canary-0123456789").chat.completions.create(model="echo", messages=HELLO)
    assert ok.choices[0].message.content
    rows = await p.rows()
    assert [(r["status"], r["client"], r["outcome"]) for r in rows] == [
        (401, None, "rejected"), (401, None, "rejected"), (200, "alice", "ok"),
    ]
    for path in p.db_path.parent.glob(p.db_path.name + "*"):
        assert b"alice-canary-0123456789" not in path.read_bytes()


async def test_upstream_error_passed_through(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """An upstream 4xx/5xx comes back with its status and body, logged as upstream_error."""
    body = b'{"error": {"message": "slow down", "type": "rate_limit_error", "param": null, "code": "rate"}}'
    openai_fake.fail_next = (429, body)
    with pytest.raises(openai.RateLimitError) as e:
        await proxy.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.body["message"] == "slow down"  # type: ignore[index]
    [row] = await proxy.rows()
    assert (row["status"], row["outcome"]) == (429, "upstream_error")
    assert "slow down" in row["error"]


async def test_upstream_bad_key_error_body_passed_through(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """The upstream's 401 is the client's 401, and the provider key is not in the body or log."""
    cfg = base_config(openai_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1]["api_key"] = "sk-wrong-canary-123"
    p = await make_proxy(cfg)
    with pytest.raises(openai.AuthenticationError) as e:
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert "sk-wrong-canary-123" not in str(e.value.body)
    [row] = await p.rows()
    assert (row["status"], row["outcome"]) == (401, "upstream_error")


async def test_upstream_unreachable_is_502(make_proxy: ProxyFactory, unused_tcp_port: int) -> None:
    """A connection refused upstream is a 502 in OpenAI's error shape, logged."""
    p = await make_proxy(base_config(f"http://127.0.0.1:{unused_tcp_port}/v1"))
    with pytest.raises(openai.APIStatusError) as e:
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.status_code == 502
    assert e.value.body["type"] == "upstream_error"  # type: ignore[index]
    [row] = await p.rows()
    assert (row["status"], row["outcome"]) == (502, "upstream_error")


async def test_unresolvable_upstream_names_provider_and_host(make_proxy: ProxyFactory) -> None:
    """A provider whose host does not resolve gives the client a 502 naming the provider and
    the host (not a bare `gaierror`), and never its key."""
    p = await make_proxy(base_config("http://no-such-upstream.invalid/v1"))
    with pytest.raises(openai.APIStatusError) as e:
        await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
    message = e.value.body["message"]  # type: ignore[index]
    assert e.value.status_code == 502 and "'up'" in message and "no-such-upstream.invalid" in message
    assert "does not resolve" in message and UPSTREAM_KEY not in message


async def test_upstream_first_byte_timeout_is_504(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """An upstream that never answers within `timeouts.first_byte` gives 504, outcome timeout."""
    cfg = base_config(openai_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1]["timeouts"] = {"first_byte": 0.2}
    p = await make_proxy(cfg)
    openai_fake.stall_head = asyncio.Event()
    try:
        with pytest.raises(openai.APIStatusError) as e:
            await p.sdk().chat.completions.create(model="gpt-4o", messages=HELLO)
        assert e.value.status_code == 504
    finally:
        openai_fake.stall_head.set()
    [row] = await p.rows()
    assert (row["status"], row["outcome"]) == (504, "timeout")


async def test_stream_cut_upstream_ends_with_error_event_not_done(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """An upstream that dies mid-stream yields an SSE error event and no `[DONE]`."""
    openai_fake.cut_after = 3
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO, "stream": True}
        ) as r:
            assert r.status == 200
            text = (await r.read()).decode()
    assert "[DONE]" not in text
    last = [line for line in text.split("\n\n") if line.strip()][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "upstream_stream_error"
    [row] = await proxy.rows()
    assert (row["status"], row["outcome"]) == (200, "upstream_error")


async def test_request_id_on_every_response(proxy: Proxy) -> None:
    """Every response, errors and streams included, carries X-Request-Id."""
    async with aiohttp.ClientSession() as s:
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", b"{"),
            ("GET", "/v1/nope", None),
            ("POST", "/v1/chat/completions", json.dumps({"model": "echo", "messages": HELLO, "stream": True}).encode()),
        ]:
            async with s.request(method, f"{proxy.url}{path}", data=body) as r:
                await r.read()
                assert len(r.headers["X-Request-Id"]) == 28


async def test_a_quieter_log_level_still_stores_every_request(make_proxy: ProxyFactory) -> None:
    """With the level above info there is no per-request line, but every request's row is stored."""
    from provider_router.middleware import log as request_log

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        assert not request_log.is_enabled_for(logging.INFO)
        p = await make_proxy(base_config())
        with structlog.testing.capture_logs() as logs:
            for i in range(3):
                await p.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": f"m{i}"}])
        rows = await p.rows()
    finally:
        structlog.reset_defaults()
    assert len(rows) == 3 and all(r["status"] == 200 for r in rows)
    assert not [e for e in logs if e["event"] == "request"]
