"""The inspection commands (`logs`, `sessions`, `stats`, `db`) on a database filled by real
requests through the proxy, run in-process through `cli.main` or as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest

from provider_router.cli import main
from provider_router.store.records import iso
from tests.conftest import Proxy, ProxyFactory, base_config

SYSTEM = {"role": "system", "content": "be brief"}
A1 = [SYSTEM, {"role": "user", "content": "alpha zanzibar question"}]
B1 = [{"role": "user", "content": "beta streaming words\nsecond line"}]
JSON_COLUMNS = ("request_body", "response_body", "attempts")


@dataclass
class Filled:
    """A proxy whose log holds: a1 (plain), b1 (stream), a2 (a1 continued), bad (unknown
    model, rejected), b2 (b1 continued, stream), in that order."""

    proxy: Proxy
    rows: list[dict[str, Any]]

    @property
    def db(self) -> str:
        return str(self.proxy.db_path)

    def row(self, name: str) -> dict[str, Any]:
        return self.rows[["a1", "b1", "a2", "bad", "b2"].index(name)]


async def _stream_text(proxy: Proxy, messages: list[dict[str, Any]]) -> str:
    stream = await proxy.sdk().chat.completions.create(
        model="echo", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    return "".join(parts)


async def fill(proxy: Proxy) -> list[dict[str, Any]]:
    sdk = proxy.sdk()
    a1 = (await sdk.chat.completions.create(model="echo", messages=A1)).choices[0].message.content
    b1 = await _stream_text(proxy, B1)
    a2 = A1 + [{"role": "assistant", "content": a1}, {"role": "user", "content": "alpha follow up"}]
    await sdk.chat.completions.create(model="echo", messages=a2)
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="no-such-model", messages=A1)
    await _stream_text(proxy, B1 + [{"role": "assistant", "content": b1}, {"role": "user", "content": "beta again"}])
    rows = await proxy.rows()
    assert [r["prompt_text"] for r in rows] == [
        "alpha zanzibar question", "beta streaming words\nsecond line", "alpha follow up",
        "alpha zanzibar question", "beta again",
    ]
    return rows


@pytest.fixture
async def filled(make_proxy: ProxyFactory) -> Filled:
    proxy = await make_proxy(base_config())
    return Filled(proxy, await fill(proxy))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `provider-router ARGS...` in-process; returns (exit status, stdout, stderr).

    In a thread: the commands run their own event loop, and the test's loop is running.
    """

    async def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def parsed(row: dict[str, Any]) -> dict[str, Any]:
    """A DB row as `--json` renders it: JSON text columns parsed back."""
    out = dict(row)
    for col in JSON_COLUMNS:
        if isinstance(out[col], str):
            out[col] = json.loads(out[col])
    return out


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def ids_for(cli: Any, db: str, *args: str) -> list[str]:
    code, out, err = await cli("logs", "--db", db, "-n", "0", "--json", *args)
    assert code == 0, err
    return [r["id"] for r in json_lines(out)]


# -- logs ------------------------------------------------------------------------------
async def test_logs_json_is_every_row_with_bodies_parsed(filled: Filled, cli: Any) -> None:
    """`logs -n 0 --json` prints every row, oldest first, every column, JSON bodies parsed."""
    code, out, err = await cli("logs", "--db", filled.db, "-n", "0", "--json")
    assert code == 0 and err == ""
    assert json_lines(out) == [parsed(r) for r in filled.rows]
    assert json_lines(out)[0]["request_body"]["messages"] == A1


async def test_logs_table_is_newest_n_oldest_first_and_fits(filled: Filled, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table shows the newest N oldest first, one line each, cut to the terminal width."""
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = await cli("logs", "--db", filled.db, "-n", "3")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["TIME", "ID", "MODEL"]
    assert len(lines) == 3
    assert all(len(line) <= 100 for line in [header, *lines])
    a2, bad, b2 = (filled.row(n) for n in ("a2", "bad", "b2"))
    for line, row in zip(lines, (a2, bad, b2)):
        assert row["id"][:16] in line
    assert "alpha follow up" in lines[0] and "echo #2" in lines[0]
    assert "404 rejected" in lines[1] and "no-such-model" in lines[1]
    assert "beta again" in lines[2]
    # A wide terminal shows the whole first line of prompt and reply, never the second.
    monkeypatch.setenv("COLUMNS", "300")
    _, out, _ = await cli("logs", "--db", filled.db, "-n", "0")
    assert filled.row("b1")["response_text"].splitlines()[0] in out
    assert "second line" not in out


async def test_logs_filters(filled: Filled, cli: Any) -> None:
    """--model (exact and glob), --provider, --status, --outcome, --session and --since select rows."""
    db, ids = filled.db, [r["id"] for r in filled.rows]
    ok_ids = [r["id"] for r in filled.rows if r["outcome"] == "ok"]
    bad = filled.row("bad")["id"]
    assert await ids_for(cli, db, "--model", "echo") == ok_ids
    assert await ids_for(cli, db, "-m", "ech*") == ok_ids
    assert await ids_for(cli, db, "--model", "no-such-*") == [bad]
    assert await ids_for(cli, db, "--provider", "echo") == ok_ids
    assert await ids_for(cli, db, "--status", "404") == [bad]
    assert await ids_for(cli, db, "--outcome", "rejected") == [bad]
    assert await ids_for(cli, db, "--outcome", "ok", "--model", "echo", "-n", "1") == ok_ids[-1:]
    assert await ids_for(cli, db, "--session", "no-such-session") == []
    assert await ids_for(cli, db, "--since", "1h") == ids
    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    assert await ids_for(cli, db, "--since", tomorrow) == []
    # An exact timestamp from the log includes that row and the later ones.
    assert await ids_for(cli, db, "--since", filled.rows[2]["received_at"]) == ids[2:]


async def test_logs_filter_text_is_data_not_syntax(filled: Filled, cli: Any) -> None:
    """Quotes, `%`, `_`, glob and FTS operators in filters are matched as text, never break SQL."""
    db = filled.db
    for hostile in ("x'%_\"", "%", "_", "echo' OR '1'='1", "ech_", "ech%"):
        assert await ids_for(cli, db, "--model", hostile) == [], hostile
        assert await ids_for(cli, db, "--provider", hostile) == [], hostile
        assert await ids_for(cli, db, "--outcome", hostile) == [], hostile
    for hostile in ('"a" OR -b*', 'foo"bar', "-x", "NEAR(", "prompt_text:", "*", '"', "AND"):
        code, _, err = await cli("logs", "--db", db, f"--query={hostile}", "--json")
        assert code == 0 and err == "", (hostile, err)


async def test_logs_full_text_search(filled: Filled, cli: Any) -> None:
    """-q finds the requests whose prompt or reply holds every word; `word*` is a prefix."""
    db = filled.db
    a1, bad = filled.row("a1")["id"], filled.row("bad")["id"]
    assert await ids_for(cli, db, "-q", "zanzibar") == [a1, bad]  # the rejected one asked it too
    assert await ids_for(cli, db, "-q", "zanzibar", "--outcome", "ok") == [a1]
    assert await ids_for(cli, db, "-q", "zanzi*") == [a1, bad]
    assert await ids_for(cli, db, "-q", "alpha follow") == [filled.row("a2")["id"]]
    assert await ids_for(cli, db, "-q", "zanzibar again") == []
    # The reply is searched too: only b2's echo says "again".
    assert await ids_for(cli, db, "-q", "echo again") == [filled.row("b2")["id"]]


async def test_logs_show_stream_in_full(filled: Filled, cli: Any) -> None:
    """`logs show PREFIX` prints a streamed request in full: fields, transcript, assembled reply."""
    b2 = filled.row("b2")
    code, out, _ = await cli("logs", "show", b2["id"][:22], "--db", filled.db)
    assert code == 0
    assert f"request {b2['id']}" in out
    assert "stream" in out and f"yes ({b2['chunk_count']} chunks)" in out
    assert "user: beta streaming words" in out and "assistant: echo #1" in out  # the history
    assert "-- reply" in out and b2["response_text"] in out
    assert f"total {b2['total_tokens']}" in out
    assert b2["reply_id"] in out
    # --json, with the options before or after the subcommand.
    code, out, _ = await cli("logs", "--db", filled.db, "show", b2["id"], "--json")
    assert code == 0 and json.loads(out) == parsed(b2)


async def test_logs_show_rejected_and_bad_ids(filled: Filled, cli: Any) -> None:
    """A rejected request shows its error; unknown or ambiguous ids are one-line errors, exit 1."""
    bad = filled.row("bad")
    code, out, _ = await cli("logs", "show", bad["id"], "--db", filled.db)
    assert code == 0 and "404 rejected" in out and "-- error" in out and bad["error"] in out
    code, out, err = await cli("logs", "show", "ffffffff", "--db", filled.db)
    assert (code, out) == (1, "") and "no request" in err and err.count("\n") == 1
    code, out, err = await cli("logs", "show", filled.rows[0]["id"][:4], "--db", filled.db)
    assert (code, out) == (1, "") and "ambiguous" in err and err.count("\n") == 1


async def test_missing_database_is_a_one_line_error(tmp_path: Path, cli: Any) -> None:
    """Every reading command on a missing database says so in one line, exits 1, creates nothing."""
    db = str(tmp_path / "none.db")
    for cmd in (["logs"], ["logs", "show", "abc"], ["sessions", "list"], ["stats"], ["db", "vacuum"],
                ["db", "prune", "--older-than", "1d"], ["sessions", "cleanup"]):
        code, out, err = await cli(*cmd, "--db", db)
        assert (code, out) == (1, ""), cmd
        assert err.startswith("provider-router: no database at") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


async def test_follow_prints_new_requests_until_interrupted(filled: Filled, tmp_path: Path) -> None:
    """`logs --follow` (a real process) prints the newest row, then each new request as it is
    logged; Ctrl-C ends it quietly with status 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", "logs", "--db", filled.db, "-f", "-n", "1", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            first = json.loads(await proc.stdout.readline())
            assert first["id"] == filled.rows[-1]["id"]
            await filled.proxy.sdk().chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "follow me"}]
            )
            new = json.loads(await proc.stdout.readline())
            assert new["prompt_text"] == "follow me"
            assert new == parsed((await filled.proxy.rows())[-1])
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
            assert await proc.stderr.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- stats -----------------------------------------------------------------------------
async def test_stats_json_matches_the_rows(filled: Filled, cli: Any) -> None:
    """`stats --json` counts requests, errors and tokens per (model, provider) as the rows say."""
    code, out, _ = await cli("stats", "--db", filled.db, "--json")
    assert code == 0
    st = json.loads(out)
    want: dict[tuple[Any, Any], dict[str, int]] = {}
    for r in filled.rows:
        g = want.setdefault((r["model"], r["provider"]), {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0})
        g["requests"] += 1
        g["errors"] += r["outcome"] != "ok"
        g["prompt_tokens"] += r["prompt_tokens"] or 0
        g["completion_tokens"] += r["completion_tokens"] or 0
    got = {(g["model"], g["provider"]): {k: g[k] for k in ("requests", "errors", "prompt_tokens", "completion_tokens")}
           for g in st["groups"]}
    assert got == want
    assert want[("echo", "echo")]["requests"] == 4 and want[("no-such-model", None)]["errors"] == 1
    echo = next(g for g in st["groups"] if g["model"] == "echo")
    durations = sorted(r["duration_ms"] for r in filled.rows if r["model"] == "echo")
    assert durations[0] <= echo["duration_p50_ms"] <= echo["duration_p95_ms"] <= durations[-1]
    assert st["total"]["requests"] == 5 and st["total"]["errors"] == 1
    [sessions] = await filled.proxy.rows("SELECT count(*) AS total, count(*) FILTER (WHERE state='active') AS active FROM sessions")
    assert (st["sessions"]["total"], st["sessions"]["active"]) == (sessions["total"], sessions["active"])
    # The table has the same numbers; --since in the future counts nothing.
    code, out, _ = await cli("stats", "--db", filled.db)
    assert code == 0 and any(line.split()[:4] == ["echo", "echo", "4", "0"] for line in out.splitlines())
    code, out, _ = await cli("stats", "--db", filled.db, "--json", "--since", "2999-01-01")
    assert json.loads(out)["total"]["requests"] == 0


# -- db --------------------------------------------------------------------------------
async def test_db_path_comes_from_the_config(tmp_path: Path, cli: Any) -> None:
    """`db path` prints --db, else database.path of --config, resolved to an absolute path."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("database:\n  path: " + str(tmp_path / "sub" / "x.db") + "\n")
    code, out, _ = await cli("db", "path", "--config", str(cfg))
    assert (code, out) == (0, f"{tmp_path / 'sub' / 'x.db'}\n")
    code, out, _ = await cli("db", "path", "--db", str(tmp_path / "y.db"), "--config", str(cfg))
    assert out == f"{tmp_path / 'y.db'}\n"


async def test_prune_deletes_old_rows_and_their_index(filled: Filled, cli: Any) -> None:
    """`db prune` deletes rows older than the cutoff in batches (progress on stderr), the FTS
    index with them; the running proxy keeps logging and searching afterwards."""
    code, out, err = await cli("db", "prune", "--db", filled.db, "--older-than", "1d")
    assert code == 0 and out.startswith("deleted 0 request(s)")
    code, out, err = await cli("db", "prune", "--db", filled.db, "--older-than", "0d", "--batch", "2")
    assert code == 0 and out.startswith("deleted 5 request(s)")
    assert "deleted 2 requests so far" in err and "deleted 4 requests so far" in err
    db = sqlite3.connect(filled.db)
    try:
        assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
        # External-content FTS: count its index terms, not its (content-table) rows.
        db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, requests_fts, 'row')")
        assert db.execute("SELECT count(*) FROM temp.vocab").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM requests_fts WHERE requests_fts MATCH 'echo'").fetchone()[0] == 0
    finally:
        db.close()
    await filled.proxy.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": "after prune"}])
    [row] = await filled.proxy.rows()
    assert await ids_for(cli, filled.db) == [row["id"]]
    assert await ids_for(cli, filled.db, "-q", "prune") == [row["id"]]


async def test_vacuum_keeps_the_data(filled: Filled, cli: Any) -> None:
    """`db vacuum` compacts and truncates the WAL, prints sizes, and loses nothing."""
    code, out, _ = await cli("db", "vacuum", "--db", filled.db)
    assert code == 0
    before, after = out.splitlines()
    assert before.startswith("before:") and after.startswith("after:") and after.endswith("wal 0 B)")
    assert await filled.proxy.rows() == filled.rows
    db = sqlite3.connect(filled.db)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    await filled.proxy.sdk().chat.completions.create(model="echo", messages=[{"role": "user", "content": "after vacuum"}])
    assert len(await filled.proxy.rows()) == 6


def test_every_command_has_useful_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Every inspection command describes itself and each option, with an example epilog."""
    import argparse

    from provider_router.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, path: list[str]) -> list[tuple[list[str], argparse.ArgumentParser]]:
        out = [(path, parser)]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out += leaves(sub, path + [name])
        return out

    commands = [(p, sp) for p, sp in leaves(build_parser(), []) if p and p[0] in ("logs", "sessions", "stats", "db")]
    assert len(commands) == 12
    for path, parser in commands:
        assert parser.description and "example" in (parser.epilog or ""), path
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (path, action.dest)
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        assert exc.value.code == 0
        assert "example" in capsys.readouterr().out, path


# -- sessions --------------------------------------------------------------------------
async def _sessions_or_skip(proxy: Proxy) -> list[dict[str, Any]]:
    sessions = await proxy.rows("SELECT * FROM sessions ORDER BY created_at")
    if not sessions:
        pytest.skip("threading not landed")
    return sessions


async def test_sessions_list_and_show_real_conversations(filled: Filled, cli: Any) -> None:
    """`sessions list` has every session; `sessions show PREFIX` gives its requests turn by turn
    with their lineage; `logs --session` selects the same requests; an ambiguous prefix fails."""
    sessions = await _sessions_or_skip(filled.proxy)
    db = filled.db
    code, out, _ = await cli("sessions", "list", "--db", db, "-n", "0", "--json")
    assert code == 0
    assert sorted(s["id"] for s in json_lines(out)) == sorted(s["id"] for s in sessions)
    code, out, _ = await cli("sessions", "list", "--db", db)
    assert out.splitlines()[0].split()[:3] == ["ID", "STATE", "CLIENT"]
    assert all(s["id"] in out for s in sessions) and "echo/echo" in out
    active = sorted(s["id"] for s in sessions if s["state"] == "active")
    code, out, _ = await cli("sessions", "list", "--db", db, "--active", "--json")
    assert sorted(s["id"] for s in json_lines(out)) == active
    conversations = 0
    for s in sessions:
        requests = await filled.proxy.rows("SELECT * FROM requests WHERE session_id = ? ORDER BY id", s["id"])
        conversations += len(requests) > 1
        code, out, _ = await cli("sessions", "show", s["id"][:20], "--db", db, "--json")
        assert code == 0
        shown = json.loads(out)
        assert shown["session"]["id"] == s["id"]
        assert shown["requests"] == [parsed(r) for r in requests]
        code, out, _ = await cli("sessions", "show", s["id"], "--db", db)
        assert f"session {s['id']}" in out
        for r in requests:
            assert f"turn {r['turn']}  {r['id']}" in out
            assert f"{r['parent_id'] or '(new chat)'} -> {r['reply_id']}" in out
            assert f"user: {r['prompt_text'].splitlines()[0]}" in out
            assert f"assistant: {r['response_text'].splitlines()[0]}" in out
        assert await ids_for(cli, db, "--session", s["id"]) == [r["id"] for r in requests]
    assert conversations == 2  # a1 -> a2 and b1 -> b2 each continued their session
    code, out, err = await cli("sessions", "show", sessions[0]["id"][:4], "--db", db)
    assert (code, out) == (1, "") and "ambiguous" in err
    # Nothing has expired yet (the default timeout is 30 minutes).
    assert await cli("sessions", "cleanup", "--db", db) == (0, "marked 0 session(s) expired\n", "")


async def test_sessions_delete_cleanup_and_prune(make_proxy: ProxyFactory, cli: Any) -> None:
    """`sessions delete` removes a session and its turns, keeping its request rows;
    `sessions cleanup` expires the sessions past their expiry; `db prune` then deletes them."""
    proxy = await make_proxy(base_config() | {"sessions": {"timeout_minutes": 0.01}})
    await fill(proxy)
    sessions = await _sessions_or_skip(proxy)
    db = str(proxy.db_path)
    victim = sessions[0]["id"]
    turns = len(await proxy.rows("SELECT * FROM turns WHERE session_id = ?", victim))
    kept = len(await proxy.rows("SELECT id FROM requests WHERE session_id = ?", victim))
    assert turns and kept
    code, out, _ = await cli("sessions", "delete", victim, "--db", db)
    assert code == 0 and f"deleted session {victim}" in out
    assert f"its {turns} thread turn(s); its {kept} request row(s) are kept" in out
    assert await proxy.rows("SELECT * FROM sessions WHERE id = ?", victim) == []
    assert await proxy.rows("SELECT * FROM turns WHERE session_id = ?", victim) == []
    assert len(await proxy.rows("SELECT id FROM requests WHERE session_id = ?", victim)) == kept
    code, _, err = await cli("sessions", "delete", victim, "--db", db)
    assert code == 1 and "no session" in err

    # Wait (bounded, on the condition) until the short expiry has passed, then clean up.
    latest = max(s["expires_at"] for s in sessions)
    async with asyncio.timeout(30):
        while iso(time.time()) <= latest:
            await asyncio.sleep(0.05)
    active = await proxy.rows("SELECT id FROM sessions WHERE state = 'active'")
    code, out, _ = await cli("sessions", "cleanup", "--db", db)
    assert (code, out) == (0, f"marked {len(active)} session(s) expired\n")
    left = await proxy.rows("SELECT state, metadata FROM sessions")
    assert left and {r["state"] for r in left} == {"expired"}
    assert all(json.loads(r["metadata"])["ended"] for r in left)
    code, out, _ = await cli("stats", "--db", db, "--json")
    assert json.loads(out)["sessions"] == {"active": 0, "expired": len(left), "total": len(left)}

    code, out, _ = await cli("db", "prune", "--db", db, "--older-than", "0d")
    assert f"and {len(left)} expired session(s)" in out
    assert await proxy.rows("SELECT * FROM sessions") == []
    assert await proxy.rows("SELECT * FROM turns") == []
