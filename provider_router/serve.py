"""Running the daemon: the event loop, the listening socket, and graceful shutdown.

aiohttp's runner handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests run
for the grace period, cancels the rest, then runs the app's cleanup (log flush last).
"""

from __future__ import annotations

import asyncio
import gc
import re
from pathlib import Path

import structlog
from aiohttp import web

from .app import create_app
from .config import Config
from .state import STATE
from .store.presence import hold, serving

log = structlog.get_logger("provider_router")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # optional extra `speed`: a faster event loop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


async def _settle_heap(_: web.Application) -> None:
    """Once started: everything alive now (modules, config, the app) lives as long as the
    daemon, so the cyclic collector stops walking it. A full collection otherwise walks
    every object each time and stalls requests for milliseconds."""
    gc.collect()
    gc.freeze()


def local_url(host: str, port: int) -> str:
    """Where a CLI on this machine reaches a daemon listening on `host`: an any-address
    (or `localhost`) is reached on loopback."""
    if host in ("", "0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bound_port(message: str, default: int) -> int:
    # run_app's message names its sites with the bound port: `--port 0` shows the one picked.
    m = re.search(r"://\S*:(\d+)", message)
    return int(m.group(1)) if m else default


def run(cfg: Config, *, db_path: str | None = None) -> int:
    """Serve until SIGINT/SIGTERM; the exit status."""
    db = db_path or cfg.database.path
    # Before the app loads sessions: another daemon on this database would write its own
    # copies of them over ours, and a CLI edit must know whom to ask from the start.
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    try:
        mark = hold(db)
    except OSError as e:
        mark = None
        log.warning("daemon_mark_failed", db=db, error=str(e))
    else:
        if mark is None:
            other = serving(db) or {}
            log.error(
                "database_in_use", db=db, other_pid=other.get("pid"), other_url=other.get("url"),
                hint="another daemon serves this database: stop it, or pass --db for another one",
            )
            return 1
    app = create_app(cfg, db_path=db)
    app.on_startup.append(_settle_heap)  # after the app's own start-up (cleanup_ctx runs first)
    host, port = cfg.server.host, cfg.server.port

    def announce(message: str) -> None:
        # Called by run_app once the socket listens, so "listening" means ready; from then
        # on the mark tells the CLI where to send session edits.
        bound = _bound_port(message, port)
        if mark is not None:
            mark.serve_at(local_url(host, bound))
        log.info(
            "listening",
            url=f"http://{host}:{bound}/v1",
            db=db,
            models=[m.name for m in app[STATE].router.available],
        )

    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            shutdown_timeout=cfg.server.shutdown_grace_seconds,
            handler_cancellation=True,
            access_log=None,
            print=announce,
            loop=loop,
        )
    finally:
        if mark is not None:  # released once the log is flushed: till then sessions may be written
            mark.release()
    log.info("stopped")
    return 0
