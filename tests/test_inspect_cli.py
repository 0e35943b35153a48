"""The inspection commands (`logs`, `sessions`, `stats`, `db`) on a database filled by real
requests through the proxy, run through click's runner or as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import click
import openai
import pytest
from aiohttp import web
from click.testing import CliRunner

from provider_router.cli import cli as root
from provider_router.records import iso
from provider_router.store.rows import BUCKETS_MS, bucket
from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, base_config, qwen_config
from tests.fakes.qwen import QwenFake
from tests.waiting import until

SYSTEM = {"role": "system", "content": "be brief"}
A1 = [SYSTEM, {"role": "user", "content": "alpha zanzibar question"}]
B1 = [{"role": "user", "content": "beta streaming words\nsecond line"}]
# The tree's internals in a request row: `logs --json` leaves them out (`logs show --json`
# rebuilds the bodies from them).
INTERNAL_COLUMNS = ("params", "params_blobs", "overrides", "body_blob", "response", "replies")


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
def cli() -> Any:
    """Run `provider-router ARGS...` through click's runner; returns (exit status, stdout, stderr).

    In a thread: the commands run their own event loop, and the test's loop is running.
    """
    runner = CliRunner()

    async def run(*args: str) -> tuple[int, str, str]:
        result = await asyncio.to_thread(runner.invoke, root, list(args))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a bug, not a failure the command reports
        return result.exit_code, result.stdout, result.stderr

    return run


def parsed(row: dict[str, Any]) -> dict[str, Any]:
    """A `request_log` row as `--json` renders it: internal columns left out, attempts parsed."""
    out = {k: v for k, v in row.items() if k not in INTERNAL_COLUMNS}
    if isinstance(out.get("attempts"), str):
        out["attempts"] = json.loads(out["attempts"])
    return out


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def ids_for(cli: Any, db: str, *args: str) -> list[str]:
    code, out, err = await cli("logs", "--db", db, "-n", "0", "--json", *args)
    assert code == 0, err
    return [r["id"] for r in json_lines(out)]


# -- logs ------------------------------------------------------------------------------
async def test_logs_json_is_every_row_with_its_texts(filled: Filled, cli: Any) -> None:
    """`logs -n 0 --json` prints every row oldest first: every column and its texts, no tree internals."""
    code, out, err = await cli("logs", "--db", filled.db, "-n", "0", "--json")
    assert code == 0 and err == ""
    lines = json_lines(out)
    assert lines == [parsed(r) for r in filled.rows]
    assert lines[0]["prompt_text"] == "alpha zanzibar question" and lines[0]["response_text"].startswith("echo #1")
    assert not set(INTERNAL_COLUMNS) & set(lines[0])


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
    """--model (exact and glob), --provider, --status, --outcome, --session, --since and --until select rows."""
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
    # --until is the other end: rows received before it; with --since, a window.
    at = [r["received_at"] for r in filled.rows]
    assert await ids_for(cli, db, "--until", at[2]) == [i for i, t in zip(ids, at) if t < at[2]]
    assert await ids_for(cli, db, "--since", at[1], "--until", at[3]) == [i for i, t in zip(ids, at) if at[1] <= t < at[3]]
    assert await ids_for(cli, db, "--until", "1h") == []
    assert await ids_for(cli, db, "--until", tomorrow) == ids


async def test_logs_filter_text_is_data_not_syntax(filled: Filled, cli: Any) -> None:
    """Quotes, `%`, `_`, glob and FTS operators in filters are matched as text, never break SQL."""
    db = filled.db
    for hostile in ("x'%_\"", "%", "_", "echo' OR '1'='1", "ech_", "ech%"):
        assert await ids_for(cli, db, "--model", hostile) == [], hostile
        assert await ids_for(cli, db, "--provider", hostile) == [], hostile
        code, out, err = await cli("logs", "--db", db, "--outcome", hostile)  # not an outcome: refused, not "no rows"
        assert (code, out) == (2, "") and "is not one of 'ok'" in err, hostile
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
    # --json, with the options before or after the subcommand: the body as sent, the
    # stream assembled into a chat.completion.
    code, out, _ = await cli("logs", "--db", filled.db, "show", b2["id"], "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown == json.loads(json.dumps(await filled.proxy.record(b2["id"])))
    assert shown["request"] == {
        "model": "echo", "stream": True, "stream_options": {"include_usage": True},
        "messages": B1 + [{"role": "assistant", "content": filled.row("b1")["response_text"]},
                          {"role": "user", "content": "beta again"}],
    }
    [choice] = shown["response"]["choices"]
    assert choice["message"]["content"] == b2["response_text"] and choice["finish_reason"] == "stop"
    assert shown["response"]["usage"]["total_tokens"] == b2["total_tokens"]


async def test_logs_show_rejected_and_bad_ids(filled: Filled, cli: Any) -> None:
    """A rejected request shows its error; unknown or ambiguous ids are one-line errors, exit 1."""
    bad = filled.row("bad")
    code, out, _ = await cli("logs", "show", bad["id"], "--db", filled.db)
    assert code == 0 and "404 rejected" in out and "-- error" in out and bad["error"] in out
    code, out, err = await cli("logs", "show", "ffffffff", "--db", filled.db)
    assert (code, out) == (1, "") and "no request" in err and err.count("\n") == 1
    prefix = filled.rows[0]["id"][:4]
    code, out, err = await cli("logs", "show", prefix, "--db", filled.db)
    assert (code, out) == (1, "") and "ambiguous" in err and err.count("\n") == 1
    matches = sorted(r["id"] for r in filled.rows if r["id"].startswith(prefix))
    assert matches[0] in err and err.rstrip().endswith(", ...") == (len(matches) > 5)  # "..." only when more match
    pairs = [p for n in range(4, 28) for p in {m[:n] for m in matches} if sum(m.startswith(p) for m in matches) == 2]
    for pair in pairs[:1]:  # two ids sharing a prefix no third one has (random tails: nearly always)
        code, _, err = await cli("logs", "show", pair, "--db", filled.db)
        named = [m for m in matches if m.startswith(pair)]
        assert code == 1 and all(m in err for m in named) and not err.rstrip().endswith("...")  # both named, nothing more


async def test_missing_database_is_a_one_line_error(tmp_path: Path, cli: Any) -> None:
    """Every reading command on a missing database says so in one line, exits 1, creates nothing."""
    db = str(tmp_path / "none.db")
    for cmd in (["logs"], ["logs", "show", "abc"], ["sessions", "list"], ["stats"], ["db", "vacuum"],
                ["db", "prune", "--older-than", "1d"], ["sessions", "cleanup"]):
        code, out, err = await cli(*cmd, "--db", db)
        assert (code, out) == (1, ""), cmd
        assert err.startswith("provider-router: no database at") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


async def test_reading_commands_need_only_the_database_section(filled: Filled, tmp_path: Path, cli: Any) -> None:
    """A second terminal without the daemon's secrets exported still reads the log: the
    reading commands take `database.path` from the config and do not check the rest
    (a client key whose variable is unset here); `serve` still refuses that config."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"database: {{path: '{filled.db}'}}\n"
        "providers: [{name: echo, type: echo}]\nmodels: [{name: echo, provider: echo}]\n"
        "auth: {client_keys: [{name: alice, key: '${PR_TEST_UNSET_KEY}'}]}\n"
    )
    for cmd in (["logs", "-n", "1"], ["sessions", "list"], ["stats"], ["db", "path"]):
        code, out, err = await cli(*cmd, "--config", str(config))
        assert code == 0 and out and not err, cmd
    code, _, err = await cli("serve", "--config", str(config))
    assert code == 2 and "auth.client_keys[0].key" in err


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
COUNTED = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens")


async def test_stats_json_matches_the_rows(filled: Filled, cli: Any) -> None:
    """`stats --json` counts as the rows say per (model, provider); percentiles lie in the rows' buckets."""
    code, out, _ = await cli("stats", "--db", filled.db, "--json")
    assert code == 0
    st = json.loads(out)
    want: dict[tuple[Any, Any], dict[str, int]] = {}
    for r in filled.rows:
        g = want.setdefault((r["model"], r["provider"]), dict.fromkeys(COUNTED, 0))
        g["requests"] += 1
        g["errors"] += r["outcome"] != "ok"
        for k in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            g[k] += r[k] or 0
    got = {(g["model"], g["provider"]): {k: g[k] for k in COUNTED} for g in st["groups"]}
    assert got == want
    assert want[("echo", "echo")]["requests"] == 4 and want[("no-such-model", None)]["errors"] == 1
    echo = next(g for g in st["groups"] if g["model"] == "echo")
    durations = sorted(r["duration_ms"] for r in filled.rows if r["model"] == "echo")
    # Roll-ups keep latency histograms, not the values: percentiles are bucket estimates.
    lowest, highest = bucket(durations[0]), bucket(durations[-1])
    floor = 0 if lowest == 0 else BUCKETS_MS[lowest - 1]
    ceiling = BUCKETS_MS[highest] if highest < len(BUCKETS_MS) else float("inf")
    assert floor <= echo["duration_p50_ms"] <= echo["duration_p95_ms"] <= ceiling
    assert echo["duration_mean_ms"] == pytest.approx(sum(durations) / len(durations), abs=0.01)
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


async def test_prune_deletes_old_rows_their_messages_and_index(filled: Filled, cli: Any) -> None:
    """`db prune` deletes old rows in batches, then unused messages and their index terms; logging goes on."""
    [messages] = await filled.proxy.rows("SELECT count(*) AS n FROM messages")
    code, out, err = await cli("db", "prune", "--db", filled.db, "--older-than", "1d")
    assert code == 0 and out.startswith("deleted 0 request(s)") and "and 0 message(s)" in out
    code, out, err = await cli("db", "prune", "--db", filled.db, "--older-than", "0d", "--batch", "2")
    assert code == 0 and out.startswith("deleted 5 request(s)")
    assert f"and {messages['n']} message(s)" in out
    assert "deleted 2 requests so far" in err and "deleted 4 requests so far" in err
    db = sqlite3.connect(filled.db)
    try:
        assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        # Contentless FTS: count its index terms, as it has no rows of its own to count.
        db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, messages_fts, 'row')")
        assert db.execute("SELECT count(*) FROM temp.vocab").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'echo'").fetchone()[0] == 0
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


def test_every_command_has_useful_help() -> None:
    """Every inspection command describes itself, its arguments and each option, with an example epilog."""

    def leaves(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
        out = [(path, command)]
        for name, sub in getattr(command, "commands", {}).items():
            out += leaves(sub, path + [name])
        return out

    commands = [(p, c) for p, c in leaves(root, []) if p and p[0] in ("logs", "sessions", "stats", "db")]
    assert len(commands) == 13  # sessions refresh joined in issue 17
    runner = CliRunner()
    for path, command in commands:
        assert command.help and "example" in (command.epilog or ""), path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, (path, param.name)
            else:  # an argument: the description says what it takes
                assert param.human_readable_name in command.help, (path, param.name)
        result = runner.invoke(root, [*path, "--help"])
        assert result.exit_code == 0 and "example" in result.stdout, path


async def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, cli: Any) -> None:
    """A bad option value, a missing argument or an unknown command: one line naming it, exit 2."""
    db = str(tmp_path / "none.db")
    for args, says in (
        (["logs", "--since", "yesterdayish"], "--since"),
        (["logs", "-n", "-1"], "--limit"),
        (["db", "prune", "--older-than", "1d", "--batch", "0"], "--batch"),
        (["db", "prune"], "--older-than"),
        (["logs", "show"], "ID"),
        (["sessions", "show", "x", "--json", "--tree"], "--tree"),
        (["nope"], "nope"),
    ):
        code, out, err = await cli(*args, "--db", db)
        assert (code, out) == (2, ""), args
        assert err.startswith("provider-router") and says in err and err.count("\n") == 1, (args, err)
    assert list(tmp_path.iterdir()) == []


async def test_shared_options_count_before_or_after_the_subcommand(filled: Filled, tmp_path: Path, cli: Any) -> None:
    """`--db` and `--json` given to `logs` carry over to `logs show`; given to both, the later wins."""
    b2 = filled.row("b2")["id"]
    code, out, _ = await cli("logs", "--db", filled.db, "--json", "show", b2)
    assert code == 0 and json.loads(out)["id"] == b2
    code, out, _ = await cli("logs", "--db", str(tmp_path / "none.db"), "show", b2, "--db", filled.db)
    assert code == 0 and out.startswith(f"request {b2}")


# -- sessions --------------------------------------------------------------------------
async def converse(
    proxy: Proxy, model: str, *turns: str, history: list[dict[str, Any]] | None = None, key: str = "no-key"
) -> list[dict[str, Any]]:
    """Send each user turn after the history so far (and the replies got); the history."""
    history, sdk = list(history or []), proxy.sdk(key)
    for text in turns:
        history.append({"role": "user", "content": text})
        reply = await sdk.chat.completions.create(model=model, messages=history)
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    return history


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
        requests = await filled.proxy.rows("SELECT * FROM request_log WHERE session_id = ? ORDER BY id", s["id"])
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
            assert f"reply {r['reply_id']}" in out  # a stateless upstream: its reply id, no upstream chat
            assert f"user: {r['prompt_text'].splitlines()[0]}" in out
            assert f"assistant: {r['response_text'].splitlines()[0]}" in out
        assert "(new chat)" not in out and " chat " not in out
        assert await ids_for(cli, db, "--session", s["id"]) == [r["id"] for r in requests]
    assert conversations == 2  # a1 -> a2 and b1 -> b2 each continued their session
    code, out, err = await cli("sessions", "show", sessions[0]["id"][:4], "--db", db)
    assert (code, out) == (1, "") and "ambiguous" in err
    # Nothing has expired yet (the default timeout is 30 minutes).
    assert await cli("sessions", "cleanup", "--db", db) == (0, "marked 0 session(s) expired\n", "")


async def test_sessions_delete_cleanup_and_prune(make_proxy: ProxyFactory, qwen_fake: QwenFake, cli: Any) -> None:
    """`sessions delete` drops a session and its turns, not its rows; `cleanup` expires; `prune` deletes."""
    proxy = await make_proxy(qwen_config(qwen_fake.base_url, timeout_minutes=0.01))  # type: ignore[attr-defined]
    await fill(proxy)
    await converse(proxy, "qwen-max", "first turn", "second turn")  # a threaded upstream keeps turns
    sessions = await _sessions_or_skip(proxy)
    db = str(proxy.db_path)
    [victim] = [s["id"] for s in sessions if s["provider"] == "qwen"]
    turns = len(await proxy.rows("SELECT * FROM turns WHERE session_id = ?", victim))
    kept = len(await proxy.rows("SELECT id FROM requests WHERE session_id = ?", victim))
    assert turns and kept
    # A threaded upstream's turns: its chat, and each turn's parent -> reply in it.
    code, out, _ = await cli("sessions", "show", victim, "--db", db)
    threaded = await proxy.rows("SELECT chat_id, parent_id, reply_id FROM requests WHERE session_id = ? ORDER BY rowid", victim)
    assert code == 0 and threaded[0]["parent_id"] is None and threaded[1]["parent_id"] == threaded[0]["reply_id"]
    assert f"chat {threaded[0]['chat_id']}  (new chat) -> {threaded[0]['reply_id']}" in out
    assert f"chat {threaded[1]['chat_id']}  {threaded[0]['reply_id']} -> {threaded[1]['reply_id']}" in out
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
    await until(lambda: iso(time.time()) > latest, "the sessions' expiry to pass")
    active = await proxy.rows("SELECT id FROM sessions WHERE state = 'active'")
    code, out, _ = await cli("sessions", "cleanup", "--db", db)
    marked = re.fullmatch(r"marked (\d+) session\(s\) expired\n", out)
    # The daemon's own expiry pass may have ended some of them in between: never more.
    assert code == 0 and marked is not None and int(marked.group(1)) <= len(active)
    left = await proxy.rows("SELECT state, metadata FROM sessions")
    assert left and {r["state"] for r in left} == {"expired"}
    assert all(json.loads(r["metadata"])["ended"] for r in left)
    code, out, _ = await cli("stats", "--db", db, "--json")
    assert json.loads(out)["sessions"] == {"active": 0, "expired": len(left), "total": len(left)}

    code, out, _ = await cli("db", "prune", "--db", db, "--older-than", "0d")
    assert f"and {len(left)} expired session(s)" in out
    assert await proxy.rows("SELECT * FROM sessions") == []
    assert await proxy.rows("SELECT * FROM turns") == []


# -- an agent's conversation: tool calls, branches, clients --------------------------------
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city, as the national weather service reports it.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name, e.g. Paris"},
                           "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class AgentUpstream:
    """A strict OpenAI-compatible upstream on loopback for agent traffic: a user turn, when
    tools are offered, is answered by a `get_weather` call (its arguments streamed in pieces);
    a tool result by a reply with reasoning and cached prompt tokens; anything else by a
    numbered answer (`n` of them when asked, not streamed), so a regenerate gets a reply of
    its own. Like the real API it checks the key and refuses a tool result that answers no
    earlier call."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.answered = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response({"error": {"message": "Incorrect API key provided."}}, status=401)
        body = await request.json()
        messages = body["messages"]
        called = {tc["id"] for m in messages for tc in m.get("tool_calls") or ()}
        if any(m["role"] == "tool" and m.get("tool_call_id") not in called for m in messages):
            return web.json_response({"error": {"message": "tool message answers no tool call"}}, status=400)
        self.answered += 1
        last = messages[-1]
        usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
        if last["role"] == "tool":
            message = {"role": "assistant", "content": f"It is {last['content']}.", "reasoning_content": "The tool said so."}
            usage["prompt_tokens_details"] = {"cached_tokens": 16}
            finish = "stop"
        elif body.get("tools"):
            call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": f"answer {self.answered} to: {last['content']}"}, "stop"
        head = {"id": f"chatcmpl-{self.answered}", "created": 1700000000, "model": body["model"]}
        if not body.get("stream"):
            choices = [{"index": 0, "message": message, "finish_reason": finish}]
            for i in range(1, body.get("n") or 1):
                other = {**message, "content": f"{message['content']} (choice {i + 1})"}
                choices.append({"index": i, "message": other, "finish_reason": finish})
            return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": message["content"]}]
        for tc in message.get("tool_calls") or ():
            args = tc["function"]["arguments"]
            deltas.append({"tool_calls": [{"index": 0, "id": tc["id"], "type": "function",
                                           "function": {"name": tc["function"]["name"], "arguments": args[:5]}}]})
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": args[5:]}}]})
        events = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
        events.append({"index": 0, "delta": {}, "finish_reason": finish})
        chunk = {**head, "object": "chat.completion.chunk"}
        for choice in events:
            await resp.write(b"data: " + json.dumps({**chunk, "choices": [choice]}).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps({**chunk, "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def agent(make_proxy: ProxyFactory, aiohttp_server: Any) -> Proxy:
    """A proxy routing `gpt-*` to an `AgentUpstream`, with two client keys: alice and bob."""
    server = await aiohttp_server(AgentUpstream().app)
    cfg = base_config(str(server.make_url("/v1")))
    cfg["auth"] = {"client_keys": [{"name": "alice", "key": "sk-alice"}, {"name": "bob", "key": "sk-bob"}]}
    return await make_proxy(cfg)


async def test_logs_show_transcript_has_tool_calls_and_results(agent: Proxy, cli: Any) -> None:
    """`logs show` prints tool calls, tool results by call id, and the reply's reasoning, finish and cache."""
    sdk = agent.sdk("sk-alice")
    stream = await sdk.chat.completions.create(
        model="gpt-agent", messages=ASK_WEATHER, tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True}
    )
    [_ async for _ in stream]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
    ]
    await sdk.chat.completions.create(model="gpt-agent", messages=history, tools=[WEATHER_TOOL])
    first, second = await agent.rows()
    db = str(agent.db_path)

    code, out, _ = await cli("logs", "show", first["id"], "--db", db)
    assert code == 0
    reply = out.split("-- reply")[1]
    assert 'assistant: -> get_weather({"city": "Paris"}) [call_1]' in reply  # assembled from pieces
    assert "finish: tool_calls" in reply

    code, out, _ = await cli("logs", "show", second["id"], "--db", db)
    request, reply = out.split("-- request")[1].split("-- reply")
    assert "user: What is the weather in Paris?" in request
    assert 'assistant: -> get_weather({"city": "Paris"}) [call_1]' in request
    assert "tool [call_1]: 18C and sunny" in request
    assert "get_weather" in request.split("params: ")[1]  # the tools list, stored once, rebuilt
    assert "reasoning: The tool said so." in reply and "assistant: It is 18C and sunny." in reply
    assert "finish: stop" in reply
    assert "cached 16" in out


async def test_logs_show_json_is_the_body_and_the_assembled_tool_call(agent: Proxy, cli: Any) -> None:
    """`logs show --json` has the request as sent (tools too) and the streamed tool call assembled whole."""
    stream = await agent.sdk("sk-bob").chat.completions.create(
        model="gpt-agent", messages=ASK_WEATHER, tools=[WEATHER_TOOL], stream=True
    )
    [_ async for _ in stream]
    [row] = await agent.rows()
    code, out, _ = await cli("logs", "show", row["id"], "--db", str(agent.db_path), "--json")
    shown = json.loads(out)
    assert shown["request"] == {"model": "gpt-agent", "messages": ASK_WEATHER, "tools": [WEATHER_TOOL], "stream": True}
    [choice] = shown["response"]["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "call_1" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


async def test_logs_client_filter(agent: Proxy, cli: Any) -> None:
    """`logs --client NAME` shows only the requests made with that client key."""
    for key, text in (("sk-alice", "from alice"), ("sk-bob", "from bob"), ("sk-alice", "alice again")):
        await agent.sdk(key).chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": text}])
    rows = await agent.rows()
    db = str(agent.db_path)
    assert await ids_for(cli, db, "--client", "alice") == [r["id"] for r in rows if r["client"] == "alice"]
    assert await ids_for(cli, db, "--client", "bob") == [rows[1]["id"]]
    assert await ids_for(cli, db, "--client", "carol") == []
    code, out, _ = await cli("logs", "--db", db, "--client", "bob")
    assert code == 0 and "from bob" in out and "alice" not in out


def tree_lines(out: str) -> list[str]:
    """The tree of `sessions show --tree`, without its one-line heading."""
    head, *lines = out.splitlines()
    assert head.startswith("session ")
    return lines


async def test_sessions_tree_shows_each_branch_once_side_by_side(agent: Proxy, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--tree` draws a regenerate and an edit each once, as siblings, each reply with turn and request id."""
    monkeypatch.setenv("COLUMNS", "100")
    history = await converse(agent, "gpt-x", "u1", "u2", key="sk-alice")
    await agent.sdk("sk-alice").chat.completions.create(model="gpt-x", messages=history[:3])  # regenerate
    await converse(agent, "gpt-x", "u3", history=history, key="sk-alice")  # continue the first reply
    await converse(agent, "gpt-x", "u2 edited", history=history[:2], key="sk-alice")  # go back, edit
    r1, r2, r3, r4, r5 = rows = await agent.rows()
    [session] = {r["session_id"] for r in rows}
    code, out, _ = await cli("sessions", "show", session[:12], "--tree", "--db", str(agent.db_path))
    assert code == 0 and "2 branch point(s)" in out.splitlines()[0]
    want = [
        ("user", "u1", None), ("assistant", r1["response_text"], r1),
        ("├─ user", "u2 edited", None), ("│  assistant", r5["response_text"], r5),
        ("└─ user", "u2", None),
        ("   ├─ assistant", r3["response_text"], r3),
        ("   └─ assistant", r2["response_text"], r2), ("      user", "u3", None), ("      assistant", r4["response_text"], r4),
    ]
    lines = tree_lines(out)
    assert len(lines) == len(want) and all(len(line) <= 100 for line in lines)
    for line, (guide, text, row) in zip(lines, want):
        assert line.startswith(f"{guide}: {text}"), line
        assert (f"[turn {row['turn']} {row['id'][:16]}]" in line) if row else "[turn" not in line, line
    assert r2["response_text"] != r3["response_text"]  # the regenerate got a reply of its own


async def test_sessions_tree_marks_where_the_threaded_upstream_continues(qproxy: Proxy, cli: Any) -> None:
    """On a threaded upstream each reply in `--tree` names its upstream chat and reply id; the tip is marked."""
    await converse(qproxy, "qwen-max", "q one", "q two")
    [session] = await qproxy.rows("SELECT * FROM sessions")
    turns = await qproxy.rows("SELECT * FROM turns ORDER BY turn")
    code, out, _ = await cli("sessions", "show", session["id"], "--tree", "--db", str(qproxy.db_path))
    assert code == 0
    user1, reply1, user2, reply2 = tree_lines(out)
    assert "⇢" not in user1 + user2
    for line, turn in zip((reply1, reply2), turns):
        assert f"⇢ chat {turn['chat_id'][:8]}… reply {turn['reply_id'][:8]}…" in line
    assert "session tip" in reply2 and "session tip" not in reply1


async def test_sessions_tree_of_a_long_conversation(make_proxy: ProxyFactory, cli: Any) -> None:
    """A long conversation draws as one column at the margin, every turn once, in order."""
    proxy = await make_proxy(base_config())
    # 40 turns: the SDK's own time per request grows with the history (the proxy's barely).
    await converse(proxy, "echo", *(f"question {i}" for i in range(1, 41)))
    [session] = await proxy.rows("SELECT * FROM sessions")
    code, out, _ = await cli("sessions", "show", session["id"], "--tree", "--db", str(proxy.db_path))
    assert code == 0 and "40 request(s), 80 message(s) in the tree, 0 branch point(s)" in out
    lines = tree_lines(out)
    assert [line.split(":")[0] for line in lines] == ["user", "assistant"] * 40
    assert [line.split("[turn ")[1].split()[0] for line in lines[1::2]] == [str(i) for i in range(1, 41)]


async def test_two_choices_show_apart_in_the_transcript_and_the_tree(agent: Proxy, cli: Any) -> None:
    """An n=2 request shows two replies in `logs show`, and two sibling replies of it in `--tree`."""
    history = await converse(agent, "gpt-x", "pick one", key="sk-bob")
    history.append({"role": "user", "content": "two options please"})
    got = await agent.sdk("sk-bob").chat.completions.create(model="gpt-x", messages=history, n=2)
    first, second = (c.message.content for c in got.choices)
    _, row = await agent.rows()
    db = str(agent.db_path)
    code, out, _ = await cli("logs", "show", row["id"], "--db", db)
    assert code == 0
    assert "-- reply 1 of 2" in out and "-- reply 2 of 2" in out
    assert out.index(f"assistant: {first}") < out.index("-- reply 2 of 2") < out.index(f"assistant: {second}")
    code, out, _ = await cli("sessions", "show", row["session_id"], "--tree", "--db", db)
    *_, user, choice1, choice2 = tree_lines(out)
    assert user.startswith("user: two options please")
    assert choice1.startswith(f"├─ assistant: {first}") and choice2.startswith(f"└─ assistant: {second}")
    assert all(f"[turn 2 {row['id'][:16]}]" in line for line in (choice1, choice2))


async def test_sessions_tree_marks_a_turn_that_got_no_reply(agent: Proxy, cli: Any) -> None:
    """A failed request marks, in `--tree`, the message it ended on with its turn, id and status."""
    history = await converse(agent, "gpt-x", "u1", "u2", key="sk-alice")
    with pytest.raises(openai.BadRequestError):  # a tool result that answers no call: the upstream refuses
        await agent.sdk("sk-alice").chat.completions.create(
            model="gpt-x", messages=history + [{"role": "tool", "tool_call_id": "nope", "content": "stray"}]
        )
    *_, failed = await agent.rows()
    code, out, _ = await cli("sessions", "show", failed["session_id"], "--tree", "--db", str(agent.db_path))
    assert code == 0
    assert tree_lines(out)[-1] == f"tool [nope]: stray  [turn 3 {failed['id'][:16]} 400 upstream_error]"


def test_wide_characters_keep_the_columns_aligned() -> None:
    """Chinese or Japanese text takes two terminal columns a character: the log table cuts
    and pads by columns, so every line is as wide and each column starts where its header does."""
    from provider_router.cli.log_table import LogTable
    from provider_router.cli.output import cells

    rows = [
        {"id": f"01a23c6a0245{i:04x}", "received_at": "2026-12-03T15:00:00.000Z", "model": "qwen-max", "provider": "qwen",
         "status": 200, "outcome": "ok", "prompt_text": prompt, "response_text": reply}
        for i, (prompt, reply) in enumerate([("你好，请介绍一下代理服务器", "代理服务器是一种中间服务器"), ("hello there", "echo: hello")])
    ]  # fmt: skip
    table = LogTable(rows, width=100)
    lines = [table.header(), *(table.line(r) for r in rows)]
    assert "你好" in lines[1] and "…" in lines[1]  # cut to fit, marked

    def column_of(line: str, text: str) -> int:
        return cells(line[: line.index(text)])

    assert column_of(lines[1], "代理服务器是") == column_of(lines[2], "echo: hello") == column_of(lines[0], "REPLY")
    assert max(cells(x) for x in lines) <= 100
