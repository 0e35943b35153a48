"""The OpenAI endpoints besides chat, through the official SDK against the strict fake:
`/v1/responses`, `/v1/embeddings`, `/v1/completions`, stream and not, routed by `model`
with renames, retries and fallbacks as for chat, one row each; chat-only models and
unknown paths answer with what is supported."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from click.testing import CliRunner

from provider_router.cli import cli as root

from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, base_config
from tests.fakes.openai import OpenAIFake

COLUMNS = "SELECT path, model, provider, status, outcome, stream FROM requests ORDER BY rowid"


def config(fake: OpenAIFake, **provider: Any) -> dict[str, Any]:
    cfg = base_config(fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"][1].update(provider)
    cfg["models"].append({"name": "text-embedding-*", "provider": "up"})
    return cfg


@pytest.fixture
async def p(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> Proxy:
    return await make_proxy(config(openai_fake))


async def test_responses(p: Proxy, openai_fake: OpenAIFake) -> None:
    """`responses.create` gets the upstream's response object as it sent it."""
    r = await p.sdk().responses.create(model="gpt-4o", input="hello", instructions="be brief")
    assert r.output_text == "upstream answered: hello" and r.usage is not None and r.usage.output_tokens == 3
    assert openai_fake.seen[0].body == {"model": "gpt-4o", "input": "hello", "instructions": "be brief"}
    assert await p.rows(COLUMNS) == [{"path": "/v1/responses", "model": "gpt-4o", "provider": "up", "status": 200, "outcome": "ok", "stream": 0}]


async def test_responses_stream(p: Proxy) -> None:
    """A streamed response arrives as the upstream's typed events, ending with `response.completed`."""
    events = [e async for e in await p.sdk().responses.create(model="gpt-4o", input="hello there", stream=True)]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "upstream answered: hello there"
    [row] = await p.rows(COLUMNS)
    assert (row["path"], row["status"], row["outcome"], row["stream"]) == ("/v1/responses", 200, "ok", 1)


@pytest.mark.parametrize("fmt", ["base64", "float"])
async def test_embeddings(p: Proxy, openai_fake: OpenAIFake, fmt: str) -> None:
    """Vectors arrive as the SDK asked for them (it asks base64 unless told otherwise)."""
    kw: dict[str, Any] = {} if fmt == "base64" else {"encoding_format": "float"}
    e = await p.sdk().embeddings.create(model="text-embedding-3-small", input=["a", "bb"], **kw)
    assert [d.embedding for d in e.data] == [[1.0, 0.0, 0.5, -0.25], [2.0, 1.0, 0.5, -0.25]]
    assert e.usage.prompt_tokens == 2 and openai_fake.seen[0].body["encoding_format"] == fmt
    assert await p.rows(COLUMNS) == [
        {"path": "/v1/embeddings", "model": "text-embedding-3-small", "provider": "up", "status": 200, "outcome": "ok", "stream": 0}
    ]


async def test_completions(p: Proxy) -> None:
    """Legacy completions, whole."""
    c = await p.sdk().completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    assert c.choices[0].text == "upstream answered: say hi"
    [row] = await p.rows(COLUMNS)
    assert (row["path"], row["status"], row["outcome"], row["stream"]) == ("/v1/completions", 200, "ok", 0)


async def test_completions_stream(p: Proxy) -> None:
    """Legacy completions, streamed, with the usage chunk when asked for."""
    chunks = [c async for c in await p.sdk().completions.create(
        model="gpt-3.5-turbo-instruct", prompt="say hi", stream=True, stream_options={"include_usage": True}
    )]  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "upstream answered: say hi"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    [row] = await p.rows(COLUMNS)
    assert (row["path"], row["status"], row["outcome"], row["stream"]) == ("/v1/completions", 200, "ok", 1)


async def test_a_renamed_model_and_steering_fields(p: Proxy, openai_fake: OpenAIFake) -> None:
    """`upstream_model` renames, and fields that could redirect the key are dropped, as for chat."""
    await p.sdk().responses.create(model="llama-local", input="hi", extra_body={"api_base": "http://evil.example"})
    assert openai_fake.seen[0].body == {"model": "llama3.2", "input": "hi"}
    [row] = await p.rows(COLUMNS)
    assert (row["model"], row["provider"]) == ("llama-local", "up")


async def test_retries_and_fallbacks(make_proxy: ProxyFactory, openai_fake: OpenAIFake, unused_tcp_port: int) -> None:
    """A 503 is retried on the same upstream; a model whose upstream is down, or whose
    provider serves chat only, falls back to one that serves the endpoint."""
    cfg = config(openai_fake, retries=1)
    cfg["providers"].append({"name": "dead", "type": "openai", "base_url": f"http://127.0.0.1:{unused_tcp_port}/v1"})
    cfg["models"] += [
        {"name": "gpt-4o", "provider": "up"},
        {"name": "primary", "provider": "dead", "fallbacks": ["gpt-4o"]},
        {"name": "echo-first", "provider": "echo", "fallbacks": ["gpt-4o"]},
    ]
    proxy = await make_proxy(cfg)
    openai_fake.fail_next = (503, b'{"error": {"message": "overloaded"}}')
    e = await proxy.sdk().embeddings.create(model="text-embedding-3-small", input="a")
    assert len(e.data) == 1 and len(openai_fake.seen) == 2
    assert (await proxy.sdk().completions.create(model="primary", prompt="x")).choices[0].text == "upstream answered: x"
    assert (await proxy.sdk().responses.create(model="echo-first", input="y")).output_text == "upstream answered: y"
    rows = await proxy.rows(COLUMNS)
    assert [(r["model"], r["provider"], r["status"]) for r in rows] == [
        ("text-embedding-3-small", "up", 200), ("primary", "up", 200), ("echo-first", "up", 200),
    ]


async def test_upstream_errors_pass_through(p: Proxy, openai_fake: OpenAIFake) -> None:
    """The upstream's own 4xx (its strict checks) reaches the client with its body."""
    with pytest.raises(openai.BadRequestError) as e:
        await p.sdk().embeddings.create(model="text-embedding-3-small", input="a", encoding_format="int8")  # type: ignore[arg-type]
    assert "encoding_format" in e.value.message
    [row] = await p.rows(COLUMNS)
    assert (row["status"], row["outcome"]) == (400, "upstream_error")


@pytest.mark.parametrize("status", [400, 503])
async def test_an_upstream_error_that_echoes_the_key_is_redacted(p: Proxy, openai_fake: OpenAIFake, status: int) -> None:
    """An upstream error body that repeats the provider's key reaches neither the client nor
    the log with it, on these endpoints as on chat."""
    openai_fake.echo_headers_next = status
    with pytest.raises(openai.APIStatusError) as e:
        await p.sdk().responses.create(model="gpt-4o", input="hi")
    assert e.value.status_code == status
    text = e.value.response.text
    assert UPSTREAM_KEY not in text and "[REDACTED]" in text
    await p.drained()
    assert UPSTREAM_KEY.encode() not in p.db_path.read_bytes() + Path(f"{p.db_path}-wal").read_bytes()


@pytest.mark.parametrize("call", ["responses", "embeddings", "completions"])
async def test_a_chat_only_model_says_what_it_serves(p: Proxy, call: str) -> None:
    """echo translates chat only: other endpoints are a 400 naming the ones it serves."""
    sdk = p.sdk()
    with pytest.raises(openai.BadRequestError) as e:
        if call == "responses":
            await sdk.responses.create(model="echo", input="hi")
        elif call == "embeddings":
            await sdk.embeddings.create(model="echo", input="hi")
        else:
            await sdk.completions.create(model="echo", prompt="hi")
    assert e.value.code == "unsupported_endpoint" and "POST /v1/chat/completions" in e.value.message
    [row] = await p.rows(COLUMNS)
    assert (row["model"], row["provider"], row["status"], row["outcome"]) == ("echo", "echo", 400, "rejected")


async def test_an_unknown_path_lists_the_endpoints(p: Proxy) -> None:
    """A 404 for any other path names every supported endpoint."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/images/generations", json={"model": "gpt-4o"}) as r:
            assert r.status == 404
            message = (await r.json())["error"]["message"]
    for endpoint in ("POST /v1/responses", "POST /v1/embeddings", "POST /v1/completions", "GET /v1/models/{model}", "GET /v1/sessions/{id}"):
        assert endpoint in message


@pytest.mark.parametrize("stream", [False, True])
async def test_the_log_reads_responses_and_completions_as_it_reads_chat(p: Proxy, stream: bool) -> None:
    """A Responses answer and a legacy completion, streamed or not: the record keeps the
    request as sent, the final response (text, usage, status), and the row its tokens."""
    sdk = p.sdk()
    if stream:
        events = [e async for e in await sdk.responses.create(model="gpt-4o", input="hello log", stream=True)]
        usage = events[-1].response.usage
        [c async for c in await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="log me", stream=True, stream_options={"include_usage": True})]
    else:
        usage = (await sdk.responses.create(model="gpt-4o", input="hello log")).usage
        await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="log me")
    responses, completions = await p.rows()
    # The `request_log` view, which sqlite3 users read, has their texts as it has chat's.
    assert (responses["prompt_text"], responses["response_text"]) == ("hello log", "upstream answered: hello log")
    assert (completions["prompt_text"], completions["response_text"]) == ("log me", "upstream answered: log me")
    record = await p.record(responses["id"])
    assert record["request"]["input"] == "hello log" and record["response"]["status"] == "completed"
    assert record["response_text"] == "upstream answered: hello log"
    assert (responses["prompt_tokens"], responses["completion_tokens"], responses["finish_reason"]) == (usage.input_tokens, usage.output_tokens, "completed")
    record = await p.record(completions["id"])
    assert record["response_text"] == "upstream answered: log me" and completions["completion_tokens"] == len("upstream answered: log me".split())


async def cli(*args: str) -> str:
    """`provider-router ARGS...` as a user runs it (in a thread: it runs its own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, root, list(args))
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def test_the_log_finds_and_shows_every_endpoint_as_it_does_chat(p: Proxy) -> None:
    """`logs -q` finds a Responses request and a legacy completion by prompt or reply, as it
    finds chat; `logs` lists their texts (an embeddings call, with none, its endpoint); `logs show` prints them as transcripts (a
    Responses request's instructions, tool call and its result included); an embeddings row
    has its usage."""
    sdk = p.sdk()
    await sdk.responses.create(model="gpt-4o", instructions="be brief", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "find the zephyr file"}]},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"name": "zephyr"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "found in /tmp"},
        {"type": "message", "role": "user", "content": "what next"},
    ])  # fmt: skip
    await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="quokka facts")
    await sdk.embeddings.create(model="text-embedding-3-small", input=["a", "bb"])
    responses, completion, embeddings = await p.rows()
    db = str(p.db_path)

    async def found(*query: str) -> list[str]:
        return [json.loads(line)["id"] for line in (await cli("logs", "--db", db, "-n", "0", "--json", *query)).splitlines()]

    # As for chat, search reads the prompt (the last user message) and the reply.
    assert await found("-q", "what next") == [responses["id"]]
    assert await found("-q", "quokka") == [completion["id"]]
    assert await found("-q", "upstream answered") == [responses["id"], completion["id"]]
    listed = await cli("logs", "--db", db, "-n", "0")
    assert "what next" in listed and "quokka facts" in listed and "upstream answered: quokka facts" in listed
    [embeddings_line] = [line for line in listed.splitlines() if "POST /v1/embeddings" in line]  # no prompt: what it asked
    assert " 2 " in embeddings_line and "/?" not in embeddings_line  # its input tokens; it has no output side
    shown = await cli("logs", "--db", db, "show", responses["id"])
    for line in ("system: be brief", "user: find the zephyr file", '-> lookup({"name": "zephyr"}) [call_1]',
                 "tool [call_1]: found in /tmp", "user: what next", "assistant: upstream answered: what next", "finish: completed"):
        assert line in shown, line
    shown = await cli("logs", "--db", db, "show", completion["id"])
    assert "user: quokka facts" in shown and "assistant: upstream answered: quokka facts" in shown
    assert (embeddings["prompt_tokens"], embeddings["total_tokens"], embeddings["completion_tokens"]) == (2, 2, None)
    assert "usage             prompt 2, completion -, total 2" in await cli("logs", "--db", db, "show", embeddings["id"])
    record = await p.record(completion["id"])  # the answer as it came, not as the log reads it
    assert "message" not in record["response"]["choices"][0]
