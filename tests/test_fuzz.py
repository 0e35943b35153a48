"""Bad and random input at the proxy's front door, beyond tests/test_bad_input.py's table.

Property tests throw generated JSON bodies (random objects, random message lists with
random roles and content types, random extra fields and numbers, invalid UTF-8) at
`POST /v1/chat/completions` with the `echo` model: the proxy never answers 5xx from its own
code, every 4xx is an OpenAI error body, and every request leaves its log row. The rest
are malformed requests below the JSON layer: header limits, non-UTF-8 header bytes, odd
paths, absurd nesting and numbers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from provider_router.api.validate import ROLES
from provider_router.sse import SSEParser
from tests.conftest import Proxy, ProxyFactory, base_config

JSON = {"Content-Type": "application/json"}
ERROR_KEYS = {"message", "type", "param", "code"}
MSGS = [{"role": "user", "content": "hi"}]

# -- strategies ------------------------------------------------------------------------------
# Text with everything in it: control characters, NUL, lone surrogates (which JSON can only
# carry escaped, and orjson refuses), and the proxy's own markers.
texts = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from(
    ["", "[DONE]", "data: x\n\n", "\u0000", "\ud800", "'; DROP TABLE requests; --", "api_key", "echo"]
)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 1, 2, 128, 129, 10**9, 0.5, 2.0000001, -0.0, 1e308])
)
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12
)
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio"]) | json_values},
    optional={"text": texts | json_values, "image_url": json_values},
)
contents = texts | st.none() | st.lists(parts, max_size=3) | st.lists(json_values, max_size=3) | json_values
roles = st.sampled_from(sorted(ROLES)) | texts | json_values
messages = st.fixed_dictionaries(
    {"role": roles, "content": contents},
    optional={"name": texts, "tool_calls": json_values, "refusal": json_values, "extra": json_values},
) | json_values
chat_bodies = st.fixed_dictionaries(
    {"model": st.just("echo"), "messages": st.lists(messages, min_size=1, max_size=5)},
    optional={
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
        "n": numbers | json_values,
        "temperature": numbers,
        "top_p": numbers,
        "max_tokens": numbers,
        "max_completion_tokens": numbers,
        "reasoning_effort": json_values,
        "metadata": json_values,
        "tools": json_values,
    },
)
with_extras = st.builds(
    lambda body, extra: {**extra, **body}, chat_bodies, st.dictionaries(texts, json_values, max_size=3)
)
bodies = with_extras | st.fixed_dictionaries({"model": json_values | texts, "messages": json_values}) | json_values

# Bodies that pass validation, however odd: any text but NUL (refused by design), any part
# kinds, numbers inside each field's range, and random extra fields of any shape.
safe_texts = st.text(max_size=30).filter(lambda t: "\u0000" not in t)
safe_json = st.recursive(
    st.none() | st.booleans() | numbers | safe_texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(safe_texts, inner, max_size=4),
    max_leaves=12,
)
VALIDATED = {"model", "messages", "stream", "stream_options", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens"}
valid_parts = st.builds(lambda extra, kind: {**extra, "type": kind}, st.dictionaries(safe_texts, safe_json, max_size=3), safe_texts)
valid_messages = st.builds(
    lambda extra, role, content: {**extra, "role": role, "content": content},
    st.dictionaries(safe_texts.filter(lambda k: k not in ("role", "content")), safe_json, max_size=2),
    st.sampled_from(sorted(ROLES)),
    safe_texts | st.lists(valid_parts, max_size=3),
) | st.fixed_dictionaries({"role": st.sampled_from(["assistant", "tool", "function"]), "content": st.none()})
valid_chats = st.builds(
    lambda extra, body: {**extra, **body},
    st.dictionaries(safe_texts.filter(lambda k: k not in VALIDATED), safe_json, max_size=4),
    st.fixed_dictionaries(
        {"model": st.just("echo"), "messages": st.lists(valid_messages, min_size=1, max_size=6)},
        optional={
            "stream": st.booleans(),
            "stream_options": st.dictionaries(safe_texts, safe_json, max_size=2),
            "n": st.integers(1, 128),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0, 1),
            "max_tokens": st.integers(1, 10_000_000),
            "max_completion_tokens": st.integers(1, 10_000_000),
        },
    ),
)


def encode(obj: Any, ascii_only: bool) -> bytes:
    """JSON bytes; without `ascii_only`, lone surrogates become invalid UTF-8 on the wire."""
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def echo_proxy(make_proxy: ProxyFactory) -> Proxy:
    """One proxy shared by every example of a property test (it must keep serving anyway)."""
    return await make_proxy(base_config())


async def post_and_check(p: Proxy, data: bytes, headers: dict[str, str] | None = None) -> int:
    """POST `data`; check the answer's shape and its log row; return the status."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", data=data, headers=headers or JSON) as r:
            status = r.status
            raw = await r.read()
            rid = r.headers["X-Request-Id"]
            ctype = r.headers.get("Content-Type", "")
    assert status < 500, (status, raw[:300])
    if status >= 400:
        err = json.loads(raw)["error"]
        assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"]
    elif ctype.startswith("text/event-stream"):
        events = [e.data for e in SSEParser().feed(raw)]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    else:
        assert json.loads(raw)["object"] == "chat.completion"
    rows = await p.rows("SELECT status, outcome FROM requests WHERE id = ?", rid)
    assert [(r["status"], r["outcome"]) for r in rows] == [(status, "ok" if status == 200 else "rejected")]
    return status


@FUZZ
@given(body=bodies, ascii_only=st.booleans())
async def test_random_bodies_never_5xx_and_always_logged(echo_proxy: Proxy, body: Any, ascii_only: bool) -> None:
    """Any JSON value as the body (mostly chat-shaped, with random roles, content types,
    extra fields and numbers): a 200 or an OpenAI-shaped 4xx, and exactly one log row."""
    event(f"status {await post_and_check(echo_proxy, encode(body, ascii_only))}")


@FUZZ
@given(body=valid_chats, ascii_only=st.booleans())
async def test_valid_chats_with_random_extras_are_answered(echo_proxy: Proxy, body: dict[str, Any], ascii_only: bool) -> None:
    """A chat that is valid, however odd its roles, content parts, numbers and extra fields,
    is answered 200 (a whole stream or a chat.completion) and logged `ok`."""
    assert await post_and_check(echo_proxy, encode(body, ascii_only)) == 200


@FUZZ
@given(body=with_extras)
async def test_invalid_chats_name_the_field(echo_proxy: Proxy, body: dict[str, Any]) -> None:
    """A chat-shaped body is answered 200 or refused with a 400 that names the offending
    field (`param`), unless the fault is in the JSON text itself (NUL, bad escapes)."""
    data = encode(body, True)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{echo_proxy.url}/v1/chat/completions", data=data, headers=JSON) as r:
            status, payload = r.status, await r.read()
    assert status in (200, 400), (status, payload[:300])
    event(f"status {status}")
    if status == 400:
        err = json.loads(payload)["error"]
        assert err["param"] is not None or err["code"] in ("invalid_text", "invalid_json"), err


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
async def test_random_bytes_are_a_clean_4xx(echo_proxy: Proxy, data: bytes) -> None:
    """Arbitrary bytes as a JSON body: never a 5xx, always an OpenAI error body and a row."""
    assert await post_and_check(echo_proxy, data) in (400, 404)


# -- below the JSON layer --------------------------------------------------------------------
async def raw_request(p: Proxy, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no well-behaved client library would; return (status, body)."""
    host, port = p.server.host, p.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def chat_head(*headers: bytes, path: bytes = b"/v1/chat/completions") -> bytes:
    return b"\r\n".join([b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json", *headers])


BODY = json.dumps({"model": "echo", "messages": MSGS}).encode()


async def test_http_layer_refusals_are_4xx_and_proxy_keeps_serving(echo_proxy: Proxy) -> None:
    """A header line over the parser's limit, too many headers, or raw non-ASCII bytes in the
    request line are refused with a 4xx by the HTTP layer (before any handler runs, so no
    log row); the next request is served normally."""
    for headers in ({"X-Big": "a" * 20_000}, {f"X-H{i}": "v" for i in range(300)}):
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{echo_proxy.url}/v1/chat/completions", data=BODY, headers={**JSON, **headers}) as r:
                assert 400 <= r.status < 500
    status, _ = await raw_request(echo_proxy, chat_head(path=b"/v1/\xff\xfe"), BODY)
    assert 400 <= status < 500
    assert await post_and_check(echo_proxy, BODY) == 200
    assert len(await echo_proxy.rows()) == 1


async def test_non_utf8_header_bytes_are_a_clean_answer(make_proxy: ProxyFactory) -> None:
    """Header values with bytes that are not UTF-8 (User-Agent, X-Session-Id, Authorization
    with client keys on) get a 4xx OpenAI error, never a 5xx, and the request is logged."""
    cfg = base_config()
    cfg["auth"] = {"client_keys": [{"name": "alice", "key": "alice-key-0123"}]}
    p = await make_proxy(cfg)
    cases = [
        b"User-Agent: caf\xe9 \xff\xfe",
        b"X-Session-Id: s\xffx",
        b"Authorization: Bearer \xff\xfealice-key-0123",
    ]
    for header in cases:
        extra = [header] if header.startswith(b"Authorization") else [header, b"Authorization: Bearer alice-key-0123"]
        status, body = await raw_request(p, chat_head(*extra), BODY)
        assert 400 <= status < 500, (header, status, body)
        assert set(json.loads(body)["error"]) == ERROR_KEYS
    rows = await p.rows()
    assert len(rows) == len(cases)
    assert all(400 <= r["status"] < 500 and r["outcome"] == "rejected" for r in rows)
    # A UTF-8 User-Agent with non-ASCII text is fine, and stored as sent.
    status, _ = await raw_request(p, chat_head("User-Agent: café ✓".encode(), b"Authorization: Bearer alice-key-0123"), BODY)
    assert status == 200
    assert (await p.rows())[-1]["user_agent"] == "café ✓"


@pytest.mark.parametrize(
    "path",
    [b"/v1/%ff%fe", b"/v1/chat/completions%00", b"/v1/..%2f..%2fetc/passwd", b"/v1/" + b"a" * 4000],
)
async def test_odd_paths_are_404_and_logged(echo_proxy: Proxy, path: bytes) -> None:
    """Percent-escapes of invalid UTF-8, raw high bytes, NUL and traversal in the path are a
    plain OpenAI-shaped 404 with a log row."""
    status, body = await raw_request(echo_proxy, chat_head(path=path), BODY)
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "unknown_url"
    [row] = await echo_proxy.rows()
    assert (row["status"], row["outcome"]) == (404, "rejected")


@pytest.mark.parametrize(
    ("name", "data", "param"),
    [
        ("nesting deeper than the parser allows", b'{"model": "echo", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),
        ("float overflow", b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "n": 1e400}', None),
        ("n beyond 64 bits", b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "n": 18446744073709551616}', "n"),
        ("max_tokens beyond 64 bits", b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999999999999999999}', "max_tokens"),
        ("NaN", b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None),
        ("raw NUL byte in a string", b'{"model": "echo", "messages": [{"role": "user", "content": "a\x00b"}]}', None),
        ("lone surrogate escape", b'{"model": "echo", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
        ("duplicate keys, last one bad", b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "n": 1, "n": 0}', "n"),
        ("BOM before the JSON", b"\xef\xbb\xbf" + BODY, None),
    ],
)
async def test_json_edge_cases_are_400(echo_proxy: Proxy, name: str, data: bytes, param: str | None) -> None:
    """JSON the parser must refuse, or numbers no field accepts: a 400 naming the field when
    there is one, and a log row."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{echo_proxy.url}/v1/chat/completions", data=data, headers=JSON) as r:
            assert r.status == 400, name
            err = (await r.json())["error"]
    assert err["param"] == param
    [row] = await echo_proxy.rows()
    assert (row["status"], row["outcome"]) == (400, "rejected")


async def test_content_parts_with_non_string_text_are_answered(echo_proxy: Proxy) -> None:
    """Content parts whose `text` is not a string (a number, an object, missing) are valid
    parts of an unknown kind: the echo model answers from the string parts only."""
    content = [{"type": "text", "text": 5}, {"type": "text", "text": {"a": 1}}, {"type": "text"}, {"type": "text", "text": "ok"}]
    data = json.dumps({"model": "echo", "messages": [{"role": "user", "content": content}]}).encode()
    assert await post_and_check(echo_proxy, data) == 200
    data = json.dumps({"model": "echo", "messages": [{"role": "user", "content": content}], "stream": True}).encode()
    assert await post_and_check(echo_proxy, data) == 200
