"""The running daemon's mark next to its database (`store.presence`), and the session edits
of the CLI that it steers: through a live daemon's admin API, never behind its back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
import yaml

from provider_router.cli.admin import Admin, daemon_admin
from provider_router.cli.common import CliError, Settings
from provider_router.serve import local_url
from provider_router.store.presence import Presence, hold, mark_path, serving
from provider_router.records import iso
from tests.daemon import WAIT, Daemon, Spawn, ro_query
from tests import waiting

ADMIN = "admin-key-for-the-cli-test"
URL = "http://127.0.0.1:8080"


# -- the mark ------------------------------------------------------------------------------
def held(db: Path, url: str) -> Presence | None:
    mark = hold(db)
    if mark is not None:
        mark.serve_at(url)
    return mark


def test_held_mark_names_the_daemon_until_released(tmp_path: Path) -> None:
    """Held: `serving` (its own open file description, so flock conflicts even in this one
    process) names the holder; the file is private. Released: gone, and nothing serves."""
    db = tmp_path / "x.db"
    mark = held(db, URL)
    assert mark is not None
    assert serving(db) == {"pid": os.getpid(), "url": URL, "uid": os.getuid()}
    assert os.stat(mark_path(db)).st_mode & 0o777 == 0o600
    mark.release()
    assert serving(db) is None
    assert not os.path.exists(mark_path(db))


def test_a_stale_mark_is_free_and_taken_over(tmp_path: Path) -> None:
    """A killed daemon's file (JSON, nobody holding the lock) serves nothing; the next
    daemon takes it over and rewrites it whole."""
    db = tmp_path / "x.db"
    Path(mark_path(db)).write_text('{"pid": 999999, "url": "http://127.0.0.1:1", "padding": "' + "x" * 200 + '"}')
    assert serving(db) is None
    mark = held(db, URL)
    assert mark is not None
    assert serving(db) == {"pid": os.getpid(), "url": URL, "uid": os.getuid()}
    mark.release()


def test_a_second_holder_is_refused(tmp_path: Path) -> None:
    """While one daemon holds the mark another gets None, and the first is still named;
    once released, the mark can be held again."""
    db = tmp_path / "x.db"
    first = held(db, URL)
    assert first is not None
    assert hold(db) is None
    assert serving(db) == {"pid": os.getpid(), "url": URL, "uid": os.getuid()}
    first.release()
    again = held(db, "http://127.0.0.1:9")
    assert again is not None and serving(db) == {"pid": os.getpid(), "url": "http://127.0.0.1:9", "uid": os.getuid()}
    again.release()


def test_missing_or_garbled_marks_never_raise(tmp_path: Path) -> None:
    """No file: nothing serves. A held mark whose text does not parse still says a daemon is
    there (the CLI must not edit behind it), just not where."""
    db = tmp_path / "x.db"
    assert serving(db) is None
    assert serving(tmp_path / "no-such-dir" / "x.db") is None
    Path(mark_path(db)).write_bytes(b"\xff not json")
    assert serving(db) is None  # garbled and free
    mark = held(db, URL)
    assert mark is not None
    os.pwrite(mark.fd, b"\xff{garbled", 0)
    assert serving(db) == {"pid": None, "url": None, "uid": os.getuid()}
    mark.release()


def test_the_admin_key_goes_only_to_a_mark_of_our_own(tmp_path: Path) -> None:
    """A mark of our own daemon is asked with auth.admin_key of --config; a mark another user
    could have planted (its owner is not us) gets no admin key."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"auth": {"admin_key": ADMIN}}))
    db = tmp_path / "x.db"
    mark = held(db, URL)
    assert mark is not None
    try:
        admin = daemon_admin(Settings(config=str(cfg)), db)
        assert admin is not None and (admin.url, admin.key) == (URL, ADMIN)
    finally:
        mark.release()
    assert daemon_admin(Settings(config=str(cfg)), db) is None
    theirs = {"pid": 1, "url": URL, "uid": os.getuid() + 1}
    with pytest.raises(CliError, match="another user"):
        Admin.of(theirs, db, ADMIN)


def test_local_url() -> None:
    """The URL a CLI on this machine reaches the daemon at, from the host it listens on."""
    assert local_url("0.0.0.0", 8) == "http://127.0.0.1:8"
    assert local_url("localhost", 8) == "http://127.0.0.1:8"
    assert local_url("127.0.0.1", 8) == "http://127.0.0.1:8"
    assert local_url("::", 8) == "http://[::1]:8"
    assert local_url("::1", 8) == "http://[::1]:8"
    assert local_url("192.0.2.7", 8) == "http://192.0.2.7:8"


# -- the CLI against a real daemon -----------------------------------------------------------
def config(**extra: Any) -> str:
    return yaml.safe_dump(
        {"providers": [{"name": "echo", "type": "echo"}], "models": [{"name": "echo", "provider": "echo"}], **extra}
    )


async def cli(tmp_path: Path, cfg: str, db: Path, *args: str) -> tuple[int, str, str]:
    """`provider-router ARGS --config CFG --db DB` in a subprocess: (status, stdout, stderr)."""
    path = tmp_path / "cli.yaml"
    path.write_text(cfg)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", *args, "--config", str(path), "--db", str(db),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
    )
    async with asyncio.timeout(WAIT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def chat(d: Daemon, text: str) -> tuple[str, str]:
    """A conversation of two requests opening with `text` (one request alone is stored as no
    session): (the second request's id, the session id)."""
    messages = [{"role": "user", "content": text}]
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(f"{d.url}/v1/chat/completions", json={"model": "echo", "messages": messages}) as r:
                assert r.status == 200, await r.text()
                reply = (await r.json())["choices"][0]["message"]
                messages = [*messages, reply, {"role": "user", "content": "go on"}]
        return r.headers["X-Request-Id"], r.headers["X-Session-Id"]


async def until(check: Callable[[], Any]) -> Any:
    """`check()` once truthy, read from the database the daemon's writer process fills
    (busy, or not created yet, counts as not yet)."""

    def read() -> Any:
        try:
            return check()
        except sqlite3.OperationalError:
            return None

    return await waiting.until(read, "the database to say so", WAIT)


def session_ids(db: Path) -> set[str]:
    return {r[0] for r in ro_query(db, "SELECT id FROM sessions")}


def row_session(db: Path, request_id: str) -> str | None:
    rows = ro_query(db, "SELECT session_id FROM requests WHERE id = ?", request_id)
    return rows[0][0] if rows else None


async def test_sessions_delete_goes_through_the_daemon(spawn: Spawn, tmp_path: Path) -> None:
    """With an admin key, `sessions delete` asks the running daemon: the conversation's next
    request starts a new session, and the deleted one is never written back. The mark goes
    when the daemon stops."""
    cfg = config(auth={"admin_key": ADMIN})
    d = await spawn(cfg)
    rid1, sid1 = await chat(d, "remember the alamo")
    await until(lambda: row_session(d.db, rid1) == sid1 and sid1 in session_ids(d.db))

    code, out, err = await cli(tmp_path, cfg, d.db, "sessions", "delete", sid1[:12])
    assert code == 0, err
    assert f"deleted session {sid1} " in out and f"through the running daemon (pid {d.proc.pid})" in out
    assert "its 2 request row(s) are kept" in out

    rid2, sid2 = await chat(d, "remember the alamo")
    assert sid2 != sid1
    # The second request's row and its session are committed: every save of that request is.
    await until(lambda: row_session(d.db, rid2) == sid2 and sid2 in session_ids(d.db))
    assert sid1 not in session_ids(d.db)
    assert row_session(d.db, rid1) == sid1  # the deleted session's request row stays

    assert await d.stop() == 0
    assert not os.path.exists(mark_path(d.db))


async def test_sessions_cleanup_goes_through_the_daemon(spawn: Spawn, tmp_path: Path) -> None:
    """With an admin key, `sessions cleanup` has the daemon expire its sessions past their
    sliding timeout, and prints the daemon's count."""
    cfg = config(auth={"admin_key": ADMIN}, sessions={"timeout_minutes": 0.01})
    d = await spawn(cfg)
    rid, sid = await chat(d, "short lived")
    await until(lambda: row_session(d.db, rid) == sid and sid in session_ids(d.db))
    (expires,) = ro_query(d.db, "SELECT expires_at FROM sessions WHERE id = ?", sid)[0]
    # Wait (bounded, on the condition) until its expiry, as the stored timestamps tell it.
    await until(lambda: iso(time.time()) > expires)

    code, out, err = await cli(tmp_path, cfg, d.db, "sessions", "cleanup")
    assert (code, out) == (0, f"marked 1 session(s) expired through the running daemon (pid {d.proc.pid})\n"), err
    await until(lambda: ro_query(d.db, "SELECT state FROM sessions WHERE id = ?", sid) == [("expired",)])


async def test_without_an_admin_key_the_cli_refuses_to_edit_behind_the_daemon(spawn: Spawn, tmp_path: Path) -> None:
    """No admin key to ask the daemon with: exit 1 naming the daemon, and the file untouched."""
    cfg = config()
    d = await spawn(cfg)
    rid, sid = await chat(d, "keep me")
    await until(lambda: row_session(d.db, rid) == sid and sid in session_ids(d.db))
    for command in (["sessions", "delete", sid], ["sessions", "cleanup"]):
        code, out, err = await cli(tmp_path, cfg, d.db, *command)
        assert (code, out) == (1, ""), command
        assert len(err.splitlines()) == 1
        assert f"pid {d.proc.pid}, {d.url})" in err and "auth.admin_key" in err
    assert ro_query(d.db, "SELECT state FROM sessions WHERE id = ?", sid) == [("active",)]


async def test_a_killed_daemons_mark_is_ignored(spawn: Spawn, tmp_path: Path) -> None:
    """SIGKILL leaves the mark file behind, but not its lock: the CLI edits the file itself."""
    cfg = config(auth={"admin_key": ADMIN})
    d = await spawn(cfg)
    rid, sid = await chat(d, "then the daemon died")
    await until(lambda: row_session(d.db, rid) == sid and sid in session_ids(d.db))
    d.proc.send_signal(signal.SIGKILL)
    await d.proc.wait()
    assert os.path.exists(mark_path(d.db))

    code, out, err = await cli(tmp_path, cfg, d.db, "sessions", "delete", sid)
    assert code == 0, err
    assert f"deleted session {sid} " in out and "daemon" not in out
    assert sid not in session_ids(d.db)


async def test_a_second_daemon_on_the_database_refuses_to_start(spawn: Spawn, tmp_path: Path) -> None:
    """Two daemons on one database would write their own copies of the sessions over each
    other's: the second exits at once, naming the first, and the first's mark stays."""
    first = await spawn(config())
    cfg = tmp_path / "second.yaml"
    cfg.write_text(config())
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--db", str(first.db), "--port", "0",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    async with asyncio.timeout(WAIT):
        _, err = await second.communicate()
    assert second.returncode == 1
    assert b"database_in_use" in err and str(first.proc.pid).encode() in err and first.url.encode() in err
    assert serving(first.db) == {"pid": first.proc.pid, "url": first.url, "uid": os.getuid()}


async def test_the_mark_names_the_port_the_daemon_picked(tmp_path: Path) -> None:
    """`--port 0` picks a free port: the mark (and the `listening` line) give that one, so
    the CLI reaches the daemon."""
    d = await Daemon.start(tmp_path, config(), "--port", "0")
    try:
        line = await d.wait_log("listening")
        who = serving(d.db)
        assert who is not None and who["url"] is not None and not who["url"].endswith(":0")
        assert line["url"] == who["url"] + "/v1"
        async with aiohttp.ClientSession() as http:
            async with http.get(who["url"] + "/v1/models") as r:
                assert r.status == 200
    finally:
        d.proc.send_signal(signal.SIGTERM)
        await d.proc.wait()


def test_a_mark_held_before_the_daemon_listens_has_no_address(tmp_path: Path) -> None:
    """Held from before the sessions load: the CLI then knows a daemon is there, not where."""
    db = tmp_path / "x.db"
    mark = hold(db)
    assert mark is not None
    assert serving(db) == {"pid": os.getpid(), "url": None, "uid": os.getuid()}
    mark.release()
