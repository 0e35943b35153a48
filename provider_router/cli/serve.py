"""`serve`: the proxy daemon, with the config's listen address and log level overridable
on the command line.
"""

from __future__ import annotations

from pathlib import Path

import click
from msgspec.structs import replace

from ..config import LOG_LEVELS, ConfigError, is_loopback
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
    ),
)
@click.option("--host", metavar="HOST", help="address to listen on (default: server.host, 127.0.0.1)")
@click.option("--port", type=int, metavar="PORT", help="port to listen on (default: server.port, 8080; 0 picks one)")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), metavar="LEVEL", help=f"{', '.join(LOG_LEVELS)} (default: logs.level)")
@click.option(
    "--insecure-no-auth", is_flag=True,
    help="allow a non-loopback --host with no client keys configured (not recommended)",
)
@with_settings
def serve(settings: Settings, host: str | None, port: int | None, log_level: str | None, insecure_no_auth: bool) -> None:
    from ..logsetup import setup_logging  # the daemon's imports: only when it runs
    from ..serve import run
    from ..store import Redactor

    cfg = settings.load()
    built_in = cfg is BUILT_IN
    server = replace(cfg.server, host=host or cfg.server.host, port=cfg.server.port if port is None else port)
    cfg = replace(cfg, server=server)
    if not cfg.providers:
        raise ConfigError("no providers configured: add a `providers:` list (see config.yaml)")
    if not is_loopback(server.host) and not cfg.auth.client_keys and not insecure_no_auth:
        raise ConfigError(
            f"refusing to listen on {server.host} with no auth.client_keys: anyone on the network "
            "could spend your provider keys. Configure client keys, or pass --insecure-no-auth."
        )
    level = log_level or cfg.logs.level
    setup_logging(level, redact=Redactor(cfg.secrets()))
    if built_in:
        import structlog

        structlog.get_logger("provider_router").warning(
            "no_config_file", path=str(Path(settings.config).resolve()),
            serving="the built-in echo model only; pass --config PATH",
        )
    status = run(cfg, db_path=settings.db, traceback=level == "debug")
    if status:
        raise click.exceptions.Exit(status)
