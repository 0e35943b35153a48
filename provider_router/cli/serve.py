"""`serve`: the proxy daemon, with the config's listen address and log level overridable
on the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from msgspec.structs import replace

from ..config import LOG_LEVELS, ConfigError, is_loopback
from .. import location
from .common import BUILT_IN, Settings, examples, with_settings


@click.command(
    "serve",
    short_help="run the proxy daemon",
    help="Run the proxy. SIGTERM, SIGINT or SIGHUP stop it gracefully: in-flight requests finish "
    "(up to server.shutdown_grace_seconds) and every log record is flushed; a second signal ends the "
    "grace at once. A start-up failure exits 1 with one line saying what to do.",
    epilog=examples(
        "provider-router serve                      (./config.yaml, or the built-in echo model)",
        "provider-router serve --config prod.yaml --port 9000 --log-level debug",
        "provider-router serve --workers 4          (4 processes on one port and one database)",
        "provider-router serve --db postgresql://proxy:PASSWORD@db.internal/proxy   (instances sharing PostgreSQL)",
    ),
)
@click.option("--host", metavar="HOST", help="address to listen on (default: server.host, 127.0.0.1)")
@click.option("--port", type=int, metavar="PORT", help="port to listen on (default: server.port, 8080; 0 picks one)")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), metavar="LEVEL", help=f"{', '.join(LOG_LEVELS)} (default: logs.level)")
@click.option(
    "--insecure-no-auth", is_flag=True,
    help="allow a non-loopback --host with no client keys configured (not recommended)",
)
@click.option(
    "--workers", type=click.IntRange(1, 64), metavar="N",
    help="processes serving the port, sharing sessions and the database (default: server.workers, 1)",
)
@click.option(
    "--shared", is_flag=True,
    help="share the database with other instances started with --shared (sessions read from it, locks shared, "
    "SO_REUSEPORT); --workers N runs N such instances",
)
@click.option("--worker", metavar="SPEC", hidden=True, help="internal: one of --workers N's processes")
@with_settings
def serve(
    settings: Settings, host: str | None, port: int | None, log_level: str | None, insecure_no_auth: bool,
    workers: int | None, shared: bool, worker: str | None,
) -> None:  # fmt: skip
    from ..logsetup import setup_logging  # the daemon's imports: only when it runs
    from ..serve import Worker, run, run_workers
    from ..store import Redactor

    cfg = settings.load()
    built_in = cfg is BUILT_IN
    server = replace(
        cfg.server, host=host or cfg.server.host, port=cfg.server.port if port is None else port,
        workers=cfg.server.workers if workers is None else workers,
    )  # fmt: skip
    database = cfg.database
    if settings.db and location.is_postgres(settings.db):  # --db URL: as database.url (its password is then a secret)
        database = replace(database, url=settings.db)
    cfg = replace(cfg, server=server, database=database)
    if not cfg.providers:
        raise ConfigError("no providers configured: add a `providers:` list (see config.yaml)")
    if not is_loopback(server.host) and not cfg.auth.client_keys and not insecure_no_auth:
        raise ConfigError(
            f"refusing to listen on {server.host} with no auth.client_keys: anyone on the network "
            "could spend your provider keys. Configure client keys, or pass --insecure-no-auth."
        )
    level = log_level or cfg.logs.level
    setup_logging(level, redact=Redactor(cfg.secrets()))
    if built_in and worker is None:
        import structlog

        structlog.get_logger("provider_router").warning(
            "no_config_file", path=str(Path(settings.config).resolve()),
            serving="the built-in echo model only; pass --config PATH",
        )
    if worker is None and server.workers > 1:

        def command(port: int) -> list[str]:
            """A worker: `serve` with these settings, on the port they share."""
            args = [sys.executable, "-m", "provider_router", "serve", "--config", settings.config, "--host", server.host]
            args += ["--port", str(port), "--log-level", level, "--workers", "1", "--shared"]
            if settings.db:
                args += ["--db", settings.db]
            return args + (["--insecure-no-auth"] if insecure_no_auth else [])

        status = run_workers(cfg, server.workers, command)
    else:
        status = run(
            cfg, db_path=settings.db, traceback=level == "debug", shared=shared,
            worker=Worker.parse(worker) if worker else None,
        )  # fmt: skip
    if status:
        raise click.exceptions.Exit(status)
