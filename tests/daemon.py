"""The daemon as users run it, for tests: `provider-router serve` in a subprocess on a free
loopback port, its JSON log lines in a file that tests wait on and scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from tests.waiting import until

WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """`provider-router serve` in a subprocess; its stderr (JSON log lines) goes to a file, so
    a busy daemon never blocks on a full pipe and every byte it logged can be scanned."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, db: Path, log: Path) -> None:
        self.proc, self.port, self.db, self.log = proc, port, db, log
        self.url = f"http://127.0.0.1:{port}"

    @classmethod
    async def start(
        cls, tmp_path: Path, config: str, *args: str, env: dict[str, str] | None = None, db: Path | str | None = None
    ) -> Daemon:
        port = free_port()
        cfg = tmp_path / f"config-{port}.yaml"
        cfg.write_text(config)
        db = db or tmp_path / "daemon.db"
        log = tmp_path / f"daemon-{port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")} | (env or {})
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "provider_router", "serve", "--config", str(cfg), "--port", str(port),
                "--db", str(db), *args,
                stdout=subprocess.DEVNULL, stderr=out, cwd=tmp_path, env=full_env,
            )
        d = cls(proc, port, db, log)
        try:
            await d.wait_log("listening")
        except BaseException:  # never ready: not left running after the test
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        return d

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_bytes().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue  # a line being written, or stdlib logging's plain text
        return out

    async def wait_log(self, event: str) -> dict[str, Any]:
        """The first log line with `event`, as the daemon writes it to its log file."""

        def found() -> dict[str, Any] | None:
            line = next((x for x in self.lines() if x.get("event") == event), None)
            if line is None and self.proc.returncode is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {event!r}: {self.log.read_text()[-2000:]}")
            return line

        return await until(found, f"log line {event!r}", WAIT)

    async def stop(self) -> int:
        """SIGTERM, then wait for a clean exit (the writer flushes everything queued)."""
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            return await self.proc.wait()


def ro_query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the daemon's database read-only, as an inspector would while it runs."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def wait_rows(db: Path, n: int) -> int:
    """The count of `requests` rows once it is at least `n` (the log writer process writes them)."""

    def count() -> int | None:
        try:
            found = int(ro_query(db, "SELECT count(*) FROM requests")[0][0])
        except sqlite3.OperationalError:  # not created yet, or busy
            return None
        return found if found >= n else None

    return await until(count, f"{n} request rows", WAIT)


Spawn = Callable[..., Awaitable[Daemon]]


@contextlib.asynccontextmanager
async def daemons(tmp_path: Path) -> AsyncIterator[Spawn]:
    """A factory of daemons; any still running at the end are killed."""
    started: list[Daemon] = []

    async def factory(config: str, *args: str, **kw: Any) -> Daemon:
        d = await Daemon.start(tmp_path, config, *args, **kw)
        started.append(d)
        return d

    try:
        yield factory
    finally:
        for d in started:
            if d.proc.returncode is None:
                d.proc.kill()
                await d.proc.wait()


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start daemons with `await spawn(config_text, *cli_args)`; killed at the end if running."""
    async with daemons(tmp_path) as factory:
        yield factory


