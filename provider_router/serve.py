"""Running the daemon: the event loop, the listening socket, and graceful shutdown.

aiohttp's runner handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests run
for the grace period, cancels the rest, then runs the app's cleanup (log flush last).
"""

from __future__ import annotations

import asyncio
import gc

import structlog
from aiohttp import web

from .app import create_app
from .config import Config
from .state import STATE
from .store.presence import Presence, hold, serving

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


def run(cfg: Config, *, db_path: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    app = create_app(cfg, db_path=db_path)
    app.on_startup.append(_settle_heap)  # after the app's own start-up (cleanup_ctx runs first)
    host, port = cfg.server.host, cfg.server.port
    mark: Presence | None = None

    def announce(_: str) -> None:
        # Called by run_app once the socket listens, so "listening" means ready. From then
        # on the mark next to the database sends session edits of the CLI here (the lock
        # dies with the process: a crash leaves only a stale file, read as free).
        nonlocal mark
        db = app[STATE].db_path
        try:
            mark = hold(db, local_url(host, port))
        except OSError as e:
            log.warning("daemon_mark_failed", db=db, error=str(e))
        else:
            if mark is None:
                other = serving(db) or {}
                log.warning("database_shared", db=db, other_pid=other.get("pid"), other_url=other.get("url"))
        log.info(
            "listening",
            url=f"http://{host}:{port}/v1",
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
