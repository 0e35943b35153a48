"""The commands' own connection to the log database: read-only unless they edit, never
creating it, migrating one an earlier release wrote (unless a daemon serves the file); a
SQLite file's path or a PostgreSQL URL, read through `store.reads.LogReads`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Awaitable, Callable

import aiosqlite
import click

from ..location import error_text, is_postgres, shown
from ..store.reads import LogReads, Unavailable, open_reads, open_sqlite
from .common import CliError, Settings

Body = Callable[[aiosqlite.Connection], Awaitable[None]]
ReadsBody = Callable[[LogReads], Awaitable[None]]


def _say(line: str) -> None:
    click.echo(line, err=True)


def run_reads(location: str, body: ReadsBody, *, write: bool = False) -> None:
    """Open the log database at `location` (a path or a `postgresql://` URL), run `body`
    on its reads, close it. Any failure to reach or read a PostgreSQL database is one line
    naming the URL without its password."""

    async def main() -> None:
        async with open_reads(location, write=write, progress=_say) as reads:
            await body(reads)

    try:
        asyncio.run(main())
    except Unavailable as e:
        raise CliError(str(e)) from None
    except Exception as e:
        if is_postgres(location) and type(e).__module__.startswith(("psycopg", "psycopg_pool")):
            raise CliError(f"database error on {shown(location)}: {error_text(location, e)}") from None
        raise


def run_location(settings: Settings, body: ReadsBody, *, write: bool = False) -> None:
    """`run_reads` on the database the command's options and config name."""
    run_reads(settings.db_location(), body, write=write)


def run_db(path: Path, body: Body, *, write: bool = False) -> None:
    """Open the SQLite file at `path`, run `body` on it, close it (the commands that
    need a file: `db`)."""

    async def main() -> None:
        conn = await open_db(path, write=write)
        try:
            await body(conn)
        finally:
            await conn.close()

    asyncio.run(main())


async def open_db(path: Path, *, write: bool = False) -> aiosqlite.Connection:
    """A connection of our own to a SQLite file: read-only unless `write`. Never creates
    the file; migrates one an earlier release wrote, with progress on stderr."""
    try:
        return await open_sqlite(path, write=write, progress=_say)
    except Unavailable as e:
        raise CliError(str(e)) from None
