"""The dashboard over HTTP, on a proxy filled through the official SDK: it exists only with
an admin key, pages need a login or the bearer key, every value is escaped under a strict
CSP, nothing changes state on GET, the list pages by keyset and follows new rows live, and
its stream ends when the daemon stops.
"""

from __future__ import annotations

import asyncio
import re
import signal
from html.parser import HTMLParser
from typing import Any

import aiohttp
import yaml

from provider_router.store import series
from provider_router.store import tree_view as tv
from provider_router.ui.conversation import lanes
from tests.conftest import Proxy, ProxyFactory, base_config, qwen_config
from tests.daemon import Spawn
from tests.fakes.openai import OpenAIFake
from tests.fakes.qwen import QwenFake

ADMIN = "ui-admin-key-canary-77"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
EVIL = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"> & "quotes"'
TOOL_HISTORY = [
    {"role": "system", "content": "You may call tools."},
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "The user wants the weather: call the tool.", "tool_calls": [
        {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_w1", "content": "sunny, 21C"},
]  # fmt: skip


def ui_config(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = cfg or base_config()
    cfg["auth"] = {"admin_key": ADMIN}
    return cfg


def session(**kw: Any) -> aiohttp.ClientSession:
    # `unsafe`: keep cookies set by an IP address (the proxy listens on 127.0.0.1).
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), **kw)


async def fetch(p: Proxy, path: str, *, headers: dict[str, str] | None = AUTH, method: str = "GET", **kw: Any) -> tuple[int, Any, str]:
    async with session() as s:
        async with s.request(method, f"{p.url}{path}", headers=headers or {}, allow_redirects=False, **kw) as r:
            return r.status, r.headers, await r.text()


async def ask(p: Proxy, content: str, history: list[dict[str, Any]] | None = None) -> str:
    """One chat request through the SDK; its request id."""
    raw = await p.sdk().chat.completions.with_raw_response.create(model="echo", messages=[*(history or []), {"role": "user", "content": content}])
    return str(raw.headers["x-request-id"])


async def converse(p: Proxy, opening: str, then: str) -> tuple[str, str]:
    """Two turns of one conversation (a one-shot request stores no session; its second turn
    does): the second request's id and the session's."""
    sdk = p.sdk()
    first = [{"role": "user", "content": opening}]
    reply = (await sdk.chat.completions.create(model="echo", messages=first)).choices[0].message.content
    rid = await ask(p, then, history=[*first, {"role": "assistant", "content": reply}])
    return rid, (await p.record(rid))["session_id"]


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def tags(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


async def test_without_an_admin_key_the_dashboard_does_not_exist(make_proxy: ProxyFactory) -> None:
    """No `auth.admin_key`: every /ui path answers exactly as a path that does not exist."""
    p = await make_proxy(base_config())
    unknown = await fetch(p, "/no-such-page", headers=None)
    for method, path in (("GET", "/ui/"), ("GET", "/ui/login"), ("POST", "/ui/login"), ("GET", "/ui/static/ui.js"), ("GET", "/ui/events")):
        status, _, body = await fetch(p, path, headers=None, method=method)
        assert (status, body) == (unknown[0], unknown[2]) and status == 404


async def test_pages_send_a_browser_to_the_login_form(make_proxy: ProxyFactory) -> None:
    """Without a login a page redirects to the form (and back after); the event stream and
    the raw JSON answer 401 or redirect, never data; a wrong bearer key is no login."""
    p = await make_proxy(ui_config())
    rid = await ask(p, "hello")
    status, headers, _ = await fetch(p, "/ui/?model=echo", headers=None)
    assert status == 303 and headers["Location"] == "/ui/login?next=%2Fui%2F%3Fmodel%3Decho"
    for path in ("/ui/stats", f"/ui/requests/{rid}", f"/ui/requests/{rid}/json", "/ui/sessions"):
        status, _, body = await fetch(p, path, headers={"Authorization": "Bearer wrong"})
        assert status == 303 and "hello" not in body
    status, _, body = await fetch(p, "/ui/events", headers=None)
    assert status == 401 and "invalid_admin_key" in body


async def test_login_sets_a_strict_httponly_cookie_that_is_not_the_key(make_proxy: ProxyFactory) -> None:
    """The right key typed into the form sets an HttpOnly, SameSite=Strict cookie scoped to
    /ui holding a random token (never the key), which then opens the pages; a wrong key
    gets the form again with a 401 and no cookie."""
    p = await make_proxy(ui_config())
    async with session() as s:
        async with s.post(f"{p.url}/ui/login", data={"key": "nope", "next": "/ui/stats"}, allow_redirects=False) as r:
            assert r.status == 401 and "Set-Cookie" not in r.headers
        async with s.post(f"{p.url}/ui/login", data={"key": ADMIN, "next": "/ui/stats"}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/ui/stats"
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie and ADMIN not in cookie
        async with s.get(f"{p.url}/ui/stats", allow_redirects=False) as r:
            assert r.status == 200 and "<svg" in await r.text()


async def test_guessing_the_key_is_slowed_down(make_proxy: ProxyFactory) -> None:
    """After ten wrong keys in a minute from one address the form answers 429 with a
    Retry-After, even to the right key (a guesser learns nothing), while the bearer key
    still opens every page."""
    p = await make_proxy(ui_config())
    async with session() as s:
        for _ in range(10):
            async with s.post(f"{p.url}/ui/login", data={"key": "nope"}, allow_redirects=False) as r:
                assert r.status == 401
        for key in ("nope", ADMIN):
            async with s.post(f"{p.url}/ui/login", data={"key": key}, allow_redirects=False) as r:
                assert r.status == 429 and "Set-Cookie" not in r.headers
                assert 0 < int(r.headers["Retry-After"]) <= 60 and "try again" in await r.text()
    status, _, _ = await fetch(p, "/ui/")
    assert status == 200


async def test_login_goes_back_only_to_a_dashboard_page(make_proxy: ProxyFactory) -> None:
    """`next` pointing at another site (or a protocol-relative URL) lands on /ui/ instead."""
    p = await make_proxy(ui_config())
    for target in ("https://evil.example/", "//evil.example/ui", "/ui//evil.example", "/admin/stats"):
        status, headers, _ = await fetch(p, "/ui/login", headers=None, method="POST", data={"key": ADMIN, "next": target})
        assert status == 303 and headers["Location"] == "/ui/"


async def test_nothing_changes_state_on_get_and_cross_site_posts_are_refused(make_proxy: ProxyFactory) -> None:
    """Logging out is a POST (a GET is 405 and leaves the login valid); a POST from another
    site's page (its Origin) neither logs in nor out; a key in a GET's query logs nobody in."""
    p = await make_proxy(ui_config())
    async with session() as s:
        async with s.get(f"{p.url}/ui/login", params={"key": ADMIN}, allow_redirects=False) as r:
            assert r.status == 200 and "Set-Cookie" not in r.headers
        evil = {"Origin": "https://evil.example"}
        async with s.post(f"{p.url}/ui/login", data={"key": ADMIN}, headers=evil, allow_redirects=False) as r:
            assert r.status == 403 and "Set-Cookie" not in r.headers
        async with s.post(f"{p.url}/ui/login", data={"key": ADMIN}, headers={"Origin": p.url}, allow_redirects=False) as r:
            assert r.status == 303
        async with s.get(f"{p.url}/ui/logout", allow_redirects=False) as r:
            assert r.status == 405
        async with s.post(f"{p.url}/ui/logout", headers=evil, allow_redirects=False) as r:
            assert r.status == 403
        async with s.get(f"{p.url}/ui/", allow_redirects=False) as r:
            assert r.status == 200
        async with s.post(f"{p.url}/ui/logout", allow_redirects=False) as r:
            assert r.status == 303
        async with s.get(f"{p.url}/ui/", allow_redirects=False) as r:
            assert r.status == 303


async def test_every_response_carries_a_strict_csp_and_pages_have_no_inline_code(make_proxy: ProxyFactory) -> None:
    """Pages, the login form and errors carry the CSP (scripts, styles and connections from
    the daemon only, no framing); no page has an inline script, style or event handler."""
    p = await make_proxy(ui_config())
    rid, sid = await converse(p, "first", "second")
    pages = ["/ui/", f"/ui/requests/{rid}", f"/ui/sessions/{sid}", "/ui/sessions", "/ui/stats?range=7d", "/ui/requests/nope"]
    for path in [*pages, "/ui/login"]:
        status, headers, body = await fetch(p, path, headers=AUTH if path != "/ui/login" else None)
        assert status in (200, 404), path
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
        found = tags(body)
        assert found.script_text.strip() == "", path
        for tag, attrs in found.tags:
            assert "style" not in attrs and tag != "style", (path, tag)
            assert not [a for a in attrs if a.startswith("on")], (path, tag, attrs)
            if tag == "script":
                assert attrs["src"] == "/ui/static/ui.js"
    status, headers, _ = await fetch(p, "/ui/events?after=x")
    assert status == 400 and "Content-Security-Policy" in headers


async def test_the_dashboard_headers_are_on_every_ui_response_and_on_no_other(make_proxy: ProxyFactory) -> None:
    """The CSP, the framing ban and no-store are on the live stream's head and on a /ui path
    no route answers, as on the pages; not on a /v1 answer, nor on a path that only starts
    with the same letters."""
    p = await make_proxy(ui_config())
    async with session() as s:
        async with s.get(f"{p.url}/ui/events", headers=AUTH) as r:
            assert r.status == 200 and r.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    for path in ("/ui", "/ui/no-such-page"):
        _, headers, _ = await fetch(p, path)
        assert "Content-Security-Policy" in headers and headers["Cache-Control"] == "no-store", path
    _, headers, _ = await fetch(p, "/uix")
    assert "Content-Security-Policy" not in headers
    raw = await p.sdk().chat.completions.with_raw_response.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert "content-security-policy" not in raw.headers and "x-frame-options" not in raw.headers


async def test_a_prompt_with_html_shows_as_text_on_every_page(make_proxy: ProxyFactory) -> None:
    """A prompt holding a script, an event handler and quotes is escaped in the list, on the
    request's page and in its session's tree: no element of it reaches the page."""
    p = await make_proxy(ui_config())
    rid, sid = await converse(p, EVIL, EVIL)
    for path in ("/ui/", f"/ui/requests/{rid}", f"/ui/sessions/{sid}"):
        status, _, body = await fetch(p, path)
        assert status == 200
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in body and "window.pwned=1</script>" not in body, path
        assert not [t for t, a in tags(body).tags if t == "img"], path


async def test_the_list_pages_by_keyset_newest_first(make_proxy: ProxyFactory) -> None:
    """Pages of `limit` rows, newest first; each "Older" link carries the last row's id as
    `before`, and the pages cover every row once."""
    p = await make_proxy(ui_config())
    ids = [await ask(p, f"question {i}") for i in range(7)]
    await p.drained()
    seen: list[str] = []
    path: str | None = "/ui/?limit=3"
    while path:
        _, _, body = await fetch(p, path)
        seen += re.findall(r'<td class="time" title="([0-9a-f]+)"', body)
        older = re.search(r'<a href="([^"]+)" rel="next">', body)
        path = older.group(1).replace("&amp;", "&") if older else None
        assert path is None or "before=" in path
    assert seen == list(reversed(ids))


async def test_filters_and_full_text_search_narrow_the_list(make_proxy: ProxyFactory) -> None:
    """`q` finds a request by a word of its prompt; status, outcome and time filters as the CLI's."""
    p = await make_proxy(ui_config())
    wanted = await ask(p, "where is the aardvark")
    await ask(p, "something else")
    async with session() as s:
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.status == 404
    await p.drained()
    _, _, body = await fetch(p, "/ui/?q=aardvark")
    assert re.findall(r'title="([0-9a-f]+)"', body) == [wanted]
    assert "data-live" not in body  # a search is not followed live
    _, _, body = await fetch(p, "/ui/?outcome=rejected&status=404")
    assert len(re.findall(r'<td class="time"', body)) == 1 and "404 rejected" in body
    # A time range: since and until, as durations ago or dates; until one hour ago, nothing.
    _, _, body = await fetch(p, "/ui/?since=1h&until=2999-01-01")
    assert len(re.findall(r'<td class="time"', body)) == 3
    _, _, body = await fetch(p, "/ui/?until=1h")
    assert len(re.findall(r'<td class="time"', body)) == 0 and 'name="until" value="1h"' in body
    # A typo is the page again, the form as typed and what to fix, not an error document.
    status, headers, _ = await fetch(p, "/ui/requests?model=echo")  # the list has one address
    assert status == 301 and headers["Location"] == "/ui/?model=echo"
    status, headers, body = await fetch(p, "/ui/?until=soonish&status=2OO&model=echo")
    assert status == 400 and headers["Content-Type"].startswith("text/html")
    assert "Until must be a duration ago" in body and "Status must be an integer" in body and 'role="alert"' in body
    assert 'name="until" value="soonish"' in body and 'name="status" value="2OO"' in body and 'name="model" value="echo"' in body


async def test_a_request_page_shows_tool_calls_results_and_the_raw_json(make_proxy: ProxyFactory) -> None:
    """The transcript names the tool call with its arguments and the result with its call
    id, with the assistant's reasoning folded; the raw JSON link gives the request as
    `logs show --json` has it."""
    p = await make_proxy(ui_config())
    rid = await ask(p, "and tomorrow?", history=TOOL_HISTORY)
    await p.drained()
    _, _, body = await fetch(p, f"/ui/requests/{rid}")
    assert "get_weather" in body and "&quot;city&quot;: &quot;Paris&quot;" in body
    assert "result of call_w1" in body and "sunny, 21C" in body
    assert '<details class="reasoning"><summary>reasoning</summary><div class="text">The user wants the weather' in body
    status, headers, raw = await fetch(p, f"/ui/requests/{rid}/json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert '"tool_call_id": "call_w1"' in raw


async def test_a_responses_request_page_reads_as_a_transcript(make_proxy: ProxyFactory, openai_fake: OpenAIFake) -> None:
    """A Responses request's page shows its instructions and input items (a function call
    and its output) as the conversation, and the answer as the reply, the response as it
    came folded beneath."""
    p = await make_proxy(ui_config(base_config(openai_fake.base_url)))  # type: ignore[attr-defined]
    raw = await p.sdk().responses.with_raw_response.create(model="gpt-4o", instructions="be brief", input=[
        {"role": "user", "content": "weather in Oslo?"},
        {"type": "function_call", "call_id": "call_o1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_o1", "output": "rain, 8C"},
        {"role": "user", "content": "so?"},
    ])  # fmt: skip
    rid = str(raw.headers["x-request-id"])
    await p.drained()
    _, _, body = await fetch(p, f"/ui/requests/{rid}")
    assert " 5 messages" in body and "be brief" in body and "get_weather" in body and "rain, 8C" in body
    assert "<h2>Reply</h2>" in body and "upstream answered: so?" in body and "finish: completed" in body
    assert "<summary>Response as it came</summary>" in body
    e = await p.sdk().embeddings.with_raw_response.create(model="gpt-4o", input=["a"])
    await p.drained()
    _, _, body = await fetch(p, f"/ui/requests/{e.headers['x-request-id']}")
    assert "prompt 1, completion -, total 1" in body and "None" not in body and "Conversation" not in body


async def test_a_session_tree_shows_branches_and_the_upstream_thread(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """Two continuations of one reply on a threaded upstream: the tree forks into two
    branches side by side, each reply linked to its request and annotated with the
    upstream chat and reply ids the turns table holds."""
    p = await make_proxy(ui_config(qwen_config(qwen_fake.base_url)))  # type: ignore[attr-defined]
    sdk = p.sdk()
    first = [{"role": "user", "content": "tell me a story"}]
    reply = (await sdk.chat.completions.create(model="qwen3", messages=first)).choices[0].message.content
    ids = []
    for ending in ("a happy ending", "a sad ending"):
        raw = await sdk.chat.completions.with_raw_response.create(
            model="qwen3", messages=[*first, {"role": "assistant", "content": reply}, {"role": "user", "content": ending}]
        )
        ids.append(raw.headers["x-request-id"])
    row = await p.record(ids[0])
    _, _, body = await fetch(p, f"/ui/sessions/{row['session_id']}")
    assert 'data-lanes="2"' in body
    [fork] = [tr for tr in body.split("<tr>") if "a happy ending" in tr]
    assert "a sad ending" in fork and fork.index("a happy ending") < fork.index("a sad ending")  # one row, side by side
    for rid in ids:
        assert f'href="/ui/requests/{rid}"' in body
    assert f"upstream chat {row['chat_id']}" in body and f"reply {row['reply_id']}" in body


def test_a_long_conversation_with_many_branches_stays_narrow() -> None:
    """A 300-turn main line regenerated every 30 turns draws as the main lane plus one lane
    the short branches take in turn: the width is the branches alive at one depth, not the
    number of forks, and every message is drawn (nothing folded)."""
    nodes: dict[int, tv.Node] = {}

    def add(nid: int, parent: int | None) -> None:
        nodes[nid] = tv.Node(nid, parent, "user" if nid % 2 else "assistant", {"content": str(nid)})
        if parent is not None:
            nodes[parent].children.append(nid)

    for nid in range(1, 601):
        add(nid, nid - 1 if nid > 1 else None)
    for k, at in enumerate(range(60, 601, 60)):  # a regenerated reply: a sibling of node `at`
        add(1000 + k, at - 1)
    drawn, width = lanes(tv.SessionTree(nodes, [1], []))
    assert width == 2 and len(drawn) == 11
    assert drawn[0].nodes == list(range(1, 601)) and sum(len(b.nodes) for b in drawn) == len(nodes)


async def test_new_rows_arrive_on_the_event_stream(make_proxy: ProxyFactory) -> None:
    """The list's first page names its event stream; a request made after the page was
    read arrives on it as a `rows` event of the table's cells, escaped by the script's
    textContent (the data is JSON text, never markup)."""
    p = await make_proxy(ui_config())
    await ask(p, "before the page")
    await p.drained()
    _, _, body = await fetch(p, "/ui/")
    live = re.search(r'data-live="([^"]+)"', body).group(1).replace("&amp;", "&")  # type: ignore[union-attr]
    async with session() as s:
        async with s.get(f"{p.url}{live}", headers=AUTH) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            rid = await ask(p, EVIL)
            async with asyncio.timeout(10):
                while not (line := await r.content.readline()).startswith(b"data: "):
                    pass
    assert rid.encode() in line and b"before the page" not in line and b"window.pwned=1</script>" in line


async def test_stats_draw_the_roll_ups_over_time(make_proxy: ProxyFactory) -> None:
    """Every range draws its charts; the series' buckets add up to the requests logged."""
    p = await make_proxy(ui_config())
    for i in range(3):
        await ask(p, f"count me {i}")
    await p.drained()
    for name in series.RANGES:
        status, _, body = await fetch(p, f"/ui/stats?range={name}")
        assert status == 200 and body.count("<svg") == 6 and "<polyline" in body
    assert p.state.reads is not None
    ts = await p.state.reads.series(series.RANGES["1h"])
    assert sum(g.requests for g in ts.total) == 3 and len(ts.starts) in (61, 62)


async def test_no_page_shows_a_secret(make_proxy: ProxyFactory) -> None:
    """The admin key and the provider's key typed into a prompt are stored redacted and
    shown as such; neither appears on any page or in the event stream."""
    p = await make_proxy(ui_config())
    rid = await ask(p, f"my keys are {ADMIN}")
    _, sid = await converse(p, f"the key {ADMIN}", "again")
    for path in ("/ui/", f"/ui/requests/{rid}", f"/ui/requests/{rid}/json", f"/ui/sessions/{sid}", "/ui/stats"):
        _, _, body = await fetch(p, path)
        assert ADMIN not in body, path
    _, _, body = await fetch(p, f"/ui/requests/{rid}")
    assert "[REDACTED]" in body


async def test_the_event_stream_ends_when_the_daemon_stops(spawn: Spawn) -> None:
    """A page following the list does not hold up a stop: on SIGTERM its stream ends at
    once (not at the end of the 60 s grace) and the daemon exits cleanly."""
    cfg = ui_config()
    cfg["server"] = {"shutdown_grace_seconds": 60}
    daemon = await spawn(yaml.safe_dump(cfg))
    async with session() as s:
        async with s.get(f"{daemon.url}/ui/events", headers=AUTH) as r:
            assert r.status == 200
            await r.content.readline()  # the stream is open
            daemon.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):  # a hang guard, far below the grace
                await r.read()
                assert await daemon.proc.wait() == 0
