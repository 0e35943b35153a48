"""Opening the SQLite database: PRAGMAs, and migrations applied before anything else runs.

One writer connection belongs to the log writer; readers (CLI, admin API) open their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiosqlite

from .migrations import Progress, migrate

PRAGMAS = (
    # 8 KiB pages for a new file (an existing one keeps its own): a message of a few KB,
    # the common size, then shares its page instead of taking a 4 KiB page alone.
    "PRAGMA page_size=8192",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=5000",
    "PRAGMA foreign_keys=ON",
    "PRAGMA temp_store=MEMORY",
    # The WAL is cut back to this after a checkpoint resets it; a long reader can otherwise
    # leave it at its high-water mark for good. See also store/watch.py's checkpoints.
    f"PRAGMA journal_size_limit={64 * 1024 * 1024}",
)


async def connect(
    path: str | Path, *, readonly: bool = False, migrate_schema: bool = True, progress: Progress | None = None
) -> aiosqlite.Connection:
    """Open `path` with the project's PRAGMAs. A writable open applies pending migrations
    unless `migrate_schema=False` (tools editing a running daemon's file leave that to it)."""
    if str(path) != ":memory:" and not readonly:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Every prompt and answer lands here: readable by its owner only. SQLite gives the
        # -wal and -shm files the main file's mode, so creating it 0600 covers all three.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    if readonly:
        conn = await aiosqlite.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    else:
        conn = await aiosqlite.connect(str(path))
    conn.row_factory = aiosqlite.Row
    try:
        # busy_timeout first: a file another process holds locked waits for it, not fails at once.
        for pragma in sorted(PRAGMAS, key=lambda p: "busy_timeout" not in p):
            if readonly and "journal_mode" in pragma:
                continue
            async with conn.execute(pragma) as cur:  # read and closed: no statement left in progress (VACUUM refuses to run then)
                await cur.fetchall()
        if not readonly and migrate_schema:
            await migrate(conn, progress)
    except BaseException:
        # Its thread would otherwise outlive the failure and keep the process from exiting.
        await conn.close()
        raise
    return conn


class Reopenable:
    """A connection that can be replaced under the objects holding it (the session
    repository, the admin API): they keep this handle, `swap` puts a new connection behind
    it. Used when the database file is reopened (see `watch.py`)."""

    __slots__ = ("conn",)

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)

    def swap(self, conn: aiosqlite.Connection) -> aiosqlite.Connection:
        """Put `conn` behind the handle; the previous connection, for the caller to close."""
        old, self.conn = self.conn, conn
        return old
