"""The operator surface: /health, /metrics and /admin/*, over a database filled by real
requests through the proxy; admin needs its key and never leaks data without it.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Proxy, ProxyFactory, base_config
from tests.waiting import until

ADMIN = "admin-key-canary-42"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def admin_config(**extra: Any) -> dict[str, Any]:
    cfg = base_config()
    cfg["auth"] = {"admin_key": ADMIN, **extra}
    return cfg


async def fill(p: Proxy) -> list[str]:
    """Two conversations of two turns (one streamed) and a rejected request. (A one-shot
    request has no session row: only a conversation that continues is stored as one.)"""
    sdk = p.sdk()
    for opening, stream in (("alpha question", False), ("beta", True)):
        a = [{"role": "user", "content": opening}]
        for turn in (1, 2):
            if stream:
                chunks = [c async for c in await sdk.chat.completions.create(model="echo", messages=a, stream=True)]
                reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                reply = (await sdk.chat.completions.create(model="echo", messages=a)).choices[0].message.content
            if turn == 1:
                a = a + [{"role": "assistant", "content": reply}, {"role": "user", "content": f"{opening} again"}]
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{p.url}/v1/chat/completions", json={"model": "nope", "messages": a}) as r:
            assert r.status == 404
    rows = await p.rows()
    return [r["id"] for r in rows]


async def get(p: Proxy, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{p.url}{path}", headers=headers or {}) as r:
            ctype = r.headers.get("Content-Type", "")
            return r.status, (await r.json()) if "json" in ctype else await r.text()


async def test_health_is_open_and_minimal(make_proxy: ProxyFactory) -> None:
    """/health answers without any key, even with client keys set, and says only status,
    db and the log writer's counts (no content, no key)."""
    cfg = admin_config(client_keys=[{"name": "a", "key": "client-key-123"}])
    p = await make_proxy(cfg)
    await p.drained()  # the sessions' start-up statement
    status, body = await get(p, "/health")
    assert status == 200 and (body["status"], body["database"]) == ("ok", "ok")
    assert set(body) == {"status", "database", "log"}
    assert body["log"] == {
        "state": "ok", "written": 0, "failed": 0, "dropped": 0, "queue_depth": 0, "queue_bound": 10_000, "file": "ok", "reopened": 0,
    }  # fmt: skip


async def test_admin_is_off_without_an_admin_key(make_proxy: ProxyFactory) -> None:
    """With no `auth.admin_key`, admin paths and /metrics do not exist (404)."""
    p = await make_proxy(base_config())
    for path in ("/admin/sessions", "/admin/stats", "/metrics"):
        status, body = await get(p, path, AUTH)
        assert status == 404 and "error" in body


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/admin/sessions", {}),
        ("/admin/sessions", {"Authorization": "Bearer wrong"}),
        ("/admin/sessions", {"Authorization": ADMIN}),  # no scheme
        ("/admin/requests", {"Host": "evil.example"}),
        ("//admin/sessions", AUTH),
        ("/admin%2Fsessions", AUTH),
        ("/admin/%2e%2e/admin/stats", {}),
        ("/admin/requests/..%2F..%2Fstats", {}),
        ("/metrics", {"Authorization": "Bearer wrong"}),
    ],
)
async def test_admin_refuses_without_the_key_or_on_odd_paths(make_proxy: ProxyFactory, path: str, headers: dict[str, str]) -> None:
    """The wrong key, no key, an odd Host, `//` or `%2F` in the path: 401/404, never data."""
    p = await make_proxy(admin_config())
    await fill(p)
    status, body = await get(p, path, headers)
    assert status in (401, 404)
    assert "data" not in body and "alpha" not in str(body)


async def test_admin_sessions_list_get_refresh_delete(make_proxy: ProxyFactory) -> None:
    """Sessions are listed (paged, filtered), shown with their turns, refreshed and deleted."""
    p = await make_proxy(admin_config())
    await fill(p)
    status, page = await get(p, "/admin/sessions?limit=1", AUTH)
    assert status == 200 and len(page["data"]) == 1 and page["has_more"]
    _, page2 = await get(p, "/admin/sessions?limit=1&offset=1", AUTH)
    _, everything = await get(p, "/admin/sessions?state=active", AUTH)
    assert {s["id"] for s in everything["data"]} == {page["data"][0]["id"], page2["data"][0]["id"]}
    [opening] = await p.rows("SELECT session_id FROM request_log WHERE prompt_text = 'alpha question'")
    alpha = next(s for s in everything["data"] if s["id"] == opening["session_id"])
    status, one = await get(p, f"/admin/sessions/{alpha['id']}", AUTH)
    assert status == 200 and [t["prompt_text"] for t in one["turns"]] == ["alpha question", "alpha question again"]
    before = p.state.sessions.active[alpha["id"]].expires  # type: ignore[union-attr]
    status, refreshed = await get(p, f"/admin/sessions/{alpha['id']}/refresh", AUTH, method="POST")
    assert status == 200 and p.state.sessions.active[alpha["id"]].expires >= before  # type: ignore[union-attr]
    status, _ = await get(p, f"/admin/sessions/{alpha['id']}", AUTH, method="DELETE")
    assert status == 200
    await p.drained()
    assert (await get(p, f"/admin/sessions/{alpha['id']}", AUTH))[0] == 404
    assert alpha["id"] not in p.state.sessions.active  # type: ignore[union-attr]
    assert (await get(p, "/admin/sessions/nope", AUTH, method="DELETE"))[0] == 404


async def test_admin_cleanup_expires_sessions(make_proxy: ProxyFactory) -> None:
    """POST /admin/sessions/cleanup ends the sessions whose sliding timeout has passed."""
    cfg = admin_config()
    cfg["sessions"] = {"timeout_minutes": 1 / 60}  # 1 s: long enough for fill() on a loaded machine
    p = await make_proxy(cfg)
    await fill(p)
    sessions = p.state.sessions
    assert sessions is not None
    deadline = max(s.expires for s in sessions.active.values())
    await until(lambda: time.time() > deadline, "every session past its expiry")
    status, body = await get(p, "/admin/sessions/cleanup", AUTH, method="POST")
    assert status == 200 and body == {"expired": 2, "active": 0}
    await p.drained()
    _, listed = await get(p, "/admin/sessions?state=expired", AUTH)
    assert len(listed["data"]) == 2


async def test_admin_requests_and_stats(make_proxy: ProxyFactory) -> None:
    """Requests are listed newest first with filters and a `before` cursor; stats match rows."""
    p = await make_proxy(admin_config())
    ids = await fill(p)
    _, page = await get(p, "/admin/requests?limit=2", AUTH)
    assert [r["id"] for r in page["data"]] == ids[::-1][:2]
    _, nxt = await get(p, f"/admin/requests?limit=2&before={page['next_before']}", AUTH)
    assert [r["id"] for r in nxt["data"]] == ids[::-1][2:4]
    _, rejected = await get(p, "/admin/requests?outcome=rejected", AUTH)
    assert [r["status"] for r in rejected["data"]] == [404]
    _, found = await get(p, "/admin/requests?q=beta", AUTH)
    assert {r["prompt_text"] for r in found["data"]} == {"beta", "beta again"}
    status, one = await get(p, f"/admin/requests/{ids[2]}", AUTH)
    assert status == 200 and one["stream"] == 1 and one["response_text"].endswith(": beta")
    status, stats = await get(p, "/admin/stats", AUTH)
    rows = await p.rows()
    assert stats["total"]["requests"] == len(rows)
    assert stats["total"]["errors"] == sum(r["outcome"] != "ok" for r in rows)
    assert stats["total"]["completion_tokens"] == sum(r["completion_tokens"] or 0 for r in rows)
    assert stats["sessions_live"]["active"] == 2
    assert stats["log_writer"]["dropped"] == 0
    assert (await get(p, "/admin/requests?limit=0", AUTH))[0] == 400


async def test_metrics_count_what_the_log_says(make_proxy: ProxyFactory) -> None:
    """/metrics (Prometheus text) counts requests by model/provider/outcome like the rows do,
    and exposes latency histograms, active sessions and the log queue."""
    p = await make_proxy(admin_config())
    await fill(p)
    rows = await p.rows()
    status, text = await get(p, "/metrics", AUTH)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counted = {
        (s.labels["model"], s.labels["provider"], s.labels["outcome"]): s.value
        for s in families["provider_router_requests"].samples
        if s.name.endswith("_total")
    }
    expected: dict[tuple[str, str, str], float] = {}
    for r in rows:
        key = (r["model"] if r["provider"] else "none", r["provider"] or "none", r["outcome"])
        expected[key] = expected.get(key, 0) + 1
    assert counted == expected
    ttfb_count = [s.value for s in families["provider_router_ttfb_ms"].samples if s.name.endswith("_count")]
    assert sum(ttfb_count) == sum(1 for r in rows if r["ttfb_ms"] is not None)
    assert families["provider_router_sessions_active"].samples[0].value == 2
    assert "provider_router_log_queue_depth" in families
    assert "provider_router_log_records_dropped" in families


async def test_metrics_can_be_public(make_proxy: ProxyFactory) -> None:
    """With `auth.metrics_public`, /metrics needs no key (admin still does)."""
    p = await make_proxy(admin_config(metrics_public=True))
    assert (await get(p, "/metrics"))[0] == 200
    assert (await get(p, "/admin/stats"))[0] == 401


async def test_each_app_counts_only_its_own_requests(make_proxy: ProxyFactory) -> None:
    """Two apps in one process (as in these tests) keep separate series: a request to one
    counts on its /metrics and not on the other's."""
    one, other = await make_proxy(admin_config()), await make_proxy(admin_config())
    await one.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])

    async def counted(p: Proxy) -> float:
        families = text_string_to_metric_families((await get(p, "/metrics", AUTH))[1])
        return sum(s.value for f in families if f.name == "provider_router_requests" for s in f.samples if s.name.endswith("_total"))

    assert (await counted(one), await counted(other)) == (1, 0)
