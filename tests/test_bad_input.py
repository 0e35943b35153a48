"""Every malformed request gets a clear OpenAI-shaped 4xx and a log row; the proxy keeps serving."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import Proxy, ProxyFactory, base_config

MSGS = [{"role": "user", "content": "hi"}]
JSON = {"Content-Type": "application/json"}


def _body(**over: Any) -> bytes:
    return json.dumps({"model": "echo", "messages": MSGS, **over}).encode()


CASES: list[tuple[str, bytes, dict[str, str], int, str | None]] = [
    ("invalid json", b'{"model": ', JSON, 400, None),
    ("invalid utf-8", b'{"model": "echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', JSON, 400, None),
    ("not an object", b"[1, 2]", JSON, 400, None),
    ("empty body", b"", JSON, 400, None),
    ("missing model", json.dumps({"messages": MSGS}).encode(), JSON, 400, "model"),
    ("model not a string", _body(model=3), JSON, 400, "model"),
    ("missing messages", json.dumps({"model": "echo"}).encode(), JSON, 400, "messages"),
    ("empty messages", _body(messages=[]), JSON, 400, "messages"),
    ("messages not a list", _body(messages="hi"), JSON, 400, "messages"),
    ("message not an object", _body(messages=["hi"]), JSON, 400, "messages[0]"),
    ("unknown role", _body(messages=[{"role": "wizard", "content": "x"}]), JSON, 400, "messages[0].role"),
    ("non-string content", _body(messages=[{"role": "user", "content": 5}]), JSON, 400, "messages[0].content"),
    ("stream not a bool", _body(stream="yes"), JSON, 400, "stream"),
    ("negative max_tokens", _body(max_tokens=-1), JSON, 400, "max_tokens"),
    ("absurd n", _body(n=10**9), JSON, 400, "n"),
    ("temperature out of range", _body(temperature=9), JSON, 400, "temperature"),
    ("NUL character", _body(messages=[{"role": "user", "content": "a\u0000b"}]), JSON, 400, None),
    ("unknown model", _body(model="nope"), JSON, 404, "model"),
    ("text/plain", _body(), {"Content-Type": "text/plain"}, 415, None),
    ("form body that is not JSON", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
]


@pytest.mark.parametrize(("name", "body", "headers", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_a_clear_4xx_with_a_log_row(
    make_proxy: ProxyFactory, name: str, body: bytes, headers: dict[str, str], status: int, param: str | None
) -> None:
    """Each bad input gets its status, an OpenAI error body, a log row, and the proxy still serves."""
    p = await make_proxy(base_config())
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", data=body, headers=headers) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["message"] and err["param"] == param
            if name == "invalid utf-8":  # where the bad byte is, not "line 1 column 1"
                assert err["message"].endswith(f"(at byte {body.index(bytes([0xFF]))}).")
        async with s.post(f"{p.url}/v1/chat/completions", data=_body(), headers=JSON) as r:
            assert r.status == 200
    rows = await p.rows()
    assert [(r["status"], r["outcome"]) for r in rows] == [(status, "rejected"), (200, "ok")]
    assert rows[0]["error"] == err["message"]


async def test_unknown_model_error_lists_available(make_proxy: ProxyFactory) -> None:
    """The 404 for an unknown model names the models that are available."""
    p = await make_proxy(base_config())
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", data=_body(model="nope"), headers=JSON) as r:
            assert r.status == 404
            assert "Available models: echo" in (await r.json())["error"]["message"]


async def test_body_over_limit_is_413(make_proxy: ProxyFactory) -> None:
    """A body over `server.max_body_bytes` is refused with 413, and logged."""
    cfg = {**base_config(), "server": {"max_body_bytes": 1000}}
    p = await make_proxy(cfg)
    big = _body(messages=[{"role": "user", "content": "x" * 5000}])
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", data=big, headers=JSON) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "body_too_large"
    [row] = await p.rows()
    assert (row["status"], row["outcome"]) == (413, "rejected")


async def test_too_many_messages_is_400(proxy: Proxy) -> None:
    """A 100k-message history is refused clearly rather than forwarded."""
    msgs = [{"role": "user", "content": "x"}] * 100_000
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/v1/chat/completions", data=_body(messages=msgs), headers=JSON) as r:
            assert r.status == 400
            assert "at most" in (await r.json())["error"]["message"]


async def test_curl_default_content_type_accepted(proxy: Proxy) -> None:
    """`curl -d '{...}'` sends form-urlencoded; a JSON body is still served (the README's example)."""
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{proxy.url}/v1/chat/completions",
            data=_body(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"].endswith(": hi")


async def test_unknown_path_and_method(proxy: Proxy) -> None:
    """Unknown /v1 paths are 404 and wrong methods 405, both OpenAI-shaped and logged."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/v1/engines") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"
        async with s.get(f"{proxy.url}/v1/chat/completions") as r:
            error = (await r.json())["error"]
            assert r.status == 405 and error["code"] == "method_not_allowed" and "takes POST" in error["message"]
        async with s.post(f"{proxy.url}/v1/models/echo") as r:
            assert r.status == 405 and "takes GET" in (await r.json())["error"]["message"]
    rows = await proxy.rows()
    assert [r["outcome"] for r in rows] == ["rejected", "rejected", "rejected"]
