"""Secrets, steering and tenancy, proved against real things.

- Canary secrets (provider key, qwen token, client key, admin key) never reach the database
  files, the daemon's log output or any response, whatever path a request takes: the real
  daemon runs as a subprocess against fake upstreams served here on loopback.
- Fields and headers a client could use to steer the upstream never reach it.
- SQL: hostile text in every stored field reads back exactly and every table survives.
- Sessions never cross client keys, even when a client replays another's history or names
  another's session.
- The daemon starts on a non-loopback address with `--insecure-no-auth`.

`Daemon` and the `spawn` fixture are shared with tests/test_crash.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import structlog
import yaml
from hypothesis import given
from hypothesis import strategies as st

from provider_router.api.validate import STEERING
from provider_router.logsetup import setup_logging
from provider_router.store import Redactor
from tests.conftest import Proxy, ProxyFactory, qwen_config
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake
from tests.daemon import WAIT, Spawn, wait_rows
from tests.test_threads import Conversation, last_turn_ok

HELLO = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


async def serve_fake(aiohttp_server: Any, app: Any) -> str:
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


# -- canaries --------------------------------------------------------------------------------
def canary(kind: str) -> str:
    return f"{kind}-canary-{secrets.token_hex(12)}"


def leaks(data: bytes, canaries: dict[str, str]) -> list[str]:
    """Which canaries occur in `data`, whole or by their random core's first 16 characters
    (a leak cut short by truncation still counts)."""
    found = []
    for name, value in canaries.items():
        core = value.rsplit("-", 1)[1][:16]
        if value.encode() in data or core.encode() in data:
            found.append(name)
    return found


async def test_canary_secrets_never_leak_on_any_path(aiohttp_server: Any, spawn: Spawn, tmp_path: Path) -> None:
    """Every path a request can take (answers stream and not, 4xx refusals, an upstream 4xx
    and 5xx whose body echoes the headers it got, a retried 5xx, a first-byte timeout, a
    client leaving mid-stream, qwen errors before and during the stream echoing its token,
    the admin API) leaves none of the canary secrets in the db/-wal/-shm files, the daemon's
    log output, or any response the clients got; and the upstream never sees the client key."""
    c = {k: canary(k) for k in ("provider_key", "qwen_token", "client_key", "admin_key")}
    up = OpenAIFake(key=c["provider_key"])
    qw = QwenFake(token=c["qwen_token"])
    up_url, qw_url = await serve_fake(aiohttp_server, up.app), await serve_fake(aiohttp_server, qw.app)
    config = yaml.safe_dump(
        {
            "auth": {"client_keys": [{"name": "alice", "key": "${ALICE_KEY}"}], "admin_key": "${ADMIN_KEY}"},
            "providers": [
                {"name": "echo", "type": "echo"},
                {"name": "up", "type": "openai", "base_url": f"{up_url}/v1", "api_key": "${UP_KEY}"},
                {"name": "retrying", "type": "openai", "base_url": f"{up_url}/v1", "api_key": "${UP_KEY}", "retries": 1},
                {"name": "slow", "type": "openai", "base_url": f"{up_url}/v1", "api_key": "${UP_KEY}", "timeouts": {"first_byte": 0.3}},
                {"name": "qwen", "type": "qwen", "base_url": qw_url, "token": "${QWEN_TOKEN}"},
            ],
            "models": [
                {"name": "echo", "provider": "echo"},
                {"name": "gpt-*", "provider": "up"},
                {"name": "retry-*", "provider": "retrying", "upstream_model": "gpt-4o"},
                {"name": "slow-*", "provider": "slow", "upstream_model": "gpt-4o"},
                {"name": "qwen*", "provider": "qwen"},
            ],
        }
    )
    env = {"ALICE_KEY": c["client_key"], "ADMIN_KEY": c["admin_key"], "UP_KEY": c["provider_key"], "QWEN_TOKEN": c["qwen_token"]}
    d = await spawn(config, env=env)
    assert not leaks(config.encode(), c)  # the config names variables; the values live in the env

    responses: list[bytes] = []
    v1 = 0
    auth = {"Authorization": f"Bearer {c['client_key']}"}
    async with aiohttp.ClientSession() as s:

        async def call(body: Any, *, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
            nonlocal v1
            v1 += 1
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with s.post(f"{d.url}{path}", data=data, headers={"Content-Type": "application/json", **(auth if headers is None else headers)}) as r:
                raw = await r.read()
                responses.append(raw + repr(dict(r.headers)).encode())
                return r.status, raw

        chat = {"model": "gpt-4o", "messages": HELLO}
        # answers, plain and streamed, pass-through and translated
        assert (await call(chat))[0] == 200
        status, raw = await call({**chat, "stream": True})
        assert status == 200 and raw.rstrip().endswith(b"[DONE]")
        assert (await call({"model": "echo", "messages": HELLO}))[0] == 200
        q1 = {"model": "qwen3-max", "messages": HELLO}
        status, raw = await call(q1)
        assert status == 200
        q2 = {"model": "qwen3-max", "messages": HELLO + [json.loads(raw)["choices"][0]["message"], {"role": "user", "content": "more"}], "stream": True}
        assert (await call(q2))[0] == 200
        # refusals
        assert (await call(b"{not json"))[0] == 400
        assert (await call(chat, headers={"Authorization": "Bearer wrong"}))[0] == 401
        assert (await call(chat, headers={}))[0] == 401
        # an upstream 4xx / 5xx whose body echoes the headers it received (our key among them)
        up.echo_headers_next = 400
        status, raw = await call(chat)
        assert status == 400 and b"[REDACTED]" in raw  # it did echo; the proxy redacted it
        up.echo_headers_next = 401
        assert (await call({**chat, "stream": True}))[0] == 401
        up.echo_headers_next = 500
        assert (await call(chat))[0] == 500
        up.echo_headers_next = 503  # retried: the failed attempt is in the record's `attempts`
        assert (await call({**chat, "model": "retry-x"}))[0] == 200
        # an upstream that never sends its head
        up.stall_head = asyncio.Event()
        assert (await call({**chat, "model": "slow-x"}))[0] == 504
        up.stall_head.set()
        up.stall_head = None
        # a client leaving mid-stream
        up.hold_after_first, up.hold_after, up.disconnected = asyncio.Event(), 2, asyncio.Event()
        v1 += 1
        async with s.post(f"{d.url}/v1/chat/completions", json={**chat, "stream": True}, headers=auth) as r:
            responses.append(await r.content.readuntil(b"\n\n"))
            r.close()
        await asyncio.wait_for(up.disconnected.wait(), WAIT)
        up.hold_after_first = None
        # qwen errors whose details echo the token, before and during the stream
        qw.fail_next("Unauthorized", echo_auth=True)
        assert (await call(q1))[0] == 401
        qw.fail_next("Bad_Request", echo_auth=True)
        assert (await call({**q1, "stream": True}))[0] == 502
        qw.error_mid_stream_next("Bad_Request", echo_auth=True)
        status, raw = await call({**q1, "stream": True})
        assert status == 200 and b'"error"' in raw and b"[DONE]" not in raw
        qw.error_mid_stream_next("Bad_Request", echo_auth=True)
        assert (await call(q1))[0] == 502
        # the operator surface, with the admin key and without
        admin = {"Authorization": f"Bearer {c['admin_key']}"}
        await wait_rows(d.db, v1)  # so the admin API reads back every row
        for path in ("/admin/requests?limit=500", "/admin/stats", "/admin/sessions", "/metrics", "/health"):
            for headers in (admin, {"Authorization": "Bearer nope"}):
                async with s.get(f"{d.url}{path}", headers=headers) as r:
                    responses.append(await r.read() + repr(dict(r.headers)).encode())
        async with s.get(f"{d.url}/admin/requests?limit=500", headers=admin) as r:
            assert r.status == 200 and len((await r.json())["data"]) == v1

    # The upstreams saw their own credentials only, never the client's key.
    assert {h.headers["Authorization"] for h in up.seen} == {f"Bearer {c['provider_key']}"}
    assert not leaks(repr([(h.headers, h.raw) for h in up.seen]).encode(), {"client_key": c["client_key"]})
    assert not leaks(repr(qw.headers).encode() + json.dumps(qw.requests).encode(), {"client_key": c["client_key"]})

    assert await wait_rows(d.db, v1) == v1
    files = {p.name: p.read_bytes() for p in d.db.parent.glob(d.db.name + "*")}
    assert {d.db.name, d.db.name + "-wal", d.db.name + "-shm"} <= set(files)
    for name, data in files.items():
        assert not leaks(data, c), f"{name} (running) leaks {leaks(data, c)}"
    for i, body in enumerate(responses):
        assert not leaks(body, c), f"response {i} leaks {leaks(body, c)}: {body[:400]!r}"
    assert await d.stop() == 0
    for p in d.db.parent.glob(d.db.name + "*"):
        assert not leaks(p.read_bytes(), c), f"{p.name} (stopped) leaks {leaks(p.read_bytes(), c)}"
    log = d.log.read_bytes()
    assert not leaks(log, c), f"daemon log leaks {leaks(log, c)}"
    # The scans were not vacuous: every request was logged, and the echoes were stored redacted.
    assert sum(1 for line in d.lines() if line.get("event") == "request") == v1
    db = sqlite3.connect(d.db)
    stored = db.execute("SELECT count(*) FROM requests WHERE error LIKE '%[REDACTED]%' OR attempts LIKE '%[REDACTED]%'").fetchone()[0]
    assert stored >= 6
    outcomes = {r[0] for r in db.execute("SELECT outcome FROM requests")}
    assert {"ok", "rejected", "upstream_error", "timeout", "client_disconnected"} <= outcomes


_alphabet = st.sampled_from("abk-é\n")


@given(st.lists(st.text(_alphabet, min_size=1, max_size=4), max_size=3), st.lists(st.text(_alphabet, max_size=6), max_size=5))
def test_redaction_replaces_every_secret_as_one_regex_pass_would(keys: list[str], pieces: list[str]) -> None:
    """Secrets overlapping, nested in each other, or absent: the text comes out as one
    longest-first regex pass over it would leave it, as str and as UTF-8 bytes."""
    import re

    text = "".join(p + (keys[i % len(keys)] if keys and i % 2 else "") for i, p in enumerate(pieces))
    ordered = sorted(set(keys), key=len, reverse=True)
    expected = re.sub("|".join(map(re.escape, ordered)), "[REDACTED]", text) if ordered else text
    r = Redactor(keys)
    assert r(text) == expected
    assert r.bytes(text.encode()) == expected.encode()


def test_exception_tracebacks_in_the_log_are_redacted() -> None:
    """An exception logged with its traceback (message and frame locals) passes the redactor
    like every other field of the line."""
    out = io.TextIOWrapper(io.BytesIO())
    secret = canary("provider_key")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("info", json=True, stream=out, redact=Redactor([secret]))
    try:
        headers = {"Authorization": f"Bearer {secret}"}  # a local the traceback shows
        raise ValueError(f"upstream said {secret} to {len(headers)} header")
    except ValueError:
        structlog.get_logger("test").exception("boom")
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level  # setup_logging may have configured stdlib logging
    data = out.buffer.getvalue()  # type: ignore[attr-defined]
    assert b"boom" in data
    assert not leaks(data, {"key": secret})


# -- steering ----------------------------------------------------------------------------------
def keys_anywhere(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys_anywhere(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys_anywhere(v)}
    return set()


def steer(depth: int) -> dict[str, Any]:
    """Every steering field, nested `depth` levels down."""
    node: dict[str, Any] = {k: f"http://evil.example/{k}" for k in STEERING}
    node["headers"] = {"Authorization": "Bearer evil"}
    for i in range(depth):
        node = {"level": i, "inner": [node, {k: "x" for k in STEERING}]}
    return node


@pytest.mark.parametrize("stream", [False, True])
async def test_steering_fields_never_reach_the_upstream(proxy: Proxy, openai_fake: OpenAIFake, stream: bool) -> None:
    """`api_base`, `base_url`, `api_key`, `extra_headers`, `headers` at the top level, inside
    messages, content parts and deep nesting are dropped before the upstream call;
    everything else arrives unchanged, tool schemas included (a tool may well have a
    parameter called `headers`; no upstream reads steering from a schema)."""
    messages = [
        {"role": "system", "content": "s", **steer(0)},
        {"role": "user", "content": [{"type": "text", "text": "api_key", **steer(1)}], "api_base": "http://evil"},
    ]
    body = {
        "model": "gpt-4o",
        "messages": messages,
        "stream": stream,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": steer(3)}}],
        "metadata": steer(6),
        **steer(0),
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.read()
    sent = openai_fake.seen[-1]
    assert sent.body["tools"] == body["tools"]
    assert not keys_anywhere({**sent.body, "tools": None}) & STEERING
    assert b"evil" not in sent.raw.replace(orjson.dumps(body["tools"]), b"")
    assert sent.headers["Authorization"] == "Bearer sk-upstream-test"
    assert sent.body["messages"][1]["content"][0]["text"] == "api_key"  # values are not keys


async def test_steering_fields_never_reach_the_threaded_upstream(qproxy: Proxy, qwen_fake: QwenFake) -> None:
    """The qwen provider builds its own request; client steering fields and their values
    appear nowhere in it, and its Authorization is the configured token."""
    body = {"model": "qwen3-max", "messages": [{"role": "user", "content": "hi", **steer(2)}], **steer(1)}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{qproxy.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
    assert qwen_fake.requests and not any(keys_anywhere(q) & STEERING for q in qwen_fake.requests)
    assert "evil" not in json.dumps(qwen_fake.requests)
    assert {h["Authorization"] for h in qwen_fake.headers} == {"Bearer qwen-token-test"}


HOSTILE_HEADERS = {
    "Cookie": "session=client-cookie-canary",
    "Connection": "keep-alive, X-Hop-Canary",
    "X-Hop-Canary": "hop",
    "X-Forwarded-For": "203.0.113.66",
    "X-Real-IP": "203.0.113.66",
    "Forwarded": "for=203.0.113.66",
    "Proxy-Authorization": "Basic client-proxy-canary",
    "OpenAI-Organization": "org-client-canary",
}


async def test_client_headers_never_reach_the_upstream(
    make_proxy: ProxyFactory, openai_fake: OpenAIFake, qwen_fake: QwenFake
) -> None:
    """The client's Authorization (its client key), Cookie, Connection (and the hop-by-hop
    header it names), X-Forwarded-For and friends reach neither upstream: each gets only the
    headers its provider config defines."""
    cfg = qwen_config(qwen_fake.base_url)  # type: ignore[attr-defined]
    cfg["providers"].append({"name": "up", "type": "openai", "base_url": openai_fake.base_url, "api_key": "sk-upstream-test"})  # type: ignore[attr-defined]
    cfg["models"].append({"name": "gpt-*", "provider": "up"})
    cfg["auth"] = {"client_keys": [{"name": "alice", "key": "client-key-canary-0123"}]}
    p = await make_proxy(cfg)
    headers = {**HOSTILE_HEADERS, "Authorization": "Bearer client-key-canary-0123"}
    async with aiohttp.ClientSession() as s:
        for model in ("gpt-4o", "qwen3-max"):
            for stream in (False, True):
                async with s.post(
                    f"{p.url}/v1/chat/completions", json={"model": model, "messages": HELLO, "stream": stream}, headers=headers
                ) as r:
                    assert r.status == 200
                    await r.read()
    seen = [h.headers for h in openai_fake.seen] + qwen_fake.headers
    assert len(openai_fake.seen) == 2 and len(qwen_fake.requests) == 2
    for h in seen:
        lower = {k.lower(): v for k, v in h.items()}
        assert lower["authorization"] in ("Bearer sk-upstream-test", "Bearer qwen-token-test")
        assert not {"cookie", "x-hop-canary", "x-forwarded-for", "x-real-ip", "forwarded", "proxy-authorization", "openai-organization"} & set(lower)
        assert "canary" not in json.dumps(h).lower() and "203.0.113.66" not in json.dumps(h)


# -- SQL -------------------------------------------------------------------------------------
HOSTILE = [
    "'; DROP TABLE requests; --",
    "\"; DROP TABLE sessions; --",
    "100% _done_ \\ ' \" ` ;",
    "line1\r\nline2\rline3\n",
    "Robert'); DELETE FROM turns WHERE ('1'='1",
    "%' OR '1'='1",
    "NULL",
    "тест ✓ 🙂 \u202e",
]


async def test_hostile_text_is_stored_exactly_and_tables_survive(proxy: Proxy, openai_fake: OpenAIFake) -> None:
    """Quotes, `%`, `_`, CR/LF, backslashes and SQL fragments in the model name, message
    contents, User-Agent and X-Session-Id read back exactly from the rows; every table is
    still there afterwards. A NUL (`\\u0000`) is refused with 400 by design, and logged."""
    async with aiohttp.ClientSession() as s:
        for i, text in enumerate(HOSTILE):
            model = f"gpt-{text}"  # routed by the `gpt-*` glob, so it reaches the upstream too
            ua = text.replace("\r", " ").replace("\n", " ")  # HTTP forbids CR/LF in header values
            sid = f"s{i}_--x:y.z"  # every character X-Session-Id allows besides letters and digits
            body = {"model": model, "messages": [{"role": "system", "content": text}, {"role": "user", "content": text}]}
            headers = {"User-Agent": ua, "X-Session-Id": sid}
            async with s.post(f"{proxy.url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["model"] == model
            async with s.post(f"{proxy.url}/v1/chat/completions", json={**body, "model": f"nope-{text}"}) as r:
                assert r.status == 404
        async with s.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "gpt-x", "messages": [{"role": "user", "content": "a\u0000'b"}]}
        ) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_text"
        async with s.post(f"{proxy.url}/v1/chat/completions", json={"model": "echo", "messages": HELLO}, headers={"X-Session-Id": "x'; DROP TABLE sessions; --"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "X-Session-Id"
    rows = await proxy.rows()
    assert len(rows) == 2 * len(HOSTILE) + 2
    for i, text in enumerate(HOSTILE):
        ok, missing = rows[2 * i], rows[2 * i + 1]
        assert (ok["model"], ok["prompt_text"], ok["status"]) == (f"gpt-{text}", text, 200)
        assert ok["user_agent"] == text.replace("\r", " ").replace("\n", " ").strip()  # HTTP trims values
        assert ok["session_id"] == f"s{i}_--x:y.z"
        assert (await proxy.record(ok["id"]))["request"]["messages"][0]["content"] == text
        assert ok["response_text"] == OpenAIFake.reply_for([{"role": "system", "content": text}, {"role": "user", "content": text}])
        assert (missing["model"], missing["status"], missing["outcome"]) == (f"nope-{text}", 404, "rejected")
    assert (rows[-2]["status"], rows[-1]["status"]) == (400, 400)
    sessions = await proxy.rows("SELECT id FROM sessions ORDER BY created_at")
    assert [r["id"] for r in sessions] == [f"s{i}_--x:y.z" for i in range(len(HOSTILE))]
    tables = {r["name"] for r in await proxy.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"requests", "messages", "sessions", "turns", "_migrations", "messages_fts"} <= tables
    hits = await proxy.rows("SELECT count(*) AS n FROM messages_fts WHERE messages_fts MATCH ?", '"DROP" "TABLE"')
    assert hits[0]["n"] >= 2


# -- tenancy -----------------------------------------------------------------------------------
async def test_sessions_never_cross_client_keys_adversarially(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """Bob replaying Alice's exact history gets a new upstream chat of his own (never Alice's
    chat or parent); Bob naming Alice's session in `X-Session-Id` is a 404 that reaches no
    upstream; and Alice's thread continues from her own last reply afterwards."""
    cfg = qwen_config(qwen_fake.base_url)  # type: ignore[attr-defined]
    cfg["auth"] = {"client_keys": [{"name": "alice", "key": "alice-key-0123"}, {"name": "bob", "key": "bob-key-4567"}]}
    p = await make_proxy(cfg)
    alice = Conversation(p.sdk("alice-key-0123"), system="you are alice's assistant")
    await alice.say("my secret is 42")
    await alice.say("remember it")
    alice_chat, alice_tip = qwen_fake.turns[-1].chat_id, qwen_fake.turns[-1].response_id
    bob_sdk = p.sdk("bob-key-4567")

    replay = alice.history + [{"role": "user", "content": "what is my secret?"}]
    raw = await bob_sdk.chat.completions.with_raw_response.create(model="qwen3-max", messages=replay)
    bob_turn = qwen_fake.turns[-1]
    assert bob_turn.chat_id != alice_chat and bob_turn.parent_id is None
    assert qwen_fake.created_chats == 2
    last_turn_ok(qwen_fake, replay)  # Bob's chat carries the history he sent, as his own
    assert raw.headers["x-session-id"] != alice.session_id

    before = len(qwen_fake.turns)
    for messages in (replay, [{"role": "user", "content": "hello"}]):
        with pytest.raises(openai.NotFoundError):
            await bob_sdk.chat.completions.create(
                model="qwen3-max", messages=messages, extra_headers={"X-Session-Id": alice.session_id or ""}
            )
        with pytest.raises(openai.NotFoundError):
            await bob_sdk.chat.completions.create(
                model="qwen3-max", messages=messages, stream=True, extra_headers={"X-Session-Id": alice.session_id or ""}
            )
    assert len(qwen_fake.turns) == before and qwen_fake.created_chats == 2

    await alice.say("and now?")
    assert (qwen_fake.turns[-1].chat_id, qwen_fake.turns[-1].parent_id) == (alice_chat, alice_tip)
    assert alice.session_id == (await p.rows())[0]["session_id"]
    last_turn_ok(qwen_fake, alice.history[:-1])
    clients = {(r["session_id"], r["client"]) for r in await p.rows() if r["session_id"]}
    assert len({sid for sid, _ in clients}) == len(clients)  # no session has two clients


# -- exposure ------------------------------------------------------------------------------------
async def test_insecure_no_auth_starts_on_a_non_loopback_address(spawn: Spawn) -> None:
    """`--host 0.0.0.0 --insecure-no-auth` starts (the refusal without the flag is in
    tests/test_daemon.py) and answers; reached here over loopback only."""
    config = yaml.safe_dump({"providers": [{"name": "echo", "type": "echo"}], "models": [{"name": "echo", "provider": "echo"}]})
    d = await spawn(config, "--host", "0.0.0.0", "--insecure-no-auth")
    line = await d.wait_log("listening")
    assert line["url"].startswith("http://0.0.0.0:")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{d.url}/v1/models") as r:
            assert r.status == 200
            assert [m["id"] for m in (await r.json())["data"]] == ["echo"]
    assert await d.stop() == 0


async def test_http_parse_errors_quote_nothing_in_the_answer_or_the_log(spawn: Spawn) -> None:
    """A request whose over-long Authorization header carries a client key is refused by the
    HTTP parser (400): neither the answer (aiohttp's own text repeats the line) nor the
    daemon's log contains the key, and the log has one warning line, no traceback."""
    key = canary("client_key")
    config = yaml.safe_dump(
        {
            "auth": {"client_keys": [{"name": "alice", "key": "${ALICE_KEY}"}]},
            "providers": [{"name": "echo", "type": "echo"}],
            "models": [{"name": "echo", "provider": "echo"}],
        }
    )
    d = await spawn(config, env={"ALICE_KEY": key})
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() + b"a" * 9000 + b"\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(WAIT):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400") and b"is too long" in answer
    assert not leaks(answer, {"client_key": key}) and key[:8].encode() not in answer
    assert await d.stop() == 0
    lines = [x for x in d.lines() if x.get("event") == "bad_http_request"]
    assert [(x["level"], x["error"]) for x in lines] == [("warning", "LineTooLong")]
    assert b"Traceback" not in d.log.read_bytes() and b"Error handling request" not in d.log.read_bytes()
    assert not leaks(d.log.read_bytes(), {"client_key": key})
