"""The command line: `serve` starts the daemon; the other commands read the log database.

`provider-router --help` and `provider-router COMMAND --help` describe each one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from msgspec.structs import replace

from .config import LOG_LEVELS, Config, ConfigError, ModelConfig, ProviderConfig, is_loopback, load_config

DEFAULT_CONFIG = "config.yaml"
# With no ./config.yaml: the local `echo` model, which needs no key, and default paths.
BUILT_IN = Config(providers=(ProviderConfig(name="echo", type="echo"),), models=(ModelConfig(name="echo", provider="echo"),))


def load(args: argparse.Namespace) -> Config:
    """The config named by --config (default ./config.yaml), or built-in defaults if absent."""
    path = Path(args.config)
    if not path.exists():
        if args.config != DEFAULT_CONFIG:
            raise ConfigError(f"config file not found: {path}")
        return BUILT_IN
    return load_config(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from .logsetup import setup_logging
    from .store import Redactor

    cfg = load(args)
    built_in = cfg is BUILT_IN
    server = replace(
        cfg.server,
        host=args.host or cfg.server.host,
        port=cfg.server.port if args.port is None else args.port,
    )
    cfg = replace(cfg, server=server)
    if not cfg.providers:
        raise ConfigError("no providers configured: add a `providers:` list (see config.yaml)")
    if not is_loopback(server.host) and not cfg.auth.client_keys and not args.insecure_no_auth:
        raise ConfigError(
            f"refusing to listen on {server.host} with no auth.client_keys: anyone on the network "
            "could spend your provider keys. Configure client keys, or pass --insecure-no-auth."
        )
    level = args.log_level or cfg.logs.level
    setup_logging(level, redact=Redactor(cfg.secrets()))
    if built_in:
        import structlog

        structlog.get_logger("provider_router").warning(
            "no_config_file", path=str(Path(args.config).resolve()), serving="the built-in echo model only; pass --config PATH"
        )
    from .serve import run

    return run(cfg, db_path=args.db, traceback=level == "debug")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH", help="config file (default: %(default)s)")
    p.add_argument("--db", metavar="PATH", help="log database (default: database.path from the config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="provider-router",
        description="A local OpenAI-compatible proxy: routes chat requests to upstream providers, "
        "threads conversations on stateful upstreams, and logs every request to SQLite.",
        epilog="Point an OpenAI client at http://127.0.0.1:8080/v1 after `provider-router serve`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the proxy daemon",
        description="Run the proxy. SIGTERM, SIGINT or SIGHUP stop it gracefully: in-flight requests finish "
        "(up to server.shutdown_grace_seconds) and every log record is flushed; a second signal ends the "
        "grace at once. A start-up failure exits 1 with one line saying what to do.",
    )
    _add_common(serve)
    serve.add_argument("--host", help="address to listen on (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: server.port, 8080; 0 picks one)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="default: logs.level")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow a non-loopback --host with no client keys configured (not recommended)",
    )
    serve.set_defaults(func=cmd_serve)
    try:
        from . import inspect_cli
    except ImportError:  # the inspection commands are optional during development
        inspect_cli = None
    if inspect_cli is not None:
        inspect_cli.register(sub, _add_common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"provider-router: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
