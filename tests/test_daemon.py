"""The daemon as users run it: a real process, started from the CLI, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, db: Path) -> None:
        self.proc, self.port, self.db = proc, port, db
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[dict] = []

    async def read_until(self, event: str) -> dict:
        """Read JSON log lines from stderr until one has `event` (bounded by a timeout)."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(30):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"daemon exited before {event!r}: {self.lines}")
                line = json.loads(raw)
                self.lines.append(line)
                if line.get("event") == event:
                    return line


async def start_daemon(tmp_path: Path, *args: str, config: Path | None = None) -> Daemon:
    port = free_port()
    db = tmp_path / "daemon.db"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "provider_router", "serve",
        "--config", str(config or ROOT / "config.yaml"), "--port", str(port), "--db", str(db), *args,
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=tmp_path, env=env,
    )
    d = Daemon(proc, port, db)
    await d.read_until("listening")
    return d


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path)
    yield d
    if d.proc.returncode is None:
        d.proc.kill()
        await d.proc.wait()


async def test_readme_request_is_answered_and_counted(daemon: Daemon) -> None:
    """The README's curl request (form content type, as `curl -d` sends) answers from the
    shipped config with no keys, and the row is in the database after SIGTERM."""
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{daemon.url}/v1/chat/completions",
            data=b'{"model":"echo","messages":[{"role":"user","content":"hi"}]}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as r:
            assert r.status == 200
            body = await r.json()
    assert body["choices"][0]["message"]["content"].endswith(": hi")
    line = await daemon.read_until("request")
    assert {"request_id", "model", "provider", "status", "outcome", "ttfb_ms", "duration_ms"} <= set(line)
    assert (line["model"], line["status"], line["outcome"]) == ("echo", 200, "ok")
    daemon.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await daemon.proc.wait() == 0
    db = sqlite3.connect(daemon.db)
    assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 1
    assert db.execute("SELECT id FROM requests").fetchone()[0] == line["request_id"]


def test_cli_help_and_config_errors(tmp_path: Path) -> None:
    """`--help` works through both entry points; a bad config exits 2 naming the key."""
    for cmd in ([sys.executable, "-m", "provider_router", "serve", "--help"], [str(Path(sys.executable).parent / "provider-router"), "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [{name: e, type: echo, colour: red}]\n")
    out = subprocess.run(
        [sys.executable, "-m", "provider_router", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "providers[0].colour" in out.stderr


def test_refuses_public_address_without_client_keys(tmp_path: Path) -> None:
    """Listening beyond loopback with no client keys is refused unless --insecure-no-auth."""
    out = subprocess.run(
        [sys.executable, "-m", "provider_router", "serve", "--config", str(ROOT / "config.yaml"), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 2 and "--insecure-no-auth" in out.stderr
