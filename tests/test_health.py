"""The log's health on a real daemon: `/health` says 503 with the reason while records
cannot be written (database locked, disk full, file removed or replaced) and 200 again once
they can; a removed or replaced file is reopened; the WAL is truncated when nobody reads.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import pytest

from tests.daemon import WAIT, Daemon, Spawn, ro_query, wait_rows
from tests.waiting import until

ECHO = (
    "providers: [{name: echo, type: echo}]\nmodels: [{name: echo, provider: echo}]\n"
    "database: {check_interval_seconds: 0.1, checkpoint_interval_seconds: 1}\n"
    "auth: {metrics_public: true}\n"
)


def hi(text: str = "hi") -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}]}


async def chat(d: Daemon, text: str = "hi") -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{d.url}/v1/chat/completions", json=hi(text)) as r:
            assert r.status == 200


async def health(d: Daemon) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{d.url}/health") as r:
            return r.status, await r.json()


async def until_health(d: Daemon, ok: Callable[[int, dict[str, Any]], bool]) -> dict[str, Any]:
    """/health's body once `ok(status, body)`."""

    async def check() -> dict[str, Any] | None:
        status, body = await health(d)
        return body if ok(status, body) else None

    return await until(check, "/health to say so", WAIT)


async def test_database_locked_while_running_is_reported_then_recovers(spawn: Spawn) -> None:
    """Another process holding the database in a write transaction: a request is still
    answered, /health turns 503 saying the writer commits nothing, and once the lock goes
    the row is written and /health is 200 again."""
    d = await spawn(ECHO)
    holder = sqlite3.connect(d.db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        await chat(d)
        body = await until_health(d, lambda s, b: s == 503)
        assert "committed nothing" in " ".join(body["reasons"]) and body["log"]["state"] == "stalled"
        async with aiohttp.ClientSession() as s, s.get(f"{d.url}/metrics") as r:
            assert 'provider_router_log_state{state="stalled"} 1.0' in await r.text()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    body = await until_health(d, lambda s, b: s == 200)
    assert (body["log"]["written"], body["log"]["failed"]) == (1, 0)
    assert await wait_rows(d.db, 1) == 1


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_removed_or_replaced_database_file_is_reopened(spawn: Spawn, tmp_path: Path, how: str) -> None:
    """The file at the path removed (or replaced by another database): logged as an error,
    the path reopened (a new file created and migrated), and later rows land there; a row
    of the window is in the new file or counted as failed, never silently elsewhere."""
    d = await spawn(ECHO)
    await chat(d, "before")
    await wait_rows(d.db, 1)
    if how == "removed":
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{d.db}{suffix}")
    else:
        other = tmp_path / "other.db"
        sqlite3.connect(d.db).backup(dst := sqlite3.connect(other))
        dst.close()
        os.replace(other, d.db)
    await chat(d, "in the window")
    assert (await d.wait_log(f"database_file_{how}"))["level"] == "error"
    await d.wait_log("database_reopened")
    await chat(d, "after")
    body = await until_health(d, lambda s, b: s == 200 and b["log"]["queue_depth"] == 0 and b["log"]["reopened"] == 1)
    texts = [r[0] for r in ro_query(d.db, "SELECT prompt_text FROM request_log ORDER BY id")]
    assert "after" in texts
    # Rows committed after the last check that saw the right file are counted too (their
    # file is gone from the path), so `failed` may also include "before".
    assert texts.count("in the window") == 1 or 1 <= body["log"]["failed"] <= 2
    assert texts.count("before") == (1 if how == "replaced" else 0)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the test; skips the test where mounting is not permitted."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount rights): {out.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Write `path` until the file system is full."""
    with open(path, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


async def test_a_full_disk_is_reported_once_per_interval_and_writing_resumes(spawn: Spawn, tmp_path: Path) -> None:
    """On a full file system records fail: /health is 503 saying so, the failures are one
    warning per interval with counts (not a line per record), and once space returns the
    next rows are written and /health is 200, without a restart."""
    with small_tmpfs(tmp_path / "small", "2m") as fs:
        d = await spawn(ECHO, db=fs / "d.db")
        try:
            await chat(d)
            await wait_rows(d.db, 1)
            fill(fs / "filler")
            big = "x" * 200_000
            for _ in range(5):
                await chat(d, big)
            # Once all five have failed: a busy machine may hand them to the writer one at a time.
            body = await until_health(d, lambda s, b: s == 503 and b["log"]["state"] == "failing" and b["log"]["failed"] >= 5)
            assert "failing to be written" in " ".join(body["reasons"])
            warning = await d.wait_log("log_writes_failing")
            assert warning["failed"] >= 1 and warning["failed_total"] >= 1
            per_record = [x for x in d.lines() if x.get("event") == "log_write_failed"]
            assert len(per_record) < body["log"]["failed"]  # throttled: not one line per record
            os.remove(fs / "filler")
            await chat(d, "space again")
            body = await until_health(d, lambda s, b: s == 200)
            assert "space again" in [r[0] for r in ro_query(d.db, "SELECT prompt_text FROM request_log")]
        finally:
            d.proc.kill()
            await d.proc.wait()


async def test_the_wal_is_truncated_once_no_reader_holds_it(spawn: Spawn) -> None:
    """A reader holding an old snapshot keeps the WAL from being reset; once it ends, the
    periodic checkpoint truncates the WAL file to nothing."""
    d = await spawn(ECHO)
    await chat(d)
    await wait_rows(d.db, 1)
    reader = sqlite3.connect(d.db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM requests").fetchone()
    for i in range(20):
        await chat(d, f"message {i}")
    await wait_rows(d.db, 21)
    wal = Path(f"{d.db}-wal")
    assert wal.stat().st_size > 0
    reader.execute("COMMIT")
    reader.close()
    await until(lambda: not wal.exists() or wal.stat().st_size == 0, "the WAL truncated", WAIT)



class Counters:
    """The log writer's public state, set by the test (what `Writes` reads)."""

    def __init__(self) -> None:
        self.written = self.failed = self.dropped = self.depth = 0
        self.failing_since: float | None = None


def test_write_failures_warn_once_per_interval_with_counts() -> None:
    """Failures with no success since are `failing`, warned about at most once per
    interval with the count since the last warning; a success ends it."""
    import structlog.testing

    from provider_router.store.watch import WARN_SECONDS, Writes

    c = Counters()
    w = Writes(c, bound=100)
    with structlog.testing.capture_logs() as logs:
        c.failing_since = 999.0
        for t in range(5):  # a failure every second
            c.failed += 1
            w.sample(now=1000.0 + t)
        assert w.state == "failing" and w.reason() is not None
        c.failed += 3
        w.sample(now=1000.0 + WARN_SECONDS)
        c.written, c.failing_since = c.written + 1, None
        w.sample(now=1001.0 + WARN_SECONDS)
    warnings = [e for e in logs if e["event"] == "log_writes_failing"]
    assert [(e["failed"], e["failed_total"]) for e in warnings] == [(1, 1), (7, 8)]
    assert w.state == "ok" and w.reason() is None and logs[-1]["event"] == "log_writes_resumed"


def test_records_waiting_with_nothing_committed_are_stalled() -> None:
    """Records waiting and no progress for STALL_SECONDS is `stalled`; progress ends it;
    a full queue, or records dropped since the last check, is a reason of its own."""
    from provider_router.store.watch import STALL_SECONDS, Writes

    c = Counters()
    w = Writes(c, bound=3)
    c.depth = 2
    w.sample(now=10.0)
    w.sample(now=10.0 + STALL_SECONDS + 0.1)
    assert w.state == "stalled" and "committed nothing" in (w.reason() or "")
    c.written, c.depth = 2, 3
    w.sample(now=11.0 + STALL_SECONDS)
    assert w.state == "ok" and "queue is full" in (w.reason() or "")
    c.depth, c.dropped = 0, 4  # drained again, but records were dropped since the last look
    w.sample(now=12.0 + STALL_SECONDS)
    assert "4 in the last check" in (w.reason() or "")
    w.sample(now=13.0 + STALL_SECONDS)
    assert w.reason() is None
