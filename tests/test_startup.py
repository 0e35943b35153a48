"""Start-up failures of a real daemon: exit status 1 (2 for a bad config) with one line
that says what failed, where, and what to do; a traceback only at `--log-level debug`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provider_router.store import connect
from tests.test_health import small_tmpfs

ECHO = "providers: [{name: echo, type: echo}]\nmodels: [{name: echo, provider: echo}]\n"


def serve(tmp_path: Path, *args: str, config: str = ECHO, db: Path | None = None) -> tuple[int, list[str]]:
    """Run `serve` until it exits (bounded); its status and stderr lines."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config)
    cmd = [sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--db", str(db or tmp_path / "d.db")]
    if "--port" not in args:
        cmd += ["--port", "0"]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    return out.returncode, out.stderr.splitlines()


def the_failure(lines: list[str]) -> dict[str, Any]:
    """The one `startup_failed` line, checked to be the only line and free of tracebacks."""
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["event"] == "startup_failed" and {"what", "where", "hint"} <= set(line)
    assert "exception" not in line and "Traceback" not in lines[0]
    return line


def test_port_in_use(tmp_path: Path) -> None:
    """A port another socket listens on: exit 1, one line naming the address and what to
    do, and no mark left saying a daemon serves the database."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        status, lines = serve(tmp_path, "--port", str(port))
    line = the_failure(lines)
    assert status == 1 and line["what"] == "the port is in use" and line["where"] == f"127.0.0.1:{port}"
    assert "--port" in line["hint"]
    assert not list(tmp_path.glob("*.daemon"))  # nothing left behind claiming the database


def test_address_not_available(tmp_path: Path) -> None:
    """An address that is not this machine's (TEST-NET-1): exit 1, one line saying so."""
    status, lines = serve(tmp_path, "--host", "192.0.2.1", "--insecure-no-auth")
    line = the_failure(lines)
    assert status == 1 and "not one of this machine's" in line["what"] and line["where"].startswith("192.0.2.1:")


def test_traceback_only_at_debug(tmp_path: Path) -> None:
    """`--log-level debug` adds the traceback to the failure line."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        status, lines = serve(tmp_path, "--port", str(other.getsockname()[1]), "--log-level", "debug")
    failure = [json.loads(x) for x in lines if '"startup_failed"' in x]
    assert status == 1 and len(failure) == 1 and failure[0]["exception"]


def test_database_locked_by_another_process(tmp_path: Path) -> None:
    """A database another connection holds in a write transaction (BEGIN EXCLUSIVE):
    after a short wait, exit 1 with one line saying who to ask."""
    db = tmp_path / "locked.db"
    asyncio.run(_migrated(db))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        status, lines = serve(tmp_path, db=db)
    finally:
        holder.close()
    line = the_failure(lines)
    assert status == 1 and "locked by another process" in line["what"] and line["where"] == str(db)


async def _migrated(db: Path) -> None:
    conn = await connect(db)
    await conn.close()


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite at the database path: exit 1, one line, the file untouched."""
    db = tmp_path / "notes.db"
    db.write_bytes(b"these are my notes, not a database\n" * 200)
    status, lines = serve(tmp_path, db=db)
    line = the_failure(lines)
    assert status == 1 and "not a SQLite database" in line["what"] and line["where"] == str(db)
    assert db.read_bytes() == b"these are my notes, not a database\n" * 200


def test_database_path_is_a_directory(tmp_path: Path) -> None:
    """`--db` naming a directory: exit 1, one line saying so and how to name a file (not
    "make the directory writable")."""
    (tmp_path / "logs").mkdir()
    status, lines = serve(tmp_path, db=tmp_path / "logs")
    line = the_failure(lines)
    assert status == 1 and line["what"] == "the log database path is a directory" and "file name" in line["hint"]
    assert list((tmp_path / "logs").iterdir()) == []


def test_database_directory_cannot_be_created(tmp_path: Path) -> None:
    """A database path under a regular file (no directory can be made there, even as
    root): exit 1, one line naming the path."""
    (tmp_path / "file").write_text("x")
    status, lines = serve(tmp_path, db=tmp_path / "file" / "sub" / "d.db")
    line = the_failure(lines)
    assert status == 1 and "cannot create the log database" in line["what"] and "file" in line["where"]


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("sessions: {cleanup_interval_minutes: 0}", "sessions.cleanup_interval_minutes"),
        ("logs: {level: verbose}", "logs.level"),
    ],
)
def test_a_bad_setting_stops_start_up_naming_the_key(tmp_path: Path, setting: str, key: str) -> None:
    """A setting out of range stops start-up with status 2 and one line naming the key."""
    status, lines = serve(tmp_path, config=ECHO + setting + "\n")
    assert status == 2 and len(lines) == 1 and key in lines[0]
    assert not (tmp_path / "d.db").exists()



def test_database_directory_read_only(tmp_path: Path) -> None:
    """A read-only file system where the database goes (refuses even root): exit 1 with
    one line, no warning about the daemon's mark before it."""
    with small_tmpfs(tmp_path / "ro", "1m", read_only=True) as fs:
        status, lines = serve(tmp_path, db=fs / "d.db")
    line = the_failure(lines)
    assert status == 1 and "Read-only file system" in line["what"] and line["where"].endswith("d.db")
