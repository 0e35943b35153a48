"""Sessions' lifecycle (issue 17): the client sessions API scoped to its key, the admin API and
the CLI's one id-or-prefix rule, paging and filters, lifecycle figures that live in the
database (so they survive restarts), a log line per event, and no upstream chat left behind.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from provider_router.records import iso
from provider_router.store import connect
from tests.conftest import Proxy, ProxyFactory, base_config, qwen_config
from tests.daemon import Daemon, Spawn, ro_query
from tests.fakes.qwen import QwenFake
from tests.test_admin import ADMIN, AUTH
from tests.test_inspect_cli import cli  # noqa: F401 - the click runner fixture
from tests.test_presence import cli as cli_process
from tests.test_presence import until
from tests import waiting

ALICE, BOB = "alice-key-123", "bob-key-456"
DATA = Path(__file__).parent / "data"


def lifecycle_config(qwen_url: str | None = None, **sessions: Any) -> dict[str, Any]:
    """Echo (and a qwen that deletes its chats when sessions end), an admin key, two clients."""
    cfg = qwen_config(qwen_url) if qwen_url else base_config()
    if qwen_url:
        cfg["providers"][-1]["delete_chats_on_expiry"] = True
    cfg["auth"] = {"admin_key": ADMIN, "client_keys": [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}]}
    if sessions:
        cfg["sessions"] = sessions
    return cfg


async def call(url: str, method: str, path: str, key: str | None = None, **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url + path, headers={**headers, **kw.pop("headers", {})}, **kw) as r:
            return r.status, (await r.json()) if "json" in r.headers.get("Content-Type", "") else await r.text()


async def say(url: str, key: str | None, sid: str, text: str = "hello", model: str = "echo") -> None:
    """One chat request in the session named `sid`."""
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    status, reply = await call(url, "POST", "/v1/chat/completions", key, json=body, headers={"X-Session-Id": sid})
    assert status == 200, reply


async def past_expiry(p: Proxy) -> None:
    """Until every active session's sliding timeout has passed (bounded, on the condition)."""
    assert p.state.sessions is not None
    deadline = max(s.expires for s in p.state.sessions.active.values())
    await waiting.until(lambda: time.time() > deadline, "the sessions' expiry to pass")


# -- the client API --------------------------------------------------------------------------
async def test_a_client_sees_refreshes_and_deletes_its_own_session_only(make_proxy: ProxyFactory, qwen_fake: QwenFake) -> None:
    """GET, refresh and DELETE /v1/sessions/{id} work for the session's own client; another
    client gets 404 as for a session that does not exist. DELETE ends the session and deletes
    its upstream chat (the provider is configured to), and the deletion is recorded."""
    p = await make_proxy(lifecycle_config(qwen_fake.base_url))  # type: ignore[attr-defined]
    await say(p.url, ALICE, "alice-1", model="qwen3-max")
    chat = qwen_fake.turns[-1].chat_id
    await p.drained()
    status, s = await call(p.url, "GET", "/v1/sessions/alice-1", ALICE)
    assert status == 200 and (s["object"], s["state"], s["ended"], s["request_count"]) == ("session", "active", None, 1)
    assert [t["turn"] for t in s["turns"]] == [1]
    for method, path in (("GET", "/v1/sessions/alice-1"), ("POST", "/v1/sessions/alice-1/refresh"), ("DELETE", "/v1/sessions/alice-1")):
        status, body = await call(p.url, method, path, BOB)
        assert status == 404 and body["error"]["code"] == "session_not_found", (method, body)
    assert (await call(p.url, "GET", "/v1/sessions/alice-1"))[0] == 401
    status, refreshed = await call(p.url, "POST", "/v1/sessions/alice-1/refresh", ALICE)
    assert status == 200 and refreshed["expires_at"] >= s["expires_at"]
    status, gone = await call(p.url, "DELETE", "/v1/sessions/alice-1", ALICE)
    assert (status, gone) == (200, {"id": "alice-1", "object": "session.deleted", "deleted": True, "chats_deleted": 1})
    assert chat not in qwen_fake.chats
    assert (await call(p.url, "GET", "/v1/sessions/alice-1", ALICE))[0] == 404
    [kept] = await p.rows("SELECT * FROM chat_deletions")
    assert (kept["chat_id"], kept["session_id"], kept["attempts"]) == (chat, "alice-1", 1) and kept["deleted_at"]


async def test_refreshing_an_expired_session_revives_it_without_its_ended_reason(make_proxy: ProxyFactory) -> None:
    """An expired session refreshed (by its client, or by an admin with a prefix of its id)
    is active again and no longer says why it ended."""
    p = await make_proxy(lifecycle_config(timeout_minutes=0.001))
    await say(p.url, ALICE, "revive-by-client")
    await say(p.url, ALICE, "revive-by-admin")
    await past_expiry(p)
    assert (await call(p.url, "POST", "/admin/sessions/cleanup", ADMIN))[1]["expired"] == 2
    status, s = await call(p.url, "GET", "/v1/sessions/revive-by-client", ALICE)
    assert (status, s["state"], s["ended"]) == (200, "expired", "expired")
    status, s = await call(p.url, "POST", "/v1/sessions/revive-by-client/refresh", ALICE)
    assert (status, s["state"], s["ended"]) == (200, "active", None)
    status, s = await call(p.url, "POST", "/admin/sessions/revive-by-a/refresh", ADMIN)
    assert (status, s["id"], s["state"]) == (200, "revive-by-admin", "active")
    await p.drained()
    for sid in ("revive-by-client", "revive-by-admin"):
        status, row = await call(p.url, "GET", f"/admin/sessions/{sid}", ADMIN)
        assert (row["state"], "ended" in (row["metadata"] or {})) == ("active", False)


# -- the admin API ---------------------------------------------------------------------------
async def test_one_id_or_prefix_rule_for_admin_and_client(make_proxy: ProxyFactory) -> None:
    """An id or a unique prefix names a session for GET, refresh and DELETE; an ambiguous
    prefix is a 409 listing the candidates, no match a 404. A client's prefix only ever
    matches its own sessions."""
    p = await make_proxy(lifecycle_config())
    await say(p.url, ALICE, "pick-a1")
    await say(p.url, BOB, "pick-a2")
    await say(p.url, ALICE, "pick-b1")
    for method, path in (("GET", "/admin/sessions/pick-a"), ("POST", "/admin/sessions/pick-a/refresh"), ("DELETE", "/admin/sessions/pick-a")):
        status, body = await call(p.url, method, path, ADMIN)
        assert status == 409 and body["error"]["candidates"] == ["pick-a1", "pick-a2"], (method, body)
        assert (await call(p.url, method, path.replace("pick-a", "nope"), ADMIN))[0] == 404
    status, mine = await call(p.url, "GET", "/v1/sessions/pick-a", ALICE)
    assert (status, mine["id"]) == (200, "pick-a1")
    status, body = await call(p.url, "GET", "/v1/sessions/pick-", ALICE)
    assert status == 409 and body["error"]["candidates"] == ["pick-a1", "pick-b1"]
    status, body = await call(p.url, "DELETE", "/admin/sessions/pick-b", ADMIN)
    assert (status, body["id"], body["deleted"]) == (200, "pick-b1", True)
    assert await p.rows("SELECT id FROM sessions WHERE id = 'pick-b1'") == []
    assert (await call(p.url, "GET", "/admin/sessions/pick-b", ADMIN))[0] == 404


async def test_admin_list_pages_and_filters_and_counts_per_client(make_proxy: ProxyFactory) -> None:
    """`has_more` is false on the last page; `?client=` and `?state=active|expired|all`
    filter; /admin/stats counts sessions per client."""
    p = await make_proxy(lifecycle_config())
    for key, sid in ((ALICE, "list-1"), (ALICE, "list-2"), (BOB, "list-3")):
        await say(p.url, key, sid)
    await p.drained()

    async def listed(query: str) -> tuple[list[str], bool]:
        status, page = await call(p.url, "GET", f"/admin/sessions?{query}", ADMIN)
        assert status == 200, page
        return [s["id"] for s in page["data"]], page["has_more"]

    assert await listed("limit=2") == (["list-3", "list-2"], True)
    assert await listed("limit=2&offset=2") == (["list-1"], False)
    assert await listed("limit=3") == (["list-3", "list-2", "list-1"], False)
    assert await listed("client=bob") == (["list-3"], False)
    assert await listed("client=alice&state=all") == (["list-2", "list-1"], False)
    assert await listed("state=expired") == ([], False)
    assert (await call(p.url, "GET", "/admin/sessions?state=ended", ADMIN))[0] == 400
    _, stats = await call(p.url, "GET", "/admin/stats", ADMIN)
    assert stats["sessions_by_client"] == {"alice": {"active": 2, "created": 2, "ended": 0}, "bob": {"active": 1, "created": 1, "ended": 0}}


async def test_lifecycle_figures_in_metrics_admin_stats_and_the_cli(make_proxy: ProxyFactory, cli: Any) -> None:
    """Created, expired, evicted and deleted sessions are counted; the oldest and newest
    active ages, the average duration and requests per session are shown the same way in
    /metrics, /admin/stats and `provider-router stats`."""
    p = await make_proxy(lifecycle_config(timeout_minutes=0.001, max_sessions=2))
    for sid in ("fig-1", "fig-2", "fig-3"):  # the third evicts the first
        await say(p.url, ALICE, sid)
    assert (await call(p.url, "DELETE", "/admin/sessions/fig-2", ADMIN))[0] == 200
    await past_expiry(p)
    assert (await call(p.url, "POST", "/admin/sessions/cleanup", ADMIN))[1]["expired"] == 1  # fig-3
    await say(p.url, ALICE, "fig-4")
    await say(p.url, ALICE, "fig-4", "again")
    await p.drained()
    _, stats = await call(p.url, "GET", "/admin/stats", ADMIN)
    life = stats["session_lifecycle"]
    want = {"active": 1, "created": 4, "expired": 1, "evicted": 1, "deleted": 1}
    assert {k: life[k] for k in want} == want
    assert life["requests_per_session"] == round(5 / 4, 3)  # fig-1, 2 and 3 ended with one request each, fig-4 has two
    assert life["oldest_age_seconds"] == life["newest_age_seconds"] and life["newest_age_seconds"] >= 0
    assert life["average_duration_seconds"] >= 0
    _, text = await call(p.url, "GET", "/metrics", ADMIN)
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert {k: samples[f"provider_router_sessions_{k}" + ("_total" if k != "active" else "")] for k in want} == want
    assert samples["provider_router_session_requests_average"] == life["requests_per_session"]
    assert "provider_router_session_newest_age_seconds" in samples
    code, out, _ = await cli("stats", "--db", str(p.db_path), "--json")
    same = (*want, "average_duration_seconds", "requests_per_session")  # the ages grow between reads
    assert code == 0 and {k: json.loads(out)["session_lifecycle"][k] for k in same} == {k: life[k] for k in same}
    code, out, _ = await cli("stats", "--db", str(p.db_path))
    assert "lifecycle (since the database began): 4 created, 1 expired, 1 evicted, 1 deleted" in out and "by client (active now/created): alice 1/4" in out  # of 4 created


# -- the command line ------------------------------------------------------------------------
async def test_cli_sessions_state_client_prefix_and_refresh(make_proxy: ProxyFactory, cli: Any, tmp_path: Path) -> None:
    """`sessions list --state expired|active|all --client NAME`; `sessions refresh ID` revives
    an expired session; an ambiguous prefix fails with one line naming the candidates."""
    p = await make_proxy(lifecycle_config(timeout_minutes=0.001))
    for key, sid in ((ALICE, "cli-a1"), (ALICE, "cli-a2"), (BOB, "cli-b1")):
        await say(p.url, key, sid)
    await past_expiry(p)
    await p.drained()
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(yaml.safe_dump({"sessions": {"timeout_minutes": 30}}))
    db = ["--db", str(p.db_path), "--config", str(cfg)]
    assert (await cli("sessions", "cleanup", *db))[1] == "marked 3 session(s) expired\n"
    code, out, err = await cli("sessions", "refresh", "cli-a1", *db)
    assert (code, out) == (0, "refreshed session cli-a1: active for 30 min (revived: it was expired)\n"), err

    async def listed(*args: str) -> set[str]:
        code, out, err = await cli("sessions", "list", "--json", *args, *db)
        assert code == 0, err
        return {json.loads(line)["id"] for line in out.splitlines()}

    assert await listed("--state", "expired") == {"cli-a2", "cli-b1"}
    assert await listed("--state", "active") == await listed("--active") == {"cli-a1"}
    assert await listed("--client", "bob") == {"cli-b1"}
    assert await listed("--state", "all", "--client", "alice") == {"cli-a1", "cli-a2"}
    for command in ("show", "refresh", "delete"):
        code, out, err = await cli("sessions", command, "cli-a", *db)
        assert code == 1 and out == "" and err.count("\n") == 1 and "cli-a1, cli-a2" in err and "ambiguous" in err
    assert (await cli("sessions", "refresh", "nope", *db))[0] == 1
    code, out, _ = await cli("sessions", "refresh", "cli-b", *db)
    assert code == 0 and out.startswith("refreshed session cli-b1")


def test_a_previous_release_database_gets_the_lifecycle_tables(tmp_path: Path) -> None:
    """Migrating an earlier release's file seeds the tallies from its rows and orders the
    sessions list by an index, not a sort."""
    path = tmp_path / "old.db"
    shutil.copy(DATA / "log-0.1.0.db", path)

    async def migrate() -> None:
        await (await connect(path)).close()

    asyncio.run(migrate())
    db = sqlite3.connect(path)
    (sessions,) = db.execute("SELECT count(*) FROM sessions").fetchone()
    assert sessions and dict(db.execute("SELECT event, n FROM session_tallies"))["created"] == sessions
    plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT * FROM sessions ORDER BY last_accessed_at DESC, id DESC"))
    assert "TEMP B-TREE" not in plan and "sessions_order" in plan
    db.close()


# -- the daemon: log lines, restarts, upstream chats ----------------------------------------
def _events(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [line for line in d.lines() if line.get("event") == event]


async def test_each_lifecycle_event_is_one_log_line_and_counts_survive_a_restart(spawn: Spawn, tmp_path: Path) -> None:
    """Created, evicted, deleted (saying by client, admin or CLI), expired while no daemon ran
    (with its idle time) and recovered at start: one line each; the counters read after a
    restart still count every event."""
    cfg = yaml.safe_dump(lifecycle_config(max_sessions=2))
    d = await spawn(cfg)
    for sid in ("ev-1", "ev-2", "ev-3"):  # ev-3 evicts ev-1
        await say(d.url, ALICE, sid)
    assert (await call(d.url, "DELETE", "/v1/sessions/ev-2", ALICE))[0] == 200
    assert (await call(d.url, "DELETE", "/admin/sessions/ev-3", ADMIN))[0] == 200
    await say(d.url, ALICE, "ev-4")
    await until(lambda: ro_query(d.db, "SELECT id FROM sessions WHERE id = 'ev-4'"))
    code, _, err = await cli_process(tmp_path, cfg, d.db, "sessions", "delete", "ev-4")
    assert code == 0, err
    await say(d.url, ALICE, "ev-5")
    await say(d.url, BOB, "ev-6")
    assert await d.stop() == 0
    assert [e["session_id"] for e in _events(d, "session_created")] == ["ev-1", "ev-2", "ev-3", "ev-4", "ev-5", "ev-6"]
    assert [e["session_id"] for e in _events(d, "session_evicted")] == ["ev-1"]
    assert [(e["session_id"], e["by"]) for e in _events(d, "session_deleted")] == [("ev-2", "client"), ("ev-3", "admin"), ("ev-4", "cli")]

    db = sqlite3.connect(d.db)  # ev-5's time runs out while no daemon runs
    db.execute("UPDATE sessions SET expires_at = ? WHERE id = 'ev-5'", (iso(time.time() - 1),))
    db.commit()
    db.close()
    d = await spawn(cfg)
    [expired] = _events(d, "session_expired")
    assert (expired["session_id"], expired["while_down"]) == ("ev-5", True) and expired["idle_seconds"] >= 0
    assert [e["session_id"] for e in _events(d, "session_recovered")] == ["ev-6"]
    _, text = await call(d.url, "GET", "/metrics", ADMIN)
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    counted = {k: samples[f"provider_router_sessions_{k}_total"] for k in ("created", "expired", "evicted", "deleted")}
    assert counted == {"created": 6, "expired": 1, "evicted": 1, "deleted": 3}


async def test_no_upstream_chat_outlives_its_session(spawn: Spawn, qwen_fake: QwenFake, tmp_path: Path) -> None:
    """At start the daemon deletes the upstream chats of sessions that expired while it was
    down and of sessions deleted by hand (the CLI, no daemon running); each deletion is
    recorded, and a later start deletes nothing again."""
    cfg = yaml.safe_dump(lifecycle_config(qwen_fake.base_url))  # type: ignore[attr-defined]
    d = await spawn(cfg)
    chats = {}
    for sid in ("by-time", "by-hand"):
        await say(d.url, ALICE, sid, model="qwen3-max")
        chats[sid] = qwen_fake.turns[-1].chat_id
    assert await d.stop() == 0
    db = sqlite3.connect(d.db)
    db.execute("UPDATE sessions SET expires_at = ? WHERE id = 'by-time'", (iso(time.time() - 1),))
    db.commit()
    db.close()
    code, _, err = await cli_process(tmp_path, cfg, d.db, "sessions", "delete", "by-hand")
    assert code == 0, err
    assert set(chats.values()) <= set(qwen_fake.chats)

    d = await spawn(cfg)
    recorded = [("by-hand", chats["by-hand"], 1, 1), ("by-time", chats["by-time"], 1, 1)]
    sql = "SELECT session_id, chat_id, deleted_at IS NOT NULL, attempts FROM chat_deletions ORDER BY session_id"
    await until(lambda: ro_query(d.db, sql) == recorded)
    assert not set(chats.values()) & set(qwen_fake.chats)
    assert len(_events(d, "upstream_chat_deleted")) == 2
    assert await d.stop() == 0
    d = await spawn(cfg)
    assert (await call(d.url, "POST", "/admin/sessions/cleanup", ADMIN))[0] == 200  # a sweep, done
    assert _events(d, "upstream_chat_deleted") == [] and _events(d, "chat_delete_failed") == []
