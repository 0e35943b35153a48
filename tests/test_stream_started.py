"""Once a stream's head went out, a failure ends that stream with an error event: never a
second response in the same body, never the turn started over in a new upstream chat."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from provider_router.sse import SSEParser
from tests.conftest import Proxy
from tests.fakes.qwen import QwenFake
from tests.test_threads import Conversation


async def _raw_post(url: str, body: dict[str, object]) -> bytes:
    """The exact bytes the client gets, up to the server closing the connection."""
    data = json.dumps(body).encode()
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(data) + data
    )
    async with asyncio.timeout(30):  # a guard only: the response must end on its own
        got = await reader.read()
    writer.close()
    return got


def _dechunk(body: bytes) -> bytes:
    """A chunked HTTP body's data; it must end with the last (empty) chunk."""
    out, pos = b"", 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += body[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


async def test_a_chat_gone_mid_stream_ends_that_stream_with_an_error(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    conv = Conversation(qproxy.sdk())
    await conv.say("first")
    chats = qwen_fake.created_chats
    qwen_fake.error_mid_stream_next("NotFound")  # the reply starts, then the chat is "gone"
    got = await _raw_post(qproxy.url, {"model": "qwen3-max", "stream": True, "messages": conv.history + [{"role": "user", "content": "second"}]})
    assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 200")
    events = [e.data for e in SSEParser().feed(_dechunk(got.split(b"\r\n\r\n", 1)[1]))]
    assert any('"error"' in e and "upstream_error" in e for e in events), events
    assert sum('"role":"assistant"' in e for e in events) == 1
    assert "[DONE]" not in events
    assert qwen_fake.created_chats == chats  # nothing was resent in a new chat
    await qproxy.drained()
    row = (await qproxy.rows())[-1]
    assert (row["status"], row["outcome"]) == (200, "upstream_error")
    # The failed turn did not advance the thread: the next turn continues from the first.
    await conv.say("second, again")
    assert qwen_fake.created_chats == chats


async def test_concurrent_first_requests_naming_one_new_session_count_in_it(qproxy: Proxy) -> None:
    async def one(i: int) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"{qproxy.url}/v1/chat/completions", headers={"X-Session-Id": "race-1"},
                json={"model": "qwen3-max", "messages": [{"role": "user", "content": f"q{i}"}]},
            ) as r:  # fmt: skip
                assert r.status == 200

    await asyncio.gather(*(one(i) for i in range(5)))
    await qproxy.drained()
    assert await qproxy.rows("SELECT id, request_count FROM sessions") == [{"id": "race-1", "request_count": 5}]
    assert qproxy.state.sessions.active["race-1"].request_count == 5
