"""The commands' own connection to the log database: read-only unless they edit, never
creating the file, migrating a file an earlier release wrote (unless a daemon serves it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Awaitable, Callable

import aiosqlite
import click

from ..store.db import connect
from ..store.migrations import MIGRATIONS, migrate_file
from ..store.presence import serving
from .common import CliError

Body = Callable[[aiosqlite.Connection], Awaitable[None]]


def run_db(path: Path, body: Body, *, write: bool = False) -> None:
    """Open the database at `path`, run `body` on it, close it."""

    async def main() -> None:
        conn = await open_db(path, write=write)
        try:
            await body(conn)
        finally:
            await conn.close()

    asyncio.run(main())


async def open_db(path: Path, *, write: bool = False) -> aiosqlite.Connection:
    """A connection of our own: read-only unless `write`. Never migrates or creates the file.

    Readers never block the daemon (WAL). Writers get the project's PRAGMAs, notably
    busy_timeout (wait for the daemon's writer) and foreign_keys (session cascades).
    """
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to this directory: {path.absolute()})"
        raise CliError(f"no database at {path}{where} (start `provider-router serve`, or pass --db PATH)")
    await _migrated(path)
    return await connect(path, readonly=not write, migrate_schema=False)


def _pending(path: Path) -> bool:
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    try:
        done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    except sqlite3.OperationalError:  # no table yet: an empty file
        done = set()
    finally:
        db.close()
    return any(name not in done for name, _ in MIGRATIONS)


async def _migrated(path: Path) -> None:
    """A database an earlier release wrote is migrated first (with progress on stderr),
    unless a daemon serves it: that daemon migrates its own file when it starts."""
    if not _pending(path):
        return
    if serving(path) is not None:
        raise CliError(f"the database at {path} is from an earlier release and a daemon serves it: restart the daemon (it migrates the file), then try again")

    def progress(what: str, done: int, total: int) -> None:
        click.echo(f"migrating {path}: {what} {done}/{total}", err=True)

    click.echo(f"migrating {path} to this release's schema (once)...", err=True)
    await asyncio.to_thread(migrate_file, str(path), progress)
