"""`db path`, `db prune` and `db vacuum`: where the log database is, deleting what is old,
and giving the space back to the filesystem. `--db` (or `database.url`) may name a
PostgreSQL database: prune then drops whole days (store/pg/retention.py), and there is
nothing to vacuum.
"""

from __future__ import annotations

from pathlib import Path

import aiosqlite
import click

from .. import location
from ..store import retention
from .common import POSITIVE, CliError, Group, Settings, When, examples, with_settings
from .database import run_db
from .output import human_size


@click.group(
    "db", cls=Group,
    short_help="database path, pruning and vacuuming",
    help="Maintain the log database.",
    epilog=examples(
        "provider-router db path",
        "provider-router db prune --older-than 30d && provider-router db vacuum",
    ),
)
def db() -> None:
    pass


@db.command(
    "path",
    short_help="print the database's path",
    help="Print the absolute path of the log database (from --db, or database.path in the config); "
    "a PostgreSQL URL without its password.",
    epilog=examples('sqlite3 "$(provider-router db path)"'),
)
@with_settings
def path(settings: Settings) -> None:
    url = _postgres(settings)
    click.echo(location.shown(url) if url else settings.db_path().resolve())


def _postgres(settings: Settings) -> str | None:
    """The PostgreSQL URL --db (else the config's `database.url`) names, if it names one."""
    where = settings.db_location()
    return where if location.is_postgres(where) else None


def _pg_error(url: str, e: Exception) -> CliError:
    return CliError(f"database error on {location.shown(url)}: {location.error_text(url, e)}")


@db.command(
    "prune",
    short_help="delete old requests and expired sessions",
    help="Delete requests received before the cutoff, and expired sessions last used before it "
    "(with their thread turns), in small batches of one transaction each so a running daemon keeps "
    "logging. Messages and stored request fields (tools, schemas) that no remaining request, session "
    "turn or later message uses go too, and the full-text index follows. Progress goes to stderr. "
    "On PostgreSQL (a postgresql:// --db) the days that ended before the cutoff go whole.",
    epilog=examples(
        "provider-router db prune --older-than 30d",
        "provider-router db prune --older-than 2026-01-01 --batch 1000",
    ),
)
@click.option(
    "--older-than", "older_than", type=When(), required=True, metavar="AGE",
    help="the cutoff: an age (30d, 12h, 1w) or an ISO date/time",
)
@click.option("--batch", type=POSITIVE, default=5000, metavar="N", help="rows per transaction (default: 5000)")
@with_settings
def prune(settings: Settings, older_than: str, batch: int) -> None:
    def progress(kind: str, n: int) -> None:
        click.echo(f"  deleted {n} {kind} so far", err=True)

    def report(res: retention.PruneResult) -> None:
        click.echo(
            f"deleted {res.requests} request(s) received before {res.cutoff} and "
            f"{res.sessions} expired session(s) last used before it"
        )
        # Messages and blobs are shared by requests: only those no kept row uses went.
        click.echo(f"and {res.messages} message(s) and {res.blobs} stored request field(s) nothing else used")

    url = _postgres(settings)
    if url is not None:
        import psycopg

        from ..store.pg import retention as pg_retention

        try:
            report(pg_retention.prune_now(url, older_than, batch=batch, progress=progress))
        except psycopg.Error as e:
            raise _pg_error(url, e) from None
        click.echo("(on PostgreSQL whole days go: the requests of the cutoff's own day stay until it has passed)", err=True)
        return

    async def body(conn: aiosqlite.Connection) -> None:
        res = await retention.prune(conn, older_than, batch=batch, progress=progress)
        report(res)
        if res.requests or res.sessions:
            click.echo("(the file keeps its size until `provider-router db vacuum`)", err=True)

    run_db(settings.db_path(), body, write=True)


def _sizes(path: Path) -> str:
    wal = Path(f"{path}-wal")
    db_bytes, wal_bytes = path.stat().st_size, (wal.stat().st_size if wal.exists() else 0)
    return f"{human_size(db_bytes + wal_bytes)} (db {human_size(db_bytes)}, wal {human_size(wal_bytes)})"


@db.command(
    "vacuum",
    short_help="compact the database file",
    help="Rebuild the database file to return free space to the filesystem, then checkpoint and "
    "truncate the WAL; prints the size before and after. VACUUM holds the write lock while it "
    "runs: on a large database, stop the daemon first.",
    epilog=examples("provider-router db vacuum"),
)
@with_settings
def vacuum(settings: Settings) -> None:
    if _postgres(settings) is not None:
        click.echo("not needed on PostgreSQL: retention drops whole day partitions, which leaves no dead rows; autovacuum does the rest")
        return
    path = settings.db_path()

    async def body(conn: aiosqlite.Connection) -> None:
        before = _sizes(path)
        busy, _, _ = await retention.vacuum(conn)
        click.echo(f"before: {before}\nafter:  {_sizes(path)}")
        if busy:
            click.echo("note: a reader kept the WAL busy; it is truncated at the next checkpoint", err=True)

    run_db(path, body, write=True)
